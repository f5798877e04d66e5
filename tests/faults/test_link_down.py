"""A node whose link goes down mid-pull: it stays on its last version, gives the torn-off
version up, and catches up with the next one once the link is back (network namespaces)."""

from __future__ import annotations

import asyncio
import itertools
from functools import partial
from pathlib import Path

import pytest

from tests.e2e.procs import (
    Fleet,
    Proc,
    dump_matches,
    file_exists,
    row_of,
    start_broker,
    subscriber_rows,
    wait_for,
)
from tests.faults.ledger import Faults
from weightstream.netns import NodeNet, netns_available

pytestmark = [
    pytest.mark.slow,
    pytest.mark.netns,
    pytest.mark.timeout(240),
    pytest.mark.skipif(not netns_available(), reason="needs root and iproute2 (ip netns)"),
]

SIZE = 3_000_000
_nets = itertools.count(150)  # apart from tests/e2e/test_netns.py's, so both can run at once


@pytest.fixture
def nodes():
    net = NodeNet(1, prefix="wsl", net=next(_nets)).open()
    yield net
    net.close()


async def _logged(proc: Proc, line: str) -> bool:
    text = await asyncio.to_thread(proc.log.read_text, errors="replace")
    return line in text


async def test_node_with_link_down_stays_on_its_version_and_catches_up(
    fleet: Fleet, nodes: NodeNet, tmp_path: Path, faults: Faults
):
    broker = await start_broker(fleet, endpoint=f"tcp://{nodes.host_address}:0")
    dump = tmp_path / "node0"
    # 3 MB at 1 MB/s: a pull takes about 2.5 s (the first bucket goes at once), well inside
    # its 8 s deadline, and long enough to pull the cable in the middle of it.
    node = await fleet.start(
        "node0",
        "subscribe",
        "--broker",
        broker.endpoint,
        "--model",
        "llama",
        "--transport",
        "mooncake",
        "--host",
        nodes.address(0),
        "--dump-dir",
        str(dump),
        "--dump-all",
        "--max-rate",
        "1MB",
        "--pull-timeout-s",
        "8",
        "--max-attempts",
        "2",
        prefix=nodes.exec_prefix(0),
    )
    trainer_args = [
        "publish",
        "--broker",
        broker.endpoint,
        "--model",
        "llama",
        "--transport",
        "mooncake",
        "--host",
        nodes.host_address,
        "--synthetic",
        str(SIZE),
        "--bucket",
        "512KiB",
    ]
    await fleet.start("v1", *trainer_args, "--versions", "1", "--wait-subscribers", "1")
    await wait_for(
        partial(file_exists, dump / "v1.safetensors"), timeout_s=60, what="v1", fleet=fleet
    )
    faults.applied(version=1, ok=dump_matches(dump / "v1.safetensors", SIZE, 1))

    await fleet.start("v2", *trainer_args, "--versions", "2")

    async def pulling_v2():
        row = row_of(await subscriber_rows(broker), node)
        if row is None or row["pulling_version"] != 2 or row["progress"] is None:
            return False
        return 0 < row["progress"] < 0.8

    await wait_for(pulling_v2, timeout_s=60, what="node0 pulling v2", fleet=fleet)
    nodes.link(0, up=False)  # the cable is pulled
    faults.inject("node0's link taken down mid-pull of version 2")
    # The pull misses its deadline, the retry cannot even take a lease: the subscriber gives
    # version 2 up for good (its log says so; the broker cannot hear it now).
    await wait_for(
        partial(_logged, node, "giving up on model=llama version=2"),
        timeout_s=90,
        what="node0 giving version 2 up",
        fleet=fleet,
    )
    assert not (dump / "v2.safetensors").exists()

    nodes.link(0, up=True)
    await fleet.start("v3", *trainer_args, "--versions", "3")
    await wait_for(
        partial(file_exists, dump / "v3.safetensors"), timeout_s=90, what="v3", fleet=fleet
    )
    faults.applied(version=3, ok=dump_matches(dump / "v3.safetensors", SIZE, 3))
    assert sorted(p.name for p in dump.glob("v*.safetensors")) == [
        "v1.safetensors",
        "v3.safetensors",
    ]
