"""Relay routes from a real broker to raw DEALER peers speaking the protocol: routes follow the
planner, late joiners read from holders (never the trainer), a relay that goes is planned
around, Retire reaches holders once no lease holds the version, status shows who reads from
whom and who served how much, and bad relay offers are refused without harm."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import zmq
import zmq.asyncio
from hypothesis import given, settings, strategies as st

from schemas.codec import encode
from schemas.messages import (
    AcquireLease,
    Alive,
    Announce,
    Announced,
    Applied,
    Error,
    Goodbye,
    Hello,
    LeaseGranted,
    Message,
    Progress,
    RelayOffer,
    ReleaseLease,
    Retire,
    Route,
    Subscribe,
    Subscribed,
    Welcome,
)
from streamer.__main__ import add_broker_arguments, broker_config as broker_config_from
from streamer.client import BrokerClient, connect
from streamer.errors import BrokerError
from streamer.http import fleet, relay_status
from streamer.metrics import RELAY_SERVED_BYTES_TOTAL, relay_families, relay_snapshot
from streamer.planner import plan
from streamer.registry import Limits, Registry
from tests.streamer.test_broker import raw_peer, receive, shard
from tests.streamer.test_http import parse_prometheus
from tests.support import RunningBroker, broker_config, eventually, run_broker
from weightstream.status import fetch_status, render_status

MODEL = "org/model"
ANNOUNCEMENT = (Announce, Announced)
"""How a version is announced: `Announce` before issue 10's protocol-2 announcements land in
the broker, `Announced` (by digest) to protocol-2 peers after; these tests are about Routes."""


class Relay:
    """A relay subscriber as raw messages: Hello with a stable name, Subscribe with an offer."""

    def __init__(self, socket: zmq.asyncio.Socket, name: str, port: int) -> None:
        self.socket = socket
        self.name = name
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self._ids = iter(range(1, 1 << 30))

    async def send(self, message: Message) -> None:
        await self.socket.send(encode(message))

    async def until(self, kind: type[Message] | tuple[type[Message], ...]) -> list[Message]:
        """Every message up to and including the first `kind` (Alive left out)."""
        seen: list[Message] = []
        while True:
            message = await receive(self.socket)
            if isinstance(message, Alive):
                continue
            seen.append(message)
            if isinstance(message, kind):
                return seen

    async def subscribe(self, model: str = MODEL, *, relay: bool = True) -> list[Message]:
        """Subscribe; returns what came up to Subscribed, plus any Route and Announce after."""
        offer = RelayOffer(endpoint=self.endpoint) if relay else None
        await self.send(Subscribe(request_id=next(self._ids), model=model, relay=offer))
        return await self.until(Subscribed)

    async def round_trip(self) -> list[Message]:
        """Everything the broker sent before the answer to a fresh request: a message it had
        queued for us by then is in here (one connection keeps its order)."""
        await self.send(Subscribe(request_id=next(self._ids), model="another/model"))
        return (await self.until(Subscribed))[:-1]


@contextlib.asynccontextmanager
async def relays(
    broker: RunningBroker, ctx: zmq.asyncio.Context, names: list[str], *, subscribe: bool = True
) -> AsyncIterator[dict[str, Relay]]:
    async with contextlib.AsyncExitStack() as stack:
        peers: dict[str, Relay] = {}
        for index, name in enumerate(names):
            peer_id = f"relay-{name}"
            socket = await stack.enter_async_context(raw_peer(ctx, broker.endpoint, peer_id))
            await socket.send(encode(Hello(peer_id=peer_id, role="subscriber", name=name)))
            assert isinstance(await receive(socket), Welcome)
            peers[name] = Relay(socket, name, 7100 + index)
            if subscribe:
                assert isinstance((await peers[name].subscribe())[-1], Subscribed)
        yield peers


@contextlib.asynccontextmanager
async def trainer(broker: RunningBroker, ctx: zmq.asyncio.Context) -> AsyncIterator[BrokerClient]:
    async with connect(broker.client_config(), role="publisher", context=ctx) as client:
        yield client


def version_of(announcement: Message) -> int:
    if isinstance(announcement, Announce):
        return announcement.manifest.version
    assert isinstance(announcement, Announced)
    return announcement.version


async def routes_and_announce(peer: Relay) -> tuple[Route, Message]:
    """A planned relay's Route comes ahead of the announcement it is for."""
    messages = await peer.until(ANNOUNCEMENT)
    assert len(messages) == 2, messages
    route, announce = messages
    assert isinstance(route, Route)
    assert isinstance(announce, ANNOUNCEMENT)
    assert (route.model, route.version) == (MODEL, version_of(announce))
    return route, announce


