"""Heartbeat pacing over real sockets: past `max_heartbeats_per_s` the broker asks every peer to
heartbeat less often (Welcome and Alive say so) and stretches its peer timeout by the same
factor, so peers that follow the pace stay live; our client follows it.

`PACED`: a 0.2 s interval and 4 heartbeats a second; one peer (5 a second) is paced to 0.4 s,
two or three to 0.8 s (3.75 a second for three), the peer timeout 0.5 s stretched to 2 s.
"""

from __future__ import annotations

import asyncio
import contextlib

import zmq.asyncio

from schemas.codec import encode
from schemas.messages import PROTOCOL_VERSION, Alive, Heartbeat, Welcome
from streamer.client import connect
from tests.streamer.test_announced import raw_peer, receive
from tests.support import broker_config, run_broker, until

PACED = {"heartbeat_interval_s": 0.2, "peer_timeout_s": 0.5, "max_heartbeats_per_s": 4.0}


async def test_a_paced_fleet_is_told_the_pace_and_stays_live_at_it(zmq_ctx: zmq.asyncio.Context):
    async with run_broker(broker_config(**PACED)) as broker, contextlib.AsyncExitStack() as stack:
        peers = [
            await stack.enter_async_context(
                raw_peer(zmq_ctx, broker.endpoint, f"paced-{i}", protocol=PROTOCOL_VERSION)
            )
            for i in range(2)
        ]
        peers.append(
            await stack.enter_async_context(
                raw_peer(zmq_ctx, broker.endpoint, "paced-2", protocol=PROTOCOL_VERSION)
            )
        )
        # Every peer heartbeats at the pace, longer than the configured peer timeout (0.5 s;
        # the broker looks every 0.25 s): each answer must be Alive with the pace (a peer
        # marked gone gets unknown_peer).
        for _ in range(4):
            await asyncio.sleep(0.8)
            for peer in peers:
                await peer.send(encode(Heartbeat(applied={})))
            for peer in peers:
                reply, _ = await receive(peer)
                assert reply == Alive(heartbeat_at_least_s=0.8), reply


async def test_the_welcome_past_the_rate_names_the_pace(zmq_ctx: zmq.asyncio.Context):
    async with run_broker(broker_config(**PACED)) as broker, contextlib.AsyncExitStack() as stack:
        for i in range(2):
            await stack.enter_async_context(
                raw_peer(zmq_ctx, broker.endpoint, f"early-{i}", protocol=PROTOCOL_VERSION)
            )
        welcomes: list[Welcome] = []
        await stack.enter_async_context(
            raw_peer(zmq_ctx, broker.endpoint, "late", protocol=PROTOCOL_VERSION, welcomes=welcomes)
        )
        [welcome] = welcomes
        assert (welcome.heartbeat_interval_s, welcome.heartbeat_at_least_s) == (0.2, 0.8)


async def test_our_client_follows_the_pace_and_a_small_fleet_is_not_paced(
    zmq_ctx: zmq.asyncio.Context,
):
    # 12 a second: two clients at 0.2 s (10) are not paced, a third (15) is, to 0.4 s.
    settings = {**PACED, "max_heartbeats_per_s": 12.0}
    async with (
        run_broker(broker_config(**settings)) as broker,
        contextlib.AsyncExitStack() as stack,
    ):
        config = broker.client_config(heartbeat_interval_s=0.2)
        first = await stack.enter_async_context(connect(config, role="subscriber", context=zmq_ctx))
        second = await stack.enter_async_context(
            connect(config, role="subscriber", context=zmq_ctx)
        )
        assert (first.heartbeat_s, second.heartbeat_s) == (0.2, 0.2)
        third = await stack.enter_async_context(connect(config, role="subscriber", context=zmq_ctx))
        assert third.heartbeat_s == 0.4  # from its Welcome
        await until(lambda: first.heartbeat_s == second.heartbeat_s == 0.4, timeout_s=5)  # Alive
