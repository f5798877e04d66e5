"""A corrupted bucket, with a real broker and a real subscriber process: detected, never applied.

The trainer is this test process (two ranks, so that rank 0's shard waits at the broker until
rank 1 arrives): rank 0's bytes are damaged after its checksums were computed and before the
version is announced, as a bad DIMM or a buggy trainer would.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import zmq.asyncio

from publishers.publisher import open_publisher
from publishers.sources import synthetic_llama
from streamer.transport import MooncakeSender
from tests.e2e.procs import (
    Fleet,
    dump_matches,
    file_exists,
    get_text,
    metric,
    start_broker,
    subscriber_rows,
    wait_for,
)
from tests.faults.ledger import Faults
from weightstream.commands import shard_of

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

SIZE = 2_000_000


async def test_corrupted_bucket_is_detected_reported_and_never_applied(
    fleet: Fleet, tmp_path: Path, faults: Faults
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
                job="corruption-trainer",
                bucket_bytes=256 << 10,
                context=ctx,
            ) as rank0,
            open_publisher(
                config,
                model="llama",
                sender=MooncakeSender(),
                rank=1,
                world_size=2,
                job="corruption-trainer",
                bucket_bytes=256 << 10,
                context=ctx,
            ) as rank1,
        ):

            async def publish(version: int, *, corrupt: bool) -> None:
                tensors = synthetic_llama(SIZE, version=version)
                await rank0.publish(version, shard_of(tensors, 0, 2))
                if corrupt:
                    rank0.live[version].buffers[0][1000] ^= 0x10  # one flipped bit
                    faults.inject(f"one bit flipped in a bucket of version {version}")
                await rank1.publish(version, shard_of(tensors, 1, 2))

            await publish(1, corrupt=False)
            await wait_for(
                partial(file_exists, dump / "v1.safetensors"),
                timeout_s=60,
                what="v1",
                fleet=fleet,
            )
            faults.applied(version=1, ok=dump_matches(dump / "v1.safetensors", SIZE, 1))

            await publish(2, corrupt=True)

            # Both attempts (--max-attempts 2) fail and are reported; after the second the
            # subscriber gives version 2 up for good, so it can never be applied after this.
            async def both_failed():
                text = await get_text(f"{broker.http}/metrics")
                return metric(text, "weightstream_pull_failures_total") == 2

            await wait_for(both_failed, timeout_s=60, what="two failed attempts", fleet=fleet)
            [row] = await subscriber_rows(broker)
            assert "ChecksumMismatch" in row["last_error"]
            assert "version 2" in row["last_error"]
            assert row["applied_version"] == 1
            assert not (dump / "v2.safetensors").exists()

            # The next good version applies.
            await publish(3, corrupt=False)
            await wait_for(
                partial(file_exists, dump / "v3.safetensors"),
                timeout_s=60,
                what="v3",
                fleet=fleet,
            )
            faults.applied(version=3, ok=dump_matches(dump / "v3.safetensors", SIZE, 3))
            # Versions are applied in order: had version 2 ever been applied, its dump would be here.
            assert sorted(p.name for p in dump.glob("v*.safetensors")) == [
                "v1.safetensors",
                "v3.safetensors",
            ]
            [row] = await subscriber_rows(broker)
            assert (row["applied_version"], row["last_error"]) == (3, None)
    finally:
        ctx.destroy(linger=0)
