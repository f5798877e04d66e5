"""Multipart frame layout on the control sockets, and the one place decode errors are mapped.

A control message is a single msgpack frame. Bulk payloads (the ZeroMQ fallback transport)
ride as raw frames after a msgpack header frame: ``[header, payload...]``; they never pass
through msgspec.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from schemas.codec import MAX_MESSAGE_BYTES, decode_message
from streamer.errors import ProtocolError

if TYPE_CHECKING:
    from schemas.messages import Message

__all__ = ["MAX_MESSAGE_BYTES", "decode_header"]


def decode_header(data: bytes | memoryview) -> Message:
    """Decode one control frame; anything else, whatever the bytes, becomes `ProtocolError`.

    Oversized, deeply nested, truncated or out-of-bounds frames all end here (the codec's
    guard makes the decoder total), so a loop that catches `ProtocolError` survives any peer.

    >>> decode_header(b"\\xc1")
    Traceback (most recent call last):
    ...
    streamer.errors.ProtocolError: undecodable message (...)
    """
    try:
        return decode_message(data)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"undecodable message ({exc})") from exc
