"""Private network for a multi-node LocalSlurm: one network namespace per node, joined by a bridge.

Layout for a cluster with id ``ab12c`` and N nodes (all names fit Linux's 15-character limit)::

    root namespace (this host: munged, slurmctld, sbatch/squeue, pytest)
      bridge l2cab12cbr  10.R.S.1/24      <- SlurmctldHost address, named after this host
        veth l2cab12ch1 <-> eth0 in netns l2cab12cn1   10.R.S.11   node1
        veth l2cab12ch2 <-> eth0 in netns l2cab12cn2   10.R.S.12   node2  ...

Each slurmd runs in its node's network namespace plus a fresh UTS namespace (``hostname`` says
node1, node2: torch's gloo picks the interface its hostname resolves to, so a node reporting the
host's name would bind to the wrong address) and a fresh mount namespace whose /etc/hosts is a
bind mount of the cluster's own hosts file (node names and the controller resolve on every node;
the real /etc/hosts is never written). Job steps inherit all three from their slurmd, just as on
separate machines. The subnet is private (10.0.0.0/8), chosen so it overlaps no route of this host,
and nothing routes it elsewhere: no traffic leaves the machine.

Needs root, iproute2 (``ip``), util-linux (``nsenter``, ``unshare``), and a kernel (or gVisor) that
allows network namespaces; ``probe()`` says why not where it fails.
"""

from __future__ import annotations

import ipaddress
import os
import random
import shutil
import subprocess
from pathlib import Path

TOOLS = ("ip", "nsenter", "unshare", "mount", "hostname")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def probe() -> str | None:
    """None when namespaces and veth pairs can be created here, else the reason (for a skip message)."""
    missing = [t for t in TOOLS if shutil.which(t, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None]
    if missing:
        return f"tools not found: {', '.join(missing)} (Debian: apt-get install iproute2 util-linux mount)"
    if os.geteuid() != 0:
        return "network namespaces need root"
    name = f"l2cprobe{os.getpid() % 100000}"
    try:
        add = _ip("netns", "add", name, check=False)
        if add.returncode != 0:
            return f"network namespaces not permitted here (`ip netns add` failed: {add.stderr.strip()})"
        veth = _ip("link", "add", f"{name}a", "type", "veth", "peer", "name", f"{name}b", "netns", name, check=False)
        if veth.returncode != 0:
            return f"veth pairs not permitted here (`ip link add ... type veth` failed: {veth.stderr.strip()})"
        uts = subprocess.run(["unshare", "--uts", "--mount", "--propagation", "private", "hostname", "l2cprobe"],
                             capture_output=True, text=True, timeout=20)
        if uts.returncode != 0:
            return f"UTS/mount namespaces not permitted here (`unshare --uts --mount` failed: {uts.stderr.strip()})"
        return None
    finally:
        _ip("link", "del", f"{name}a", check=False)
        _ip("netns", "del", name, check=False)


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.200.0.0-10.250.255.0 that no address or route of this host overlaps."""
    used = []
    words = (_ip("-4", "route", "show", "table", "all").stdout + _ip("-4", "-o", "addr", "show").stdout).split()
    for word in words:
        if "/" in word or word.count(".") == 3:
            try:
                used.append(ipaddress.ip_network(word, strict=False))
            except ValueError:
                continue
    rng = random.Random()
    for _ in range(200):
        net = ipaddress.ip_network(f"10.{rng.randint(200, 250)}.{rng.randint(0, 255)}.0/24")
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            return net
    raise RuntimeError("no free 10.x.y.0/24 subnet for the test cluster's bridge")


class NodeNetwork:
    """The namespaces, bridge and addresses of one test cluster. ``create()`` builds, ``destroy()``
    removes (idempotent, also from another process after ``from_dict``)."""

    def __init__(self, node_names: list[str], controller_name: str, hosts_path: Path, tag: str | None = None):
        self.node_names = list(node_names)
        self.controller_name = controller_name
        self.hosts_path = Path(hosts_path)
        self.tag = tag or "".join(random.choice("0123456789abcdef") for _ in range(5))
        self.bridge = f"l2c{self.tag}br"
        self.subnet: ipaddress.IPv4Network | None = None

    # names and addresses
    def netns(self, i: int) -> str:
        return f"l2c{self.tag}n{i + 1}"

    def host_veth(self, i: int) -> str:
        return f"l2c{self.tag}h{i + 1}"

    @property
    def controller_addr(self) -> str:
        assert self.subnet is not None
        return str(self.subnet.network_address + 1)

    def addr(self, i: int) -> str:
        assert self.subnet is not None
        return str(self.subnet.network_address + 11 + i)

    # lifecycle
    def create(self) -> None:
        self.subnet = _free_subnet()
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.controller_addr}/{self.subnet.prefixlen}", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for i in range(len(self.node_names)):
                ns, h = self.netns(i), self.host_veth(i)
                _ip("netns", "add", ns)
                _ip("link", "add", h, "type", "veth", "peer", "name", "eth0", "netns", ns)
                _ip("link", "set", h, "master", self.bridge)
                _ip("link", "set", h, "up")
                _ip("-n", ns, "addr", "add", f"{self.addr(i)}/{self.subnet.prefixlen}", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                _ip("-n", ns, "link", "set", "lo", "up")
            lines = ["127.0.0.1 localhost", f"{self.controller_addr} {self.controller_name}"]
            lines += [f"{self.addr(i)} {n}" for i, n in enumerate(self.node_names)]
            self.hosts_path.write_text("\n".join(lines) + "\n")
        except BaseException:
            self.destroy()
            raise

    def destroy(self) -> None:
        """Delete the namespaces (their veth ends go with them) and the bridge; ignores what is gone."""
        for i in range(len(self.node_names)):
            _ip("link", "del", self.host_veth(i), check=False)
            _ip("netns", "del", self.netns(i), check=False)
        _ip("link", "del", self.bridge, check=False)

    def leftovers(self) -> list[str]:
        """Namespaces or links of this network that still exist (empty after destroy())."""
        names = set(_ip("netns", "list", check=False).stdout.split())
        links = _ip("-o", "link", "show", check=False).stdout
        return [n for n in (self.netns(i) for i in range(len(self.node_names))) if n in names] + \
               [l for l in [self.bridge, *map(self.host_veth, range(len(self.node_names)))] if f" {l}:" in links or
                f" {l}@" in links]

    def wrap(self, i: int, argv: list[str]) -> list[str]:
        """argv run as node i: in its network namespace, with its hostname and the cluster's /etc/hosts.

        nsenter and unshare exec (no fork), and the shell execs too: the returned process's PID ends
        up being argv[0]'s, so the caller can stop it by PID.
        """
        script = 'hostname "$0" && mount --bind "$1" /etc/hosts && shift && exec "$@"'
        return ["nsenter", f"--net=/run/netns/{self.netns(i)}", "unshare", "--uts", "--mount",
                "--propagation", "private", "sh", "-c", script, self.node_names[i], str(self.hosts_path),
                *map(str, argv)]

    def to_dict(self) -> dict:
        return {"nodes": self.node_names, "controller": self.controller_name, "hosts": str(self.hosts_path),
                "tag": self.tag, "subnet": str(self.subnet) if self.subnet else None}

    @classmethod
    def from_dict(cls, d: dict) -> "NodeNetwork":
        self = cls(d["nodes"], d["controller"], Path(d["hosts"]), d["tag"])
        self.subnet = ipaddress.ip_network(d["subnet"]) if d.get("subnet") else None
        return self