def parent_names(route: Route) -> list[str]:
    return ["" if p is None else p.name for p in route.parents]


async def test_routes_for_relay_subscribers_follow_the_planner(broker, zmq_ctx) -> None:
    names = ["node-e", "node-a", "node-d", "node-c", "node-b", "node-f", "node-g"]
    async with relays(broker, zmq_ctx, names) as peers, trainer(broker, zmq_ctx) as publisher:
        await publisher.publish(MODEL, 1, 0, 1, shard())
        routes = {name: (await routes_and_announce(peer))[0] for name, peer in peers.items()}

    expected = plan(sorted(names), source="", fanout=2)  # stable order: by name
    uplinks: dict[str, int] = {}
    for name, route in routes.items():
        assert route.fanout == 2
        assert parent_names(route) == list(expected.parents[name])  # one parent per stripe
        for parent in route.parents:
            if parent is not None:
                assert parent.endpoint == peers[parent.name].endpoint
        for source in parent_names(route):
            uplinks[source] = uplinks.get(source, 0) + 1
        assert name not in {f.name for f in route.fallbacks}
        assert not {f.name for f in route.fallbacks} & set(parent_names(route))
    assert uplinks.pop("") == 2  # the trainer feeds one root per stripe
    assert max(uplinks.values()) <= 2  # no uplink serves more than k stripes
    assert sum(uplinks.values()) == 2 * len(names) - 2


async def test_a_late_joiner_reads_only_from_holders_that_applied_the_version(
    broker, zmq_ctx
) -> None:
    async with (
        relays(broker, zmq_ctx, ["node-a", "node-b", "node-c"]) as peers,
        trainer(broker, zmq_ctx) as publisher,
    ):
        await publisher.publish(MODEL, 1, 0, 1, shard())
        for peer in peers.values():
            await routes_and_announce(peer)
        for name in ("node-a", "node-c"):
            await peers[name].send(Applied(model=MODEL, version=1))
            await peers[name].round_trip()  # the broker has taken it

        async with relays(broker, zmq_ctx, ["node-z"], subscribe=False) as late:
            messages = await late["node-z"].subscribe()
            messages += await late["node-z"].until(ANNOUNCEMENT)

    assert [type(m) for m in messages[:2]] == [Subscribed, Route], messages
    assert isinstance(messages[2], ANNOUNCEMENT)
    assert len(messages) == 3
    route = messages[1]
    assert isinstance(route, Route)
    assert route.version == 1
    assert None not in route.parents  # never the trainer
    assert sorted(parent_names(route)) == ["node-a", "node-c"]  # spread, one stripe each
    assert {f.name for f in route.fallbacks} <= {"node-a", "node-b", "node-c"}


async def test_survivors_of_a_relay_that_goes_get_new_routes_without_it(broker, zmq_ctx) -> None:
    names = ["node-a", "node-b", "node-c", "node-d", "node-e"]
    async with relays(broker, zmq_ctx, names) as peers, trainer(broker, zmq_ctx) as publisher:
        await publisher.publish(MODEL, 1, 0, 1, shard())
        before = {name: (await routes_and_announce(peer))[0] for name, peer in peers.items()}
        assert any("node-a" in parent_names(r) for r in before.values())  # it relays to someone

        await peers["node-a"].send(Goodbye(reason="test"))
        await eventually(lambda: _state_of(broker, "node-a", "gone"))
        survivors = [n for n in names if n != "node-a"]
        expected = plan(survivors, source="", fanout=2)
        for name in survivors:
            changed = list(expected.parents[name]) != parent_names(before[name])
            sent = await peers[name].round_trip()
            if not changed:
                assert sent == []
                continue
            [route] = sent
            assert isinstance(route, Route)
            assert route.version == 1
            assert parent_names(route) == list(expected.parents[name])
            assert "node-a" not in parent_names(route)
            assert "node-a" not in {f.name for f in route.fallbacks}


