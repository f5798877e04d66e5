"""Multipart frame layout on the control sockets, and the one place decode errors are mapped.

A control message is a single msgpack frame. Bulk payloads (the ZeroMQ fallback transport)
ride as raw frames after a msgpack header frame: ``[header, payload...]``; they never pass
through msgspec.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from schemas.codec import decode_message
from streamer.errors import ProtocolError

if TYPE_CHECKING:
    from schemas.messages import Message

__all__ = ["MAX_MESSAGE_BYTES", "decode_header"]

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""A control frame larger than this is refused unread (manifests of huge models fit well below)."""


def decode_header(data: bytes | memoryview) -> Message:
    """Decode one control frame; anything malformed becomes `ProtocolError`.

    >>> decode_header(b"\\xc1")
    Traceback (most recent call last):
    ...
    streamer.errors.ProtocolError: undecodable message (...)
    """
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        return decode_message(data)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"undecodable message ({exc})") from exc
