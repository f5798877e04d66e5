"""A Subscriber end to end in one process: real broker, Publisher, transports and tensors.

Every test runs once over mooncake (tcp on loopback) and once over the ZeroMQ fallback.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import torch
import zmq.asyncio

from publishers.publisher import Publisher, open_publisher
from publishers.sources import synthetic_llama
from schemas.manifest import Manifest
from streamer.client import connect
from streamer.errors import TransportError
from streamer.transport import BulkReceiver, BulkSender, ZmqFrameReceiver, ZmqFrameSender
from subscribers.pull import PullReport
from subscribers.staging import Staging
from subscribers.subscriber import PullConfig, Subscriber
from subscribers.swap import SwapError, SwapReport, TorchSwapper
from tests.support import MooncakeEngines, RunningBroker, eventually, until

MODEL = "org/model"
MODEL_BYTES = 512 << 10
BUCKET_BYTES = 32 << 10
ZMQ_TIMEOUT_S = 0.5
FAST = PullConfig(max_attempts=2, retry_backoff_s=0.01, progress_interval_s=0.05)


def weights(version: int) -> dict[str, torch.Tensor]:
    return synthetic_llama(MODEL_BYTES, version=version, seed=7)


@dataclass
class Transport:
    name: str
    new_sender: Callable[..., BulkSender]
    """`new_sender(disposable=True)` for a sender whose reads the test makes fail."""
    new_receiver: Callable[[], BulkReceiver]


@pytest.fixture(params=["mooncake", "zmq"])
def transport(request: pytest.FixtureRequest) -> Iterator[Transport]:
    if request.param == "mooncake":
        mooncake: MooncakeEngines = request.getfixturevalue("mooncake")
        yield Transport("mooncake", mooncake.sender, mooncake.receiver)
        return
    receivers: list[ZmqFrameReceiver] = []

    def new_receiver() -> ZmqFrameReceiver:
        receivers.append(ZmqFrameReceiver(timeout_s=ZMQ_TIMEOUT_S))
        return receivers[-1]

    yield Transport("zmq", lambda disposable=False: ZmqFrameSender(), new_receiver)
    for receiver in receivers:
        receiver.close()


@dataclass
class Engine:
    """An inference engine stand-in: named tensors, swapped in place by a TorchSwapper."""

    tensors: dict[str, torch.Tensor] = field(
        default_factory=lambda: {n: torch.zeros_like(t) for n, t in weights(0).items()}
    )
    applied: list[int] = field(default_factory=list)
    reports: list[PullReport] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.pointers = {name: t.data_ptr() for name, t in self.tensors.items()}
        self.swapper = TorchSwapper(self.tensors)

    async def on_applied(self, manifest: Manifest, pull: PullReport, swap: SwapReport) -> None:
        self.applied.append(manifest.version)
        self.reports.append(pull)

    def holds(self, version: int) -> bool:
        """Bit for bit the weights of `version`, in the original storage."""
        expected = weights(version)
        return all(
            tensor.data_ptr() == self.pointers[name]
            and torch.equal(tensor.view(torch.uint8), expected[name].view(torch.uint8))
            for name, tensor in self.tensors.items()
        )


@contextlib.asynccontextmanager
async def subscriber_on(
    broker: RunningBroker,
    zmq_ctx: zmq.asyncio.Context,
    transport: Transport,
    engine: Engine,
    config: PullConfig = FAST,
) -> AsyncIterator[Subscriber]:
    receiver = transport.new_receiver()
    async with connect(broker.client_config(), role="subscriber", context=zmq_ctx) as client:
        subscriber = Subscriber(
            client=client,
            receivers=[receiver],
            swapper=engine.swapper,
            model=MODEL,
            config=config,
            staging=Staging(receivers=[receiver], pin_memory=False),
            on_applied=engine.on_applied,
        )
        try:
            yield subscriber
        finally:
            subscriber.close()


@contextlib.asynccontextmanager
async def running(subscriber: Subscriber) -> AsyncIterator[None]:
    """`subscriber.run()` in a task for the block; its own errors fail the test."""
    task = asyncio.create_task(subscriber.run())
    try:
        yield
    finally:
        task.cancel()
        [outcome] = await asyncio.gather(task, return_exceptions=True)
        if isinstance(outcome, Exception):
            raise outcome


@contextlib.asynccontextmanager
async def publisher_on(
    broker: RunningBroker,
    zmq_ctx: zmq.asyncio.Context,
    transport: Transport,
    *,
    disposable: bool = False,
) -> AsyncIterator[Publisher]:
    async with open_publisher(
        broker.client_config(),
        model=MODEL,
        sender=transport.new_sender(disposable=disposable),
        bucket_bytes=BUCKET_BYTES,
        context=zmq_ctx,
    ) as publisher:
        yield publisher


async def applied(publisher: Publisher, version: int) -> None:
    async with asyncio.timeout(10):
        await publisher.wait_applied(version, 1)


async def subscriber_row(broker: RunningBroker) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(broker.url + "/v1/subscribers") as response,
    ):
        [row] = (await response.json())["subscribers"]
    only: dict[str, Any] = row
    return only


async def version_page(broker: RunningBroker, version: int) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{broker.url}/v1/models/{MODEL}/versions/{version}") as response,
    ):
        page: dict[str, Any] = await response.json()
    return page


async def last_error(broker: RunningBroker, contains: str) -> str | None:
    error: str | None = (await subscriber_row(broker))["last_error"]
    return error if error and contains in error else None


async def test_subscriber_applies_every_version_bit_exact_in_place(
    broker: RunningBroker, zmq_ctx, transport: Transport
) -> None:
    engine = Engine()
    async with (
        publisher_on(broker, zmq_ctx, transport) as publisher,
        subscriber_on(broker, zmq_ctx, transport, engine) as subscriber,
        running(subscriber),
    ):
        for version in (1, 2, 3):
            await publisher.publish(version, weights(version))
            await applied(publisher, version)
            assert engine.holds(version)
            assert subscriber.applied == version
        row = await subscriber_row(broker)
    assert engine.applied == [1, 2, 3]
    assert engine.swapper.gate.version == 3
    assert (row["applied_version"], row["lag"], row["last_error"]) == (3, 0, None)
    assert subscriber.failures == 0


async def test_subscriber_skips_to_latest_when_behind(
    broker: RunningBroker, zmq_ctx, transport: Transport
) -> None:
    engine = Engine()
    async with publisher_on(broker, zmq_ctx, transport) as publisher:
        for version in (1, 2, 3):
            await publisher.publish(version, weights(version))
        async with (
            subscriber_on(broker, zmq_ctx, transport, engine) as subscriber,
            running(subscriber),
        ):
            await applied(publisher, 3)
    assert engine.applied == [3]
    assert engine.holds(3)


async def test_a_corrupted_bucket_is_reported_never_applied_and_the_next_version_applies(
    broker: RunningBroker, zmq_ctx, transport: Transport
) -> None:
    engine = Engine()
    async with (
        publisher_on(broker, zmq_ctx, transport) as publisher,
        subscriber_on(broker, zmq_ctx, transport, engine) as subscriber,
    ):
        async with running(subscriber):
            await publisher.publish(1, weights(1))
            await applied(publisher, 1)

        # Published while the subscriber is away, then the publisher's memory changes.
        await publisher.publish(2, weights(2))
        publisher.live[2].buffers[0][BUCKET_BYTES + 5] ^= 1

        async with running(subscriber):
            error = await eventually(lambda: last_error(broker, "ChecksumMismatch"))
            assert "version 2" in error
            await until(lambda: subscriber.failures == FAST.max_attempts)
            assert engine.holds(1)
            assert subscriber.applied == 1

            await publisher.publish(3, weights(3))
            await applied(publisher, 3)
    assert engine.applied == [1, 3]
    assert engine.holds(3)


async def test_a_manifest_that_does_not_fit_is_never_applied_nor_retried(
    broker: RunningBroker, zmq_ctx, transport: Transport
) -> None:
    engine = Engine()
    async with (
        publisher_on(broker, zmq_ctx, transport) as publisher,
        subscriber_on(broker, zmq_ctx, transport, engine) as subscriber,
    ):
        # apply_latest() returns only once every attempt it makes is over, so the count of
        # failures afterwards is final: no sleep has to wait for retries that must not come.
        client = subscriber.client
        await client.subscribe(MODEL)
        await publisher.publish(1, weights(1))
        await until(lambda: _announced(subscriber, 1))
        assert await subscriber.apply_latest() == 1

        misfit = weights(2)
        misfit["model.norm.weight"] = torch.zeros(3, dtype=torch.bfloat16)
        await publisher.publish(2, misfit)
        await until(lambda: _announced(subscriber, 2))
        # apply_latest raises the refusal (the engine stays on 1) rather than return quietly.
        with pytest.raises(SwapError, match=r"model.norm.weight: shape \(3,\)"):
            await subscriber.apply_latest()
        assert subscriber.applied == 1
        assert subscriber.failures == 1  # FAST allows 2 attempts: a retry would make it 2
        error = await eventually(lambda: last_error(broker, "SwapError"))
        assert "model.norm.weight: shape (3,)" in error
        assert (await version_page(broker, 2))["leases"] == 0  # not even a pull was started
        assert engine.holds(1)

        await publisher.publish(3, weights(3))
        await until(lambda: _announced(subscriber, 3))
        assert await subscriber.apply_latest() == 3
    assert engine.applied == [1, 3]
    assert engine.holds(3)
    assert subscriber.failures == 1


def _announced(subscriber: Subscriber, version: int) -> bool:
    latest = subscriber.client.latest_manifest(MODEL)
    return latest is not None and latest.version == version


async def test_a_dead_publisher_leaves_the_engine_on_its_version_until_a_new_one_publishes(
    broker: RunningBroker, zmq_ctx, transport: Transport
) -> None:
    engine = Engine()
    async with (
        subscriber_on(broker, zmq_ctx, transport, engine) as subscriber,
        publisher_on(broker, zmq_ctx, transport, disposable=True) as first,
    ):
        async with running(subscriber):
            await first.publish(1, weights(1))
            await applied(first, 1)
        await first.publish(2, weights(2))
        for sender in first.senders:
            sender.close()  # the trainer's bulk path dies; its broker client lingers

        async with running(subscriber):
            error = await eventually(lambda: last_error(broker, TransportError.__name__))
            assert "version 2" in error
            await until(lambda: subscriber.failures == FAST.max_attempts)
            assert engine.holds(1)

            # A restarted trainer publishes the next version from a new process' memory.
            async with publisher_on(broker, zmq_ctx, transport) as second:
                await second.publish(3, weights(3))
                await applied(second, 3)
    assert engine.applied == [1, 3]
    assert engine.holds(3)


async def test_cancelling_a_pull_in_progress_leaves_the_engine_untouched(
    broker: RunningBroker, zmq_ctx, transport: Transport
) -> None:
    engine = Engine()
    slow = PullConfig(max_bytes_per_s=1e6, progress_interval_s=0.02, max_attempts=1)
    async with (
        publisher_on(broker, zmq_ctx, transport) as publisher,
        subscriber_on(broker, zmq_ctx, transport, engine, config=slow) as subscriber,
    ):
        client = subscriber.client
        await client.subscribe(MODEL)
        await publisher.publish(1, weights(1))
        await subscriber.apply(await asyncio.wait_for(client.next_manifest(MODEL, after=0), 5))
        await publisher.publish(2, weights(2))
        manifest = await asyncio.wait_for(client.next_manifest(MODEL, after=1), 5)

        pulling = asyncio.create_task(subscriber.apply(manifest))
        row = await eventually(lambda: _pulling(broker))
        assert 0 < row["progress"] < 1
        pulling.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pulling

        assert engine.holds(1)
        assert (subscriber.applied, engine.swapper.gate.version) == (1, 1)
        await eventually(lambda: _leases(broker, 2, 0))  # the lease was given back

        await subscriber.apply(manifest)  # and the version can still be applied later
    assert engine.holds(2)
    assert engine.applied == [1, 2]


async def test_a_throttled_pull_keeps_to_its_rate_and_reports_progress(
    broker: RunningBroker, zmq_ctx, transport: Transport
) -> None:
    engine = Engine()
    rate = 1e6
    slow = PullConfig(max_bytes_per_s=rate, progress_interval_s=0.02)
    seen: list[dict[str, Any]] = []
    async with (
        publisher_on(broker, zmq_ctx, transport) as publisher,
        subscriber_on(broker, zmq_ctx, transport, engine, config=slow) as subscriber,
        running(subscriber),
    ):
        await publisher.publish(1, weights(1))
        done = asyncio.create_task(applied(publisher, 1))
        while not done.done():
            row = await subscriber_row(broker)
            if row["state"] == "pulling":
                seen.append(row)
            await asyncio.sleep(0.02)
        await done

    [report] = engine.reports
    assert engine.holds(1)
    assert len(seen) >= 2, "progress should have been visible more than once"
    progress = [row["progress"] for row in seen]
    assert progress == sorted(progress)
    assert all(0 < p <= 1 for p in progress)
    assert all(row["pulling_version"] == 1 for row in seen)
    # The first bucket goes at once; the rest wait their turn. A lower bound only: a loaded
    # machine makes the pull slower, never faster (how fast it can go is for the benchmarks).
    assert report.seconds >= (report.nbytes - BUCKET_BYTES) / rate * 0.9


async def _pulling(broker: RunningBroker) -> dict[str, Any] | None:
    row = await subscriber_row(broker)
    return row if row["state"] == "pulling" and row["pulling_version"] == 2 else None


async def _leases(broker: RunningBroker, version: int, count: int) -> bool:
    leases: int = (await version_page(broker, version))["leases"]
    return leases == count
