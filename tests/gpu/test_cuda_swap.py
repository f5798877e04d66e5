"""CudaSwapper behind a real Subscriber: real broker, real Publisher in shared memory, real pulls.

Every case runs on the CPU (CI: CudaStager's stream-free path, no host registration) and, on a
machine with CUDA, again on the GPU (marked `gpu`). The publisher offers its regions in
/dev/shm; the subscriber maps them (zero copy), stages them on the device and verifies every
bucket there (`verifies_on_device`: the host checksums nothing).

The tests are plain functions around `asyncio.run`, so the device machine runs them without
pytest-asyncio (`pytest -c /dev/null --noconftest tests/gpu`).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import aiohttp
import pytest
import torch
import zmq.asyncio

from publishers.memory import BufferPool
from publishers.publisher import Publisher
from publishers.sources import synthetic_llama
from streamer.client import connect
from streamer.errors import ChecksumMismatch
from streamer.transport import ShmReceiver
from subscribers.cuda.swap import CudaSwapper, SwapMode
from subscribers.staging import Staging
from subscribers.subscriber import PullConfig, Subscriber
from subscribers.swap import SwapError
from tests.support import RunningBroker, broker_config, run_broker, until

HAS_CUDA = torch.cuda.is_available()
cuda_only = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]
DEVICES = ["cpu", pytest.param("cuda", marks=cuda_only)]
MODES = ["staged", "streaming"]

MODEL = "org/model"
MODEL_BYTES = 768 << 10
BUCKET_BYTES = 32 << 10
FAST = PullConfig(max_attempts=2, retry_backoff_s=0.01, progress_interval_s=0.05)

pytestmark = pytest.mark.timeout(120)


def weights(version: int) -> dict[str, torch.Tensor]:
    return synthetic_llama(MODEL_BYTES, version=version, seed=11)


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(scenario())


class Engine:
    """Parameters preallocated on `device`, poisoned, applied to in place by a CudaSwapper."""

    def __init__(
        self,
        device: str,
        mode: SwapMode = "staged",
        overrides: dict[str, torch.Tensor] | None = None,
    ) -> None:
        shapes = weights(0) | (overrides or {})
        self.params = {
            name: torch.full(t.shape, -3.25, dtype=t.dtype, device=device)
            for name, t in shapes.items()
        }
        self.pointers = {name: t.data_ptr() for name, t in self.params.items()}
        self.swapper = CudaSwapper(self.params, mode=mode)

    def holds(self, version: int) -> bool:
        """Bit for bit `version`, in the original storage."""
        expected = weights(version)
        return all(
            param.data_ptr() == self.pointers[name]
            and torch.equal(param.cpu().view(torch.int16), expected[name].view(torch.int16))
            for name, param in self.params.items()
        )

    def poisoned(self) -> bool:
        return all(bool((p == -3.25).all()) for p in self.params.values())


@contextlib.asynccontextmanager
async def service(
    engine: Engine, *, world_size: int = 1
) -> AsyncIterator[tuple[RunningBroker, list[Publisher], Subscriber]]:
    """A broker, `world_size` publisher ranks (shared memory) and a running subscriber."""
    ctx = zmq.asyncio.Context()
    receiver = ShmReceiver()
    try:
        async with (
            run_broker(broker_config(retention=1)) as broker,
            contextlib.AsyncExitStack() as stack,
        ):
            publishers = [
                await stack.enter_async_context(publisher_on(broker, ctx, rank, world_size))
                for rank in range(world_size)
            ]
            client = await stack.enter_async_context(
                connect(broker.client_config(), role="subscriber", context=ctx)
            )
            subscriber = Subscriber(
                client=client,
                receivers=[receiver],
                swapper=engine.swapper,
                model=MODEL,
                config=FAST,
                staging=Staging(receivers=[receiver], pin_memory=False),
            )
            task = asyncio.create_task(subscriber.run())
            try:
                yield broker, publishers, subscriber
            finally:
                task.cancel()
                [outcome] = await asyncio.gather(task, return_exceptions=True)
                subscriber.close()
                engine.swapper.close()
                if isinstance(outcome, Exception):
                    raise outcome
    finally:
        receiver.close()
        ctx.destroy(linger=0)


@contextlib.asynccontextmanager
async def publisher_on(
    broker: RunningBroker, ctx: zmq.asyncio.Context, rank: int, world_size: int
) -> AsyncIterator[Publisher]:
    """A Publisher in shared memory, its buffers left unpinned: with CUDA present the pool
    would register each buffer with CUDA in this process, which also hosts the subscriber."""
    async with connect(broker.client_config(), role="publisher", context=ctx) as client:
        publisher = Publisher(
            client=client,
            sender=[],
            model=MODEL,
            rank=rank,
            world_size=world_size,
            job="gpu-trainer",
            bucket_bytes=BUCKET_BYTES,
            pool=BufferPool(pin_memory=False, shm_prefix=f"weightstream-test-{uuid.uuid4().hex}"),
            node_local=True,
        )
        retire = asyncio.create_task(publisher.retire_loop())
        try:
            yield publisher
        finally:
            retire.cancel()
            await asyncio.gather(retire, return_exceptions=True)
            publisher.close()


async def applied(publisher: Publisher, version: int) -> None:
    async with asyncio.timeout(30):
        await publisher.wait_applied(version, 1)


async def last_error(broker: RunningBroker) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.get(broker.url + "/v1/subscribers") as response,
    ):
        [row] = (await response.json())["subscribers"]
        return str(row["last_error"])


def halves(tensors: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    names = list(tensors)
    return [{n: tensors[n] for n in names[rank::2]} for rank in range(2)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("device", DEVICES)
def test_versions_land_bit_exact_in_place_through_the_subscriber(device: str, mode: str) -> None:
    engine = Engine(device, mode)  # type: ignore[arg-type]

    async def scenario() -> None:
        async with service(engine) as (_, [publisher], subscriber):
            for version in (1, 2, 3, 4):
                await publisher.publish(version, weights(version))
                await applied(publisher, version)
                assert engine.holds(version), f"version {version}"
                assert engine.swapper.gate.version == version
                stage = engine.swapper.last_stage
                assert stage is not None
                manifest = subscriber.client.latest_manifest(MODEL)
                assert manifest is not None
                assert (stage.version, stage.nbytes) == (version, manifest.total_bytes)
            assert subscriber.failures == 0
            # Staged mode maps the publisher's segment (zero copy, verified on the device);
            # streaming reads host staging at the swap, so it gets a private verified copy.
            assert subscriber.staging.is_mapped(0) == (mode == "staged")

    run(scenario)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("device", DEVICES)
def test_a_corrupted_bucket_is_reported_and_staged_mode_keeps_the_previous_version(
    device: str, mode: str
) -> None:
    engine = Engine(device, mode)  # type: ignore[arg-type]

    async def scenario() -> None:
        async with service(engine, world_size=2) as (broker, [rank0, rank1], subscriber):

            async def publish(version: int, *, corrupt: bool) -> None:
                shards = halves(weights(version))
                await rank0.publish(version, shards[0])
                if corrupt:  # after its checksums, before the version is announced
                    rank0.live[version].buffers[0][1000] ^= 0x10
                await rank1.publish(version, shards[1])

            await publish(1, corrupt=False)
            await applied(rank0, 1)
            await publish(2, corrupt=True)
            await until(lambda: subscriber.failures == FAST.max_attempts, timeout_s=30)
            error = await last_error(broker)
            assert "ChecksumMismatch" in error
            assert "version 2" in error
            # Staged mode checks on the device; streaming's private copy is checked on the
            # host before the swap, so neither lets version 2 reach the parameters.
            assert ("fail their checksum" if mode == "staged" else "fails its checksum") in error
            assert subscriber.applied == 1
            assert engine.swapper.gate.version == 1
            assert engine.holds(1)
            await publish(3, corrupt=False)
            await applied(rank0, 3)
            assert engine.holds(3)

    run(scenario)


@pytest.mark.parametrize("device", DEVICES)
def test_a_manifest_that_does_not_fit_is_refused_and_touches_nothing(device: str) -> None:
    engine = Engine(device, overrides={"model.norm.weight": torch.zeros(3, dtype=torch.bfloat16)})

    async def scenario() -> None:
        async with service(engine) as (_, [publisher], subscriber):
            await publisher.publish(1, weights(1))
            await until(lambda: subscriber.failures == 1, timeout_s=30)
            manifest = subscriber.client.latest_manifest(MODEL)
            assert manifest is not None
            with pytest.raises(SwapError, match=r"model\.norm\.weight: shape"):
                engine.swapper.check(manifest)
            assert subscriber.applied is None
            assert engine.swapper.gate.version is None
            assert engine.poisoned()
            assert engine.swapper.last_stage is None

    run(scenario)


@pytest.mark.parametrize("device", DEVICES)
def test_a_failed_stage_names_the_buckets(device: str) -> None:
    """Straight through the Swapper calls: the error says which buckets, and the gate holds."""
    engine = Engine(device)

    async def scenario() -> None:
        async with service(engine) as (_, [publisher], subscriber):
            await publisher.publish(1, weights(1))
            await applied(publisher, 1)
            manifest = subscriber.client.latest_manifest(MODEL)
            assert manifest is not None
            publisher.live[1].buffers[0][BUCKET_BYTES * 2 + 8] ^= 1  # bucket 2 of region 0
            with pytest.raises(ChecksumMismatch, match=r"buckets 2 \(region 0 offset 65536\)"):
                await engine.swapper.stage(manifest, subscriber.staging)
            assert engine.holds(1)

    run(scenario)


def test_tensors_on_two_devices_are_refused() -> None:
    params = {"a": torch.zeros(4), "b": torch.zeros(4, device="meta")}
    with pytest.raises(ValueError, match="one device"):
        CudaSwapper(params)
