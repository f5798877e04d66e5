"""The GPU stage: pull buckets into staging and verify them there, swap into parameters,
stream straight into parameters, register host memory, share staging between processes.

The cases run on CUDA (marked `gpu`, skipped without a device) and, where the logic is the
same, on the CPU too (no streams there), so CI covers the bookkeeping.
"""

from __future__ import annotations

import mmap
import multiprocessing as mp
import os
import socket
import tempfile
from typing import TYPE_CHECKING

import msgspec
import numpy as np
import pytest
import torch

from gpu.digest import DigestBatch, digest_of, wmix128_tensor
from gpu.host import HostRegisterError, HostRegistration
from publishers.packing import pack, plan
from schemas.ipc import decode_staging_share, encode_staging_share
from schemas.manifest import BucketSpec, Shard
from streamer.checksum import wmix128
from subscribers.cuda.node_share import NodeShare, exchange_shares, owner_blocks
from subscribers.cuda.stage import CudaStager, host_tensor

if TYPE_CHECKING:
    from collections.abc import Iterator

HAS_CUDA = torch.cuda.is_available()
cuda_only = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]
DEVICES = ["cpu", pytest.param("cuda", marks=cuda_only)]


def _named(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "embed": (300, 64),
        "q": (64, 64),
        "norm": (64,),
        "odd": (7, 3),
        "up": (200, 64),
        "tail": (5,),
    }
    return {n: torch.randn(s, generator=g).to(torch.bfloat16) for n, s in shapes.items()}


def _version(
    seed: int = 0, *, bucket_bytes: int = 4096, region_bytes: int = 40_000
) -> tuple[Shard, list[torch.Tensor], dict[str, torch.Tensor]]:
    named = _named(seed)
    layout = plan(named, bucket_bytes=bucket_bytes, region_bytes=region_bytes)
    buffers = [torch.empty(n, dtype=torch.uint8) for n in layout.region_bytes]
    checksums = pack(layout, named, buffers)
    shard = layout.shard([() for _ in buffers], checksums, rank=0)
    return shard, buffers, named


def _assert_params_equal(params: dict[str, torch.Tensor], named: dict[str, torch.Tensor]) -> None:
    for name, source in named.items():
        assert torch.equal(params[name].cpu().view(torch.int16), source.view(torch.int16)), name


def _stager(device: str, shard: Shard, extra: int = 1024) -> CudaStager:
    stager = CudaStager(
        device, sum(r.nbytes for r in shard.regions) + len(shard.regions) * 256 + extra
    )
    stager.prepare([r.nbytes for r in shard.regions])
    stager.staging.fill_(0xA5)  # poison: a bucket that is never copied cannot pass
    return stager


@pytest.mark.parametrize("device", DEVICES)
def test_pull_verifies_every_bucket_and_swap_in_fills_the_parameters(device: str) -> None:
    shard, host, named = _version()
    stager = _stager(device, shard)
    result = stager.pull(host, shard.buckets)
    assert result.ok, result.failed
    assert result.nbytes == sum(b.nbytes for b in shard.buckets)
    params = {n: torch.full_like(t, 3.0, device=device) for n, t in named.items()}
    swap = stager.swap_in(shard.tensors, params)
    _assert_params_equal(params, named)
    assert swap.num_copies == len(named)  # separate allocations: one copy each
    assert swap.nbytes == sum(t.nbytes for t in shard.tensors)


@pytest.mark.parametrize("device", DEVICES)
def test_swap_in_fuses_parameters_laid_out_like_the_staging(device: str) -> None:
    named = {
        f"w{i}": torch.randn(64, 32).to(torch.bfloat16) for i in range(5)
    }  # 4 KiB each: no gaps
    layout = plan(named, bucket_bytes=4096, region_bytes=1 << 20)
    buffers = [torch.empty(n, dtype=torch.uint8) for n in layout.region_bytes]
    shard = layout.shard([()], pack(layout, named, buffers), rank=0)
    stager = _stager(device, shard)
    assert stager.pull(buffers, shard.buckets).ok
    flat = torch.zeros(layout.total_bytes, dtype=torch.uint8, device=device)
    params = {
        t.name: flat[t.offset : t.offset + t.nbytes].view(torch.bfloat16).view(t.shape)
        for t in shard.tensors
    }
    assert stager.swap_in(shard.tensors, params).num_copies == 1
    _assert_params_equal(params, named)