async def test_retire_reaches_holders_once_no_lease_holds_the_version(zmq_ctx) -> None:
    async with (
        run_broker(broker_config(retention=1)) as broker,
        relays(broker, zmq_ctx, ["node-a", "node-b"]) as peers,
        trainer(broker, zmq_ctx) as publisher,
    ):
        await publisher.publish(MODEL, 1, 0, 1, shard())
        holder, reader = peers["node-a"], peers["node-b"]
        for peer in peers.values():
            await routes_and_announce(peer)
        await holder.send(Applied(model=MODEL, version=1))
        await reader.send(AcquireLease(request_id=99, model=MODEL, version=1))
        assert isinstance((await reader.until(LeaseGranted))[-1], LeaseGranted)

        await publisher.publish(MODEL, 2, 0, 1, shard())  # version 1 leaves the window
        await routes_and_announce(holder)
        await routes_and_announce(reader)
        assert not [m for m in await holder.round_trip() if isinstance(m, Retire)]  # leased

        await reader.send(ReleaseLease(model=MODEL, version=1))
        [retire] = [m for m in await holder.until(Retire) if isinstance(m, Retire)]
        assert isinstance(retire, Retire)
        assert (retire.model, retire.version) == (MODEL, 1)
        # The reader staged version 1 too (it was routed): it may free it now.
        assert [(m.model, m.version) for m in await reader.until(Retire) if isinstance(m, Retire)]
        published = await asyncio.wait_for(publisher.retired.get(), 5)
        assert (published.model, published.version) == (MODEL, 1)


async def _state_of(broker: RunningBroker, name: str, state: str) -> bool:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{broker.url}/v1/subscribers?state={state}") as response,
    ):
        rows = (await response.json())["subscribers"]
    return any(row["name"] == name for row in rows)


async def _version_status(broker: RunningBroker, version: int) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{broker.url}/v1/models/{MODEL}/versions/{version}") as response,
    ):
        assert response.status == 200
        body: dict[str, Any] = await response.json()
    return body


async def test_status_shows_who_reads_from_whom_and_bytes_served_per_holder(
    broker, zmq_ctx
) -> None:
    async with (
        relays(broker, zmq_ctx, ["node-a", "node-b"]) as peers,
        trainer(broker, zmq_ctx) as publisher,
    ):
        await publisher.publish(MODEL, 1, 0, 1, shard())
        routes = {n: (await routes_and_announce(p))[0] for n, p in peers.items()}
        # plan(a, b): a reads stripe 0 from the trainer and stripe 1 from b, b the reverse.
        assert parent_names(routes["node-a"]) == ["", "node-b"]
        progress = Progress(
            model=MODEL,
            version=1,
            bytes_done=384,
            bytes_total=512,
            bytes_per_s=2e6,
            sources={"": 128, "node-b": 256, "node-invented": 10**9},
        )
        await peers["node-a"].send(progress)

        async def served() -> dict[str, Any] | None:
            relay = (await _version_status(broker, 1))["relay"]
            return relay if relay["served_bytes"]["holders"] else None

        relay = await eventually(served)
        status = await fetch_status(broker.url)
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{broker.url}/metrics") as response,
        ):
            _, samples = parse_prometheus(await response.text())

    # Invented holders are not counted: only the trainer and the version's stagers.
    assert relay["served_bytes"] == {"trainer": 128, "holders": {"node-b": 256}}
    nodes = {n["name"]: n for n in relay["nodes"]}
    assert nodes["node-a"]["reads_from"] == ["trainer", "node-b"]
    assert nodes["node-b"]["reads_from"] == ["node-a", "trainer"]
    assert nodes["node-a"]["bytes_per_s"] == 2e6
    assert nodes["node-a"]["progress"] == 0.75
    assert nodes["node-a"]["read_bytes"] == {"trainer": 128, "node-b": 256}
    assert nodes["node-b"]["served_bytes"] == 256
    assert relay["planned_nodes"] == 2

    rows = {s["name"]: s for s in status["subscribers"]}
    assert rows["node-b"]["served_bytes"] == 256
    assert rows["node-a"]["reads_from"] == ["trainer", "node-b"]
    assert rows["node-a"]["relay_endpoint"] == peers["node-a"].endpoint
    [line] = [line for line in render_status(status).splitlines() if line.startswith("node-b")]
    assert "node-a,trainer" in line
    assert "256 B" in line

    def counter(holder: str) -> float:
        return samples[
            (RELAY_SERVED_BYTES_TOTAL, frozenset({("model", MODEL), ("holder", holder)}))
        ]

    assert (counter("node-b"), counter("(trainer)")) == (256, 128)
    assert not [k for k in samples if ("holder", "node-invented") in k[1]]


