"""The broker over real ZeroMQ sockets: handshake, bad peers, announcements, restarts."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import msgspec
import pytest
import zmq
import zmq.asyncio

from schemas.codec import encode
from schemas.manifest import BucketSpec, FrameLocator, RegionSpec, Shard, TensorSpec
from schemas.messages import (
    PROTOCOL_VERSION,
    AcquireLease,
    Error,
    Hello,
    Message,
    Subscribe,
    Subscribed,
    Welcome,
)
from streamer.client import connect
from streamer.errors import BrokerError, IncompatiblePeer, VersionUnavailable
from streamer.frames import decode_header
from tests.support import (
    RunningBroker,
    broker_config,
    client_config,
    eventually,
    run_broker,
    test_keys,
)

MODEL = "org/model"


def shard(name: str = "w", rank: int = 0) -> Shard:
    return Shard(
        regions=(
            RegionSpec(
                nbytes=256, locators=(FrameLocator(endpoint="tcp://x:1", key="k"),), rank=rank
            ),
        ),
        tensors=(TensorSpec(name=name, dtype="uint8", shape=(16,), region=0, offset=0, nbytes=16),),
        buckets=(BucketSpec(region=0, offset=0, nbytes=256, checksum="c" * 32),),
    )


@contextlib.asynccontextmanager
async def raw_peer(
    ctx: zmq.asyncio.Context, endpoint: str, peer_id: str | None = "raw-peer"
) -> AsyncIterator[zmq.asyncio.Socket]:
    """A bare DEALER: what a buggy or hostile peer can send, without our client's manners."""
    socket = ctx.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    if peer_id is not None:
        socket.setsockopt(zmq.ROUTING_ID, peer_id.encode())
    test_keys().apply(socket)  # an allowlisted key: hostile, but admitted
    socket.connect(endpoint)
    try:
        yield socket
    finally:
        socket.close(linger=0)


async def receive(socket: zmq.asyncio.Socket) -> Message:
    async with asyncio.timeout(5):
        frames = await socket.recv_multipart()
    assert len(frames) == 1, frames
    return decode_header(frames[0])


async def say_hello(socket: zmq.asyncio.Socket, peer_id: str = "raw-peer") -> Welcome:
    await socket.send(encode(Hello(peer_id=peer_id, role="observer")))
    welcome = await receive(socket)
    assert isinstance(welcome, Welcome), welcome
    return welcome


async def test_hello_is_answered_with_welcome(broker: RunningBroker, zmq_ctx) -> None:
    async with raw_peer(zmq_ctx, broker.endpoint) as socket:
        welcome = await say_hello(socket)
    assert welcome.protocol_version == PROTOCOL_VERSION
    assert welcome.heartbeat_interval_s == broker.config.heartbeat_interval_s
    assert welcome.broker_id

    async with connect(broker.client_config(), role="subscriber", context=zmq_ctx) as client:
        assert client.broker_id == welcome.broker_id


async def test_a_peer_with_another_protocol_version_is_told_incompatible(
    broker: RunningBroker, zmq_ctx
) -> None:
    async with raw_peer(zmq_ctx, broker.endpoint) as socket:
        hello = Hello(peer_id="raw-peer", role="subscriber", protocol_version=PROTOCOL_VERSION + 1)
        await socket.send(encode(hello))
        error = await receive(socket)
        assert isinstance(error, Error)
        assert error.code == "incompatible"
        assert f"protocol {PROTOCOL_VERSION}" in error.detail
        assert str(PROTOCOL_VERSION + 1) in error.detail

        # It was not admitted: its next request is from an unknown peer.
        await socket.send(encode(Subscribe(request_id=5, model=MODEL)))
        refused = await receive(socket)
        assert isinstance(refused, Error)
        assert (refused.code, refused.request_id) == ("unknown_peer", 5)


