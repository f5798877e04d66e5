"""Reading buckets from other subscribers' relay servers (`subscribers.relay.RelayServer`).

    pull (a thread per read) ── RelayClient.read(source, bucket, into, deadline)
        │ DEALER per relay endpoint (+ its monitor), idle between reads
        ├── RelayRead ──> relay ──> RelayReply(ok) + payload ──> copied into staging
        │                       └─> RelayReply(ok, located) ──> mooncake one-sided read
        ├── RelayManifestRead ──> relay ──> RelayReply(ok) + the encoded manifest ──> bytes
        │       (read_manifest; `PeerManifests` asks it for `BrokerClient.manifest_peers`)
        └── a refusal, no answer by the deadline, or the connection gone ──> RelayError

One DEALER per relay endpoint and read at a time (kept idle between reads), a CURVE client
when the source names a server key. The payload is copied into the reader's staging by the
reading thread itself: once `read` returns or raises, nothing of it writes there again (a
one-sided read given up at its deadline is waited for, within mooncake's own transfer
timeout, before `read` raises). The caller (`subscribers.pull`) verifies every byte against
the trainer's manifest.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import secrets
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec
import zmq
from zmq.utils.monitor import parse_monitor_message

from schemas.frames import (
    MAX_RELAY_WAIT_S,
    RelayManifestRead,
    RelayRead,
    RelayReply,
    decode_relay_reply,
)
from streamer.transport.base import Fetch, FetchTimeout
from subscribers.relay import RelayError, RelayTimeout

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from schemas.messages import RelaySource, Route
    from streamer.transport.base import BulkReceiver
    from subscribers.relay import RelayServer

__all__ = ["PeerManifests", "RelayClient", "manifest_source"]

_HWM = 64
_encoder = msgspec.msgpack.Encoder()


def _view(address: int, nbytes: int) -> memoryview:
    return memoryview((ctypes.c_char * nbytes).from_address(address)).cast("B")


@dataclass
class _Link:
    """A DEALER to one relay and its monitor (which tells a closed connection at once)."""

    socket: zmq.Socket[bytes]
    monitor: zmq.Socket[bytes]

    def close(self) -> None:
        self.socket.disable_monitor()
        self.monitor.close(linger=0)
        self.socket.close(linger=0)


_GONE_EVENTS = (
    zmq.EVENT_DISCONNECTED
    | zmq.EVENT_CONNECT_RETRIED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
"""A relay whose connection closes (a killed process), refuses us, or fails the handshake."""


_Peer = tuple[str, str, int]
"""(endpoint, server key, frame class): sockets are pooled by all three."""
_MIN_FRAME_CLASS = 64 * 1024
"""The smallest frame bound a relay socket takes (any reply header fits)."""


def _frame_class(nbytes: int) -> int:
    """The power of two >= `nbytes` (at least 64 KiB): a read's socket takes no larger frame,
    and reads of similar sizes share sockets.

    >>> _frame_class(1), _frame_class(65537), _frame_class(64 << 20)
    (65536, 131072, 67108864)
    """
    return max(_MIN_FRAME_CLASS, 1 << max(0, nbytes - 1).bit_length())


def _wait_s(deadline: float) -> float:
    """The `wait_s` of a read due by `deadline`: the relay answers `not_verified` a little
    before it, so that a holder that is alive but behind is told apart from a dead or frozen
    one (no answer)."""
    left_s = max(0.0, deadline - time.monotonic())
    return min(MAX_RELAY_WAIT_S, max(0.0, left_s - min(1.0, left_s / 4)))


class RelayClient:
    """Reads buckets from other subscribers' relay servers (blocking; call it in a thread).

    A relay that goes (its process killed: the connection closes) fails the read at once, by
    the socket's monitor; a frozen one (connection open, no answer) at the read's deadline.

    >>> client = RelayClient()
    >>> client.read(source, manifest.model, manifest.version, bucket, address, deadline)  # doctest: +SKIP
    """

    def __init__(self) -> None:
        self._ctx = zmq.Context()
        self._idle: dict[_Peer, list[_Link]] = defaultdict(list)
        """Sockets in step, by relay and frame class (`_frame_class`)."""
        self._links: list[_Link] = []
        self._client_keys: tuple[bytes, bytes] | None = None
        self._lock = threading.Lock()

    def read(
        self,
        source: RelaySource,
        model: str,
        version: int,
        region: int,
        offset: int,
        nbytes: int,
        address: int,
        deadline: float,
        one_sided: BulkReceiver | None = None,
    ) -> None:
        """Read one bucket from `source` into `address`, by `deadline` (`time.monotonic()`).

        With `one_sided` (a mooncake receiver our staging is registered with) the relay is
        asked where the bucket is, and it is read one-sided, if the relay offers that."""
        name = source.name or source.endpoint
        read = RelayRead(
            request_id=secrets.randbits(40),
            model=model,
            version=version,
            region=region,
            offset=offset,
            nbytes=nbytes,
            wait_s=_wait_s(deadline),
            locate=one_sided is not None,
        )
        what = f"{model} version {version} region {region} offset {offset}"
        reply, frames = self._exchange(source, read, what, deadline, nbytes)
        if reply.code != "ok":
            raise RelayError(
                f"relay {name} refused a read ({reply.code}): {reply.detail}", code=reply.code
            )
        locator = reply.located
        if locator is not None and one_sided is not None:
            if not one_sided.accepts(locator):
                raise RelayError(f"relay {name} offers mooncake over {locator.protocol}")
            try:
                one_sided.fetch([Fetch(locator, 0, nbytes, address)], deadline=deadline)
            except FetchTimeout:
                # Given up, the read may still land: wait for it (mooncake's own transfer
                # timeout bounds it) before the bucket is read elsewhere and verified, so
                # that no late write lands over verified bytes. Then fail over.
                with contextlib.suppress(FetchTimeout):
                    one_sided.fetch([], deadline=None)
                raise
            return
        payload = frames[1].buffer if len(frames) == 2 else b""
        if len(payload) != nbytes:
            raise RelayError(
                f"relay {source.endpoint} sent {len(payload)} bytes where {nbytes} were asked"
            )
        _view(address, nbytes)[:] = payload

    def read_manifest(
        self,
        source: RelaySource,
        model: str,
        version: int,
        digest: str,
        nbytes_max: int,
        deadline: float,
    ) -> bytes:
        """The encoded manifest `digest` of `model` `version` from `source`, by `deadline`
        (`time.monotonic()`), at most `nbytes_max` bytes. Unverified: the caller checks its
        SHA-256 against `digest` before it decodes a byte. Raises `RelayError`, `RelayTimeout`.

        >>> body = client.read_manifest(source, "llama", 7, digest, 1 << 20, deadline)  # doctest: +SKIP
        """
        name = source.name or source.endpoint
        read = RelayManifestRead(
            request_id=secrets.randbits(40),
            model=model,
            version=version,
            digest=digest,
            wait_s=_wait_s(deadline),
        )
        what = f"the manifest of {model} version {version}"
        reply, frames = self._exchange(source, read, what, deadline, nbytes_max)
        if reply.code != "ok":
            raise RelayError(
                f"relay {name} refused a manifest read ({reply.code}): {reply.detail}",
                code=reply.code,
            )
        if len(frames) != 2 or len(frames[1].buffer) > nbytes_max:
            got = len(frames[1].buffer) if len(frames) == 2 else 0
            raise RelayError(
                f"relay {name} sent a manifest of {got} bytes in {len(frames) - 1} frames "
                f"(one of at most {nbytes_max} bytes was asked)"
            )
        return frames[1].bytes

    def _exchange(
        self,
        source: RelaySource,
        request: RelayRead | RelayManifestRead,
        what: str,
        deadline: float,
        max_bytes: int,
    ) -> tuple[RelayReply, list[zmq.Frame]]:
        """Send `request` on a socket to `source` lent for it, return its reply (and its
        frames) by `deadline`; raises RelayError (a closed connection, by the monitor;
        garbage) or RelayTimeout. Late answers to earlier requests on the same socket are
        skipped. A socket that answered in step is kept for the next read; any other is
        closed. The socket takes no frame over `max_bytes`' class: a relay that sends a
        larger one is disconnected by libzmq before the bytes are buffered (a RelayError)."""
        peer = (source.endpoint, source.server_key, _frame_class(max_bytes))
        link = self._checkout(peer)
        try:
            answer = self._exchange_frames(link, source, request, what, deadline)
        except zmq.ZMQError as exc:  # the socket closed under us (`close`), or a full queue
            self._drop(link)
            raise RelayError(f"relay read from {source.endpoint} failed: {exc}") from exc
        except BaseException:
            self._drop(link)
            raise
        self._checkin(peer, link)
        return answer

    def _exchange_frames(
        self,
        link: _Link,
        source: RelaySource,
        request: RelayRead | RelayManifestRead,
        what: str,
        deadline: float,
    ) -> tuple[RelayReply, list[zmq.Frame]]:
        name = source.name or source.endpoint
        socket = link.socket
        socket.send(_encoder.encode(request))
        poller = zmq.Poller()
        poller.register(socket, zmq.POLLIN)
        poller.register(link.monitor, zmq.POLLIN)
        while True:
            left_ms = int(max(0.0, deadline - time.monotonic()) * 1000)
            events = dict(poller.poll(left_ms))
            if not events:
                raise RelayTimeout(f"relay {name} did not serve {what} in time")
            if link.monitor in events:
                event = parse_monitor_message(link.monitor.recv_multipart())
                if event["event"] & _GONE_EVENTS:
                    raise RelayError(
                        f"relay {name} at {source.endpoint} is gone (connection closed, "
                        "refused, or its handshake failed)"
                    )
            if socket not in events:
                continue
            frames = socket.recv_multipart(copy=False)
            try:
                reply = decode_relay_reply(frames[0].buffer)
            except msgspec.DecodeError as exc:
                raise RelayError(f"undecodable relay reply from {source.endpoint}") from exc
            if reply.request_id == request.request_id:
                return reply, frames

    def keep_only(self, sources: Iterable[RelaySource]) -> None:
        """Close idle sockets to relays not among `sources` (bounds the sockets kept)."""
        keep = {(source.endpoint, source.server_key) for source in sources}
        with self._lock:
            for peer in [peer for peer in self._idle if peer[:2] not in keep]:
                for link in self._idle.pop(peer):
                    self._links.remove(link)
                    link.close()

    def _checkout(self, peer: _Peer) -> _Link:
        with self._lock:
            if self._idle.get(peer):
                return self._idle[peer].pop()
        endpoint, server_key, max_frame_bytes = peer
        socket = self._ctx.socket(zmq.DEALER)
        socket.setsockopt(zmq.SNDHWM, _HWM)
        socket.setsockopt(zmq.RCVHWM, _HWM)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes)
        link = _Link(socket, socket.get_monitor_socket(_GONE_EVENTS))
        try:
            if server_key:
                socket.curve_serverkey = server_key.encode("ascii")
                with self._lock:
                    if self._client_keys is None:
                        self._client_keys = zmq.curve_keypair()
                    public, secret = self._client_keys
                socket.curve_publickey = public
                socket.curve_secretkey = secret
            socket.connect(endpoint)
        except (zmq.ZMQError, UnicodeEncodeError) as exc:
            link.close()
            raise RelayError(f"cannot connect to relay {endpoint}: {exc}") from exc
        with self._lock:
            self._links.append(link)
        return link

    def _checkin(self, peer: _Peer, link: _Link) -> None:
        with self._lock:
            self._idle[peer].append(link)

    def _drop(self, link: _Link) -> None:
        """A link that timed out, closed or got garbage is not lent out again."""
        with self._lock:
            self._links.remove(link)
        link.close()

    def close(self) -> None:
        with self._lock:
            for link in self._links:
                link.close()
            self._links.clear()
            self._idle.clear()
        self._ctx.term()


def manifest_source(route: Route | None) -> RelaySource | None:
    """The peer to read a version's manifest from: the Route's stripe-0 parent, or None (the
    broker) when that is the trainer.

    Only stripe 0: its parents form one tree rooted at the trainer, so following them always
    ends at a node that asks the broker. Another stripe's parent (or a fallback) of a stripe-0
    root is, in the same plan, a descendant of that root in stripe 0: it would wait for the
    root while the root waits for it.
    """
    if route is None or not route.parents:
        return None
    return route.parents[0]


class PeerManifests:
    """A relay subscriber's `BrokerClient.manifest_peers`: reads an announced manifest from its
    Route's stripe-0 parent (`manifest_source`; never its own `server`) and offers every
    manifest its client takes to `server`, for the readers one level down.

    Install it before subscribing, so that the first version's manifest comes from a peer too
    (the `subscribe` command does; a relay `Subscriber` installs one if none is).

    >>> client.manifest_peers = PeerManifests(server=relay, routes=client.route)  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        server: RelayServer,
        routes: Callable[[str, int], Route | None],
        reader: Callable[[], RelayClient] | None = None,
    ) -> None:
        """`routes(model, version)`: the broker's Route (`BrokerClient.route`); `reader()`:
        the RelayClient to read with; None: one of its own, made on the first read and closed
        by `close`."""
        self._server = server
        self._routes = routes
        self._reader = reader
        self._own: RelayClient | None = None

    async def read(
        self, *, model: str, version: int, digest: str, nbytes: int, deadline: float
    ) -> tuple[str, bytes] | None:
        """(the peer's name, the body, unverified), or None when the Route names no peer;
        raises RelayError (RelayTimeout past `deadline`)."""
        source = manifest_source(self._routes(model, version))
        if source is None or source.endpoint == self._server.endpoint:
            return None
        reader = self._client()
        body = await asyncio.to_thread(
            reader.read_manifest, source, model, version, digest, nbytes, deadline
        )
        return source.name or source.endpoint, body

    def offer(self, *, model: str, version: int, digest: str, body: bytes) -> None:
        self._server.offer_manifest(model, version, digest, body)

    def _client(self) -> RelayClient:
        if self._reader is not None:
            return self._reader()
        if self._own is None:
            self._own = RelayClient()
        return self._own

    def close(self) -> None:
        """Close its own RelayClient, if it made one (safe to call twice)."""
        if self._own is not None:
            self._own.close()
            self._own = None
