"""The one msgpack encoder, the typed decoders (built once), and the guard every decoder uses.

Every decoder of peer bytes in weightstream goes through `guarded_decode`, which makes it
total: any input either decodes to a value of the decoder's type (every field within its
`Meta` bounds) or raises `msgspec.DecodeError` (`ValidationError` is a subclass). That covers
what msgspec itself lets escape: a frame nested deeper than the interpreter's recursion limit
(msgspec recurses to skip unknown fields, and a ~1 KB frame nested 1000 deep used to raise
`RecursionError` and kill the broker). Typed fields bound the depth of anything kept; a size
cap refuses oversized frames unread. `streamer.frames` maps the error to `ProtocolError`.

>>> from schemas.messages import Goodbye
>>> decode_message(encode(Goodbye(reason="bye")))
Goodbye(reason='bye')
>>> decode_message(b"\\x91" * 5000 + b"\\xc0")
Traceback (most recent call last):
...
msgspec.ValidationError: Expected `object`, got `array`
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from schemas.manifest import Manifest
from schemas.messages import Message

__all__ = [
    "MAX_MESSAGE_BYTES",
    "decode_manifest",
    "decode_message",
    "encode",
    "guarded_decode",
    "request_id_of",
]

T = TypeVar("T")

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""A control frame larger than this is refused unread (manifests of huge models fit well below)."""

_encoder = msgspec.msgpack.Encoder()
_message_decoder = msgspec.msgpack.Decoder(Message)
_manifest_decoder = msgspec.msgpack.Decoder(Manifest)


def encode(obj: Any) -> bytes:
    return _encoder.encode(obj)


def guarded_decode(
    decoder: msgspec.msgpack.Decoder[T], data: bytes | memoryview, *, max_bytes: int
) -> T:
    """`decoder.decode(data)`, raising only `msgspec.DecodeError` whatever `data` is."""
    if len(data) > max_bytes:
        raise msgspec.DecodeError(f"frame of {len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        return decoder.decode(data)
    except RecursionError as exc:
        raise msgspec.DecodeError("frame nested too deeply") from exc


class _RequestOnly(msgspec.Struct):
    """Just the `request_id` of a request that failed its bounds, to answer it by id."""

    request_id: int = 0


_request_id_decoder = msgspec.msgpack.Decoder(_RequestOnly)


def request_id_of(data: bytes | memoryview) -> int:
    """The `request_id` a frame claims (0 if it has none, or is not even msgpack), so an error
    about a message that failed its bounds still reaches the request that sent it."""
    try:
        request_id = guarded_decode(
            _request_id_decoder, data, max_bytes=MAX_MESSAGE_BYTES
        ).request_id
    except msgspec.DecodeError:
        return 0
    return request_id if 0 <= request_id < 2**63 else 0


def decode_message(data: bytes | memoryview) -> Message:
    message: Message = guarded_decode(_message_decoder, data, max_bytes=MAX_MESSAGE_BYTES)
    return message


def decode_manifest(data: bytes | memoryview) -> Manifest:
    return guarded_decode(_manifest_decoder, data, max_bytes=MAX_MESSAGE_BYTES)
