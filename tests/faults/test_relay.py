"""Relay between subscribers (issue 11), real processes: a relay SIGKILLed mid-transfer, and a
late joiner filled by peers.

    root namespace: broker (--relay-fanout 2), trainer
        ├── node-0 .. node-3: `weightstream subscribe --relay-listen` (each in its namespace,
        │                      its link shaped to 2 MB/s both ways: a pull takes seconds)
        └── node-4: the late joiner, started once the others hold the version

Without network namespaces every process runs on loopback and the subscribers pace their
pulls with --max-rate instead. Every node dumps what it applies; each dump is compared with
the published bytes. Who read what from whom comes from the version's relay status
(`relay.nodes[].read_bytes`, fed by `Progress.sources`).
"""

from __future__ import annotations

import itertools
import signal
from collections import Counter
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.procs import (
    BrokerInfo,
    Fleet,
    Proc,
    dump_matches,
    file_exists,
    get_json,
    publish_args,
    row_of,
    start_broker,
    subscribe_args,
    subscriber_rows,
    wait_for,
)
from tests.faults.ledger import Faults
from weightstream.netns import NodeNet, netns_available

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

SIZE = 6_000_000  # 23 buckets of 256 KiB
RATE = 2_000_000  # bytes/s of every node's link (or --max-rate on loopback): 3 s a copy
NODES = 4
_nets = itertools.count(195)  # apart from the other netns tests' subnets


def _relay_cli() -> bool:
    """Whether this checkout's CLI has the relay: subscribe --relay-listen, broker --relay-fanout."""
    from weightstream.cli import _parser

    def options(command: str) -> set[str]:
        commands = next(a for a in _parser()._actions if a.dest == "command")
        sub = commands.choices[command]  # type: ignore[index]
        return {o for a in sub._actions for o in a.option_strings}

    return "--relay-listen" in options("subscribe") and "--relay-fanout" in options("broker")


if not _relay_cli():
    pytestmark.append(pytest.mark.skip(reason="this checkout has no relay CLI yet"))


class Nodes:
    """Each node in its own namespace with a shaped link, or all of them on loopback."""

    def __init__(self, net: NodeNet | None) -> None:
        self.net = net

    @property
    def host(self) -> str:
        return "127.0.0.1" if self.net is None else self.net.host_address

    def address(self, node: int) -> str:
        return "127.0.0.1" if self.net is None else self.net.address(node)

    def prefix(self, node: int) -> tuple[str, ...]:
        return () if self.net is None else self.net.exec_prefix(node)

    def pacing(self) -> list[str]:
        """What paces a pull: the shaped link, else the subscriber's own rate cap."""
        return ["--max-rate", str(RATE)] if self.net is None else []


@pytest.fixture
def nodes() -> Iterator[Nodes]:
    if not netns_available():
        yield Nodes(None)
        return
    net = NodeNet(NODES + 1, prefix="wrt", net=next(_nets)).open()
    try:
        for node in range(NODES + 1):
            net.shape(node, rate_bytes_per_s=RATE)
        yield Nodes(net)
    finally:
        net.close()


async def _start_node(
    fleet: Fleet, broker: BrokerInfo, nodes: Nodes, node: int, dump: Path
) -> Proc:
    address = nodes.address(node)
    return await fleet.start(
        f"node-{node}",
        *subscribe_args(broker.endpoint, dump),
        "--host",
        address,
        "--name",
        f"node-{node}",
        "--relay-listen",
        address,
        *nodes.pacing(),
        prefix=nodes.prefix(node),
    )


async def _relay(broker: BrokerInfo, version: int) -> dict[str, Any]:
    status = await get_json(f"{broker.http}/v1/models/llama/versions/{version}")
    relay: dict[str, Any] = status["relay"]
    return relay


def _read_bytes(relay: dict[str, Any], name: str) -> dict[str, int]:
    [node] = [n for n in relay["nodes"] if n["name"] == name]
    return {source: int(count) for source, count in node["read_bytes"].items()}


