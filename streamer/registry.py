"""The broker's memory: models, versions, manifests, peers, leases, waiters.

Pure state, no sockets and no clock of its own (callers pass `now`), so every rule here is
tested directly. The broker turns socket messages into calls on a `Registry` and sends the
`Outbox` it returns. Every collection here has a bound (`Limits`): peers leave a while after
they are gone, waiters expire, strings from peers are truncated, and per-peer caps hold.

Version life cycle, per model::

    shards arrive ─(all ranks in)─> announced (readable; one of the last `retention`)
      │    │                          │  │ a newer version pushes it out of the window
      │    │                          │  └──> retiring ─(no lease left)─> retired:
      │    │                          │                                  Retire to publishers
      │    │                          └─ a publisher is gone ─> unreadable: Withdraw to
      │    │                                                    subscribers, then retiring
      │    └─(pending_timeout_s, a newer version announced, a publisher gone, or over
      │       the pending cap)
      └─────────> expired: Retire(reason="ranks [..] never published") to those that did
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec

from schemas.codec import encode
from schemas.manifest import Manifest, Shard
from schemas.messages import (
    PROTOCOL_VERSION,
    Announce,
    Announced,
    AppliedReached,
    Message,
    RelayOffer,
    Retire,
    Withdraw,
)
from schemas.validate import InvalidManifest, ManifestLimits, validate_manifest, validate_shard
from streamer.errors import BrokerError, VersionUnavailable
from streamer.peer_index import AppliedCounts, Liveness
from streamer.routes import Relays, RelayVersion
from streamer.waiters import Waiters

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["Limits", "Outbox", "PeerState", "PullProgress", "Registry", "VersionRecord"]

logger = logging.getLogger(__name__)

Outbox = list[tuple[str, Message]]
"""Messages to send, as (peer_id, message)."""


@dataclass(frozen=True)
class Limits:
    """The bounds on what the registry keeps (each is a `BrokerConfig` field too)."""

    pending_timeout_s: float = 120.0
    """A version not complete this long after its first shard expires."""
    pending_versions_per_model: int = 4
    """Versions waiting for ranks at once, per model; a newer one expires the oldest."""
    pending_shards: int = 65_536
    """Shards waiting for their version to complete, over all models."""
    models: int = 1024
    peers: int = 100_000
    subscriptions_per_peer: int = 64
    waiters_per_peer: int = 64
    waiters: int = 100_000
    waiter_ttl_s: float = 3600.0
    """A WaitApplied not reached in this long is answered Error("expired")."""
    gone_peer_ttl_s: float = 300.0
    """A gone peer (and its status rows) is forgotten this long after it went."""
    text_chars: int = 512
    """Failure reasons, hosts and names from peers are cut to this length."""
    fetches_per_manifest: int = 8
    """FetchManifest of one manifest a connection is served (a client fetches once, retries
    a few times); past it the broker answers Error("bad_request"), so a flood costs at most
    this many bodies per manifest kept. Not a `BrokerConfig` field (yet)."""


@dataclass
class PullProgress:
    version: int
    bytes_done: int
    bytes_total: int
    bytes_per_s: float
    state: str = "pulling"
    """`pulling`, or `staged`: whole and verified, waiting for the engine's step boundary."""


@dataclass
class PeerState:
    peer_id: str
    role: str
    host: str
    pid: int
    connected_at: float
    last_seen: float
    name: str = ""
    """Stable across the peer's restarts (status and metric labels); host:pid if not given."""
    subscriptions: set[str] = field(default_factory=set)
    applied: dict[str, int] = field(default_factory=dict)
    applied_at: dict[str, float] = field(default_factory=dict)
    progress: dict[str, PullProgress] = field(default_factory=dict)
    """model -> the pull under way."""
    last_pull_s: dict[str, float] = field(default_factory=dict)
    last_pause_s: dict[str, float] = field(default_factory=dict)
    manifest_source: dict[str, str] = field(default_factory=dict)
    """model -> where the applied version's manifest came from ("broker", "peer:<name>");
    absent when unknown (an older subscriber, or a version learnt from a Heartbeat)."""
    last_error: dict[str, str] = field(default_factory=dict)
    failed_version: dict[str, int] = field(default_factory=dict)
    """model -> the version `last_error` is about (a later applied version clears it)."""
    announced: dict[str, int] = field(default_factory=dict)
    """model -> the last version announced to this connection (no repeats on Subscribe)."""
    gone: bool = False
    gone_at: float = 0.0
    protocol: int = PROTOCOL_VERSION
    """The protocol its Hello spoke: 1 gets `Announce(manifest)`, 2 `Announced(digest)`."""
    manifest_fetches: dict[str, int] = field(default_factory=dict)
    """digest -> FetchManifest served to this connection (bounded, `Limits.fetches_per_manifest`)."""


