"""The code sandbox: limits hold, the caller is unharmed, files stay in the sandbox's temp dir."""

from __future__ import annotations

import os
import resource
import time

from imitation_jax.evaluation.sandbox import SandboxLimits, check_program, run_python

ADD = "def add(a, b):\n    return a + b\n"
TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"


def test_correct_solution_passes_and_wrong_one_fails():
    assert check_program(ADD, TEST, "add").passed
    wrong = check_program("def add(a, b):\n    return a - b\n", TEST, "add")
    assert not wrong.passed and not wrong.timed_out and "AssertionError" in wrong.stderr


def test_infinite_loop_is_killed_within_the_timeout():
    start = time.perf_counter()
    result = run_python("while True:\n    pass\n", SandboxLimits(timeout_s=1.0, cpu_s=30))
    assert result.timed_out and not result.passed
    assert time.perf_counter() - start < 5


def test_forked_children_die_with_the_timeout(tmp_path):
    marker = tmp_path / "alive"
    code = ("import os, time\n"
            "if os.fork() == 0:\n"
            f"    time.sleep(3)\n    open({str(marker)!r}, 'w').write('x')\n    os._exit(0)\n"
            "time.sleep(100)\n")
    result = run_python(code, SandboxLimits(timeout_s=0.5))
    assert result.timed_out
    time.sleep(3.5)
    assert not marker.exists()  # the child was in the killed process group


def test_memory_bomb_fails_without_hurting_the_caller():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = run_python("x = bytearray(8 * 1024 ** 3)\n", SandboxLimits(memory_mb=256))
    assert not result.passed and "MemoryError" in result.stderr
    grow = run_python("x = []\nwhile True:\n    x.append(' ' * 10 ** 6)\n", SandboxLimits(memory_mb=256, timeout_s=20))
    assert not grow.passed and not grow.timed_out
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB: we did not grow
    assert check_program(ADD, TEST, "add").passed  # and still work


def test_files_land_in_the_sandbox_dir_which_is_removed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_python("import os\nopen('out.txt', 'w').write('hi')\nprint(os.getcwd())\n")
    assert result.passed
    sandbox_dir = result.stdout.strip()
    assert not os.path.exists(tmp_path / "out.txt")
    assert sandbox_dir != str(tmp_path) and not os.path.exists(sandbox_dir)


def test_minimal_environment_and_isolated_mode(monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")
    result = run_python("import os, sys\nprint(os.environ.get('SECRET_TOKEN'), sys.flags.isolated)\n")
    assert result.stdout.split() == ["None", "1"]


def test_file_size_limit():
    result = run_python("open('big', 'wb').write(b'x' * (4 * 1024 * 1024))\n", SandboxLimits(file_size_mb=1))
    assert not result.passed
