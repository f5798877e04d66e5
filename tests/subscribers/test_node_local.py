"""Same-host publishers and subscribers share memory: a swapper that reads staging at the swap
gets a private, verified copy (a memcpy, no network); only `map_shared` pulls map it."""

from __future__ import annotations

import asyncio
import ctypes
import os
import uuid

import pytest
import torch

from publishers.publisher import open_publisher
from publishers.sources import synthetic_llama
from schemas.manifest import ShmLocator
from streamer.client import connect
from streamer.errors import TransportError
from streamer.transport import Fetch, ShmReceiver, ZmqFrameReceiver, ZmqFrameSender
from streamer.transport.shm import SHM_DIR, host_id
from subscribers.subscriber import Subscriber
from subscribers.swap import TorchSwapper
from tests.support import until

MODEL = f"nodelocal{uuid.uuid4().hex[:8]}"


def _segments() -> set[str]:
    return {name for name in os.listdir(SHM_DIR) if name.startswith(f"weightstream-{MODEL}-")}


async def test_same_host_torch_subscriber_swaps_from_a_private_verified_copy(broker, zmq_ctx):
    before = _segments()
    size = 1 << 20
    params = {k: torch.zeros_like(v) for k, v in synthetic_llama(size, version=1).items()}
    config = broker.client_config()
    async with (
        open_publisher(
            config, model=MODEL, sender=ZmqFrameSender(), node_local=True, context=zmq_ctx
        ) as publisher,
        connect(config, role="subscriber", context=zmq_ctx) as client,
    ):
        network = ZmqFrameReceiver(timeout_s=5)
        subscriber = Subscriber(
            client=client,
            receivers=[ShmReceiver(), network],
            swapper=TorchSwapper(params),
            model=MODEL,
        )
        task = asyncio.create_task(subscriber.run())
        try:
            for version in (1, 2, 3):
                tensors = synthetic_llama(size, version=version)
                result = await publisher.publish(version, tensors)
                assert any(isinstance(loc, ShmLocator) for loc in result.shard.regions[0].locators)

                def reached(version: int = version) -> bool:
                    return subscriber.applied == version

                await until(reached)
                assert all(torch.equal(_bits(params[n]), _bits(t)) for n, t in tensors.items())
                # Region 0 of staging is our own copy of the publisher's buffer: same bytes,
                # other memory (the publisher may reuse its buffer once our lease is gone).
                assert not subscriber.staging.is_mapped(0)
                live = publisher.live[version].buffers[0]
                ours = subscriber.staging.region_tensor(0)
                assert torch.equal(ours, live[: live.numel()])
                assert ours.data_ptr() != live.data_ptr()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            subscriber.close()
            network.close()
    assert before == set()
    assert _segments() == set(), "the publisher unlinks its segments when it closes"


def test_shm_receiver_refuses_other_hosts_and_missing_segments():
    receiver = ShmReceiver()
    elsewhere = ShmLocator(host="another-host/boot", name="weightstream-x", nbytes=8)
    gone = ShmLocator(host=host_id(), name="weightstream-does-not-exist", nbytes=8)
    assert not receiver.accepts(elsewhere)
    assert not receiver.accepts(gone)
    target = (ctypes.c_char * 8)()
    address = ctypes.addressof(target)
    with pytest.raises(TransportError, match="is the publisher alive"):
        receiver.fetch([Fetch(gone, 0, 8, address)])
    receiver.close()


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(-1).view(torch.uint8)