@pytest.mark.parametrize(
    ("offer", "why"),
    [
        ({"endpoint": ""}, "tcp://HOST:PORT"),
        ({"endpoint": "http://node:7100"}, "tcp://HOST:PORT"),
        ({"endpoint": "tcp://*:7100"}, "where a server binds"),
        ({"endpoint": "tcp://0.0.0.0:7100"}, "where a server binds"),
        ({"endpoint": "tcp://node"}, "port from 1 to 65535"),
        ({"endpoint": "tcp://node:0"}, "port from 1 to 65535"),
        ({"endpoint": "tcp://node:99999"}, "port from 1 to 65535"),
        ({"endpoint": "tcp://no de:7100"}, "host name"),
        ({"endpoint": "tcp://\x00\x1b[2J:7100"}, "host name"),
        ({"endpoint": "tcp://[zz]:7100"}, "host name"),
        ({"endpoint": "ipc://"}, "ipc:// needs a path"),
        ({"endpoint": "tcp://node:7100", "server_key": "short"}, "Z85 CURVE public key"),
        ({"endpoint": "tcp://node:7100", "server_key": "\u00e9" * 40}, "Z85 CURVE public key"),
    ],
)
async def test_a_bad_relay_offer_gets_a_clear_error_and_nothing_breaks(
    broker, zmq_ctx, offer: dict[str, str], why: str
) -> None:
    async with relays(broker, zmq_ctx, ["node-x"], subscribe=False) as peers:
        peer = peers["node-x"]
        await peer.socket.send(
            encode({"kind": "subscribe", "request_id": 41, "model": MODEL, "relay": offer})
        )
        [error] = await peer.until(Error)
        assert isinstance(error, Error)
        assert (error.code, error.request_id) == ("bad_request", 41)
        assert "relay" in error.detail
        assert why in error.detail
        assert "\x1b" not in error.detail  # control characters are not echoed

        # The same connection subscribes without relay; nothing was recorded for the bad offer.
        async with trainer(broker, zmq_ctx) as publisher:
            assert isinstance((await peer.subscribe(relay=False))[-1], Subscribed)
            await publisher.publish(MODEL, 1, 0, 1, shard())
            assert len(await peer.until(ANNOUNCEMENT)) == 1  # no Route
        status = await fetch_status(broker.url)
    [row] = [s for s in status["subscribers"] if s["name"] == "node-x"]
    assert row["relay_endpoint"] is None


@pytest.mark.parametrize(
    "relay",
    [
        {"endpoint": "tcp://node:" + "7" * 300},  # past the type's length bound
        {"endpoint": "tcp://node:7100", "extra": 1},  # RelayOffer forbids unknown fields
        {"endpoint": 7100},
    ],
    ids=["too-long", "unknown-field", "not-a-string"],
)
async def test_a_malformed_relay_offer_is_a_protocol_error(broker, zmq_ctx, relay) -> None:
    async with relays(broker, zmq_ctx, ["node-x"], subscribe=False) as peers:
        peer = peers["node-x"]
        await peer.socket.send(
            encode({"kind": "subscribe", "request_id": 7, "model": MODEL, "relay": relay})
        )
        [error] = await peer.until(Error)
        assert isinstance(error, Error)
        assert error.code == "protocol"
        assert isinstance((await peer.subscribe())[-1], Subscribed)  # still served


async def test_relay_fanout_zero_sends_no_routes(zmq_ctx) -> None:
    async with (
        run_broker(broker_config(relay_fanout=0)) as broker,
        relays(broker, zmq_ctx, ["node-a", "node-b"]) as peers,
        trainer(broker, zmq_ctx) as publisher,
    ):
        await publisher.publish(MODEL, 1, 0, 1, shard())
        for peer in peers.values():
            assert len(await peer.until(ANNOUNCEMENT)) == 1  # no Route


