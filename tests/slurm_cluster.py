"""A real Slurm cluster for tests: munged + slurmctld + one slurmd per node, started by hand.

``nodes=1`` (default): one slurmd for this host. ``nodes=N`` (N >= 2): N slurmd daemons named node1..nodeN,
each in its own network, UTS and mount namespace with its own address on a private bridge
(tests/slurm_netns.py), so that jobs really span "machines": different hostnames and addresses,
rendezvous over the bridge. (Slurm's multiple-slurmd mode also runs here with Debian's 22.05 build:
two NodeName lines with one NodeHostname, distinct Port=, `slurmd -N`. But then every "node" has
the host's hostname and 127.0.0.1, and node names resolve nowhere, so the bugs a multi-node launch
hits first, name resolution and gloo/NCCL binding the wrong interface, could not show up; see
docs/SLURM.md.)

Used by ``tests/test_slurm_launch.py`` and by ``tools/slurm_local.py``. Everything lives under
one directory (config, logs, state); only the unix sockets (munge, slurmd spool) go to a short
directory under /tmp because socket paths are limited to 107 bytes. The daemons run in the
foreground as our children and are stopped by PID, so nothing depends on systemd, and several
clusters (e.g. two developers running the tests at once) can coexist: each picks free TCP ports
and talks to its own munged over its own socket.

Usage::

    from tests.slurm_cluster import LocalSlurm
    cluster = LocalSlurm(tmp_dir)            # or LocalSlurm(tmp_dir, nodes=2)
    cluster.start()
    try:
        job = cluster.sbatch(["slurm/stage1.sh", "cfg.yaml"], env={...})
        assert cluster.wait(job, timeout=60) == "COMPLETED"
    finally:
        cluster.stop()

or the session fixtures ``slurm`` (one node) and ``slurm_multinode`` defined at the bottom of this file.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    from tests.slurm_netns import NodeNetwork, probe as _probe_netns
except ImportError:  # imported as a plain module (tools/slurm_local.py puts tests/ on the path)
    from slurm_netns import NodeNetwork, probe as _probe_netns  # type: ignore[no-redef]

SLURM_BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "sinfo", "scancel")

# Job states after which a job will not run again on its own (a requeued job passes through
# REQUEUED/PENDING instead, keeping its id).
FINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
        "PREEMPTED",
        "SPECIAL_EXIT",
    }
)


class SlurmUnavailable(RuntimeError):
    """The Slurm or munge binaries (or root) are missing: the caller decides to skip or fail."""


class SlurmStartError(RuntimeError):
    """The daemons were found but the cluster did not come up; the message holds the log tails."""


def _which(name: str) -> str | None:
    """shutil.which that also looks in the sbin directories (not on a normal user's PATH)."""
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin:/usr/local/sbin"
    return shutil.which(name, path=path)


def missing_requirements(nodes: int = 1) -> list[str]:
    """What prevents a local cluster of ``nodes`` nodes on this machine; empty when it can be started."""
    missing = [b for b in (*SLURM_BINARIES, "munged") if _which(b) is None]
    if missing:
        return [f"binaries not found: {', '.join(missing)} (Debian/Ubuntu: apt-get install slurm-wlm)"]
    if os.geteuid() != 0:
        return ["slurmd must run as root to launch jobs; run the Slurm tests as root (e.g. in CI)"]
    if nodes > 1:
        why = _probe_netns()
        if why:
            return [f"a {nodes}-node cluster needs network namespaces: {why}"]
    return []


def _die_with_parent_fn():
    """A preexec_fn giving the child SIGTERM when we die (PR_SET_PDEATHSIG).

    ctypes is resolved here, in the parent: the child may already run as user munge, which cannot
    read modules under /root.
    """
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig, sigterm = 1, int(signal.SIGTERM)

    def preexec() -> None:
        prctl(pr_set_pdeathsig, sigterm)

    return preexec


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"<{path}: {exc}>"
    return "\n".join(text[-lines:])


class LocalSlurm:
    """One Slurm node (this host) with one partition ``debug``, configured under ``root_dir``.

    cpus: CPUs the node advertises (default: ``os.cpu_count()``, at least 2 so that tests can
    run two tasks). ``SlurmdParameters=config_overrides`` makes slurmd accept the number even
    where the hardware has fewer cores.
    """

    def __init__(self, root_dir: str | os.PathLike, cpus: int | None = None, real_memory_mb: int = 4096,
                 cred_expire_s: int = 5, die_with_parent: bool = True, nodes: int = 1):
        if nodes < 1:
            raise ValueError(f"nodes={nodes}: need at least 1")
        self.root = Path(root_dir).resolve()
        self.nodes = nodes
        # Daemons get SIGTERM when this process dies (even by SIGKILL), so a killed pytest leaves
        # nothing behind. tools/slurm_local.py turns it off: there the CLI exits, the cluster stays.
        self.die_with_parent = die_with_parent
        self.cpus = max(2, cpus if cpus is not None else (os.cpu_count() or 1))
        self.real_memory_mb = real_memory_mb
        # How long a requeued job waits before it may start again (Slurm default: 120 s).
        self.cred_expire_s = cred_expire_s
        self.hostname = socket.gethostname().split(".")[0]
        # One node: this host under its own name. Several: node1..nodeN, each in its namespaces.
        self.node_names = [self.hostname] if nodes == 1 else [f"node{i}" for i in range(1, nodes + 1)]
        self.net: NodeNetwork | None = None
        self.conf_path = self.root / "slurm.conf"
        self.log_dir = self.root / "log"
        self.state_path = self.root / "cluster.json"
        self._sock_dir: Path | None = None
        self._procs: dict[str, subprocess.Popen] = {}
        self._pids: dict[str, int] = {}
        self._logs: dict[str, Path] = {}

    @classmethod
    def attach(cls, root_dir: str | os.PathLike) -> "LocalSlurm":
        """The cluster started earlier (by another process) under ``root_dir``, from cluster.json."""
        info = json.loads(Path(root_dir, "cluster.json").read_text())
        self = cls(root_dir, nodes=info.get("nodes", 1))
        if info.get("net"):
            self.net = NodeNetwork.from_dict(info["net"])
        self._pids = {k: int(v) for k, v in info["pids"].items()}
        self._sock_dir = Path(info["sock_dir"]) if info.get("sock_dir") else None
        self.hostname = info.get("host", self.hostname)
        self.node_names = info.get("node_names", self.node_names)
        self.cpus = info.get("cpus", self.cpus)
        return self

    def node_addr(self, node: str) -> str:
        """The address of a node (its namespace's eth0; 127.0.0.1 for a one-node cluster)."""
        if self.net is None:
            return "127.0.0.1"
        return self.net.addr(self.node_names.index(node))

    # ------------------------------------------------------------------ environment
    @property
    def env(self) -> dict[str, str]:
        """os.environ plus SLURM_CONF pointing at this cluster (for sbatch, squeue, ...)."""
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf_path)
        # Leftovers from an enclosing allocation would confuse the client commands.
        for key in list(env):
            if key.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and key != "SLURM_CONF":
                del env[key]
        return env

    def run(self, args: list[str], check: bool = True, env: dict[str, str] | None = None,
            timeout: float = 30, cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster; returns the CompletedProcess."""
        full_env = self.env
        if env:
            full_env.update(env)
        proc = subprocess.run(args, env=full_env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args)} exited {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
            )
        return proc

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 60) -> "LocalSlurm":
        """Write the configs, start munged, slurmctld and slurmd, wait until the node is idle."""
        problems = missing_requirements(self.nodes)
        if problems:
            raise SlurmUnavailable("; ".join(problems))
        try:
            if self.nodes > 1:
                self.root.mkdir(parents=True, exist_ok=True)
                self.net = NodeNetwork(self.node_names, self.hostname, self.root / "hosts")
                self.net.create()
                # Written now: a stop() from another process must find the network even if start fails.
                self.state_path.write_text(json.dumps(self.describe(), indent=1))
            self._write_configs()
            self._start_munge(timeout)
            self._start_daemon("slurmctld", [_which("slurmctld"), "-D", "-c", "-i", "-f", str(self.conf_path)])
            self._wait_for(lambda: self.run(["scontrol", "ping"], check=False).returncode == 0, timeout,
                           "slurmctld to answer `scontrol ping`")
            if self.net is None:
                self._start_daemon("slurmd", [_which("slurmd"), "-D", "-f", str(self.conf_path), "-N", self.hostname])
            else:
                for i, node in enumerate(self.node_names):
                    argv = [_which("slurmd"), "-D", "-f", str(self.conf_path), "-N", node]
                    self._start_daemon(f"slurmd@{node}", self.net.wrap(i, argv),
                                       log_path=self.log_dir / f"slurmd-{node}.out")
                    self._logs[f"slurmd@{node}"] = self.log_dir / f"slurmd-{node}.log"
            self._wait_for(self._node_idle, timeout, f"node(s) {','.join(self.node_names)} to be idle in sinfo")
            self.state_path.write_text(json.dumps(self.describe(), indent=1))
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Cancel every job, stop the daemons by PID (TERM, then KILL), remove the socket dir.

        Safe to call more than once, after a failed start, and from another process (attach()).
        """
        if self._alive("slurmctld"):
            try:
                self.run(["scancel", "--user", pwd.getpwuid(os.geteuid()).pw_name], check=False, timeout=10)
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline:
                    if not self.run(["squeue", "-h", "-o", "%i"], check=False, timeout=10).stdout.strip():
                        break
                    time.sleep(0.5)
            except (subprocess.SubprocessError, OSError):
                pass
        slurmds = sorted(n for n in self._pids if n.startswith("slurmd"))
        for name in (*slurmds, "slurmctld", "munged"):
            if self._alive(name):
                self._signal(name, signal.SIGTERM)
                if not self._wait_dead(name, 15):
                    self._signal(name, signal.SIGKILL)
                    self._wait_dead(name, 10)
            self._pids.pop(name, None)
            self._procs.pop(name, None)
        if self._sock_dir is not None:
            shutil.rmtree(self._sock_dir, ignore_errors=True)
            self._sock_dir = None
        if self.net is not None:  # after the daemons: a namespace is freed once its last process is gone
            self.net.destroy()
        self.state_path.unlink(missing_ok=True)

    def _alive(self, name: str) -> bool:
        proc = self._procs.get(name)
        if proc is not None:
            return proc.poll() is None
        pid = self._pids.get(name)
        if pid is None:
            return False
        try:  # a process of ours: its command line names our config, socket dir or munged
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        if stat.rsplit(")", 1)[-1].split()[0] == "Z":
            return False
        binary = name.split("@")[0]  # "slurmd@node2" -> slurmd
        return binary in cmdline and (str(self.conf_path) in cmdline or str(self._sock_dir) in cmdline)

    def _signal(self, name: str, sig: int) -> None:
        try:
            os.kill(self._pids[name], sig)
        except (KeyError, ProcessLookupError):
            pass

    def _wait_dead(self, name: str, timeout: float) -> bool:
        proc = self._procs.get(name)
        if proc is not None:
            try:
                proc.wait(timeout=timeout)
                return True
            except subprocess.TimeoutExpired:
                return False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._alive(name):
                return True
            time.sleep(0.1)
        return False

    def __enter__(self) -> "LocalSlurm":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return bool(self._pids) and all(self._alive(name) for name in self._pids)

    def pids(self) -> dict[str, int]:
        return dict(self._pids)

    # ------------------------------------------------------------------ jobs
    def sbatch(self, args: list[str], env: dict[str, str] | None = None,
               cwd: str | os.PathLike | None = None) -> int:
        """``sbatch --parsable ARGS`` with ``env`` added to the environment; returns the job id."""
        proc = self.run(["sbatch", "--parsable", *args], env=env, cwd=cwd)
        return int(proc.stdout.strip().split(";")[0])

    def scancel(self, *args: str) -> subprocess.CompletedProcess:
        """``scancel ARGS`` (e.g. ``cluster.scancel("--signal=USR1", str(job))``)."""
        return self.run(["scancel", *args])

    def job_info(self, job_id: int) -> dict[str, str]:
        """Fields of ``scontrol show job -o`` as a dict (JobState, ExitCode, Restarts, ...).

        Empty dict when the controller no longer knows the job.
        """
        proc = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        if proc.returncode != 0:
            return {}
        info: dict[str, str] = {}
        # Values may contain spaces only in Command=/WorkDir= etc.; split on " Key=".
        for m in re.finditer(r"(?:^|\s)([A-Za-z:/]+)=(.*?)(?=\s[A-Za-z:/]+=|$)", proc.stdout.strip()):
            info[m.group(1)] = m.group(2)
        return info

    def state(self, job_id: int) -> str:
        """Current JobState ("PENDING", "RUNNING", "COMPLETED", ...); "UNKNOWN" when gone."""
        return self.job_info(job_id).get("JobState", "UNKNOWN")

    def wait(self, job_id: int, timeout: float = 120, states: frozenset[str] = FINAL_STATES,
             poll: float = 0.5) -> str:
        """Block until the job reaches one of ``states`` (default: a final state); returns it.

        Requeued jobs keep their id and pass through PENDING again, so waiting for a requeued
        job to finish is the same call. Raises TimeoutError with the job record on timeout.
        """
        deadline = time.monotonic() + timeout
        state = "UNKNOWN"
        while time.monotonic() < deadline:
            state = self.state(job_id)
            if state in states:
                return state
            time.sleep(poll)
        raise TimeoutError(
            f"job {job_id} still {state} after {timeout}s\n{self.run(['scontrol', 'show', 'job', str(job_id)], check=False).stdout}"
            f"\n--- slurmctld log ---\n{_tail(self._logs.get('slurmctld', self.log_dir / 'slurmctld.log'))}"
        )

    # ------------------------------------------------------------------ internals
    def _write_configs(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(exist_ok=True)
        for sub in ("state", "run"):
            (self.root / sub).mkdir(exist_ok=True)
        self._sock_dir = Path(tempfile.mkdtemp(prefix="l2c-slurm-", dir="/tmp"))
        os.chmod(self._sock_dir, 0o755)
        for node in self.node_names if self.net is not None else [""]:
            (self._sock_dir / (f"spool-{node}" if node else "spool")).mkdir()
        ctld_port, slurmd_port = _free_port(), _free_port()
        while slurmd_port == ctld_port:
            slurmd_port = _free_port()
        munge_socket = self._sock_dir / "munge" / "munge.socket"
        user = pwd.getpwuid(os.geteuid()).pw_name
        # Several slurmd share this file system: per-node spool, pid and log paths (%n = node name).
        per_node = "" if self.net is None else "-%n"
        ctld_addr = "127.0.0.1" if self.net is None else self.net.controller_addr
        node_lines = "\n".join(
            f"NodeName={n} NodeAddr={self.node_addr(n)} CPUs={self.cpus} RealMemory={self.real_memory_mb} State=UNKNOWN"
            for n in self.node_names)
        conf = f"""\
# Written by tests/slurm_cluster.py: a throw-away {self.nodes}-node cluster.
ClusterName=llm2clip-local
SlurmctldHost={self.hostname}({ctld_addr})
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser={user}
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Own munged socket; cred_expire also sets how long a requeued job waits before it restarts.
AuthInfo=socket={munge_socket},cred_expire={self.cred_expire_s}
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
ReturnToService=2
SlurmctldPidFile={self.root}/run/slurmctld.pid
SlurmdPidFile={self.root}/run/slurmd{per_node}.pid
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self._sock_dir}/spool{per_node}
SlurmctldLogFile={self.log_dir}/slurmctld.log
SlurmdLogFile={self.log_dir}/slurmd{per_node}.log
SlurmctldDebug=info
SlurmdDebug=info
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SlurmdParameters=config_overrides
# Keep finished jobs visible to `scontrol show job` (there is no sacct here).
MinJobAge=3600
KillWait=5
InactiveLimit=0
{node_lines}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
        self.conf_path.write_text(conf)

    def _start_munge(self, timeout: float) -> None:
        assert self._sock_dir is not None
        munge_dir = self._sock_dir / "munge"
        munge_dir.mkdir()
        os.chmod(munge_dir, 0o755)  # job steps of any user reach munged through this socket
        key = munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        run_as: dict = {}
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("munge")
            except KeyError:
                pw = None
            if pw is not None:
                for p in (munge_dir, key):
                    os.chown(p, pw.pw_uid, pw.pw_gid)
                run_as = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        socket_path = munge_dir / "munge.socket"
        self._start_daemon(
            "munged",
            [
                _which("munged"), "-F", f"--socket={socket_path}", f"--key-file={key}",
                f"--pid-file={munge_dir}/munged.pid", f"--log-file={munge_dir}/munged.log",
                f"--seed-file={munge_dir}/munged.seed", "--num-threads=2",
            ],
            log_path=self.log_dir / "munged.out",
            **run_as,
        )
        self._logs["munged"] = munge_dir / "munged.log"
        self._wait_for(socket_path.exists, timeout, "munged to create its socket")

    def _start_daemon(self, name: str, argv: list, log_path: Path | None = None, **popen_kw) -> None:
        log_path = log_path or self.log_dir / f"{name}.out"
        env = self.env
        if self.die_with_parent:
            popen_kw["preexec_fn"] = _die_with_parent_fn()
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(
                [str(a) for a in argv], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, start_new_session=True, **popen_kw,
            )
        self._procs[name] = proc
        self._pids[name] = proc.pid
        self._logs.setdefault(name, self.log_dir / f"{name}.log")
        self._logs[f"{name} (stdout)"] = log_path

    def _node_idle(self) -> bool:
        out = self.run(["sinfo", "-h", "-N", "-o", "%t"], check=False).stdout.split()
        return bool(out) and all(s == "idle" for s in out)

    def _wait_for(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [n for n in self._pids if not self._alive(n)]
            if dead:
                raise SlurmStartError(f"{', '.join(dead)} exited while waiting for {what}\n{self.diagnostics()}")
            if predicate():
                return
            time.sleep(0.2)
        raise SlurmStartError(f"timed out after {timeout}s waiting for {what}\n{self.diagnostics()}")

    def diagnostics(self) -> str:
        """Tails of the daemon logs, for error messages."""
        parts = []
        for name, path in self._logs.items():
            if path.exists():
                parts.append(f"--- {name}: {path} ---\n{_tail(path)}")
        return "\n".join(parts)

    def describe(self) -> dict:
        return {"conf": str(self.conf_path), "root": str(self.root), "pids": self.pids(),
                "sock_dir": str(self._sock_dir) if self._sock_dir else None,
                "host": self.hostname, "cpus": self.cpus, "nodes": self.nodes, "node_names": self.node_names,
                "net": self.net.to_dict() if self.net else None}


# ---------------------------------------------------------------------- pytest fixture
try:
    import pytest
except ImportError:  # tools/slurm_local.py imports this module without pytest installed
    pytest = None

if pytest is not None:

    def require_slurm(nodes: int = 1) -> None:
        """Skip the calling test when a local cluster cannot run here; fail instead when CI=true."""
        problems = missing_requirements(nodes)
        if problems:
            msg = "real Slurm not available: " + "; ".join(problems)
            if os.environ.get("CI", "").lower() == "true":
                ci = " and allow network namespaces (docker: --privileged or --cap-add NET_ADMIN,SYS_ADMIN)" \
                    if nodes > 1 else ""
                pytest.fail(msg + f" (CI must install slurm-wlm and run the tests as root{ci})", pytrace=False)
            pytest.skip(msg)

    @pytest.fixture(scope="session")
    def slurm(tmp_path_factory):
        """A running LocalSlurm for the whole session, stopped at the end even after failures.

        Skipped without slurm-wlm or root (failed when CI=true).
        """
        require_slurm()
        cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
        try:
            cluster.start()
            yield cluster
        finally:
            cluster.stop()

    # Three nodes, though the jobs take two: a requeued job can then come back on another node set.
    MULTINODE_NODES = 3

    @pytest.fixture(scope="session")
    def slurm_multinode(tmp_path_factory):
        """A running LocalSlurm of MULTINODE_NODES namespaced nodes (node1..), stopped and its namespaces
        removed at the end even after failures. Skipped without slurm-wlm, root or network namespaces
        (failed when CI=true)."""
        require_slurm(MULTINODE_NODES)
        cluster = LocalSlurm(tmp_path_factory.mktemp("slurm_multinode"), nodes=MULTINODE_NODES)
        try:
            cluster.start()
            yield cluster
        finally:
            cluster.stop()


if __name__ == "__main__":  # python tests/slurm_cluster.py DIR [NODES]: start, print, wait for Ctrl-C
    c = LocalSlurm(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="l2c-slurm-"),
                   nodes=int(sys.argv[2]) if len(sys.argv) > 2 else 1)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    c.start()
    print(json.dumps(c.describe()), flush=True)
    try:
        signal.pause()
    finally:
        c.stop()
