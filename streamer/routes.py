"""Relay routes, the broker's side: which subscribers offer to relay a model, and the `Route`
each of them is sent for a version (pure state: no sockets, no clock; the registry owns it).

    Subscribe(relay=offer) ──> Relays.offer()      offers: model -> peer_id -> RelayOffer
    version announced      ──> Relays.announced()  plan() over the offering peers (sorted by
                                                   stable name), the trainer as source: one
                                                   Route per node, sent before the Announce
    relay joins late       ──> Relays.joined()     parents: holders that applied the version,
                                                   one stripe each (in-flight nodes if none
                                                   applied it yet; the trainer if there are none)
    a relay goes           ──> Relays.departed()   plan() afresh over the survivors; a new Route
                                                   to each reader whose parents changed
    Applied / Heartbeat    ──> Relays.held()       complete holders of the version
    Progress.sources       ──> Relays.progress()   bytes served per holder (status, /metrics)
    version retired        ──> RelayVersion.stagers  get Retire: they kept its staging for readers

Why a fresh plan and not `planner.heal` when a relay goes: heal piles the orphans onto their
nearest live ancestor's one uplink; a fresh plan balances every uplink again, and every node
keeps the buckets it has verified (streamer/planner.py has the simulated figures).

The trainer is the plan's source under the id "" (no ZeroMQ routing id is empty); a Route names
it as a None parent. Every collection is bounded by the registry's peer and subscription limits;
Route fallbacks by `MAX_FALLBACKS`; metric labels by `MAX_SERVED_LABELS`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from schemas.messages import RelayOffer, RelaySource, Route
from streamer.errors import BrokerError
from streamer.planner import Plan, plan

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from streamer.registry import Outbox, PeerState

__all__ = [
    "MAX_FALLBACKS",
    "MAX_SERVED_LABELS",
    "OTHER_LABEL",
    "TRAINER",
    "TRAINER_LABEL",
    "RelayVersion",
    "Relays",
    "check_offer",
]

logger = logging.getLogger(__name__)

TRAINER = ""
"""The plan's source id, and the trainer's key in `Progress.sources`."""
TRAINER_LABEL = "(trainer)"
"""The trainer's `holder` label in metrics (no stable name is ever this)."""
OTHER_LABEL = "(other)"
"""Where served bytes go once `MAX_SERVED_LABELS` holders are counted."""
MAX_FALLBACKS = 8
"""Fallbacks per Route (the protocol allows MAX_SOURCES): the nearest ancestors and holders;
past them a reader goes to the trainer."""
MAX_SERVED_LABELS = 1024
"""(model, holder) series of the served-bytes counter; later holders count under (other)."""
_Z85 = frozenset(
    "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"
)
_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_")
_WILDCARDS = frozenset({"*", "0.0.0.0", "[::]", "[*]"})  # noqa: S104  (refused, not bound)


def check_offer(offer: RelayOffer) -> None:
    """Raise `BrokerError("bad_request")` unless `offer` names a relay server that other
    subscribers can connect to: `tcp://HOST:PORT` (or `ipc://PATH` on one machine), and a
    Z85 CURVE key of 40 characters or none.

    >>> check_offer(RelayOffer(endpoint="tcp://10.0.0.7:7100"))
    """
    endpoint = offer.endpoint
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://") :]
        if not path or not path.isprintable() or any(c.isspace() for c in path):
            raise _bad_offer(endpoint, "ipc:// needs a path without spaces or control characters")
    elif endpoint.startswith("tcp://"):
        host, sep, port = endpoint[len("tcp://") :].rpartition(":")
        if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise _bad_offer(endpoint, "it needs a port from 1 to 65535 (tcp://HOST:PORT)")
        if host in _WILDCARDS:
            raise _bad_offer(
                endpoint,
                "that is where a server binds, not where others connect: offer this node's "
                "address (tcp://10.0.0.7:PORT, a host name)",
            )
        ipv6 = host.startswith("[") and host.endswith("]") and len(host) > 2
        if ipv6:
            valid = all(c in "0123456789abcdefABCDEF:." for c in host[1:-1])
        else:
            valid = bool(host) and host[0] not in "-." and all(c in _HOST_CHARS for c in host)
        if not valid:
            raise _bad_offer(endpoint, "the host must be a host name, an IPv4 or a [IPv6] address")
    else:
        raise _bad_offer(endpoint, "relay servers listen on tcp://HOST:PORT (or ipc://PATH)")
    key = offer.server_key
    if key and (len(key) != 40 or not all(c in _Z85 for c in key)):
        raise BrokerError(
            "bad_request",
            "Subscribe.relay.server_key is not a Z85 CURVE public key (40 characters): send the "
            "relay server's public key, or an empty one for a plain socket",
        )


