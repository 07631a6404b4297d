#!/usr/bin/env bash
# The training bench on a lent GPU, as one prepared call (device time is scarce): versions, a tiny
# step that proves our code runs under the machine's JAX, then the LLaMA-3.2-1B shape in bf16 against
# HF torch (MFU), and variants of ours. Logs go to $OUT (or ./device_out). Runs under the machine's
# own python3 and packages: no install, no network.
#   bash tools/device_bench.sh            # everything
#   bash tools/device_bench.sh quick      # versions + the tiny step only
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
timeout 150 $PY tools/bench_train.py --hidden 256 --layers 2 --heads 4 --kv-heads 2 --intermediate 512 \
    --vocab 1024 --seq 256 --batch 2 --steps 2 --warmup 1 --rounds 1 --torch-attn sdpa >"$OUT/tiny.log" 2>&1
rc=$?
tail -4 "$OUT/tiny.log"
[ $rc -eq 0 ] || { echo "tiny bench failed (rc $rc):"; tail -40 "$OUT/tiny.log"; exit 1; }
[ "${1:-}" = quick ] && exit 0

ONE_B="--hidden 2048 --layers 16 --heads 32 --kv-heads 8 --intermediate 8192 --vocab 128256 --tie-embeddings"
run() {  # name, seconds, flags...
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    timeout "$limit" $PY tools/bench_train.py $ONE_B "$@" >"$OUT/$name.log" 2>&1
    echo "   rc $?"
    grep -E "^(model|ours|compile|matmul|hf torch|  |ours jax|speedup)" "$OUT/$name.log" | grep -v "^  *$" | tail -12
}
# Every position trained: the MFU convention (full output layer); then imitation-style answers only.
run 1b-seq2048-b4-all 180 --seq 2048 --batch 4 --trained all --steps 8 --warmup 2 --rounds 2 --torch-attn sdpa
run 1b-seq2048-b8-all-xla 100 --seq 2048 --batch 8 --trained all --steps 8 --warmup 2 --rounds 1 --no-torch --attention xla
run 1b-seq2048-b8-all 100 --seq 2048 --batch 8 --trained all --steps 8 --warmup 2 --rounds 1 --no-torch
run 1b-seq2048-b8-answers 100 --seq 2048 --batch 8 --steps 8 --warmup 2 --rounds 1 --no-torch
