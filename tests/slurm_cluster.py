"""A throwaway Slurm cluster on this machine, for the launcher tests and for trying launch/slurm.sbatch
by hand.

Its own slurm.conf, state, spool, pid and log files live under one directory; slurmctld and one
slurmd per node run in the foreground (-D) as children of this process and are stopped (jobs
cancelled first) by `stop()`. Several slurmd on one host are told apart by `-N NODENAME` and a port
each (Debian's build allows it). Authentication is `auth/none` where the packaged Slurm still has
it (<= 23.02), else MUNGE with a key and a munged of our own (own socket, started and stopped here).

By hand (as root, the slurm packages installed):

    .venv/bin/python tests/slurm_cluster.py /tmp/slurm-try       # prints `export SLURM_CONF=...`, Ctrl-C stops
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

TOOLS = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo")
PACKAGES = ("slurmctld", "slurmd", "slurm-client")  # Debian/Ubuntu; slurm-client pulls in the plugins
PLUGIN_DIRS = ("/usr/lib/x86_64-linux-gnu/slurm-wlm", "/usr/lib/aarch64-linux-gnu/slurm-wlm", "/usr/lib/slurm",
               "/usr/lib64/slurm", "/usr/local/lib/slurm")


class SlurmUnavailable(RuntimeError):
    """Slurm cannot run here; the message says why (a reason to skip with)."""


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None and not os.path.exists(f"/usr/sbin/{t}")]


def install(timeout: float = 600) -> None:
    """apt-get the packages (root only): CI sets IMITATION_SLURM_INSTALL=1 to get here."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SlurmUnavailable("IMITATION_SLURM_INSTALL=1 needs root and apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *PACKAGES]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise SlurmUnavailable(f"{' '.join(cmd)} failed: {done.stderr.strip()[-300:]}")


def require_slurm() -> None:
    """Raise SlurmUnavailable unless the binaries are here (installing them first if asked to)."""
    if missing_tools() and os.environ.get("IMITATION_SLURM_INSTALL") == "1":
        install()
    missing = missing_tools()
    if missing:
        raise SlurmUnavailable(f"Slurm is not installed (no {', '.join(missing)}); apt-get install "
                               f"{' '.join(PACKAGES)}, or set IMITATION_SLURM_INSTALL=1 to let the tests do it")
    if os.geteuid() != 0:
        raise SlurmUnavailable("a private slurmd must run as root (it starts jobs as their user)")


