"""A private network of "nodes" on this machine: one Linux network namespace per node.

Each node gets a network namespace with one interface, ``eth0``, on a /24 of its own: a
veth pair whose other end hangs on a bridge in the root namespace, which holds the
subnet's ``.1`` (where slurmctld listens). The namespaces have no default route and the
bridge no uplink, so their traffic stays between them and the root namespace.

A process started through :meth:`PrivateNetwork.node_command` runs as if on that node: in
its network namespace, under its own host name (a UTS namespace) and with an /etc/hosts of
its own (a private mount namespace with the node's hosts file bind-mounted over /etc/hosts;
the real file is never touched). Everything it starts (slurmd's jobs, torchrun, the
trainers) inherits all three. Each node's hosts file is what Debian's installer writes: the
node's own name on :data:`OWN_NAME_ADDRESS` (loopback), every other node on its address. So
"node2" resolves to node2's address from any other node, like on a real cluster, while a
library that binds to the address of its own host name (gloo, by default) binds to
loopback, which no other node reaches: the job must choose its interface itself.

Names carry the creating process's id, so that several test sessions can run at once and
a later one can remove what a killed one left behind (:func:`remove_stale`). Needs root
and iproute2 (`ip`), util-linux (`unshare`, `nsenter`).
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import re
import shutil
import subprocess
from pathlib import Path

REQUIRED_BINARIES = ("ip", "unshare", "nsenter")
#: The interface name of every node inside its namespace (what SOCKET_IFNAME names).
NODE_IFNAME = "eth0"
#: Where a node's /etc/hosts puts the node's own name (Debian's "127.0.1.1 <host name>" line).
OWN_NAME_ADDRESS = "127.0.1.1"
_PREFIX = "b2"
_NAME_RE = re.compile(rf"^(?:{_PREFIX}|blip2)-([0-9a-f]+)-(\d+)")
_instances = itertools.count()


class NetworkUnavailable(RuntimeError):
    """The namespaces or the bridge cannot be made here; the message says why."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and res.returncode != 0:
        raise NetworkUnavailable(f"`ip {' '.join(args)}` failed: {res.stderr.strip() or res.returncode}")
    return res


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _used_subnets() -> set[ipaddress.IPv4Network]:
    out = _ip("-4", "-o", "addr", "show", check=False).stdout + _ip("-4", "route", "show", check=False).stdout
    nets = set()
    for token in re.findall(r"\b(\d+\.\d+\.\d+\.\d+(?:/\d+)?)\b", out):
        try:
            nets.add(ipaddress.ip_network(token, strict=False))
        except ValueError:
            continue
    return nets


