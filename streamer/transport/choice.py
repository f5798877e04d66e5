"""Which bulk transports a process uses, from a preference list such as `mooncake,shm`.

Names: `mooncake` (one-sided reads, tcp here, rdma on clusters), `zmq` (the fallback), `shm`
(same host: a publisher puts its buffers in /dev/shm, a subscriber maps them instead of
fetching). `auto` is mooncake (zmq where mooncake is missing) plus shm on both sides: a
publisher offers its buffers in shared memory too, and a subscriber on the same host maps them
(zero copy) before it tries the network. The CLI and the vLLM follower both build their transports here.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from streamer.transport.mooncake import MooncakeReceiver, MooncakeSender, mooncake_available
from streamer.transport.shm import ShmReceiver
from streamer.transport.zmq_frames import ZmqFrameReceiver, ZmqFrameSender

if TYPE_CHECKING:
    from streamer.transport.base import BulkReceiver, BulkSender

__all__ = ["TRANSPORTS", "make_receivers", "make_senders", "parse_transports", "receiver_names"]

logger = logging.getLogger(__name__)

TRANSPORTS = ("mooncake", "zmq", "shm")


def parse_transports(text: str) -> list[str]:
    """`auto` or e.g. `mooncake,shm` -> a list of names (`["auto"]` stays as is).

    >>> parse_transports("mooncake, shm")
    ['mooncake', 'shm']
    """
    names = [part.strip() for part in text.split(",") if part.strip()]
    if names == ["auto"]:
        return names
    if not names or len(set(names)) != len(names) or set(names) - set(TRANSPORTS):
        raise ValueError(
            f"bad transport list {text!r}: use auto, or a comma-separated list of "
            f"{', '.join(TRANSPORTS)}"
        )
    return names


def _network_default() -> str:
    if mooncake_available():
        return "mooncake"
    logger.warning("mooncake is not installed; using the zmq fallback transport")
    return "zmq"


def receiver_names(names: list[str]) -> list[str]:
    """The receivers a subscriber uses for `names`, in order of preference."""
    return ["shm", _network_default()] if names == ["auto"] else names


def make_senders(
    names: list[str], *, host: str, protocol: str = "tcp", zmq_port: int = 0
) -> tuple[list[BulkSender], bool]:
    """The network senders, and whether to also offer the buffers in shared memory.

    `zmq_port` fixes the ZeroMQ sender's port (0: a free one). mooncake's ports cannot be
    chosen: with its P2P handshake the engine picks its RPC and data ports itself.
    """
    if names == ["auto"]:
        names = [_network_default(), "shm"]
    senders: list[BulkSender] = []
    for name in names:
        if name == "mooncake":
            senders.append(MooncakeSender(host=host, protocol=protocol))
        elif name == "zmq":
            senders.append(ZmqFrameSender(host=host, port=zmq_port))
    return senders, "shm" in names


def make_receivers(names: list[str], *, host: str, protocol: str = "tcp") -> list[BulkReceiver]:
    """Receivers in order of preference."""
    receivers: list[BulkReceiver] = []
    for name in receiver_names(names):
        if name == "mooncake":
            receivers.append(MooncakeReceiver(host=host, protocol=protocol))
        elif name == "zmq":
            receivers.append(ZmqFrameReceiver())
        else:
            receivers.append(ShmReceiver())
    return receivers
