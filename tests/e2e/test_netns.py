"""Several nodes as network namespaces: subscribers reach the trainer over a bridge, not loopback.

A node whose link goes down mid-pull is in `tests/faults/test_link_down.py`.
"""

from __future__ import annotations

import itertools
from functools import partial
from pathlib import Path

import pytest

from tests.e2e.procs import Fleet, assert_dump_equals, file_exists, get_json, start_broker, wait_for
from weightstream.netns import NodeNet, netns_available

pytestmark = [
    pytest.mark.slow,
    pytest.mark.netns,
    pytest.mark.timeout(240),
    pytest.mark.skipif(not netns_available(), reason="needs root and iproute2 (ip netns)"),
]

SIZE = 3_000_000
_nets = itertools.count(100)


@pytest.fixture
def nodes():
    net = NodeNet(2, prefix="wst", net=next(_nets)).open()
    yield net
    net.close()


async def test_subscribers_in_namespaces_follow_a_trainer_over_the_bridge(
    fleet: Fleet, nodes: NodeNet, tmp_path: Path
):
    broker = await start_broker(fleet, endpoint=f"tcp://{nodes.host_address}:0")
    dumps = [tmp_path / f"node{i}" for i in range(2)]
    for node, dump in enumerate(dumps):
        await fleet.start(
            f"node{node}",
            "subscribe",
            "--broker",
            broker.endpoint,
            "--model",
            "llama",
            "--transport",
            "mooncake",
            "--host",
            nodes.address(node),
            "--dump-dir",
            str(dump),
            "--dump-all",
            prefix=nodes.exec_prefix(node),
        )
    await fleet.start(
        "trainer",
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
        "--versions",
        "1-2",
        "--wait-subscribers",
        "2",
    )
    for version in (1, 2):

        async def both(version: int = version):
            rows = (await get_json(f"{broker.http}/v1/subscribers"))["subscribers"]
            return sum((r["applied_version"] or 0) >= version for r in rows) == 2

        await wait_for(both, timeout_s=90, what=f"both nodes at v{version}", fleet=fleet)
        for dump in dumps:
            path = dump / f"v{version}.safetensors"
            await wait_for(partial(file_exists, path), timeout_s=10, what=str(path))
            assert_dump_equals(path, SIZE, version)

    # The subscribers really are on other hosts: the broker sees them from their own addresses.
    rows = (await get_json(f"{broker.http}/v1/subscribers"))["subscribers"]
    assert len(rows) == 2
