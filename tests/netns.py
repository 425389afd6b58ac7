"""Private networks for tests: Linux network namespaces, a bridge, one veth pair per node.

Nothing here touches the machine's real interfaces: every link is created from inside a
namespace this module made, and every namespace is deleted on exit.

    reason = netns_skip_reason()          # None, or why the kernel/user cannot do it
    with NetnsLab(3) as lab:              # nodes 10.77.0.1 .. 10.77.0.3 on one bridge
        lab.run(0, ["ip", "addr"])        # run inside node 0's namespace
        proc = lab.popen(1, [sys.executable, "peer.py"])
        lab.link_down(2); lab.link_up(2)  # cut / restore node 2's cable

`isolated(argv)` wraps a command in a fresh `unshare -n` namespace with only loopback.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Sequence
from types import TracebackType
from typing import Any


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def netns_skip_reason() -> str | None:
    """None if namespaces can be made here, else a sentence for `pytest.skip`."""
    if os.name != "posix" or not os.path.exists("/proc/self/ns/net"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root (run the netns tests as root or in a privileged container)"
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        return "the `ip` and `unshare` commands (iproute2, util-linux) are not installed"
    probe = f"mprobe{secrets.token_hex(3)}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"the kernel refused a network namespace: {made.stderr.strip()}"
    bridge = _ip("-n", probe, "link", "add", "br0", "type", "bridge", check=False)
    _ip("netns", "del", probe, check=False)
    if bridge.returncode != 0:
        return f"the kernel refused a bridge inside a namespace: {bridge.stderr.strip()}"
    return None


def isolated(argv: Sequence[str]) -> list[str]:
    """`argv` run in a new network namespace that has only loopback (up)."""
    return ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *argv]


class NetnsLab:
    """`n` namespaces with addresses `<subnet>.1 .. <subnet>.n/24` on one bridge in a hub namespace."""

    def __init__(self, n: int, subnet: str = "10.77.0") -> None:
        self.n = n
        self.subnet = subnet
        tag = f"m{os.getpid() % 100000}{secrets.token_hex(2)}"
        self.hub = f"{tag}-hub"
        self.names = [f"{tag}-n{i}" for i in range(n)]
        self.addresses = [f"{subnet}.{i + 1}" for i in range(n)]
        self._made: list[str] = []

    def __enter__(self) -> NetnsLab:
        try:
            self._create()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.cleanup()

    def _create(self) -> None:
        _ip("netns", "add", self.hub)
        self._made.append(self.hub)
        _ip("-n", self.hub, "link", "set", "lo", "up")
        _ip("-n", self.hub, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        _ip("-n", self.hub, "link", "set", "br0", "up")
        for i, (name, addr) in enumerate(zip(self.names, self.addresses)):
            _ip("netns", "add", name)
            self._made.append(name)
            # Created inside the hub, the peer end moved straight into the node's namespace.
            _ip("-n", self.hub, "link", "add", f"h{i}", "type", "veth", "peer", "name", "eth0", "netns", name)
            _ip("-n", self.hub, "link", "set", f"h{i}", "master", "br0", "up")
            _ip("-n", name, "link", "set", "lo", "up")
            _ip("-n", name, "addr", "add", f"{addr}/24", "dev", "eth0")
            _ip("-n", name, "link", "set", "eth0", "up", "multicast", "on")
            _ip("-n", name, "route", "add", "224.0.0.0/4", "dev", "eth0")

    def command(self, i: int, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.names[i], *argv]

    def run(self, i: int, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self.command(i, argv), **kwargs)

    def popen(self, i: int, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        return subprocess.Popen(self.command(i, argv), **kwargs)

    def link_down(self, i: int) -> None:
        _ip("-n", self.hub, "link", "set", f"h{i}", "down")

    def link_up(self, i: int) -> None:
        _ip("-n", self.hub, "link", "set", f"h{i}", "up")

    def cleanup(self) -> None:
        for name in reversed(self._made):
            _ip("netns", "del", name, check=False)
        self._made.clear()
