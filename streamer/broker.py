"""The broker: one ROUTER socket for every peer, the version registry behind it.

Weights never pass through here; only control messages and manifests do.

    publishers / subscribers (DEALER, routing id = peer_id)
            │  Hello, PublishShard, Subscribe, AcquireLease, Heartbeat, Progress, Applied ...
            ▼
    ROUTER ── route_requests() ──> Registry ──> Outbox ──> send()   (one task owns the socket)
                  │ every 0.25 s: expire leases and silent peers, persist the registry
                  ▼
    HTTP status (streamer.http) reads the same Registry

With a state dir, the registry is written (streamer.state: atomic, fsynced) after every
change that matters; a failed write is logged and shown in status, and retried each tick,
while the broker keeps serving. Retire, Withdraw and AppliedReached that cannot be delivered
(the peer is away, say during its reconnect) wait, bounded, for that peer's next Hello.

A peer that sends garbage gets a typed `Error("protocol")` and the message is dropped; the
broker keeps serving. With keys (`key_file`, `allowlist_file`) the ROUTER is a CURVE server:
only allowlisted keys connect, each routing id stays with the key that said Hello on it, and
`streamer.auth.Guard` checks every message against that key's rights (`Error("forbidden")`). A message from a peer that never said Hello (say, after a broker
restart) gets `Error("unknown_peer")`, and the client says Hello again.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections import OrderedDict
from typing import TYPE_CHECKING

import msgspec
import zmq
import zmq.asyncio

from schemas.codec import encode, request_id_of
from schemas.messages import (
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    AcquireLease,
    AdminDone,
    Alive,
    Announce,
    Announced,
    Applied,
    AppliedReached,
    DeleteModel,
    Error,
    FetchManifest,
    Goodbye,
    Heartbeat,
    Hello,
    LeaseGranted,
    ManifestBody,
    Message,
    Progress,
    Published,
    PublishShard,
    PullFailed,
    ReleaseLease,
    Retire,
    RetireVersion,
    Subscribe,
    Subscribed,
    WaitApplied,
    Welcome,
    Withdraw,
)
from streamer.auth import (
    ANONYMOUS,
    Allowlist,
    AuthError,
    Forbidden,
    Guard,
    Principal,
    load_keys,
    security_mode,
    start_authenticator,
)
from streamer.errors import BrokerError, ProtocolError
from streamer.frames import decode_header
from streamer.metrics import BrokerStats, RegistryCollector
from streamer.registry import Outbox, Registry
from streamer.state import StateError, StateFile

if TYPE_CHECKING:
    from zmq.auth.asyncio import AsyncioAuthenticator

    from streamer.config import BrokerConfig

__all__ = ["Broker"]

logger = logging.getLogger(__name__)

_HOUSEKEEPING_S = 0.25
_DRAIN = 256
"""Messages received per wake-up: awaiting one poll and one receive per message costs three
loop iterations each (~3 x the handling, bench/RESULTS_FLEET.md's profile)."""
_BACKLOG = 4096
"""The listen backlog (libzmq's default is 100): thousands of subscribers connecting at once
otherwise overflow it (the kernel answers with SYN cookies and some connects never finish)."""
_MAX_PACE_S = 60.0
"""Heartbeat pacing stops doubling here (a fleet that needs more is past one broker)."""
_WARNED_PEERS = 1024
"""Peers whose protocol errors were logged (once each); older ones are forgotten."""
_REDELIVER_PEERS = 1024
_REDELIVER_PER_PEER = 64
_REDELIVERED = (Retire, Withdraw, AppliedReached)
"""Messages that matter enough to re-send after the peer's next Hello."""
_FRAMES_CACHED = 16
"""Encoded announcements and manifest replies kept (the newest matter)."""
_FRAMES_BYTES = 256 * 1024 * 1024
"""... and at most this many bytes of them (the newest one is always kept)."""
_BODIES_CACHED = 8
"""ManifestBody replies kept by (digest, request_id): a homogeneous fleet's subscribers ask
with the same request ids, and then share one frame instead of a copy of the body each."""
_STATE_ERROR_LOG_S = 60.0
_MEMBERS_PER_FRAME = 256
_PUSHED = 65_536
"""(link, digest) pushes remembered: a few versions of a fleet of thousands of links."""
"""Members of one node link named in one frame of a fan-out (a bound on the frame)."""
_MEMBER_ID = re.compile(rb"[A-Za-z0-9._:@+=-]{1,128}")
"""What a node link's member may call itself (no "/": it joins link and member ids; no " ":
it separates members in a fan-out frame)."""
_OWNERS_FILE = "owners.json"


class Broker:
    """Routes control messages; `run()` is its only long-lived task.

    >>> broker = Broker(BrokerConfig(endpoint="tcp://127.0.0.1:0"), context=ctx)  # doctest: +SKIP
    >>> await broker.run()  # doctest: +SKIP
    """

    def __init__(self, config: BrokerConfig, *, context: zmq.asyncio.Context) -> None:
        self.config = config
        self.broker_id = uuid.uuid4().hex[:12]
        self.registry = Registry(
            retention=config.retention,
            lease_ttl_s=config.lease_ttl_s,
            peer_timeout_s=config.peer_timeout_s,
            manifest_limits=config.manifest_limits,
            limits=config.limits(),
            relay_fanout=config.relay_fanout,
        )
        self.stats = BrokerStats(started_at=time.time())
        self._pace_s = 0.0
        """Heartbeat pacing now (`BrokerConfig.max_heartbeats_per_s`); 0: none."""
        self._alive = encode(Alive())
        """The heartbeat answer, the same bytes for everyone: encoded once per pace."""
        self.stats.collector = RegistryCollector(self.registry, self.stats)
        self.stats.registry.register(self.stats.collector)
        self._warned: OrderedDict[bytes, None] = OrderedDict()
        self._frames: OrderedDict[int, tuple[Message, bytes]] = OrderedDict()
        """id(announcement or manifest reply) -> (it, its frame): see `_encode`."""
        self._frame_bytes = 0
        self._bodies: OrderedDict[tuple[str, int], ManifestBody] = OrderedDict()
        """(digest, request_id) -> the reply: see `_manifest_body`."""
        self._pushed: OrderedDict[tuple[str, str], None] = OrderedDict()
        """(node link, digest) whose manifest was pushed to it (`_push_manifest`), newest last."""
        self._undelivered: OrderedDict[str, list[Message]] = OrderedDict()
        self._state_error_logged_at = 0.0
        self.security = security_mode(config)
        self.stats.security = self.security
        self.guard = Guard(max_version_jump=config.max_version_jump, owners={})
        self._bound: dict[str, str] = {}
        """routing id -> name of the key that said Hello on it (pruned with registry.peers)."""
        self._deferred: Outbox = []
        """Messages from HTTP admin actions; sent by `run()`, the socket's one owner."""
        self._allowlist: Allowlist | None = None
        self._authenticator: AsyncioAuthenticator | None = None
        self.state = StateFile(config.state_dir) if config.state_dir else None
        self._owners = StateFile(config.state_dir, _OWNERS_FILE) if config.state_dir else None
        if self.state is not None:
            self._restore(self.state)
        if self._owners is not None:
            owners = self._owners.read()
            if owners is not None:
                try:
                    self.guard.restore(owners)
                except AuthError as exc:
                    raise self._owners.damaged(exc) from exc
        self.socket = context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # No handover: a second connection with a routing id in use is ignored, so no one can
        # take over another peer's routing id (and with it its announcements).
        self.socket.setsockopt(zmq.ROUTER_HANDOVER, 0)
        # ZMTP heartbeats close a connection that died silently, so that its peer's reconnect
        # (same routing id) is not ignored as a duplicate for as long as TCP would take.
        ping_ms = int(config.connection_heartbeat_s * 1000)
        self.socket.setsockopt(zmq.HEARTBEAT_IVL, ping_ms)
        self.socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * ping_ms)
        self.socket.setsockopt(zmq.SNDHWM, config.queue_size)
        self.socket.setsockopt(zmq.RCVHWM, config.queue_size)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.MAXMSGSIZE, 256 * 1024 * 1024)
        self.socket.setsockopt(zmq.BACKLOG, _BACKLOG)
        if config.key_file is not None and config.allowlist_file is not None:
            self._secure(config.key_file, config.allowlist_file, context)
        self.socket.bind(config.endpoint)
        self.endpoint: str = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._sender: zmq.Socket[bytes] = zmq.Socket.shadow(self.socket.underlying)
        """The same socket, unwrapped, for non-blocking sends and receives: no Future per
        message (a fan-out to 10,000 peers is then ~1.6 x faster). pyzmq's asyncio wrapper
        does the same for a NOBLOCK send, and `run()` awaits only a poll meanwhile."""

    def _restore(self, state: StateFile) -> None:
        """Check the state dir and load the state file; StateError says what to do."""
        state.check()
        data = state.read()
        if data is None:
            logger.info("no state file yet path=%s", state.path)
            return
        try:
            self.registry.restore(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            if not self.config.discard_bad_state:
                raise state.damaged(exc) from exc
            aside = state.quarantine()
            logger.warning(
                "state file damaged, moved aside path=%s aside=%s detail=%s", state.path, aside, exc
            )
            return  # decoding failed before the registry was touched: it is empty
        logger.info(
            "restored registry path=%s models=%d pending=%d",
            state.path,
            len(self.registry.models),
            sum(len(m.pending) for m in self.registry.models.values()),
        )

    def _secure(self, key_file: str, allowlist_file: str, context: zmq.asyncio.Context) -> None:
        keys = load_keys(key_file)
        self._allowlist = Allowlist.load(allowlist_file)
        self._authenticator = start_authenticator(context, self._allowlist)
        self.socket.curve_secretkey = keys.secret
        self.socket.curve_publickey = keys.public
        self.socket.curve_server = True
        self.socket.zap_domain = b"weightstream"
        logger.info(
            "CURVE on endpoint=%s keys=%d broker_key=%s",
            self.config.endpoint,
            len(self._allowlist.by_key),
            keys.public.decode("ascii"),
        )

    async def run(self) -> None:
        """Serve until cancelled."""
        logger.info(
            "broker listening endpoint=%s broker_id=%s security=%s",
            self.endpoint,
            self.broker_id,
            self.security,
        )
        if self.security == "insecure":
            logger.warning(
                "broker is INSECURE: endpoint=%s is off loopback and has no CURVE keys; any "
                "peer that reaches it may publish, subscribe and retire (see docs/security.md)",
                self.endpoint,
            )
        next_housekeeping = time.monotonic()
        try:
            while True:
                timeout_ms = max(0, int((next_housekeeping - time.monotonic()) * 1000))
                if await self.socket.poll(timeout=timeout_ms):
                    # Drain what is queued (bounded, so housekeeping still runs), without a
                    # Future per message. copy=False: each frame carries its connection's
                    # User-Id (the key's name).
                    for _ in range(_DRAIN):
                        try:
                            frames = self._sender.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        await self._receive(frames)
                if self._deferred:
                    outbox, self._deferred = self._deferred, []
                    await self._send(outbox)
                if time.monotonic() >= next_housekeeping:
                    await self._send(self.registry.expire(time.time()))
                    self._pace()
                    self._prune_bound()
                    self._persist()
                    next_housekeeping = time.monotonic() + _HOUSEKEEPING_S
        finally:
            self._persist()
            self.socket.close(linger=0)
            if self._authenticator is not None:
                self._authenticator.stop()

    def _pace(self) -> None:
        """Heartbeat pacing: the doubling of `heartbeat_interval_s` that keeps the fleet's
        heartbeats under `max_heartbeats_per_s`. Peers learn it from Welcome and from every
        Alive; the peer timeout and the lease TTL stretch by the same factor, and never
        shrink back while the broker runs (a peer told the longer pace may still use it)."""
        base, rate = self.config.heartbeat_interval_s, self.config.max_heartbeats_per_s
        peers = len(self.registry.peers)
        pace = 0.0
        if rate > 0 and peers / base > rate:
            pace = base
            while peers / pace > rate and pace < _MAX_PACE_S:
                pace *= 2
            pace = min(pace, _MAX_PACE_S)
        if pace == self._pace_s:
            return
        self._pace_s = pace
        self._alive = encode(Alive(heartbeat_at_least_s=pace))
        factor = max(1.0, pace / base)
        registry = self.registry
        registry.peer_timeout_s = max(registry.peer_timeout_s, self.config.peer_timeout_s * factor)
        registry.lease_ttl_s = max(registry.lease_ttl_s, self.config.lease_ttl_s * factor)
        logger.info(
            "heartbeat pace peers=%d at_least_s=%.1f peer_timeout_s=%.0f lease_ttl_s=%.0f",
            peers,
            pace,
            registry.peer_timeout_s,
            registry.lease_ttl_s,
        )

    def _prune_bound(self) -> None:
        """Forget the keys of routing ids the registry forgot. Every peer's id is bound by
        its Hello, so there are some exactly when more ids are bound than there are peers:
        only then is there a scan, and a tick at 10,000 peers costs nothing."""
        if len(self._bound) > len(self.registry.peers):
            for peer_id in [p for p in self._bound if p not in self.registry.peers]:
                del self._bound[peer_id]

    def _principal(self, frame: zmq.Frame) -> Principal:
        """The authenticated key behind a frame (everyone is ANONYMOUS without keys)."""
        if self._allowlist is None:
            return ANONYMOUS
        try:
            return self._allowlist.by_name[str(frame.get("User-Id"))]
        except (zmq.ZMQError, KeyError) as exc:
            raise Forbidden("this connection has no authenticated key") from exc

    def _check_identity(self, peer_id: str, principal: Principal, message: Message) -> None:
        """A routing id belongs to the key that said Hello with it; nobody else may use it."""
        bound = self._bound.get(peer_id)
        if bound is not None and bound != principal.name:
            logger.warning(
                "refused routing id peer=%s of key=%s used by key=%s",
                peer_id,
                bound,
                principal.name,
            )
            raise Forbidden(f"routing id {peer_id!r} belongs to another key")
        if bound is None and isinstance(message, Hello):
            self._bound[peer_id] = principal.name

    async def _receive(self, frames: list[zmq.Frame]) -> None:
        self.stats.messages_total += 1
        route = [frame.bytes for frame in frames[:-1]]
        problem = _route_problem(route)
        if problem is not None:
            await self._protocol_error(route[:1], problem)
            return
        try:
            message = decode_header(frames[-1].buffer)
        except ProtocolError as exc:
            await self._protocol_error(route, str(exc), request_id_of(frames[-1].buffer))
            return
        # latin-1 maps any routing id to a str and back exactly (ours are ASCII peer ids). A
        # member of a node link is "<link's routing id>/<member's>" (`_route_problem` keeps
        # "/" out of every routing id, so the split back is exact).
        peer_id = b"/".join(route).decode("latin-1")
        try:
            principal = self._principal(frames[-1])
            self._check_identity(peer_id, principal, message)
            await self._send(self._handle(peer_id, principal, message))
        except BrokerError as exc:
            if exc.code == "protocol":
                self.stats.protocol_errors_total += 1
            elif exc.code == "forbidden":
                self.stats.forbidden_total += 1
                logger.info("forbidden peer=%s detail=%s", peer_id, exc.detail)
            request_id = getattr(message, "request_id", 0)
            await self._send(
                [(peer_id, Error(code=exc.code, detail=exc.detail, request_id=request_id))]
            )

    def _handle(self, peer_id: str, principal: Principal, message: Message) -> Outbox:
        now = time.time()
        registry = self.registry
        model_state = registry.models.get(getattr(message, "model", ""))
        self.guard.authorize(principal, message, model_state.latest if model_state else None)
        if isinstance(message, Hello):
            if not MIN_PROTOCOL_VERSION <= message.protocol_version <= PROTOCOL_VERSION:
                raise BrokerError(
                    "incompatible",
                    f"peer speaks protocol {message.protocol_version}; this broker serves "
                    f"protocol {MIN_PROTOCOL_VERSION} up to protocol {PROTOCOL_VERSION}: "
                    "upgrade the older side",
                )
            registry.hello(
                peer_id,
                message.role,
                message.host,
                message.pid,
                now,
                name=message.name,
                protocol=message.protocol_version,
            )
            logger.info(
                "peer joined peer=%s role=%s host=%s key=%s protocol=%d",
                peer_id,
                message.role,
                message.host,
                principal.name,
                message.protocol_version,
            )
            self._pace()
            welcome = Welcome(
                broker_id=self.broker_id,
                heartbeat_interval_s=self.config.heartbeat_interval_s,
                heartbeat_at_least_s=self._pace_s,
            )
            held = self._undelivered.pop(peer_id, [])
            return [(peer_id, welcome), *((peer_id, m) for m in held)]
        if not registry.known(peer_id):
            raise BrokerError("unknown_peer", "say hello first (the broker may have restarted)")
        registry.touch(peer_id, now)
        match message:
            case Heartbeat(applied=applied):
                # Heartbeats repeat what each subscriber runs, so a restarted broker relearns it.
                # Alive tells the peer it is still heard on this routing id.
                return [*registry.heartbeat(peer_id, applied, now), (peer_id, Alive())]
            case PublishShard(request_id=rid, model=model, version=version):
                announced, outbox = registry.publish(
                    peer_id,
                    model,
                    version,
                    message.rank,
                    message.world_size,
                    message.shard,
                    now,
                    job=message.job,
                )
                self.guard.claimed(model, principal)
                if announced:
                    self.stats.announced_total += 1
                    manifest = registry.models[model].versions[version].manifest
                    logger.info(
                        "announced model=%s version=%d bytes=%d tensors=%d subscribers=%d",
                        model,
                        version,
                        manifest.total_bytes,
                        len(manifest.tensors),
                        sum(1 for _, m in outbox if isinstance(m, Announce | Announced)),
                    )
                if announced:  # relay: each relay subscriber's Route, ahead of its announcement
                    outbox = registry.relay_routes(model, version) + outbox
                self._persist()
                reply = Published(request_id=rid, model=model, version=version, complete=announced)
                return [(peer_id, reply), *outbox]
            case Subscribe(request_id=rid, model=model):
                current = registry.subscribe(peer_id, model, relay=message.relay)
                readable = registry.readable_latest(model)
                latest = readable.manifest.version if readable is not None else None
                newest = model_state.latest if model_state is not None else None
                subscribed = Subscribed(request_id=rid, model=model, latest=latest, newest=newest)
                if current is None:
                    return [(peer_id, subscribed)]
                route = registry.relay_joined(peer_id, model, current.version)
                announcement = registry.announcement(peer_id, current)
                return [(peer_id, subscribed), *route, (peer_id, announcement)]
            case FetchManifest():
                return [(peer_id, self._manifest_body(peer_id, message))]
            case AcquireLease(request_id=rid, model=model, version=version):
                ttl_s = registry.acquire_lease(peer_id, model, version, now)
                return [
                    (
                        peer_id,
                        LeaseGranted(request_id=rid, model=model, version=version, ttl_s=ttl_s),
                    )
                ]
            case ReleaseLease(model=model, version=version):
                return registry.release_lease(peer_id, model, version, now)
            case Progress(model=model, version=version):
                registry.progress(
                    peer_id,
                    model,
                    version,
                    message.bytes_done,
                    message.bytes_total,
                    message.bytes_per_s,
                    message.state,
                    sources=message.sources,
                )
                return []
            case Applied(model=model, version=version):
                self.stats.applied_total += 1
                logger.info(
                    "applied peer=%s model=%s version=%d pull_s=%.3f pause_s=%.4f",
                    peer_id,
                    model,
                    version,
                    message.pull_s,
                    message.pause_s,
                )
                record = (
                    registry.models[model].versions.get(version)
                    if model in registry.models
                    else None
                )
                self.stats.observe_applied(
                    model,
                    pull_s=message.pull_s,
                    pause_s=message.pause_s,
                    since_announce_s=now - record.announced_at if record else None,
                    manifest_source=message.manifest_source,
                )
                return registry.applied(
                    peer_id,
                    model,
                    version,
                    message.pull_s,
                    message.pause_s,
                    now,
                    manifest_source=message.manifest_source,
                )
            case PullFailed(model=model, version=version, reason=reason):
                self.stats.pull_failures_total += 1
                logger.warning(
                    "pull failed peer=%s model=%s version=%d reason=%s",
                    peer_id,
                    model,
                    version,
                    reason,
                )
                registry.pull_failed(peer_id, model, version, reason)
                return []
            case WaitApplied(request_id=rid, model=model, version=version):
                return registry.wait_applied(
                    peer_id, rid, model, version, message.num_subscribers, now=now
                )
            case Goodbye():
                logger.info("peer left peer=%s", peer_id)
                return registry.goodbye(peer_id, now)
            case RetireVersion(request_id=rid, model=model, version=version):
                outbox = self.retire_version(model, version, by=principal.name)
                return [(peer_id, AdminDone(request_id=rid, detail="retiring")), *outbox]
            case DeleteModel(request_id=rid, model=model):
                outbox = self.delete_model(model, by=principal.name)
                return [(peer_id, AdminDone(request_id=rid, detail="deleted")), *outbox]
            case _:
                raise BrokerError("protocol", f"a peer does not send {type(message).__name__}")

    def _manifest_body(self, peer_id: str, message: FetchManifest) -> ManifestBody:
        """Serve a manifest by digest: the bytes encoded once at its announcement (no
        re-encoding per fetch). Replies that are equal (same digest and request id) are one
        object, so `_encode` makes their frame once and every recipient's queue shares it."""
        try:
            body = self.registry.manifest_body(
                peer_id, message.model, message.version, message.digest
            )
        except BrokerError:
            self.stats.manifest_fetch_refused_total += 1
            raise
        self.stats.manifest_fetches_total += 1
        self.stats.manifest_fetch_bytes_total += len(body)
        reply = self._body_reply(message.digest, message.request_id, body)
        logger.debug(
            "manifest served peer=%s model=%s version=%d bytes=%d",
            peer_id,
            message.model,
            message.version,
            len(body),
        )
        return reply

    def _body_reply(self, digest: str, request_id: int, body: bytes) -> ManifestBody:
        """One ManifestBody object per (digest, request id), so its frame is encoded once."""
        key = (digest, request_id)
        reply = self._bodies.get(key)
        if reply is None or reply.body is not body:
            reply = ManifestBody(request_id=request_id, digest=digest, body=body)
            self._bodies[key] = reply
            while len(self._bodies) > _BODIES_CACHED:
                self._bodies.popitem(last=False)
        self._bodies.move_to_end(key)
        return reply

    # administration (admin keys over ZeroMQ, or the admin token over HTTP)

    def retire_version(self, model: str, version: int, *, by: str) -> Outbox:
        logger.info("admin retire model=%s version=%d by=%s", model, version, by)
        return self.registry.retire_version(model, version, time.time())

    def delete_model(self, model: str, *, by: str) -> Outbox:
        logger.info("admin delete model=%s by=%s", model, by)
        outbox = self.registry.delete_model(model)
        self.guard.forget(model)
        return outbox

    def defer(self, outbox: Outbox) -> None:
        """Queue messages for `run()` to send (from the HTTP admin routes)."""
        self._deferred.extend(outbox)

    async def _send(self, outbox: Outbox) -> None:
        """Send an outbox in order. One Announce fans out to many peers: each message object
        is encoded once, and a run of one message to several members of one node link leaves
        as one frame naming them all (the link hands it to each): 1,250 sends, not 10,000,
        for 10,000 subscribers on 8-engine nodes. Within a run every recipient gets the same
        message once, so grouping it by link reorders nothing that any one peer sees."""
        encoded: dict[int, bytes] = {}
        start = 0
        while start < len(outbox):
            message = outbox[start][1]
            end = start + 1
            while end < len(outbox) and outbox[end][1] is message:
                end += 1
            data = encoded.get(id(message))
            if data is None:
                data = encoded[id(message)] = self._encode(message)
            self._send_run([peer_id for peer_id, _ in outbox[start:end]], message, data)
            start = end

    def _send_run(self, peer_ids: list[str], message: Message, data: bytes) -> None:
        by_link: dict[str, list[str]] = {}
        for peer_id in peer_ids:
            link, slash, member = peer_id.partition("/")
            if slash:
                by_link.setdefault(link, []).append(member)
            else:
                self._send_one(peer_id, [], message, data)
        for link, members in by_link.items():
            if isinstance(message, Announced):
                self._push_manifest(link, members, message)
            for chunk in range(0, len(members), _MEMBERS_PER_FRAME):
                self._send_one(link, members[chunk : chunk + _MEMBERS_PER_FRAME], message, data)

    def _push_manifest(self, link: str, members: list[str], announced: Announced) -> None:
        """Send a node link the announced manifest's body ahead of the announcement, once per
        link and digest: its members' FetchManifest are then answered on their node, and the
        broker makes one send per link instead of handling one request per link (at 1,250
        links that request handling was most of a version's broker CPU, bench/RESULTS_FLEET.md).
        Not to a link whose members all take manifests from relay peers."""
        key = (link, announced.digest)
        if key in self._pushed or not self.config.link_manifest_push:
            return
        relays = self.registry.relays
        if relays.fanout > 0 and all(
            relays.offered(f"{link}/{member}", announced.model) is not None for member in members
        ):
            return
        model = self.registry.models.get(announced.model)
        record = model.versions.get(announced.version) if model else None
        if record is None or record.digest != announced.digest or record.unreadable is not None:
            return
        body = self._body_reply(announced.digest, 0, record.body)
        try:
            self._sender.send_multipart(
                [link.encode("latin-1"), b"", self._encode(body)], flags=zmq.NOBLOCK
            )
        except zmq.ZMQError as exc:  # a full queue, or the link is gone: members fetch
            logger.debug("manifest push to link=%s failed: %s", link, exc)
            return
        self.stats.manifest_pushes_total += 1
        self._pushed[key] = None
        while len(self._pushed) > _PUSHED:
            self._pushed.popitem(last=False)

    def _send_one(self, peer_id: str, members: list[str], message: Message, data: bytes) -> None:
        """To one peer (`members` empty; a member's id is "link/member"), or to `members` of
        the node link `peer_id` in one frame."""
        if members:
            frames = [peer_id.encode("latin-1"), " ".join(members).encode("latin-1"), data]
        else:
            frames = [*peer_id.encode("latin-1").split(b"/"), data]
        try:
            self._sender.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            logger.warning(
                "dropped %s to peer=%s members=%d: its queue is full",
                type(message).__name__,
                peer_id,
                len(members),
            )
            self._hold_all(peer_id, members, message)
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            logger.debug("peer=%s unreachable, held %s", peer_id, type(message).__name__)
            self._hold_all(peer_id, members, message)

    def _hold_all(self, peer_id: str, members: list[str], message: Message) -> None:
        if not members:
            self._hold(peer_id, message)
        for member in members:
            self._hold(f"{peer_id}/{member}", message)

    def _encode(self, message: Message) -> bytes:
        """Announcements are one object per version (`VersionRecord.announcement`), sent again
        on every Subscribe, and equal manifest replies one object (`_manifest_body`): keep
        their frames, so a protocol-1 peer's whole-manifest Announce is encoded once per
        version, not once per subscriber, and a manifest reply once per request id. The
        cache holds the message itself, so its `id` cannot be reused while cached."""
        if isinstance(message, Alive):
            return self._alive
        if not isinstance(message, Announce | Announced | ManifestBody):
            return encode(message)
        cached = self._frames.get(id(message))
        if cached is not None:
            self._frames.move_to_end(id(message))
            return cached[1]
        data = encode(message)
        self._frames[id(message)] = (message, data)
        self._frame_bytes += len(data)
        while len(self._frames) > _FRAMES_CACHED or (
            self._frame_bytes > _FRAMES_BYTES and len(self._frames) > 1
        ):
            _, (_, dropped) = self._frames.popitem(last=False)
            self._frame_bytes -= len(dropped)
        return data

    def _hold(self, peer_id: str, message: Message) -> None:
        """Keep a message that matters for the peer's next Hello (bounded, oldest dropped)."""
        if not isinstance(message, _REDELIVERED):
            return
        held = self._undelivered.setdefault(peer_id, [])
        self._undelivered.move_to_end(peer_id)
        held.append(message)
        del held[:-_REDELIVER_PER_PEER]
        while len(self._undelivered) > _REDELIVER_PEERS:
            self._undelivered.popitem(last=False)

    async def _protocol_error(self, route: list[bytes], detail: str, request_id: int = 0) -> None:
        self.stats.protocol_errors_total += 1
        identity = b"/".join(route)
        if identity not in self._warned:
            self._warned[identity] = None
            if len(self._warned) > _WARNED_PEERS:
                self._warned.popitem(last=False)
            logger.warning("protocol error peer=%r detail=%s", identity, detail)
        try:
            error = encode(Error(code="protocol", detail=detail[:8000], request_id=request_id))
            await self.socket.send_multipart([*route, error], flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            logger.debug("could not answer peer=%r", identity)

    def _persist(self) -> None:
        """Write the registry (and the model owners) if they changed; a failure is reported,
        kept dirty, retried."""
        if self._owners is not None and self.guard.dirty:
            try:
                self._owners.write(self.guard.snapshot())
            except StateError as exc:
                self.guard.dirty = True
                logger.error("owners write failed %s", exc)  # noqa: TRY400
        if self.state is None or not self.registry.dirty:
            return
        try:
            self.state.write(self.registry.snapshot())
        except StateError as exc:
            self.registry.dirty = True
            self.stats.state_write_errors_total += 1
            now = time.monotonic()
            if str(exc) != self.stats.state_last_error or (
                now - self._state_error_logged_at > _STATE_ERROR_LOG_S
            ):
                # One line, no traceback: the error says what failed and what to do.
                logger.error(  # noqa: TRY400
                    "state write failed errors=%d %s", self.stats.state_write_errors_total, exc
                )
                self._state_error_logged_at = now
            self.stats.state_last_error = str(exc)
            return
        if self.stats.state_last_error is not None:
            logger.info("state written again path=%s", self.state.path)
            self.stats.state_last_error = None
        self.stats.state_written_at = time.time()


def _route_problem(route: list[bytes]) -> str | None:
    """Why a message's routing frames are not [peer] or [node link, member], or None.

    A peer's own routing id may be any bytes but "/"; a node link adds its member's, which
    must match `_MEMBER_ID`. A message that fails gets a protocol error on its connection.
    """
    if len(route) > 2:
        return f"expected one frame, or a node link's [member, message], got {len(route)} frames"
    if b"/" in route[0]:
        return "a routing id may not contain '/' (it joins a node link's id and its member's)"
    if len(route) == 2 and _MEMBER_ID.fullmatch(route[1]) is None:
        return (
            "a node link's member id must be 1-128 characters of A-Z a-z 0-9 . _ : @ + = - "
            f"(got {route[1][:40]!r})"
        )
    return None