@dataclass
class VersionRecord:
    manifest: Manifest
    publishers: set[str]
    announced_at: float
    leases: dict[str, float] = field(default_factory=dict)
    """peer_id -> lease expiry time."""
    relay: RelayVersion = field(default_factory=RelayVersion)
    """Relay: its plan, the Routes sent, who stages it, who served how much (streamer.routes)."""
    retiring: bool = False
    unreadable: str | None = None
    """Why nobody can read it any more (a publisher is gone); None while readable."""
    restored_at: float | None = None
    """Set when restored from the state file: its publishers get time to say Hello again."""
    shards: list[Shard] | None = None
    """Each rank's shard as published (in memory only), so a rank can offer more locators."""
    job: str = ""
    body: bytes = b""
    """The manifest's msgpack encoding, made once (what `FetchManifest` serves)."""
    digest: str = ""
    """SHA-256 (hex) of `body`, computed once: what `Announced` names."""
    announced: Announced | None = None
    """The one protocol-2 announcement of this version, shared by every recipient."""
    announce: Announce | None = None
    """The one protocol-1 announcement (the whole manifest), made on first need."""

    def __post_init__(self) -> None:
        self.offer(self.manifest, body=self.body)

    def offer(self, manifest: Manifest, *, body: bytes = b"") -> None:
        """Take `manifest` (the first, or the same version offered in more places), encoded
        and hashed once, its announcements made anew."""
        self.manifest = manifest
        self.body = body or encode(manifest)
        self.digest = hashlib.sha256(self.body).hexdigest()
        self.announce = None
        self.announced = Announced(
            model=self.manifest.model,
            version=self.manifest.version,
            digest=self.digest,
            nbytes=len(self.body),
        )

    def announcement(self, protocol: int) -> Announce | Announced:
        """What a peer speaking `protocol` is told: the same object for every such peer, so
        the broker encodes it once however many receive it."""
        if protocol >= 2:
            assert self.announced is not None
            return self.announced
        if self.announce is None:
            self.announce = Announce(manifest=self.manifest)
        return self.announce


@dataclass
class _Pending:
    world_size: int
    started_at: float
    job: str = ""
    """The trainer job that sent the first shard: only its ranks complete the version."""
    first_peer: str = ""
    shards: dict[int, Shard] = field(default_factory=dict)
    publishers: set[str] = field(default_factory=set)
    restored_at: float | None = None

    def missing(self) -> list[int]:
        return [rank for rank in range(self.world_size) if rank not in self.shards]


@dataclass
class _Model:
    versions: dict[int, VersionRecord] = field(default_factory=dict)
    pending: dict[int, _Pending] = field(default_factory=dict)
    latest: int | None = None
    history: list[tuple[int, float]] = field(default_factory=list)
    """(version, announced_at) of every version announced, newest last (bounded)."""
    expired: deque[dict[str, object]] = field(default_factory=lambda: deque(maxlen=16))
    """Pending versions that expired, newest last (for status)."""
    withdrawn: deque[dict[str, object]] = field(default_factory=lambda: deque(maxlen=16))
    """Announced versions that became unreadable, newest last (for status)."""


class _PersistedVersion(msgspec.Struct):
    manifest: Manifest
    publishers: list[str]
    retiring: bool = False
    leases: dict[str, float] = {}


class _PersistedPending(msgspec.Struct):
    model: str
    version: int
    world_size: int
    shards: dict[int, Shard]
    publishers: list[str]
    job: str = ""
    first_peer: str = ""


class _Persisted(msgspec.Struct):
    versions: list[_PersistedVersion]
    history: dict[str, list[tuple[int, float]]]
    pending: list[_PersistedPending] = []


class _SavedVersion(msgspec.Struct):
    """`_PersistedVersion` as `snapshot()` writes it: the manifest is the bytes encoded once at
    its announcement (`VersionRecord.body`), not encoded again at every write."""

    manifest: msgspec.Raw
    publishers: list[str]
    retiring: bool = False
    leases: dict[str, float] = {}


class _Saved(msgspec.Struct):
    """`_Persisted` as written (the same bytes; read back as `_Persisted`)."""

    versions: list[_SavedVersion]
    history: dict[str, list[tuple[int, float]]]
    pending: list[_PersistedPending] = []


_HISTORY_LENGTH = 1000


def _without_locators(shard: Shard) -> Shard:
    regions = tuple(msgspec.structs.replace(region, locators=()) for region in shard.regions)
    return msgspec.structs.replace(shard, regions=regions)