@pytest.mark.parametrize(
    "frames",
    [
        [b"\xc1"],
        [b"certainly not msgpack"],
        [encode({"kind": "hello"})],
        [encode({"kind": "no-such-kind", "peer_id": "x"})],
        [encode(Hello(peer_id="raw-peer", role="observer")), b"trailing junk"],
        [b"", b"", b""],
    ],
    ids=["invalid-byte", "text", "missing-fields", "unknown-kind", "extra-frame", "empty-frames"],
)
async def test_garbage_is_answered_with_a_protocol_error_and_the_broker_keeps_serving(
    broker: RunningBroker, zmq_ctx, frames: list[bytes]
) -> None:
    async with raw_peer(zmq_ctx, broker.endpoint) as socket:
        await socket.send_multipart(frames)
        error = await receive(socket)
        assert isinstance(error, Error)
        assert error.code == "protocol"
        assert error.detail

        await say_hello(socket)  # same connection, still served


async def test_a_peer_whose_routing_id_is_not_utf8_is_still_answered(
    broker: RunningBroker, zmq_ctx
) -> None:
    routing_id = b"\xff\xfe-peer"
    socket = zmq_ctx.socket(zmq.DEALER)
    socket.setsockopt(zmq.ROUTING_ID, routing_id)
    test_keys().apply(socket)
    socket.connect(broker.endpoint)
    try:
        await socket.send(encode(Hello(peer_id="x", role="observer")))
        assert isinstance(await receive(socket), Welcome)
        await socket.send(encode(Subscribe(request_id=8, model=MODEL)))
        subscribed = await receive(socket)
    finally:
        socket.close(linger=0)
    assert subscribed == Subscribed(request_id=8, model=MODEL, latest=None)


async def test_raw_tcp_garbage_on_the_broker_port_leaves_it_serving(
    broker: RunningBroker, zmq_ctx
) -> None:
    host, port = broker.endpoint.removeprefix("tcp://").rsplit(":", 1)
    for junk in (b"GET / HTTP/1.1\r\n\r\n", os.urandom(4096), b"\xff" + bytes(64)):
        _reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(junk)
        await writer.drain()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()

    async with raw_peer(zmq_ctx, broker.endpoint) as socket:
        await say_hello(socket)


async def test_a_peer_sending_a_broker_only_message_gets_a_protocol_error(
    broker: RunningBroker, zmq_ctx
) -> None:
    async with raw_peer(zmq_ctx, broker.endpoint) as socket:
        await say_hello(socket)
        await socket.send(encode(Subscribed(request_id=3, model=MODEL)))
        error = await receive(socket)
    assert isinstance(error, Error)
    assert error.code == "protocol"
    assert "Subscribed" in error.detail
    assert error.request_id == 3


async def test_a_request_before_hello_gets_unknown_peer_with_its_request_id(
    broker: RunningBroker, zmq_ctx
) -> None:
    async with raw_peer(zmq_ctx, broker.endpoint) as socket:
        await socket.send(encode(AcquireLease(request_id=42, model=MODEL, version=1)))
        error = await receive(socket)
    assert isinstance(error, Error)
    assert (error.code, error.request_id) == ("unknown_peer", 42)
    assert "hello" in error.detail


async def test_a_client_the_broker_forgot_says_hello_again_transparently(zmq_ctx) -> None:
    # The broker forgets peers silent for 0.3 s; the client heartbeats only every 30 s.
    async with run_broker(broker_config(peer_timeout_s=0.3)) as broker:
        config = broker.client_config(heartbeat_interval_s=30.0)
        async with (
            connect(config, role="publisher", context=zmq_ctx) as publisher,
            connect(config, role="subscriber", context=zmq_ctx) as subscriber,
        ):
            await publisher.publish(MODEL, 1, 0, 1, shard())
            assert await subscriber.subscribe(MODEL) == 1
            await eventually(lambda: _state_is(broker, subscriber.peer_id, "gone"))

            # Each request is refused as unknown_peer, then re-sent after a new Hello.
            assert (await publisher.publish(MODEL, 2, 0, 1, shard())).complete
            assert await subscriber.subscribe("other") is None
            # The re-hello also re-subscribed the subscriber to MODEL: it gets the latest.
            manifest = await asyncio.wait_for(subscriber.next_manifest(MODEL, after=1), 5)
            assert manifest.version == 2
            assert await _state_is(broker, subscriber.peer_id, "idle")


