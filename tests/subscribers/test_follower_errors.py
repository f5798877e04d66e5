"""The follower never dies silently: every failure is reported, and what the policy does not
cover stops the loop with a clear, reported reason; `apply_latest` raises instead of quietly
returning the old version."""

from __future__ import annotations

import asyncio

import pytest

from streamer.errors import TransportError
from subscribers.subscriber import FollowerStopped
from subscribers.swap import TorchSwapper
from tests.subscribers.test_subscriber import (
    Engine,
    applied,
    last_error,
    publisher_on,
    subscriber_on,
    transport,
    weights,
)
from tests.support import eventually

__all__ = ["transport"]  # the fixture, shared with test_subscriber


class _BrokenStage(TorchSwapper):
    """An engine whose stage hits a bug (an error no seam translates) on version 2."""

    async def stage(self, manifest, staging) -> None:
        if manifest.version == 2:
            raise KeyError("layer.99 (a bug in the engine's stage)")


async def test_an_unexpected_error_is_reported_and_stops_the_loop_with_its_reason(
    broker, zmq_ctx, transport
) -> None:
    engine = Engine()
    engine.swapper = _BrokenStage(engine.tensors)
    async with (
        publisher_on(broker, zmq_ctx, transport) as publisher,
        subscriber_on(broker, zmq_ctx, transport, engine) as subscriber,
    ):
        following = asyncio.create_task(subscriber.run())
        await publisher.publish(1, weights(1))
        await applied(publisher, 1)
        await publisher.publish(2, weights(2))
        with pytest.raises(FollowerStopped, match="KeyError") as stopped:
            async with asyncio.timeout(10):
                await following
        assert "version 2" in str(stopped.value)
        assert "stays on version 1" in str(stopped.value)
        reported = await eventually(lambda: last_error(broker, "KeyError"))
        assert "version 2" in reported
    assert engine.holds(1)


async def test_apply_latest_raises_the_error_instead_of_returning_the_old_version(
    broker, zmq_ctx, transport
) -> None:
    engine = Engine()
    async with (
        subscriber_on(broker, zmq_ctx, transport, engine) as subscriber,
        publisher_on(broker, zmq_ctx, transport, disposable=True) as publisher,
    ):
        client = subscriber.client
        await client.subscribe("org/model")
        await publisher.publish(1, weights(1))
        await eventually(lambda: _announced(client, 1))
        assert await subscriber.apply_latest() == 1
        await publisher.publish(2, weights(2))
        await eventually(lambda: _announced(client, 2))
        for sender in publisher.senders:
            sender.close()  # version 2 cannot be read any more
        with pytest.raises(TransportError):
            await subscriber.apply_latest()
    assert engine.holds(1)


async def _announced(client, version: int) -> bool:
    latest = client.latest_manifest("org/model")
    return latest is not None and latest.version == version
