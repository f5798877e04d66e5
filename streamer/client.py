"""The peer side of the broker protocol, used by publishers and subscribers alike.

One DEALER socket, owned by one receive task; requests are matched to replies by
`request_id`. If the broker restarts, the first message it does not recognise is answered
`Error("unknown_peer")`: the client says Hello again, re-subscribes, re-takes the leases it
holds, and re-sends every request still waiting for an answer, so callers only see a delay.

Every request times out, its send included (`BrokerTimeout`: a send into a full queue to a
frozen broker does not block forever). A `Retire` that finds the queue full waits in a bounded
overflow and is queued again as room appears, never silently dropped.

    caller ── request(msg) ──> send ──> broker
                 ▲ future                 │
    _receive() ──┴── replies, Announce (-> latest manifest per model), Retire (-> queue),
                 │   Route (-> the latest per (model, version), a few per model; `wait_route`)
                 └── Announced (protocol 2: a digest) -> one fetch per digest -> SHA-256
                     checked, decoded, cached by digest -> as an Announce
                     (the fetch asks `manifest_peers` first, a relay subscriber's Route
                     parent, within `PEER_MANIFEST_S`; a wrong, slow or refused peer costs a
                     fetch from the broker; every body taken is offered back to it)
    _heartbeat() ── Heartbeat every interval (also renews leases); the broker answers Alive
    watch()      ── the socket's handshake events: a refused CURVE key fails the client

With `key_file` and `broker_key_file` the DEALER is a CURVE client: the broker admits it only if
its key is in the broker's allowlist. A client that stops hearing `Alive` (cut off, or the
broker is gone) says so once in its log and in `cut_off`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import os
import secrets
import socket
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Literal, Protocol

import msgspec
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from schemas.codec import MAX_MESSAGE_BYTES, decode_manifest, encode
from schemas.messages import (
    MAX_SOURCES,
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
    RelayOffer,
    ReleaseLease,
    Retire,
    RetireVersion,
    Role,
    Route,
    Subscribe,
    Subscribed,
    WaitApplied,
    Welcome,
    Withdraw,
)
from streamer.auth import (
    CLOSED_HANDSHAKES,
    HANDSHAKE_EVENTS,
    AuthError,
    Forbidden,
    load_keys,
    load_public_key,
)
from streamer.errors import (
    BrokerError,
    IncompatiblePeer,
    ProtocolError,
    StreamerError,
    TransportError,
    VersionUnavailable,
)
from streamer.frames import decode_header

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from schemas.manifest import Manifest, Shard
    from schemas.messages import ErrorCode
    from streamer.config import ClientConfig

__all__ = ["BrokerClient", "BrokerTimeout", "ManifestMismatch", "ManifestPeers", "connect"]

logger = logging.getLogger(__name__)

_MANIFESTS_CACHED = 8
"""Manifests kept by digest (a re-announcement after a reconnect costs no fetch)."""
_SOURCES_KEPT = 256
"""(model, version) -> where its manifest came from, the newest kept (for `Applied`)."""
_FETCHES_IN_FLIGHT = 16
"""Distinct manifests being fetched at once; an announcement past it waits for the next one."""
_FETCH_ATTEMPTS = 3
_FETCH_RETRY_S = 0.5
"""Pause before the next attempt, times the attempt number."""
MAX_ROUTES_PER_MODEL = 4
"""Routes kept per model (the newest versions'): a relay subscriber needs the current one."""
PEER_MANIFEST_S = 2.0
"""How long a manifest may take from a peer (at most the request timeout) before the broker
is asked: a parent fetches it from its own parent or the broker in milliseconds."""
_PEER_GRACE_S = 0.5
"""Past the peer's deadline, how long its read (a thread) may take to say so."""


class BrokerTimeout(StreamerError, TimeoutError):
    """The broker did not take or answer a message in time (frozen, gone, or overloaded)."""


class ManifestMismatch(ProtocolError):
    """A fetched manifest's bytes do not hash to the digest its announcement named: the
    announcement is ignored (never applied) and the fetch retried."""

    def __init__(self, *, model: str, version: int, expected: str, got: str) -> None:
        super().__init__(
            f"the manifest fetched for {model} version {version} has SHA-256 {got}, not "
            f"{expected} as announced: refused (a broken or hostile broker or relay); "
            "it is fetched again"
        )
        self.model = model
        self.version = version
        self.expected = expected
        self.got = got


class ManifestPeers(Protocol):
    """Where a client reads announced manifests from peers before asking the broker, and
    offers the ones it takes (`BrokerClient.manifest_peers`; a relay subscriber installs
    `subscribers.relay_client.PeerManifests`)."""

    async def read(
        self, *, model: str, version: int, digest: str, nbytes: int, deadline: float
    ) -> tuple[str, bytes] | None:
        """(the peer's name, the encoded manifest, unverified) by `deadline`
        (`time.monotonic()`), or None when no peer is known; raises `TransportError`."""
        ...

    def offer(self, *, model: str, version: int, digest: str, body: bytes) -> None:
        """A manifest this client verified and took: serve it on."""
        ...


class BrokerClient:
    """Talk to the broker. Make one with `connect(...)`, which runs its tasks.

    >>> async with connect(ClientConfig(broker=endpoint), role="subscriber", context=ctx) as client:
    ...     await client.subscribe("llama")
    ...     manifest = await client.next_manifest("llama", after=-1)  # doctest: +SKIP
    """

    def __init__(
        self,
        config: ClientConfig,
        *,
        role: Role,
        context: zmq.asyncio.Context,
        peer_id: str | None = None,
    ) -> None:
        self.config = config
        self.role = role
        self.host = socket.gethostname()
        self.peer_id = peer_id or f"{role}-{self.host}-{os.getpid()}-{secrets.token_hex(3)}"
        self._socket = context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.ROUTING_ID, self.peer_id.encode())
        self._socket.setsockopt(zmq.SNDHWM, config.queue_size)
        self._socket.setsockopt(zmq.RCVHWM, config.queue_size)
        self._socket.setsockopt(zmq.LINGER, 0)
        if config.key_file is not None:
            if config.broker_key_file is None:
                raise AuthError("a client with key_file needs broker_key_file (the broker's .key)")
            keys = load_keys(config.key_file)
            self._socket.curve_secretkey = keys.secret
            self._socket.curve_publickey = keys.public
            self._socket.curve_serverkey = load_public_key(config.broker_key_file)
        self._monitor = self._socket.get_monitor_socket(HANDSHAKE_EVENTS)
        self._socket.connect(config.broker)
        self._last_heard = time.monotonic()
        self.heartbeat_s = config.heartbeat_interval_s
        """The heartbeat interval in use: ours, or the broker's pacing when that is longer."""
        self.cut_off: str | None = None
        """Why the broker is not answering, while it is not (None when all is well)."""
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[Message, asyncio.Future[Message]]] = {}
        self._welcome: asyncio.Future[Welcome] | None = None
        self._subscriptions: set[str] = set()
        self._newest: dict[str, int | None] = {}
        """model -> the newest version announced, from our last Subscribed (one per model)."""
        self._manifests: dict[str, Manifest] = {}
        self._manifest_changed = asyncio.Condition()
        self._by_digest: OrderedDict[str, tuple[Manifest, bytes, str]] = OrderedDict()
        """digest -> verified manifest, its encoding and where it came from, the newest
        `_MANIFESTS_CACHED`."""
        self._sources: OrderedDict[tuple[str, int], str] = OrderedDict()
        """(model, version) -> "broker" or "peer:<name>": where the manifest taken for that
        version came from (reported in `Applied`), the newest `_SOURCES_KEPT`."""
        self._digests: dict[str, str] = {}
        """model -> the digest of the manifest in `_manifests` ("" if it came whole)."""
        self._fetching: dict[str, tuple[Announced, asyncio.Task[None]]] = {}
        """digest -> its one fetch under way (at most `_FETCHES_IN_FLIGHT`)."""
        self.manifest_fetches = 0
        """FetchManifest requests sent to the broker (one per manifest, plus retries)."""
        self.peer_manifest_fetches = 0
        """Manifests taken from a peer (`manifest_peers`), verified."""
        self.peer_manifest_failures = 0
        """Manifest reads from a peer that failed (wrong, slow, refused): the broker's then."""
        self.manifest_peers: ManifestPeers | None = None
        """Installed by a relay subscriber: peers to read manifests from (None: the broker)."""
        self.manifest_error: StreamerError | None = None
        """Why the last manifest fetch failed (None once one succeeds)."""
        self.retired: asyncio.Queue[Retire] = asyncio.Queue(maxsize=config.queue_size)
        self._retired_overflow: dict[tuple[str, int], Retire] = {}
        """Retires that found `retired` full, queued again as room appears (<= queue_size)."""
        self._leases: dict[tuple[str, int], int] = {}
        """Leases we hold (model, version) -> count, re-taken after a broker restart."""
        self.broker_id: str | None = None
        self._applied: dict[str, int] = {}
        self._relay_offers: dict[str, RelayOffer] = {}
        """model -> the relay offer we subscribed with (sent again after a broker restart)."""
        self._routes: dict[tuple[str, int], Route] = {}
        """(model, version) -> the broker's latest Route (at most MAX_ROUTES_PER_MODEL per model)."""
        self._route_changed = asyncio.Condition()
        self._rehello: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None

    # requests

    async def publish(
        self, model: str, version: int, rank: int, world_size: int, shard: Shard, *, job: str = ""
    ) -> Published:
        message = PublishShard(
            request_id=next(self._ids),
            model=model,
            version=version,
            rank=rank,
            world_size=world_size,
            shard=shard,
            job=job,
        )
        reply = await self._request(message)
        assert isinstance(reply, Published)
        return reply

    async def subscribe(self, model: str, *, relay: RelayOffer | None = None) -> int | None:
        """Follow a model; returns the latest readable version (its manifest arrives as an
        announcement). `newest_version(model)` then says the newest ever announced.

        `relay`: this subscriber serves what it holds there; the broker then sends `Route`s
        (`route`, `wait_route`)."""
        self._subscriptions.add(model)
        if relay is not None:
            self._relay_offers[model] = relay
        reply = await self._request(Subscribe(request_id=next(self._ids), model=model, relay=relay))
        assert isinstance(reply, Subscribed)
        self._newest[model] = reply.newest
        return reply.latest

    def newest_version(self, model: str) -> int | None:
        """The newest version of `model` the broker ever announced (as of our Subscribe):
        what a trainer's next version must exceed, even when that one is no longer readable."""
        return self._newest.get(model)

    async def acquire_lease(self, model: str, version: int) -> float:
        """Keep `version` readable while we pull it; raises `VersionUnavailable` if retired."""
        reply = await self._request(
            AcquireLease(request_id=next(self._ids), model=model, version=version)
        )
        assert isinstance(reply, LeaseGranted)
        key = (model, version)
        self._leases[key] = self._leases.get(key, 0) + 1
        return reply.ttl_s

    async def release_lease(self, model: str, version: int) -> None:
        key = (model, version)
        count = self._leases.pop(key, 0) - 1
        if count > 0:
            self._leases[key] = count
        await self._send(ReleaseLease(model=model, version=version))

    @property
    def leases(self) -> list[tuple[str, int]]:
        """The (model, version) leases this client holds now."""
        return sorted(self._leases)

    async def wait_applied(self, model: str, version: int, num_subscribers: int) -> int:
        """Wait until `num_subscribers` subscribers report `version` (or newer) applied.

        No timeout of its own: wrap it in `asyncio.timeout(...)`.
        """
        message = WaitApplied(
            request_id=next(self._ids),
            model=model,
            version=version,
            num_subscribers=num_subscribers,
        )
        reply = await self._request(message, timeout_s=None)
        assert isinstance(reply, AppliedReached)
        return reply.num_subscribers

    # relay routes

    def route(self, model: str, version: int) -> Route | None:
        """The broker's latest `Route` for reading `version` of `model`, if one came."""
        return self._routes.get((model, version))

    async def wait_route(self, model: str, version: int) -> Route:
        """The `Route` for `version`, waiting for it. No timeout of its own: the broker sends
        none without relays, so wrap it in `asyncio.timeout(...)`."""
        async with self._route_changed:
            while True:
                self._raise_if_failed()
                route = self._routes.get((model, version))
                if route is not None:
                    return route
                await self._route_changed.wait()

    def _store_route(self, route: Route) -> None:
        self._routes[route.model, route.version] = route
        versions = sorted(v for m, v in self._routes if m == route.model)
        for old in versions[:-MAX_ROUTES_PER_MODEL]:
            del self._routes[route.model, old]
        logger.debug("route model=%s version=%d", route.model, route.version)
        asyncio.get_running_loop().create_task(self._notify_route()).add_done_callback(_discard)

    async def _notify_route(self) -> None:
        async with self._route_changed:
            self._route_changed.notify_all()

    # administration (admin keys only)

    async def retire_version(self, model: str, version: int) -> str:
        reply = await self._request(
            RetireVersion(request_id=next(self._ids), model=model, version=version)
        )
        assert isinstance(reply, AdminDone)
        return reply.detail

    async def delete_model(self, model: str) -> str:
        reply = await self._request(DeleteModel(request_id=next(self._ids), model=model))
        assert isinstance(reply, AdminDone)
        return reply.detail

    # reports (no reply)

    async def report_progress(
        self,
        model: str,
        version: int,
        done: int,
        total: int,
        rate: float,
        *,
        state: Literal["pulling", "staged"] = "pulling",
        sources: dict[str, int] | None = None,
    ) -> None:
        """`state="staged"`: pulled, verified and staged, waiting at the version boundary.
        `sources`: verified bytes per source ("" the trainer), the largest `MAX_SOURCES`."""
        top = sorted((sources or {}).items(), key=lambda item: -item[1])[:MAX_SOURCES]
        await self._send(
            Progress(
                model=model,
                version=version,
                bytes_done=done,
                bytes_total=total,
                bytes_per_s=rate,
                state=state,
                sources=dict(top),
            )
        )

    async def report_applied(
        self, model: str, version: int, *, pull_s: float, pause_s: float, nbytes: int
    ) -> None:
        self._applied[model] = version
        await self._send(
            Applied(
                model=model,
                version=version,
                pull_s=pull_s,
                pause_s=pause_s,
                bytes_total=nbytes,
                manifest_source=self.manifest_source(model, version),
            )
        )

    def manifest_source(self, model: str, version: int) -> str:
        """Where the manifest taken for `version` of `model` came from: "broker" (announced
        whole, or fetched by digest) or "peer:<name>"; "" if not known (not taken, or long ago)."""
        return self._sources.get((model, version), "")

    async def report_failure(self, model: str, version: int, reason: str) -> None:
        await self._send(PullFailed(model=model, version=version, reason=reason[:2000]))

    # announcements

    def latest_manifest(self, model: str) -> Manifest | None:
        return self._manifests.get(model)

    async def manifest_changed(self, model: str, than: Manifest, *, timeout_s: float) -> Manifest:
        """The latest manifest of `model` once it is no longer `than` (a newer version, or the
        same version offered in more places); `than` itself after `timeout_s`."""
        async with self._manifest_changed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    while self._manifests.get(model, than) == than:
                        self._raise_if_failed()
                        await self._manifest_changed.wait()
            return self._manifests.get(model, than)

    async def next_manifest(self, model: str, *, after: int) -> Manifest:
        """The newest announced manifest with a version above `after`, waiting for one.

        A subscriber that fell behind gets the newest version directly, skipping the ones between.
        """
        async with self._manifest_changed:
            while True:
                self._raise_if_failed()
                manifest = self._manifests.get(model)
                if manifest is not None and manifest.version > after:
                    return manifest
                await self._manifest_changed.wait()

    # plumbing

    async def _request(self, message: Any, *, timeout_s: float | None = -1.0) -> Message:
        self._raise_if_failed()
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[message.request_id] = (message, future)
        limit = self.config.request_timeout_s if timeout_s == -1.0 else timeout_s
        try:
            await self._send(message)
            try:
                async with asyncio.timeout(limit):
                    return await future
            except TimeoutError:
                raise BrokerTimeout(
                    f"the broker at {self.config.broker} did not answer {type(message).__name__} "
                    f"within {limit} s: is it running (`weightstream status`)? start it, or "
                    "check --broker"
                ) from None
        finally:
            self._pending.pop(message.request_id, None)

    async def _send(self, message: Any) -> None:
        """Queue one message for the broker, within `request_timeout_s` (the queue may be full)."""
        limit = self.config.request_timeout_s
        try:
            async with asyncio.timeout(limit):
                await self._socket.send(encode(message))
        except TimeoutError:
            raise BrokerTimeout(
                f"could not send {type(message).__name__} to the broker at {self.config.broker} "
                f"within {limit} s: the send queue ({self.config.queue_size} messages) is full, "
                "so the broker is frozen, gone or overloaded; check it (`weightstream status`)"
            ) from None

    async def hello(self) -> Welcome:
        loop = asyncio.get_running_loop()
        self._welcome = loop.create_future()
        await self._send(
            Hello(
                peer_id=self.peer_id,
                role=self.role,
                host=self.host,
                pid=os.getpid(),
                name=self.config.name,
            )
        )
        try:
            async with asyncio.timeout(self.config.request_timeout_s):
                welcome = await self._welcome
        except TimeoutError:
            keys = (
                " (with keys: is --broker-key-file the broker's key?)"
                if self.config.key_file
                else " (if the broker uses keys, pass --key-file and --broker-key-file)"
            )
            raise TimeoutError(
                f"no broker answered at {self.config.broker} within {self.config.request_timeout_s} s: "
                "start one with `weightstream broker`, or point at it (`weightstream` "
                "commands: --broker; the vLLM server: WEIGHTSTREAM_BROKER; WeightStream: broker=)"
                f"{keys}"
            ) from None
        if self.broker_id is not None and welcome.broker_id != self.broker_id:
            logger.warning(
                "broker restarted broker_id=%s (was %s)", welcome.broker_id, self.broker_id
            )
        self.broker_id = welcome.broker_id
        return welcome

    async def receive(self) -> None:
        """The receive loop; runs until cancelled."""
        try:
            while True:
                data = await self._socket.recv()
                self._last_heard = time.monotonic()
                try:
                    message = decode_header(data)
                except ProtocolError as exc:
                    logger.warning("dropped an undecodable message from the broker: %s", exc)
                    continue
                self._dispatch(message)
        except asyncio.CancelledError:
            raise
        except zmq.ZMQError as exc:
            self._fail(exc)
            raise

    def _dispatch(self, message: Message) -> None:
        match message:
            case Welcome(heartbeat_at_least_s=pace):
                self._paced(pace)
                if self._welcome is not None and not self._welcome.done():
                    self._welcome.set_result(message)
            case Announce(manifest=manifest):
                self._take_manifest(manifest, source="broker")
            case Announced():
                self._announced(message)
            case Withdraw(model=model, version=version, reason=reason):
                # Nobody can read it: forget it, so that next_manifest waits for the next one.
                current = self._manifests.get(model)
                if current is not None and current.version == version:
                    del self._manifests[model]
                for announced, task in list(self._fetching.values()):
                    if (announced.model, announced.version) == (model, version):
                        task.cancel()
                logger.warning("withdrawn model=%s version=%d reason=%s", model, version, reason)
            case Route():
                self._store_route(message)
            case Retire():
                self._queue_retire(message)
            case Error(code="unknown_peer"):
                self._start_rehello()
            case Error(code="incompatible", detail=detail):
                error = IncompatiblePeer(detail)
                if self._welcome is not None and not self._welcome.done():
                    self._welcome.set_exception(error)
                self._fail(error)
            case Error(code="forbidden", detail=detail, request_id=0) if (
                self._welcome is not None and not self._welcome.done()
            ):
                # Our Hello refused (a node link whose key the broker refuses says so).
                self._welcome.set_exception(AuthError(detail))
            case Error(code=code, detail=detail, request_id=rid) if rid in self._pending:
                _, future = self._pending[rid]
                if not future.done():
                    future.set_exception(_broker_error(code, detail))
            case Error(code=code, detail=detail):
                logger.warning("broker error code=%s detail=%s", code, detail)
            case Alive(heartbeat_at_least_s=pace):
                self._paced(pace)  # _last_heard is already fresh
            case (
                Published()
                | Subscribed()
                | LeaseGranted()
                | AppliedReached()
                | AdminDone()
                | ManifestBody()
            ):
                entry = self._pending.get(message.request_id)
                if entry is not None and not entry[1].done():
                    entry[1].set_result(message)
            case _:
                logger.warning("ignored unexpected %s from the broker", type(message).__name__)

    def _take_manifest(self, manifest: Manifest, digest: str = "", *, source: str) -> None:
        """A version is announced (whole, or fetched by `digest`): the newest one is kept. The
        same version again with another manifest is it offered in more places (a colocated
        trainer's host copy after its GPU copy): the bytes are the same, the locators differ.
        `source`: where it came from ("broker", "peer:<name>")."""
        key = (manifest.model, manifest.version)
        self._sources[key] = source
        self._sources.move_to_end(key)
        while len(self._sources) > _SOURCES_KEPT:
            self._sources.popitem(last=False)
        current = self._manifests.get(manifest.model)
        newer = current is None or manifest.version > current.version
        if newer or (
            current is not None and manifest.version == current.version and manifest != current
        ):
            self._manifests[manifest.model] = manifest
            self._digests[manifest.model] = digest
            logger.debug("announcement model=%s version=%d", manifest.model, manifest.version)
            asyncio.get_running_loop().create_task(self._notify()).add_done_callback(_discard)

    # manifests by digest (protocol 2)

    def _have(self, message: Announced) -> bool:
        """A newer version is here, or this very manifest (same version, same digest)."""
        current = self._manifests.get(message.model)
        if current is None or current.version < message.version:
            return False
        return (
            current.version > message.version or self._digests.get(message.model) == message.digest
        )

    def _announced(self, message: Announced) -> None:
        """Use the cached manifest of this digest, or start its one fetch (only for a model
        we follow: a broker cannot make us fetch what we did not ask for)."""
        if message.model not in self._subscriptions:
            logger.warning(
                "ignored announcement of model=%s version=%d: not subscribed",
                message.model,
                message.version,
            )
            return
        if self._have(message):
            return
        cached = self._by_digest.get(message.digest)
        if cached is not None:
            self._by_digest.move_to_end(message.digest)
            self._take_manifest(cached[0], message.digest, source=cached[2])
            return
        if message.digest in self._fetching:
            return
        if message.nbytes > MAX_MESSAGE_BYTES or len(self._fetching) >= _FETCHES_IN_FLIGHT:
            logger.warning(
                "ignored announcement model=%s version=%d bytes=%d: over %d bytes, or %d "
                "manifests already being fetched",
                message.model,
                message.version,
                message.nbytes,
                MAX_MESSAGE_BYTES,
                len(self._fetching),
            )
            return
        task = asyncio.get_running_loop().create_task(self._fetch_announced(message))
        self._fetching[message.digest] = (message, task)
        task.add_done_callback(lambda _: self._fetching.pop(message.digest, None))
        task.add_done_callback(_discard)

    async def _fetch_announced(self, message: Announced) -> None:
        """Fetch, verify and apply one announced manifest; a bounded number of attempts, each
        within the request deadline. A wrong body is never applied."""
        for attempt in range(1, _FETCH_ATTEMPTS + 1):
            if self._have(message):
                return  # a newer version (or this one) came meanwhile
            try:
                # A peer once: a retry follows a broker failure, and a peer that failed
                # would cost its deadline again.
                manifest, source = await self._load_manifest(message, ask_peer=attempt == 1)
            except VersionUnavailable as exc:
                self.manifest_error = exc
                logger.warning(
                    "manifest unavailable model=%s version=%d: %s",
                    message.model,
                    message.version,
                    exc,
                )
                return  # retired already: the next announcement brings a newer one
            except (BrokerTimeout, ProtocolError) as exc:
                self.manifest_error = exc
                logger.warning(
                    "manifest fetch failed model=%s version=%d attempt=%d/%d: %s",
                    message.model,
                    message.version,
                    attempt,
                    _FETCH_ATTEMPTS,
                    exc,
                )
                if attempt < _FETCH_ATTEMPTS:
                    await asyncio.sleep(_FETCH_RETRY_S * attempt)
                continue
            except BrokerError as exc:
                self.manifest_error = exc
                logger.warning(
                    "manifest refused model=%s version=%d: %s", message.model, message.version, exc
                )
                return
            self.manifest_error = None
            self._take_manifest(manifest, message.digest, source=source)
            return
        logger.error(
            "gave up on the manifest of model=%s version=%d after %d attempts; waiting for "
            "the next announcement",
            message.model,
            message.version,
            _FETCH_ATTEMPTS,
        )

    def manifest_body(self, digest: str) -> bytes | None:
        """The encoding of a manifest taken by `digest` (one of the newest few), to serve on."""
        cached = self._by_digest.get(digest)
        return None if cached is None else cached[1]

    async def _load_manifest(
        self, message: Announced, *, ask_peer: bool = True
    ) -> tuple[Manifest, str]:
        """The manifest `message` names and where it came from: from a peer
        (`manifest_peers`, "peer:<name>") or the broker ("broker"), its SHA-256 checked
        against the digest, decoded through the guarded codec, cached by digest and offered
        to `manifest_peers`."""
        taken = await self._manifest_from_peer(message) if ask_peer else None
        if taken is None:
            body = await self._fetch_manifest_body(message.model, message.version, message.digest)
            manifest, source = self._verified(message, body), "broker"
        else:
            manifest, body, source = taken
        self._by_digest[message.digest] = (manifest, body, source)
        while len(self._by_digest) > _MANIFESTS_CACHED:
            self._by_digest.popitem(last=False)
        logger.info(
            "manifest model=%s version=%d digest=%s bytes=%d source=%s",
            message.model,
            message.version,
            message.digest[:12],
            len(body),
            source,
        )
        if self.manifest_peers is not None:
            self.manifest_peers.offer(
                model=message.model, version=message.version, digest=message.digest, body=body
            )
        return manifest, source

    async def _manifest_from_peer(self, message: Announced) -> tuple[Manifest, bytes, str] | None:
        """(manifest, body, "peer:<name>") from the peer `manifest_peers` names, verified like
        the broker's; None when there is no peer, or it failed (logged and counted: the
        caller asks the broker). A peer's body is never taken unverified."""
        peers = self.manifest_peers
        if peers is None:
            return None
        limit_s = min(PEER_MANIFEST_S, self.config.request_timeout_s)
        try:
            async with asyncio.timeout(limit_s + _PEER_GRACE_S):
                got = await peers.read(
                    model=message.model,
                    version=message.version,
                    digest=message.digest,
                    nbytes=message.nbytes,
                    deadline=time.monotonic() + limit_s,
                )
        except (TransportError, TimeoutError) as exc:  # a RelayError names the peer
            self._peer_failed(message, str(exc) or f"no answer within {limit_s:g} s")
            return None
        if got is None:
            return None
        name, body = got
        try:
            manifest = self._verified(message, body)
        except ProtocolError as exc:
            self._peer_failed(message, f"peer {name}: {exc}")
            return None
        self.peer_manifest_fetches += 1
        return manifest, body, f"peer:{name}"

    def _peer_failed(self, message: Announced, reason: str) -> None:
        self.peer_manifest_failures += 1
        logger.warning(
            "manifest from a peer failed model=%s version=%d: %s; asking the broker",
            message.model,
            message.version,
            reason,
        )

    def _verified(self, message: Announced, body: bytes) -> Manifest:
        """`body` as the manifest `message` announced, or ManifestMismatch / ProtocolError."""
        got = hashlib.sha256(body).hexdigest()
        if got != message.digest:
            raise ManifestMismatch(
                model=message.model, version=message.version, expected=message.digest, got=got
            )
        try:
            manifest = decode_manifest(body)
        except msgspec.DecodeError as exc:
            raise ProtocolError(
                f"the manifest of {message.model} version {message.version} "
                f"(digest {message.digest}) does not decode: {exc}"
            ) from exc
        if (manifest.model, manifest.version) != (message.model, message.version):
            raise ProtocolError(
                f"digest {message.digest} was announced as {message.model} version "
                f"{message.version} but is {manifest.model} version {manifest.version}"
            )
        return manifest

    async def _fetch_manifest_body(self, model: str, version: int, digest: str) -> bytes:
        """The encoded manifest of `digest`, unverified, from the broker. Raises
        BrokerTimeout, BrokerError."""
        self.manifest_fetches += 1
        reply = await self._request(
            FetchManifest(request_id=next(self._ids), model=model, version=version, digest=digest)
        )
        if not isinstance(reply, ManifestBody):
            raise ProtocolError(f"the broker answered FetchManifest with {type(reply).__name__}")
        return reply.body

    def _queue_retire(self, message: Retire) -> None:
        self._requeue_retires()
        if not self._retired_overflow:
            try:
                self.retired.put_nowait(message)
            except asyncio.QueueFull:
                pass
            else:
                return
        key = (message.model, message.version)
        self._retired_overflow[key] = message  # a repeated Retire of one version is kept once
        if len(self._retired_overflow) > self.config.queue_size:
            (model, version), _ = next(iter(self._retired_overflow.items()))
            del self._retired_overflow[(model, version)]
            logger.error(
                "dropped Retire model=%s version=%d: %d retires wait unread; the publisher's "
                "retire loop is stuck (its buffers for that version stay allocated)",
                model,
                version,
                self.config.queue_size * 2,
            )

    def _requeue_retires(self) -> None:
        """Move overflowed Retires into the queue, oldest first, as far as it has room."""
        while self._retired_overflow and not self.retired.full():
            key = next(iter(self._retired_overflow))
            self.retired.put_nowait(self._retired_overflow.pop(key))

    async def _notify(self) -> None:
        async with self._manifest_changed:
            self._manifest_changed.notify_all()

    def _start_rehello(self) -> None:
        if self._rehello is None or self._rehello.done():
            self._rehello = asyncio.get_running_loop().create_task(self._redo_handshake())

    async def _redo_handshake(self) -> None:
        logger.info(
            "broker does not know us (restarted?); saying hello again peer=%s", self.peer_id
        )
        try:
            await self.hello()
            if self._applied:
                await self._send(Heartbeat(applied=dict(self._applied)))
            for model in sorted(self._subscriptions):
                relay = self._relay_offers.get(model)
                await self._send(Subscribe(request_id=next(self._ids), model=model, relay=relay))
            for message, _ in list(self._pending.values()):
                await self._send(message)
            for model, version in list(self._leases):
                # A new broker (or one that forgot us) must know what we still read.
                await self._send(
                    AcquireLease(request_id=next(self._ids), model=model, version=version)
                )
                logger.info("re-took lease model=%s version=%d", model, version)
        except TimeoutError as exc:
            logger.warning("%s", exc)

    def _paced(self, pace_s: float) -> None:
        """The broker's pacing (Welcome, Alive): heartbeat no more often than it asks."""
        interval = max(self.config.heartbeat_interval_s, pace_s)
        if interval != self.heartbeat_s:
            logger.info("heartbeat interval_s=%.1f (the broker paces a large fleet)", interval)
            self.heartbeat_s = interval

    async def heartbeat(self) -> None:
        """Heartbeats; runs until cancelled."""
        while True:
            await asyncio.sleep(self.heartbeat_s)
            self._requeue_retires()
            try:
                await self._send(Heartbeat(applied=dict(self._applied)))
            except BrokerTimeout as exc:
                logger.warning("heartbeat not sent: %s", exc)
            self._check_heard()

    def _check_heard(self) -> None:
        silent_s = time.monotonic() - self._last_heard
        limit_s = max(5 * self.heartbeat_s, self.config.request_timeout_s)
        if silent_s > limit_s and self.cut_off is None:
            self.cut_off = f"no answer from the broker for {silent_s:.1f} s"
            logger.warning(
                "cut off from the broker peer=%s silent_s=%.1f: is it down, or is another "
                "connection holding our routing id? announcements will not reach us",
                self.peer_id,
                silent_s,
            )
        elif silent_s <= limit_s and self.cut_off is not None:
            logger.info("the broker answers again peer=%s", self.peer_id)
            self.cut_off = None

    async def watch(self) -> None:
        """Handshake events; a refused key fails every request. Runs until cancelled."""
        closed = 0
        while True:
            event = parse_monitor_message(await self._monitor.recv_multipart())
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                closed = 0
                continue
            if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                closed += 1
                if closed < CLOSED_HANDSHAKES:
                    continue
            if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                reason = (
                    f"the broker at {self.config.broker} refused our key (ZAP status "
                    f"{event['value']}): add its public key to the broker's allowlist"
                )
            else:
                reason = (
                    f"the handshake with the broker at {self.config.broker} failed: "
                    "do both sides use keys (--key-file, --broker-key-file), and the right ones?"
                )
            logger.error("%s peer=%s", reason, self.peer_id)
            self.cut_off = reason
            error = AuthError(reason)
            if self._welcome is not None and not self._welcome.done():
                self._welcome.set_exception(error)
            self._fail(error)

    def _fail(self, error: BaseException) -> None:
        self._failure = error
        for _, future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        asyncio.get_running_loop().create_task(self._notify()).add_done_callback(_discard)
        asyncio.get_running_loop().create_task(self._notify_route()).add_done_callback(_discard)

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise self._failure

    async def goodbye(self) -> None:
        with contextlib.suppress(zmq.ZMQError):
            await self._socket.send(encode(Goodbye(reason="closing")), flags=zmq.NOBLOCK)

    def close(self) -> None:
        self._socket.disable_monitor()
        self._monitor.close(linger=0)
        self._socket.close(linger=100)


