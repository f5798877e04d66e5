"""Processes that die or restart: a subscriber killed mid-pull, the broker stopped and restarted.

Real processes (broker, a 2-rank trainer, subscribers over mooncake tcp); every subscriber
dumps what it applies, and each dump is compared with the version's bytes.
"""

from __future__ import annotations

import signal
import socket
from functools import partial
from pathlib import Path

import pytest

from tests.e2e.procs import (
    Fleet,
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

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

SIZE = 4_000_000


async def test_subscriber_killed_mid_pull_catches_up_after_restart(
    fleet: Fleet, tmp_path: Path, faults: Faults
):
    broker = await start_broker(fleet)
    for rank in (0, 1):
        args = publish_args(broker.endpoint, size=SIZE, versions="1", rank=rank, world_size=2)
        await fleet.start(f"rank{rank}", *args)
    dump = tmp_path / "sub"
    # 4 MB at 1 MB/s: the pull takes about four seconds.
    slow = await fleet.start("slow", *subscribe_args(broker.endpoint, dump), "--max-rate", "1MB")

    async def mid_pull():
        row = row_of(await subscriber_rows(broker), slow)
        return row is not None and row["progress"] is not None and 0 < row["progress"] < 0.8

    await wait_for(mid_pull, timeout_s=60, what="a pull in progress", fleet=fleet)
    slow.process.send_signal(signal.SIGKILL)
    faults.inject("SIGKILL of a subscriber mid-pull")
    assert await slow.process.wait() == -signal.SIGKILL
    assert not list(dump.glob("v*.safetensors"))  # it died before it could apply anything

    restarted = await fleet.start(
        "restarted", *subscribe_args(broker.endpoint, dump), "--exit-after-version", "1"
    )
    await wait_for(
        partial(file_exists, dump / "v1.safetensors"), timeout_s=60, what="catch-up", fleet=fleet
    )
    faults.applied(version=1, ok=dump_matches(dump / "v1.safetensors", SIZE, 1))

    # The broker shows the killed process gone (it never said goodbye: its peer timed out),
    # by its own row: the restarted one exits too, once it applied version 1.
    async def killed_is_gone():
        return (row_of(await subscriber_rows(broker), slow) or {}).get("state") == "gone"

    await wait_for(
        killed_is_gone, timeout_s=30, what="the killed subscriber shown gone", fleet=fleet
    )
    assert await restarted.process.wait() == 0, restarted.tail()


async def test_broker_restart_keeps_versions_and_peers_reconnect(
    fleet: Fleet, tmp_path: Path, faults: Faults
):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        endpoint = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
    state = str(tmp_path / "state")
    broker = await start_broker(fleet, "--state-dir", state, endpoint=endpoint)
    first = tmp_path / "first"
    await fleet.start("first", *subscribe_args(broker.endpoint, first))
    # The trainer publishes version 2 only once two subscribers run version 1; until the
    # test starts the second, version 1 is the latest there can be.
    for rank in (0, 1):
        args = publish_args(broker.endpoint, size=SIZE, versions="1-2", rank=rank, world_size=2)
        await fleet.start(f"rank{rank}", *args, "--wait-subscribers", "2")
    await wait_for(
        partial(file_exists, first / "v1.safetensors"), timeout_s=60, what="v1", fleet=fleet
    )
    faults.applied(version=1, ok=dump_matches(first / "v1.safetensors", SIZE, 1))

    assert await fleet.stop(broker.proc) == 0
    faults.inject("broker stopped and restarted while a subscriber runs v1 and the trainer waits")
    restarted = await start_broker(fleet, "--state-dir", state, endpoint=endpoint)
    # The new broker knows version 1 from its state dir alone: nobody published since.
    model = await get_json(f"{restarted.http}/v1/models/llama")
    assert (model["latest"], model["readable_versions"]) == (1, [1])

    # A subscriber that joins the new broker gets version 1 from the publishers' memory;
    # that is the second subscriber the trainer waited for (its wait, re-sent after the
    # restart, and the first subscriber, re-registered by its heartbeat), so version 2 follows.
    second = tmp_path / "second"
    await fleet.start("second", *subscribe_args(restarted.endpoint, second))
    for dump in (second / "v1.safetensors", first / "v2.safetensors", second / "v2.safetensors"):
        await wait_for(partial(file_exists, dump), timeout_s=90, what=str(dump), fleet=fleet)
    faults.applied(version=1, ok=dump_matches(second / "v1.safetensors", SIZE, 1))
    faults.applied(version=2, ok=dump_matches(first / "v2.safetensors", SIZE, 2))
    faults.applied(version=2, ok=dump_matches(second / "v2.safetensors", SIZE, 2))
    model = await get_json(f"{restarted.http}/v1/models/llama")
    assert (model["latest"], model["subscribers_at_latest"]) == (2, 2)
