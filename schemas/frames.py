"""Headers of the ZeroMQ fallback bulk transport; the payload rides as a raw frame after them.

Both are small: a header longer than `MAX_FRAME_HEADER_BYTES` is refused unread, and every
field is bounded in its type.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from schemas.codec import guarded_decode
from schemas.manifest import Key, NonNegative

__all__ = [
    "MAX_FRAME_HEADER_BYTES",
    "FrameRead",
    "FrameReply",
    "decode_frame_read",
    "decode_frame_reply",
]

MAX_FRAME_HEADER_BYTES = 4096


class FrameRead(msgspec.Struct, frozen=True, tag="read"):
    request_id: NonNegative
    key: Key
    offset: NonNegative
    nbytes: NonNegative


class FrameReply(msgspec.Struct, frozen=True, tag="reply"):
    request_id: NonNegative
    ok: bool
    detail: Annotated[str, msgspec.Meta(max_length=1024)] = ""


_read_decoder = msgspec.msgpack.Decoder(FrameRead)
_reply_decoder = msgspec.msgpack.Decoder(FrameReply)


def decode_frame_read(data: bytes | memoryview) -> FrameRead:
    """Raises `msgspec.DecodeError` (only) for anything but a valid `FrameRead`."""
    return guarded_decode(_read_decoder, data, max_bytes=MAX_FRAME_HEADER_BYTES)


def decode_frame_reply(data: bytes | memoryview) -> FrameReply:
    """Raises `msgspec.DecodeError` (only) for anything but a valid `FrameReply`."""
    return guarded_decode(_reply_decoder, data, max_bytes=MAX_FRAME_HEADER_BYTES)
