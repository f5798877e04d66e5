"""Stage, swap and pull can be cancelled: after the cancel, nothing of the attempt runs on.

Cancelled on purpose, as pyzmq's tests cancel a recv: a swap waiting at the gate behind an
engine step, a CUDA-path stage (on the CPU device) in the middle of its copy, and a throttled
pull. Before, the swap's `asyncio.to_thread` thread kept waiting for the gate after its
caller was cancelled, and swapped in a version nobody reported once the step ended.
"""

from __future__ import annotations

import asyncio
import threading
from typing import TYPE_CHECKING

import pytest
import torch

from streamer.transport.base import Region
from streamer.transport.zmq_frames import ZmqFrameReceiver, ZmqFrameSender
from subscribers.cuda.swap import CudaSwapper
from subscribers.pull import pull
from subscribers.staging import Staging
from subscribers.swap import TorchSwapper, VersionGate
from tests.subscribers.test_swap import bits, engine_tensors, stage, version_of
from tests.support import until

if TYPE_CHECKING:
    from tests.faults.ledger import Faults


def _threads(prefix: str) -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(prefix) and t.is_alive()]


async def test_a_swap_cancelled_at_the_gate_never_touches_the_engine(faults: Faults) -> None:
    engine = engine_tensors()
    old = {name: bits(t).clone() for name, t in engine.items()}
    manifest, staging = stage(version_of(engine, seed=3), version=2)
    gate = VersionGate()
    swapper = TorchSwapper(engine, gate=gate)
    in_step, end_step = threading.Event(), threading.Event()

    def step() -> None:
        with gate.step():
            in_step.set()
            end_step.wait(30)

    engine_thread = threading.Thread(target=step)
    engine_thread.start()
    try:
        assert await asyncio.to_thread(in_step.wait, 10)
        swapping = asyncio.create_task(swapper.swap_in(manifest, staging))
        await until(lambda: gate.swap_waiting, timeout_s=10)
        faults.inject("swap cancelled while it waits at the gate behind an engine step")
        swapping.cancel()
        with pytest.raises(asyncio.CancelledError):
            await swapping
        # The cancelled swap has let go of the gate and its thread has ended.
        assert not gate.swap_waiting
        assert _threads("weightstream-swap") == []
    finally:
        end_step.set()
        await asyncio.to_thread(engine_thread.join)
    with gate.step() as version:
        assert version is None
        assert all(torch.equal(bits(t), old[name]) for name, t in engine.items())
    faults.applied(version=0, ok=True, what="the engine kept its start-up values")

    report = await swapper.swap_in(manifest, staging)  # and the version still applies later
    assert report.version == 2
    assert gate.version == 2


async def test_a_stage_cancelled_mid_copy_leaves_nothing_staged(faults: Faults) -> None:
    template = {f"w{i}": torch.zeros(1024, 1024) for i in range(16)}  # 64 MiB: a stage of a while
    new = version_of(template, seed=4)
    manifest, staging = stage(new, version=5)
    swapper = CudaSwapper(template)  # on the CPU device: the same threads and checks
    staging_task = asyncio.create_task(swapper.stage(manifest, staging))
    await until(lambda: _threads("weightstream-stage"), timeout_s=10)
    faults.inject("stage cancelled while it copies")
    staging_task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await staging_task
    assert _threads("weightstream-stage") == []
    assert swapper._staged is None, "a cancelled stage must not leave a plan to swap from"
    assert all(torch.count_nonzero(t) == 0 for t in template.values())

    await swapper.swap_in(manifest, staging)  # stages afresh, then swaps
    ok = all(torch.equal(template[n], new[n]) for n in new)
    faults.applied(version=5, ok=ok)


async def test_a_cancelled_pull_waits_for_its_fetch_threads(faults: Faults) -> None:
    payload = torch.arange(4 << 20, dtype=torch.int32).view(torch.uint8)
    template = {"w": payload.view(torch.int32).clone()}
    manifest, _ = stage(template, version=1)
    sender = ZmqFrameSender()
    receiver = ZmqFrameReceiver(timeout_s=5)
    staging = Staging(receivers=[receiver], pin_memory=False)
    try:
        # Serve the same bytes the manifest describes, from the publisher's own buffers.
        from publishers.packing import pack, plan

        layout = plan(template, bucket_bytes=1024, region_bytes=8192)
        buffers = [torch.empty(n, dtype=torch.uint8) for n in layout.region_bytes]
        pack(layout, template, buffers)
        locators = sender.expose([Region(b.data_ptr(), b.numel()) for b in buffers])
        regions = tuple(
            type(r)(nbytes=r.nbytes, locators=(loc,), rank=r.rank)
            for r, loc in zip(manifest.regions, locators, strict=True)
        )
        served = type(manifest)(
            model=manifest.model,
            version=manifest.version,
            regions=regions,
            tensors=manifest.tensors,
            buckets=manifest.buckets,
        )
        progressed = asyncio.Event()

        async def on_progress(done: int, total: int, rate: float) -> None:
            progressed.set()

        pulling = asyncio.create_task(
            pull(
                served,
                staging,
                [receiver],
                max_bytes_per_s=4e6,
                on_progress=on_progress,
                progress_interval_s=0.01,
            )
        )
        async with asyncio.timeout(20):
            await progressed.wait()
        faults.inject("pull cancelled mid-way")
        pulling.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pulling
        assert _threads("pull") == [], "fetch and verify threads must be done when pull returns"
    finally:
        staging.close()
        receiver.close()
        sender.close()