def _bad_offer(endpoint: str, why: str) -> BrokerError:
    shown = endpoint if endpoint.isprintable() else ascii(endpoint)
    return BrokerError(
        "bad_request",
        f"Subscribe.relay.endpoint {shown[:120]!r} is not a relay endpoint: {why}; "
        "subscribe without relay to read from the trainer only",
    )


@dataclass
class RelayVersion:
    """One version's relay state, owned by its `VersionRecord` (gone when it is retired)."""

    plan: Plan | None = None
    """The plan of the nodes routed at the announcement (replanned when one goes)."""
    routes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """peer_id -> the parent ids per stripe of the last Route sent to it ("" = the trainer)."""
    stagers: set[str] = field(default_factory=set)
    """Relay peers that staged it (routed, or applied it): each gets Retire when it retires."""
    complete: set[str] = field(default_factory=set)
    """Relay peers that applied it: whole holders, the parents of late joiners."""
    names: set[str] = field(default_factory=set)
    """Stable names of its stagers: the only `Progress.sources` keys counted (and ``"")."""
    served: dict[str, dict[str, int]] = field(default_factory=dict)
    """reader peer_id -> source name -> bytes verified from it (the most reported)."""
    served_by: dict[str, int] = field(default_factory=dict)
    """source name -> bytes all its readers verified from it ("" = the trainer)."""
    late_joins: int = 0
    """Late joiners routed so far: rotates which holders serve the next one."""


@dataclass
class _Interned:
    """One planning pass's messages: a Route per distinct (parents, fallbacks), a RelaySource
    per peer, so that readers sharing them share objects (the broker encodes each once)."""

    routes: dict[tuple[tuple[str, ...], tuple[str, ...]], Route] = field(default_factory=dict)
    sources: dict[str, RelaySource] = field(default_factory=dict)


