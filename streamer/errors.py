"""Errors raised by the weight streamer.

* StreamerError
  + ProtocolError        bytes we cannot decode, or a message we did not expect
  + IncompatiblePeer     handshake protocol versions do not match
  + TransportError       the bulk path failed (mooncake return code, missing frames, dead peer)
  + VersionUnavailable   the requested version was already retired, or never existed
  + BrokerError          the broker answered a request with a typed `Error`
  + ChecksumMismatch     a bucket's bytes do not match the manifest's checksum
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from schemas.messages import ErrorCode

__all__ = [
    "BrokerError",
    "ChecksumMismatch",
    "IncompatiblePeer",
    "ProtocolError",
    "StreamerError",
    "TransportError",
    "VersionUnavailable",
]


class StreamerError(Exception):
    """Base of every error weightstream raises on purpose."""


class ProtocolError(StreamerError):
    """A peer sent bytes we cannot decode, or a message that makes no sense here."""


class IncompatiblePeer(StreamerError):
    """The peer speaks another protocol version."""


class TransportError(StreamerError):
    """The bulk data path failed: a refused or dead peer, a bad range, missing frames."""


class BrokerError(StreamerError):
    """The broker answered a request with an error."""

    def __init__(self, code: ErrorCode, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


class VersionUnavailable(BrokerError):
    """The version was retired (or never published); pull a newer one."""


class ChecksumMismatch(StreamerError):
    """A fetched bucket does not match its manifest checksum."""
