"""One writer per output file: an advisory lock on a sidecar `OUT.lock`, held for a whole run.

`collect` appends answers to OUT and resumes from what is there; two processes on one OUT would
each ask for (and append) the same missing prompts. `judge` rewrites its report. So each takes
`hold_output(OUT)` first; a second process finds it held and stops with one line naming the file
and the holder.

Why `flock`: the kernel releases it when its holder dies in any way (SIGKILL included), so a
crash never leaves a lock to clean up by hand. Why a sidecar rather than OUT itself: the holder's
record (pid, host, command, start time) has to live somewhere, and OUT is data (JSONL, a JSON
report); judge should not create OUT before it has a report to put in it; and a flock sits on an
inode, so anything that replaces OUT by a rename (an atomic rewrite, `mv`) would silently drop it.
On Linux flock also works over NFS (mapped to byte-range locks).

Stale holder info: it is read only when the flock is refused, i.e. while a live process holds
it, and every holder rewrites it right after locking. In the instant between a new holder's lock
and its write, the file may still name an earlier holder that died: a recorded pid on this host
that is not running is re-read briefly, then reported as unknown. A clean exit removes the file
(first unlinking it while still locked); a process that got the lock on a file that was unlinked
or replaced meanwhile sees its inode differ from the path's and tries again.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator

from imitation_jax.errors import ConfigError

_HELD: dict[str, int] = {}  # lock path -> nesting depth in this process (flock is per open file)


def lock_path(out: str) -> str:
    return os.path.realpath(out) + ".lock"  # one lock however OUT is reached (symlinks, ..)


def _describe_holder(path: str) -> str:
    """Who holds the lock, as recorded in the lock file (see the module docstring on staleness)."""
    info: dict = {}
    for _ in range(20):
        try:
            with open(path, encoding="utf-8") as f:
                info = json.loads(f.read() or "{}")
        except (OSError, ValueError):
            info = {}
        if not isinstance(info, dict):
            info = {}
        pid, host = info.get("pid"), info.get("host")
        stale = isinstance(pid, int) and host == socket.gethostname() and not _running(pid)
        if pid is not None and not stale:
            break
        info = {}
        time.sleep(0.05)  # a new holder is about to write its own
    if not info:
        return "held by a process that has not recorded itself yet"
    what = f" ({info['command']}" + (f", since {info['started']})" if info.get("started") else ")") \
        if info.get("command") else ""
    return f"held by pid {info.get('pid')} on {info.get('host')}{what}"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _acquire(path: str, out: str, command: str) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise ConfigError(f"{out} is being written by another process: {_describe_holder(path)}, "
                              f"lock {path}; one writer per output file: wait for it to finish, "
                              f"stop it, or choose another --out") from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the file was removed or replaced after we opened it: lock the current one
    record = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    return fd


@contextlib.contextmanager
def hold_output(out: str, command: str | None = None) -> Iterator[None]:
    """Holds OUT's lock for the block; ConfigError (one line, pid and host of the holder) when
    another process holds it. Re-entrant within a process."""
    path = lock_path(out)
    if path in _HELD:
        _HELD[path] += 1
        try:
            yield
        finally:
            _HELD[path] -= 1
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = _acquire(path, out, command or " ".join(["imitation-jax", *sys.argv[1:2]]))
    _HELD[path] = 1
    try:
        yield
    finally:
        del _HELD[path]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # while still locked: a waiter that opened it sees it is gone
        os.close(fd)
