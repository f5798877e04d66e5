"""The one msgpack encoder and the typed decoders, built once.

Decoders raise `msgspec.DecodeError` (or `msgspec.ValidationError`, a subclass) for anything
that is not a valid message; `streamer.frames` maps that to `ProtocolError` at the seam.

>>> from schemas.messages import Goodbye
>>> decode_message(encode(Goodbye(reason="bye")))
Goodbye(reason='bye')
"""

from __future__ import annotations

from typing import Any

import msgspec

from schemas.manifest import Manifest
from schemas.messages import Message

__all__ = ["decode_manifest", "decode_message", "encode"]

_encoder = msgspec.msgpack.Encoder()
_message_decoder = msgspec.msgpack.Decoder(Message)
_manifest_decoder = msgspec.msgpack.Decoder(Manifest)


def encode(obj: Any) -> bytes:
    return _encoder.encode(obj)


def decode_message(data: bytes | memoryview) -> Message:
    message: Message = _message_decoder.decode(data)
    return message


def decode_manifest(data: bytes | memoryview) -> Manifest:
    return _manifest_decoder.decode(data)
