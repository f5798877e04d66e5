"""Bulk transports: they move raw byte ranges, never tensors, never through the broker."""

from streamer.transport.base import BulkReceiver, BulkSender, Fetch, Region
from streamer.transport.mooncake import MooncakeReceiver, MooncakeSender, mooncake_available
from streamer.transport.shm import ShmReceiver, ShmSender, host_id
from streamer.transport.zmq_frames import ZmqFrameReceiver, ZmqFrameSender

__all__ = [
    "BulkReceiver",
    "BulkSender",
    "Fetch",
    "MooncakeReceiver",
    "MooncakeSender",
    "Region",
    "ShmReceiver",
    "ShmSender",
    "ZmqFrameReceiver",
    "ZmqFrameSender",
    "host_id",
    "mooncake_available",
]