# The registry alone (pure state, the clock passed in): the expiry tick, and who feeds a late
# joiner when nobody has applied the version yet.


def _registry_with_relays(names: list[str], **kwargs: Any) -> Registry:
    registry = Registry(**kwargs)
    registry.hello("trainer-0", "publisher", "h", 1, 0.0)
    for index, name in enumerate(names):
        registry.hello(f"relay-{name}", "subscriber", "h", 2, 0.0, name=name)
        offer = RelayOffer(endpoint=f"tcp://127.0.0.1:{7100 + index}")
        assert registry.subscribe(f"relay-{name}", MODEL, relay=offer) is None
    announced, _ = registry.publish("trainer-0", MODEL, 1, 0, 1, shard(), 0.0)
    assert announced
    return registry


def _routes(outbox: list[tuple[str, Message]]) -> dict[str, Route]:
    return {peer: m for peer, m in outbox if isinstance(m, Route)}


def test_a_relay_that_falls_silent_is_planned_around_at_the_expiry_tick() -> None:
    names = ["node-a", "node-b", "node-c", "node-d"]
    registry = _registry_with_relays(names, peer_timeout_s=5.0)
    before = _routes(registry.relay_routes(MODEL, 1))
    assert len(before) == 4
    for peer_id in ["trainer-0", "relay-node-b", "relay-node-c", "relay-node-d"]:
        registry.touch(peer_id, 4.0)

    after = _routes(registry.expire(6.0))  # node-a silent for 6 s

    expected = plan(["node-b", "node-c", "node-d"], source="", fanout=2)
    readers_of_a = {p for p, r in before.items() if "node-a" in parent_names(r)}
    assert readers_of_a
    assert readers_of_a <= set(after)
    for peer_id, route in after.items():
        name = peer_id.removeprefix("relay-")
        assert parent_names(route) == list(expected.parents[name])
        assert "node-a" not in parent_names(route) + [f.name for f in route.fallbacks]


def test_a_late_joiner_before_anyone_applied_reads_from_nodes_in_flight() -> None:
    registry = _registry_with_relays(["node-a", "node-b"])
    registry.relay_routes(MODEL, 1)
    registry.hello("relay-node-z", "subscriber", "h", 3, 1.0, name="node-z")
    offer = RelayOffer(endpoint="tcp://127.0.0.1:7199")
    assert registry.subscribe("relay-node-z", MODEL, relay=offer) is not None

    [(peer, route)] = registry.relay_joined("relay-node-z", MODEL, 1)

    assert peer == "relay-node-z"
    assert isinstance(route, Route)
    assert sorted(parent_names(route)) == ["node-a", "node-b"]  # pipelined from the tree


def test_a_planned_relay_that_subscribes_again_keeps_its_place_in_the_trees() -> None:
    registry = _registry_with_relays(["node-a", "node-b", "node-c"])
    planned = _routes(registry.relay_routes(MODEL, 1))
    registry.hello("relay-node-b", "subscriber", "h", 2, 1.0, name="node-b")  # a reconnect
    offer = RelayOffer(endpoint="tcp://127.0.0.1:7101")
    assert registry.subscribe("relay-node-b", MODEL, relay=offer) is not None

    [(_, route)] = registry.relay_joined("relay-node-b", MODEL, 1)
    assert isinstance(route, Route)

    # Not parents picked among nodes in flight, which include its own children.
    assert parent_names(route) == parent_names(planned["relay-node-b"])


def test_the_broker_flag_sets_the_fanout_and_refuses_one_past_the_protocol() -> None:
    parser = argparse.ArgumentParser()
    add_broker_arguments(parser)
    assert broker_config_from(parser.parse_args(["--relay-fanout", "0"])).relay_fanout == 0
    assert broker_config_from(parser.parse_args([])).relay_fanout == 2
    with pytest.raises(ValueError, match="relay_fanout"):
        broker_config_from(parser.parse_args(["--relay-fanout", "65"]))


