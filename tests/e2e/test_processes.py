"""End to end with real processes: broker, a 2-rank trainer and subscribers over mooncake tcp.

Each subscriber process dumps its live tensors after every swap; the tests compare those
dumps, byte for byte, with the synthetic model the trainer published. The same processes
under faults (a kill mid-pull, a broker restart, garbage on the sockets) are in `tests/faults/`.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest

from tests.e2e.procs import (
    Fleet,
    assert_dump_equals,
    file_exists,
    get_json,
    get_text,
    publish_args,
    start_broker,
    subscribe_args,
    subscriber_rows,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

SIZE = 4_000_000


async def test_two_rank_trainer_three_subscribers_bit_exact_at_every_version(
    fleet: Fleet, tmp_path: Path
):
    broker = await start_broker(fleet)
    dumps = [tmp_path / f"sub{i}" for i in range(3)]
    for index, dump in enumerate(dumps):
        await fleet.start(f"sub{index}", *subscribe_args(broker.endpoint, dump))
    for rank in (0, 1):
        args = publish_args(broker.endpoint, size=SIZE, versions="1-3", rank=rank, world_size=2)
        # --serve: a late joiner reads version 3 after the trainer's wait.
        await fleet.start(f"rank{rank}", *args, "--wait-subscribers", "3", "--serve")

    # The trainer publishes each next version as soon as all three run this one: the dumps
    # (every version each subscriber applied) show each version, where a poll may miss one.
    for version in (1, 2, 3):
        for dump in dumps:
            path = dump / f"v{version}.safetensors"
            await wait_for(partial(file_exists, path), timeout_s=90, what=str(path), fleet=fleet)
            assert_dump_equals(path, SIZE, version)

    # Version 3 is the trainer's last: once the broker counts all three there, nothing moves.
    async def all_at_3():
        model = await get_json(f"{broker.http}/v1/models/llama")
        return model if (model["latest"], model["subscribers_at_latest"]) == (3, 3) else None

    model = await wait_for(all_at_3, timeout_s=30, what="3 subscribers at v3", fleet=fleet)
    rows = await subscriber_rows(broker)
    assert [(r["model"], r["applied_version"], r["lag"]) for r in rows] == [("llama", 3, 0)] * 3
    assert all(r["last_pull_s"] > 0 and r["last_error"] is None for r in rows)
    # Retention 2: version 1 was retired when version 3 was announced (nobody read it then).
    assert model["readable_versions"] == [2, 3]
    for version in (2, 3):
        summary = await get_json(f"{broker.http}/v1/models/llama/versions/{version}")
        assert summary["world_size"] == 2
        assert summary["total_bytes"] >= SIZE * 0.9

    # A late joiner gets the newest version at once, without a new publish.
    late = tmp_path / "late"
    await fleet.start("late", *subscribe_args(broker.endpoint, late), "--exit-after-version", "3")
    await wait_for(
        partial(file_exists, late / "v3.safetensors"),
        timeout_s=60,
        what="late joiner",
        fleet=fleet,
    )
    assert_dump_equals(late / "v3.safetensors", SIZE, 3)
    assert sorted(p.name for p in late.glob("v*.safetensors")) == ["v3.safetensors"]

    metrics = await get_text(f"{broker.http}/metrics")
    assert 'weightstream_latest_version{model="llama"} 3' in metrics
    for proc in fleet.procs:
        if proc.name != "late":
            assert await fleet.stop(proc) == 0, proc.tail()
