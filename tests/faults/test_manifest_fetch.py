"""Hostile FetchManifest against a real broker process: a flood of fetches of a real digest is
served a bounded number of times, unknown digests are refused, the broker's memory stays
bounded, and a real subscriber then fetches the manifest once and applies the version bit for
bit (protocol 2 end to end)."""

from __future__ import annotations

import asyncio
import secrets
from functools import partial
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from schemas.codec import decode_message, encode
from schemas.messages import (
    Alive,
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
from streamer.registry import Limits
from tests.e2e.procs import (
    Fleet,
    dump_matches,
    file_exists,
    get_json,
    get_text,
    metric,
    publish_args,
    start_broker,
    subscribe_args,
    wait_for,
)
from tests.faults.ledger import Faults
from tests.faults.measure import rss_bytes
from tests.support import test_keys

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

SIZE = 4_000_000
FLOOD = 400
FETCHES = "weightstream_broker_manifest_fetches_total"
REFUSED = "weightstream_broker_manifest_fetch_refused_total"


async def recv(socket: zmq.asyncio.Socket) -> Message:
    async with asyncio.timeout(10):
        return decode_message(await socket.recv())


async def test_a_fetch_flood_is_bounded_and_a_subscriber_still_fetches_once_and_applies(
    fleet: Fleet, tmp_path: Path, faults: Faults
):
    broker = await start_broker(fleet)
    await fleet.start("trainer", *publish_args(broker.endpoint, size=SIZE, versions="1"))

    async def announced() -> bool:
        models = (await get_json(f"{broker.http}/v1/models"))["models"]
        return [m["latest"] for m in models] == [1]

    await wait_for(announced, timeout_s=60, what="version 1", fleet=fleet)

    ctx = zmq.asyncio.Context()
    try:
        peer_id = f"hostile-fetch-{secrets.token_hex(3)}"
        socket = ctx.socket(zmq.DEALER)
        socket.setsockopt(zmq.ROUTING_ID, peer_id.encode())
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.RCVHWM, 0)
        test_keys().apply(socket)  # an allowlisted key: a hostile but admitted subscriber
        socket.connect(broker.endpoint)
        await socket.send(encode(Hello(peer_id=peer_id, role="subscriber")))
        assert isinstance(await recv(socket), Welcome)
        await socket.send(encode(Subscribe(request_id=1, model="llama")))
        assert isinstance(await recv(socket), Subscribed)
        announcement = await recv(socket)
        assert isinstance(announcement, Announced), announcement

        rss_before = rss_bytes(broker.proc.process.pid)
        for request_id in range(1, FLOOD + 1):
            digest = announcement.digest if request_id % 2 else secrets.token_hex(32)
            fetch = FetchManifest(request_id=request_id, model="llama", version=1, digest=digest)
            await socket.send(encode(fetch))
        await socket.send(encode(Heartbeat()))
        faults.inject(f"{FLOOD // 2} FetchManifest of a real digest from one connection")
        faults.inject(f"{FLOOD // 2} FetchManifest of random digests")
        replies: list[Message] = []
        while len(replies) < FLOOD:
            message = await recv(socket)
            if not isinstance(message, Alive):
                replies.append(message)
        socket.close(linger=0)
    finally:
        ctx.destroy(linger=0)
    rss_after = rss_bytes(broker.proc.process.pid)

    bodies = [r for r in replies if isinstance(r, ManifestBody)]
    errors = [r for r in replies if isinstance(r, Error)]
    assert len(bodies) + len(errors) == FLOOD
    assert all(b.digest == announcement.digest for b in bodies)
    assert all(len(b.body) == announcement.nbytes for b in bodies)
    unknown = [e for e in errors if e.request_id % 2 == 0]
    assert len(unknown) == FLOOD // 2
    assert {e.code for e in unknown} == {"version_unavailable"}
    over_cap = [e for e in errors if e.request_id % 2 == 1]
    assert {e.code for e in over_cap} == {"bad_request"}
    cap = Limits().fetches_per_manifest
    assert len(bodies) == cap
    faults.bounded("manifest bodies served to one connection", value=len(bodies), bound=cap)
    faults.bounded(
        "broker RSS growth over the flood (bytes)",
        value=max(0, rss_after - rss_before),
        bound=16 * 1024 * 1024,
    )
    text = await get_text(f"{broker.http}/metrics")
    assert metric(text, FETCHES) == len(bodies)
    assert metric(text, REFUSED) == FLOOD - len(bodies)

    # A real subscriber (protocol 2) is told the digest, fetches the manifest once, applies.
    dump = tmp_path / "sub"
    await fleet.start("sub", *subscribe_args(broker.endpoint, dump), "--exit-after-version", "1")
    await wait_for(
        partial(file_exists, dump / "v1.safetensors"), timeout_s=60, what="v1", fleet=fleet
    )
    faults.applied(version=1, ok=dump_matches(dump / "v1.safetensors", SIZE, 1))
    assert metric(await get_text(f"{broker.http}/metrics"), FETCHES) == len(bodies) + 1
    assert await fleet.stop(broker.proc) == 0, broker.proc.tail()
