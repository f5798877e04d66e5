"""The broker's memory: models, versions, manifests, peers, leases, waiters.

Pure state, no sockets and no clock of its own (callers pass `now`), so every rule here is
tested directly. The broker turns socket messages into calls on a `Registry` and sends the
`Outbox` it returns.

Version life cycle, per model::

    shards arrive ──(all ranks in)──> announced (readable; one of the last `retention`)
          │                              │ a newer version pushes it out of the window
          └─(a newer version announced)──┴──> retiring ──(no lease left)──> retired:
                                                           Retire sent to its publishers
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import msgspec

from schemas.manifest import Manifest, Shard, validate_shard
from schemas.messages import Announce, AppliedReached, Message, Retire
from streamer.errors import BrokerError, VersionUnavailable

__all__ = ["Outbox", "PeerState", "Registry", "VersionRecord"]

logger = logging.getLogger(__name__)

Outbox = list[tuple[str, Message]]
"""Messages to send, as (peer_id, message)."""


@dataclass
class PeerState:
    peer_id: str
    role: str
    host: str
    pid: int
    connected_at: float
    last_seen: float
    subscriptions: set[str] = field(default_factory=set)
    applied: dict[str, int] = field(default_factory=dict)
    applied_at: dict[str, float] = field(default_factory=dict)
    progress: dict[str, tuple[int, int, int, float]] = field(default_factory=dict)
    """model -> (version, bytes_done, bytes_total, bytes_per_s) of the pull under way."""
    last_pull_s: dict[str, float] = field(default_factory=dict)
    last_pause_s: dict[str, float] = field(default_factory=dict)
    last_error: dict[str, str] = field(default_factory=dict)
    gone: bool = False


@dataclass
class VersionRecord:
    manifest: Manifest
    publishers: set[str]
    announced_at: float
    leases: dict[str, float] = field(default_factory=dict)
    """peer_id -> lease expiry time."""
    retiring: bool = False


@dataclass
class _Pending:
    world_size: int
    shards: dict[int, Shard] = field(default_factory=dict)
    publishers: set[str] = field(default_factory=set)


@dataclass
class _Model:
    versions: dict[int, VersionRecord] = field(default_factory=dict)
    pending: dict[int, _Pending] = field(default_factory=dict)
    latest: int | None = None
    history: list[tuple[int, float]] = field(default_factory=list)
    """(version, announced_at) of every version announced, newest last (bounded)."""


@dataclass
class _Waiter:
    peer_id: str
    request_id: int
    model: str
    version: int
    num_subscribers: int


class _PersistedVersion(msgspec.Struct):
    manifest: Manifest
    publishers: list[str]


class _Persisted(msgspec.Struct):
    versions: list[_PersistedVersion]
    history: dict[str, list[tuple[int, float]]]


_HISTORY_LENGTH = 1000


class Registry:
    def __init__(
        self, *, retention: int = 2, lease_ttl_s: float = 30.0, peer_timeout_s: float = 10.0
    ):
        if retention < 1:
            raise ValueError("retention must be >= 1")
        self.retention = retention
        self.lease_ttl_s = lease_ttl_s
        self.peer_timeout_s = peer_timeout_s
        self.models: dict[str, _Model] = {}
        self.peers: dict[str, PeerState] = {}
        self._waiters: list[_Waiter] = []
        self.dirty = False
        """True when something worth persisting changed since the last `snapshot()`."""

    # peers

    def hello(self, peer_id: str, role: str, host: str, pid: int, now: float) -> None:
        previous = self.peers.get(peer_id)
        self.peers[peer_id] = PeerState(
            peer_id=peer_id, role=role, host=host, pid=pid, connected_at=now, last_seen=now
        )
        if previous is not None:
            # A reconnect: keep what it reported, drop its leases (it will ask again).
            state = self.peers[peer_id]
            state.applied = previous.applied
            state.applied_at = previous.applied_at
            self._drop_leases(peer_id)

    def known(self, peer_id: str) -> bool:
        peer = self.peers.get(peer_id)
        return peer is not None and not peer.gone

    def touch(self, peer_id: str, now: float) -> None:
        peer = self.peers[peer_id]
        peer.last_seen = now
        for model in self.models.values():
            for record in model.versions.values():
                if peer_id in record.leases:
                    record.leases[peer_id] = now + self.lease_ttl_s

    def goodbye(self, peer_id: str, now: float) -> Outbox:
        peer = self.peers.get(peer_id)
        if peer is not None:
            peer.gone = True
            peer.progress.clear()
        self._waiters = [w for w in self._waiters if w.peer_id != peer_id]
        self._drop_leases(peer_id)
        return self._retire_unleased(now)

    def expire(self, now: float) -> Outbox:
        """Drop leases past their time and mark silent peers gone."""
        for peer in self.peers.values():
            if not peer.gone and now - peer.last_seen > self.peer_timeout_s:
                logger.warning(
                    "peer gone peer=%s silent_s=%.1f", peer.peer_id, now - peer.last_seen
                )
                peer.gone = True
                peer.progress.clear()
                self._drop_leases(peer.peer_id)
        for model in self.models.values():
            for record in model.versions.values():
                for peer_id, expiry in list(record.leases.items()):
                    if expiry < now:
                        del record.leases[peer_id]
        return self._retire_unleased(now)

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
    ) -> tuple[bool, Outbox]:
        """Record one rank's shard; returns (announced, messages to send)."""
        if rank >= world_size:
            raise BrokerError("bad_request", f"rank {rank} is not below world_size {world_size}")
        try:
            validate_shard(shard)
        except ValueError as exc:
            raise BrokerError("bad_request", str(exc)) from exc
        model = self.models.setdefault(model_name, _Model())
        if model.latest is not None and version <= model.latest:
            raise BrokerError(
                "stale_version",
                f"{model_name} is already at version {model.latest}; versions must increase",
            )
        pending = model.pending.setdefault(version, _Pending(world_size=world_size))
        if pending.world_size != world_size:
            raise BrokerError(
                "bad_request",
                f"version {version} of {model_name} is being published by {pending.world_size} ranks, "
                f"not {world_size}",
            )
        pending.shards[rank] = shard
        pending.publishers.add(peer_id)
        if len(pending.shards) < world_size:
            return False, []
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
        return True, self._announce(model_name, model, manifest, pending.publishers, now)

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
            out.extend(
                (p, Retire(model=name, version=stale)) for p in model.pending.pop(stale).publishers
            )
        readable = sorted(model.versions)[-self.retention :]
        for old, record in model.versions.items():
            if old not in readable:
                record.retiring = True
        announce = Announce(manifest=manifest)
        out.extend(
            (peer.peer_id, announce)
            for peer in self.peers.values()
            if name in peer.subscriptions and not peer.gone
        )
        return out + self._retire_unleased(now)

    def _retire_unleased(self, now: float) -> Outbox:
        out: Outbox = []
        for name, model in self.models.items():
            for version in [v for v, r in model.versions.items() if r.retiring and not r.leases]:
                record = model.versions.pop(version)
                self.dirty = True
                logger.info("retired model=%s version=%d", name, version)
                out.extend((p, Retire(model=name, version=version)) for p in record.publishers)
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
        for version, pending in model.pending.items():
            out.extend((p, Retire(model=model_name, version=version)) for p in pending.publishers)
        return out

    # subscribing

    def subscribe(self, peer_id: str, model_name: str) -> Manifest | None:
        self.peers[peer_id].subscriptions.add(model_name)
        model = self.models.get(model_name)
        if model is None or model.latest is None:
            return None
        return model.versions[model.latest].manifest

    def acquire_lease(self, peer_id: str, model_name: str, version: int, now: float) -> float:
        model = self.models.get(model_name)
        record = model.versions.get(version) if model else None
        if record is None or record.retiring:
            latest = model.latest if model else None
            raise VersionUnavailable(
                "version_unavailable",
                f"{model_name} version {version} is no longer readable (latest is {latest})",
            )
        record.leases[peer_id] = now + self.lease_ttl_s
        return self.lease_ttl_s

    def release_lease(self, peer_id: str, model_name: str, version: int, now: float) -> Outbox:
        model = self.models.get(model_name)
        record = model.versions.get(version) if model else None
        if record is not None:
            record.leases.pop(peer_id, None)
        return self._retire_unleased(now)

    def _drop_leases(self, peer_id: str) -> None:
        for model in self.models.values():
            for record in model.versions.values():
                record.leases.pop(peer_id, None)

    # reports

    def progress(
        self, peer_id: str, model: str, version: int, done: int, total: int, rate: float
    ) -> None:
        self.peers[peer_id].progress[model] = (version, done, total, rate)

    def applied(
        self, peer_id: str, model: str, version: int, pull_s: float, pause_s: float, now: float
    ) -> Outbox:
        peer = self.peers[peer_id]
        if version >= peer.applied.get(model, -1):
            peer.applied[model] = version
            peer.applied_at[model] = now
        peer.progress.pop(model, None)
        peer.last_pull_s[model] = pull_s
        peer.last_pause_s[model] = pause_s
        peer.last_error.pop(model, None)
        return self._wake_waiters()

    def heartbeat(self, peer_id: str, applied: dict[str, int], now: float) -> Outbox:
        """Take the versions a peer says it runs (after a broker restart, the only source)."""
        peer = self.peers[peer_id]
        changed = False
        for model, version in applied.items():
            if version > peer.applied.get(model, -1):
                peer.applied[model] = version
                peer.applied_at[model] = now
                changed = True
        return self._wake_waiters() if changed else []

    def pull_failed(self, peer_id: str, model: str, version: int, reason: str) -> None:
        peer = self.peers[peer_id]
        peer.progress.pop(model, None)
        peer.last_error[model] = f"version {version}: {reason}"

    def wait_applied(
        self, waiter_peer: str, request_id: int, model: str, version: int, count: int
    ) -> Outbox:
        self._waiters.append(_Waiter(waiter_peer, request_id, model, version, count))
        return self._wake_waiters()

    def count_applied(self, model: str, version: int) -> int:
        return sum(
            1
            for peer in self.peers.values()
            if not peer.gone
            and peer.role == "subscriber"
            and peer.applied.get(model, -1) >= version
        )

    def _wake_waiters(self) -> Outbox:
        out: Outbox = []
        still: list[_Waiter] = []
        for waiter in self._waiters:
            count = self.count_applied(waiter.model, waiter.version)
            if count >= waiter.num_subscribers:
                reached = AppliedReached(
                    request_id=waiter.request_id,
                    model=waiter.model,
                    version=waiter.version,
                    num_subscribers=count,
                )
                out.append((waiter.peer_id, reached))
            else:
                still.append(waiter)
        self._waiters = still
        return out

    # persistence

    def snapshot(self) -> bytes:
        """What must survive a broker restart: readable manifests and version history."""
        self.dirty = False
        versions = [
            _PersistedVersion(manifest=record.manifest, publishers=sorted(record.publishers))
            for model in self.models.values()
            for record in model.versions.values()
            if not record.retiring
        ]
        history = {name: model.history for name, model in self.models.items()}
        return msgspec.msgpack.encode(_Persisted(versions=versions, history=history))

    def restore(self, data: bytes, now: float | None = None) -> None:
        persisted = msgspec.msgpack.decode(data, type=_Persisted)
        now = time.time() if now is None else now
        for name, history in persisted.history.items():
            self.models.setdefault(name, _Model()).history = [tuple(h) for h in history]  # type: ignore[misc]
        for saved in persisted.versions:
            manifest = saved.manifest
            model = self.models.setdefault(manifest.model, _Model())
            model.versions[manifest.version] = VersionRecord(
                manifest=manifest,
                publishers=set(saved.publishers),
                announced_at=manifest.published_at or now,
            )
            model.latest = max(model.latest or 0, manifest.version)
