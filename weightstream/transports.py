"""Pick the bulk transports a process uses, from a command-line choice."""

from __future__ import annotations

import logging

from streamer.transport import (
    BulkReceiver,
    BulkSender,
    MooncakeReceiver,
    MooncakeSender,
    ZmqFrameReceiver,
    ZmqFrameSender,
    mooncake_available,
)

__all__ = ["TRANSPORT_CHOICES", "make_receivers", "make_senders"]

logger = logging.getLogger(__name__)

TRANSPORT_CHOICES = ("auto", "mooncake", "zmq", "both")


def _resolve(choice: str) -> list[str]:
    if choice == "auto":
        if mooncake_available():
            return ["mooncake"]
        logger.warning("mooncake is not installed; using the zmq fallback transport")
        return ["zmq"]
    if choice == "both":
        return ["mooncake", "zmq"]
    return [choice]


def make_senders(choice: str, *, host: str, protocol: str = "tcp") -> list[BulkSender]:
    senders: list[BulkSender] = []
    for name in _resolve(choice):
        if name == "mooncake":
            senders.append(MooncakeSender(host=host, protocol=protocol))
        else:
            senders.append(ZmqFrameSender(host=host))
    return senders


def make_receivers(choice: str, *, host: str, protocol: str = "tcp") -> list[BulkReceiver]:
    receivers: list[BulkReceiver] = []
    for name in _resolve(choice):
        if name == "mooncake":
            receivers.append(MooncakeReceiver(host=host, protocol=protocol))
        else:
            receivers.append(ZmqFrameReceiver())
    return receivers
