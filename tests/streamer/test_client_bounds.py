"""The client's waits have deadlines and its collections bounds.

A send into a full queue (no broker, or a frozen one) times out with `BrokerTimeout` saying
what to check, instead of blocking forever; a `Retire` that finds the queue full is kept (once
per version, bounded) and queued again as room appears, instead of being dropped for good;
the shm receiver keeps at most `max_mappings` segments mapped; leases are re-taken after a
broker restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import socket
import time
import uuid

import aiohttp
import pytest
import torch

from publishers.publisher import open_publisher
from schemas.manifest import ShmLocator
from schemas.messages import Retire
from streamer.client import BrokerClient, BrokerTimeout, connect
from streamer.config import ClientConfig
from streamer.transport.shm import SHM_DIR, ShmReceiver, host_id
from streamer.transport.zmq_frames import ZmqFrameSender
from tests.support import broker_config, eventually, run_broker


async def test_a_send_to_no_broker_times_out_with_a_clear_error(zmq_ctx) -> None:
    nobody = f"ipc://@weightstream-test-{uuid.uuid4().hex}"
    config = ClientConfig(broker=nobody, request_timeout_s=0.3, queue_size=4)
    client = BrokerClient(config, role="subscriber", context=zmq_ctx)
    sent = 0

    async def fill() -> None:
        nonlocal sent
        for _ in range(100):  # the queue (queue_size, in ZeroMQ's pipe) fills first
            await client.report_progress("m", 1, 0, 10, 0.0)
            sent += 1

    started = time.monotonic()
    try:
        with pytest.raises(BrokerTimeout, match=r"within 0.3 s: the send queue") as failed:
            await asyncio.wait_for(fill(), 10)
    finally:
        client.close()
    assert sent < 100
    assert time.monotonic() - started < 3, failed.value


async def test_retires_that_find_the_queue_full_are_queued_again_not_dropped(
    broker, zmq_ctx
) -> None:
    config = broker.client_config(queue_size=3, heartbeat_interval_s=0.05)  # 3 queued + 3 kept
    async with connect(config, role="publisher", context=zmq_ctx) as client:
        for version in range(1, 6):
            client._dispatch(Retire(model="m", version=version))  # as the broker sends them
        client._dispatch(Retire(model="m", version=5))  # a repeat is kept once
        got: list[int] = []
        async with asyncio.timeout(10):
            while len(got) < 5:
                got.append((await client.retired.get()).version)
        assert got == [1, 2, 3, 4, 5]
        assert client.retired.empty()


def test_the_shm_receiver_keeps_a_bounded_number_of_mappings() -> None:
    receiver = ShmReceiver(max_mappings=2)
    names = [f"weightstream-test-{uuid.uuid4().hex[:8]}-{i}" for i in range(4)]
    try:
        for name in names:
            fd = os.open(SHM_DIR / name, os.O_RDWR | os.O_CREAT, 0o600)
            os.ftruncate(fd, mmap.PAGESIZE)
            os.close(fd)
            mapped = receiver.mapping(ShmLocator(host=host_id(), name=name, nbytes=mmap.PAGESIZE))
            assert len(mapped) == mmap.PAGESIZE
            assert receiver.num_mappings <= 2
        assert receiver.num_mappings == 2
    finally:
        receiver.close()
        for name in names:
            (SHM_DIR / name).unlink(missing_ok=True)


async def test_leases_held_are_taken_again_after_a_broker_restart(zmq_ctx, tmp_path) -> None:
    """A restarted broker forgets leases; the client re-takes the ones it holds on re-hello,
    so the version it still reads is not retired under it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = broker_config(endpoint=f"tcp://127.0.0.1:{port}", state_dir=str(tmp_path))

    async def leases(url: str) -> int | None:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{url}/v1/models/m/versions/1") as response,
        ):
            if response.status != 200:
                return None
            page: dict[str, int] = await response.json()
            return page["leases"]

    async with contextlib.AsyncExitStack() as stack:
        async with run_broker(config) as first:
            client = await stack.enter_async_context(
                connect(first.client_config(), role="subscriber", context=zmq_ctx)
            )
            async with open_publisher(
                first.client_config(), model="m", sender=ZmqFrameSender(), context=zmq_ctx
            ) as publisher:
                await publisher.publish(1, {"w": torch.ones(64)})
                await client.acquire_lease("m", 1)
                assert await eventually(lambda: leases(first.url)) == 1
        async with run_broker(config) as second:
            assert client.leases == [("m", 1)]
            # The client's next heartbeat meets an unknown-peer error and says hello again.
            assert await eventually(lambda: leases(second.url), timeout_s=10) == 1
