"""Run untrusted (model-written) Python in a child process that cannot hurt the caller.

The child is `python -I` (isolated mode: no user site-packages, no PYTHON* variables, the script's
directory not on sys.path) started in a fresh temporary directory that is removed afterwards, with a
minimal environment, its own process group (so a timeout kills whatever it forked) and resource
limits set before the program starts: address space (a memory bomb gets MemoryError, not the machine),
CPU seconds, file size and number of processes. This is the HumanEval convention of executing
completions against unit tests; it is a fence against accidents, not a security boundary against a
determined attacker (use a container or VM for that).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
import time


@dataclasses.dataclass
class SandboxLimits:
    timeout_s: float = 10.0  # wall clock; the whole process group is killed after it
    memory_mb: int = 1024  # RLIMIT_AS of the child
    cpu_s: int = 10  # RLIMIT_CPU (the kernel sends SIGXCPU, then SIGKILL)
    file_size_mb: int = 16  # RLIMIT_FSIZE: largest file the code may write
    max_processes: int = 64  # RLIMIT_NPROC: threads/processes of this user beyond the current count


@dataclasses.dataclass
class SandboxResult:
    passed: bool  # exit status 0 within the limits
    returncode: int | None  # None when killed for the timeout
    timed_out: bool
    stdout: str
    stderr: str
    seconds: float

    @property
    def status(self) -> str:
        if self.timed_out:
            return "timeout"
        return "passed" if self.passed else f"failed (exit {self.returncode})"


def _user_process_count() -> int:
    """Processes of this user now: RLIMIT_NPROC counts them all, so the limit is set above it."""
    uid = os.getuid()
    count = 0
    for name in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid == uid:
                    count += 1
            except OSError:
                continue
    return count


# Limits are set by a tiny launcher that then execs the program, rather than by preexec_fn: a
# preexec_fn runs Python between fork and exec, which is unsafe in a multithreaded parent (JAX).
_LAUNCHER = """
import os, resource, sys
mem, cpu, fsize, nproc, script = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
if os.getuid() != 0:  # root ignores RLIMIT_NPROC
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
os.execv(sys.executable, [sys.executable, "-I", "-B", script])
"""


def _command(limits: SandboxLimits, script: str) -> list[str]:
    mb = 1024 * 1024
    nproc = _user_process_count() + limits.max_processes
    return [sys.executable, "-I", "-B", "-c", _LAUNCHER, str(limits.memory_mb * mb), str(limits.cpu_s),
            str(limits.file_size_mb * mb), str(nproc), script]


def run_python(code: str, limits: SandboxLimits | None = None, stdin: str = "") -> SandboxResult:
    """Execute `code` as a script in a sandboxed child; never raises for anything the code does."""
    limits = limits or SandboxLimits()
    with tempfile.TemporaryDirectory(prefix="imitation_jax_sandbox_") as work:
        script = os.path.join(work, "program.py")
        with open(script, "w") as f:
            f.write(code)
        env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8",
               "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
        start = time.perf_counter()
        proc = subprocess.Popen(  # own session: a timeout kills the process group, forks included
            _command(limits, script), cwd=work, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, errors="replace", start_new_session=True, close_fds=True)
        timed_out = False
        try:
            out, err = proc.communicate(stdin, timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
            out, err = proc.communicate()
        finally:
            _kill_group(proc)  # children the code left behind
        seconds = time.perf_counter() - start
    code_ = proc.returncode
    return SandboxResult(passed=not timed_out and code_ == 0, returncode=None if timed_out else code_,
                         timed_out=timed_out, stdout=out[-4000:], stderr=err[-4000:], seconds=seconds)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def check_program(program: str, test: str, entry_point: str | None = None,
                  limits: SandboxLimits | None = None) -> SandboxResult:
    """HumanEval convention: `program` (prompt + completion) followed by `test`, which defines
    `check(candidate)`; the program passes when `check(entry_point)` raises nothing."""
    call = f"\n\ncheck({entry_point})\n" if entry_point else "\n"
    return run_python(program + "\n\n" + test + call, limits)