class Registry:
    def __init__(
        self,
        *,
        retention: int = 2,
        lease_ttl_s: float = 30.0,
        peer_timeout_s: float = 10.0,
        manifest_limits: ManifestLimits | None = None,
        limits: Limits | None = None,
        relay_fanout: int = 2,
    ):
        if retention < 1:
            raise ValueError("retention must be >= 1")
        self.retention = retention
        self.lease_ttl_s = lease_ttl_s
        self.peer_timeout_s = peer_timeout_s
        self.manifest_limits = manifest_limits or ManifestLimits()
        self.limits = limits or Limits()
        self.models: dict[str, _Model] = {}
        self.peers: dict[str, PeerState] = {}
        self.relays = Relays(fanout=relay_fanout, peers=self.peers)
        """Relay offers and Routes (not persisted: relays offer again when they subscribe)."""
        self._relay_out: Outbox = []
        """Routes made while a peer was marked gone; the public call that marked it (expire,
        goodbye) returns and empties it."""
        self.waiters = Waiters(
            per_peer=self.limits.waiters_per_peer,
            total=self.limits.waiters,
            ttl_s=self.limits.waiter_ttl_s,
        )
        self.dirty = False
        """True when something worth persisting changed since the last `snapshot()`."""
        self._liveness = Liveness()
        self._applied_counts = AppliedCounts()
        self._subscriber_ids: list[str] | None = None
        """Subscribers' peer ids, sorted (status pages them); None when it must be rebuilt."""

    def _text(self, value: str) -> str:
        limit = self.limits.text_chars
        return value if len(value) <= limit else value[: limit - 3] + "..."

    # peers

    def hello(
        self,
        peer_id: str,
        role: str,
        host: str,
        pid: int,
        now: float,
        *,
        name: str = "",
        protocol: int = PROTOCOL_VERSION,
    ) -> None:
        """A peer (re)connects. A reconnect keeps what it reported and its leases: a peer
        that lost the broker for a moment still holds the versions it is reading."""
        previous = self.peers.get(peer_id)
        self.relays.drop(peer_id)  # a new connection offers again when it subscribes
        if previous is None and len(self.peers) >= self.limits.peers:
            self._forget_gone(now, everyone=True)
            if len(self.peers) >= self.limits.peers:
                raise BrokerError(
                    "bad_request",
                    f"the broker already tracks {len(self.peers)} peers (limits.peers); "
                    "retry later or raise --max-peers",
                )
        host = self._text(host)
        state = PeerState(
            peer_id=peer_id,
            role=role,
            host=host,
            pid=pid,
            connected_at=now,
            last_seen=now,
            name=self._text(name) or f"{host}:{pid}",
            protocol=protocol,
        )
        if previous is not None:
            self._uncount(previous)
            state.applied = previous.applied
            state.applied_at = previous.applied_at
            state.last_pull_s = previous.last_pull_s
            state.last_pause_s = previous.last_pause_s
            state.manifest_source = previous.manifest_source
            state.last_error = previous.last_error
            state.failed_version = previous.failed_version
        if previous is None or previous.role != role:
            self._subscriber_ids = None
        self.peers[peer_id] = state
        self._count(state)
        self._liveness.heard(peer_id, now)

    def subscriber_ids(self) -> list[str]:
        """Every subscriber's peer id, sorted; rebuilt only when one joins or is forgotten."""
        if self._subscriber_ids is None:
            self._subscriber_ids = sorted(
                p.peer_id for p in self.peers.values() if p.role == "subscriber"
            )
        return self._subscriber_ids

    # the peer indexes (streamer.peer_index): a live subscriber's applied versions are counted

    def _count(self, peer: PeerState) -> None:
        if peer.role == "subscriber" and not peer.gone:
            for model, version in peer.applied.items():
                self._applied_counts.add(model, version)

    def _uncount(self, peer: PeerState) -> None:
        if peer.role == "subscriber" and not peer.gone:
            for model, version in peer.applied.items():
                self._applied_counts.remove(model, version)

    def _set_applied(self, peer: PeerState, model: str, version: int) -> None:
        if peer.role == "subscriber" and not peer.gone:
            previous = peer.applied.get(model)
            if previous is not None:
                self._applied_counts.remove(model, previous)
            self._applied_counts.add(model, version)
        peer.applied[model] = version

    def known(self, peer_id: str) -> bool:
        peer = self.peers.get(peer_id)
        return peer is not None and not peer.gone

    def touch(self, peer_id: str, now: float) -> None:
        peer = self.peers[peer_id]
        peer.last_seen = now
        self._liveness.heard(peer_id, now)
        for model in self.models.values():
            for record in model.versions.values():
                if peer_id in record.leases:
                    record.leases[peer_id] = max(record.leases[peer_id], now + self.lease_ttl_s)

    def goodbye(self, peer_id: str, now: float) -> Outbox:
        peer = self.peers.get(peer_id)
        if peer is not None and not peer.gone:
            self._mark_gone(peer, now)
        return self._withdraw_unreadable(now) + self._retire_unleased(now) + self._relay_routed()

    def _mark_gone(self, peer: PeerState, now: float) -> None:
        self._uncount(peer)
        self._liveness.went(peer.peer_id, now)
        peer.gone = True
        peer.gone_at = now
        peer.progress.clear()
        self.waiters.drop_peer(peer.peer_id)
        self._drop_leases(peer.peer_id)
        self._relay_departed(peer.peer_id)

    def _relay_departed(self, peer_id: str) -> None:
        """A relay that goes: the readers it fed get new Routes (sent by the caller)."""
        for name in self.relays.drop(peer_id):
            model = self.models.get(name)
            if model is not None:
                versions = [(v, r.relay) for v, r in sorted(model.versions.items())]
                self._relay_out += self.relays.departed(peer_id, name, versions)

    def _relay_routed(self) -> Outbox:
        """The Routes made since the last call: the newest per reader and version, and only
        to readers still here (several relays can go in one tick)."""
        made, self._relay_out = self._relay_out, []
        newest: dict[tuple[str, str, int], tuple[str, Message]] = {}
        for peer_id, route in reversed(made):
            key = (peer_id, getattr(route, "model", ""), getattr(route, "version", -1))
            if key not in newest and self.known(peer_id):
                newest[key] = (peer_id, route)
        return list(reversed(newest.values()))

    def _forget_gone(self, now: float, *, everyone: bool = False) -> None:
        ttl = 0.0 if everyone else self.limits.gone_peer_ttl_s
        for peer_id in self._liveness.gone_since(now=now, ttl_s=ttl):
            del self.peers[peer_id]
            self._liveness.forgot(peer_id)
            self._subscriber_ids = None

    def expire(self, now: float) -> Outbox:
        """The housekeeping tick: silent peers gone, gone peers forgotten after their TTL,
        leases past their time dropped, pending versions and waiters past theirs expired,
        versions nobody can read withdrawn."""
        # Only the silent front of the liveness order is read: O(peers gone), not O(peers).
        for peer_id in self._liveness.silent(now=now, timeout_s=self.peer_timeout_s):
            peer = self.peers[peer_id]
            logger.warning("peer gone peer=%s silent_s=%.1f", peer_id, now - peer.last_seen)
            self._mark_gone(peer, now)
        self._forget_gone(now)
        out: Outbox = []
        for name, model in self.models.items():
            for record in model.versions.values():
                for peer_id, expiry in list(record.leases.items()):
                    if expiry < now:
                        del record.leases[peer_id]
                        self.dirty = True
            for version in [
                v
                for v, p in model.pending.items()
                if now - p.started_at > self.limits.pending_timeout_s
            ]:
                out += self._expire_pending(
                    name,
                    model,
                    version,
                    now,
                    f"pending version {version} of {name} expired after "
                    f"{self.limits.pending_timeout_s:g} s",
                )
        out += self.waiters.expire(now, self.count_applied)
        out += self._withdraw_unreadable(now)
        self.relays.forget_missing(
            r.relay for m in self.models.values() for r in m.versions.values()
        )
        return out + self._retire_unleased(now) + self._relay_routed()

    # publishing

    def publish(
        self,
        peer_id: str,
        model_name: str,
        version: int,
        rank: int,
        world_size: int,
        shard: Shard,
        now: float,
        job: str = "",
    ) -> tuple[bool, Outbox]:
        """Record one rank's shard; returns (announced, messages to send).

        The shard and then the assembled manifest go through the one validator
        (`Error("invalid_manifest")` naming the field); a version's shards all come from the
        job of its first shard (`Error("job_conflict")` naming the owner otherwise).
        """
        if rank >= world_size:
            raise BrokerError("bad_request", f"rank {rank} is not below world_size {world_size}")
        try:
            validate_shard(shard, self.manifest_limits)
        except InvalidManifest as exc:
            raise BrokerError(
                "invalid_manifest", f"{model_name} version {version} rank {rank}: shard.{exc}"
            ) from exc
        if model_name not in self.models and len(self.models) >= self.limits.models:
            raise BrokerError(
                "bad_request",
                f"the broker already holds {len(self.models)} models (limits.models); "
                "publish under an existing model name or raise --max-models",
            )
        model = self.models.setdefault(model_name, _Model())
        offered = self._offer_more(peer_id, model_name, model, version, rank, shard, job)
        if offered is not None:
            return True, offered
        if model.latest is not None and version <= model.latest:
            raise BrokerError(
                "stale_version",
                f"{model_name} is already at version {model.latest}; versions must increase",
            )
        out: Outbox = []
        pending = model.pending.get(version)
        if pending is None:
            if self._pending_shards() >= self.limits.pending_shards:
                raise BrokerError(
                    "bad_request",
                    f"the broker already holds {self._pending_shards()} shards of incomplete "
                    "versions (limits.pending_shards); publish every rank of a version, or wait "
                    f"{self.limits.pending_timeout_s:g} s for the incomplete ones to expire",
                )
            while len(model.pending) >= self.limits.pending_versions_per_model:
                oldest = min(model.pending)
                out += self._expire_pending(
                    model_name,
                    model,
                    oldest,
                    now,
                    f"pending version {oldest} of {model_name} was dropped: "
                    f"{self.limits.pending_versions_per_model} newer versions were already waiting",
                )
            pending = model.pending[version] = _Pending(
                world_size=world_size, started_at=now, job=job, first_peer=peer_id
            )
        if pending.job != job:
            raise BrokerError(
                "job_conflict",
                f"version {version} of {model_name} is being published by job {pending.job!r} "
                f"(first shard from peer {pending.first_peer}), not job {job!r}: publish another "
                "version, or give every rank of one trainer the same job (--job)",
            )
        if pending.world_size != world_size:
            raise BrokerError(
                "bad_request",
                f"version {version} of {model_name} is being published by {pending.world_size} ranks, "
                f"not {world_size}",
            )
        pending.shards[rank] = shard
        pending.publishers.add(peer_id)
        self.dirty = True
        if len(pending.shards) < world_size:
            return False, out
        del model.pending[version]
        try:
            manifest = Manifest.assemble(
                model_name,
                version,
                [pending.shards[r] for r in range(world_size)],
                published_at=now,
            )
        except ValueError as exc:
            raise BrokerError("bad_request", str(exc)) from exc
        try:
            validate_manifest(manifest, self.manifest_limits)
        except InvalidManifest as exc:
            raise BrokerError(
                "invalid_manifest", f"{model_name} version {version}: manifest.{exc}"
            ) from exc
        out += self._announce(model_name, model, manifest, pending.publishers, now)
        # Shards restored from the state file: their publishers get the same time to return.
        record = model.versions[version]
        record.restored_at = pending.restored_at
        record.shards = [pending.shards[r] for r in range(world_size)]
        record.job = job
        return True, out

    def _offer_more(
        self,
        peer_id: str,
        name: str,
        model: _Model,
        version: int,
        rank: int,
        shard: Shard,
        job: str,
    ) -> Outbox | None:
        """A rank of an announced version offering more places to read it (a colocated trainer
        announces its GPU copy first, its host copy once that is filled): the version's
        locators change, and it is announced again. None if this is no such shard."""
        record = model.versions.get(version)
        if record is None or record.shards is None or record.unreadable is not None:
            return None
        if job != record.job or rank >= len(record.shards):
            return None
        if shard == record.shards[rank]:
            return []  # the same shard again (a publish retried after a timeout): taken once
        if _without_locators(shard) != _without_locators(record.shards[rank]):
            raise BrokerError(
                "stale_version",
                f"{name} is already at version {model.latest}: version {version} was announced "
                f"with other bytes for rank {rank}, and only its locators may be offered again; "
                "publish a new version",
            )
        record.shards[rank] = shard
        try:
            manifest = Manifest.assemble(
                name, version, record.shards, published_at=record.manifest.published_at
            )
            validate_manifest(manifest, self.manifest_limits)
        except (ValueError, InvalidManifest) as exc:
            raise BrokerError("invalid_manifest", f"{name} version {version}: {exc}") from exc
        record.offer(manifest)
        record.publishers.add(peer_id)
        self.dirty = True
        logger.info("offered again model=%s version=%d rank=%d", name, version, rank)
        return [
            (peer.peer_id, record.announcement(peer.protocol)) for peer in self._followers(name)
        ]

    def _followers(self, name: str) -> Iterator[PeerState]:
        """The live peers subscribed to model `name`."""
        return (p for p in self.peers.values() if name in p.subscriptions and not p.gone)

    def _pending_shards(self) -> int:
        return sum(len(p.shards) for m in self.models.values() for p in m.pending.values())

    def _expire_pending(
        self, name: str, model: _Model, version: int, now: float, why: str
    ) -> Outbox:
        pending = model.pending.pop(version)
        missing = pending.missing()
        reason = (
            f"{why}: ranks {missing} of {pending.world_size} never published "
            "(check those trainer ranks); this rank's buffers for it are freed"
        )
        logger.warning(
            "pending version expired model=%s version=%d missing_ranks=%s world_size=%d",
            name,
            version,
            missing,
            pending.world_size,
        )
        model.expired.append(
            {
                "version": version,
                "world_size": pending.world_size,
                "missing_ranks": missing,
                "expired_at": now,
                "reason": reason,
            }
        )
        self.dirty = True
        return [(p, Retire(model=name, version=version, reason=reason)) for p in pending.publishers]

    def _announce(
        self, name: str, model: _Model, manifest: Manifest, publishers: set[str], now: float
    ) -> Outbox:
        version = manifest.version
        model.versions[version] = VersionRecord(
            manifest=manifest, publishers=publishers, announced_at=now
        )
        model.latest = version
        model.history.append((version, now))
        del model.history[:-_HISTORY_LENGTH]
        self.dirty = True
        out: Outbox = []
        # Older incomplete versions can never be announced now: tell their publishers.
        for stale in [v for v in model.pending if v < version]:
            out += self._expire_pending(
                name, model, stale, now, f"version {version} of {name} was announced first"
            )
        readable = sorted(model.versions)[-self.retention :]
        for old, record in model.versions.items():
            if old not in readable:
                record.retiring = True
        record = model.versions[version]
        for peer in self._followers(name):
            peer.announced[name] = version
            out.append((peer.peer_id, record.announcement(peer.protocol)))
        return out + self._retire_unleased(now)

    def _retire_unleased(self, now: float) -> Outbox:
        out: Outbox = []
        for name, model in self.models.items():
            for version in [v for v, r in model.versions.items() if r.retiring and not r.leases]:
                record = model.versions.pop(version)
                self.dirty = True
                logger.info("retired model=%s version=%d", name, version)
                out.extend((p, Retire(model=name, version=version)) for p in record.publishers)
                out += self._retire_to_holders(name, version, record)
        return out

    def _retire_to_holders(self, name: str, version: int, record: VersionRecord) -> Outbox:
        """Relay subscribers that staged a version keep it readable for others until this
        (no lease holds it now): one Retire object, encoded once for all of them."""
        holders = sorted(record.relay.stagers - record.publishers)
        if not holders:
            return []
        logger.info(
            "retired to holders model=%s version=%d holders=%d", name, version, len(holders)
        )
        retire = Retire(model=name, version=version)
        return [(p, retire) for p in holders]

    def _withdraw_unreadable(self, now: float) -> Outbox:
        """A version whose bytes live with a publisher that is gone cannot be read: every
        rank's shard is needed. Restored versions give their publishers `peer_timeout_s`."""
        out: Outbox = []
        for name, model in self.models.items():
            # A pending version that lost a publisher can never be read whole either.
            for version, pending in list(model.pending.items()):
                if (
                    pending.restored_at is not None
                    and now - pending.restored_at <= self.peer_timeout_s
                ):
                    continue
                left = sorted(p for p in pending.publishers if not self.known(p))
                if left:
                    out += self._expire_pending(
                        name, model, version, now, f"publisher {', '.join(left)} is gone"
                    )
            for version, record in model.versions.items():
                if record.unreadable is not None:
                    continue
                if (
                    record.restored_at is not None
                    and now - record.restored_at <= self.peer_timeout_s
                ):
                    continue
                gone = sorted(p for p in record.publishers if not self.known(p))
                if not gone:
                    continue
                record.unreadable = f"publisher {', '.join(gone)} is gone"
                record.retiring = True
                self.dirty = True
                model.withdrawn.append(
                    {"version": version, "reason": record.unreadable, "withdrawn_at": now}
                )
                logger.warning(
                    "version unreadable model=%s version=%d reason=%s",
                    name,
                    version,
                    record.unreadable,
                )
                withdraw = Withdraw(model=name, version=version, reason=record.unreadable)
                out.extend((peer.peer_id, withdraw) for peer in self._followers(name))
        return out

    # administration (the broker lets only admin keys reach these)

    def retire_version(self, model_name: str, version: int, now: float) -> Outbox:
        """Stop serving `version`: no new leases; retired (Retire sent) once none holds it."""
        model = self.models.get(model_name)
        record = model.versions.get(version) if model else None
        if record is None:
            raise VersionUnavailable(
                "version_unavailable", f"{model_name} version {version} is not readable"
            )
        record.retiring = True
        self.dirty = True
        return self._retire_unleased(now)

    def delete_model(self, model_name: str) -> Outbox:
        """Forget a model and its versions; its publishers get Retire for each."""
        model = self.models.pop(model_name, None)
        if model is None:
            raise BrokerError("unknown_model", f"no model named {model_name!r}")
        self.dirty = True
        out: Outbox = []
        for version, record in model.versions.items():
            out.extend((p, Retire(model=model_name, version=version)) for p in record.publishers)
            out += self._retire_to_holders(model_name, version, record)
        for version, pending in model.pending.items():
            out.extend((p, Retire(model=model_name, version=version)) for p in pending.publishers)
        return out

    # subscribing

    def subscribe(
        self, peer_id: str, model_name: str, *, relay: RelayOffer | None = None
    ) -> Manifest | None:
        """Follow a model; returns the newest readable manifest if this connection has not
        been sent it yet (a repeated Subscribe costs no second manifest).

        With `relay`, the peer serves what it holds of the model to other subscribers
        (checked first: a bad offer is refused `bad_request` and subscribes nothing); a
        Subscribe without it withdraws an earlier offer."""
        peer = self.peers[peer_id]
        if relay is not None and peer.role != "subscriber":
            raise BrokerError(
                "bad_request",
                f"only subscribers relay; this peer said Hello as a {peer.role}: subscribe "
                "without relay",
            )
        if (
            model_name not in peer.subscriptions
            and len(peer.subscriptions) >= self.limits.subscriptions_per_peer
        ):
            raise BrokerError(
                "bad_request",
                f"peer {peer_id} already follows {len(peer.subscriptions)} models "
                "(limits.subscriptions_per_peer); use one connection per few models",
            )
        self.relays.offer(peer_id, model_name, relay)
        peer.subscriptions.add(model_name)
        record = self.readable_latest(model_name)
        if record is None or peer.announced.get(model_name) == record.manifest.version:
            return None
        peer.announced[model_name] = record.manifest.version
        return record.manifest

    def announcement(self, peer_id: str, manifest: Manifest) -> Announce | Announced:
        """How `manifest` (a version this registry keeps) is announced to this peer."""
        record = self.models[manifest.model].versions[manifest.version]
        return record.announcement(self.peers[peer_id].protocol)

    def manifest_body(self, peer_id: str, model_name: str, version: int, digest: str) -> bytes:
        """The encoded manifest whose SHA-256 is `digest`, for `FetchManifest`: the bytes made
        once at the announcement, never encoded again. Any version the registry still keeps
        (readable or retiring) is served; `VersionUnavailable` says why not otherwise."""
        model = self.models.get(model_name)
        record = model.versions.get(version) if model else None
        if record is None or record.digest != digest:
            kept = sorted(model.versions) if model else []
            raise VersionUnavailable(
                "version_unavailable",
                f"no manifest with digest {digest[:16]}... for {model_name} version {version} "
                f"(versions kept: {kept}); wait for the next announcement",
            )
        if record.unreadable is not None:
            raise VersionUnavailable(
                "version_unavailable",
                f"{model_name} version {version} is no longer readable ({record.unreadable})",
            )
        peer = self.peers[peer_id]
        served = peer.manifest_fetches.get(digest, 0)
        if served >= self.limits.fetches_per_manifest:
            raise BrokerError(
                "bad_request",
                f"this connection already fetched manifest {digest[:16]}... {served} times "
                "(limits.fetches_per_manifest); cache it by digest",
            )
        peer.manifest_fetches[digest] = served + 1
        # One entry per manifest fetched: keep the newest few (a version's fetches come together).
        while len(peer.manifest_fetches) > 2 * self.limits.subscriptions_per_peer:
            del peer.manifest_fetches[next(iter(peer.manifest_fetches))]
        return record.body

    def readable_latest(self, model_name: str) -> VersionRecord | None:
        model = self.models.get(model_name)
        if model is None:
            return None
        readable = [v for v, r in model.versions.items() if not r.retiring]
        return model.versions[max(readable)] if readable else None

    def acquire_lease(self, peer_id: str, model_name: str, version: int, now: float) -> float:
        model = self.models.get(model_name)
        record = model.versions.get(version) if model else None
        # A peer renewing a lease it holds (after a reconnect) keeps it, even while retiring.
        held = record is not None and peer_id in record.leases and record.unreadable is None
        if record is None or (record.retiring and not held):
            latest = model.latest if model else None
            why = f" ({record.unreadable})" if record and record.unreadable else ""
            raise VersionUnavailable(
                "version_unavailable",
                f"{model_name} version {version} is no longer readable{why} (latest is {latest})",
            )
        record.leases[peer_id] = now + self.lease_ttl_s
        self.dirty = True
        return self.lease_ttl_s

    def release_lease(self, peer_id: str, model_name: str, version: int, now: float) -> Outbox:
        model = self.models.get(model_name)
        record = model.versions.get(version) if model else None
        if record is not None and record.leases.pop(peer_id, None) is not None:
            self.dirty = True
        return self._retire_unleased(now)

    def _drop_leases(self, peer_id: str) -> None:
        for model in self.models.values():
            for record in model.versions.values():
                if record.leases.pop(peer_id, None) is not None:
                    self.dirty = True

    # relay (streamer.routes)

    def relay_routes(self, model_name: str, version: int) -> Outbox:
        """The Routes of a version just announced, for the model's relay subscribers."""
        record = self.models[model_name].versions[version]
        return self.relays.announced(model_name, version, record.relay)

    def relay_joined(self, peer_id: str, model_name: str, version: int) -> Outbox:
        """The Route of a relay subscriber about to be sent `version` after its announcement
        (a late joiner, or a reconnect): read from holders that applied it."""
        record = self.models[model_name].versions[version]
        return self.relays.joined(peer_id, model_name, version, record.relay)

    # reports

    def progress(
        self,
        peer_id: str,
        model: str,
        version: int,
        done: int,
        total: int,
        rate: float,
        state: str = "pulling",
        sources: dict[str, int] | None = None,
    ) -> None:
        peer = self.peers[peer_id]
        if model in peer.subscriptions or model in self.models:
            peer.progress[model] = PullProgress(version, done, total, rate, state)
        record = self._record(model, version)
        if sources and record is not None:
            self.relays.progress(peer_id, model, record.relay, sources)

    def _record(self, model: str, version: int) -> VersionRecord | None:
        followed = self.models.get(model)
        return followed.versions.get(version) if followed is not None else None

    def applied(
        self,
        peer_id: str,
        model: str,
        version: int,
        pull_s: float,
        pause_s: float,
        now: float,
        *,
        manifest_source: str = "",
    ) -> Outbox:
        """`manifest_source`: where the peer took the version's manifest ("" unknown)."""
        peer = self.peers[peer_id]
        if model not in peer.applied and len(peer.applied) >= self.limits.subscriptions_per_peer:
            return []
        if version >= peer.applied.get(model, -1):
            self._set_applied(peer, model, version)
            peer.applied_at[model] = now
            if manifest_source:
                peer.manifest_source[model] = self._text(manifest_source)
            else:
                peer.manifest_source.pop(model, None)
        peer.progress.pop(model, None)
        peer.last_pull_s[model] = pull_s
        peer.last_pause_s[model] = pause_s
        self._clear_error(peer, model)
        record = self._record(model, version)
        if record is not None:
            self.relays.held(peer_id, model, record.relay)
        return self._wake(model, version)

    def _clear_error(self, peer: PeerState, model: str) -> None:
        if peer.applied.get(model, -1) >= peer.failed_version.get(model, -1):
            peer.last_error.pop(model, None)
            peer.failed_version.pop(model, None)

    def heartbeat(self, peer_id: str, applied: dict[str, int], now: float) -> Outbox:
        """Take the versions a peer says it runs (after a broker restart, the only source).

        At most `subscriptions_per_peer` models are kept per peer, whatever it sends."""
        peer = self.peers[peer_id]
        out: Outbox = []
        for model, version in applied.items():
            if (
                model not in peer.applied
                and len(peer.applied) >= self.limits.subscriptions_per_peer
            ):
                break
            if version > peer.applied.get(model, -1):
                self._set_applied(peer, model, version)
                peer.applied_at[model] = now
                peer.manifest_source.pop(model, None)  # not said in a Heartbeat
                self._clear_error(peer, model)
                out += self._wake(model, version)
            record = self._record(model, version)
            if record is not None and peer_id not in record.relay.complete:
                self.relays.held(peer_id, model, record.relay)  # relearnt after a restart
        return out

    def pull_failed(self, peer_id: str, model: str, version: int, reason: str) -> None:
        peer = self.peers[peer_id]
        peer.progress.pop(model, None)
        if model in peer.subscriptions or model in self.models:
            peer.last_error[model] = self._text(f"version {version}: {reason}")
            peer.failed_version[model] = version

    def wait_applied(
        self, waiter_peer: str, request_id: int, model: str, version: int, count: int, *, now: float
    ) -> Outbox:
        reached = self.count_applied(model, version)
        if reached >= count:
            reply = AppliedReached(
                request_id=request_id, model=model, version=version, num_subscribers=reached
            )
            return [(waiter_peer, reply)]
        self.waiters.add(waiter_peer, request_id, model, version, count, now)
        return []

    def num_waiters(self) -> int:
        return len(self.waiters)

    def count_applied(self, model: str, version: int) -> int:
        """Live subscribers running `version` of `model` or newer (from the index: O(versions))."""
        return self._applied_counts.at_least(model, version)

    def _wake(self, model: str, version: int) -> Outbox:
        return self.waiters.wake(model, version, self.count_applied)

    # persistence

    def snapshot(self) -> bytes:
        """What must survive a broker restart: manifests (readable, and retiring ones still
        leased) with their leases, incomplete versions' shards, and version history."""
        self.dirty = False
        versions = [
            _SavedVersion(
                manifest=msgspec.Raw(record.body),
                publishers=sorted(record.publishers),
                retiring=record.retiring,
                leases=dict(record.leases),
            )
            for model in self.models.values()
            for record in model.versions.values()
            if record.unreadable is None
        ]
        pending = [
            _PersistedPending(
                model=name,
                version=version,
                world_size=p.world_size,
                shards=p.shards,
                publishers=sorted(p.publishers),
                job=p.job,
                first_peer=p.first_peer,
            )
            for name, model in self.models.items()
            for version, p in model.pending.items()
        ]
        history = {name: model.history for name, model in self.models.items()}
        return msgspec.msgpack.encode(_Saved(versions=versions, history=history, pending=pending))

    def restore(self, data: bytes, now: float | None = None) -> None:
        """Load a snapshot; raises msgspec.DecodeError/ValidationError if it is damaged.

        Restored leases live at least `peer_timeout_s` more, so that their holders can
        reconnect and renew them; restored pending versions start their timeout again."""
        persisted = msgspec.msgpack.decode(data, type=_Persisted)
        now = time.time() if now is None else now
        for name, history in persisted.history.items():
            model = self.models.setdefault(name, _Model())
            model.history = [tuple(h) for h in history]  # type: ignore[misc]
            if model.history:
                # Versions only increase, also past one that was unreadable when saved.
                model.latest = max(v for v, _ in model.history)
        for saved in persisted.versions:
            manifest = saved.manifest
            model = self.models.setdefault(manifest.model, _Model())
            model.versions[manifest.version] = VersionRecord(
                manifest=manifest,
                publishers=set(saved.publishers),
                announced_at=manifest.published_at or now,
                leases={
                    peer: max(expiry, now + self.peer_timeout_s)
                    for peer, expiry in saved.leases.items()
                },
                retiring=saved.retiring,
                restored_at=now,
            )
            model.latest = max(model.latest or 0, manifest.version)
        for saved_pending in persisted.pending:
            model = self.models.setdefault(saved_pending.model, _Model())
            if model.latest is not None and saved_pending.version <= model.latest:
                continue
            model.pending[saved_pending.version] = _Pending(
                world_size=saved_pending.world_size,
                started_at=now,
                shards=dict(saved_pending.shards),
                publishers=set(saved_pending.publishers),
                restored_at=now,
                job=saved_pending.job,
                first_peer=saved_pending.first_peer,
            )
