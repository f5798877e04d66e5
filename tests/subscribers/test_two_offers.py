"""A version offered twice: first where this subscriber cannot read it, then with more places.

A colocated trainer announces its GPU copy first (CUDA IPC, for the engine on its GPU) and
the same version again once the host copy is filled (`Publisher(offer_gpu=True)`). Here the
first offer is one a CPU subscriber cannot read either (shared memory, while it reads over
ZeroMQ only), and the second adds ZeroMQ locators over the same buffers: real broker, real
Publisher, real transports. The GPU half of the path is `tests/gpu/test_colocated.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import msgspec
import pytest
import torch
import zmq.asyncio

from publishers.publisher import Publisher, open_publisher
from publishers.sources import synthetic_llama
from schemas.manifest import Shard
from streamer.client import connect
from streamer.errors import BrokerError
from streamer.transport import ZmqFrameReceiver, ZmqFrameSender
from subscribers.staging import Staging
from subscribers.subscriber import PullConfig, Subscriber
from subscribers.swap import TorchSwapper
from tests.support import RunningBroker, until

MODEL = "org/colocated"
MODEL_BYTES = 256 << 10


def weights(version: int) -> dict[str, torch.Tensor]:
    return synthetic_llama(MODEL_BYTES, version=version, seed=3)


@contextlib.asynccontextmanager
async def shm_only_publisher(
    broker: RunningBroker, zmq_ctx: zmq.asyncio.Context
) -> AsyncIterator[Publisher]:
    async with open_publisher(
        broker.client_config(),
        model=MODEL,
        sender=[],
        node_local=True,  # its shared memory only: the subscribers here read over ZeroMQ
        bucket_bytes=32 << 10,
        context=zmq_ctx,
        job="colocated-test",
    ) as publisher:
        yield publisher


def with_more_locators(shard: Shard, more: list[list[object]]) -> Shard:
    regions = tuple(
        msgspec.structs.replace(region, locators=(*region.locators, *extra))
        for region, extra in zip(shard.regions, more, strict=True)
    )
    return msgspec.structs.replace(shard, regions=regions)


async def test_a_version_offered_again_with_a_readable_copy_applies_bit_exact(
    broker: RunningBroker, zmq_ctx: zmq.asyncio.Context
) -> None:
    engine = {name: torch.zeros_like(t) for name, t in weights(0).items()}
    receiver = ZmqFrameReceiver(timeout_s=2.0)
    frames = ZmqFrameSender()
    async with (
        shm_only_publisher(broker, zmq_ctx) as publisher,
        connect(broker.client_config(), role="subscriber", context=zmq_ctx) as client,
    ):
        subscriber = Subscriber(
            client=client,
            receivers=[receiver],
            swapper=TorchSwapper(engine),
            model=MODEL,
            config=PullConfig(pull_timeout_s=30, max_attempts=1),
            staging=Staging(receivers=[receiver], pin_memory=False),
        )
        task = asyncio.create_task(subscriber.run())
        try:
            first = await publisher.publish(1, weights(1))
            # Announced where it cannot read: it waits for another offer, failing nothing.
            await until(lambda: client.latest_manifest(MODEL) is not None, timeout_s=10)
            assert subscriber.applied is None
            regions = publisher.live[1].regions
            second = with_more_locators(first.shard, [[loc] for loc in frames.expose(regions)])
            await publisher.client.publish(MODEL, 1, 0, 1, second, job="colocated-test")
            async with asyncio.timeout(20):
                await publisher.wait_applied(1, 1)
            expected = weights(1)
            assert all(
                torch.equal(t.view(torch.uint8), expected[n].view(torch.uint8))
                for n, t in engine.items()
            )
            assert subscriber.failures == 0
            # The same version with other bytes is not "more locators": refused, named.
            changed = msgspec.structs.replace(
                second,
                buckets=(
                    msgspec.structs.replace(second.buckets[0], checksum="0" * 32),
                    *second.buckets[1:],
                ),
            )
            with pytest.raises(BrokerError, match="only its locators may be offered again"):
                await publisher.client.publish(MODEL, 1, 0, 1, changed, job="colocated-test")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            subscriber.close()
            frames.close()
            receiver.close()


async def test_a_version_nobody_offers_readably_fails_with_what_to_do(
    broker: RunningBroker, zmq_ctx: zmq.asyncio.Context
) -> None:
    engine = {name: torch.zeros_like(t) for name, t in weights(0).items()}
    receiver = ZmqFrameReceiver(timeout_s=2.0)
    async with (
        shm_only_publisher(broker, zmq_ctx) as publisher,
        connect(broker.client_config(), role="subscriber", context=zmq_ctx) as client,
    ):
        subscriber = Subscriber(
            client=client,
            receivers=[receiver],
            swapper=TorchSwapper(engine),
            model=MODEL,
            config=PullConfig(pull_timeout_s=0.5, max_attempts=1),
            staging=Staging(receivers=[receiver], pin_memory=False),
        )
        await client.subscribe(MODEL)
        await publisher.publish(1, weights(1))
        await until(lambda: client.latest_manifest(MODEL) is not None, timeout_s=10)
        manifest = client.latest_manifest(MODEL)
        assert manifest is not None
        try:
            assert not await subscriber._apply_with_retries(manifest)
            assert subscriber.applied is None
            assert "offered only as ShmLocator" in str(subscriber.last_error)
            assert "host copy" in str(subscriber.last_error)
        finally:
            subscriber.close()
            receiver.close()
