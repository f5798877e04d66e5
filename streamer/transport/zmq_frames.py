"""Bulk transport over plain ZeroMQ frames: the fallback when mooncake is not installed.

The publisher's side is a ROUTER socket served by one background thread; each read request
`[FrameRead]` is answered `[FrameReply, payload]`, the payload sent zero-copy straight from
the registered region. Receivers lend each fetching thread a DEALER for the endpoint (kept
idle between fetches, so there are never more than fetches at once), pipeline every request
of a batch, and copy each payload into its destination as it arrives.

    subscriber thread (DEALER) --FrameRead x N-->  ROUTER (server thread) -- memoryview(region)
                               <--FrameReply,payload--
"""

from __future__ import annotations

import ctypes
import logging
import secrets
import threading
from collections import defaultdict
from typing import TYPE_CHECKING

import msgspec
import zmq

from schemas.frames import FrameRead, FrameReply
from schemas.manifest import FrameLocator, Locator
from streamer.errors import TransportError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from streamer.transport.base import Fetch, Region

__all__ = ["ZmqFrameReceiver", "ZmqFrameSender"]

logger = logging.getLogger(__name__)

_HWM = 64
_read_decoder = msgspec.msgpack.Decoder(FrameRead)
_reply_decoder = msgspec.msgpack.Decoder(FrameReply)
_encoder = msgspec.msgpack.Encoder()


def _view(address: int, nbytes: int) -> memoryview:
    return memoryview((ctypes.c_char * nbytes).from_address(address)).cast("B")


class ZmqFrameSender:
    """Serves reads of exposed regions from a background thread."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        """`port` 0 picks a free one (the default); a fixed one suits firewalls."""
        self._ctx = zmq.Context()
        self._socket = self._ctx.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.SNDHWM, _HWM)
        self._socket.setsockopt(zmq.RCVHWM, _HWM)
        self._socket.setsockopt(zmq.LINGER, 0)
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
                    key = self._keys[region] = f"{region.address:x}-{secrets.token_hex(4)}"
                self._regions[key] = region
                locators.append(FrameLocator(endpoint=self.endpoint, key=key))
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
                read = _read_decoder.decode(header)
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
    """Pulls ranges over ZeroMQ; `timeout_s` bounds the wait for each reply."""

    def __init__(self, *, timeout_s: float = 30.0) -> None:
        self._ctx = zmq.Context()
        self._timeout_ms = int(timeout_s * 1000)
        self._idle: dict[str, list[zmq.Socket[bytes]]] = defaultdict(list)
        self._sockets: list[zmq.Socket[bytes]] = []
        self._lock = threading.Lock()

    def accepts(self, locator: Locator) -> bool:
        return isinstance(locator, FrameLocator)

    def register(self, region: Region) -> None:
        """Nothing to register: payloads are copied into place as they arrive."""

    def unregister(self, region: Region) -> None:
        """Nothing to unregister."""

    def fetch(self, fetches: Sequence[Fetch]) -> None:
        by_endpoint: dict[str, list[Fetch]] = defaultdict(list)
        for fetch in fetches:
            if not isinstance(fetch.locator, FrameLocator):
                raise TypeError(f"ZmqFrameReceiver cannot read {type(fetch.locator).__name__}")
            by_endpoint[fetch.locator.endpoint].append(fetch)
        for endpoint, group in by_endpoint.items():
            self._fetch_from(endpoint, group)

    def _checkout(self, endpoint: str) -> zmq.Socket[bytes]:
        """An idle socket to `endpoint`, or a new one: the caller's until `_checkin`."""
        with self._lock:
            if self._idle[endpoint]:
                return self._idle[endpoint].pop()
        socket = self._ctx.socket(zmq.DEALER)
        socket.setsockopt(zmq.SNDHWM, _HWM)
        socket.setsockopt(zmq.RCVHWM, _HWM)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(endpoint)
        with self._lock:
            self._sockets.append(socket)
        return socket

    def _checkin(self, endpoint: str, socket: zmq.Socket[bytes]) -> None:
        with self._lock:
            self._idle[endpoint].append(socket)

    def _fetch_from(self, endpoint: str, group: list[Fetch]) -> None:
        socket = self._checkout(endpoint)
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
                if not socket.poll(self._timeout_ms):
                    timed_out = True
                    raise TransportError(
                        f"no reply from {endpoint} within {self._timeout_ms / 1000:.0f} s "
                        f"({len(pending)} ranges outstanding): is the publisher alive?"
                    )
                frames = socket.recv_multipart(copy=False)
                if len(frames) != 2:
                    raise TransportError(
                        f"bulk reply from {endpoint} has {len(frames)} frames, not 2"
                    )
                try:
                    reply = _reply_decoder.decode(frames[0].buffer)
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
                self._checkin(endpoint, socket)

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
