"""`weightstream publish` as a process: when it exits, and what a second `docker compose up`
(a restarted broker that kept its state, a trainer started again) does."""

from __future__ import annotations

import asyncio
import socket
from functools import partial
from pathlib import Path

import pytest

from tests.e2e.procs import (
    Fleet,
    Proc,
    assert_dump_equals,
    file_exists,
    get_json,
    start_broker,
    wait_for,
)

pytestmark = pytest.mark.slow

SIZE = 4_000_000


def _publish(broker: str, *extra: str) -> list[str]:
    # --transport left at auto: same host, so the subscriber maps the publisher's shm.
    return ["publish", "--broker", broker, "--model", "m", "--synthetic", str(SIZE), *extra]


def _subscribe(broker: str, dump: Path) -> list[str]:
    return ["subscribe", "--broker", broker, "--model", "m", "--dump-dir", str(dump)]


async def _exit_code(proc: Proc, timeout_s: float) -> int:
    try:
        async with asyncio.timeout(timeout_s):
            return await proc.process.wait()
    except TimeoutError:
        raise AssertionError(f"{proc.name} did not exit:\n{proc.tail()}") from None


async def test_a_second_compose_up_continues_after_the_brokers_latest(fleet: Fleet, tmp_path: Path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        endpoint = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
    state = str(tmp_path / "state")
    for round_, versions in enumerate(([1, 2], [3, 4])):
        broker = await start_broker(fleet, "--state-dir", state, endpoint=endpoint)
        dump = tmp_path / f"sub-{round_}"
        await fleet.start(f"sub-{round_}", *_subscribe(broker.endpoint, dump))
        trainer = await fleet.start(
            f"trainer-{round_}",
            *_publish(broker.endpoint, "--versions", "next:2", "--wait-subscribers", "1"),
        )
        # The trainer exits 0 by itself once the subscriber applied its last version.
        assert await _exit_code(trainer, 90) == 0, trainer.tail()
        last = versions[-1]
        await wait_for(
            partial(file_exists, dump / f"v{last}.safetensors"), timeout_s=10, what="dump"
        )
        assert_dump_equals(dump / f"v{last}.safetensors", SIZE, last)
        model = await get_json(f"{broker.http}/v1/models/m")
        assert model["latest"] == last
        for proc in list(fleet.procs):
            if proc.process.returncode is None:
                assert await fleet.stop(proc) == 0, proc.tail()


async def test_publish_exits_once_its_versions_are_retired(fleet: Fleet, tmp_path: Path):
    broker = await start_broker(fleet, "--retention", "1")
    dump = tmp_path / "sub"
    await fleet.start("sub", *_subscribe(broker.endpoint, dump))
    first = await fleet.start("first", *_publish(broker.endpoint, "--versions", "1"))
    await wait_for(partial(file_exists, dump / "v1.safetensors"), timeout_s=60, what="v1")
    assert first.process.returncode is None  # v1 is still the latest: it keeps serving
    second = await fleet.start(
        "second", *_publish(broker.endpoint, "--versions", "2", "--wait-subscribers", "1")
    )
    assert await _exit_code(second, 60) == 0, second.tail()
    # Version 2 is out and applied: the broker retires version 1, and its publisher leaves.
    assert await _exit_code(first, 30) == 0, first.tail()
    assert "every version this process published is retired" in first.log.read_text()
    assert_dump_equals(dump / "v2.safetensors", SIZE, 2)


async def test_a_stopped_subscriber_says_goodbye_and_is_not_reported_gone(
    fleet: Fleet, tmp_path: Path
):
    broker = await start_broker(fleet)  # --peer-timeout-s 3: "gone" would follow quickly
    sub = await fleet.start("sub", *_subscribe(broker.endpoint, tmp_path / "sub"))

    async def joined():
        return (await get_json(f"{broker.http}/v1/subscribers"))["subscribers"]

    await wait_for(joined, timeout_s=60, what="the subscriber's hello", fleet=fleet)
    assert await fleet.stop(sub) == 0, sub.tail()  # SIGTERM, as `docker compose down` sends

    async def left() -> bool:
        return "peer left peer=subscriber" in broker.proc.log.read_text()

    await wait_for(left, timeout_s=10, what="the broker logging the goodbye", fleet=fleet)
    assert "peer gone" not in broker.proc.log.read_text()
