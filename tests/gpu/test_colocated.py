"""The same-GPU path: a trainer process offers its GPU copy over CUDA IPC; an engine process on
the same GPU copies it device to device into its staging, verifies every bucket there and swaps.

The IPC cases need two real processes on a GPU (CUDA IPC handles mean nothing inside the process
that exported them): marked `gpu`. The stager's device-to-device pull from a peer's memory is
also checked on the CPU (the same code, without streams). Plain functions around `asyncio.run`,
as the other tests here, so the device machine runs them without pytest-asyncio
(`pytest -c /dev/null --noconftest tests/gpu`).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
from typing import Any

import msgspec
import pytest
import torch
import zmq.asyncio

from publishers.gpu_snapshot import snapshot
from publishers.packing import plan
from publishers.publisher import open_publisher
from schemas.manifest import CudaIpcLocator, Manifest
from schemas.validate import ManifestLimits, validate_manifest
from streamer.client import connect
from streamer.config import ClientConfig
from streamer.errors import ChecksumMismatch
from streamer.transport import ShmReceiver
from subscribers.cuda.stage import CudaStager
from subscribers.staging import Staging
from subscribers.subscriber import Subscriber
from tests.gpu.test_cuda_swap import BUCKET_BYTES, FAST, MODEL, Engine, weights
from tests.support import broker_config, run_broker

HAS_CUDA = torch.cuda.is_available()
cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
pytestmark = pytest.mark.timeout(180)

WAIT_S = 60.0


def _snapshot_trainer(conn: Any, version: int, corrupt: bool) -> None:
    """Snapshot `version` on the GPU, offer it over CUDA IPC, move on; keep it until told."""
    torch.cuda.set_device(0)
    named = {name: t.cuda() for name, t in weights(version).items()}
    layout = plan(named, bucket_bytes=BUCKET_BYTES)
    taken = snapshot(layout, named)
    host = [torch.empty(n, dtype=torch.uint8) for n in layout.region_bytes]
    checksums = taken.copy_to(host)
    for tensor in named.values():
        tensor.fill_(1.0)  # the trainer's next step: the offer is the snapshot, not these
    if corrupt:
        taken.regions[0][:8].bitwise_not_()  # after the digests: the GPU copy lies
    torch.cuda.synchronize()
    shard = layout.shard([[offer] for offer in taken.ipc_offers()], checksums, 0)
    conn.send_bytes(msgspec.msgpack.encode(Manifest.assemble(MODEL, version, [shard])))
    conn.recv()  # the engine is done reading
    conn.close()


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, cuda_only])]
)
def test_a_pull_from_a_peers_memory_gives_a_private_verified_copy(device: str) -> None:
    named = {name: t.to(device) for name, t in weights(5).items()}
    layout = plan(named, bucket_bytes=BUCKET_BYTES, region_bytes=256 << 10)
    taken = snapshot(layout, named, wait="digested")
    checksums = taken.copy_to([torch.empty(n, dtype=torch.uint8) for n in layout.region_bytes])
    shard = layout.shard([[] for _ in layout.region_bytes], checksums, 0)
    stager = CudaStager(device, taken.packed.numel() + 256 * len(taken.regions))
    stager.prepare([r.nbytes for r in shard.regions])
    result = stager.pull_peer(taken.regions, shard.buckets)
    assert result.ok
    assert result.nbytes == layout.total_bytes
    params = {name: torch.full_like(t, -3.25) for name, t in named.items()}
    taken.regions[0].zero_()  # the peer's memory changes: the staged copy is ours
    stager.swap_in(shard.tensors, params)
    for name, tensor in named.items():
        assert torch.equal(params[name].view(torch.int16), tensor.view(torch.int16)), name
    # A bucket whose peer bytes differ from its digest is named (region 0 is zeroed now).
    failed = stager.pull_peer(taken.regions, shard.buckets).failed
    assert failed
    assert all(shard.buckets[index].region == 0 for index in failed)
    with pytest.raises(TypeError, match="peer region 0 must be a 1-D uint8 tensor"):
        stager.pull_peer([r.view(torch.int16) for r in taken.regions], shard.buckets)


two_gpus = pytest.mark.skipif(
    not HAS_CUDA or torch.cuda.device_count() < 2, reason="needs two GPUs of one host"
)


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("corrupt", [False, True])
@pytest.mark.parametrize(
    "engine_gpu", [0, pytest.param(1, marks=two_gpus)], ids=["same-gpu", "other-gpu"]
)
def test_the_engine_copies_the_trainers_gpu_copy_device_to_device_and_verifies_it(
    corrupt: bool, engine_gpu: int
) -> None:
    """The trainer's copy is on GPU 0; an engine there copies it on the GPU, an engine on GPU 1
    reads it GPU to GPU (NVLink where there is one); both verify on their own GPU."""
    ctx = mp.get_context("spawn")
    ours, theirs = ctx.Pipe()
    trainer = ctx.Process(target=_snapshot_trainer, args=(theirs, 3, corrupt))
    trainer.start()
    engine = Engine(f"cuda:{engine_gpu}")
    staging = Staging(receivers=[], pin_memory=False)
    try:
        assert ours.poll(WAIT_S), "the trainer process sent no manifest"
        manifest = msgspec.msgpack.decode(ours.recv_bytes(), type=Manifest)
        validate_manifest(manifest, ManifestLimits())
        assert all(isinstance(r.locators[0], CudaIpcLocator) for r in manifest.regions)

        async def apply() -> None:
            await engine.swapper.stage(manifest, staging)
            await engine.swapper.swap_in(manifest, staging)

        if corrupt:
            with pytest.raises(ChecksumMismatch, match="buckets 0 "):
                asyncio.run(apply())
            assert engine.poisoned()  # nothing of the engine's was touched
        else:
            asyncio.run(apply())
            assert engine.holds(3)
        stage = engine.swapper.last_stage
        if not corrupt:
            assert stage is not None
            assert stage.source == ("cuda_ipc" if engine_gpu == 0 else "cuda_ipc_peer")
            assert stage.nbytes == manifest.total_bytes
    finally:
        engine.swapper.close()
        staging.close()
        ours.send("done")
        trainer.join(timeout=WAIT_S)
        if trainer.is_alive():
            trainer.kill()
    assert trainer.exitcode == 0


def _offering_publisher(config: ClientConfig, versions: list[int], conn: Any) -> None:
    """A trainer: Publisher(offer_gpu=True) in shared memory, snapshot publishes."""

    async def main() -> None:
        torch.cuda.set_device(0)
        named = {name: t.cuda() for name, t in weights(0).items()}
        async with open_publisher(
            config,
            model=MODEL,
            sender=[],
            bucket_bytes=BUCKET_BYTES,
            node_local=True,
            offer_gpu=True,
            job="gpu-trainer",
        ) as publisher:
            for version in versions:
                for name, tensor in weights(version).items():
                    named[name].copy_(tensor)
                pending = await publisher.publish(version, named, snapshot=True)
                for tensor in named.values():
                    tensor.fill_(-1.0)  # the next step, at once
                result = await asyncio.wait_for(pending.readable(), WAIT_S)
                held = sorted(publisher.gpu_live)
                await asyncio.wait_for(publisher.wait_applied(version, 2), WAIT_S)
                offered_first = result.gpu_readable_seconds
                conn.send((version, held, len(publisher._gpu_free), offered_first))
            conn.recv()

    asyncio.run(main())
    conn.close()


@pytest.mark.gpu
@cuda_only
def test_a_version_is_offered_on_the_gpu_and_on_the_host_at_once() -> None:
    """Through the service: the engine on the trainer's GPU reads the GPU copy, a subscriber
    that cannot (a CPU engine here, a remote one in life) reads the host copy; both verified."""
    versions = [1, 2, 3]
    gpu_engine, cpu_engine = Engine("cuda"), Engine("cpu")

    async def scenario() -> None:
        zmq_ctx = zmq.asyncio.Context()
        receiver = ShmReceiver()
        mp_ctx = mp.get_context("spawn")
        ours, theirs = mp_ctx.Pipe()
        try:
            async with (
                run_broker(broker_config(retention=1)) as broker,
                contextlib.AsyncExitStack() as stack,
            ):
                tasks, subscribers = [], []
                for engine in (gpu_engine, cpu_engine):
                    client = await stack.enter_async_context(
                        connect(broker.client_config(), role="subscriber", context=zmq_ctx)
                    )
                    subscriber = Subscriber(
                        client=client, receivers=[receiver], swapper=engine.swapper, model=MODEL,
                        config=FAST, staging=Staging(receivers=[receiver], pin_memory=False),
                    )  # fmt: skip
                    subscribers.append(subscriber)
                    tasks.append(asyncio.create_task(subscriber.run()))
                trainer = mp_ctx.Process(
                    target=_offering_publisher, args=(broker.client_config(), versions, theirs)
                )
                trainer.start()
                try:
                    for version in versions:
                        ready = await asyncio.to_thread(ours.poll, WAIT_S)
                        assert ready, f"version {version} was not applied by both engines"
                        got, held, free, offered_first = ours.recv()
                        assert got == version
                        # announced on the GPU alone first, then with the host copy
                        assert offered_first is not None
                        assert version in held  # its GPU copy stays while it may be read
                        assert len(held) <= 2  # retention 1: older copies are retired, reused
                        assert free <= 2
                        assert gpu_engine.holds(version), f"version {version} on the GPU engine"
                        assert cpu_engine.holds(version), f"version {version} on the CPU engine"
                        gpu_stage, cpu_stage = (
                            gpu_engine.swapper.last_stage,
                            cpu_engine.swapper.last_stage,
                        )
                        assert gpu_stage is not None
                        assert cpu_stage is not None
                        assert (gpu_stage.source, cpu_stage.source) == ("cuda_ipc", "host")
                    ours.send("done")
                    await asyncio.to_thread(trainer.join, WAIT_S)
                    assert trainer.exitcode == 0
                finally:
                    if trainer.is_alive():
                        trainer.kill()
                    for task in tasks:
                        task.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
                    for subscriber in subscribers:
                        subscriber.close()
                    for engine in (gpu_engine, cpu_engine):
                        engine.swapper.close()
        finally:
            receiver.close()
            zmq_ctx.destroy(linger=0)

    asyncio.run(scenario())
