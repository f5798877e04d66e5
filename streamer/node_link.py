"""A node's one control connection to the broker, shared by the engines on that node.

    engine (BrokerClient) ─┐  ipc, node-local
    engine (BrokerClient) ─┼──> ROUTER ── NodeLink.run() ── DEALER (the node's key) ──> broker
    engine ...            ─┘                  │
                                              └─ manifests by digest: fetched once, cached

Why: each ZeroMQ connection costs the broker ~29 KB of libzmq pipes (42 KB with CURVE) and one
send per announcement; the engines of an 8-GPU node through one link cost one connection and
one send. The broker still knows every engine as a subscriber of its own (its Hello, leases,
applied versions, heartbeats, status row): only the connection is shared.

The wire: an engine speaks the ordinary protocol to the link, which forwards it on its DEALER
as [member id, message]; the broker sees [link id, member id, message] and names the engine
"<link id>/<member id>". The broker sends one message to several members of a link as one
frame [member ids joined by " ", message], and the link hands each member its copy; one that
left is skipped (counted). Ahead of an announcement to its members the broker pushes the
manifest's body to the link itself ([b"", ManifestBody], once per link and digest; not when
all of them take manifests from relay peers). A member's FetchManifest for a digest the link
holds is answered here; concurrent ones for a digest it lacks wait for the first (every body
is checked against its digest before it is kept), so a version's manifest crosses the
broker's socket once per node, with no request.

Identity: the broker authenticates the link's key, and every member acts with that key's
rights. So the link listens only where its own node reaches it (`ipc://` in a directory of
mode 0700, or loopback TCP). One task owns both sockets (`run`); every collection is bounded:
members (`max_members`), cached manifests (`manifest_cache_bytes`), fetches in flight.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import msgspec
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from schemas.codec import MAX_MESSAGE_BYTES, encode
from schemas.messages import Error, ErrorCode, FetchManifest, ManifestBody, Message
from streamer.auth import CLOSED_HANDSHAKES, HANDSHAKE_EVENTS, load_keys, load_public_key
from streamer.errors import ProtocolError
from streamer.frames import decode_header

if TYPE_CHECKING:
    from collections.abc import Callable

    from zmq.utils.monitor import _MonitorMessage

__all__ = ["LinkStats", "NodeLink", "NodeLinkConfig", "serve_link"]

logger = logging.getLogger(__name__)

MEMBER_ID = re.compile(rb"[A-Za-z0-9._:@+=-]{1,128}")
"""A member's routing id: no "/" (the broker joins link and member ids with it) and no " "
(it separates members in a fan-out frame). `BrokerClient`'s peer ids match."""
_DRAIN = 256
"""Messages read from one socket per wake-up (bounded, so the other side gets its turn)."""
_PEEK_BYTES = 4096
"""Members' messages at most this long are decoded to find FetchManifest (others pass)."""
_FETCHES_IN_FLIGHT = 64
_WAITERS_PER_FETCH = 4096
_MANIFESTS_CACHED = 16


class NodeLinkConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    broker: str = "tcp://127.0.0.1:5555"
    """The broker's endpoint."""
    listen: str = "ipc:///tmp/weightstream-link/link.sock"
    """Where the node's engines connect: `ipc://PATH` (its directory is made mode 0700) or
    loopback TCP. Everyone who reaches it acts with the link's key."""
    key_file: str | None = None
    """The node's CURVE key pair, in the broker's allowlist with the engines' rights."""
    broker_key_file: str | None = None
    link_id: Annotated[str, msgspec.Meta(max_length=64)] = ""
    """The link's routing id (default link-<host>-<pid>-<random>); no "/"."""
    queue_size: Annotated[int, msgspec.Meta(ge=1)] = 10_000
    max_members: Annotated[int, msgspec.Meta(ge=1, le=65_536)] = 1024
    manifest_cache_bytes: Annotated[int, msgspec.Meta(ge=0)] = 256 * 1024 * 1024
    fetch_timeout_s: Annotated[float, msgspec.Meta(gt=0.0, le=3600.0)] = 10.0
    """A manifest fetch older than this no longer holds back a new one for its digest."""

    def __post_init__(self) -> None:
        if "/" in self.link_id or " " in self.link_id:
            raise ValueError(f"link_id {self.link_id!r} may not contain '/' or ' '")
        if (self.key_file is None) != (self.broker_key_file is None):
            raise ValueError(
                "a node link with keys needs both --key-file (the node's pair) and "
                "--broker-key-file (the broker's public key)"
            )
        if not _node_local(self.listen):
            raise ValueError(
                f"a node link listens for its own node's engines only: {self.listen!r} is "
                "neither ipc://PATH nor tcp://127.0.0.1:PORT (whoever reaches it acts with "
                "the node's key)"
            )


