"""A version whose publisher is gone is not offered: status says unreadable, subscribers are
told (Withdraw), and a late joiner waits for the next version instead of failing on it."""

from __future__ import annotations

import signal
from functools import partial
from pathlib import Path

import pytest

from tests.e2e.procs import (
    Fleet,
    assert_dump_equals,
    file_exists,
    get_json,
    publish_args,
    start_broker,
    subscribe_args,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

SIZE = 2_000_000


def _publisher(broker: str, versions: str) -> list[str]:
    return publish_args(broker, size=SIZE, versions=versions, transport="zmq")


def _subscriber(broker: str, dump: Path) -> list[str]:
    return [*subscribe_args(broker, dump, transport="zmq"), "--pull-timeout-s", "5"]


async def test_a_version_whose_publisher_was_killed_is_withdrawn_and_late_joiners_wait(
    fleet: Fleet, tmp_path: Path, faults
):
    broker = await start_broker(fleet)
    early = tmp_path / "early"
    await fleet.start("early", *_subscriber(broker.endpoint, early))
    trainer = await fleet.start("trainer", *_publisher(broker.endpoint, "1"))
    await wait_for(
        partial(file_exists, early / "v1.safetensors"), timeout_s=60, what="v1", fleet=fleet
    )
    assert_dump_equals(early / "v1.safetensors", SIZE, 1)
    faults.applied(version=1, ok=True)

    faults.inject("publisher SIGKILLed while its version 1 is the latest")
    trainer.process.send_signal(signal.SIGKILL)
    await trainer.process.wait()

    async def unreadable():
        model = await get_json(f"{broker.http}/v1/models/llama")
        return model if model["unreadable"] or model["withdrawn"] else None

    model = await wait_for(unreadable, timeout_s=20, what="v1 unreadable", fleet=fleet)
    assert [w["version"] for w in model["withdrawn"]] == [1]
    assert "is gone" in model["withdrawn"][0]["reason"]
    assert model["readable_versions"] == []

    late = tmp_path / "late"
    joiner = await fleet.start("late", *_subscriber(broker.endpoint, late))

    async def late_idle():
        rows = (await get_json(f"{broker.http}/v1/subscribers?model=llama"))["subscribers"]
        mine = [r for r in rows if r["pid"] == joiner.process.pid]
        return mine if mine and mine[0]["state"] == "idle" else None

    [row] = await wait_for(late_idle, timeout_s=30, what="late joiner connected", fleet=fleet)
    assert row["last_error"] is None
    assert row["applied_version"] is None

    await fleet.start("trainer2", *_publisher(broker.endpoint, "2"))
    for dump in (early, late):
        path = dump / "v2.safetensors"
        await wait_for(partial(file_exists, path), timeout_s=60, what=str(path), fleet=fleet)
        assert_dump_equals(path, SIZE, 2)
        faults.applied(version=2, ok=True)
    # The late joiner never tried the unreadable version.
    assert not (late / "v1.safetensors").exists()
    assert "pull failed" not in joiner.log.read_text()
    assert "version=1" not in joiner.log.read_text()
