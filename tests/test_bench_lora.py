"""tools/bench_lora.py at a tiny shape: both variants run (the LoRA one through the train loop's
frozen-base compile) and the optimizer-state share is the hand-counted parameter share."""

import os
import re
import subprocess
import sys

TOOL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools", "bench_lora.py")


def test_bench_lora_tiny_runs_and_counts_the_optimizer_share():
    out = subprocess.run([sys.executable, TOOL, "--hidden", "64", "--intermediate", "160", "--layers", "2",
                          "--heads", "4", "--vocab", "512", "--seq-len", "64", "--batch", "2", "--steps", "1",
                          "--rank", "4"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    h, m, r, vocab, layers = 64, 160, 4, 512, 2
    adapters = layers * (4 * (h * r + r * h) + 2 * (h * r + r * m) + (m * r + r * h))  # q k v o, gate up, down
    full = 2 * vocab * h + layers * (4 * h * h + 3 * h * m + 2 * h) + h  # embed, lm_head, layers, final norm
    share = float(re.search(r"optimizer state ([\d.]+)%", out.stdout).group(1))
    assert abs(share - 100 * adapters / full) < 0.01, (share, adapters, full)
    assert re.search(r"lora .*trained params 0\.01M", out.stdout) and "full  step" in out.stdout
