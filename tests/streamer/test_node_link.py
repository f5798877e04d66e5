"""Node links over real sockets: several engines, one broker connection, each engine a
subscriber of its own; one fan-out frame per link; a manifest pushed once per node, or
fetched once per node where it was not pushed; a bad
member id or envelope refused with a protocol error while the broker and the link serve on."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import zmq
import zmq.asyncio

from schemas.codec import encode
from schemas.messages import (
    Announced,
    Error,
    FetchManifest,
    Hello,
    ManifestBody,
    RelayOffer,
    Subscribe,
    Subscribed,
    Welcome,
)
from streamer.auth import AuthError
from streamer.client import BrokerClient, connect
from streamer.config import ClientConfig
from streamer.frames import decode_header
from streamer.metrics import (
    MANIFEST_FETCHES_TOTAL,
    MANIFEST_PUSHES_TOTAL,
    NODE_LINKS,
    PEER_CONNECTIONS,
)
from streamer.node_link import NodeLink, NodeLinkConfig
from tests.streamer.test_announced import counter, shard
from tests.support import (
    RunningBroker,
    broker_config,
    eventually,
    run_broker,
    test_keys,
    until,
)

MODEL = "org/linked"


@contextlib.asynccontextmanager
async def running_link(
    broker: RunningBroker, zmq_ctx: zmq.asyncio.Context, tmp_path: Path, *, key: str = "peer"
) -> AsyncIterator[NodeLink]:
    keys = test_keys()
    config = NodeLinkConfig(
        broker=broker.endpoint,
        listen=f"ipc://{tmp_path}/link/engines.sock",
        key_file=keys.key_file(key),
        broker_key_file=keys.broker_public_file,
        fetch_timeout_s=5.0,
    )
    link = NodeLink(config, context=zmq_ctx)
    task = asyncio.create_task(link.run())
    try:
        yield link
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        link.close()


def engine_config(link: NodeLink, **overrides: float) -> ClientConfig:
    """An engine of the node: no key of its own (the link's key speaks for it)."""
    return ClientConfig(
        broker=link.endpoint,
        request_timeout_s=overrides.get("request_timeout_s", 5.0),
        heartbeat_interval_s=0.2,
    )


async def engines_of(
    link: NodeLink, stack: contextlib.AsyncExitStack, zmq_ctx, count: int = 3
) -> list[BrokerClient]:
    """`count` engines connected through `link`, closed with `stack`."""
    return [
        await stack.enter_async_context(
            connect(engine_config(link), role="subscriber", context=zmq_ctx)
        )
        for _ in range(count)
    ]


async def rows(broker: RunningBroker) -> list[dict[str, object]]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{broker.url}/v1/subscribers?model={MODEL}") as reply,
    ):
        return list((await reply.json())["subscribers"])


async def test_engines_behind_one_link_are_subscribers_each_and_the_node_fetches_once(
    broker: RunningBroker, zmq_ctx, tmp_path: Path
) -> None:
    publisher_config = broker.client_config(heartbeat_interval_s=0.2)
    async with (
        connect(publisher_config, role="publisher", context=zmq_ctx) as publisher,
        running_link(broker, zmq_ctx, tmp_path) as link,
        contextlib.AsyncExitStack() as stack,
    ):
        assert (await publisher.publish(MODEL, 1, 0, 1, shard(50))).complete
        engines = await engines_of(link, stack, zmq_ctx)
        for engine in engines:
            assert await engine.subscribe(MODEL) == 1
        first = await asyncio.gather(*(e.next_manifest(MODEL, after=0) for e in engines))
        assert [m.version for m in first] == [1, 1, 1]
        assert [m.tensors for m in first] == [shard(50).tensors] * 3

        # Every engine is a subscriber of its own, named under the link.
        shown = await eventually(lambda: _three(broker))
        assert sorted(str(r["peer_id"]) for r in shown) == sorted(
            f"{link.link_id}/{e.peer_id}" for e in engines
        )
        assert {r["applied_version"] for r in shown} == {None}

        assert (await publisher.publish(MODEL, 2, 0, 1, shard(60))).complete
        second = await asyncio.gather(*(e.next_manifest(MODEL, after=1) for e in engines))
        assert [m.tensors for m in second] == [shard(60).tensors] * 3
        for engine in engines:
            await engine.report_applied(MODEL, 2, pull_s=0.1, pause_s=0.01, nbytes=960)
        async with asyncio.timeout(5):
            assert await publisher.wait_applied(MODEL, 2, 3) == 3
        # Four peers on two connections: the publisher's, and the link's for its 3 engines.
        assert await counter(broker, PEER_CONNECTIONS) == 2
        assert await counter(broker, NODE_LINKS) == 1

    # One manifest body per version crossed the broker's socket, pushed with its first
    # announcement to the link: no engine's FetchManifest reached the broker.
    assert await counter(broker, MANIFEST_PUSHES_TOTAL) == 2
    assert await counter(broker, MANIFEST_FETCHES_TOTAL) == 0
    assert link.stats.manifests_pushed == 2
    assert link.stats.manifests_fetched == 0
    assert link.stats.manifests_answered == 6
    assert link.stats.members_seen == 3