def _which(tool: str) -> str:
    return shutil.which(tool) or f"/usr/sbin/{tool}"


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _plugin(name: str) -> bool:
    return any(os.path.exists(os.path.join(d, f"{name}.so")) for d in PLUGIN_DIRS)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the process that started it dies, even by SIGKILL
    (Linux PR_SET_PDEATHSIG), so a killed test run leaves no daemon behind."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _memory_mb() -> int:
    with open("/proc/meminfo") as f:
        total_kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    return max(256, total_kb // 1024 // 2)  # below the machine's, as slurmd checks at registration


class SlurmCluster:
    """`nodes` slurmd (n1, n2, ...) on localhost, each offering every CPU of this machine."""

    def __init__(self, root: str | os.PathLike, nodes: int = 2, auth: str | None = None):
        self.root = Path(root)
        self.nodes = [f"n{i + 1}" for i in range(nodes)]
        auth = auth or os.environ.get("IMITATION_SLURM_AUTH") or ("none" if _plugin("auth_none") else "munge")
        if auth not in ("none", "munge"):
            raise SlurmUnavailable(f"IMITATION_SLURM_AUTH={auth}: expected none or munge")
        self.auth = auth
        self.conf = self.root / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}

    # -- configuration ------------------------------------------------------------------------
    def write_conf(self) -> None:
        r = self.root
        for d in ("state", "log", *(f"spool-{n}" for n in self.nodes)):
            (r / d).mkdir(parents=True, exist_ok=True)
        ctld_port, *node_ports = free_ports(1 + len(self.nodes))
        cpus = os.cpu_count() or 1
        auth = ["AuthType=auth/none", "CredType=cred/none"] if self.auth == "none" else \
            ["AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={r / 'munge.socket'},cred_expire=5"]
        if self.auth == "none":
            auth.append("AuthInfo=cred_expire=5")
        lines = [
            "ClusterName=imitation-test", "SlurmctldHost=localhost", f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={node_ports[0]}", "SlurmUser=root", "SlurmdUser=root", *auth,
            f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool-%n'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}", f"SlurmdPidFile={r / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={r / 'log' / 'slurmd-%n.log'}",
            "ProctrackType=proctrack/linuxproc",  # no cgroups needed (containers, CI runners)
            "TaskPlugin=task/none", "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
            "MpiDefault=none", "SwitchType=switch/none", "JobCompType=jobcomp/none",
            "AccountingStorageType=accounting_storage/none", "JobAcctGatherType=jobacct_gather/none",
            "SchedulerType=sched/builtin",
            # A requeued job waits cred_expire seconds (default 120, min 5), then the next
            # scheduling pass (default every 60 s) starts it: both short here.
            "SchedulerParameters=sched_interval=1", "JobRequeue=1", "ReturnToService=2",
            "KillWait=5", "MinJobAge=600", "MailProg=/bin/true",
        ]
        for name, port in zip(self.nodes, node_ports):
            lines.append(f"NodeName={name} NodeHostname={socket.gethostname()} NodeAddr=127.0.0.1 Port={port} "
                         f"CPUs={cpus} RealMemory={_memory_mb()} State=UNKNOWN")
        lines.append(f"PartitionName=test Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    @property
    def env(self) -> dict[str, str]:
        """The caller's environment without any SLURM_* of an enclosing job, pointed at this cluster."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        env["SLURM_CONF"] = str(self.conf)
        return env

    # -- daemons ------------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "w")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=self.env, start_new_session=True, preexec_fn=_die_with_parent)
        log.close()

    def _start_munge(self) -> None:
        if shutil.which("munged") is None and not os.path.exists("/usr/sbin/munged"):
            raise SlurmUnavailable("this Slurm has no auth/none and munged is not installed (apt-get install munge)")
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._spawn("munged", [_which("munged"), "--foreground", "--force", f"--socket={self.root / 'munge.socket'}",
                               f"--key-file={key}", f"--pid-file={self.root / 'munged.pid'}",
                               f"--log-file={self.root / 'log' / 'munged.log'}",
                               f"--seed-file={self.root / 'munged.seed'}"])
        self._wait(lambda: (self.root / "munge.socket").exists(), 10, "munged did not open its socket")

    def start(self, timeout: float = 60) -> "SlurmCluster":
        require_slurm()
        self.write_conf()
        try:
            if self.auth == "munge":
                self._start_munge()
            # -i: ignore state files of an earlier cluster in this directory
            self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
            self._wait(lambda: self.run("scontrol", "ping", check=False).returncode == 0, timeout,
                       "slurmctld did not answer")
            for name in self.nodes:
                self._spawn(f"slurmd-{name}", [_which("slurmd"), "-D", "-N", name, "-f", str(self.conf)])
            self._wait(self._all_idle, timeout, f"the nodes {self.nodes} did not all become idle")
        except BaseException:
            self.stop()
            raise
        return self

    def _all_idle(self) -> bool:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split()
        return sorted(zip(out[::2], out[1::2])) == sorted((n, "idle") for n in self.nodes)

    def _wait(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise SlurmUnavailable(f"{what}: {', '.join(dead)} exited\n{self.logs()}")
            if condition():
                return
            time.sleep(0.2)
        raise SlurmUnavailable(f"{what} within {timeout:.0f} s\n{self.logs()}")

    def logs(self, tail: int = 15) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            lines = path.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel every job, wait for them to leave the nodes, then stop the daemons (SIGKILL after 15 s)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run("scancel", "--full", "--partition=test", check=False)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.run("squeue", "-h", "-t", "R,CG,S", check=False).stdout.strip():
                time.sleep(0.3)
        order = [n for n in self.procs if n.startswith("slurmd")] + ["slurmctld", "munged"]
        for name in order:
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        self.procs.clear()

    # -- clients ------------------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True, timeout: float = 30, env: dict | None = None,
            cwd: str | None = None) -> subprocess.CompletedProcess:
        done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, env=env or self.env,
                              cwd=cwd)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr.strip()}")
        return done

    def sbatch(self, *args: str, env: dict | None = None, cwd: str | None = None) -> str:
        """Submit; returns the job id."""
        return self.run("sbatch", "--parsable", *args, env=env, cwd=cwd).stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """The `scontrol show job` fields (JobState, ExitCode, Restarts, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(f.split("=", 1) for f in out.split() if "=" in f)

    def wait(self, job_id: str, timeout: float, until=None) -> dict[str, str]:
        """Poll until the job has ended (or `until(fields)` holds); TimeoutError with the logs otherwise."""
        ended = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
                 "PREEMPTED")
        until = until or (lambda f: f["JobState"] in ended)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            fields = self.job(job_id)
            if until(fields):
                return fields
            time.sleep(0.2)
        raise TimeoutError(f"job {job_id} still {self.job(job_id).get('JobState')} after {timeout:.0f} s\n{self.logs()}")

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def start_cluster(root: str | os.PathLike, nodes: int = 2) -> SlurmCluster:
    """Two nodes where this slurmd can run twice on one host, else one (`len(cluster.nodes)` says)."""
    try:
        return SlurmCluster(Path(root) / f"{nodes}-nodes", nodes=nodes).start()
    except SlurmUnavailable:
        if nodes == 1 or missing_tools():
            raise
        return SlurmCluster(Path(root) / "1-node", nodes=1).start()


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    try:
        cluster = start_cluster(argv[0])
    except SlurmUnavailable as e:
        print(f"slurm_cluster: {e}", file=sys.stderr)
        return 1
    print(f"nodes {', '.join(cluster.nodes)} idle; in another shell:\n    export SLURM_CONF={cluster.conf}\n"
          "Ctrl-C cancels every job and stops the daemons.", flush=True)
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