class Relays:
    """The relay offers of every model and the Routes they are sent (see the module doc).

    `peers` is the registry's peer table (read only here): names, who is gone, what applied.
    """

    def __init__(self, *, fanout: int, peers: Mapping[str, PeerState]) -> None:
        if fanout < 0:
            raise ValueError(f"relay fanout must be >= 0 (0: no routes), not {fanout}")
        self.fanout = fanout
        self._peers = peers
        self.offers: dict[str, dict[str, RelayOffer]] = {}
        """model -> peer_id -> its relay server, while it follows the model."""
        self._peers_seen = 0
        """How many peers the registry held at the last `forget_missing`."""
        self.served_total: dict[tuple[str, str], int] = {}
        """(model, holder label) -> bytes readers verified from it, ever (a counter)."""

    # offers

    def offer(self, peer_id: str, model: str, offer: RelayOffer | None) -> None:
        """Record (or, with None, withdraw) `peer_id`'s relay offer for `model`; the registry
        has already bounded how many models a peer follows."""
        if offer is None:
            self._withdraw(peer_id, model)
            return
        check_offer(offer)
        self.offers.setdefault(model, {})[peer_id] = offer

    def offered(self, peer_id: str, model: str) -> RelayOffer | None:
        return self.offers.get(model, {}).get(peer_id)

    def _withdraw(self, peer_id: str, model: str) -> None:
        offers = self.offers.get(model)
        if offers is not None and offers.pop(peer_id, None) is not None and not offers:
            del self.offers[model]

    def drop(self, peer_id: str) -> list[str]:
        """Forget every offer of `peer_id` (it went, or said Hello again); returns the models."""
        models = [model for model, offers in self.offers.items() if peer_id in offers]
        for model in models:
            self._withdraw(peer_id, model)
        return models

    def forget_missing(self, versions: Iterable[RelayVersion]) -> None:
        """Peers the registry forgot leave no trace in the versions (checked only when the
        registry holds fewer peers than at the last check: a peer was forgotten)."""
        if len(self._peers) >= self._peers_seen:
            self._peers_seen = len(self._peers)
            return
        self._peers_seen = len(self._peers)
        for relay in versions:
            for ids in (relay.stagers, relay.complete):
                ids.intersection_update(self._peers)
            for table in (relay.routes, relay.served):
                for peer_id in [p for p in table if p not in self._peers]:
                    del table[peer_id]

    def _order(self, peer_ids: Iterable[str]) -> list[str]:
        """Stable order: by stable name (kept across restarts), then peer id; peers the
        registry no longer knows are left out."""
        known = [p for p in peer_ids if p in self._peers]
        return sorted(known, key=lambda p: (self._peers[p].name, p))

    def _live(self, peer_id: str, model: str) -> bool:
        peer = self._peers.get(peer_id)
        return peer is not None and not peer.gone and peer_id in self.offers.get(model, {})

    def _done(self, peer_id: str, model: str, version: int) -> bool:
        peer = self._peers.get(peer_id)
        return peer is not None and peer.applied.get(model, -1) >= version

    def _source(self, peer_id: str, model: str, made: dict[str, RelaySource]) -> RelaySource:
        """`peer_id`'s RelaySource; `made` keeps those of one planning pass (one object each)."""
        source = made.get(peer_id)
        if source is None:
            offer = self.offers[model][peer_id]
            source = made[peer_id] = RelaySource(
                name=self._peers[peer_id].name, endpoint=offer.endpoint, server_key=offer.server_key
            )
        return source

    # routes

    def announced(self, model: str, version: int, relay: RelayVersion) -> Outbox:
        """Plan `version` over the model's relay subscribers; a Route for each of them."""
        nodes = self._order(p for p in self.offers.get(model, {}) if self._live(p, model))
        self._stage(relay, nodes)
        if self.fanout == 0 or not nodes:
            return []
        relay.plan = plan(nodes, source=TRAINER, fanout=self.fanout)
        out = self._routes_from_plan(model, version, relay, changed_only=False)
        logger.info(
            "relay planned model=%s version=%d nodes=%d fanout=%d routes=%d",
            model,
            version,
            len(nodes),
            self.fanout,
            len(out),
        )
        return out

    def joined(self, peer_id: str, model: str, version: int, relay: RelayVersion) -> Outbox:
        """A relay subscriber that (re)subscribed after `version` was announced: it reads
        each stripe from a holder that applied the version, spread over them."""
        if not self._live(peer_id, model):
            return []
        self._stage(relay, [peer_id])
        if self.fanout == 0 or self._done(peer_id, model, version):
            return []
        out = self._late_route(peer_id, model, version, relay)
        logger.info(
            "relay late joiner peer=%s model=%s version=%d parents=%s",
            peer_id,
            model,
            version,
            ",".join(
                self._peers[p].name if p else "trainer" for p in relay.routes.get(peer_id, ())
            ),
        )
        return out

    def departed(
        self, peer_id: str, model: str, versions: Iterable[tuple[int, RelayVersion]]
    ) -> Outbox:
        """`peer_id` no longer serves `model` (call after `drop`): replan each version still
        being pulled over the survivors, and re-route the late joiners it fed."""
        out: Outbox = []
        for version, relay in versions:
            relay.complete.discard(peer_id)
            relay.routes.pop(peer_id, None)
            pulling = [p for p in relay.routes if not self._done(p, model, version)]
            if not pulling or self.fanout == 0:
                continue
            sent = len(out)
            if relay.plan is not None and peer_id in relay.plan.nodes:
                survivors = [n for n in relay.plan.nodes if self._live(n, model)]
                relay.plan = None
                if survivors:
                    relay.plan = plan(survivors, source=TRAINER, fanout=self.fanout)
                    out += self._routes_from_plan(model, version, relay, changed_only=True)
            planned = set(relay.plan.nodes) if relay.plan is not None else set()
            for reader in self._order(p for p in pulling if p not in planned):
                if peer_id in relay.routes.get(reader, ()) and self._live(reader, model):
                    out += self._late_route(reader, model, version, relay, avoid=peer_id)
            logger.info(
                "relay replanned model=%s version=%d gone=%s survivors=%d rerouted=%d",
                model,
                version,
                peer_id,
                len(planned),
                len(out) - sent,
            )
        return out

    def held(self, peer_id: str, model: str, relay: RelayVersion) -> None:
        """`peer_id` applied the version: if it relays `model`, it is a whole holder now."""
        if self._live(peer_id, model):
            self._stage(relay, [peer_id])
            relay.complete.add(peer_id)

    def _stage(self, relay: RelayVersion, peer_ids: Iterable[str]) -> None:
        for peer_id in peer_ids:
            relay.stagers.add(peer_id)
            relay.names.add(self._peers[peer_id].name)

    def _routes_from_plan(
        self,
        model: str,
        version: int,
        relay: RelayVersion,
        *,
        changed_only: bool,
        only: str | None = None,
    ) -> Outbox:
        assert relay.plan is not None
        current = relay.plan
        holders = self._order(p for p in relay.complete if self._live(p, model))
        interned = _Interned()
        out: Outbox = []
        for node in current.nodes if only is None else (only,):
            if self._done(node, model, version):
                continue
            # A parent that offers nothing now (it said Hello again and has not subscribed
            # again yet): that stripe comes from the trainer.
            parents = tuple(
                p if p == TRAINER or self._live(p, model) else TRAINER
                for p in current.parents[node]
            )
            if changed_only and relay.routes.get(node) == parents:
                continue
            # Fallbacks: the stripes' ancestors above the parents, nearest first (a level of
            # every stripe, then the next), then the whole holders.
            fallbacks: list[str] = []
            level = list(parents)
            while len(fallbacks) < MAX_FALLBACKS and any(a != TRAINER for a in level):
                level = [
                    TRAINER if a == TRAINER else current.parents[a][stripe]
                    for stripe, a in enumerate(level)
                ]
                fallbacks += [a for a in level if a != TRAINER]
            fallbacks += holders[:MAX_FALLBACKS]
            route = self._route(model, version, node, parents, fallbacks, interned)
            relay.routes[node] = parents
            out.append((node, route))
        return out

    def _late_route(
        self, peer_id: str, model: str, version: int, relay: RelayVersion, *, avoid: str = ""
    ) -> Outbox:
        def usable(p: str) -> bool:
            return p not in (peer_id, avoid) and self._live(p, model)

        whole = self._order(p for p in relay.complete if usable(p))
        planned = relay.plan.nodes if relay.plan is not None else ()
        if not whole and peer_id in planned:
            # A planned node that subscribed again (a reconnect) keeps its place in the
            # trees: parents picked from nodes in flight could be its own children.
            assert relay.plan is not None
            return self._routes_from_plan(model, version, relay, changed_only=False, only=peer_id)
        # Nobody applied it yet: in-flight nodes serve what they verified, bucket by bucket.
        in_flight = [p for p in planned if usable(p) and p not in relay.complete]
        holders = whole or in_flight
        if holders:
            start = relay.late_joins * self.fanout
            relay.late_joins += 1
            parents = tuple(holders[(start + s) % len(holders)] for s in range(self.fanout))
        else:
            parents = (TRAINER,) * self.fanout
        fallbacks = (
            whole[: MAX_FALLBACKS + len(parents)] + in_flight[: MAX_FALLBACKS + len(parents)]
        )
        route = self._route(model, version, peer_id, parents, fallbacks, _Interned())
        relay.routes[peer_id] = parents
        return [(peer_id, route)]

    def _route(
        self,
        model: str,
        version: int,
        node: str,
        parents: tuple[str, ...],
        fallbacks: list[str],
        interned: _Interned,
    ) -> Route:
        """The Route message; readers with the same parents and fallbacks share one object,
        which the broker encodes once."""
        skip = {node, TRAINER, *parents}
        chosen: list[str] = []
        for candidate in fallbacks:
            if candidate not in skip and self._live(candidate, model):
                skip.add(candidate)
                chosen.append(candidate)
                if len(chosen) == MAX_FALLBACKS:
                    break
        key = (parents, tuple(chosen))
        route = interned.routes.get(key)
        if route is None:
            made = interned.sources
            route = interned.routes[key] = Route(
                model=model,
                version=version,
                fanout=len(parents),
                parents=[None if p == TRAINER else self._source(p, model, made) for p in parents],
                fallbacks=[self._source(p, model, made) for p in chosen],
            )
        return route

    # reports

    def progress(
        self, reader: str, model: str, relay: RelayVersion, sources: Mapping[str, int]
    ) -> None:
        """Take a reader's bytes verified per source; only the trainer ("") and the version's
        stagers count, so a reader cannot invent holders (or metric labels)."""
        if not sources:
            return
        seen = relay.served.setdefault(reader, {})
        for name, nbytes in sources.items():
            if name != TRAINER and name not in relay.names:
                continue
            delta = nbytes - seen.get(name, 0)
            if delta <= 0:
                continue  # a retried pull reports from zero again: count each byte once
            seen[name] = nbytes
            relay.served_by[name] = relay.served_by.get(name, 0) + delta
            label = TRAINER_LABEL if name == TRAINER else name
            key = (model, label)
            if key not in self.served_total and len(self.served_total) >= MAX_SERVED_LABELS:
                key = (model, OTHER_LABEL)
            self.served_total[key] = self.served_total.get(key, 0) + delta
