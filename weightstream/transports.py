"""Pick the bulk transports a process uses, from a command-line list.

`--transport` takes `auto` or a comma-separated list in order of preference:
`mooncake` (one-sided reads, tcp here, rdma on clusters), `zmq` (the fallback), `shm`
(same-host: a publisher puts its buffers in /dev/shm, a subscriber maps them instead of
fetching). `auto` is mooncake (zmq where mooncake is missing), plus shm on the subscriber side.
"""

from __future__ import annotations

import argparse
import logging

from streamer.transport import (
    BulkReceiver,
    BulkSender,
    MooncakeReceiver,
    MooncakeSender,
    ShmReceiver,
    ZmqFrameReceiver,
    ZmqFrameSender,
    mooncake_available,
)

__all__ = ["TRANSPORTS", "make_receivers", "make_senders", "parse_transports"]

logger = logging.getLogger(__name__)

TRANSPORTS = ("mooncake", "zmq", "shm")


def parse_transports(text: str) -> list[str]:
    """`auto` or e.g. `mooncake,shm` -> a list of names (`auto` stays as is)."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if names == ["auto"]:
        return names
    unknown = [n for n in names if n not in TRANSPORTS]
    if unknown or not names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"bad transport list {text!r}: use auto, or a comma-separated list of {', '.join(TRANSPORTS)}"
        )
    return names


def _network_default() -> str:
    if mooncake_available():
        return "mooncake"
    logger.warning("mooncake is not installed; using the zmq fallback transport")
    return "zmq"


def make_senders(
    names: list[str], *, host: str, protocol: str = "tcp"
) -> tuple[list[BulkSender], bool]:
    """The network senders, and whether to also offer the buffers in shared memory."""
    if names == ["auto"]:
        names = [_network_default()]
    senders: list[BulkSender] = []
    for name in names:
        if name == "mooncake":
            senders.append(MooncakeSender(host=host, protocol=protocol))
        elif name == "zmq":
            senders.append(ZmqFrameSender(host=host))
    return senders, "shm" in names


def make_receivers(names: list[str], *, host: str, protocol: str = "tcp") -> list[BulkReceiver]:
    """Receivers in order of preference."""
    if names == ["auto"]:
        names = ["shm", _network_default()]
    receivers: list[BulkReceiver] = []
    for name in names:
        if name == "mooncake":
            receivers.append(MooncakeReceiver(host=host, protocol=protocol))
        elif name == "zmq":
            receivers.append(ZmqFrameReceiver())
        else:
            receivers.append(ShmReceiver())
    return receivers