async def _state_is(broker: RunningBroker, peer_id: str, state: str) -> bool:
    """Whether the HTTP endpoint shows `peer_id`'s row for MODEL in `state`."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(broker.url + "/v1/subscribers") as response,
    ):
        rows = (await response.json())["subscribers"]
    return [
        row["state"] for row in rows if row["peer_id"] == peer_id and row["model"] == MODEL
    ] == [state]


async def test_a_late_joiner_gets_the_latest_manifest_at_once(
    broker: RunningBroker, zmq_ctx
) -> None:
    config = broker.client_config()
    async with connect(config, role="publisher", context=zmq_ctx) as publisher:
        for version in (1, 2, 3):
            await publisher.publish(MODEL, version, 0, 1, shard())

        async with connect(config, role="subscriber", context=zmq_ctx) as late:
            assert await late.subscribe(MODEL) == 3
            manifest = await asyncio.wait_for(late.next_manifest(MODEL, after=-1), 5)
    assert manifest.version == 3
    assert manifest.tensors == shard().tensors


async def test_subscribers_receive_every_new_version_and_only_of_their_model(
    broker: RunningBroker, zmq_ctx
) -> None:
    config = broker.client_config()
    async with (
        connect(config, role="publisher", context=zmq_ctx) as publisher,
        connect(config, role="subscriber", context=zmq_ctx) as subscriber,
    ):
        assert await subscriber.subscribe(MODEL) is None
        for version in (1, 2):
            await publisher.publish(MODEL, version, 0, 1, shard())
            manifest = await asyncio.wait_for(subscriber.next_manifest(MODEL, after=version - 1), 5)
            assert manifest.version == version
        await publisher.publish("another-model", 9, 0, 1, shard())
        await publisher.publish(MODEL, 3, 0, 1, shard())
        manifest = await asyncio.wait_for(subscriber.next_manifest(MODEL, after=2), 5)
        assert manifest.version == 3
        assert subscriber.latest_manifest("another-model") is None


async def test_a_stale_publish_is_refused_with_a_typed_error(
    broker: RunningBroker, zmq_ctx
) -> None:
    async with connect(broker.client_config(), role="publisher", context=zmq_ctx) as publisher:
        await publisher.publish(MODEL, 2, 0, 1, shard())
        with pytest.raises(BrokerError, match="already at version 2") as raised:
            await publisher.publish(MODEL, 1, 0, 1, shard())
    assert raised.value.code == "stale_version"


async def test_retired_versions_reach_their_publisher_and_refuse_leases(zmq_ctx) -> None:
    async with run_broker(broker_config(retention=1)) as broker:
        config = broker.client_config()
        async with (
            connect(config, role="publisher", context=zmq_ctx) as publisher,
            connect(config, role="subscriber", context=zmq_ctx) as subscriber,
        ):
            await publisher.publish(MODEL, 1, 0, 1, shard())
            assert await subscriber.acquire_lease(MODEL, 1) == broker.config.lease_ttl_s
            await publisher.publish(MODEL, 2, 0, 1, shard())
            # A Retire for version 1, had the broker sent one while it handled version 2, is
            # ahead of the reply to the publisher's next request on the same connection.
            assert await publisher.subscribe("another/model") is None
            assert publisher.retired.empty()  # leased: kept readable

            await subscriber.release_lease(MODEL, 1)
            retire = await asyncio.wait_for(publisher.retired.get(), 5)
            assert (retire.model, retire.version) == (MODEL, 1)
            with pytest.raises(VersionUnavailable, match="no longer readable"):
                await subscriber.acquire_lease(MODEL, 1)


async def test_wait_applied_returns_once_enough_subscribers_applied(
    broker: RunningBroker, zmq_ctx
) -> None:
    config = broker.client_config()
    async with (
        connect(config, role="publisher", context=zmq_ctx) as publisher,
        connect(config, role="subscriber", context=zmq_ctx) as first,
        connect(config, role="subscriber", context=zmq_ctx) as second,
    ):
        await publisher.publish(MODEL, 1, 0, 1, shard())
        waiting = asyncio.create_task(publisher.wait_applied(MODEL, 1, 2))
        await first.report_applied(MODEL, 1, pull_s=0.1, pause_s=0.01, nbytes=256)
        await eventually(lambda: _at_latest(broker, 1))
        # The broker answers a waiter while it handles the Applied that completes it: an
        # answer after one of two would be ahead of the reply to the publisher's next request.
        assert await publisher.subscribe("another/model") is None
        assert not waiting.done()  # one of two
        await second.report_applied(MODEL, 2, pull_s=0.1, pause_s=0.01, nbytes=256)
        assert await asyncio.wait_for(waiting, 5) == 2


async def _at_latest(broker: RunningBroker, count: int) -> bool:
    """Whether the broker counts `count` subscribers at MODEL's latest version."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{broker.url}/v1/models/{MODEL}") as response,
    ):
        at_latest: int = (await response.json())["subscribers_at_latest"]
    return at_latest == count


