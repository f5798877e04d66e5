"""Bulk transport over plain ZeroMQ frames: the fallback when mooncake is not installed.

The publisher's side is a ROUTER socket served by one background thread; each read request
`[FrameRead]` is answered `[FrameReply, payload]`, the payload sent zero-copy straight from
the registered region. Receivers lend each fetching thread a DEALER for the endpoint (kept
idle between fetches, so there are never more than fetches at once), pipeline every request
of a batch, and copy each payload into its destination as it arrives.

    subscriber thread (DEALER) --FrameRead x N-->  ROUTER (server thread) -- memoryview(region)
                               <--FrameReply,payload--

`ZmqFrameSender(encrypt=True)` makes the ROUTER a CURVE server with a key pair of its own and
puts its public key in each `FrameLocator` (`server_key`); receivers then connect as CURVE
clients with a throwaway key pair, so every request and payload is encrypted and the payload
comes from the holder of that key. Any client may connect; what it may read is limited by the
region keys, unguessable tokens that only the (authenticated) manifest carries.
"""

from __future__ import annotations

import ctypes
import logging
import secrets
import threading
import time
from collections import defaultdict
from typing import TYPE_CHECKING

import msgspec
import zmq

from schemas.frames import (
    MAX_FRAME_HEADER_BYTES,
    FrameRead,
    FrameReply,
    decode_frame_read,
    decode_frame_reply,
)
from schemas.manifest import FrameLocator, Locator
from streamer.errors import TransportError
from streamer.transport.base import FetchTimeout, seconds_left

if TYPE_CHECKING:
    from collections.abc import Sequence

    from streamer.transport.base import Fetch, Region

__all__ = ["ZmqFrameReceiver", "ZmqFrameSender", "curve_server"]

logger = logging.getLogger(__name__)

_HWM = 64
_encoder = msgspec.msgpack.Encoder()


def curve_server(socket: zmq.Socket[bytes]) -> str:
    """Make `socket` a CURVE server with a fresh key pair of its own; its public key (Z85),
    which readers need to connect."""
    public, secret = zmq.curve_keypair()
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_server = True
    return public.decode("ascii")


def _view(address: int, nbytes: int) -> memoryview:
    return memoryview((ctypes.c_char * nbytes).from_address(address)).cast("B")


