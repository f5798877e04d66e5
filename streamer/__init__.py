"""The broker, its HTTP status endpoint, the client both sides use, and the bulk transports.

Torch-free: tensors become `Region`s (address, nbytes) before they reach this package.
"""

from streamer.auth import AuthError, Forbidden
from streamer.client import BrokerClient, connect
from streamer.config import BrokerConfig, ClientConfig
from streamer.errors import (
    BrokerError,
    ChecksumMismatch,
    IncompatiblePeer,
    ProtocolError,
    StreamerError,
    TransportError,
    VersionUnavailable,
)
from streamer.server import serve

__all__ = [
    "AuthError",
    "BrokerClient",
    "BrokerConfig",
    "BrokerError",
    "ChecksumMismatch",
    "ClientConfig",
    "Forbidden",
    "IncompatiblePeer",
    "ProtocolError",
    "StreamerError",
    "TransportError",
    "VersionUnavailable",
    "connect",
    "serve",
]
