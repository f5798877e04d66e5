"""A hostile peer for the fault suite: a raw DEALER speaking our protocol, with no client code
between it and the bytes it sends, and the shards it sends."""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from schemas.codec import decode_message, encode
from schemas.manifest import BucketSpec, FrameLocator, RegionSpec, Shard, TensorSpec
from schemas.messages import (
    PROTOCOL_VERSION,
    Announce,
    Announced,
    Error,
    Hello,
    Message,
    Published,
    Retire,
    Welcome,
)
from tests.support import test_keys

__all__ = ["RawPeer", "good_shard", "replace_at"]

DIGEST = "0" * 32


def good_shard(*, region_bytes: int = 4096) -> Shard:
    """Two float32 tensors in one region, one bucket over it: what our packer would make."""
    tensors = (
        TensorSpec(name="a", dtype="float32", shape=(4,), region=0, offset=0, nbytes=16),
        TensorSpec(name="b", dtype="float32", shape=(4,), region=0, offset=256, nbytes=16),
    )
    return Shard(
        regions=(
            RegionSpec(
                nbytes=region_bytes,
                locators=(FrameLocator(endpoint="tcp://127.0.0.1:9", key="k"),),
            ),
        ),
        tensors=tensors,
        buckets=(BucketSpec(region=0, offset=0, nbytes=min(region_bytes, 4096), checksum=DIGEST),),
    )


def replace_at(items: tuple[Any, ...], index: int, **changes: Any) -> tuple[Any, ...]:
    return (*items[:index], msgspec.structs.replace(items[index], **changes), *items[index + 1 :])


@dataclass
class RawPeer:
    socket: zmq.asyncio.Socket
    peer_id: str

    @classmethod
    def connect(cls, ctx: zmq.asyncio.Context, endpoint: str, name: str) -> RawPeer:
        peer_id = f"hostile-{name}-{secrets.token_hex(3)}"
        socket = ctx.socket(zmq.DEALER)
        socket.setsockopt(zmq.ROUTING_ID, peer_id.encode())
        socket.setsockopt(zmq.LINGER, 0)
        test_keys().apply(socket)  # an allowlisted key: hostile input from an admitted peer
        socket.connect(endpoint)
        return cls(socket, peer_id)

    async def send_raw(self, frame: bytes) -> None:
        await self.socket.send(frame)

    async def recv(self, *, timeout_s: float = 10) -> Message:
        async with asyncio.timeout(timeout_s):
            return decode_message(await self.socket.recv())

    async def reply(self, *, timeout_s: float = 10) -> Message:
        """The next message that is not a push (Retire, Announce, Announced) the broker
        sends anyway."""
        while True:
            message = await self.recv(timeout_s=timeout_s)
            if not isinstance(message, Retire | Announce | Announced):
                return message

    async def hello(self, role: str = "publisher", *, protocol: int = PROTOCOL_VERSION) -> Welcome:
        """Say hello (again: a raw peer sends no heartbeats, so the broker forgets it);
        `protocol=1` to be sent whole manifests (`Announce`) instead of digests."""
        hello = Hello(peer_id=self.peer_id, role=role, protocol_version=protocol)  # type: ignore[arg-type]
        await self.send_raw(encode(hello))
        reply = await self.reply()
        assert isinstance(reply, Welcome), reply
        return reply

    async def publish(
        self, version: int, shard: Shard, *, rank: int = 0, world_size: int = 1, job: str = ""
    ) -> Published | Error:
        message = {
            "kind": "publish",
            "request_id": version,
            "model": "llama",
            "version": version,
            "rank": rank,
            "world_size": world_size,
            "shard": msgspec.to_builtins(shard),
        }
        if job:  # a peer of before `job` sends none
            message["job"] = job
        await self.send_raw(encode(message))  # sent as is: no bounds checked on this side
        reply = await self.reply()
        assert isinstance(reply, Published | Error), reply
        return reply

    def close(self) -> None:
        self.socket.close(linger=0)
