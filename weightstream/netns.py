"""Throwaway network namespaces: several "nodes" on one machine, for tests and benchmarks.

    root namespace: bridge <prefix>br, address 10.213.<net>.1/24   (broker, publisher)
        ├── veth ── namespace <prefix>1: 10.213.<net>.11/24       (a subscriber node)
        ├── veth ── namespace <prefix>2: 10.213.<net>.12/24
        ...

Needs root and iproute2. Every address lives only inside namespaces made here, and
`NodeNet.close()` deletes them all (also after a crash: `cleanup(prefix)` removes leftovers).

`shape(node, rate)` gives a node's link one rate both ways, like a NIC of that speed: a qdisc on
each end of its veth, the namespace's end for what it sends (its uplink), the bridge's end for
what it receives (its downlink). Traffic between two nodes then crosses the sender's uplink and
the receiver's downlink, each shaped. One FIFO token bucket (`tc tbf`) by default; `fair=True`
shares the rate between peers like a NIC with fair queueing (`tc htb`, a class per peer address:
fq and sfq are not in this kernel), which a relay whose node serves several readers wants.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field

__all__ = ["NodeNet", "netns_available"]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)  # noqa: S603,S607


def _tc(
    *args: str, check: bool = True, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603
        ["tc", *args],  # noqa: S607
        check=check,
        capture_output=True,
        text=True,
        input=stdin,
    )


def _tbf(rate_bytes_per_s: float) -> tuple[str, ...]:
    """A token bucket of `rate_bytes_per_s`: a burst of 4 ms of traffic (at least two GSO
    segments of 64 KiB, which tbf must hold whole) and 20 ms of queue before it drops."""
    burst = max(2 * 65536 + 4096, int(rate_bytes_per_s * 0.004))
    return (
        "tbf",
        "rate",
        f"{int(rate_bytes_per_s * 8)}bit",
        "burst",
        str(burst),
        "latency",
        "20ms",
    )


def _fair_htb(device: str, rate_bytes_per_s: float, peers: list[str], match: str) -> list[str]:
    """`tc -batch` lines: htb at `rate_bytes_per_s` on `device`, one class per peer address
    (`match` "dst" on the uplink, "src" on the downlink) with an equal guaranteed share and
    the whole rate as its ceiling, and a default class for anything else (ARP)."""
    rate = f"{int(rate_bytes_per_s * 8)}bit"
    share = f"{int(rate_bytes_per_s * 8 / (len(peers) + 1))}bit"
    burst = max(2 * 65536 + 4096, int(rate_bytes_per_s * 0.004))
    common = f"burst {burst} cburst {burst} quantum 65536"
    lines = [
        f"qdisc add dev {device} root handle 1: htb default 2",
        f"class add dev {device} parent 1: classid 1:1 htb rate {rate} ceil {rate} {common}",
        f"class add dev {device} parent 1:1 classid 1:2 htb rate {share} ceil {rate} {common}",
    ]
    for index, peer in enumerate(peers):
        classid = f"1:{index + 16:x}"
        lines += [
            f"class add dev {device} parent 1:1 classid {classid} htb rate {share} ceil {rate} "
            + common,
            f"filter add dev {device} parent 1: protocol ip prio 1 u32 match ip {match} "
            f"{peer}/32 flowid {classid}",
        ]
    return lines


def netns_available() -> bool:
    """True if we are root and `ip netns` works here."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    probe = f"wsprobe{os.getpid()}"
    if _ip("netns", "add", probe, check=False).returncode != 0:
        return False
    _ip("netns", "delete", probe, check=False)
    return True


@dataclass
class NodeNet:
    """`count` namespaces joined to a bridge in the root namespace."""

    count: int
    prefix: str = "ws"
    net: int = 213
    namespaces: list[str] = field(default_factory=list)

    @property
    def bridge(self) -> str:
        return f"{self.prefix}br"

    @property
    def host_address(self) -> str:
        """The root namespace's address on the bridge (broker, publisher)."""
        return f"10.213.{self.net}.1"

    def address(self, node: int) -> str:
        return f"10.213.{self.net}.{11 + node}"

    def exec_prefix(self, node: int) -> tuple[str, ...]:
        """Prepend to a command line to run it inside node `node`'s namespace."""
        return ("ip", "netns", "exec", self.namespaces[node])

    def open(self) -> NodeNet:
        self.cleanup()
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.host_address}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for node in range(self.count):
            namespace = f"{self.prefix}{node}"
            outer, inner = f"{self.prefix}v{node}", f"{self.prefix}p{node}"
            _ip("netns", "add", namespace)
            self.namespaces.append(namespace)
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            _ip("link", "set", inner, "netns", namespace)
            _ip("link", "set", outer, "master", self.bridge)
            _ip("link", "set", outer, "up")
            _ip("-n", namespace, "addr", "add", f"{self.address(node)}/24", "dev", inner)
            _ip("-n", namespace, "link", "set", inner, "up")
            _ip("-n", namespace, "link", "set", "lo", "up")
        return self

    def shape(self, node: int, *, rate_bytes_per_s: float, fair: bool = False) -> None:
        """Shape node `node`'s link to `rate_bytes_per_s` in each direction (replaces a shaping
        already there). `fair`: the rate is shared fairly between the peers it talks to (an
        htb class per peer address, each guaranteed an equal part and borrowing the rest),
        as a NIC with fair queueing does; else one FIFO token bucket (tbf), where TCP flows
        to two peers may split the rate 2:1."""
        if rate_bytes_per_s <= 0:
            raise ValueError(f"rate_bytes_per_s must be > 0, not {rate_bytes_per_s}")
        self.unshape(node)
        inside = ("-n", self.namespaces[node])
        # The downlink (the bridge's end: what the node receives), then the uplink.
        for device, where, match in (
            (f"{self.prefix}v{node}", (), "src"),
            (f"{self.prefix}p{node}", inside, "dst"),
        ):
            if not fair:
                _tc(*where, "qdisc", "add", "dev", device, "root", *_tbf(rate_bytes_per_s))
                continue
            script = "\n".join(_fair_htb(device, rate_bytes_per_s, self._peers(node), match))
            _tc(*where, "-batch", "-", stdin=script + "\n")

    def _peers(self, node: int) -> list[str]:
        """Every address node `node` may talk to: the host's and the other nodes'."""
        return [self.host_address, *(self.address(n) for n in range(self.count) if n != node)]

    def unshape(self, node: int) -> None:
        """Take node `node`'s shaping off (both directions); a no-op if it has none."""
        _tc("qdisc", "delete", "dev", f"{self.prefix}v{node}", "root", check=False)
        _tc(
            "-n",
            self.namespaces[node],
            "qdisc",
            "delete",
            "dev",
            f"{self.prefix}p{node}",
            "root",
            check=False,
        )

    def link(self, node: int, *, up: bool) -> None:
        """Take a node's link down (a cable pulled) or bring it back."""
        _ip("link", "set", f"{self.prefix}v{node}", "up" if up else "down")

    def cleanup(self) -> None:
        listing = _ip("netns", "list", check=False).stdout.split()
        for name in listing:
            if name.startswith(self.prefix) and name[len(self.prefix) :].isdigit():
                _ip("netns", "delete", name, check=False)
        for node in range(64):
            _ip("link", "delete", f"{self.prefix}v{node}", check=False)
        _ip("link", "delete", self.bridge, check=False)
        self.namespaces.clear()

    def close(self) -> None:
        self.cleanup()

    def __enter__(self) -> NodeNet:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()
