"""Nothing grows without bound: a soak of join/leave and publish cycles, and hostile clients
(WaitApplied, Subscribe and heartbeat floods, a low fd limit, idle HTTP connections).

A real broker process; the clients (a real Publisher, BrokerClients, raw DEALER sockets)
run in the test, so that the broker's RSS and CPU time are measured on their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
from functools import partial

import aiohttp
import pytest
import torch
import zmq
import zmq.asyncio

from publishers.publisher import open_publisher
from schemas.codec import decode_message, encode
from schemas.manifest import BucketSpec, FrameLocator, RegionSpec, Shard, TensorSpec
from schemas.messages import (
    Applied,
    Error,
    Heartbeat,
    Hello,
    Message,
    Subscribe,
    Subscribed,
    WaitApplied,
    Welcome,
)
from streamer.client import connect
from streamer.transport import ZmqFrameSender
from tests.e2e.procs import Fleet, file_exists, get_json, start_broker, wait_for
from tests.faults.measure import cpu_s, rss_bytes
from tests.support import test_keys

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

MODEL = "soak"


@pytest.fixture
async def ctx():
    context = zmq.asyncio.Context()
    yield context
    context.destroy(linger=0)


def _rss_self() -> int:
    return rss_bytes(os.getpid())


async def _messages_total(http: str) -> int:
    timeout = aiohttp.ClientTimeout(total=5)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(f"{http}/metrics") as response,
    ):
        text = await response.text()
    match = re.search(r"^weightstream_broker_messages_total (\S+)$", text, re.MULTILINE)
    assert match, text[:500]
    return int(float(match[1]))


async def test_join_leave_and_publish_cycles_leave_broker_and_publisher_flat(
    fleet: Fleet, ctx, faults
):
    broker = await start_broker(fleet, "--gone-peer-ttl-s", "1")
    config = broker.client_config(request_timeout_s=10, heartbeat_interval_s=0.5)
    cycles, warm_up = 150, 30
    faults.inject(f"{cycles} subscriber join/leave cycles, one published version each")
    async with open_publisher(config, model=MODEL, sender=ZmqFrameSender(), context=ctx) as pub:
        for cycle in range(1, cycles + 1):
            if cycle == warm_up:
                broker_warm = rss_bytes(broker.proc.process.pid)
                publisher_warm = _rss_self()
                pool_warm = pub.pool.allocated_bytes
            named = {f"layer{i}": torch.full((256, 256), float(cycle)) for i in range(4)}
            await pub.publish(cycle, named)
            async with connect(config, role="subscriber", context=ctx) as sub:
                await sub.subscribe(MODEL)
                manifest = await asyncio.wait_for(sub.next_manifest(MODEL, after=cycle - 1), 10)
                assert manifest.version == cycle
                await sub.report_applied(MODEL, cycle, pull_s=0.01, pause_s=0.001, nbytes=1)
                async with asyncio.timeout(10):
                    assert await pub.wait_applied(cycle, 1) == 1
        faults.bounded(
            "publisher pool growth after warm-up (bytes)",
            value=pub.pool.allocated_bytes - pool_warm,
            bound=0,
        )
        faults.bounded("publisher live buffer sets", value=len(pub.live), bound=3)

        async def rows_gone():
            body = await get_json(f"{broker.http}/v1/subscribers")
            return body if body["total"] == 0 else None

        # Gone subscribers leave the table (and the broker) after --gone-peer-ttl-s.
        body = await wait_for(rows_gone, timeout_s=15, what="gone rows forgotten", fleet=fleet)
        faults.bounded(f"subscriber rows after {cycles} join/leave", value=body["total"], bound=0)
        faults.bounded(
            "broker RSS growth after warm-up (bytes)",
            value=rss_bytes(broker.proc.process.pid) - broker_warm,
            bound=8_000_000,
        )
        faults.bounded(
            "publisher process RSS growth after warm-up (bytes)",
            value=_rss_self() - publisher_warm,
            bound=32_000_000,
        )


async def _raw_peer(
    ctx: zmq.asyncio.Context, endpoint: str, peer_id: str, role: str, *, secure: bool = True
):
    socket = ctx.socket(zmq.DEALER)
    socket.setsockopt(zmq.ROUTING_ID, peer_id.encode())
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.RCVHWM, 0)
    if secure:  # a broker with the test keys
        test_keys().apply(socket)
    socket.connect(endpoint)
    await socket.send(encode(Hello(peer_id=peer_id, role=role)))  # type: ignore[arg-type]
    return socket


async def _recv(socket: zmq.asyncio.Socket) -> Message:
    async with asyncio.timeout(30):
        return decode_message(await socket.recv())


def _big_shard(num_tensors: int) -> Shard:
    """A manifest of many tensors (about 100 bytes each on the wire), no real bytes."""
    return Shard(
        regions=(
            RegionSpec(
                nbytes=256 * num_tensors,
                locators=(FrameLocator(endpoint="tcp://127.0.0.1:1", key="r0"),),
                rank=0,
            ),
        ),
        tensors=tuple(
            TensorSpec(
                name=f"model.layers.{i}.self_attn.q_proj.weight",
                dtype="float32",
                shape=(4,),
                region=0,
                offset=256 * i,  # ALIGNMENT
                nbytes=16,
            )
            for i in range(num_tensors)
        ),
        buckets=(BucketSpec(region=0, offset=0, nbytes=256 * num_tensors, checksum="0" * 32),),
    )


async def test_hostile_floods_cost_the_broker_bounded_cpu_and_memory(fleet: Fleet, ctx, faults):
    # The raw peers never send heartbeats: keep them known for the whole test.
    broker = await start_broker(fleet, "--peer-timeout-s", "300")
    config = broker.client_config(request_timeout_s=10)
    async with contextlib.AsyncExitStack() as stack:
        publisher = await stack.enter_async_context(connect(config, role="publisher", context=ctx))
        await publisher.publish(MODEL, 1, 0, 1, _big_shard(2000))
        subscribers = [
            await _raw_peer(ctx, broker.endpoint, f"sub-{i}", "subscriber") for i in range(100)
        ]
        waiters = [
            await _raw_peer(ctx, broker.endpoint, f"waiter-{i}", "observer") for i in range(32)
        ]
        for socket in subscribers + waiters:
            assert isinstance(await _recv(socket), Welcome)
        rss_before = rss_bytes(broker.proc.process.pid)
        cpu_before = cpu_s(broker.proc.process.pid)
        base = await _messages_total(broker.http)

        # 1. WaitApplied: 32 peers x 64 (the per-peer cap), then one past the cap each.
        faults.inject("2048 WaitApplied that never complete, with 100 subscribers applying")
        for socket in waiters:
            for rid in range(1, 66):
                wait = WaitApplied(request_id=rid, model=MODEL, version=1, num_subscribers=10**6)
                await socket.send(encode(wait))
            await socket.send(encode(Subscribe(request_id=99, model="other")))
        for socket in subscribers:
            await socket.send(encode(Applied(model=MODEL, version=1)))

        # 2. Subscribe: a peer that never reads asks for the 2000-tensor manifest 3000 times.
        faults.inject("3000 Subscribe for a large manifest from a peer that never reads")
        flood = await _raw_peer(ctx, broker.endpoint, "flood", "subscriber")
        for rid in range(3000):
            await flood.send(encode(Subscribe(request_id=rid, model=MODEL)))

        # 3. Heartbeat: one heartbeat naming 100,000 models.
        faults.inject("a heartbeat naming 100,000 models")
        await subscribers[0].send(encode(Heartbeat(applied={f"m{i}": 1 for i in range(100_000)})))

        async def all_taken() -> bool:
            # 32 x 66 from the waiters, 100 Applied, Hello + 3000 Subscribe, 1 heartbeat
            return await _messages_total(broker.http) >= base + 32 * 66 + 100 + 3001 + 1

        await wait_for(all_taken, timeout_s=60, what="the floods taken in", fleet=fleet)

        faults.bounded(
            "broker CPU seconds for the WaitApplied, Subscribe and heartbeat floods",
            value=cpu_s(broker.proc.process.pid) - cpu_before,
            bound=10.0,
        )
        faults.bounded(
            "broker RSS growth from the floods (bytes)",
            value=rss_bytes(broker.proc.process.pid) - rss_before,
            bound=48_000_000,
        )
        for socket in waiters:
            refused = await _recv(socket)
            assert isinstance(refused, Error)
            assert (refused.request_id, refused.code) == (65, "bad_request")
            assert "too many WaitApplied" in refused.detail
            assert isinstance(await _recv(socket), Subscribed)
        page = await get_json(f"{broker.http}/v1/subscribers?limit=10&offset=5")
        assert len(page["subscribers"]) == 10
        assert page["total"] <= 101 + 64  # 100 subscribers (+ the flood), 64 models at most
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.get(f"{broker.http}/v1/subscribers") as response:
                body = await response.read()
            faults.bounded("/v1/subscribers bytes after the floods", value=len(body), bound=500_000)
            async with session.get(f"{broker.http}/v1/subscribers?state=bogus") as response:
                assert response.status == 400
        for socket in [*subscribers, *waiters, flood]:
            socket.close()


async def test_a_low_open_file_limit_is_raised_and_every_peer_connects(fleet: Fleet, ctx, faults):
    faults.inject("broker started with a soft open-file limit of 64")
    ready = fleet.workdir / "limited.json"
    proc = await fleet.start(
        "broker",
        "broker",
        "--endpoint",
        "tcp://127.0.0.1:0",
        "--http-port",
        "0",
        "--ready-file",
        str(ready),
        prefix=("prlimit", "--nofile=64:4096"),
    )
    await wait_for(partial(file_exists, ready), timeout_s=30, what="broker ready", fleet=fleet)
    endpoint = json.loads(ready.read_text())["endpoint"]
    # A broker without keys (loopback only): bare peers.
    peers = [await _raw_peer(ctx, endpoint, f"p{i}", "observer", secure=False) for i in range(100)]
    # All connected at once (none closed before the last Welcome): 100 fds past the 64.
    welcomes = await asyncio.gather(*(_recv(socket) for socket in peers))
    assert all(isinstance(w, Welcome) for w in welcomes)
    for socket in peers:
        socket.close()
    assert "open-file limit=4096" in proc.log.read_text()


async def test_idle_and_slow_http_connections_are_closed(fleet: Fleet, faults):
    broker = await start_broker(fleet, "--http-idle-timeout-s", "1")
    port = int(broker.http.rsplit(":", 1)[1])
    faults.inject("an HTTP client that sends half a request and stalls; one that sends nothing")
    for partial_request in (b"GET /healthz HTTP/1.1\r\nHost: x\r\n", b""):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(partial_request)
        await writer.drain()
        async with asyncio.timeout(15):
            assert await reader.read() == b""  # closed by the broker
        writer.close()
    assert (await get_json(f"{broker.http}/healthz"))["status"] == "ok"