def test_a_rejoining_relay_whose_tree_parent_is_between_hello_and_subscribe_reads_that_stripe_from_the_trainer() -> (
    None
):
    registry = _registry_with_relays(["node-a", "node-b", "node-c"])
    planned = _routes(registry.relay_routes(MODEL, 1))
    assert parent_names(planned["relay-node-c"]) == ["node-a", "node-b"]
    for name in ("node-b", "node-c"):  # both reconnect; node-b has not subscribed again yet
        registry.hello(f"relay-{name}", "subscriber", "h", 2, 1.0, name=name)
    offer = RelayOffer(endpoint="tcp://127.0.0.1:7102")
    assert registry.subscribe("relay-node-c", MODEL, relay=offer) is not None

    [(_, route)] = registry.relay_joined("relay-node-c", MODEL, 1)

    assert isinstance(route, Route)
    assert parent_names(route) == ["node-a", ""]  # node-b offers nothing now
    assert "node-b" not in {f.name for f in route.fallbacks}


_OPS = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "join",
                "rehello",
                "plain",
                "goodbye",
                "applied",
                "heartbeat",
                "progress",
                "publish",
                "tick",
            ]
        ),
        st.integers(0, 3),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(ops=_OPS, fanout=st.integers(0, 3))
def test_any_sequence_of_relay_events_keeps_routes_to_live_relays(ops, fanout) -> None:
    """Joins, reconnects, departures, applies, versions and ticks in any order: the registry
    raises nothing but BrokerError, and every Route it sends names only relays live then."""
    registry = Registry(peer_timeout_s=5.0, limits=Limits(gone_peer_ttl_s=1.0), relay_fanout=fanout)
    registry.hello("trainer-0", "publisher", "h", 1, 0.0)
    now, version = 0.0, 0
    for op, index in ops:
        peer_id, name = f"relay-{index}", f"node-{index % 4}"  # names may repeat
        now += 0.5
        registry.touch("trainer-0", now)
        out: list[tuple[str, Message]] = []
        try:
            if op in ("join", "rehello"):  # a (re)connect, then (join) a relay Subscribe
                registry.hello(peer_id, "subscriber", "h", index, now, name=name)
            if op in ("join", "plain") and registry.known(peer_id):
                offer = RelayOffer(endpoint=f"tcp://127.0.0.1:{7100 + index}")
                current = registry.subscribe(peer_id, MODEL, relay=offer if op == "join" else None)
                if current is not None:
                    out += registry.relay_joined(peer_id, MODEL, current.version)
            elif op == "goodbye":
                out += registry.goodbye(peer_id, now)
            elif op == "applied" and registry.known(peer_id) and version:
                out += registry.applied(peer_id, MODEL, version, 0.1, 0.01, now)
            elif op == "heartbeat" and registry.known(peer_id) and version:
                registry.touch(peer_id, now)
                out += registry.heartbeat(peer_id, {MODEL: version}, now)
            elif op == "progress" and registry.known(peer_id) and version:
                sources = {"": index, "node-1": 2 * index, "nobody": 5}
                registry.progress(peer_id, MODEL, version, 3, 9, 1.0, sources=sources)
            elif op == "publish":
                version += 1
                _, outbox = registry.publish("trainer-0", MODEL, version, 0, 1, shard(), now)
                out += registry.relay_routes(MODEL, version) + outbox
            elif op == "tick":
                now += 3.0
                registry.touch("trainer-0", now)
                out += registry.expire(now)
        except BrokerError:
            continue
        # What status renders from this state (the HTTP handlers run on the broker's loop).
        fleet(registry, now)
        for number, record in registry.models[MODEL].versions.items() if version else ():
            relay_status(registry, MODEL, number, record)
        for peer, message in out:
            if not isinstance(message, Route):
                continue
            assert registry.known(peer)
            assert len(message.parents) == message.fanout == fanout
            for source in [*message.parents, *message.fallbacks]:
                if source is None:
                    continue
                holders = [
                    p
                    for p, o in registry.relays.offers.get(MODEL, {}).items()
                    if registry.known(p) and o.endpoint == source.endpoint
                ]
                assert holders, f"{source} is not a live relay"
                assert peer not in holders or source.name != registry.peers[peer].name
    list(relay_families(relay_snapshot(registry)))