def _node_local(endpoint: str) -> bool:
    scheme, _, rest = endpoint.partition("://")
    if scheme == "ipc":
        return bool(rest)
    if scheme == "tcp":
        host = rest.rpartition(":")[0]
        return host in ("127.0.0.1", "localhost", "[::1]")
    return False


@dataclass
class LinkStats:
    """Counters of one link (logged when it stops; tests read them)."""

    to_broker: int = 0
    from_broker: int = 0
    delivered: int = 0
    """Copies handed to members (a fan-out frame to 8 members is 8)."""
    undeliverable: int = 0
    """Copies for members no longer connected, or whose queue was full."""
    refused: int = 0
    """Members' messages refused here (a bad routing id, a full link), answered with Error."""
    manifests_answered: int = 0
    """Members' FetchManifest answered here (from the cache, or by the one fetch in flight)."""
    manifests_fetched: int = 0
    manifests_pushed: int = 0
    """Manifests the broker pushed with an announcement (kept: they matched their digest)."""
    manifests_bad: int = 0
    members_seen: int = 0


@dataclass
class _Fetch:
    started: float
    asker: tuple[bytes, int]
    request: FetchManifest
    waiting: list[tuple[bytes, int]] = field(default_factory=list)


class NodeLink:
    """Serve a node's engines over one broker connection until cancelled.

    >>> link = NodeLink(NodeLinkConfig(broker=endpoint, listen="ipc:///run/ws/link"), context=ctx)  # doctest: +SKIP
    >>> await link.run()  # engines connect with ClientConfig(broker="ipc:///run/ws/link")  # doctest: +SKIP
    """

    def __init__(self, config: NodeLinkConfig, *, context: zmq.asyncio.Context) -> None:
        self.config = config
        self.link_id = (
            config.link_id or f"link-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        )
        self.stats = LinkStats()
        self._members: OrderedDict[bytes, float] = OrderedDict()
        """member id -> when last heard (monotonic), oldest first: the bound's order."""
        self._bodies: OrderedDict[str, bytes] = OrderedDict()
        self._body_bytes = 0
        self._fetches: dict[str, _Fetch] = {}
        """digest -> the one FetchManifest forwarded for it, and who waits on it."""
        self.front = context.socket(zmq.ROUTER)
        self.front.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.front.setsockopt(zmq.LINGER, 0)
        self.front.setsockopt(zmq.SNDHWM, config.queue_size)
        self.front.setsockopt(zmq.RCVHWM, config.queue_size)
        self.front.setsockopt(zmq.MAXMSGSIZE, 64 * 1024 * 1024)
        self.back = context.socket(zmq.DEALER)
        self.back.setsockopt(zmq.ROUTING_ID, self.link_id.encode())
        self.back.setsockopt(zmq.LINGER, 0)
        self.back.setsockopt(zmq.SNDHWM, config.queue_size)
        self.back.setsockopt(zmq.RCVHWM, config.queue_size)
        # The largest a broker sends: a manifest body at the codec's limit, and its header.
        self.back.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES + 64 * 1024)
        try:
            if config.key_file is not None and config.broker_key_file is not None:
                keys = load_keys(config.key_file)
                self.back.curve_secretkey = keys.secret
                self.back.curve_publickey = keys.public
                self.back.curve_serverkey = load_public_key(config.broker_key_file)
            if config.listen.startswith("ipc://"):
                _private_dir(Path(config.listen.removeprefix("ipc://")).parent)
            self.front.bind(config.listen)
            self.endpoint: str = self.front.getsockopt_string(zmq.LAST_ENDPOINT)
            self.back.connect(config.broker)
        except BaseException:
            self.close()
            raise
        self._monitor = self.back.get_monitor_socket(HANDSHAKE_EVENTS)
        self._closed_handshakes = 0
        self.refused: str | None = None
        """Why the broker refuses this link's key (its members are told), or None."""
        # Unwrapped twins for non-blocking sends and receives without a Future each.
        self._front: zmq.Socket[bytes] = zmq.Socket.shadow(self.front.underlying)
        self._back: zmq.Socket[bytes] = zmq.Socket.shadow(self.back.underlying)

    def close(self) -> None:
        if hasattr(self, "_monitor"):
            self.back.disable_monitor()
            self._monitor.close(linger=0)
        self.front.close(linger=0)
        self.back.close(linger=0)

    async def run(self) -> None:
        """Forward both ways until cancelled (this task owns both sockets)."""
        logger.info(
            "node link up link=%s listen=%s broker=%s keys=%s",
            self.link_id,
            self.endpoint,
            self.config.broker,
            "curve" if self.config.key_file else "none",
        )
        poller = zmq.asyncio.Poller()
        poller.register(self.front, zmq.POLLIN)
        poller.register(self.back, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        try:
            while True:
                ready = dict(await poller.poll())
                if self._monitor in ready:
                    self._handshake(parse_monitor_message(await self._monitor.recv_multipart()))
                if self.back in ready:
                    self._drain(self._back, self._from_broker)
                if self.front in ready:
                    self._drain(self._front, self._from_member)
        finally:
            logger.info("node link down link=%s stats=%s", self.link_id, self.stats)

    @staticmethod
    def _drain(sock: zmq.Socket[bytes], handle: Callable[[list[bytes]], None]) -> None:
        for _ in range(_DRAIN):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            handle(frames)

    def _handshake(self, event: _MonitorMessage) -> None:
        """Follow the broker connection's CURVE handshakes: while the broker refuses our key,
        members are told so (Error "forbidden") instead of waiting out their timeouts."""
        kind = event["event"]
        if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self._closed_handshakes = 0
            if self.refused is not None:
                logger.info("the broker accepts the node link's key again link=%s", self.link_id)
            self.refused = None
            return
        if kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
            self._closed_handshakes += 1
            if self._closed_handshakes < CLOSED_HANDSHAKES:
                return
        reason = (
            f"the broker at {self.config.broker} refused node link {self.link_id}'s key: add "
            "the node's public key to the broker's allowlist, with the rights its engines need"
            if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH
            else f"the handshake of node link {self.link_id} with the broker at "
            f"{self.config.broker} failed: do the link's --key-file and --broker-key-file match "
            "the broker's?"
        )
        if self.refused is None:
            logger.error("%s", reason)
        self.refused = reason

    # member -> broker

    def _from_member(self, frames: list[bytes]) -> None:
        member, payload = frames[0], frames[-1]
        if len(frames) != 2:
            self._refuse(member, "protocol", f"expected one frame, got {len(frames) - 1}")
            return
        if MEMBER_ID.fullmatch(member) is None:
            self._refuse(
                member,
                "protocol",
                "a node link's member needs a routing id of 1-128 characters of "
                "A-Z a-z 0-9 . _ : @ + = - (BrokerClient's peer ids are)",
            )
            return
        if not self._admit(member):
            return
        if self.refused is not None:
            self._refuse(member, "forbidden", self.refused)
            return
        if len(payload) <= _PEEK_BYTES and b"fetch_manifest" in payload:
            try:
                message = decode_header(payload)
            except ProtocolError:
                message = None  # forwarded: the broker answers it with its protocol error
            if isinstance(message, FetchManifest) and self._fetch(member, message):
                return
        self._to_broker([member, payload])

    def _admit(self, member: bytes) -> bool:
        now = time.monotonic()
        if member in self._members:
            self._members[member] = now
            self._members.move_to_end(member)
            return True
        if len(self._members) >= self.config.max_members:
            # Forget members silent for three fetch timeouts (they left without a word).
            oldest, heard = next(iter(self._members.items()))
            if now - heard < 3 * self.config.fetch_timeout_s:
                self._refuse(
                    member,
                    "bad_request",
                    f"this node link serves {self.config.max_members} engines already "
                    "(--max-members); raise it or start another link",
                )
                return False
            del self._members[oldest]
        self._members[member] = now
        self.stats.members_seen += 1
        logger.info("member joined link=%s member=%s", self.link_id, member.decode())
        return True

    def _refuse(self, member: bytes, code: ErrorCode, detail: str) -> None:
        self.stats.refused += 1
        logger.warning("refused member=%r code=%s detail=%s", member, code, detail)
        error = encode(Error(code=code, detail=detail))
        self._to_member(member, error)

    def _to_broker(self, frames: list[bytes]) -> None:
        try:
            self._back.send_multipart(frames, flags=zmq.NOBLOCK)
            self.stats.to_broker += 1
        except zmq.Again:
            # The broker is away or slow: the member's request times out and is retried.
            self.stats.undeliverable += 1
            logger.warning("broker queue full link=%s: dropped a member's message", self.link_id)

    # manifests, once per node

    def _fetch(self, member: bytes, message: FetchManifest) -> bool:
        """True when answered or parked here; False to forward it (the first for a digest)."""
        body = self._bodies.get(message.digest)
        if body is not None:
            self._bodies.move_to_end(message.digest)
            self._answer([(member, message.request_id)], message.digest, body)
            return True
        now = time.monotonic()
        pending = self._fetches.get(message.digest)
        if pending is not None and now - pending.started < self.config.fetch_timeout_s:
            if len(pending.waiting) < _WAITERS_PER_FETCH:
                pending.waiting.append((member, message.request_id))
                return True
            return False
        self._fetches.pop(message.digest, None)
        while len(self._fetches) >= _FETCHES_IN_FLIGHT:
            # The oldest goes (dicts keep insertion order): its members time out and retry.
            del self._fetches[next(iter(self._fetches))]
        self._fetches[message.digest] = _Fetch(
            started=now, asker=(member, message.request_id), request=message
        )
        self.stats.manifests_fetched += 1
        return False

    def _manifest_reply(self, member: bytes, message: Message) -> None:
        """A reply to a forwarded FetchManifest: keep a body that matches its digest, answer
        the members waiting on it; on an error or a wrong body, send theirs on."""
        if isinstance(message, ManifestBody):
            pending = self._fetches.get(message.digest)
            if pending is None or pending.asker != (member, message.request_id):
                return
            del self._fetches[message.digest]
            if self._keep_checked(message, "fetched"):
                self._answer(pending.waiting, message.digest, message.body)
                return
        elif isinstance(message, Error):
            found = [
                d
                for d, f in self._fetches.items()
                if f.asker == (member, message.request_id) and message.request_id
            ]
            if not found:
                return
            pending = self._fetches.pop(found[0])
        else:
            return
        for waiter, request_id in pending.waiting:  # each asks the broker itself
            again = msgspec.structs.replace(pending.request, request_id=request_id)
            self._to_broker([waiter, encode(again)])

    def _take_pushed(self, payload: bytes) -> None:
        """Keep a manifest the broker pushed (checked against its digest first), and answer
        the members already waiting for it."""
        try:
            message = decode_header(payload)
        except ProtocolError as exc:
            logger.warning("undecodable push from the broker link=%s: %s", self.link_id, exc)
            return
        if not isinstance(message, ManifestBody):
            logger.warning("unexpected %s pushed to link=%s", type(message).__name__, self.link_id)
            return
        if not self._keep_checked(message, "pushed"):
            return
        self.stats.manifests_pushed += 1
        pending = self._fetches.get(message.digest)
        if pending is not None:  # the asker still gets the broker's own reply
            self._answer(pending.waiting, message.digest, message.body)
            pending.waiting.clear()

    def _keep_checked(self, message: ManifestBody, how: str) -> bool:
        """Keep a body that matches its digest; count and log one that does not."""
        if hashlib.sha256(message.body).hexdigest() != message.digest:
            self.stats.manifests_bad += 1
            logger.warning(
                "%s manifest does not match its digest link=%s digest=%s",
                how,
                self.link_id,
                message.digest[:12],
            )
            return False
        self._keep(message.digest, message.body)
        return True

    def _answer(self, waiting: list[tuple[bytes, int]], digest: str, body: bytes) -> None:
        """Hand `body` to each (member, request id) as the reply to its FetchManifest."""
        self.stats.manifests_answered += len(waiting)
        for member, request_id in waiting:
            reply = ManifestBody(request_id=request_id, digest=digest, body=body)
            self._to_member(member, encode(reply))

    def _keep(self, digest: str, body: bytes) -> None:
        limit = self.config.manifest_cache_bytes
        if len(body) > limit:
            return
        if digest in self._bodies:  # pushed after a fetch kept it, say: counted once
            self._bodies.move_to_end(digest)
            return
        self._bodies[digest] = body
        self._body_bytes += len(body)
        while self._body_bytes > limit or len(self._bodies) > _MANIFESTS_CACHED:
            _, dropped = self._bodies.popitem(last=False)
            self._body_bytes -= len(dropped)

    # broker -> members

    def _from_broker(self, frames: list[bytes]) -> None:
        self.stats.from_broker += 1
        if len(frames) != 2:
            # Addressed to the link itself: the broker refused something it forwarded.
            logger.warning(
                "the broker answered the link itself link=%s frames=%d", self.link_id, len(frames)
            )
            return
        members, payload = frames
        if not members:  # for the link itself: a manifest pushed ahead of its announcement
            self._take_pushed(payload)
            return
        if self._fetches and b" " not in members and len(payload) >= 8:
            try:
                message = decode_header(payload)
            except ProtocolError:
                message = None
            if isinstance(message, ManifestBody | Error):
                self._manifest_reply(members, message)
        for member in members.split(b" "):
            self._to_member(member, payload)

    def _to_member(self, member: bytes, payload: bytes) -> None:
        try:
            self._front.send_multipart([member, payload], flags=zmq.NOBLOCK)
            self.stats.delivered += 1
        except zmq.Again:
            self.stats.undeliverable += 1
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            self.stats.undeliverable += 1
            self._members.pop(member, None)


def _private_dir(path: Path) -> None:
    """Make `path` (the ipc socket's directory) if need be; it must be ours and 0700."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise ValueError(
            f"the node link's socket directory {path} must belong to this user with mode 0700 "
            f"(it has uid {info.st_uid}, mode {oct(info.st_mode & 0o777)}): other users could "
            "connect and act with the node's key; chmod 700 it or pick another --listen path"
        )


async def serve_link(
    config: NodeLinkConfig,
    *,
    context: zmq.asyncio.Context | None = None,
    on_ready: Callable[[NodeLink], None] | None = None,
) -> None:
    """Run a node link until cancelled; `on_ready(link)` once it listens."""
    ctx = context or zmq.asyncio.Context()
    try:
        link = NodeLink(config, context=ctx)
        try:
            if on_ready is not None:
                on_ready(link)
            await link.run()
        finally:
            link.close()
    finally:
        if context is None:
            ctx.destroy(linger=0)
