"""Headers of the ZeroMQ bulk transports; the payload rides as a raw frame after them.

`FrameRead`/`FrameReply`: the publisher's ZeroMQ fallback (`streamer.transport.zmq_frames`).
`RelayRead`/`RelayReply`: a subscriber reading a bucket from another subscriber's relay
server (`subscribers.relay`), named in the manifest's own layout (model, version, region,
offset, nbytes), since a relay's staging mirrors the manifest's regions.
`RelayManifestRead`: a subscriber reading a version's manifest from a relay by its digest
(the SHA-256 of its encoding, as `Announced` names it), answered by the same `RelayReply`
with the encoded manifest as the payload frame; the reader checks the digest.

All are small: a header longer than `MAX_FRAME_HEADER_BYTES` is refused unread, and every
field is bounded in its type.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from schemas.codec import guarded_decode
from schemas.manifest import (
    MAX_REGIONS,
    Key,
    ModelName,
    MooncakeLocator,
    NonNegative,
    Version,
)
from schemas.messages import ManifestDigest

__all__ = [
    "MAX_FRAME_HEADER_BYTES",
    "MAX_RELAY_READ_BYTES",
    "MAX_RELAY_WAIT_S",
    "RELAY_PROTOCOL",
    "FrameRead",
    "FrameReply",
    "RelayManifestRead",
    "RelayRead",
    "RelayReply",
    "RelayRequest",
    "decode_frame_read",
    "decode_frame_reply",
    "decode_relay_read",
    "decode_relay_reply",
]

MAX_FRAME_HEADER_BYTES = 4096
RELAY_PROTOCOL = 1
"""The relay read protocol; a server answers a read of another one `incompatible`."""
MAX_RELAY_READ_BYTES = 1 << 32
"""One relay read is one bucket: far below this."""
MAX_RELAY_WAIT_S = 60.0
"""The longest a read may ask to wait for a bucket its holder is still pulling."""


class FrameRead(msgspec.Struct, frozen=True, tag="read"):
    request_id: NonNegative
    key: Key
    offset: NonNegative
    nbytes: NonNegative


class FrameReply(msgspec.Struct, frozen=True, tag="reply"):
    request_id: NonNegative
    ok: bool
    detail: Annotated[str, msgspec.Meta(max_length=1024)] = ""


RelayCode = Literal[
    "ok", "not_held", "not_verified", "bad_range", "busy", "incompatible", "protocol"
]
"""Why a relay refused a read: it does not hold that version (never, no longer, or gave up);
the bucket was not verified within the read's wait; the range is not one of its buckets;
too many reads wait already; another relay protocol; an undecodable request."""


class RelayRead(msgspec.Struct, frozen=True, kw_only=True, tag="relay_read"):
    """Read one bucket of a version a relay holds (or is pulling: it waits up to `wait_s`)."""

    request_id: NonNegative
    model: ModelName
    version: Version
    region: Annotated[int, msgspec.Meta(ge=0, lt=MAX_REGIONS)]
    offset: NonNegative
    nbytes: Annotated[int, msgspec.Meta(ge=1, le=MAX_RELAY_READ_BYTES)]
    wait_s: Annotated[float, msgspec.Meta(ge=0.0, le=MAX_RELAY_WAIT_S)] = 0.0
    """How long the reader waits for the holder to verify the bucket (the server caps it)."""
    protocol: Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)] = RELAY_PROTOCOL
    locate: bool = False
    """Ask where the bucket is (a mooncake one-sided read) rather than for its bytes; a relay
    without mooncake sends the bytes anyway."""


class RelayManifestRead(msgspec.Struct, frozen=True, kw_only=True, tag="relay_manifest_read"):
    """Read the manifest whose encoding has SHA-256 `digest` (of `model` `version`) from a
    relay that took it (or is about to: it waits up to `wait_s` for a version newer than any
    it holds). Added beside `RelayRead` in relay protocol 1: a relay that predates it answers
    `protocol` (undecodable), and the reader asks the broker."""

    request_id: NonNegative
    model: ModelName
    version: Version
    digest: ManifestDigest
    wait_s: Annotated[float, msgspec.Meta(ge=0.0, le=MAX_RELAY_WAIT_S)] = 0.0
    protocol: Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)] = RELAY_PROTOCOL


RelayRequest = RelayRead | RelayManifestRead
"""What a relay server decodes: a bucket read or a manifest read."""


class RelayReply(msgspec.Struct, frozen=True, kw_only=True, tag="relay_reply"):
    """The answer to a `RelayRead` or `RelayManifestRead`; with `code="ok"` the bucket's bytes
    (or the encoded manifest) follow as a frame."""

    request_id: NonNegative
    code: RelayCode
    detail: Annotated[str, msgspec.Meta(max_length=1024)] = ""
    located: MooncakeLocator | None = None
    """With `locate` and code "ok": where the bucket is (the holder's mooncake engine, the
    bucket's address in its staging), to be read one-sided instead of from a payload frame."""


_read_decoder = msgspec.msgpack.Decoder(FrameRead)
_reply_decoder = msgspec.msgpack.Decoder(FrameReply)


def decode_frame_read(data: bytes | memoryview) -> FrameRead:
    """Raises `msgspec.DecodeError` (only) for anything but a valid `FrameRead`."""
    return guarded_decode(_read_decoder, data, max_bytes=MAX_FRAME_HEADER_BYTES)


def decode_frame_reply(data: bytes | memoryview) -> FrameReply:
    """Raises `msgspec.DecodeError` (only) for anything but a valid `FrameReply`."""
    return guarded_decode(_reply_decoder, data, max_bytes=MAX_FRAME_HEADER_BYTES)


_relay_read_decoder = msgspec.msgpack.Decoder(RelayRequest)
_relay_reply_decoder = msgspec.msgpack.Decoder(RelayReply)


def decode_relay_read(data: bytes | memoryview) -> RelayRequest:
    """Raises `msgspec.DecodeError` (only) for anything but a valid `RelayRead` or
    `RelayManifestRead`."""
    request: RelayRequest = guarded_decode(
        _relay_read_decoder, data, max_bytes=MAX_FRAME_HEADER_BYTES
    )
    return request


def decode_relay_reply(data: bytes | memoryview) -> RelayReply:
    """Raises `msgspec.DecodeError` (only) for anything but a valid `RelayReply`."""
    return guarded_decode(_relay_reply_decoder, data, max_bytes=MAX_FRAME_HEADER_BYTES)