@pytest.mark.parametrize("why", ["engines relay", "pushes off"])
async def test_where_nothing_is_pushed_the_node_fetches_each_manifest_once(
    zmq_ctx, tmp_path: Path, why: str
) -> None:
    """No push when every engine of the link offers a relay (peers would serve its
    manifests), or with `link_manifest_push = false`: the engines' fetches that reach the link
    then cost the broker one fetch, the others parked behind it."""
    config = broker_config(link_manifest_push=why != "pushes off")
    async with (
        run_broker(config) as broker,
        connect(broker.client_config(), role="publisher", context=zmq_ctx) as publisher,
        running_link(broker, zmq_ctx, tmp_path) as link,
        contextlib.AsyncExitStack() as stack,
    ):
        engines = await engines_of(link, stack, zmq_ctx)
        for index, engine in enumerate(engines):
            offer = RelayOffer(endpoint=f"tcp://127.0.0.1:{7100 + index}")
            relay = offer if why == "engines relay" else None
            assert await engine.subscribe(MODEL, relay=relay) is None
        assert (await publisher.publish(MODEL, 1, 0, 1, shard(40))).complete
        got = await asyncio.gather(*(e.next_manifest(MODEL, after=0) for e in engines))
        assert [m.tensors for m in got] == [shard(40).tensors] * 3
        assert await counter(broker, MANIFEST_PUSHES_TOTAL) == 0
        assert await counter(broker, MANIFEST_FETCHES_TOTAL) == 1
    assert (link.stats.manifests_pushed, link.stats.manifests_fetched) == (0, 1)
    assert link.stats.manifests_answered == 2


async def test_a_pushed_manifest_that_does_not_match_its_digest_is_not_kept(
    zmq_ctx, tmp_path: Path
) -> None:
    """A lying broker (a raw ROUTER) pushes a body under another digest: the link drops it,
    and a member's FetchManifest for that digest goes on to the broker."""
    liar = zmq_ctx.socket(zmq.ROUTER)
    liar.setsockopt(zmq.LINGER, 0)
    port = liar.bind_to_random_port("tcp://127.0.0.1")
    config = NodeLinkConfig(broker=f"tcp://127.0.0.1:{port}", listen=f"ipc://{tmp_path}/l.sock")
    link = NodeLink(config, context=zmq_ctx)
    task = asyncio.create_task(link.run())
    member = zmq_ctx.socket(zmq.DEALER)
    member.setsockopt(zmq.LINGER, 0)
    member.setsockopt(zmq.ROUTING_ID, b"m-1")
    member.connect(link.endpoint)
    digest = hashlib.sha256(b"the real manifest").hexdigest()
    try:
        await member.send(encode(Hello(peer_id="m-1", role="subscriber")))
        async with asyncio.timeout(5):
            route, member_id, _ = await liar.recv_multipart()  # the link is connected
        lie = ManifestBody(request_id=0, digest=digest, body=b"another manifest")
        await liar.send_multipart([route, b"", encode(lie)])
        announced = Announced(model=MODEL, version=1, digest=digest, nbytes=17)
        await liar.send_multipart([route, member_id, encode(announced)])
        async with asyncio.timeout(5):  # in order after the push: the link has handled it
            assert decode_header(await member.recv()) == announced
        fetch = FetchManifest(request_id=3, model=MODEL, version=1, digest=digest)
        await member.send(encode(fetch))
        async with asyncio.timeout(5):
            frames = await liar.recv_multipart()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        link.close()
        member.close(linger=0)
        liar.close(linger=0)
    assert frames[1:] == [b"m-1", encode(fetch)]  # not answered from the lie
    assert (link.stats.manifests_bad, link.stats.manifests_pushed) == (1, 0)


