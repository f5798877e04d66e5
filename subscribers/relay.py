"""The relay: a subscriber serves the verified buckets it holds to other subscribers.

    holder                                                        reader (pull, route)
    pull ── bucket b verified ──> RelayServer.mark_verified(b)    RelayClient.read(source, b)
                                        │                           │ DEALER per relay endpoint
                 ROUTER (one server thread) <──── RelayRead ────────┘
                   held[(model, version)]: staging + verified set
                   verified?  ──> RelayReply(ok), payload (zero copy from staging) ──> into
                   not yet?   ──> parked (bounded), answered once verified or at its wait   staging
                   not held?  ──> RelayReply(not_held) at once                              verify
                   manifests[digest]  <── offer_manifest (as the broker client takes one)
                   RelayManifestRead ──> RelayReply(ok), body   (or parked / not_held, likewise)

`RelayServer` answers `RelayRead`s (model, version, region, offset, nbytes: the manifest's own
layout, which the holder's staging mirrors) with the bucket's bytes straight from staging.
Reads are per bucket and must name one bucket exactly: the holder vouches only for whole
verified buckets. Pipelined: a read of a bucket the holder is still pulling is parked until
the holder has verified it (bounded by the read's `wait_s`, `MAX_PARKED_WAIT_S` and
`MAX_PARKED` reads), so a reader one hop down trails its parent by about one bucket.

A read of a version newer than any this holder has started is parked too, not refused: the
broker sends a `Route` to readers and holders at once, and a reader's first read may well
arrive before its holder began that version. A version at or below the newest one the holder
started, that it does not hold (skipped, given up, dropped), is refused at once, as is a read
of another relay protocol or an undecodable one (`RelayReply(code=...)`; a frame over
`MAX_FRAME_HEADER_BYTES` is refused unread, one over `MAX_REQUEST_BYTES` dropped by ZeroMQ).

Holding: `hold(manifest, staging)` before the pull, `mark_verified` as each bucket passes
its checksum, `drop` before that staging is reused. `drop` waits (bounded) until ZeroMQ has
let go of every zero-copy payload it sent from that staging, so bytes are not rewritten under
a send in flight; readers verify every byte anyway (`subscribers.pull`), so a holder that
drops, dies or lies costs them a re-fetch, never a wrong version.

One-sided (`RelayServer(one_sided=<its MooncakeReceiver>)`): a read with `locate` set is
answered, once the bucket is verified, with where it is (the holder's mooncake session and the
staging address) instead of its bytes, and the reader reads it one-sided over mooncake. The
request, the pipelined wait and every refusal stay on ZeroMQ; a holder without mooncake just
sends the bytes. The holder cannot see those reads, so `drop` cannot wait for them: the
broker's leases and the reader's verification cover them.

Manifests (`offer_manifest(model, version, digest, body)`, docs/relay.md "Manifests from
peers"): the subscriber offers the encoded body of every manifest it takes, as soon as its
broker client has it; a `RelayManifestRead(model, version, digest)` is answered with that
body (`RelayReply(ok)` + the payload). One not offered yet, for a version newer than any this
server held or offered, is parked like a bucket read (the reader asks at announcement time,
as its holder does); an older one is refused `not_held`. A few bodies per model are kept
(`MAX_MANIFESTS_PER_MODEL`, `MAX_HELD` in all, oldest dropped); the reader checks the body's
SHA-256 against the digest, so a lying holder costs it a fetch from the broker.

The reading side is `subscribers.relay_client.RelayClient`. With `encrypt=True` the server is a
CURVE server whose public key the subscriber offers the broker (`RelayOffer.server_key`).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec
import zmq

from schemas.codec import request_id_of
from schemas.frames import (
    MAX_FRAME_HEADER_BYTES,
    RELAY_PROTOCOL,
    RelayCode,
    RelayManifestRead,
    RelayReply,
    RelayRequest,
    decode_relay_read,
)
from schemas.manifest import MooncakeLocator
from streamer.errors import TransportError
from streamer.transport.zmq_frames import curve_server

if TYPE_CHECKING:
    from schemas.manifest import Manifest
    from streamer.transport.mooncake import MooncakeReceiver
    from subscribers.staging import Staging

__all__ = ["RelayError", "RelayServer", "RelayTimeout"]

logger = logging.getLogger(__name__)

_HWM = 64
MAX_REQUEST_BYTES = 64 * 1024
"""ZeroMQ drops (and disconnects) a request frame larger than this before we read it."""
MAX_HELD = 8
"""Versions a server holds at once (a subscriber holds two: the applied one, the next one)."""
MAX_PARKED = 1024
"""Reads waiting for a bucket at once; more are refused `busy` (readers fail over)."""
MAX_PARKED_WAIT_S = 30.0
"""The server's cap on a read's `wait_s`."""
MAX_MODELS = 64
"""Models whose newest started version the server remembers."""
MAX_MANIFESTS_PER_MODEL = 4
"""Encoded manifests kept per model (the newest offered); `MAX_HELD` in all."""
_encoder = msgspec.msgpack.Encoder()


def _view(address: int, nbytes: int) -> memoryview:
    return memoryview((ctypes.c_char * nbytes).from_address(address)).cast("B")


class RelayError(TransportError):
    """A relay refused a read, sent something malformed, or is unreachable.

    `code` is the relay's refusal (`RelayReply.code`), or "" when it did not answer properly.
    `behind` is True when the relay is alive but had not verified the bucket in time (it is
    still pulling it itself): worth asking again for later buckets, unlike a dead or lying one.
    """

    def __init__(self, message: str, *, code: str = "") -> None:
        super().__init__(message)
        self.code = code

    @property
    def behind(self) -> bool:
        return self.code in {"not_verified", "busy"}


class RelayTimeout(RelayError, TimeoutError):
    """A relay did not answer a read by its deadline (frozen, overloaded, or far behind)."""


@dataclass
class _Held:
    """One version a server holds: where its bytes are and which buckets are verified."""

    manifest: Manifest
    staging: Staging
    buckets: dict[tuple[int, int], int]
    """(region, offset) -> bucket index."""
    verified: bytearray
    trackers: list[zmq.MessageTracker] = field(default_factory=list)
    """Zero-copy sends still in flight from this staging (pruned as they finish)."""


@dataclass
class _Parked:
    identity: bytes
    read: RelayRequest
    deadline: float


@dataclass(frozen=True)
class _Body:
    """An encoded manifest offered for serving (its digest is its key)."""

    model: str
    version: int
    body: bytes


class RelayServer:
    """Serves reads of the buckets this subscriber holds, from one background thread.

    >>> relay = RelayServer(host="10.0.0.5", port=7000)  # doctest: +SKIP
    >>> relay.hold(manifest, staging)  # then the pull marks each verified bucket
    >>> relay.mark_verified(manifest.model, manifest.version, 0)  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        encrypt: bool = False,
        one_sided: MooncakeReceiver | None = None,
    ) -> None:
        """`host` is bound and offered to the broker as is: readers must reach it there.
        `port` 0 picks a free one. `encrypt` makes it a CURVE server (key in `server_key`).
        `one_sided`: the mooncake engine the stagings are registered with; a reader that asks
        (`RelayRead.locate`) is then told where a verified bucket is and reads it itself."""
        self._one_sided = one_sided
        self._ctx = zmq.Context()
        self._socket = self._ctx.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.SNDHWM, _HWM)
        self._socket.setsockopt(zmq.RCVHWM, _HWM)
        self._socket.setsockopt(zmq.LINGER, 0)
        # Larger than a header, so an oversized one still gets an error reply; far larger: dropped.
        self._socket.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST_BYTES)
        self.server_key = curve_server(self._socket) if encrypt else ""
        try:
            if port:
                self._socket.bind(f"tcp://{host}:{port}")
            else:
                port = self._socket.bind_to_random_port(f"tcp://{host}")
        except zmq.ZMQError as exc:
            self._ctx.destroy(linger=0)
            raise RelayError(
                f"cannot listen for relay reads on {host}:{port}: {exc}; pick another "
                "--relay-listen address or port"
            ) from exc
        self.endpoint = f"tcp://{host}:{port}"
        # Wakes the server thread when a bucket is verified or a version dropped.
        wake = f"inproc://relay-wake-{secrets.token_hex(8)}"
        self._wake_in = self._ctx.socket(zmq.PULL)
        self._wake_in.bind(wake)
        self._wake_out = self._ctx.socket(zmq.PUSH)
        self._wake_out.setsockopt(zmq.SNDHWM, 1)
        self._wake_out.setsockopt(zmq.LINGER, 0)
        self._wake_out.connect(wake)
        self._lock = threading.Lock()
        self._held: dict[tuple[str, int], _Held] = {}
        self._started: dict[str, int] = {}
        """model -> the newest version this server started holding (older unheld: refused)."""
        self._manifests: OrderedDict[str, _Body] = OrderedDict()
        """digest -> an offered manifest body, oldest first (bounded: `offer_manifest`)."""
        self._offered: dict[str, int] = {}
        """model -> the newest version whose manifest was offered (at most MAX_MODELS)."""
        self._parked: list[_Parked] = []
        """Owned by the server thread."""
        self.served_bytes = 0
        """Payload bytes sent to readers (all versions)."""
        self.located_bytes = 0
        """Bytes of buckets readers were told to read one-sided (mooncake)."""
        self.refused = 0
        """Reads answered with an error, or dropped (all causes)."""
        self.served_manifests = 0
        """Manifest bodies sent to readers."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="relay-server", daemon=True)
        self._thread.start()
        logger.info("relay listening endpoint=%s encrypted=%s", self.endpoint, encrypt)

    # the holder's side (called from the subscriber's event loop)

    def hold(self, manifest: Manifest, staging: Staging) -> None:
        """Serve `manifest`'s version from `staging`, bucket by bucket as `mark_verified` says."""
        key = (manifest.model, manifest.version)
        buckets = {(b.region, b.offset): i for i, b in enumerate(manifest.buckets)}
        with self._lock:
            if key not in self._held and len(self._held) >= MAX_HELD:
                raise ValueError(
                    f"a relay server holds at most {MAX_HELD} versions: drop one first"
                )
            self._held[key] = _Held(manifest, staging, buckets, bytearray(len(manifest.buckets)))
            newest = self._started.pop(manifest.model, -1)
            self._started[manifest.model] = max(newest, manifest.version)
            while len(self._started) > MAX_MODELS:
                del self._started[next(iter(self._started))]
        self._wake()
        logger.info("relay holds model=%s version=%d", manifest.model, manifest.version)

    def mark_verified(self, model: str, version: int, bucket: int) -> None:
        """Bucket `bucket` (its index in the manifest) passed its checksum: serve it."""
        with self._lock:
            held = self._held.get((model, version))
            if held is None:
                return
            held.verified[bucket] = 1
        self._wake()

    def offer_manifest(self, model: str, version: int, digest: str, body: bytes) -> None:
        """Serve `body`, the encoded manifest of `model` `version` whose SHA-256 is `digest`
        (verified by the caller; readers check it again). Keeps the newest
        `MAX_MANIFESTS_PER_MODEL` per model and `MAX_HELD` in all, dropping the oldest."""
        with self._lock:
            self._manifests[digest] = _Body(model, version, body)
            self._manifests.move_to_end(digest)
            mine = [d for d, held in self._manifests.items() if held.model == model]
            for old in mine[:-MAX_MANIFESTS_PER_MODEL]:
                del self._manifests[old]
            while len(self._manifests) > MAX_HELD:
                self._manifests.popitem(last=False)
            newest = self._offered.pop(model, -1)
            self._offered[model] = max(newest, version)
            while len(self._offered) > MAX_MODELS:
                del self._offered[next(iter(self._offered))]
        self._wake()
        logger.debug("relay offers manifest model=%s version=%d digest=%s", model, version, digest)

    def manifests(self) -> list[tuple[str, int, str]]:
        """The (model, version, digest) of the manifests kept now, oldest first."""
        with self._lock:
            return [(held.model, held.version, d) for d, held in self._manifests.items()]

    @property
    def waiting(self) -> int:
        """Reads parked now, waiting for a bucket (or a version) this holder has not verified."""
        return len(self._parked)

    def holds(self, model: str, version: int) -> bool:
        with self._lock:
            return (model, version) in self._held

    def drop(self, model: str, version: int, *, wait_s: float = 1.0) -> None:
        """Stop serving a version (reads get `not_held`), then wait up to `wait_s` for the
        sends in flight from its staging: after this, the staging may be rewritten. Blocks."""
        with self._lock:
            held = self._held.pop((model, version), None)
        if held is None:
            return
        self._wake()
        deadline = time.monotonic() + wait_s
        for tracker in held.trackers:
            with contextlib.suppress(zmq.NotDone):
                tracker.wait(max(0.0, deadline - time.monotonic()))
        pending = sum(1 for tracker in held.trackers if not tracker.done)
        if pending:
            logger.warning(
                "relay dropped model=%s version=%d with %d sends still in flight after %.1f s; "
                "their readers will see bad bytes and fail over",
                model,
                version,
                pending,
                wait_s,
            )
        logger.info("relay dropped model=%s version=%d", model, version)

    def close(self) -> None:
        """Stop serving (readers fail over); safe to call twice."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._wake()
        self._thread.join(timeout=5)
        self._ctx.destroy(linger=0)

    def _wake(self) -> None:
        with self._lock, contextlib.suppress(zmq.Again, zmq.ZMQError):
            self._wake_out.send(b"", flags=zmq.NOBLOCK)  # a full queue: a wake is pending

    # the server thread

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._wake_in, zmq.POLLIN)
        while not self._stop.is_set():
            timeout_ms = 100.0
            if self._parked:
                soonest = min(parked.deadline for parked in self._parked)
                timeout_ms = max(0.0, min(timeout_ms, (soonest - time.monotonic()) * 1000))
            events = dict(poller.poll(int(timeout_ms)))
            if self._wake_in in events:
                while self._wake_in.poll(0):
                    self._wake_in.recv()
            if self._socket in events:
                for _ in range(_HWM):  # a bounded batch, then the parked reads get a turn
                    try:
                        frames = self._socket.recv_multipart(flags=zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._receive(frames)
            self._service_parked()

    def _receive(self, frames: list[bytes]) -> None:
        identity = frames[0]
        if len(frames) != 2:
            self._refuse(
                identity, 0, "protocol", f"a relay read has 1 frame, not {len(frames) - 1}"
            )
            return
        header = frames[1]
        if len(header) > MAX_FRAME_HEADER_BYTES:
            detail = f"a relay read of {len(header)} bytes (limit {MAX_FRAME_HEADER_BYTES})"
            self._refuse(identity, 0, "protocol", detail)
            return
        try:
            read = decode_relay_read(header)
        except msgspec.DecodeError as exc:
            self._refuse(identity, request_id_of(header), "protocol", f"undecodable read: {exc}")
            return
        if read.protocol != RELAY_PROTOCOL:
            detail = f"relay protocol {read.protocol}; this relay speaks {RELAY_PROTOCOL}"
            self._refuse(identity, read.request_id, "incompatible", detail)
            return
        if not self._try_answer(identity, read):
            if len(self._parked) >= MAX_PARKED:
                self._refuse(identity, read.request_id, "busy", "too many reads waiting")
                return
            wait_s = min(read.wait_s, MAX_PARKED_WAIT_S)
            self._parked.append(_Parked(identity, read, time.monotonic() + wait_s))

    def _service_parked(self) -> None:
        if not self._parked:
            return
        now = time.monotonic()
        waiting: list[_Parked] = []
        for parked in self._parked:
            if self._try_answer(parked.identity, parked.read):
                continue
            if now >= parked.deadline:
                read = parked.read
                if isinstance(read, RelayManifestRead):
                    detail = f"no manifest of version {read.version} with that digest yet"
                else:
                    detail = f"bucket at region {read.region} offset {read.offset} not verified yet"
                self._refuse(parked.identity, read.request_id, "not_verified", detail)
            else:
                waiting.append(parked)
        self._parked = waiting

    def _try_answer(self, identity: bytes, read: RelayRequest) -> bool:
        """Answer `read` now (bytes or a refusal) and return True, or False: it must wait."""
        if isinstance(read, RelayManifestRead):
            return self._try_answer_manifest(identity, read)
        with self._lock:
            held = self._held.get((read.model, read.version))
            if held is None:
                started = self._started.get(read.model, -1)
                if read.version > started:
                    return False  # a version this holder has not begun yet: it may any moment
                self._refuse(identity, read.request_id, "not_held", "this relay does not hold it")
                return True
            index = held.buckets.get((read.region, read.offset))
            if index is None or held.manifest.buckets[index].nbytes != read.nbytes:
                detail = "the range is not one bucket of that version"
                self._refuse(identity, read.request_id, "bad_range", detail)
                return True
            if not held.verified[index]:
                return False
            if read.locate and self._one_sided is not None:
                locator = MooncakeLocator(
                    session=self._one_sided.session,
                    address=held.staging.address(read.region, read.offset),
                    protocol=self._one_sided.protocol,
                )
                located = RelayReply(request_id=read.request_id, code="ok", located=locator)
                self._socket.send_multipart([identity, _encoder.encode(located)])
                self.located_bytes += read.nbytes
                return True
            payload = _view(held.staging.address(read.region, read.offset), read.nbytes)
            reply = _encoder.encode(RelayReply(request_id=read.request_id, code="ok"))
            # Sent under the lock, so `drop` cannot pull the staging between the check and here.
            tracker = self._socket.send_multipart(
                [identity, reply, payload], copy=False, track=True
            )
            held.trackers = [t for t in held.trackers if not t.done]
            if tracker is not None:
                held.trackers.append(tracker)
            self.served_bytes += read.nbytes
        return True

    def _try_answer_manifest(self, identity: bytes, read: RelayManifestRead) -> bool:
        with self._lock:
            held = self._manifests.get(read.digest)
            if held is None or (held.model, held.version) != (read.model, read.version):
                newest = max(self._started.get(read.model, -1), self._offered.get(read.model, -1))
                if held is None and read.version > newest:
                    return False  # not taken yet: it is being fetched as the reader asks
                detail = "this relay does not hold that manifest"
                self._refuse(identity, read.request_id, "not_held", detail)
                return True
            reply = _encoder.encode(RelayReply(request_id=read.request_id, code="ok"))
            # bytes are immutable: sent without a copy, no tracker needed
            self._socket.send_multipart([identity, reply, held.body], copy=False)
            self.served_manifests += 1
        return True

    def _refuse(self, identity: bytes, request_id: int, code: RelayCode, detail: str) -> None:
        self.refused += 1
        logger.debug("relay refused a read code=%s detail=%s", code, detail)
        reply = RelayReply(request_id=request_id, code=code, detail=detail[:1024])
        with contextlib.suppress(zmq.Again):
            self._socket.send_multipart([identity, _encoder.encode(reply)], flags=zmq.NOBLOCK)
