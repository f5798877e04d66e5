"""Protocol 2 over real sockets: announcements name the manifest by digest, peers fetch it once.

A raw DEALER sees the bytes on the wire (Announced stays small whatever the manifest; a
protocol-1 peer still gets the whole Announce); our client fetches once, caches by digest,
and refuses a body that does not hash to the digest (a raw ROUTER plays a lying broker).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator

import aiohttp
import pytest
import zmq
import zmq.asyncio

from schemas.codec import decode_manifest, encode
from schemas.manifest import BucketSpec, FrameLocator, Manifest, RegionSpec, Shard, TensorSpec
from schemas.messages import (
    MIN_PROTOCOL_VERSION,
    Announce,
    Announced,
    Error,
    FetchManifest,
    Heartbeat,
    Hello,
    ManifestBody,
    Message,
    Subscribe,
    Subscribed,
    Welcome,
)
from streamer.broker import Broker
from streamer.client import ManifestMismatch, connect
from streamer.errors import VersionUnavailable
from streamer.frames import decode_header
from streamer.metrics import MANIFEST_FETCH_REFUSED_TOTAL, MANIFEST_FETCHES_TOTAL
from streamer.registry import Limits
from tests.support import (
    RunningBroker,
    broker_config,
    client_config,
    eventually,
    run_broker,
    test_keys,
    until,
)

SMALL = "org/small"
LARGE = "org/large"


def shard(num_tensors: int = 1) -> Shard:
    """One region of `num_tensors` 16-byte tensors, 256 bytes apart, in one bucket."""
    nbytes = 256 * num_tensors
    return Shard(
        regions=(
            RegionSpec(nbytes=nbytes, locators=(FrameLocator(endpoint="tcp://x:1", key="k"),)),
        ),
        tensors=tuple(
            TensorSpec(
                name=f"layers.{i}.weight",
                dtype="uint8",
                shape=(16,),
                region=0,
                offset=256 * i,
                nbytes=16,
            )
            for i in range(num_tensors)
        ),
        buckets=(BucketSpec(region=0, offset=0, nbytes=nbytes, checksum="c" * 32),),
    )


@contextlib.asynccontextmanager
async def raw_peer(
    ctx: zmq.asyncio.Context,
    endpoint: str,
    peer_id: str,
    *,
    protocol: int,
    welcomes: list[Welcome] | None = None,
) -> AsyncIterator[zmq.asyncio.Socket]:
    """A bare DEALER speaking `protocol`, admitted with the test key; Hello said (its
    Welcome appended to `welcomes`)."""
    socket = ctx.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.ROUTING_ID, peer_id.encode())
    test_keys().apply(socket)
    socket.connect(endpoint)
    try:
        await socket.send(
            encode(Hello(peer_id=peer_id, role="subscriber", protocol_version=protocol))
        )
        welcome, _ = await receive(socket)
        assert isinstance(welcome, Welcome), welcome
        if welcomes is not None:
            welcomes.append(welcome)
        yield socket
    finally:
        socket.close(linger=0)


async def receive(socket: zmq.asyncio.Socket) -> tuple[Message, int]:
    """The next message and its size on the wire."""
    async with asyncio.timeout(10):
        frames = await socket.recv_multipart()
    assert len(frames) == 1, frames
    return decode_header(frames[0]), len(frames[0])


async def subscribe_raw(socket: zmq.asyncio.Socket, model: str) -> tuple[Message, int]:
    """Subscribe; return the announcement that follows Subscribed, and its size."""
    await socket.send(encode(Subscribe(request_id=1, model=model)))
    subscribed, _ = await receive(socket)
    assert isinstance(subscribed, Subscribed), subscribed
    assert subscribed.latest == 1
    return await receive(socket)


@contextlib.asynccontextmanager
async def publishing(
    broker: RunningBroker, zmq_ctx, *models: tuple[str, int], heartbeat_s: float = 0.2
) -> AsyncIterator[None]:
    """Version 1 of each (model, number of tensors), readable while the block runs (a version
    whose publisher left is unreadable)."""
    config = broker.client_config(heartbeat_interval_s=heartbeat_s)
    async with connect(config, role="publisher", context=zmq_ctx) as publisher:
        for model, num_tensors in models:
            assert (await publisher.publish(model, 1, 0, 1, shard(num_tensors))).complete
        yield


async def counter(broker: RunningBroker, name: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(broker.url + "/metrics") as reply:
        text = await reply.text()
    [line] = [line for line in text.splitlines() if line.startswith(name + " ")]
    return float(line.split()[1])


async def test_announced_stays_small_whatever_the_manifest_and_the_body_matches_its_digest(
    broker: RunningBroker, zmq_ctx
) -> None:
    async with (
        publishing(broker, zmq_ctx, (SMALL, 1), (LARGE, 10_000)),
        raw_peer(zmq_ctx, broker.endpoint, "raw-v2", protocol=2) as socket,
    ):
        small, small_bytes = await subscribe_raw(socket, SMALL)
        large, large_bytes = await subscribe_raw(socket, LARGE)
        assert isinstance(small, Announced)
        assert isinstance(large, Announced)
        # Model, version, a 64-digit digest and a size: the same few bytes for 1 or 10,000
        # tensors (the names are as long; only `nbytes` takes a wider msgpack integer).
        assert small_bytes <= 200
        assert small_bytes <= large_bytes <= small_bytes + 4
        assert large.nbytes > 500_000 > 1000 > small.nbytes

        await socket.send(
            encode(FetchManifest(request_id=7, model=LARGE, version=1, digest=large.digest))
        )
        reply, reply_bytes = await receive(socket)
    assert isinstance(reply, ManifestBody)
    assert (reply.request_id, reply.digest) == (7, large.digest)
    assert hashlib.sha256(reply.body).hexdigest() == large.digest
    assert len(reply.body) == large.nbytes < reply_bytes
    manifest = decode_manifest(reply.body)
    assert (manifest.model, manifest.version, len(manifest.tensors)) == (LARGE, 1, 10_000)
    assert manifest.tensors == shard(10_000).tensors
    assert await counter(broker, MANIFEST_FETCHES_TOTAL) == 1


async def test_a_protocol_1_peer_still_gets_the_whole_manifest_in_announce(
    broker: RunningBroker, zmq_ctx
) -> None:
    async with (
        publishing(broker, zmq_ctx, (LARGE, 10_000)),
        raw_peer(zmq_ctx, broker.endpoint, "raw-v1", protocol=MIN_PROTOCOL_VERSION) as v1,
        raw_peer(zmq_ctx, broker.endpoint, "raw-v2", protocol=2) as v2,
    ):
        announce, announce_bytes = await subscribe_raw(v1, LARGE)
        announced, _ = await subscribe_raw(v2, LARGE)
    assert isinstance(announce, Announce)
    assert isinstance(announced, Announced)
    assert announce.manifest.tensors == shard(10_000).tensors
    # The whole manifest, the same bytes protocol 2 fetches by digest.
    assert hashlib.sha256(encode(announce.manifest)).hexdigest() == announced.digest
    assert announce_bytes > announced.nbytes
    assert await counter(broker, MANIFEST_FETCHES_TOTAL) == 0


async def test_fetch_manifest_of_an_unknown_digest_is_version_unavailable(
    broker: RunningBroker, zmq_ctx
) -> None:
    async with (
        publishing(broker, zmq_ctx, (SMALL, 1)),
        raw_peer(zmq_ctx, broker.endpoint, "raw-v2", protocol=2) as socket,
    ):
        for request_id, model, version in ((3, SMALL, 1), (4, SMALL, 9), (5, "org/none", 1)):
            fetch = FetchManifest(
                request_id=request_id, model=model, version=version, digest="0" * 64
            )
            await socket.send(encode(fetch))
            error, _ = await receive(socket)
            assert isinstance(error, Error), error
            assert (error.code, error.request_id) == ("version_unavailable", request_id)
            assert "no manifest with digest 0000000000000000" in error.detail
            assert "wait for the next announcement" in error.detail
    assert await counter(broker, MANIFEST_FETCH_REFUSED_TOTAL) == 3

    async with connect(broker.client_config(), role="subscriber", context=zmq_ctx) as client:
        with pytest.raises(VersionUnavailable, match="no manifest with digest ffff"):
            await client._fetch_manifest_body(SMALL, 1, "f" * 64)


async def test_a_flood_of_fetches_is_served_a_bounded_number_of_times(
    broker: RunningBroker, zmq_ctx
) -> None:
    cap = Limits().fetches_per_manifest
    flood = 10 * cap
    async with (
        publishing(broker, zmq_ctx, (LARGE, 1000)),
        raw_peer(zmq_ctx, broker.endpoint, "raw-flood", protocol=2) as socket,
    ):
        announced, _ = await subscribe_raw(socket, LARGE)
        assert isinstance(announced, Announced)
        for request_id in range(1, flood + 1):
            fetch = FetchManifest(
                request_id=request_id, model=LARGE, version=1, digest=announced.digest
            )
            await socket.send(encode(fetch))
        replies = [(await receive(socket))[0] for _ in range(flood)]
    bodies = [r for r in replies if isinstance(r, ManifestBody)]
    refused = [r for r in replies if isinstance(r, Error)]
    assert [r.request_id for r in bodies] == list(range(1, cap + 1))
    assert all(r.body == bodies[0].body for r in bodies)
    assert [(r.code, r.request_id) for r in refused] == [
        ("bad_request", i) for i in range(cap + 1, flood + 1)
    ]
    assert "cache it by digest" in refused[0].detail
    assert await counter(broker, MANIFEST_FETCHES_TOTAL) == cap


async def test_the_client_fetches_a_manifest_once_and_a_reannouncement_uses_its_cache(
    zmq_ctx,
) -> None:
    # The broker forgets peers silent for 1 s; the subscriber heartbeats only every 30 s, so
    # its next request is refused as unknown_peer, and its re-Hello re-subscribes. The
    # publisher heartbeats every 0.1 s: gone, it would make the version unreadable (a loaded
    # machine once stalled this one process, broker and all, past a 0.1 s margin).
    async with run_broker(broker_config(peer_timeout_s=1.0)) as broker:
        config = broker.client_config(heartbeat_interval_s=30.0)
        async with (
            publishing(broker, zmq_ctx, (LARGE, 10_000), heartbeat_s=0.1),
            connect(config, role="subscriber", context=zmq_ctx) as client,
        ):
            assert await client.subscribe(LARGE) == 1
            manifest = await asyncio.wait_for(client.next_manifest(LARGE, after=-1), 10)
            assert client.manifest_fetches == 1
            assert await counter(broker, MANIFEST_FETCHES_TOTAL) == 1
            # Bit for bit what the broker assembled and announced.
            assert manifest.tensors == shard(10_000).tensors
            async with aiohttp.ClientSession() as session:
                url = f"{broker.url}/v1/models/{LARGE}/versions/1"
                async with session.get(url) as reply:
                    assert (await reply.json())["num_tensors"] == 10_000

            async def gone() -> bool:
                url = broker.url + "/v1/subscribers?state=gone"
                async with aiohttp.ClientSession() as session, session.get(url) as reply:
                    total: int = (await reply.json())["total"]
                return total == 1

            await eventually(gone)
            # Drop what we hold, so that the re-announcement of the same digest must be used.
            del client._manifests[LARGE]
            assert await client.subscribe("org/other") is None  # refused, re-Hello, re-sent
            again = await asyncio.wait_for(client.next_manifest(LARGE, after=-1), 10)
            assert again is manifest  # from the cache by digest
            assert client.manifest_fetches == 1
            assert await counter(broker, MANIFEST_FETCHES_TOTAL) == 1


async def test_a_body_that_does_not_match_its_digest_is_refused_and_never_applied(
    zmq_ctx,
) -> None:
    """A raw ROUTER plays the broker: it announces one manifest and serves another."""
    announced_manifest = Manifest.assemble(SMALL, 1, [shard(1)], published_at=1.0)
    served_manifest = Manifest.assemble(SMALL, 1, [shard(2)], published_at=1.0)
    announced_body = encode(announced_manifest)
    digest = hashlib.sha256(announced_body).hexdigest()
    served_body = encode(served_manifest)
    router = zmq_ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    fetches: list[FetchManifest] = []

    async def lying_broker() -> None:
        while True:
            identity, frame = await router.recv_multipart()
            message = decode_header(frame)

            async def send(reply: Message, identity: bytes = identity) -> None:
                await router.send_multipart([identity, encode(reply)])

            match message:
                case Hello():
                    await send(Welcome(broker_id="liar"))
                case Subscribe(request_id=rid):
                    await send(Subscribed(request_id=rid, model=SMALL, latest=1, newest=1))
                    await send(
                        Announced(model=SMALL, version=1, digest=digest, nbytes=len(served_body))
                    )
                case FetchManifest(request_id=rid):
                    fetches.append(message)
                    await send(ManifestBody(request_id=rid, digest=digest, body=served_body))
                case Heartbeat():
                    pass
                case _:
                    pass

    task = asyncio.create_task(lying_broker())
    try:
        config = client_config(f"tcp://127.0.0.1:{port}", key=None)
        async with connect(config, role="subscriber", context=zmq_ctx) as client:
            assert await client.subscribe(SMALL) == 1
            await until(lambda: len(fetches) >= 1 and not client._fetching, timeout_s=15)
            error = client.manifest_error
            assert isinstance(error, ManifestMismatch)
            assert (error.expected, error.got) == (
                digest,
                hashlib.sha256(served_body).hexdigest(),
            )
            assert digest in str(error)
            assert error.got in str(error)
            # Retried a bounded number of times, then given up: nothing applied.
            assert len(fetches) == 3
            assert all(f.digest == digest for f in fetches)
            assert client.latest_manifest(SMALL) is None
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        router.close(linger=0)


async def test_equal_manifest_replies_are_one_frame_shared_by_their_recipients(zmq_ctx) -> None:
    broker = Broker(broker_config(key_file=None, allowlist_file=None), context=zmq_ctx)
    try:
        registry = broker.registry
        registry.hello("pub", "publisher", "host", 1, now=0.0)
        for peer_id in ("a", "b"):
            registry.hello(peer_id, "subscriber", "host", 2, now=0.0)
        registry.publish("pub", LARGE, 1, 0, 1, shard(1000), now=0.0)
        record = registry.models[LARGE].versions[1]

        def fetch(peer_id: str, request_id: int) -> ManifestBody:
            message = FetchManifest(
                request_id=request_id, model=LARGE, version=1, digest=record.digest
            )
            return broker._manifest_body(peer_id, message)

        first, same, other = fetch("a", 2), fetch("b", 2), fetch("b", 3)
        assert same is first
        assert other is not first
        assert first.body is record.body is other.body  # never encoded again
        frame = broker._encode(first)
        assert broker._encode(same) is frame
        assert decode_header(frame) == first
        assert decode_header(broker._encode(other)) == other
        assert broker.stats.manifest_fetches_total == 3
    finally:
        broker.socket.close(linger=0)
