"""Versions that wait for ranks: a rank that never publishes, and a broker restarted while a
version is half published. Real broker and trainer processes."""

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
    start_broker,
    wait_for,
)
from tests.faults.measure import free_port, model_page, rss_bytes

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

SIZE = 16_000_000


def _rank(broker: str, rank: int, versions: str, *extra: str) -> list[str]:
    return [
        "publish",
        "--broker",
        broker,
        "--model",
        "llama",
        "--transport",
        "zmq",
        "--synthetic",
        str(SIZE),
        "--bucket",
        "1MiB",
        "--versions",
        versions,
        "--rank",
        str(rank),
        "--world-size",
        "2",
        "--job",
        "pending-trainer",
        *extra,
    ]


async def test_a_rank_that_never_publishes_expires_its_versions_and_frees_the_others(
    fleet: Fleet, faults
):
    broker = await start_broker(fleet, "--pending-timeout-s", "4")
    faults.inject("rank 1 of a 2-rank trainer never publishes")
    # A fixed mmap threshold hands every freed bucket straight back to the kernel, so RSS counts
    # the buffers rank 0 still holds, not where glibc's dynamic threshold left its free chunks
    # (8-48 MB of slack between runs without it).
    rank0 = await fleet.start(
        "rank0",
        *_rank(broker.endpoint, 0, "1-24", "--interval-s", "0.2"),
        prefix=("env", "MALLOC_MMAP_THRESHOLD_=131072"),
    )

    async def pending_seen():
        model = await model_page(broker.http, "llama")
        return model["pending"] if model else None

    [first, *_] = await wait_for(pending_seen, timeout_s=30, what="a pending version", fleet=fleet)
    assert (first["missing_ranks"], first["ranks_in"], first["world_size"]) == ([1], [0], 2)

    async def published(version: int) -> bool:
        return f"version={version} rank=0/2" in rank0.log.read_text()

    await wait_for(partial(published, 10), timeout_s=60, what="rank 0 at v10", fleet=fleet)
    warm_rss = rss_bytes(rank0.process.pid)
    await wait_for(partial(published, 24), timeout_s=60, what="rank 0 at v24", fleet=fleet)
    # Without expiry each version keeps its shard (8 MB here): 14 more is 112 MB. With it the
    # pending cap holds four, so growth is a few pages.
    faults.bounded(
        "rank 0 resident memory growth from v10 to v24 with rank 1 missing (bytes)",
        value=rss_bytes(rank0.process.pid) - warm_rss,
        bound=2 * SIZE,
    )

    async def all_expired():
        model = await get_json(f"{broker.http}/v1/models/llama")
        return model if not model["pending"] else None

    model = await wait_for(all_expired, timeout_s=30, what="pending versions expired", fleet=fleet)
    assert model["latest"] is None
    assert model["readable_versions"] == []
    assert {e["version"] for e in model["expired"]} >= {21, 22, 23, 24}
    assert all(e["missing_ranks"] == [1] for e in model["expired"])

    # Versions 1-20 left through the pending cap (4), 21-24 through the timeout; each one's
    # Retire said why, and rank 0 freed its buffers.
    async def all_retired() -> str | None:
        log = rank0.log.read_text()
        return log if log.count("retired early model=llama") == 24 else None

    log = await wait_for(all_retired, timeout_s=10, what="24 Retires at rank 0", fleet=fleet)
    assert "ranks [1] of 2 never published" in log
    assert "expired after 4 s" in log
    assert "freed_bytes=0 " not in log
    rank0.process.send_signal(signal.SIGTERM)
    assert await rank0.process.wait() == 0, rank0.tail()


async def test_a_half_published_version_survives_a_broker_restart(
    fleet: Fleet, tmp_path: Path, faults
):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    state = tmp_path / "state"
    broker = await start_broker(fleet, "--state-dir", str(state), endpoint=endpoint)
    dump = tmp_path / "dump"
    await fleet.start(
        "sub",
        "subscribe",
        "--broker",
        endpoint,
        "--model",
        "llama",
        "--transport",
        "zmq",
        "--dump-dir",
        str(dump),
    )
    rank0 = await fleet.start(
        "rank0", *_rank(endpoint, 0, "1", "--wait-subscribers", "1", "--wait-timeout-s", "60")
    )

    async def half_published():
        model = await model_page(broker.http, "llama")
        return model["pending"] if model else None

    await wait_for(half_published, timeout_s=30, what="rank 0's shard in", fleet=fleet)
    faults.inject("broker SIGKILLed with version 1 half published")
    broker.proc.process.send_signal(signal.SIGKILL)
    await broker.proc.process.wait()
    broker = await start_broker(fleet, "--state-dir", str(state), endpoint=endpoint)
    model = await get_json(f"{broker.http}/v1/models/llama")
    assert [p["ranks_in"] for p in model["pending"]] == [[0]]

    await fleet.start("rank1", *_rank(endpoint, 1, "1"))
    path = dump / "v1.safetensors"
    await wait_for(partial(file_exists, path), timeout_s=60, what="v1 applied", fleet=fleet)
    assert_dump_equals(path, SIZE, 1)
    faults.applied(version=1, ok=True)

    # Rank 0's wait_applied, asked before the restart, returns after it: no hang.
    async def rank0_done() -> bool:
        return "version=1 applied by 1 subscribers" in rank0.log.read_text()

    await wait_for(rank0_done, timeout_s=30, what="rank 0's wait_applied", fleet=fleet)
