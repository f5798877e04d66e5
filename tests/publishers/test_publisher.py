"""A Publisher against a real broker, with real bulk senders."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator

import pytest
import torch
import zmq.asyncio

from publishers.packing import plan
from publishers.publisher import Publisher, SyncPublisher, open_publisher
from schemas.manifest import FrameLocator, Manifest, MooncakeLocator
from streamer.client import connect
from streamer.errors import BrokerError
from streamer.transport import ZmqFrameReceiver, ZmqFrameSender
from subscribers.pull import pull
from subscribers.staging import Staging
from tests.support import MooncakeEngines, RunningBroker, until

MODEL = "org/model"
BUCKET_BYTES = 4096


def tensors(version: int, *, prefix: str = "", count: int = 4) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(version * 100 + len(prefix))
    return {
        f"{prefix}layer{i}.weight": torch.randn(64, 48, generator=generator).to(torch.bfloat16)
        for i in range(count)
    }


@contextlib.asynccontextmanager
async def publisher_on(
    broker: RunningBroker, zmq_ctx: zmq.asyncio.Context, **kwargs: object
) -> AsyncIterator[Publisher]:
    sender = kwargs.pop("sender", None) or ZmqFrameSender()
    async with open_publisher(
        broker.client_config(),
        model=MODEL,
        sender=sender,  # type: ignore[arg-type]
        bucket_bytes=BUCKET_BYTES,
        context=zmq_ctx,
        **kwargs,  # type: ignore[arg-type]
    ) as publisher:
        yield publisher


async def pull_tensors(manifest: Manifest) -> dict[str, torch.Tensor]:
    """Read a manifest back over the zmq transport, verifying every bucket."""
    receiver = ZmqFrameReceiver(timeout_s=2.0)
    staging = Staging(receivers=[receiver], pin_memory=False)
    try:
        await pull(manifest, staging, [receiver])
        return {spec.name: staging.tensor(spec).clone() for spec in manifest.tensors}
    finally:
        staging.close()
        receiver.close()


def assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(actual) == list(expected)
    for name, tensor in expected.items():
        assert torch.equal(actual[name].view(torch.uint8), tensor.view(torch.uint8)), name


async def test_a_multi_rank_version_is_announced_once_every_rank_published(
    broker: RunningBroker, zmq_ctx
) -> None:
    rank0, rank1 = tensors(1, prefix="a."), tensors(1, prefix="b.")
    async with (
        publisher_on(broker, zmq_ctx, rank=0, world_size=2, job="trainer") as first,
        publisher_on(broker, zmq_ctx, rank=1, world_size=2, job="trainer") as second,
        connect(broker.client_config(), role="subscriber", context=zmq_ctx) as watcher,
    ):
        await watcher.subscribe(MODEL)

        partial = await second.publish(1, rank1)
        assert not partial.complete
        assert all(region.rank == 1 for region in partial.shard.regions)
        # An announcement, had there been one, was sent to the watcher while the broker handled
        # that shard: before the reply to the watcher's next request, on the same connection.
        assert await watcher.subscribe("another/model") is None
        assert watcher.latest_manifest(MODEL) is None

        complete = await first.publish(1, rank0)
        assert complete.complete
        manifest = await asyncio.wait_for(watcher.next_manifest(MODEL, after=0), 5)

        assert (manifest.version, manifest.world_size) == (1, 2)
        assert [t.name for t in manifest.tensors] == [*rank0, *rank1]  # rank order
        assert [r.rank for r in manifest.regions] == [0, 1]
        assert_same(await pull_tensors(manifest), {**rank0, **rank1})


async def test_buffers_are_reused_after_retire_so_memory_stops_growing(zmq_ctx) -> None:
    from tests.support import broker_config, run_broker

    async with (
        run_broker(broker_config(retention=2)) as broker,
        publisher_on(broker, zmq_ctx) as publisher,
    ):
        set_bytes = plan(tensors(0), bucket_bytes=BUCKET_BYTES).total_bytes
        allocated: list[int] = []
        pointers: dict[int, set[int]] = {}
        for version in range(1, 8):
            await publisher.publish(version, tensors(version))
            pointers[version] = {b.data_ptr() for b in publisher.live[version].buffers}
            # Retire messages arrive asynchronously: wait for this version's one, if any.
            await until(lambda: len(publisher.live) <= 2)
            allocated.append(publisher.pool.allocated_bytes)

        assert allocated == [set_bytes, 2 * set_bytes] + [3 * set_bytes] * 5
        assert sorted(publisher.live) == [6, 7]
        # Versions from 4 on were packed into the buffers of versions retired before them.
        assert pointers[4] <= pointers[1] | pointers[2] | pointers[3]
        assert pointers[7] <= pointers[1] | pointers[2] | pointers[3]


@pytest.mark.parametrize("version", [1, 2])
async def test_a_stale_version_raises_and_leaves_the_published_one_intact(
    broker: RunningBroker, zmq_ctx, version: int
) -> None:
    original = tensors(2)
    async with (
        publisher_on(broker, zmq_ctx) as publisher,
        connect(broker.client_config(), role="subscriber", context=zmq_ctx) as watcher,
    ):
        await publisher.publish(2, original)
        live = publisher.live[2]
        allocated = publisher.pool.allocated_bytes

        with pytest.raises(BrokerError, match="already at version 2") as raised:
            await publisher.publish(version, tensors(99))
        assert raised.value.code == "stale_version"

        # Version 2 is still readable, from the same buffers, with its own bytes.
        assert publisher.live[2] is live
        assert sorted(publisher.live) == [2]
        await watcher.subscribe(MODEL)
        manifest = await asyncio.wait_for(watcher.next_manifest(MODEL, after=-1), 5)
        assert_same(await pull_tensors(manifest), original)
        # The failed attempt's buffers went back to the pool and serve the next version.
        await publisher.publish(3, tensors(3))
        assert publisher.pool.allocated_bytes == allocated * 2


async def test_publishing_nothing_is_a_caller_error(broker: RunningBroker, zmq_ctx) -> None:
    async with publisher_on(broker, zmq_ctx) as publisher:
        with pytest.raises(ValueError, match="nothing to publish"):
            await publisher.publish(1, {})


async def test_a_rank_outside_the_world_is_a_caller_error(broker: RunningBroker, zmq_ctx) -> None:
    async with connect(broker.client_config(), role="publisher", context=zmq_ctx) as client:
        with pytest.raises(ValueError, match="rank 2 must be in"):
            Publisher(client=client, sender=ZmqFrameSender(), model=MODEL, rank=2, world_size=2)
        with pytest.raises(ValueError, match="at least one sender"):
            Publisher(client=client, sender=[], model=MODEL)
        with pytest.raises(
            ValueError, match=r"world_size 2 needs job=\.\.\., one id shared by all"
        ):
            Publisher(client=client, sender=ZmqFrameSender(), model=MODEL, rank=0, world_size=2)


async def test_every_region_is_offered_on_every_sender(
    broker: RunningBroker, zmq_ctx, mooncake: MooncakeEngines
) -> None:
    original = tensors(1)
    senders = [mooncake.sender(), ZmqFrameSender()]
    async with publisher_on(broker, zmq_ctx, sender=senders) as publisher:
        result = await publisher.publish(1, original)
        for region in result.shard.regions:
            kinds = [type(locator) for locator in region.locators]
            assert kinds == [MooncakeLocator, FrameLocator]
        # A subscriber with only the fallback transport still reads it.
        manifest = Manifest.assemble(MODEL, 1, [result.shard])
        assert_same(await pull_tensors(manifest), original)


async def test_sync_publisher_publishes_from_plain_blocking_code(
    broker: RunningBroker, zmq_ctx
) -> None:
    config = broker.client_config()
    seen = threading.Event()

    def training_loop() -> list[bool]:
        with SyncPublisher(config, model=MODEL, sender=ZmqFrameSender()) as publisher:
            complete = [publisher.publish(step, tensors(step)).complete for step in (10, 20)]
            # Stay until the watcher has it: once the publisher leaves, its versions are
            # withdrawn (nobody can read them).
            assert seen.wait(5)
            return complete

    async with connect(config, role="subscriber", context=zmq_ctx) as watcher:
        await watcher.subscribe(MODEL)
        loop = asyncio.create_task(asyncio.to_thread(training_loop))
        manifest = await asyncio.wait_for(watcher.next_manifest(MODEL, after=10), 5)
        seen.set()
        assert await loop == [True, True]
    assert manifest.version == 20


async def test_unanswered_publish_keeps_its_buffers_until_a_retire(zmq_ctx):
    """No answer is not a refusal: the broker may have announced the version, so the bytes
    must stay readable (until a Retire), not go back to the pool for the next version."""
    import torch

    from publishers.publisher import Publisher
    from streamer.client import BrokerClient
    from streamer.config import ClientConfig
    from streamer.transport import ZmqFrameSender

    client = BrokerClient(
        ClientConfig(broker="tcp://127.0.0.1:9", request_timeout_s=0.2),
        role="publisher",
        context=zmq_ctx,
    )
    publisher = Publisher(client=client, sender=ZmqFrameSender(), model="m")
    try:
        with pytest.raises(TimeoutError, match="did not answer"):
            await publisher.publish(1, {"w": torch.ones(4)})
        assert 1 in publisher.live
    finally:
        publisher.close()
        client.close()
