"""Manifests from peers (issue 10): a relay serves the encoded manifests its subscriber took,
by digest, and relay subscribers read the announced manifest from their Route's stripe-0
parent instead of the broker.

Real ZeroMQ sockets throughout: `RelayServer` + `RelayClient` for the frames (offered, parked
until offered, refused, bounded), then an in-process broker, a Publisher and relay
`Subscriber`s: four of them take the manifest from the broker once (the stripe-0 root) and
three times from peers, and a lying peer (a relay offering a wrong body under the right digest)
(or one that never answers) costs its reader a fetch from the broker, never a wrong manifest.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import torch
import zmq.asyncio

from publishers.publisher import open_publisher
from publishers.sources import synthetic_llama
from schemas.frames import RelayManifestRead, RelayRead, decode_relay_read
from schemas.messages import RelayOffer, RelaySource
from streamer.client import PEER_MANIFEST_S, BrokerClient, connect
from streamer.metrics import APPLIED_MANIFEST_SOURCES_TOTAL, MANIFEST_PUSHES_TOTAL
from streamer.node_link import NodeLink, NodeLinkConfig
from streamer.transport import ZmqFrameSender
from subscribers.relay import MAX_HELD, MAX_MANIFESTS_PER_MODEL, RelayError, RelayServer
from subscribers.relay_client import RelayClient
from subscribers.subscriber import PullConfig, Subscriber
from tests.e2e.procs import get_json, get_text, metric
from tests.subscribers.test_relay import relay_subscriber
from tests.support import (
    RunningBroker,
    broker_config,
    eventually,
    run_broker,
    test_keys,
    until,
)

MODEL = "org/relay-manifest"
MODEL_BYTES = 256 << 10
BUCKET_BYTES = 32 << 10
FETCHES = "weightstream_broker_manifest_fetches_total"
CONFIG = PullConfig(max_attempts=2, retry_backoff_s=0.01, relay_timeout_s=2.0)


def body_of(seed: int, nbytes: int = 3000) -> tuple[bytes, str]:
    body = secrets.token_bytes(nbytes) + seed.to_bytes(4, "big")
    return body, hashlib.sha256(body).hexdigest()


@pytest.fixture
def relay_client() -> Iterator[RelayClient]:
    client = RelayClient()
    yield client
    client.close()


@pytest.fixture
def server() -> Iterator[RelayServer]:
    server = RelayServer()
    yield server
    server.close()


def source_of(server: RelayServer, name: str = "holder") -> RelaySource:
    return RelaySource(name=name, endpoint=server.endpoint)


async def read_manifest(
    relay_client: RelayClient,
    server: RelayServer,
    version: int,
    digest: str,
    *,
    model: str = MODEL,
    deadline_s: float = 10.0,
) -> bytes:
    return await asyncio.to_thread(
        relay_client.read_manifest,
        source_of(server),
        model,
        version,
        digest,
        1 << 20,
        time.monotonic() + deadline_s,
    )


# The frames: RelayServer.offer_manifest and RelayClient.read_manifest.


async def test_an_offered_manifest_is_read_back_byte_for_byte(
    server: RelayServer, relay_client: RelayClient
) -> None:
    body, digest = body_of(1)
    server.offer_manifest(MODEL, 1, digest, body)
    assert await read_manifest(relay_client, server, 1, digest) == body
    assert server.served_manifests == 1


async def test_a_read_parked_before_the_offer_is_answered_by_it(
    server: RelayServer, relay_client: RelayClient
) -> None:
    body, digest = body_of(2)
    read = asyncio.create_task(read_manifest(relay_client, server, 2, digest))
    await until(lambda: server.waiting == 1)  # parked: a version newer than any it took
    assert not read.done()
    server.offer_manifest(MODEL, 2, digest, body)
    async with asyncio.timeout(5):
        assert await read == body
    assert server.waiting == 0


async def test_an_old_manifest_it_does_not_hold_is_refused_at_once(
    server: RelayServer, relay_client: RelayClient
) -> None:
    new, new_digest = body_of(3)
    _, old_digest = body_of(4)
    server.offer_manifest(MODEL, 3, new_digest, new)
    started = time.monotonic()
    with pytest.raises(RelayError, match="not_held") as refused:
        await read_manifest(relay_client, server, 2, old_digest, deadline_s=20.0)
    assert refused.value.code == "not_held"
    # The right digest under another version or model: not what was offered either.
    with pytest.raises(RelayError, match="not_held"):
        await read_manifest(relay_client, server, 2, new_digest, deadline_s=20.0)
    assert time.monotonic() - started < 10  # at once, not at the 20 s deadline
    assert server.served_manifests == 0


async def test_the_kept_manifests_are_bounded_per_model_and_in_all(
    server: RelayServer, relay_client: RelayClient
) -> None:
    offered = []
    for version in range(1, MAX_MANIFESTS_PER_MODEL + 3):
        body, digest = body_of(version)
        server.offer_manifest(MODEL, version, digest, body)
        offered.append((MODEL, version, digest, body))
    kept = server.manifests()
    assert kept == [(m, v, d) for m, v, d, _ in offered[-MAX_MANIFESTS_PER_MODEL:]]
    # The oldest was dropped: refused (an older version), the newest still served.
    _, first, first_digest, _ = offered[0]
    with pytest.raises(RelayError, match="not_held"):
        await read_manifest(relay_client, server, first, first_digest)
    _, last, last_digest, last_body = offered[-1]
    assert await read_manifest(relay_client, server, last, last_digest) == last_body
    # Many models: MAX_HELD in all, the oldest dropped first.
    for index in range(MAX_HELD + 2):
        body, digest = body_of(100 + index)
        server.offer_manifest(f"org/other-{index}", 1, digest, body)
    kept = server.manifests()
    assert len(kept) == MAX_HELD
    assert [m for m, _, _ in kept] == [f"org/other-{i}" for i in range(2, MAX_HELD + 2)]


def test_a_manifest_read_decodes_and_its_digest_is_bounded() -> None:
    _, digest = body_of(5)
    read = RelayManifestRead(request_id=7, model=MODEL, version=3, digest=digest, wait_s=1.5)
    assert decode_relay_read(msgspec.msgpack.encode(read)) == read
    bucket = RelayRead(request_id=8, model=MODEL, version=3, region=0, offset=0, nbytes=10)
    assert decode_relay_read(msgspec.msgpack.encode(bucket)) == bucket
    for bad in ("A" * 64, digest[:63], digest + "0", "g" * 64):
        hostile = msgspec.msgpack.encode(
            {"type": "relay_manifest_read", "request_id": 1, "model": MODEL, "version": 1}
            | {"digest": bad}
        )
        with pytest.raises(msgspec.ValidationError):
            decode_relay_read(hostile)


# Relay subscribers under a real broker.


def weights(version: int) -> dict[str, torch.Tensor]:
    return synthetic_llama(MODEL_BYTES, version=version, seed=23)


def engine_holds(tensors: dict[str, torch.Tensor], version: int) -> bool:
    expected = weights(version)
    return all(
        torch.equal(t.view(torch.uint8), expected[n].view(torch.uint8)) for n, t in tensors.items()
    )


class Node:
    def __init__(self, subscriber: Subscriber, tensors: dict[str, torch.Tensor]) -> None:
        self.subscriber = subscriber
        self.tensors = tensors

    @property
    def client(self) -> BrokerClient:
        return self.subscriber.client


@contextlib.asynccontextmanager
async def relay_node(
    broker: RunningBroker, zmq_ctx: zmq.asyncio.Context, name: str, *, via: str | None = None
) -> AsyncIterator[Node]:
    """A relay subscriber named `name`, running (`Subscriber.run`) until the block ends
    (`via`: through that node link)."""
    async with relay_subscriber(
        broker, zmq_ctx, CONFIG, model=MODEL, shapes=weights(0), name=name, via=via
    ) as (subscriber, tensors):
        yield Node(subscriber, tensors)


async def relay_offers(broker: RunningBroker, count: int) -> None:
    """Wait until the broker knows `count` relay offers (they are planned into the Routes)."""

    async def offered() -> bool:
        rows = (await get_json(f"{broker.url}/v1/subscribers"))["subscribers"]
        return sum(row["relay_endpoint"] is not None for row in rows) == count

    await eventually(offered, timeout_s=10)


async def broker_bodies(broker: RunningBroker) -> int:
    return int(metric(await get_text(f"{broker.url}/metrics"), FETCHES))


NODES = 4


def publishing(broker: RunningBroker, zmq_ctx: zmq.asyncio.Context) -> Any:
    """The trainer of these tests: MODEL over ZeroMQ frames, in BUCKET_BYTES buckets."""
    return open_publisher(
        broker.client_config(),
        model=MODEL,
        sender=ZmqFrameSender(),
        bucket_bytes=BUCKET_BYTES,
        context=zmq_ctx,
    )


async def publish_to_all(
    stack: contextlib.AsyncExitStack, broker: RunningBroker, zmq_ctx, nodes: list[Node]
) -> None:
    """Once the broker knows every node's relay offer, publish version 1 and wait until every
    node applied it, byte for byte."""
    await relay_offers(broker, len(nodes))
    publisher = await stack.enter_async_context(publishing(broker, zmq_ctx))
    await publisher.publish(1, weights(1))
    await asyncio.wait_for(publisher.wait_applied(1, len(nodes)), 30)
    for node in nodes:
        assert engine_holds(node.tensors, 1)


async def test_relay_subscribers_take_the_manifest_from_peers_and_the_broker_serves_one(
    broker: RunningBroker, zmq_ctx
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        nodes = [
            await stack.enter_async_context(relay_node(broker, zmq_ctx, f"node-{i}"))
            for i in range(NODES)
        ]
        await publish_to_all(stack, broker, zmq_ctx, nodes)
        # Fanout 2 over node-0..3: stripe 0's tree is node-0 -> (node-1, node-2), node-1 ->
        # node-3. Its root asks the broker; the others their stripe-0 parent.
        fetches = {
            f"node-{i}": (n.client.manifest_fetches, n.client.peer_manifest_fetches)
            for i, n in enumerate(nodes)
        }
        assert fetches == {"node-0": (1, 0), "node-1": (0, 1), "node-2": (0, 1), "node-3": (0, 1)}
        assert all(n.client.peer_manifest_failures == 0 for n in nodes)
        assert await broker_bodies(broker) == 1 < NODES
        # The broker's status says where each node took it (wait_applied: all Applied are in).
        rows = (await get_json(f"{broker.url}/v1/subscribers"))["subscribers"]
        assert {row["name"]: row["manifest_source"] for row in rows} == {
            "node-0": "broker",
            "node-1": "peer:node-0",
            "node-2": "peer:node-0",
            "node-3": "peer:node-1",
        }
        lines = (await get_text(f"{broker.url}/metrics")).splitlines()
        assert f'{APPLIED_MANIFEST_SOURCES_TOTAL}{{source="broker"}} 1.0' in lines
        assert f'{APPLIED_MANIFEST_SOURCES_TOTAL}{{source="peer"}} {NODES - 1:.1f}' in lines
        # Every node serves the body it took, under its digest, byte for byte the broker's.
        root_relay = nodes[0].subscriber.relay
        assert root_relay is not None
        [(_, _, digest)] = root_relay.manifests()
        body = nodes[0].client.manifest_body(digest)
        assert body is not None
        assert hashlib.sha256(body).hexdigest() == digest
        for node in nodes:
            assert node.client.manifest_body(digest) == body
            relay = node.subscriber.relay
            assert relay is not None
            assert (MODEL, 1, digest) in relay.manifests()


async def test_relay_engines_behind_node_links_take_manifests_from_peers_not_pushes(
    broker: RunningBroker, zmq_ctx, tmp_path: Path
) -> None:
    """Two node links of two relay engines each: the broker pushes no manifest to the links
    (their engines all relay), serves one body, and the other engines read theirs from
    peers, as without links."""
    async with contextlib.AsyncExitStack() as stack:
        links = []
        for index in range(2):
            link = NodeLink(
                NodeLinkConfig(
                    broker=broker.endpoint,
                    listen=f"ipc://{tmp_path}/link-{index}/engines.sock",
                    key_file=test_keys().key_file(),
                    broker_key_file=test_keys().broker_public_file,
                ),
                context=zmq_ctx,
            )
            stack.callback(link.close)
            task = asyncio.create_task(link.run())
            stack.push_async_callback(_cancelled, task)
            links.append(link)
        nodes = [
            await stack.enter_async_context(
                relay_node(broker, zmq_ctx, f"node-{i}", via=links[i % 2].endpoint)
            )
            for i in range(NODES)
        ]
        await publish_to_all(stack, broker, zmq_ctx, nodes)
        assert await broker_bodies(broker) == 1
        text = await get_text(f"{broker.url}/metrics")
        assert metric(text, MANIFEST_PUSHES_TOTAL) == 0
        assert sum(n.client.peer_manifest_fetches for n in nodes) == NODES - 1
        rows = (await get_json(f"{broker.url}/v1/subscribers"))["subscribers"]
        assert sorted(row["peer_id"].split("/")[0] for row in rows) == sorted(
            [links[0].link_id] * 2 + [links[1].link_id] * 2
        )
        sources = sorted(row["manifest_source"].split(":")[0] for row in rows)
        assert sources == ["broker", "peer", "peer", "peer"]


async def _cancelled(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


class LyingPeer:
    """A relay subscriber's manifest hook, hostile: it offers every manifest it takes with
    one byte flipped, under the true digest (and reads none from peers itself); or, `silent`,
    never offers one (its readers wait for it until their deadline)."""

    def __init__(self, server: RelayServer, *, silent: bool = False) -> None:
        self.server = server
        self.silent = silent

    async def read(
        self, *, model: str, version: int, digest: str, nbytes: int, deadline: float
    ) -> tuple[str, bytes] | None:
        return None

    def offer(self, *, model: str, version: int, digest: str, body: bytes) -> None:
        if self.silent:
            return
        wrong = body[:-1] + bytes([body[-1] ^ 0xFF])
        self.server.offer_manifest(model, version, digest, wrong)


@pytest.mark.parametrize("silent", [False, True], ids=["wrong-body", "never-answers"])
async def test_a_peer_with_a_wrong_or_no_manifest_costs_a_fetch_from_the_broker(
    zmq_ctx, silent: bool
) -> None:
    async with (
        run_broker(broker_config(relay_fanout=1)) as broker,
        contextlib.AsyncExitStack() as stack,
    ):
        # One tree (fanout 1), ordered by name: the liar is the root, the honest node its child.
        liar_server = RelayServer()
        stack.callback(liar_server.close)
        liar_config = msgspec.structs.replace(broker.client_config(), name="a-liar")
        liar = await stack.enter_async_context(
            connect(liar_config, role="subscriber", context=zmq_ctx)
        )
        liar.manifest_peers = LyingPeer(liar_server, silent=silent)
        await liar.subscribe(MODEL, relay=RelayOffer(endpoint=liar_server.endpoint))
        honest = await stack.enter_async_context(relay_node(broker, zmq_ctx, "b-honest"))
        await relay_offers(broker, 2)
        publisher = await stack.enter_async_context(publishing(broker, zmq_ctx))
        await publisher.publish(1, weights(1))
        started = time.monotonic()
        await until(lambda: honest.client.peer_manifest_failures == 1, timeout_s=10)
        waited_s = time.monotonic() - started
        if silent:  # parked until the read's wait (inside PEER_MANIFEST_S), then refused
            assert liar_server.served_manifests == 0
            assert 1.0 < waited_s < PEER_MANIFEST_S + 5
        else:  # it served its wrong body: refused at once, not at a deadline
            assert liar_server.served_manifests == 1
            assert waited_s < PEER_MANIFEST_S
        # ... and holds no bucket: gone, its bucket readers go to the trainer at once.
        liar_server.close()
        await asyncio.wait_for(publisher.wait_applied(1, 1), 30)
        assert engine_holds(honest.tensors, 1)
        assert honest.client.peer_manifest_fetches == 0
        assert honest.client.manifest_fetches == 1
        relay = honest.subscriber.relay
        assert relay is not None
        [(model, version, digest)] = relay.manifests()
        assert (model, version) == (MODEL, 1)
        body = honest.client.manifest_body(digest)
        assert body is not None
        assert hashlib.sha256(body).hexdigest() == digest
        # What the honest node took (and serves on) is the true body, the broker's.
        assert liar.manifest_body(digest) == body
        assert await broker_bodies(broker) == 2  # the liar's own fetch and the fallback
