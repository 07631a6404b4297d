#!/usr/bin/env bash
# The training bench on a lent GPU, as one prepared call (device time is scarce): versions, a tiny
# step that proves our code runs under the machine's JAX, then the LLaMA-3.2-1B shape in bf16 against
# HF torch (MFU), and variants of ours. Logs go to $OUT (or ./device_out). Runs under the machine's
# own python3 and packages: no install, no network.
#   bash tools/device_bench.sh                 # versions, the tiny step, the default runs
#   bash tools/device_bench.sh quick           # versions + the tiny step only
#   bash tools/device_bench.sh b2-vs-torch b16 # versions + the named runs (see the case below)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PY:-python3}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
$PY -c "
import importlib.metadata as m
print('versions:', ', '.join(f'{p} {m.version(p)}' for p in ('jax', 'jaxlib', 'flax', 'optax', 'torch', 'transformers')))"

# Fail fast (a broken import or API change under this JAX) before the long runs.
[ $# -gt 0 ] && [ "$1" != quick ] && skip_tiny=1 || skip_tiny=0
[ $skip_tiny = 1 ] || timeout 150 $PY tools/bench_train.py --hidden 256 --layers 2 --heads 4 --kv-heads 2 --intermediate 512 \
    --vocab 1024 --seq 256 --batch 2 --steps 2 --warmup 1 --rounds 1 --torch-attn sdpa >"$OUT/tiny.log" 2>&1
rc=$?
[ $skip_tiny = 1 ] || tail -4 "$OUT/tiny.log"
[ $rc -eq 0 ] || { echo "tiny bench failed (rc $rc):"; tail -40 "$OUT/tiny.log"; exit 1; }
[ "${1:-}" = quick ] && exit 0

ONE_B="--hidden 2048 --layers 16 --heads 32 --kv-heads 8 --intermediate 8192 --vocab 128256 --tie-embeddings"
run() {  # name, seconds, flags...
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    timeout "$limit" $PY tools/bench_train.py $ONE_B "$@" >"$OUT/$name.log" 2>&1
    echo "   rc $?"
    grep -E "^(model|ours|compile|matmul|hf torch|  |ours jax|speedup)|RESOURCE_EXHAUSTED" "$OUT/$name.log" | tail -12
}
ALL="--seq 2048 --trained all --steps 8 --warmup 2"  # every position trained: the MFU convention
runs=("$@")
[ ${#runs[@]} -eq 0 ] && runs=(b2-vs-torch b8 b16 b8-answers)
for r in "${runs[@]}"; do
    case $r in
        # JAX takes what it needs (no preallocation), so torch fits beside it: at batch 2 on an
        # 80 GB card (at batch 4 torch asked for more than the 44 GiB left beside ours on an H100).
        b2-vs-torch) XLA_PYTHON_CLIENT_PREALLOCATE=false PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
                     run "$r" 170 $ALL --batch 2 --rounds 2 --torch-attn sdpa ;;
        b4-vs-torch) XLA_PYTHON_CLIENT_PREALLOCATE=false PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
                     run "$r" 170 $ALL --batch 4 --rounds 2 --torch-attn sdpa ;;
        b8) run "$r" 90 $ALL --batch 8 --rounds 1 --no-torch ;;
        b8-xla) run "$r" 90 $ALL --batch 8 --rounds 1 --no-torch --attention xla ;;
        b8-answers) run "$r" 90 --seq 2048 --steps 8 --warmup 2 --batch 8 --rounds 1 --no-torch ;;
        b8-chunk1024) run "$r" 90 $ALL --batch 8 --rounds 1 --no-torch --loss-chunk 1024 ;;
        b16) run "$r" 100 $ALL --batch 16 --rounds 1 --no-torch ;;
        b16-save-dots) run "$r" 100 $ALL --batch 16 --rounds 1 --no-torch --remat save_dots ;;
        *) echo "unknown run $r" ;;
    esac
done
