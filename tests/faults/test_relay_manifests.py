"""Manifests from peers (issue 10), real processes: relay subscribers take an announced manifest
from their Route's stripe-0 parent, so the broker serves the body once, not once per node; and
a lying relay (the right digest, a wrong body) costs its reader a fetch from the broker, never
a wrong manifest.

    broker (--relay-fanout 2), trainer, node-0 .. node-3 (`weightstream subscribe --relay-listen`)
    broker (--relay-fanout 1), trainer, a-liar (in this process: a hostile relay) ── b-honest

Who served each manifest comes from the broker's `weightstream_broker_manifest_fetches_total`
and each node's `manifest ... source=broker|peer:<name>` log line; every dump is compared with
the published bytes.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import pytest
import zmq.asyncio

from schemas.messages import RelayOffer
from streamer.client import connect
from subscribers.relay import RelayServer
from tests.e2e.procs import (
    BrokerInfo,
    Fleet,
    dump_matches,
    file_exists,
    get_text,
    metric,
    publish_args,
    start_broker,
    subscribe_args,
    subscriber_rows,
    wait_for,
)
from tests.support import until

if TYPE_CHECKING:
    from pathlib import Path

    from tests.e2e.procs import Proc
    from tests.faults.ledger import Faults

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

SIZE = 2_000_000
NODES = 4
FETCHES = "weightstream_broker_manifest_fetches_total"


async def _node(fleet: Fleet, broker: BrokerInfo, name: str, dump: Path) -> Proc:
    return await fleet.start(
        name,
        *subscribe_args(broker.endpoint, dump),
        "--name",
        name,
        "--relay-listen",
        "127.0.0.1",
        "--relay-timeout-s",
        "2",
    )


async def _offers(broker: BrokerInfo, fleet: Fleet, count: int) -> None:
    async def offered() -> bool:
        rows = await subscriber_rows(broker)
        return sum(r["relay_endpoint"] is not None for r in rows) == count

    await wait_for(offered, timeout_s=60, what=f"{count} relay offers", fleet=fleet)


async def _bodies(broker: BrokerInfo) -> int:
    return int(metric(await get_text(f"{broker.http}/metrics"), FETCHES))


def _manifest_sources(proc: Proc) -> list[str]:
    """The `source=` of every manifest the node took, from its log."""
    lines = proc.log.read_text(errors="replace").splitlines()
    return [
        line.split("source=", 1)[1].split()[0]
        for line in lines
        if " manifest model=" in line and "source=" in line
    ]


async def test_relay_nodes_take_the_manifest_from_peers_and_the_broker_serves_it_once(
    fleet: Fleet, tmp_path: Path, faults: Faults
):
    broker = await start_broker(fleet, "--relay-fanout", "2")
    dumps = {i: tmp_path / f"node-{i}" for i in range(NODES)}
    procs = {i: await _node(fleet, broker, f"node-{i}", dumps[i]) for i in range(NODES)}
    await _offers(broker, fleet, NODES)
    await fleet.start("trainer", *publish_args(broker.endpoint, size=SIZE, versions="1"))
    for i in range(NODES):
        path = dumps[i] / "v1.safetensors"
        await wait_for(partial(file_exists, path), timeout_s=60, what=str(path), fleet=fleet)
        faults.applied(version=1, ok=dump_matches(path, SIZE, 1), what=f"node-{i}")
    # Stripe 0's tree: node-0 -> (node-1, node-2), node-1 -> node-3; only its root asks the broker.
    sources = {f"node-{i}": _manifest_sources(procs[i]) for i in range(NODES)}
    assert sources == {
        "node-0": ["broker"],
        "node-1": ["peer:node-0"],
        "node-2": ["peer:node-0"],
        "node-3": ["peer:node-1"],
    }, fleet.logs()
    assert await _bodies(broker) == 1


async def test_a_lying_relay_costs_a_fetch_from_the_broker_not_a_wrong_manifest(
    fleet: Fleet, tmp_path: Path, faults: Faults
):
    broker = await start_broker(fleet, "--relay-fanout", "1")
    ctx = zmq.asyncio.Context()
    liar_server = RelayServer()
    try:
        # One tree, by name: a-liar is its root and b-honest reads from it.
        config = broker.client_config(name="a-liar")
        async with connect(config, role="subscriber", context=ctx) as liar:
            liar.manifest_peers = _Liar(liar_server)
            await liar.subscribe("llama", relay=RelayOffer(endpoint=liar_server.endpoint))
            dump = tmp_path / "honest"
            honest = await _node(fleet, broker, "b-honest", dump)
            await _offers(broker, fleet, 2)
            await fleet.start("trainer", *publish_args(broker.endpoint, size=SIZE, versions="1"))
            await until(lambda: liar_server.served_manifests == 1, timeout_s=60)
            faults.inject("a relay served a wrong manifest body under the announced digest")
            liar_server.close()  # it holds no bucket either: its readers go to the trainer
            path = dump / "v1.safetensors"
            await wait_for(partial(file_exists, path), timeout_s=60, what=str(path), fleet=fleet)
            faults.applied(version=1, ok=dump_matches(path, SIZE, 1), what="b-honest")
            log = honest.log.read_text(errors="replace")
            assert "manifest from a peer failed" in log, honest.tail()
            assert _manifest_sources(honest) == ["broker"], honest.tail()
            assert await _bodies(broker) == 2  # the liar's own fetch, then the honest node's
    finally:
        liar_server.close()
        ctx.destroy(linger=0)


class _Liar:
    """A relay's manifest hook, hostile: what it takes, it serves with the last byte flipped."""

    def __init__(self, server: RelayServer) -> None:
        self.server = server

    async def read(
        self, *, model: str, version: int, digest: str, nbytes: int, deadline: float
    ) -> tuple[str, bytes] | None:
        return None

    def offer(self, *, model: str, version: int, digest: str, body: bytes) -> None:
        self.server.offer_manifest(model, version, digest, body[:-1] + bytes([body[-1] ^ 0xFF]))