@pytest.mark.parametrize("device", DEVICES)
def test_a_swap_planned_ahead_applies_only_the_copies(device: str) -> None:
    shard, host, named = _version(seed=3)
    stager = _stager(device, shard)
    params = {n: torch.zeros_like(t, device=device) for n, t in named.items()}
    plan = stager.plan_swap(shard.tensors, params)  # before the pull: only addresses matter
    assert stager.pull(host, shard.buckets).ok
    result = stager.apply_swap(plan)
    assert (result.num_copies, result.nbytes) == (len(plan.copies), plan.nbytes)
    _assert_params_equal(params, named)


@pytest.mark.parametrize("device", DEVICES)
def test_pull_reports_the_buckets_whose_bytes_do_not_match(device: str) -> None:
    shard, host, _ = _version()
    buckets = list(shard.buckets)
    buckets[1] = msgspec.structs.replace(buckets[1], checksum="0" * 32)
    host[buckets[3].region][buckets[3].offset + 5] ^= 0x40  # corrupt the source under bucket 3
    result = _stager(device, shard).pull(host, buckets)
    assert result.failed == (1, 3)


@pytest.mark.parametrize("device", DEVICES)
def test_streaming_pull_writes_parameters_directly_and_verifies_them(device: str) -> None:
    shard, host, named = _version(seed=1, bucket_bytes=1024)
    stager = _stager(device, shard)
    params = {n: torch.zeros_like(t, device=device) for n, t in named.items()}
    result = stager.pull_streaming(host, shard.buckets, shard.tensors, params)
    assert result.ok, result.failed
    _assert_params_equal(params, named)
    host[shard.buckets[2].region][shard.buckets[2].offset] ^= 1
    assert stager.pull_streaming(host, shard.buckets, shard.tensors, params).failed == (2,)


def test_prepare_refuses_a_version_larger_than_the_staging() -> None:
    stager = CudaStager("cpu", 1000)
    with pytest.raises(ValueError, match="pull_streaming"):
        stager.prepare([600, 600])


def test_swap_in_refuses_a_parameter_of_the_wrong_size() -> None:
    shard, _host, named = _version()
    stager = _stager("cpu", shard)
    params = {n: torch.empty_like(t) for n, t in named.items()}
    params["q"] = torch.empty(3, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="'q'"):
        stager.swap_in(shard.tensors, params)


def test_owner_blocks_cover_every_bucket_once() -> None:
    for num_buckets in (0, 1, 3, 7, 64, 257):
        for world_size in (1, 2, 3, 4, 8):
            blocks = owner_blocks(num_buckets, world_size)
            assert [i for b in blocks for i in b] == list(range(num_buckets))