async def _three(broker: RunningBroker) -> list[dict[str, object]] | None:
    shown = await rows(broker)
    return shown if len(shown) == 3 else None


async def test_one_frame_per_link_carries_an_announcement_to_all_its_members(
    broker: RunningBroker, zmq_ctx
) -> None:
    """A raw DEALER plays a link with three members: the broker's Announced reaches it as one
    frame naming them all."""
    link = zmq_ctx.socket(zmq.DEALER)
    link.setsockopt(zmq.LINGER, 0)
    link.setsockopt(zmq.ROUTING_ID, b"raw-link")
    test_keys().apply(link)
    link.connect(broker.endpoint)
    members = [b"m-1", b"m-2", b"m-3"]
    try:
        for member in members:
            hello = Hello(peer_id=member.decode(), role="subscriber", protocol_version=2)
            await link.send_multipart([member, encode(hello)])
            to, welcome = await _receive(link)
            assert (to, type(welcome)) == (member, Welcome)
            await link.send_multipart([member, encode(Subscribe(request_id=1, model=MODEL))])
            to, subscribed = await _receive(link)
            assert (to, subscribed) == (member, Subscribed(request_id=1, model=MODEL))
        async with connect(broker.client_config(), role="publisher", context=zmq_ctx) as pub:
            assert (await pub.publish(MODEL, 1, 0, 1, shard(1))).complete
            to, pushed = await _receive(link)  # for the link itself, ahead of the announcement
            assert to == b""
            assert isinstance(pushed, ManifestBody)
            to, announced = await _receive(link)
            assert isinstance(announced, Announced)
            assert sorted(to.split(b" ")) == members  # one frame, every member named
            assert pushed.digest == announced.digest
            assert hashlib.sha256(pushed.body).hexdigest() == announced.digest
            # A member's own request is answered to it alone.
            fetch = FetchManifest(request_id=9, model=MODEL, version=1, digest=announced.digest)
            await link.send_multipart([b"m-2", encode(fetch)])
            to, body = await _receive(link)
        assert to == b"m-2"
        assert isinstance(body, ManifestBody)
        assert hashlib.sha256(body.body).hexdigest() == announced.digest
    finally:
        link.close(linger=0)


async def _receive(socket: zmq.asyncio.Socket) -> tuple[bytes, object]:
    async with asyncio.timeout(5):
        frames = await socket.recv_multipart()
    assert len(frames) == 2, frames
    return frames[0], decode_header(frames[1])


@pytest.mark.parametrize(
    ("frames", "says"),
    [
        ([b"bad member", b"x"], "member id"),
        ([b"m/1", b"x"], "member id"),
        ([b"a", b"b", b"c"], "got 3 frames"),
    ],
    ids=["space-in-member", "slash-in-member", "two-hops"],
)
async def test_a_bad_envelope_gets_a_protocol_error_and_the_broker_serves_on(
    broker: RunningBroker, zmq_ctx, frames: list[bytes], says: str
) -> None:
    socket = zmq_ctx.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    test_keys().apply(socket)
    socket.connect(broker.endpoint)
    try:
        await socket.send_multipart(frames)
        async with asyncio.timeout(5):
            reply = await socket.recv_multipart()
        [error_frame] = reply  # answered on the connection itself, no member frame
        error = decode_header(error_frame)
        assert isinstance(error, Error)
        assert error.code == "protocol"
        assert says in error.detail
        await socket.send(encode(Hello(peer_id="after", role="subscriber")))
        async with asyncio.timeout(5):
            assert isinstance(decode_header(await socket.recv()), Welcome)
    finally:
        socket.close(linger=0)