async def test_relay_killed_mid_transfer_and_a_late_joiner_filled_by_peers(
    fleet: Fleet, nodes: Nodes, tmp_path: Path, faults: Faults
):
    broker = await start_broker(fleet, "--relay-fanout", "2", endpoint=f"tcp://{nodes.host}:0")
    dumps = {node: tmp_path / f"node-{node}" for node in range(NODES + 1)}
    procs = {
        node: await _start_node(fleet, broker, nodes, node, dumps[node]) for node in range(NODES)
    }

    async def offered() -> bool:
        rows = await subscriber_rows(broker)
        return sum(r["relay_endpoint"] is not None for r in rows) == NODES

    await wait_for(offered, timeout_s=60, what="4 relay offers", fleet=fleet)
    await fleet.start(
        "trainer", *publish_args(broker.endpoint, size=SIZE, versions="1"), "--host", nodes.host
    )

    # The relay that most nodes read a stripe from, killed while it is itself half-way.
    async def busiest_parent() -> str | None:
        try:
            relay = await _relay(broker, 1)
        except AssertionError:  # 404 until the version is announced
            return None
        parents = Counter(
            p for n in relay["nodes"] for p in n["reads_from"] or [] if p.startswith("node-")
        )
        return parents.most_common(1)[0][0] if parents else None

    victim_name = await wait_for(busiest_parent, timeout_s=60, what="the relay plan", fleet=fleet)
    victim_node = int(victim_name.split("-")[1])
    victim = procs[victim_node]

    async def half_way() -> float | None:
        row = row_of(await subscriber_rows(broker), victim)
        progress = row["progress"] if row is not None and row["pulling_version"] == 1 else None
        return progress if progress is not None and 0.2 <= progress <= 0.7 else None

    progress = await wait_for(half_way, timeout_s=60, what=f"{victim_name} half-way", fleet=fleet)
    readers = [
        n["name"]
        for n in (await _relay(broker, 1))["nodes"]
        if victim_name in (n["reads_from"] or [])
    ]
    assert readers, f"nobody reads from {victim_name}"
    victim.process.send_signal(signal.SIGKILL)
    faults.inject(f"relay {victim_name} SIGKILLed at {progress:.0%} of its pull, read by {readers}")
    assert await victim.process.wait() == -signal.SIGKILL

    survivors = [node for node in range(NODES) if node != victim_node]
    for node in survivors:
        path = dumps[node] / "v1.safetensors"
        await wait_for(partial(file_exists, path), timeout_s=60, what=str(path), fleet=fleet)
        faults.applied(version=1, ok=dump_matches(path, SIZE, 1), what=f"node-{node}")
    assert not list(dumps[victim_node].glob("v*.safetensors"))

    # The readers got bytes from relays, not only from the trainer.
    relay = await _relay(broker, 1)
    from_peers = {
        f"node-{n}": sum(c for s, c in _read_bytes(relay, f"node-{n}").items() if s != "trainer")
        for n in survivors
    }
    assert any(from_peers.values()), f"every survivor read only from the trainer: {relay['nodes']}"
    assert sum(relay["served_bytes"]["holders"].values()) > 0, relay["served_bytes"]

    # A late joiner: filled from the holders, nothing from the trainer.
    trainer_served = relay["served_bytes"]["trainer"]
    late = NODES
    await _start_node(fleet, broker, nodes, late, dumps[late])
    path = dumps[late] / "v1.safetensors"
    await wait_for(partial(file_exists, path), timeout_s=60, what="the late joiner", fleet=fleet)
    faults.applied(version=1, ok=dump_matches(path, SIZE, 1), what=f"node-{late}")

    async def counted() -> dict[str, int] | None:
        got = _read_bytes(await _relay(broker, 1), f"node-{late}")
        return got if sum(got.values()) > 0 else None

    got = await wait_for(counted, timeout_s=10, what="the late joiner's sources", fleet=fleet)
    assert got.get("trainer", 0) == 0, f"the late joiner read from the trainer: {got}"
    assert (await _relay(broker, 1))["served_bytes"]["trainer"] == trainer_served