async def test_a_client_facing_a_broker_of_another_protocol_fails_to_connect(
    zmq_ctx, endpoint: str
) -> None:
    # A real ROUTER playing a newer broker: it answers every Hello as ours answers a mismatch.
    router = zmq_ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(endpoint)

    async def newer_broker() -> Hello:
        identity, data = await router.recv_multipart()
        error = Error(code="incompatible", detail="broker speaks protocol 2, peer 1")
        await router.send_multipart([identity, encode(error)])
        hello = decode_header(data)
        assert isinstance(hello, Hello)
        return hello

    answering = asyncio.create_task(newer_broker())
    try:
        with pytest.raises(IncompatiblePeer, match="protocol 2"):
            async with connect(
                client_config(endpoint, key=None), role="subscriber", context=zmq_ctx
            ):
                pytest.fail("connected to an incompatible broker")
        hello = await answering
    finally:
        answering.cancel()
        router.close(linger=0)
    assert hello.protocol_version == PROTOCOL_VERSION


async def test_a_restarted_broker_restores_versions_and_clients_resubscribe(
    zmq_ctx, tmp_path: Path
) -> None:
    config = broker_config(state_dir=str(tmp_path))
    async with contextlib.AsyncExitStack() as first_broker:
        first = await first_broker.enter_async_context(run_broker(config))
        config = msgspec.structs.replace(config, endpoint=first.endpoint)
        client_config = first.client_config()
        async with (
            connect(client_config, role="publisher", context=zmq_ctx) as publisher,
            connect(client_config, role="subscriber", context=zmq_ctx) as subscriber,
        ):
            await subscriber.subscribe(MODEL)
            for version in (1, 2):
                await publisher.publish(MODEL, version, 0, 1, shard())
            before = await asyncio.wait_for(subscriber.next_manifest(MODEL, after=1), 5)
            first_id = subscriber.broker_id

            await first_broker.aclose()  # the broker stops; both clients stay connected
            assert (tmp_path / "registry.msgpack").exists()

            # Same endpoint, same state_dir: a new broker (new broker_id) that remembers.
            async with run_broker(config):
                async with connect(client_config, role="subscriber", context=zmq_ctx) as fresh:
                    assert await fresh.subscribe(MODEL) == 2
                    restored = await asyncio.wait_for(fresh.next_manifest(MODEL, after=-1), 5)
                    assert restored == before
                    assert fresh.broker_id != first_id

                with pytest.raises(BrokerError, match="already at version 2"):
                    await publisher.publish(MODEL, 2, 0, 1, shard())
                assert (await publisher.publish(MODEL, 3, 0, 1, shard())).complete
                # The subscriber connected across the restart was re-subscribed: it hears of 3.
                manifest = await asyncio.wait_for(subscriber.next_manifest(MODEL, after=2), 5)
                assert manifest.version == 3
                assert subscriber.broker_id == fresh.broker_id
