"""A Retire the broker cannot deliver (its publisher has not reconnected since a broker
restart) is sent after that publisher's next Hello: its buffers are freed, not leaked."""

from __future__ import annotations

import contextlib
from pathlib import Path

import msgspec

from schemas.codec import encode
from schemas.messages import Published, PublishShard, Retire
from streamer.client import connect
from tests.streamer.test_broker import MODEL, raw_peer, receive, say_hello, shard
from tests.support import broker_config, run_broker


async def test_an_undelivered_retire_is_sent_after_the_publishers_next_hello(
    zmq_ctx, tmp_path: Path
) -> None:
    config = broker_config(state_dir=str(tmp_path), retention=2)
    async with contextlib.AsyncExitStack() as first_broker:
        first = await first_broker.enter_async_context(run_broker(config))
        config = msgspec.structs.replace(config, endpoint=first.endpoint)
        async with raw_peer(zmq_ctx, first.endpoint, "trainer-a") as socket:
            await say_hello(socket, "trainer-a")
            publish = PublishShard(
                request_id=1, model=MODEL, version=1, rank=0, world_size=1, shard=shard()
            )
            await socket.send(encode(publish))
            assert isinstance(await receive(socket), Published)
    # A new broker restores version 1; trainer-a has not said Hello to it.
    async with (
        run_broker(config) as second,
        connect(second.client_config(), role="publisher", context=zmq_ctx) as other,
    ):
        for version in (2, 3):  # retention 2: version 1 retires; trainer-a is unreachable
            await other.publish(MODEL, version, 0, 1, shard())
        async with raw_peer(zmq_ctx, second.endpoint, "trainer-a") as again:
            await say_hello(again, "trainer-a")
            assert await receive(again) == Retire(model=MODEL, version=1)