def _broker_error(code: ErrorCode, detail: str) -> BrokerError:
    if code == "version_unavailable":
        return VersionUnavailable(code, detail)
    if code == "forbidden":
        return Forbidden(detail)
    return BrokerError(code, detail)


def _discard(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("background task failed: %r", task.exception())


@contextlib.asynccontextmanager
async def connect(
    config: ClientConfig,
    *,
    role: Role,
    context: zmq.asyncio.Context,
    peer_id: str | None = None,
) -> AsyncIterator[BrokerClient]:
    """Connect, say hello, and keep the receive and heartbeat tasks running while in use."""
    client = BrokerClient(config, role=role, context=context, peer_id=peer_id)
    tasks = [
        asyncio.create_task(client.receive(), name=f"{client.peer_id}-receive"),
        asyncio.create_task(client.watch(), name=f"{client.peer_id}-watch"),
    ]
    said_hello = False
    try:
        await client.hello()
        said_hello = True
        tasks.append(asyncio.create_task(client.heartbeat(), name=f"{client.peer_id}-heartbeat"))
        yield client
    finally:
        if said_hello:
            # Also on an error or a cancel (SIGTERM): the broker then logs "peer left" at INFO
            # instead of "peer gone" at WARNING after the peer timeout.
            await client.goodbye()
        if client._rehello is not None:
            tasks.append(client._rehello)
        tasks.extend(task for _, task in list(client._fetching.values()))
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        client.close()
