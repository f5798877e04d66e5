"""A corrupted bucket, with a real broker and a real subscriber process: detected, never applied.

The trainer is this test process (two ranks, so that rank 0's shard waits at the broker until
rank 1 arrives): rank 0's bytes are damaged after its checksums were computed and before the
version is announced, as a bad DIMM or a buggy trainer would.
"""

from __future__ import annotations

import asyncio
from functools import partial
from pathlib import Path

import pytest
import zmq.asyncio

from publishers.publisher import open_publisher
from publishers.sources import synthetic_llama
from streamer.transport import MooncakeSender
from tests.e2e.procs import Fleet, assert_dump_equals, file_exists, get_json, start_broker, wait_for
from weightstream.commands import shard_of

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

SIZE = 2_000_000


@pytest.fixture
async def fleet(tmp_path: Path):
    fleet = Fleet(tmp_path)
    yield fleet
    await fleet.stop_all()


async def test_corrupted_bucket_is_detected_reported_and_never_applied(
    fleet: Fleet, tmp_path: Path
):
    broker = await start_broker(fleet)
    dump = tmp_path / "sub"
    await fleet.start(
        "sub",
        "subscribe",
        "--broker",
        broker.endpoint,
        "--model",
        "llama",
        "--transport",
        "mooncake",
        "--dump-dir",
        str(dump),
        "--dump-all",
        "--max-attempts",
        "2",
    )
    config = broker.client_config()
    ctx = zmq.asyncio.Context()
    try:
        async with (
            open_publisher(
                config,
                model="llama",
                sender=MooncakeSender(),
                rank=0,
                world_size=2,
                bucket_bytes=256 << 10,
                context=ctx,
            ) as rank0,
            open_publisher(
                config,
                model="llama",
                sender=MooncakeSender(),
                rank=1,
                world_size=2,
                bucket_bytes=256 << 10,
                context=ctx,
            ) as rank1,
        ):

            async def publish(version: int, *, corrupt: bool) -> None:
                tensors = synthetic_llama(SIZE, version=version)
                await rank0.publish(version, shard_of(tensors, 0, 2))
                if corrupt:
                    rank0.live[version].buffers[0][1000] ^= 0x10  # one flipped bit
                await rank1.publish(version, shard_of(tensors, 1, 2))

            await publish(1, corrupt=False)
            await wait_for(
                partial(file_exists, dump / "v1.safetensors"),
                timeout_s=60,
                what="v1",
                fleet=fleet,
            )

            await publish(2, corrupt=True)

            async def reported():
                rows = (await get_json(f"{broker.http}/v1/subscribers"))["subscribers"]
                return rows[0]["last_error"] if rows and rows[0]["last_error"] else None

            error = await wait_for(reported, timeout_s=60, what="the failure reported", fleet=fleet)
            assert "ChecksumMismatch" in error
            assert "version 2" in error
            await asyncio.sleep(1)
            rows = (await get_json(f"{broker.http}/v1/subscribers"))["subscribers"]
            assert rows[0]["applied_version"] == 1
            assert not (dump / "v2.safetensors").exists()
            assert_dump_equals(dump / "v1.safetensors", SIZE, 1)
            metrics = await get_json_text(f"{broker.http}/metrics")
            assert "weightstream_pull_failures_total 2" in metrics  # max-attempts 2, both reported

            # The next good version applies.
            await publish(3, corrupt=False)
            await wait_for(
                partial(file_exists, dump / "v3.safetensors"),
                timeout_s=60,
                what="v3",
                fleet=fleet,
            )
            assert_dump_equals(dump / "v3.safetensors", SIZE, 3)
            rows = (await get_json(f"{broker.http}/v1/subscribers"))["subscribers"]
            assert rows[0]["last_error"] is None
    finally:
        ctx.destroy(linger=0)


async def get_json_text(url: str) -> str:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return await response.text()