# --- CUDA only ------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize(
    "length", [1, 7, 8, 4096 * 8 - 1, 4096 * 8, 4096 * 8 + 9, 3 * 4096 * 8 + 100, 5_000_003]
)
def test_cuda_twin_matches_the_numpy_reference(length: int) -> None:
    data = np.random.default_rng(length).integers(0, 256, length, dtype=np.uint8)
    on_gpu = torch.from_numpy(data).cuda()
    sums = wmix128_tensor(on_gpu)
    assert sums.device == on_gpu.device
    assert digest_of(sums) == wmix128(data.tobytes())
    assert digest_of(wmix128_tensor(on_gpu[3:])) == wmix128(data[3:].tobytes())


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_sums_wrap_like_numpy() -> None:
    words = np.array([np.iinfo(np.int64).max, -1, np.iinfo(np.int64).min] * 50_000, dtype="<i8")
    assert digest_of(wmix128_tensor(torch.from_numpy(words.view(np.uint8)).cuda())) == wmix128(
        words.tobytes()
    )


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_digest_batch_on_the_device_syncs_once_at_the_end() -> None:
    buffers = [torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda") for n in (100, 70_000)]
    digests = [wmix128(b.cpu().numpy().tobytes()) for b in buffers]
    batch = DigestBatch([*digests, digests[0]], "cuda")
    batch.record(0, buffers[0])
    batch.record(1, buffers[1])
    batch.record(2, buffers[1])
    assert batch.mismatches().device.type == "cuda"
    assert batch.failed() == [2]


@pytest.fixture
def shm_region() -> Iterator[torch.Tensor]:
    """A region in POSIX shared memory (an mmap'd file under /dev/shm), as a publisher leaves it."""
    directory = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.NamedTemporaryFile(dir=directory) as file:
        file.truncate(1 << 20)
        # the mapping outlives the file's name; it goes when the last tensor over it does
        yield host_tensor(mmap.mmap(file.fileno(), 1 << 20))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_host_registration_pins_shared_memory_once(shm_region: torch.Tensor) -> None:
    shm_region.copy_(torch.randint(0, 256, shm_region.shape, dtype=torch.uint8))
    assert not shm_region.is_pinned()
    with HostRegistration(shm_region) as registration:
        assert shm_region.is_pinned()
        bucket = BucketSpec(
            region=0,
            offset=0,
            nbytes=registration.nbytes,
            checksum=wmix128(shm_region.numpy().tobytes()),
        )
        stager = CudaStager("cuda", registration.nbytes)
        stager.prepare([registration.nbytes])
        assert stager.pull([shm_region], [bucket]).ok
        assert torch.equal(stager.staging.cpu(), shm_region)
    assert not shm_region.is_pinned()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _share_rank(
    rank: int, world_size: int, port: int, use_events: bool, barrier: object, results: object
) -> None:
    try:
        shard, host, named = _version(seed=7, bucket_bytes=2048)
        device = f"cuda:{rank % torch.cuda.device_count()}"  # NVLink where there are several GPUs
        stager = _stager(device, shard)
        store = torch.distributed.TCPStore(  # type: ignore[attr-defined]
            "127.0.0.1", port, world_size, is_master=rank == 0
        )
        share = NodeShare(
            stager, rank=rank, world_size=world_size, num_events=3, use_events=use_events
        )
        exported = share.export()
        assert decode_staging_share(encode_staging_share(exported)) == exported
        share.connect(exchange_shares(store, exported, prefix="test"))
        # Only this rank's own buckets are in its host memory: the rest must come from peers.
        mine = set(owner_blocks(len(shard.buckets), world_size)[rank])
        for index, bucket in enumerate(shard.buckets):
            if index not in mine:
                host[bucket.region][bucket.offset : bucket.offset + bucket.nbytes] = 0
        outcome = []
        for _ in range(2):  # twice: events and buffers are reused across versions
            stager.staging.fill_(0x5A)
            result = share.pull(host, shard.buckets, barrier=barrier.wait)  # type: ignore[attr-defined]
            params = {n: torch.empty_like(t, device=device) for n, t in named.items()}
            stager.swap_in(shard.tensors, params)
            same = all(
                torch.equal(params[n].cpu().view(torch.int16), t.view(torch.int16))
                for n, t in named.items()
            )
            outcome.append((result.failed, same))
        share.close()
        results.put((rank, outcome))  # type: ignore[attr-defined]
    except Exception as exc:  # report, so the parent fails instead of hanging
        results.put((rank, repr(exc)))  # type: ignore[attr-defined]
        raise


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("use_events", [True, False])
def test_two_processes_share_their_halves_through_cuda_ipc(use_events: bool) -> None:
    ctx = mp.get_context("spawn")
    world_size = 2
    barrier, results = ctx.Barrier(world_size), ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(
            target=_share_rank,
            args=(r, world_size, port, use_events, barrier, results),
            daemon=True,
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    try:
        outcomes = dict(results.get(timeout=90) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    assert outcomes == {r: [((), True), ((), True)] for r in range(world_size)}


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_a_refused_registration_leaves_no_cuda_error_behind() -> None:
    host = torch.empty(1 << 20, dtype=torch.uint8)
    with HostRegistration(host):
        with pytest.raises(HostRegisterError, match="cudaHostRegister"):
            HostRegistration(host)  # the same range twice
        assert torch.ones(4, device="cuda").sum().item() == 4  # no stale error surfaces here
