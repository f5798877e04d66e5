"""Snapshot publishes against a real broker: the trainer waits for the snapshot only; the host
copy and the PublishShard run in the background, and the next publish waits for them (CPU
tensors here, where `gpu_snapshot` runs the same code without streams; CUDA under `gpu`)."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from publishers.publisher import BackgroundPublishFailed, Publisher, SyncPublisher
from streamer.client import BrokerClient, connect
from streamer.config import ClientConfig
from streamer.errors import BrokerError
from streamer.transport import ZmqFrameSender
from tests.publishers.test_publisher import MODEL, assert_same, publisher_on, pull_tensors, tensors
from tests.support import RunningBroker

HAS_CUDA = torch.cuda.is_available()
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")],
    ),
]


@pytest.mark.parametrize("device", DEVICES)
async def test_a_snapshot_publish_returns_before_the_host_copy_and_keeps_the_old_bytes(
    broker: RunningBroker, zmq_ctx, device: str
) -> None:
    original = tensors(1)
    trainer = {name: t.to(device, copy=True) for name, t in original.items()}
    async with (
        publisher_on(broker, zmq_ctx) as publisher,
        connect(broker.client_config(), role="subscriber", context=zmq_ctx) as watcher,
    ):
        await watcher.subscribe(MODEL)
        pending = await publisher.publish(1, trainer, snapshot=True)
        # Returned after the snapshot alone: the host copy and the shard are still to come.
        assert not pending.task.done()
        assert 1 not in publisher.live
        for tensor in trainer.values():
            tensor.mul_(-2.0).add_(3.0)  # the next optimizer step, right away
        result = await asyncio.wait_for(pending.readable(), 5)
        assert 1 in publisher.live
        assert result.stall_seconds == pending.stall_seconds <= result.readable_seconds
        assert publisher._device_buffer is not None
        assert publisher._device_buffer.device.type == device
        manifest = await asyncio.wait_for(watcher.next_manifest(MODEL, after=-1), 5)
        assert_same(await pull_tensors(manifest), original)


async def test_the_next_publish_waits_for_the_previous_background_part(
    broker: RunningBroker, zmq_ctx
) -> None:
    async with (
        publisher_on(broker, zmq_ctx) as publisher,
        connect(broker.client_config(), role="subscriber", context=zmq_ctx) as watcher,
    ):
        await watcher.subscribe(MODEL)
        first = await publisher.publish(1, tensors(1), snapshot=True)
        buffer = publisher._device_buffer
        second = await publisher.publish(2, tensors(2), snapshot=True)
        assert first.task.done()  # it waited before snapshotting
        assert 1 in publisher.live
        assert publisher._device_buffer is buffer  # one snapshot buffer, reused
        await asyncio.wait_for(publisher.flush(), 5)
        assert second.task.done()
        assert 2 in publisher.live
        manifest = await asyncio.wait_for(watcher.next_manifest(MODEL, after=1), 5)
        assert manifest.version == 2
        assert_same(await pull_tensors(manifest), tensors(2))


async def test_a_failed_background_part_is_raised_by_the_next_publish_once(
    broker: RunningBroker, zmq_ctx
) -> None:
    async with publisher_on(broker, zmq_ctx) as publisher:
        await publisher.publish(5, tensors(5))
        await publisher.publish(3, tensors(3), snapshot=True)  # stale: the broker refuses it
        with pytest.raises(
            BackgroundPublishFailed, match=r"version 3 .* was snapshotted"
        ) as raised:
            await publisher.publish(6, tensors(6))
        assert isinstance(raised.value.__cause__, BrokerError)
        assert raised.value.__cause__.code == "stale_version"
        assert sorted(publisher.live) == [5]  # the refused version's buffers went back
        result = await publisher.publish(6, tensors(6))
        assert result.stall_seconds == result.readable_seconds == result.seconds
        # Once `readable` handed the caller the error, the next publish does not repeat it.
        pending = await publisher.publish(4, tensors(4), snapshot=True)
        with pytest.raises(BrokerError, match="stale"):
            await pending.readable()
        await publisher.publish(7, tensors(7), snapshot=True)
        await asyncio.wait_for(publisher.flush(), 5)
        assert 7 in publisher.live  # (5 may be retired by now: the broker keeps two)
        assert not {3, 4} & set(publisher.live)


async def test_a_stuck_background_part_makes_the_next_publish_fail_within_its_bound(
    zmq_ctx,
) -> None:
    # Nobody answers at this address: the PublishShard waits out its request timeout (30 s).
    client = BrokerClient(
        ClientConfig(broker="tcp://127.0.0.1:9", request_timeout_s=30.0),
        role="publisher",
        context=zmq_ctx,
    )
    publisher = Publisher(
        client=client, sender=ZmqFrameSender(), model="m", background_timeout_s=0.3
    )
    try:
        await publisher.publish(1, {"w": torch.ones(4)}, snapshot=True)
        with pytest.raises(BackgroundPublishFailed, match="did not finish within"):
            await asyncio.wait_for(publisher.publish(2, {"w": torch.ones(4)}), 5)
        await asyncio.wait_for(publisher.settle(), 5)  # cancels it after its bound
    finally:
        publisher.close()
        client.close()


async def test_a_broker_that_does_not_answer_is_a_failure_of_that_version_not_a_stuck_one(
    zmq_ctx,
) -> None:
    # The PublishShard's own TimeoutError (no answer within request_timeout_s) is reported once,
    # as that version's failure; it does not read as the background bound running out.
    client = BrokerClient(
        ClientConfig(broker="tcp://127.0.0.1:9", request_timeout_s=0.2),
        role="publisher",
        context=zmq_ctx,
    )
    publisher = Publisher(
        client=client, sender=ZmqFrameSender(), model="m", background_timeout_s=30.0
    )
    try:
        await publisher.publish(1, {"w": torch.ones(4)}, snapshot=True)
        with pytest.raises(
            BackgroundPublishFailed, match="snapshotted but not published"
        ) as raised:
            await asyncio.wait_for(publisher.publish(2, {"w": torch.ones(4)}), 10)
        assert isinstance(raised.value.__cause__, TimeoutError)
        assert 1 in publisher.live  # unanswered: it may be announced, its bytes stay readable
        with pytest.raises(TimeoutError, match="did not answer"):
            await asyncio.wait_for(publisher.publish(2, {"w": torch.ones(4)}), 10)
    finally:
        publisher.close()
        client.close()


async def test_sync_publisher_snapshot_publishes_and_flushes_from_blocking_code(
    broker: RunningBroker, zmq_ctx
) -> None:
    config = broker.client_config()
    seen = threading.Event()
    trainer = {name: t.clone() for name, t in tensors(4).items()}

    def training_loop() -> float:
        with SyncPublisher(config, model=MODEL, sender=ZmqFrameSender()) as publisher:
            pending = publisher.publish_snapshot(4, trainer)
            for tensor in trainer.values():
                tensor.zero_()  # the next step, before the version is readable
            publisher.flush(timeout_s=10)
            assert seen.wait(5)  # stay until the watcher read it
            return pending.stall_seconds

    async with connect(config, role="subscriber", context=zmq_ctx) as watcher:
        await watcher.subscribe(MODEL)
        loop = asyncio.create_task(asyncio.to_thread(training_loop))
        manifest = await asyncio.wait_for(watcher.next_manifest(MODEL, after=-1), 10)
        assert_same(await pull_tensors(manifest), tensors(4))
        seen.set()
        assert await loop > 0
