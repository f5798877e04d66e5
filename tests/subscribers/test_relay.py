"""The relay data path in one process: real broker, Publisher, ZeroMQ sockets and stagings.

A holder pulls a version from the trainer and serves it (`RelayServer`); a reader pulls the
same version along a `Route` (`subscribers.pull`). The reader's bytes are checked against the
trainer's tensors, and the per-source counts say who served them. Holders that die, lie or
freeze must cost the reader a re-fetch (from a fallback holder or the trainer), never a
failed or wrong version; hostile relay frames get an error reply and kill nothing; and a
relay subscriber does not rewrite a staging it serves before that version's `Retire`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from functools import partial
from typing import TYPE_CHECKING

import msgspec
import pytest
import torch
import zmq
import zmq.asyncio
from hypothesis import given, settings, strategies as st

from publishers.publisher import Publisher, open_publisher
from publishers.sources import synthetic_llama
from schemas.frames import RelayRead, RelayReply, decode_relay_read, decode_relay_reply
from schemas.messages import RelaySource, Retire, Route
from streamer.client import connect
from streamer.transport import ZmqFrameReceiver, ZmqFrameSender
from subscribers.pull import TRAINER, pull
from subscribers.relay import RelayError, RelayServer
from subscribers.relay_client import RelayClient
from subscribers.staging import Staging
from subscribers.subscriber import PullConfig, Subscriber
from subscribers.swap import TorchSwapper
from tests.e2e.procs import (
    assert_dump_equals,
    expected,
    file_exists,
    publish_args,
    start_broker,
    subscribe_args,
    wait_for,
)
from tests.support import MooncakeEngines, RunningBroker, until
from weightstream.cli import main

if TYPE_CHECKING:
    from pathlib import Path

    from schemas.manifest import Manifest
    from tests.e2e.procs import Fleet

MODEL = "org/relay"
MODEL_BYTES = 512 << 10
BUCKET_BYTES = 32 << 10
SLOW_BYTES_PER_S = 2 << 20
"""A throttled pull of the model takes ~0.25 s: long enough to act in the middle of it."""
RELAY_TIMEOUT_S = 2.0
"""A relay read of a verified bucket takes milliseconds; generous for a loaded machine."""
DEAD_RELAY_TIMEOUT_S = 20.0
"""Long: a dead relay (connection closed) must be noticed at once, not at this deadline."""


def weights(version: int) -> dict[str, torch.Tensor]:
    return synthetic_llama(MODEL_BYTES, version=version, seed=11)


def total(manifest: Manifest) -> int:
    """The bytes a pull fetches: every bucket (the regions' alignment padding included)."""
    return sum(bucket.nbytes for bucket in manifest.buckets)


def holds_version(staging: Staging, manifest: Manifest, version: int) -> bool:
    """Bit for bit the trainer's tensors of `version`, in `staging`."""
    expected = weights(version)
    return all(
        torch.equal(staging.tensor(spec).view(torch.uint8), expected[spec.name].view(torch.uint8))
        for spec in manifest.tensors
    )


@pytest.fixture
def receiver() -> Iterator[ZmqFrameReceiver]:
    receiver = ZmqFrameReceiver(timeout_s=5.0)
    yield receiver
    receiver.close()


@pytest.fixture
def relay_client() -> Iterator[RelayClient]:
    client = RelayClient()
    yield client
    client.close()


@pytest.fixture
def stagings(receiver: ZmqFrameReceiver) -> Iterator[Callable[[int], list[Staging]]]:
    """`stagings(n)`: n fresh stagings, closed after the test (after its asserts)."""
    made: list[Staging] = []

    def make(count: int) -> list[Staging]:
        made.extend(Staging(receivers=[receiver], pin_memory=False) for _ in range(count))
        return made[-count:]

    yield make
    for staging in made:
        staging.close()


@contextlib.contextmanager
def relay_servers(count: int) -> Iterator[list[RelayServer]]:
    made = [RelayServer() for _ in range(count)]
    try:
        yield made
    finally:
        for server in made:
            server.close()


@contextlib.asynccontextmanager
async def trainer(
    broker: RunningBroker, zmq_ctx: zmq.asyncio.Context, versions: tuple[int, ...] = (1,)
) -> AsyncIterator[tuple[Publisher, Manifest]]:
    """A publisher serving `versions` over ZeroMQ frames, and the last one's manifest."""
    async with (
        open_publisher(
            broker.client_config(),
            model=MODEL,
            sender=ZmqFrameSender(),
            bucket_bytes=BUCKET_BYTES,
            context=zmq_ctx,
        ) as publisher,
        connect(broker.client_config(), role="subscriber", context=zmq_ctx) as client,
    ):
        await client.subscribe(MODEL)
        for version in versions:
            await publisher.publish(version, weights(version))
        async with asyncio.timeout(5):
            manifest = await client.next_manifest(MODEL, after=versions[-1] - 1)
        assert len(manifest.buckets) == MODEL_BYTES // BUCKET_BYTES
        yield publisher, manifest


def route_via(*holders: tuple[str, RelayServer], fallbacks: int = 0) -> Route:
    """Every stripe from the first holder(s); the last `fallbacks` holders as fallbacks."""
    sources = [RelaySource(name=name, endpoint=server.endpoint) for name, server in holders]
    parents = sources[: len(sources) - fallbacks]
    return Route(
        model=MODEL,
        version=1,
        fanout=len(parents),
        parents=list(parents),
        fallbacks=sources[len(parents) :],
    )


async def hold_and_pull(
    server: RelayServer,
    manifest: Manifest,
    staging: Staging,
    receiver: ZmqFrameReceiver,
    **options: float,
) -> None:
    """What a relay subscriber does: hold the version, pull it, serve each verified bucket."""
    server.hold(manifest, staging)
    await pull(
        manifest,
        staging,
        [receiver],
        on_verified=lambda index: server.mark_verified(MODEL, manifest.version, index),
        **options,  # type: ignore[arg-type]
    )


async def test_reader_pulls_from_a_holder_that_is_still_pulling(
    broker: RunningBroker,
    zmq_ctx,
    receiver: ZmqFrameReceiver,
    relay_client: RelayClient,
    stagings: Callable[[int], list[Staging]],
) -> None:
    async with trainer(broker, zmq_ctx) as (_, manifest):
        [held, read] = stagings(2)
        with relay_servers(1) as [server]:
            held_verified: list[int] = []
            at_reader_first: list[int] = []

            def reader_verified(index: int) -> None:
                if not at_reader_first:
                    at_reader_first.append(len(held_verified))

            def holder_verified(index: int) -> None:
                held_verified.append(index)
                server.mark_verified(MODEL, 1, index)

            # The reader asks first: its holder has not even begun the version yet.
            reader = asyncio.create_task(
                pull(
                    manifest,
                    read,
                    [receiver],
                    route=route_via(("holder", server)),
                    relay_client=relay_client,
                    relay_timeout_s=RELAY_TIMEOUT_S * 2,
                    on_verified=reader_verified,
                    deadline=time.monotonic() + 20,
                )
            )
            await until(lambda: server.waiting >= 1)
            server.hold(manifest, held)
            await pull(
                manifest,
                held,
                [receiver],
                max_bytes_per_s=SLOW_BYTES_PER_S,
                on_verified=holder_verified,
            )
            report = await reader
    assert report.sources == {"holder": total(manifest)}
    assert report.refetched == 0
    assert holds_version(read, manifest, 1)
    assert server.served_bytes == total(manifest)
    # Pipelined: the reader had its first bucket while the holder was still pulling.
    assert at_reader_first[0] < len(manifest.buckets)


async def test_holder_that_dies_mid_serve_costs_a_refetch_from_the_trainer(
    broker: RunningBroker,
    zmq_ctx,
    receiver: ZmqFrameReceiver,
    relay_client: RelayClient,
    stagings: Callable[[int], list[Staging]],
) -> None:
    async with trainer(broker, zmq_ctx) as (_, manifest):
        [held, read] = stagings(2)
        server = RelayServer()
        try:
            await hold_and_pull(server, manifest, held, receiver)
            verified: list[int] = []

            def reader_verified(index: int) -> None:
                verified.append(index)
                if len(verified) == 4:
                    server.close()  # the holder dies after serving four buckets

            started = time.monotonic()
            report = await pull(
                manifest,
                read,
                [receiver],
                max_bytes_per_s=SLOW_BYTES_PER_S,
                route=route_via(("holder", server)),
                relay_client=relay_client,
                relay_timeout_s=DEAD_RELAY_TIMEOUT_S,
                on_verified=reader_verified,
                deadline=time.monotonic() + 3 * DEAD_RELAY_TIMEOUT_S,
            )
            elapsed_s = time.monotonic() - started
        finally:
            server.close()
    # Its connection closed: the read failed at once, not at the relay deadline.
    assert elapsed_s < DEAD_RELAY_TIMEOUT_S / 2
    assert holds_version(read, manifest, 1)
    assert report.sources["holder"] >= 4 * BUCKET_BYTES
    assert report.sources[TRAINER] >= BUCKET_BYTES
    assert sum(report.sources.values()) == total(manifest)


async def test_lying_holder_costs_a_refetch_from_the_fallback_holder(
    broker: RunningBroker,
    zmq_ctx,
    receiver: ZmqFrameReceiver,
    relay_client: RelayClient,
    stagings: Callable[[int], list[Staging]],
) -> None:
    async with trainer(broker, zmq_ctx) as (_, manifest):
        [bad, good, read] = stagings(3)
        with relay_servers(2) as [liar, honest]:
            await hold_and_pull(liar, manifest, bad, receiver)
            await hold_and_pull(honest, manifest, good, receiver)
            # The liar's staging changes under its verified bucket 3 (say, a stray write).
            bucket = manifest.buckets[3]
            bad.bytes_of(bucket.region, bucket.offset, bucket.nbytes)[:64] ^= 0xFF
            report = await pull(
                manifest,
                read,
                [receiver],
                route=route_via(("liar", liar), ("honest", honest), fallbacks=1),
                relay_client=relay_client,
                relay_timeout_s=RELAY_TIMEOUT_S,
                deadline=time.monotonic() + 20,
            )
    assert holds_version(read, manifest, 1)
    assert TRAINER not in report.sources  # the fallback holder served the re-fetch
    assert report.sources["liar"] >= 3 * BUCKET_BYTES
    assert report.sources["honest"] >= BUCKET_BYTES
    assert report.sources["liar"] + report.sources["honest"] == total(manifest)
    assert report.refetched >= 1


async def test_holder_that_is_behind_loses_only_the_buckets_it_has_not_verified(
    broker: RunningBroker,
    zmq_ctx,
    receiver: ZmqFrameReceiver,
    relay_client: RelayClient,
    stagings: Callable[[int], list[Staging]],
) -> None:
    """A holder that answers `not_verified` is alive (its own parent is slow, say): that
    bucket goes elsewhere, the next ones are still read from it."""
    async with trainer(broker, zmq_ctx) as (_, manifest):
        [held, read] = stagings(2)
        with relay_servers(1) as [server]:
            server.hold(manifest, held)
            await pull(manifest, held, [receiver])
            for index in range(1, len(manifest.buckets)):  # bucket 0 never verifies
                server.mark_verified(MODEL, 1, index)
            report = await pull(
                manifest,
                read,
                [receiver],
                route=route_via(("holder", server)),
                relay_client=relay_client,
                relay_timeout_s=RELAY_TIMEOUT_S,
                deadline=time.monotonic() + 20,
            )
            assert holds_version(read, manifest, 1)
    first = manifest.buckets[0].nbytes
    assert report.sources == {TRAINER: first, "holder": total(manifest) - first}


async def test_frozen_holder_costs_one_relay_deadline_then_the_trainer(
    broker: RunningBroker,
    zmq_ctx,
    receiver: ZmqFrameReceiver,
    relay_client: RelayClient,
    stagings: Callable[[int], list[Staging]],
) -> None:
    """A relay that accepts reads and never answers (a SIGSTOPped holder, on the wire)."""
    frozen = zmq.Context()
    silent = frozen.socket(zmq.ROUTER)
    port = silent.bind_to_random_port("tcp://127.0.0.1")
    source = RelaySource(name="frozen", endpoint=f"tcp://127.0.0.1:{port}")
    route = Route(model=MODEL, version=1, fanout=1, parents=[source])
    try:
        async with trainer(broker, zmq_ctx) as (_, manifest):
            [read] = stagings(1)
            started = time.monotonic()
            report = await pull(
                manifest,
                read,
                [receiver],
                route=route,
                relay_client=relay_client,
                relay_timeout_s=1.0,
                deadline=time.monotonic() + 30,
            )
            elapsed_s = time.monotonic() - started
            assert holds_version(read, manifest, 1)
    finally:
        frozen.destroy(linger=0)
    assert report.sources == {TRAINER: total(manifest)}
    # One relay deadline for the whole pull, not one per bucket (16 buckets: 16 s).
    assert elapsed_s < len(manifest.buckets) * 1.0 / 2


async def test_encrypted_relay_serves_readers_with_its_key_only(
    broker: RunningBroker,
    zmq_ctx,
    receiver: ZmqFrameReceiver,
    relay_client: RelayClient,
    stagings: Callable[[int], list[Staging]],
) -> None:
    async with trainer(broker, zmq_ctx) as (_, manifest):
        [held, read, wrong] = stagings(3)
        server = RelayServer(encrypt=True)
        try:
            await hold_and_pull(server, manifest, held, receiver)
            assert len(server.server_key) == 40
            keyed = RelaySource(
                name="holder", endpoint=server.endpoint, server_key=server.server_key
            )
            report = await pull(
                manifest,
                read,
                [receiver],
                route=Route(model=MODEL, version=1, fanout=1, parents=[keyed]),
                relay_client=relay_client,
                relay_timeout_s=DEAD_RELAY_TIMEOUT_S,
                deadline=time.monotonic() + 3 * DEAD_RELAY_TIMEOUT_S,
            )
            # Another key (an impostor's, or a stale one): the handshake fails, at once.
            impostor = msgspec.structs.replace(keyed, server_key=zmq.curve_keypair()[0].decode())
            started = time.monotonic()
            refused = await pull(
                manifest,
                wrong,
                [receiver],
                route=Route(model=MODEL, version=1, fanout=1, parents=[impostor]),
                relay_client=relay_client,
                relay_timeout_s=DEAD_RELAY_TIMEOUT_S,
                deadline=time.monotonic() + 3 * DEAD_RELAY_TIMEOUT_S,
            )
            elapsed_s = time.monotonic() - started
            assert holds_version(read, manifest, 1)
            assert holds_version(wrong, manifest, 1)
        finally:
            server.close()
    assert report.sources == {"holder": total(manifest)}
    assert refused.sources == {TRAINER: total(manifest)}
    assert elapsed_s < DEAD_RELAY_TIMEOUT_S / 2


async def test_one_sided_relay_tells_where_a_verified_bucket_is_and_mooncake_reads_it(
    broker: RunningBroker,
    zmq_ctx,
    receiver: ZmqFrameReceiver,
    relay_client: RelayClient,
    mooncake: MooncakeEngines,
) -> None:
    holder_engine, reader_engine = mooncake.receiver(), mooncake.receiver()
    held = Staging(receivers=[receiver, holder_engine], pin_memory=False)
    read = Staging(receivers=[receiver, reader_engine], pin_memory=False)
    server = RelayServer(one_sided=holder_engine)
    try:
        async with trainer(broker, zmq_ctx) as (_, manifest):
            await hold_and_pull(server, manifest, held, receiver)
            report = await pull(
                manifest,
                read,
                [receiver],
                route=route_via(("holder", server)),
                relay_client=relay_client,
                relay_one_sided=reader_engine,
                relay_timeout_s=5.0,
                deadline=time.monotonic() + 20,
            )
            assert holds_version(read, manifest, 1)
    finally:
        server.close()
        held.close()
        read.close()
    assert report.sources == {"holder": total(manifest)}
    # No payload went over ZeroMQ: every bucket was located, then read one-sided.
    assert server.served_bytes == 0
    assert server.located_bytes == total(manifest)


async def test_hostile_relay_frames_get_an_error_reply_and_kill_nothing(
    broker: RunningBroker,
    zmq_ctx,
    receiver: ZmqFrameReceiver,
    relay_client: RelayClient,
    stagings: Callable[[int], list[Staging]],
) -> None:
    async with trainer(broker, zmq_ctx) as (_, manifest):
        [held, read] = stagings(2)
        with relay_servers(1) as [server]:
            await hold_and_pull(server, manifest, held, receiver)
            bucket = manifest.buckets[0]
            valid = RelayRead(
                request_id=7,
                model=MODEL,
                version=1,
                region=bucket.region,
                offset=bucket.offset,
                nbytes=bucket.nbytes,
            )
            hostile = {
                "oversized": b"\x81\xa1x\xda\x40\x00" + b"y" * (16 << 10),
                "deep nesting": b"\x91" * 5000 + b"\xc0",
                "not msgpack": b"\xc1\xc1\xc1",
                "other protocol": msgspec.msgpack.encode(
                    msgspec.structs.replace(valid, protocol=99)
                ),
                "retired version": msgspec.msgpack.encode(
                    msgspec.structs.replace(valid, version=0)
                ),
                "not a bucket": msgspec.msgpack.encode(
                    msgspec.structs.replace(valid, offset=bucket.offset + 1)
                ),
                "unbounded size": msgspec.msgpack.encode(
                    msgspec.structs.asdict(valid) | {"nbytes": -1}
                ),
            }
            context = zmq.Context()
            dealer = context.socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.connect(server.endpoint)
            codes = {}
            try:
                for name, frame in hostile.items():
                    dealer.send(frame)
                    assert dealer.poll(5000), f"no reply to the {name} frame"
                    [reply] = dealer.recv_multipart()
                    codes[name] = decode_relay_reply(reply).code
                dealer.send_multipart([b"two", b"frames"])
                assert dealer.poll(5000)
                codes["two frames"] = decode_relay_reply(dealer.recv_multipart()[0]).code
                # Past MAX_REQUEST_BYTES ZeroMQ drops the frame (and that connection) unread.
                flooder = context.socket(zmq.DEALER)
                flooder.setsockopt(zmq.LINGER, 0)
                flooder.connect(server.endpoint)
                flooder.send(b"\x00" * (1 << 20))
                flooder.close(linger=2000)  # until the frame is out (or two seconds)
            finally:
                context.destroy(linger=0)
            # Alive: a valid read still gets its bucket, and a whole pull still works.
            report = await pull(
                manifest,
                read,
                [receiver],
                route=route_via(("holder", server)),
                relay_client=relay_client,
                relay_timeout_s=RELAY_TIMEOUT_S,
                deadline=time.monotonic() + 20,
            )
    assert codes == {
        "oversized": "protocol",
        "deep nesting": "protocol",
        "not msgpack": "protocol",
        "other protocol": "incompatible",
        "retired version": "not_held",
        "not a bucket": "bad_range",
        "unbounded size": "protocol",
        "two frames": "protocol",
    }
    assert report.sources == {"holder": total(manifest)}
    assert holds_version(read, manifest, 1)


def test_a_relay_that_answers_with_a_frame_far_past_the_read_is_cut_off_unread(
    relay_client: RelayClient,
) -> None:
    """A hostile relay answers a 4 KiB read with a 64 MiB frame: the reader's socket takes no
    frame past the read's class (64 KiB here), so libzmq drops the connection before buffering
    it, and the read fails at once (its reader then fails over), not at the deadline."""
    context = zmq.Context()
    hostile = context.socket(zmq.ROUTER)
    hostile.setsockopt(zmq.LINGER, 0)
    port = hostile.bind_to_random_port("tcp://127.0.0.1")
    source = RelaySource(name="hostile", endpoint=f"tcp://127.0.0.1:{port}")
    payload = b"\0" * (64 << 20)

    def serve() -> None:
        if hostile.poll(10_000):
            identity, request = hostile.recv_multipart()
            read = decode_relay_read(request)
            reply = msgspec.msgpack.encode(RelayReply(request_id=read.request_id, code="ok"))
            hostile.send_multipart([identity, reply, payload])

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    into = bytearray(4096)
    address = ctypes.addressof(ctypes.c_char.from_buffer(into))
    started = time.monotonic()
    try:
        with pytest.raises(RelayError, match="is gone"):
            relay_client.read(source, MODEL, 1, 0, 0, 4096, address, time.monotonic() + 20)
        elapsed_s = time.monotonic() - started
    finally:
        server.join(timeout=10)
        context.destroy(linger=0)
    assert elapsed_s < 10  # at once (the connection dropped), not at the 20 s deadline
    assert bytes(into) == bytes(4096)  # nothing written


async def test_relay_client_raises_relay_error_for_a_dropped_version(
    broker: RunningBroker,
    zmq_ctx,
    receiver: ZmqFrameReceiver,
    relay_client: RelayClient,
    stagings: Callable[[int], list[Staging]],
) -> None:
    async with trainer(broker, zmq_ctx) as (_, manifest):
        [held, read] = stagings(2)
        with relay_servers(1) as [server]:
            await hold_and_pull(server, manifest, held, receiver)
            server.drop(MODEL, 1)
            read.prepare(manifest)
            bucket = manifest.buckets[0]
            source = RelaySource(name="holder", endpoint=server.endpoint)
            started = time.monotonic()
            with pytest.raises(RelayError, match="not_held"):
                await asyncio.to_thread(
                    relay_client.read,
                    source,
                    MODEL,
                    1,
                    bucket.region,
                    bucket.offset,
                    bucket.nbytes,
                    read.address(bucket.region, bucket.offset),
                    time.monotonic() + 10,
                )
            assert time.monotonic() - started < 5  # at once, not at the deadline


# The holder's side: a relay Subscriber keeps serving what it holds until its Retire.


@contextlib.asynccontextmanager
async def relay_subscriber(
    broker: RunningBroker,
    zmq_ctx: zmq.asyncio.Context,
    config: PullConfig,
    *,
    model: str = MODEL,
    shapes: dict[str, torch.Tensor] | None = None,
    name: str = "",
    via: str | None = None,
) -> AsyncIterator[tuple[Subscriber, dict[str, torch.Tensor]]]:
    """A relay subscriber of `model` (an engine shaped like `shapes`, default this module's
    weights), running (`Subscriber.run`) until the block ends; `via`: a node link's endpoint
    to reach the broker through (keyless: the link's key speaks for it)."""
    receiver = ZmqFrameReceiver(timeout_s=5.0)
    tensors = {n: torch.zeros_like(t) for n, t in (shapes or weights(0)).items()}
    server = RelayServer()
    client_config = msgspec.structs.replace(broker.client_config(), name=name)
    if via is not None:
        client_config = msgspec.structs.replace(
            client_config, broker=via, key_file=None, broker_key_file=None
        )
    try:
        async with connect(client_config, role="subscriber", context=zmq_ctx) as client:
            subscriber = Subscriber(
                client=client,
                receivers=[receiver],
                swapper=TorchSwapper(tensors),
                model=model,
                config=config,
                staging=Staging(receivers=[receiver], pin_memory=False),
                spare_staging=Staging(receivers=[receiver], pin_memory=False),
                relay=server,
            )
            task = asyncio.create_task(subscriber.run())
            try:
                yield subscriber, tensors
            finally:
                task.cancel()
                [outcome] = await asyncio.gather(task, return_exceptions=True)
                subscriber.close()
                if isinstance(outcome, Exception):
                    raise outcome
    finally:
        server.close()
        receiver.close()


def engine_holds(tensors: dict[str, torch.Tensor], version: int) -> bool:
    expected = weights(version)
    return all(
        torch.equal(t.view(torch.uint8), expected[n].view(torch.uint8)) for n, t in tensors.items()
    )


async def read_bucket(
    relay_client: RelayClient, server: RelayServer, manifest: Manifest, index: int
) -> torch.Tensor:
    bucket = manifest.buckets[index]
    into = torch.zeros(bucket.nbytes, dtype=torch.uint8)
    source = RelaySource(name="holder", endpoint=server.endpoint)
    await asyncio.to_thread(
        relay_client.read,
        source,
        MODEL,
        manifest.version,
        bucket.region,
        bucket.offset,
        bucket.nbytes,
        into.data_ptr(),
        time.monotonic() + 5,
    )
    return into


HOLD = PullConfig(max_attempts=2, retry_backoff_s=0.01, route_wait_s=0.05, relay_hold_s=30.0)


async def test_relay_subscriber_keeps_a_served_version_until_its_retire(
    broker: RunningBroker, zmq_ctx, relay_client: RelayClient
) -> None:
    async with (
        trainer(broker, zmq_ctx) as (publisher, first),
        relay_subscriber(broker, zmq_ctx, HOLD) as (subscriber, tensors),
        connect(broker.client_config(), role="subscriber", context=zmq_ctx) as reader,
    ):
        assert subscriber.relay is not None
        # A reader still reads version 1 (its lease): the broker cannot retire it.
        await reader.acquire_lease(MODEL, 1)
        await asyncio.wait_for(publisher.wait_applied(1, 1), 10)
        await publisher.publish(2, weights(2))
        await asyncio.wait_for(publisher.wait_applied(2, 1), 10)
        # Version 3 needs the staging that still serves version 1: it waits for the Retire.
        await publisher.publish(3, weights(3))
        await until(lambda: subscriber.waiting_for_retire == 1)
        served = await read_bucket(relay_client, subscriber.relay, first, 5)
        assert subscriber.applied == 2
        assert subscriber.relay.holds(MODEL, 1)
        # What the relay serves is still version 1's verified bytes (the trainer's).
        staging = _staging_of(subscriber, 1)
        assert holds_version(staging, first, 1)
        bucket = first.buckets[5]
        assert torch.equal(served, staging.bytes_of(bucket.region, bucket.offset, bucket.nbytes))
        # The reader is done: the broker may retire version 1 and tell the holders (a broker
        # with the relay does; it is handed over here too, so that this test needs none).
        await reader.release_lease(MODEL, 1)
        subscriber.client.retired.put_nowait(Retire(model=MODEL, version=1))
        await asyncio.wait_for(publisher.wait_applied(3, 1), 10)
        assert engine_holds(tensors, 3)
        assert not subscriber.relay.holds(MODEL, 1)
        assert subscriber.relay.holds(MODEL, 2)
        assert subscriber.relay.holds(MODEL, 3)


def _staging_of(subscriber: Subscriber, version: int) -> Staging:
    """The staging the subscriber serves `version` from (it is not the applied one's)."""
    assert subscriber.spare_staging is not None
    return subscriber.staging if version != subscriber.applied else subscriber.spare_staging


async def test_relay_subscriber_stops_serving_at_the_hold_deadline_and_goes_on(
    broker: RunningBroker, zmq_ctx, relay_client: RelayClient
) -> None:
    config = msgspec.structs.replace(HOLD, relay_hold_s=0.3)
    async with (
        trainer(broker, zmq_ctx) as (publisher, first),
        relay_subscriber(broker, zmq_ctx, config) as (subscriber, tensors),
        connect(broker.client_config(), role="subscriber", context=zmq_ctx) as reader,
    ):
        assert subscriber.relay is not None
        # A frozen reader holds version 1 (no Retire can come): the hold deadline decides.
        await reader.acquire_lease(MODEL, 1)
        for version in (2, 3):
            await asyncio.wait_for(publisher.wait_applied(version - 1, 1), 10)
            await publisher.publish(version, weights(version))
        await asyncio.wait_for(publisher.wait_applied(3, 1), 10)
        assert engine_holds(tensors, 3)
        assert not subscriber.relay.holds(MODEL, 1)
        with pytest.raises(RelayError, match="not_held"):
            await read_bucket(relay_client, subscriber.relay, first, 0)


# Real processes: `weightstream subscribe --relay-listen` serves what it applied.

PROCESS_MODEL_BYTES = 2_000_000


def free_port() -> int:
    context = zmq.Context()
    try:
        socket = context.socket(zmq.ROUTER)
        port = socket.bind_to_random_port("tcp://127.0.0.1")
    finally:
        context.destroy(linger=0)
    return port


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_relay_listen_subscriber_process_serves_the_version_it_applied(
    fleet: Fleet,
    tmp_path: Path,
    zmq_ctx,
    receiver: ZmqFrameReceiver,
    relay_client: RelayClient,
    stagings: Callable[[int], list[Staging]],
) -> None:
    broker = await start_broker(fleet)
    dump = tmp_path / "relay"
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    relay = await fleet.start(
        "relay",
        *subscribe_args(broker.endpoint, dump, transport="zmq"),
        "--relay-listen",
        endpoint.removeprefix("tcp://"),
    )
    args = publish_args(broker.endpoint, size=PROCESS_MODEL_BYTES, versions="1", transport="zmq")
    await fleet.start("trainer", *args, "--serve")
    await wait_for(
        partial(file_exists, dump / "v1.safetensors"), timeout_s=60, what="v1", fleet=fleet
    )
    assert_dump_equals(dump / "v1.safetensors", PROCESS_MODEL_BYTES, 1)
    async with connect(broker.client_config(), role="subscriber", context=zmq_ctx) as client:
        await client.subscribe("llama")
        async with asyncio.timeout(10):
            manifest = await client.next_manifest("llama", after=0)
    # A hostile frame first: answered, and the process lives on.
    context = zmq.Context()
    try:
        dealer = context.socket(zmq.DEALER)
        dealer.connect(endpoint)
        dealer.send(b"\x91" * 5000 + b"\xc0")
        assert dealer.poll(10_000), relay.tail()
        assert decode_relay_reply(dealer.recv_multipart()[0]).code == "protocol"
    finally:
        context.destroy(linger=0)
    [read] = stagings(1)
    source = RelaySource(name="relay", endpoint=endpoint)
    report = await pull(
        manifest,
        read,
        [receiver],
        route=Route(model="llama", version=1, fanout=1, parents=[source]),
        relay_client=relay_client,
        relay_timeout_s=5.0,
        deadline=time.monotonic() + 30,
    )
    assert report.sources == {"relay": total(manifest)}
    want = expected(PROCESS_MODEL_BYTES, 1)
    for spec in manifest.tensors:
        assert torch.equal(read.tensor(spec).view(torch.uint8), want[spec.name].view(torch.uint8))
    # Frozen (SIGSTOP): its connection stays open and nothing answers; one relay deadline,
    # then every bucket comes from the trainer, bit exact.
    relay.process.send_signal(signal.SIGSTOP)
    try:
        [frozen_read] = stagings(1)
        started = time.monotonic()
        frozen = await pull(
            manifest,
            frozen_read,
            [receiver],
            route=Route(model="llama", version=1, fanout=1, parents=[source]),
            relay_client=relay_client,
            relay_timeout_s=1.0,
            deadline=time.monotonic() + 30,
        )
        elapsed_s = time.monotonic() - started
    finally:
        relay.process.send_signal(signal.SIGCONT)
    assert frozen.sources == {TRAINER: total(manifest)}
    assert elapsed_s < len(manifest.buckets) * 1.0 / 2  # one deadline, not one per bucket
    for spec in manifest.tensors:
        live = frozen_read.tensor(spec).view(torch.uint8)
        assert torch.equal(live, want[spec.name].view(torch.uint8))
    assert relay.process.returncode is None
    assert await fleet.stop(relay) == 0


# Decoders and the command line.


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=6000) | st.builds(lambda n: b"\x91" * n + b"\xc0", st.integers(0, 5000)))
def test_relay_decoders_raise_only_decode_error(data: bytes) -> None:
    for decode in (decode_relay_read, decode_relay_reply):
        with contextlib.suppress(msgspec.DecodeError):
            decode(data)


@pytest.mark.parametrize(
    ("address", "needle"),
    [
        ("0.0.0.0:7100", "not a wildcard"),
        ("10.0.0.5:port", "write HOST[:PORT]"),
        (":7100", "write"),
    ],
)
def test_bad_relay_listen_addresses_are_usage_errors(
    address: str, needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["subscribe", "--broker", "tcp://127.0.0.1:1", "--relay-listen", address])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert needle in error
    assert len(error.strip().splitlines()) == 1