def _pick_subnet(seed: int) -> ipaddress.IPv4Network:
    """A 10.213.x.0/24 that no interface or route here overlaps."""
    used = _used_subnets()
    for i in range(256):
        net = ipaddress.ip_network(f"10.213.{(seed + i) % 256}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise NetworkUnavailable("no free 10.213.x.0/24 subnet for the private node network")


def kill_namespace_processes(netns: str) -> list[int]:
    """SIGKILL every process in network namespace ``netns``; returns their pids."""
    pids = [int(p) for p in _ip("netns", "pids", netns, check=False).stdout.split()]
    for pid in pids:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    return pids


def remove_stale() -> list[str]:
    """Remove namespaces and bridges that a test session which is gone left behind.

    A session killed before its clean-up ran (SIGKILL, a crash) leaves its namespaces, the
    slurmd and job processes inside them, its veth pairs and bridge. Returns what was removed.
    """
    removed = []
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        match = _NAME_RE.match(name)
        if match and not _pid_alive(int(match.group(1), 16)):
            kill_namespace_processes(name)
            _ip("netns", "delete", name, check=False)
            removed.append(f"netns {name}")
    for line in _ip("-o", "link", "show", "type", "bridge", check=False).stdout.splitlines():
        parts = line.split(":")
        name = parts[1].strip().split("@")[0] if len(parts) > 1 else ""
        match = _NAME_RE.match(name)
        if match and not _pid_alive(int(match.group(1), 16)):
            _ip("link", "delete", name, check=False)
            removed.append(f"bridge {name}")
    return removed


class PrivateNetwork:
    """A bridge and one network namespace per node name; :meth:`create`, then :meth:`destroy`.

    ``hosts_dir`` receives each node's hosts file, named after the node.
    """

    def __init__(self, node_names: list[str], hosts_dir: Path):
        self.node_names = list(node_names)
        self.hosts_dir = Path(hosts_dir)
        tag = f"{os.getpid():x}-{next(_instances)}"
        self.bridge = f"{_PREFIX}-{tag}"  # interface names: at most 15 characters
        self.netns = {node: f"blip2-{tag}-{node}" for node in self.node_names}
        self.host_veth = {node: f"{_PREFIX}-{tag}-{i}" for i, node in enumerate(self.node_names, 1)}
        self.subnet: ipaddress.IPv4Network | None = None
        self.addresses: dict[str, str] = {}
        self.gateway = ""
        self._created: list[tuple[str, str]] = []

    @staticmethod
    def why_unavailable() -> str | None:
        if os.geteuid() != 0:
            return "not running as root (network namespaces need root)"
        missing = [b for b in REQUIRED_BINARIES if shutil.which(b) is None]
        if missing:
            return f"missing {', '.join(missing)} (iproute2 / util-linux)"
        return None

    def create(self) -> None:
        reason = self.why_unavailable()
        if reason:
            raise NetworkUnavailable(reason)
        if len(self.bridge) > 15 or any(len(v) > 15 for v in self.host_veth.values()):
            raise NetworkUnavailable(f"interface names too long: {self.bridge}, {self.host_veth}")
        remove_stale()
        self.subnet = _pick_subnet(os.getpid())
        hosts = list(self.subnet.hosts())
        self.gateway = str(hosts[0])
        prefix = self.subnet.prefixlen
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            self._created.append(("bridge", self.bridge))
            _ip("addr", "add", f"{self.gateway}/{prefix}", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for i, node in enumerate(self.node_names):
                ns, veth = self.netns[node], self.host_veth[node]
                address = str(hosts[10 + i])
                _ip("netns", "add", ns)
                self._created.append(("netns", ns))
                _ip("link", "add", veth, "type", "veth", "peer", "name", NODE_IFNAME, "netns", ns)
                _ip("link", "set", veth, "master", self.bridge)
                _ip("link", "set", veth, "up")
                _ip("-n", ns, "addr", "add", f"{address}/{prefix}", "dev", NODE_IFNAME)
                _ip("-n", ns, "link", "set", NODE_IFNAME, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
                self.addresses[node] = address
        except NetworkUnavailable:
            self.destroy()
            raise
        self.hosts_dir.mkdir(parents=True, exist_ok=True)
        for node in self.node_names:
            lines = ["127.0.0.1 localhost", f"{OWN_NAME_ADDRESS} {node}"]
            lines += [f"{self.addresses[n]} {n}" for n in self.node_names if n != node]
            lines.append("::1 localhost ip6-localhost ip6-loopback")
            self.hosts_file(node).write_text("\n".join(lines) + "\n")

    def hosts_file(self, node: str) -> Path:
        """The file bind-mounted over /etc/hosts on ``node``."""
        return self.hosts_dir / node

    def destroy(self) -> list[str]:
        """Kill what still runs in the namespaces, then remove them and the bridge.

        Safe to call twice and after a partial :meth:`create`; returns what it could not remove.
        """
        problems = []
        for kind, name in reversed(self._created):
            if kind == "netns":
                kill_namespace_processes(name)
                # Deleting the namespace removes its end of the veth pair, and so the pair.
                res = _ip("netns", "delete", name, check=False)
            else:
                res = _ip("link", "delete", name, check=False)
            if res.returncode != 0:
                problems.append(f"{kind} {name}: {res.stderr.strip()}")
        self._created.clear()
        return problems

    def node_command(self, node: str, cmd: list[str]) -> list[str]:
        """``cmd`` wrapped to run on ``node``: its network, host name and /etc/hosts.

        The mount and UTS namespaces come first (unshare), then the network namespace
        (nsenter). `ip netns exec` would remount /sys for the namespace and so hide the
        cgroup file systems that slurmd needs.
        """
        script = (
            'mount --bind "$1" /etc/hosts && echo "$2" > /proc/sys/kernel/hostname && '
            'netns="$3" && shift 3 && exec nsenter --net="$netns" -- "$@"'
        )
        return [
            "unshare", "--mount", "--uts", "--propagation", "slave", "--",
            "sh", "-c", script, "node-shell",
            str(self.hosts_file(node)), node, f"/run/netns/{self.netns[node]}", *cmd,
        ]  # fmt: skip

    def pids(self, node: str) -> list[int]:
        """Processes running in ``node``'s network namespace."""
        return [int(p) for p in _ip("netns", "pids", self.netns[node], check=False).stdout.split()]

    def tx_bytes(self, node: str) -> int:
        """Bytes ``node`` has sent onto the bridge (its veth's receive side in the root namespace)."""
        return int(Path(f"/sys/class/net/{self.host_veth[node]}/statistics/rx_bytes").read_text())

    def routes(self, node: str) -> str:
        return _ip("-n", self.netns[node], "route", "show", check=False).stdout
