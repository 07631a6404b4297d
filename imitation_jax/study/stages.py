"""Resumable stages: each stage records, when it finishes, a done-marker naming its outputs and the
markers of the stages it used. A stage is up to date while its marker exists, every output exists
and every input stage is unchanged; otherwise it runs again, and so does everything downstream of it
(its new marker differs). So a rerun redoes nothing, and deleting one student's checkpoint redoes
that student and its evaluation rows only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from typing import Callable, Iterator, Optional, Sequence


class StudyError(RuntimeError):
    """A pipeline step failed; the message names the stage and its log."""


@dataclasses.dataclass
class Stage:
    name: str  # unique, e.g. "train/student/small-local-2000"
    run: Callable[[], None]
    outputs: list[str]  # paths that must exist for the stage to count as done
    deps: list[str] = dataclasses.field(default_factory=list)  # names of stages whose results it uses
    needs: tuple[str, ...] = ()  # services it needs running ("teacher", "judge")
    key: str = ""  # the settings it was run with: a change makes it run again


class StageState:
    def __init__(self, state_dir: str):
        self.dir = state_dir
        os.makedirs(state_dir, exist_ok=True)

    def _path(self, name: str) -> str:
        return os.path.join(self.dir, name.replace("/", "__") + ".json")

    def marker(self, name: str) -> Optional[dict]:
        try:
            with open(self._path(name)) as f:
                return json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def is_done(self, stage: Stage) -> bool:
        m = self.marker(stage.name)
        if m is None or not all(os.path.exists(p) for p in stage.outputs) or m.get("key", "") != stage.key:
            return False
        for dep in stage.deps:
            d = self.marker(dep)
            if d is None or m["inputs"].get(dep) != d["token"]:
                return False
        return True

    def mark_done(self, stage: Stage, seconds: float) -> None:
        inputs = {dep: (self.marker(dep) or {}).get("token") for dep in stage.deps}
        record = {"token": uuid.uuid4().hex, "inputs": inputs, "outputs": stage.outputs, "key": stage.key,
                  "seconds": round(seconds, 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        tmp = self._path(stage.name) + ".tmp"
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1)
        os.replace(tmp, self._path(stage.name))

    def forget(self, name: str) -> None:
        try:
            os.remove(self._path(name))
        except FileNotFoundError:
            pass


def settings_key(*parts) -> str:
    """A stable text of the settings a stage depends on (dataclasses, dicts, lists, scalars)."""
    def plain(x):
        if dataclasses.is_dataclass(x):
            return plain(dataclasses.asdict(x))
        if isinstance(x, dict):
            return {str(k): plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x
    return json.dumps(plain(list(parts)), sort_keys=True)


def cli_env() -> dict:
    env = dict(os.environ)
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.setdefault(var, "1")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.setdefault("OPENAI_API_KEY", "study-local")  # the local teacher and judge take any key
    return env


def cli_command(args: Sequence) -> list[str]:
    """The command line of `imitation-jax ARGS` in this Python: the study drives the pipeline only
    through its CLI, in subprocesses, and never imports the command layer above it."""
    return [sys.executable, "-m", "imitation_jax.cli", *map(str, args)]


def run_cli(args: Sequence[str], log_path: str, stage: str, ok_codes: Sequence[int] = (0,)) -> None:
    """Runs `imitation-jax ARGS` in a subprocess with its output in `log_path`."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    cmd = cli_command(args)
    with open(log_path, "a") as log:
        log.write(f"\n$ imitation-jax {' '.join(map(str, args))}\n")
        log.flush()
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=cli_env())
    if rc not in ok_codes:
        raise StudyError(f"stage {stage}: `imitation-jax {args[0]}` exited with {rc}; last lines of "
                         f"{log_path}:\n{tail(log_path)}")


def tail(path: str, n: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except FileNotFoundError:
        return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def service(cmd: list[str], port: int, log_path: str, name: str, timeout: float = 600) -> Iterator[str]:
    """Starts a local HTTP service, waits for /health, yields its /v1 base URL, stops it."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    log = open(log_path, "a")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=cli_env())
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise StudyError(f"{name} exited with {proc.returncode} before it was up; "
                                 f"last lines of {log_path}:\n{tail(log_path)}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise StudyError(f"{name} did not answer /health within {timeout:.0f}s ({log_path})")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