async def test_a_routing_id_with_a_slash_is_refused(broker: RunningBroker, zmq_ctx) -> None:
    """ "/" joins a link's id and its member's: a peer of its own may not use it to pose as
    a member of some link."""
    socket = zmq_ctx.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.ROUTING_ID, b"some-link/member")
    test_keys().apply(socket)
    socket.connect(broker.endpoint)
    try:
        await socket.send(encode(Hello(peer_id="x", role="subscriber")))
        async with asyncio.timeout(5):
            error = decode_header(await socket.recv())
    finally:
        socket.close(linger=0)
    assert isinstance(error, Error)
    assert error.code == "protocol"
    assert "'/'" in error.detail


async def test_the_link_refuses_a_member_whose_id_it_cannot_forward(
    broker: RunningBroker, zmq_ctx, tmp_path: Path
) -> None:
    async with running_link(broker, zmq_ctx, tmp_path) as link:
        bad = zmq_ctx.socket(zmq.DEALER)
        bad.setsockopt(zmq.LINGER, 0)
        bad.setsockopt(zmq.ROUTING_ID, b"has space")
        bad.connect(link.endpoint)
        try:
            await bad.send(encode(Hello(peer_id="has space", role="subscriber")))
            async with asyncio.timeout(5):
                error = decode_header(await bad.recv())
        finally:
            bad.close(linger=0)
        assert isinstance(error, Error)
        assert error.code == "protocol"
        assert "routing id" in error.detail
        assert link.stats.refused == 1
        # The link serves a good member after it.
        async with connect(engine_config(link), role="subscriber", context=zmq_ctx) as engine:
            assert await engine.subscribe(MODEL) is None


async def test_engines_of_a_link_whose_key_the_broker_refuses_are_told_why(
    broker: RunningBroker, zmq_ctx, tmp_path: Path
) -> None:
    async with running_link(broker, zmq_ctx, tmp_path, key="stranger") as link:
        await until(lambda: link.refused is not None)
        with pytest.raises(AuthError, match=r"refused node link .* key: add"):
            async with connect(engine_config(link), role="subscriber", context=zmq_ctx):
                pass


def test_a_link_listens_only_where_its_own_node_reaches_it(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="own node"):
        NodeLinkConfig(listen="tcp://0.0.0.0:5600")
    with pytest.raises(ValueError, match="'/'"):
        NodeLinkConfig(link_id="a/b")
    with pytest.raises(ValueError, match="both"):
        NodeLinkConfig(key_file="x.key_secret")


async def test_a_socket_directory_others_can_enter_is_refused(zmq_ctx, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    config = NodeLinkConfig(listen=f"ipc://{shared}/link.sock")
    with pytest.raises(ValueError, match="mode 0700"):
        NodeLink(config, context=zmq_ctx)


def test_a_manifest_kept_again_is_counted_once_against_the_cache_bound(
    zmq_ctx, tmp_path: Path
) -> None:
    """Room for two bodies: one kept three times (fetched, then pushed) leaves room for another."""
    first, second = b"a" * 1000, b"b" * 1000
    config = NodeLinkConfig(listen=f"ipc://{tmp_path}/l.sock", manifest_cache_bytes=2000)
    link = NodeLink(config, context=zmq_ctx)
    try:
        for body in (first, first, first, second):
            digest = hashlib.sha256(body).hexdigest()
            assert link._keep_checked(ManifestBody(request_id=0, digest=digest, body=body), "t")
        assert list(link._bodies.values()) == [first, second]
    finally:
        link.close()
