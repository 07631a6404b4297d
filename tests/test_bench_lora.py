"""tools/bench_lora.py at a tiny shape: both variants run (the LoRA one through the train loop's
frozen-base compile) and the optimizer state's share is the hand-counted parameter share."""

import importlib.util
import os

TOOL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools", "bench_lora.py")


def test_bench_lora_tiny_runs_and_counts_the_optimizer_share():
    spec = importlib.util.spec_from_file_location("bench_lora", TOOL)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    h, m, r, vocab, layers = 64, 160, 4, 512, 2
    flags = ["--hidden", str(h), "--intermediate", str(m), "--layers", str(layers), "--heads", "4",
             "--vocab", str(vocab), "--seq-len", "64", "--batch", "2", "--steps", "1", "--rank", str(r)]
    full, lora = (bench.run_variant(bench.parse_args([*flags, "--variant", v])) for v in ("full", "lora"))
    adapters = layers * (4 * (h * r + r * h) + 2 * (h * r + r * m) + (m * r + r * h))  # q k v o, gate up, down
    params = 2 * vocab * h + layers * (4 * h * h + 3 * h * m + 2 * h) + h  # embed, lm_head, layers, final norm
    assert (lora["trained_params"], full["trained_params"]) == (adapters, params)
    # AdamW's two fp32 moments per trained parameter, plus the same few step counters in both
    extra = round(full["opt_state_MiB"] * 2**20) - 8 * params
    assert round(lora["opt_state_MiB"] * 2**20) - 8 * adapters == extra and 0 <= extra < 64
    assert lora["step_s"] > 0 and lora["loss"] > 0