class ZmqFrameSender:
    """Serves reads of exposed regions from a background thread."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, encrypt: bool = False) -> None:
        """`port` 0 picks a free one (the default); a fixed one suits firewalls. `encrypt`
        serves reads over CURVE (the server key travels in the locator)."""
        self._ctx = zmq.Context()
        self._socket = self._ctx.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.SNDHWM, _HWM)
        self._socket.setsockopt(zmq.RCVHWM, _HWM)
        self._socket.setsockopt(zmq.LINGER, 0)
        # Requests are small headers: a larger frame is dropped by ZeroMQ before it is read.
        self._socket.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_HEADER_BYTES)
        self.server_key = curve_server(self._socket) if encrypt else ""
        if port:
            try:
                self._socket.bind(f"tcp://{host}:{port}")
            except zmq.ZMQError:
                self._ctx.destroy(linger=0)
                raise
        else:
            port = self._socket.bind_to_random_port(f"tcp://{host}")
        self.endpoint = f"tcp://{host}:{port}"
        self._regions: dict[str, Region] = {}
        self._keys: dict[Region, str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="zmq-frame-sender", daemon=True)
        self._thread.start()

    def expose(self, regions: Sequence[Region]) -> list[Locator]:
        locators: list[Locator] = []
        with self._lock:
            for region in regions:
                # One key per buffer: a publisher re-exposes the same buffers version after version.
                key = self._keys.get(region)
                if key is None:
                    # 128 random bits: the key is the capability to read the region.
                    key = self._keys[region] = f"{region.address:x}-{secrets.token_hex(16)}"
                self._regions[key] = region
                locators.append(
                    FrameLocator(endpoint=self.endpoint, key=key, server_key=self.server_key)
                )
        return locators

    def retract(self, regions: Sequence[Region]) -> None:
        gone = set(regions)
        with self._lock:
            for key in [key for key, region in self._regions.items() if region in gone]:
                del self._regions[key]
            for region in gone:
                self._keys.pop(region, None)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._ctx.destroy(linger=0)

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(100):
                continue
            frames = self._socket.recv_multipart()
            if len(frames) != 2:
                logger.warning("dropped a bulk request of %d frames", len(frames))
                continue
            identity, header = frames
            try:
                read = decode_frame_read(header)
            except msgspec.DecodeError:
                logger.warning("dropped an undecodable bulk request from %r", identity)
                continue
            self._answer(identity, read)

    def _answer(self, identity: bytes, read: FrameRead) -> None:
        with self._lock:
            region = self._regions.get(read.key)
        if region is None or read.offset + read.nbytes > region.nbytes:
            detail = "unknown region (retired?)" if region is None else "range past the region"
            reply = FrameReply(request_id=read.request_id, ok=False, detail=detail)
            self._socket.send_multipart([identity, _encoder.encode(reply), b""])
            return
        payload = _view(region.address + read.offset, read.nbytes)
        reply = FrameReply(request_id=read.request_id, ok=True)
        self._socket.send_multipart([identity, _encoder.encode(reply), payload], copy=False)


class ZmqFrameReceiver:
    """Pulls ranges over ZeroMQ; a fetch's `deadline` bounds it, else `timeout_s` per reply.

    Payloads are copied into place by the fetching thread itself, so once `fetch` has
    returned or raised (a deadline included) nothing of it writes into local memory again.
    """

    def __init__(self, *, timeout_s: float = 30.0) -> None:
        self._ctx = zmq.Context()
        self._timeout_s = timeout_s
        self._idle: dict[tuple[str, str], list[zmq.Socket[bytes]]] = defaultdict(list)
        self._client_keys: tuple[bytes, bytes] | None = None
        self._sockets: list[zmq.Socket[bytes]] = []
        self._lock = threading.Lock()

    def accepts(self, locator: Locator) -> bool:
        return isinstance(locator, FrameLocator)

    def register(self, region: Region) -> None:
        """Nothing to register: payloads are copied into place as they arrive."""

    def unregister(self, region: Region) -> None:
        """Nothing to unregister."""

    def fetch(self, fetches: Sequence[Fetch], *, deadline: float | None = None) -> None:
        by_endpoint: dict[tuple[str, str], list[Fetch]] = defaultdict(list)
        for fetch in fetches:
            if not isinstance(fetch.locator, FrameLocator):
                raise TypeError(f"ZmqFrameReceiver cannot read {type(fetch.locator).__name__}")
            by_endpoint[fetch.locator.endpoint, fetch.locator.server_key].append(fetch)
        for peer, group in by_endpoint.items():
            self._fetch_from(peer, group, deadline)

    def _checkout(self, peer: tuple[str, str]) -> zmq.Socket[bytes]:
        """An idle socket to `peer` (endpoint, server key), or a new one: the caller's until
        `_checkin`."""
        with self._lock:
            if self._idle[peer]:
                return self._idle[peer].pop()
        endpoint, server_key = peer
        socket = self._ctx.socket(zmq.DEALER)
        socket.setsockopt(zmq.SNDHWM, _HWM)
        socket.setsockopt(zmq.RCVHWM, _HWM)
        socket.setsockopt(zmq.LINGER, 0)
        if server_key:
            try:
                socket.curve_serverkey = server_key.encode("ascii")
            except (zmq.ZMQError, UnicodeEncodeError) as exc:
                socket.close(linger=0)
                raise TransportError(f"bad CURVE key for {endpoint} in the manifest") from exc
            with self._lock:
                if self._client_keys is None:
                    self._client_keys = zmq.curve_keypair()
                public, secret = self._client_keys
            socket.curve_publickey = public
            socket.curve_secretkey = secret
        socket.connect(endpoint)
        with self._lock:
            self._sockets.append(socket)
        return socket

    def _checkin(self, peer: tuple[str, str], socket: zmq.Socket[bytes]) -> None:
        with self._lock:
            self._idle[peer].append(socket)

    def _fetch_from(
        self, peer: tuple[str, str], group: list[Fetch], deadline: float | None
    ) -> None:
        endpoint = peer[0]
        started = time.monotonic()
        socket = self._checkout(peer)
        timed_out = False
        try:
            pending: dict[int, Fetch] = {}
            base = secrets.randbits(40)
            for index, fetch in enumerate(group):
                assert isinstance(fetch.locator, FrameLocator)
                read = FrameRead(
                    request_id=base + index,
                    key=fetch.locator.key,
                    offset=fetch.offset,
                    nbytes=fetch.nbytes,
                )
                pending[read.request_id] = fetch
                socket.send(_encoder.encode(read))
            while pending:
                wait_s = seconds_left(deadline, self._timeout_s)
                if not socket.poll(int(wait_s * 1000)):
                    timed_out = True
                    if wait_s >= self._timeout_s:  # our own limit per reply, not the caller's
                        raise TransportError(
                            f"no reply from {endpoint} within {self._timeout_s:g} s "
                            f"({len(pending)} ranges outstanding): is the publisher alive?"
                        )
                    raise FetchTimeout(
                        f"zmq read from {endpoint} not done after "
                        f"{time.monotonic() - started:.1f} s ({len(pending)} of {len(group)} ranges "
                        "outstanding): the publisher is frozen, overloaded or gone; check it, "
                        "or allow more time (pull_timeout_s)"
                    )
                frames = socket.recv_multipart(copy=False)
                if len(frames) != 2:
                    raise TransportError(
                        f"bulk reply from {endpoint} has {len(frames)} frames, not 2"
                    )
                try:
                    reply = decode_frame_reply(frames[0].buffer)
                except msgspec.DecodeError as exc:
                    raise TransportError(f"undecodable bulk reply from {endpoint}") from exc
                if reply.request_id not in pending:
                    continue  # a late answer to a batch that already failed
                fetch = pending.pop(reply.request_id)
                if not reply.ok:
                    raise TransportError(f"{endpoint} refused a read: {reply.detail}")
                payload = frames[1].buffer
                if len(payload) != fetch.nbytes:
                    raise TransportError(
                        f"{endpoint} sent {len(payload)} bytes where {fetch.nbytes} were asked"
                    )
                _view(fetch.address, fetch.nbytes)[:] = payload
        finally:
            if timed_out:
                self._drop(socket)
            else:
                self._checkin(peer, socket)

    def _drop(self, socket: zmq.Socket[bytes]) -> None:
        """Close a socket after a timeout rather than lend it out again to a dead peer."""
        with self._lock:
            self._sockets.remove(socket)
        socket.close(linger=0)

    def close(self) -> None:
        with self._lock:
            for socket in self._sockets:
                socket.close(linger=0)
            self._sockets.clear()
            self._idle.clear()
        self._ctx.term()
