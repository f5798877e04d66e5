"""The GPU stage of a subscriber: host bytes -> verified GPU staging -> live parameters.

A `CudaStager` per GPU owns a staging buffer as large as a version (allocated once, reused for
every version), a copy stream and a verify stream. `pull` moves a version's buckets host to
device and checks each bucket's wmix128 digest on the device while the next one is in flight;
the host waits once, at the end. `swap_in` is the engine's pause: one device-to-device copy per run of
parameters that are contiguous in both the staging and the engine's memory (`plan_swap` ahead
of the boundary, `apply_swap` at it, keeps even the planning out of the pause).

    host regions (pinned, or cudaHostRegister'ed once by gpu.host.HostRegistration)
        |  copy stream: H2D bucket 0, 1, 2, ...           (one DMA per bucket)
        v          \\__ event i __
    staging [region 0 | region 1 | ...]     verify stream: wmix128(bucket i) -> DigestBatch
        |                                     (host syncs once: the failed bucket indices)
        |  swap_in: D2D on the engine's current stream (the pause)
        v
    live parameters

`pull_streaming` is the low-memory mode: no staging, every bucket's pieces go host to device
straight into the parameters (the engine must be paused for the whole pull) and each bucket is
verified from those pieces (`wmix128_pieces`; padding between tensors is taken as zero, as the
publisher packs it). A failed bucket there leaves the parameters half-updated: pull it again.

On a CPU device the same code runs without streams (tests use that); timings are meaningless.
"""

from __future__ import annotations

import bisect
import logging
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

import torch

from gpu.digest import DigestBatch, wmix128_pieces
from gpu.streams import event_on, new_stream, on_stream
from schemas.manifest import ALIGNMENT

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

__all__ = [
    "BucketLike",
    "CudaStager",
    "PullResult",
    "SwapPlan",
    "SwapResult",
    "TensorLike",
    "host_tensor",
]

logger = logging.getLogger(__name__)


class BucketLike(Protocol):
    """A checksummed byte range of a region (`schemas.manifest.BucketSpec` is one)."""

    @property
    def region(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def checksum(self) -> str: ...


class TensorLike(Protocol):
    """Where a named tensor's bytes lie (`schemas.manifest.TensorSpec` is one)."""

    @property
    def name(self) -> str: ...
    @property
    def region(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def nbytes(self) -> int: ...


@dataclass(frozen=True)
class PullResult:
    failed: tuple[int, ...]
    """Indices (into the buckets given) whose checksum did not match."""
    nbytes: int
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def bytes_per_s(self) -> float:
        return self.nbytes / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class SwapPlan:
    """The device-to-device copies of a swap: (parameter bytes, staging bytes), fused."""

    copies: tuple[tuple[torch.Tensor, torch.Tensor], ...]

    @property
    def nbytes(self) -> int:
        return sum(target.numel() for target, _ in self.copies)


@dataclass(frozen=True)
class SwapResult:
    pause_s: float
    nbytes: int
    num_copies: int


def _align(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


class CudaStager:
    """Staging for one GPU: pull buckets in, verify them there, swap them into parameters.

    >>> stager = CudaStager("cuda:0", total_bytes=manifest.total_bytes)  # doctest: +SKIP
    >>> stager.prepare([r.nbytes for r in manifest.regions])  # doctest: +SKIP
    >>> result = stager.pull(host_regions, manifest.buckets)  # doctest: +SKIP
    >>> if result.ok:  # doctest: +SKIP
    ...     stager.swap_in(manifest.tensors, dict(model.named_parameters()))
    """

    def __init__(self, device: torch.device | str, total_bytes: int) -> None:
        self.device = torch.device(device)
        if str(self.device) == "cuda":  # no index: the current device
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.is_cuda = self.device.type == "cuda"
        self.staging = torch.empty(total_bytes, dtype=torch.uint8, device=self.device)
        self.region_offsets: list[int] = []
        self.region_nbytes: list[int] = []
        self.copy_stream = new_stream(self.device) if self.is_cuda else None
        self.verify_stream = new_stream(self.device) if self.is_cuda else None

    @property
    def total_bytes(self) -> int:
        return self.staging.numel()

    def prepare(self, region_nbytes: Sequence[int]) -> None:
        """Lay a version's regions out back to back (each on an aligned offset)."""
        offsets: list[int] = []
        cursor = 0
        for nbytes in region_nbytes:
            offsets.append(cursor)
            cursor = _align(cursor + nbytes)
        if cursor > self.total_bytes:
            raise ValueError(
                f"the version needs {cursor} staging bytes but this stager has {self.total_bytes}: "
                "make a larger CudaStager, or use pull_streaming"
            )
        self.region_offsets = offsets
        self.region_nbytes = list(region_nbytes)

    def offset_of(self, region: int, offset: int, nbytes: int = 0) -> int:
        """Where a (region, offset, nbytes) range of the prepared layout starts in the staging."""
        if not 0 <= region < len(self.region_offsets):
            raise ValueError(
                f"region {region} is not in the prepared layout ({len(self.region_offsets)} regions)"
            )
        if offset < 0 or nbytes < 0 or offset + nbytes > self.region_nbytes[region]:
            raise ValueError(
                f"range {offset}+{nbytes} lies outside region {region} ({self.region_nbytes[region]} bytes)"
            )
        return self.region_offsets[region] + offset

    def view(self, region: int, offset: int, nbytes: int) -> torch.Tensor:
        """The staging bytes of a (region, offset, nbytes) range of the prepared layout."""
        start = self.offset_of(region, offset, nbytes)
        return self.staging[start : start + nbytes]

    # -- pulling into staging -------------------------------------------------------------

    def pull(
        self, host_regions: Sequence[torch.Tensor], buckets: Sequence[BucketLike]
    ) -> PullResult:
        """Copy every bucket host to device and verify it there; the host waits once.

        `host_regions[k]` is a 1-D uint8 CPU tensor over region k (pinned or registered, else
        the copies are slow and synchronous); call `prepare` for the version first.
        """
        _warn_if_pageable(host_regions)
        started = time.perf_counter()
        batch = self.start([b.checksum for b in buckets])
        for index, bucket in enumerate(buckets):
            self.fetch(batch, index, bucket, host_regions)
        failed = self.finish(batch)
        return PullResult(failed, sum(b.nbytes for b in buckets), time.perf_counter() - started)

    def pull_peer(
        self, peer_regions: Sequence[torch.Tensor], buckets: Sequence[BucketLike]
    ) -> PullResult:
        """Copy every bucket device to device from a peer's GPU memory and verify it here.

        `peer_regions[k]` is a 1-D uint8 tensor over region k (a publisher's GPU copy, opened
        over CUDA IPC) on this stager's device, or on another GPU of the host (then the copy
        runs GPU to GPU, over NVLink where there is one): the staging gets a private copy,
        verified on this device, so nothing is ever swapped in from the peer's memory itself.
        """
        for index, peer in enumerate(peer_regions):
            if peer.dtype != torch.uint8 or peer.dim() != 1 or peer.device.type != self.device.type:
                raise TypeError(
                    f"peer region {index} must be a 1-D uint8 tensor on a {self.device.type} device"
                )
        for bucket in buckets:
            if bucket.offset + bucket.nbytes > peer_regions[bucket.region].numel():
                raise ValueError(
                    f"a bucket at {bucket.offset}+{bucket.nbytes} lies outside peer region "
                    f"{bucket.region} ({peer_regions[bucket.region].numel()} bytes)"
                )
        started = time.perf_counter()
        batch = self.start([b.checksum for b in buckets])
        # One copy per region, then one digest launch for every bucket: per-bucket launches
        # would leave a 16 GB version CPU-bound on the launch overhead (~0.2 TB/s). (A fused
        # copy-and-digest kernel measured slower than the two passes on an H200.)
        with on_stream(self.copy_stream):
            for region, peer in enumerate(peer_regions):
                nbytes = min(peer.numel(), self.region_nbytes[region])
                self.view(region, 0, nbytes).copy_(peer[:nbytes], non_blocking=True)
        copied = event_on(self.copy_stream)
        if copied is not None and self.verify_stream is not None:
            self.verify_stream.wait_event(copied)
        with on_stream(self.verify_stream):
            ranges = [(self.offset_of(b.region, b.offset, b.nbytes), b.nbytes) for b in buckets]
            batch.record_ranges(self.staging, ranges)
        failed = self.finish(batch)
        return PullResult(failed, sum(b.nbytes for b in buckets), time.perf_counter() - started)

    def start(self, digests: Sequence[str]) -> DigestBatch:
        """Begin a pull: order the side streams after the current one, make the batch."""
        if self.is_cuda:
            current = torch.cuda.current_stream(self.device)
            assert self.copy_stream is not None
            assert self.verify_stream is not None
            self.copy_stream.wait_stream(current)
            self.verify_stream.wait_stream(current)
        with on_stream(self.verify_stream):
            return DigestBatch(digests, self.device)

    def fetch(
        self,
        batch: DigestBatch,
        index: int,
        bucket: BucketLike,
        host_regions: Sequence[torch.Tensor],
    ) -> torch.Tensor:
        """Enqueue one bucket's H2D copy, then its checksum; returns its staging view."""
        target, copied = self.copy_in(bucket, host_regions)
        self.verify_when(copied, batch, index, target)
        return target

    def copy_in(
        self, bucket: BucketLike, host_regions: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """Enqueue one bucket's H2D copy; returns its staging view and an event set when done."""
        target = self.view(bucket.region, bucket.offset, bucket.nbytes)
        source = _host_range(host_regions, bucket.region, bucket.offset, bucket.nbytes)
        with on_stream(self.copy_stream):
            target.copy_(source, non_blocking=True)
        return target, event_on(self.copy_stream)

    def verify_after(
        self,
        stream: torch.cuda.Stream | None,
        batch: DigestBatch,
        index: int,
        target: torch.Tensor,
    ) -> None:
        """Checksum `target` on the verify stream once `stream`'s work so far is done."""
        self.verify_when(event_on(stream), batch, index, target)

    def verify_when(
        self, event: torch.cuda.Event | None, batch: DigestBatch, index: int, target: torch.Tensor
    ) -> None:
        """Checksum `target` on the verify stream once `event` has happened."""
        if event is not None and self.verify_stream is not None:
            self.verify_stream.wait_event(event)
        with on_stream(self.verify_stream):
            batch.record(index, target)

    def finish(self, batch: DigestBatch) -> tuple[int, ...]:
        """Wait for the verify stream (the one sync) and order the current stream after it."""
        with on_stream(self.verify_stream):
            failed = tuple(batch.failed())
        if self.is_cuda:
            current = torch.cuda.current_stream(self.device)
            assert self.copy_stream is not None
            assert self.verify_stream is not None
            current.wait_stream(self.copy_stream)
            current.wait_stream(self.verify_stream)
        return failed

    # -- into the parameters --------------------------------------------------------------

    def swap_in(
        self, tensors: Sequence[TensorLike], params: Mapping[str, torch.Tensor]
    ) -> SwapResult:
        """Copy the staged version into `params` in place; returns the pause it took.

        Same as `apply_swap(plan_swap(tensors, params))`, with the planning inside the pause.
        """
        started = time.perf_counter()
        result = self.apply_swap(self.plan_swap(tensors, params))
        return replace(result, pause_s=time.perf_counter() - started)

    def plan_swap(
        self, tensors: Sequence[TensorLike], params: Mapping[str, torch.Tensor]
    ) -> SwapPlan:
        """Check every parameter against its spec and fuse the copies; no byte moves yet.

        Make the plan while the engine still serves (it is valid for the prepared layout and
        these parameter tensors), so the pause is only `apply_swap`. Every parameter must be
        contiguous, on this stager's device and of its spec's size, else ValueError.
        """
        return SwapPlan(tuple(self._swap_copies(tensors, params)))

    def apply_swap(self, plan: SwapPlan) -> SwapResult:
        """The pause: enqueue the plan's copies on the current (engine's) stream and wait.

        They run after the last pull's copies and checks; the call returns once they are done.
        """
        started = time.perf_counter()
        if self.is_cuda:
            current = torch.cuda.current_stream(self.device)
            assert self.copy_stream is not None
            assert self.verify_stream is not None
            current.wait_stream(self.copy_stream)
            current.wait_stream(self.verify_stream)
        with torch.no_grad():
            for target, source in plan.copies:
                target.copy_(source, non_blocking=True)
        if self.is_cuda:
            torch.cuda.current_stream(self.device).synchronize()
        return SwapResult(time.perf_counter() - started, plan.nbytes, len(plan.copies))

    def pull_streaming(
        self,
        host_regions: Sequence[torch.Tensor],
        buckets: Sequence[BucketLike],
        tensors: Sequence[TensorLike],
        params: Mapping[str, torch.Tensor],
    ) -> PullResult:
        """Copy every bucket host to device straight into `params`, verifying each bucket.

        No staging is used (call `prepare` anyway, for the region sizes). The engine must be
        paused throughout; bytes of a bucket that belong to no tensor are taken as zero.
        """
        _warn_if_pageable(host_regions)
        started = time.perf_counter()
        plan = _stream_plan(buckets, tensors, params, self.device)
        batch = self.start([b.checksum for b in buckets])
        for index, bucket in enumerate(buckets):
            pieces = plan[index]
            with on_stream(self.copy_stream), torch.no_grad():
                for region_offset, target, _ in pieces:
                    source = _host_range(host_regions, bucket.region, region_offset, target.numel())
                    target.copy_(source, non_blocking=True)
            _order(self.copy_stream, self.verify_stream)
            with on_stream(self.verify_stream):
                sums = wmix128_pieces(
                    [(rel, target) for _, target, rel in pieces], bucket.nbytes, device=self.device
                )
                batch.record_sums(index, sums)
        failed = self.finish(batch)
        return PullResult(failed, sum(b.nbytes for b in buckets), time.perf_counter() - started)

    def _swap_copies(
        self, tensors: Sequence[TensorLike], params: Mapping[str, torch.Tensor]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        run: _Run | None = None
        for spec in tensors:
            target = _param_bytes(params, spec, self.device)
            if not spec.nbytes:
                continue
            source_start = self.offset_of(spec.region, spec.offset, spec.nbytes)
            storage = target.untyped_storage()
            if (
                run is not None
                and run.storage_ptr == storage.data_ptr()
                and run.target_end == target.data_ptr()
                and run.source_end == source_start
            ):
                run.nbytes += spec.nbytes
                continue
            if run is not None:
                copies.append(run.copy(self.staging))
            run = _Run(
                storage,
                target.data_ptr() - storage.data_ptr(),
                source_start,
                spec.nbytes,
                target.device,
            )
        if run is not None:
            copies.append(run.copy(self.staging))
        return copies


class _Run:
    """Tensors adjacent both in the staging and in one storage of the engine: one copy."""

    def __init__(
        self,
        storage: torch.UntypedStorage,
        target_offset: int,
        source_start: int,
        nbytes: int,
        device: torch.device,
    ) -> None:
        self.storage = storage
        self.storage_ptr = storage.data_ptr()
        self.target_offset = target_offset
        self.source_start = source_start
        self.nbytes = nbytes
        self.device = device

    @property
    def target_end(self) -> int:
        return self.storage_ptr + self.target_offset + self.nbytes

    @property
    def source_end(self) -> int:
        return self.source_start + self.nbytes

    def copy(self, staging: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        whole = torch.empty(0, dtype=torch.uint8, device=self.device).set_(self.storage)
        target = whole[self.target_offset : self.target_offset + self.nbytes]
        return target, staging[self.source_start : self.source_start + self.nbytes]


def _order(first: torch.cuda.Stream | None, then: torch.cuda.Stream | None) -> None:
    """Make `then` wait for the work enqueued on `first` so far (no host sync)."""
    if first is None or then is None or first == then:
        return
    event = event_on(first)
    assert event is not None
    then.wait_event(event)


def _host_range(
    host_regions: Sequence[torch.Tensor], region: int, offset: int, nbytes: int
) -> torch.Tensor:
    if not 0 <= region < len(host_regions):
        raise ValueError(f"region {region} has no host buffer ({len(host_regions)} given)")
    host = host_regions[region]
    if host.dtype != torch.uint8 or host.dim() != 1 or host.device.type != "cpu":
        raise TypeError(f"host region {region} must be a 1-D uint8 CPU tensor")
    if offset + nbytes > host.numel():
        raise ValueError(
            f"range {offset}+{nbytes} lies outside host region {region} ({host.numel()} bytes)"
        )
    return host[offset : offset + nbytes]


def _warn_if_pageable(host_regions: Sequence[torch.Tensor]) -> None:
    if not torch.cuda.is_available():
        return
    pageable = [k for k, host in enumerate(host_regions) if host.numel() and not host.is_pinned()]
    if pageable:
        logger.warning(
            "host regions %s are pageable: copies will be slow; register them once", pageable
        )


def _param_bytes(
    params: Mapping[str, torch.Tensor], spec: TensorLike, device: torch.device
) -> torch.Tensor:
    param = params.get(spec.name)
    if param is None:
        raise ValueError(f"tensor {spec.name!r} has no parameter to go into")
    if param.device != device:
        raise ValueError(f"parameter {spec.name!r} is on {param.device}, the stager on {device}")
    if not param.is_contiguous():
        raise ValueError(f"parameter {spec.name!r} is not contiguous")
    nbytes = param.numel() * param.element_size()
    if nbytes != spec.nbytes:
        raise ValueError(f"parameter {spec.name!r} has {nbytes} bytes, the version {spec.nbytes}")
    return param.detach().reshape(-1).view(torch.uint8)


def _stream_plan(
    buckets: Sequence[BucketLike],
    tensors: Sequence[TensorLike],
    params: Mapping[str, torch.Tensor],
    device: torch.device,
) -> list[list[tuple[int, torch.Tensor, int]]]:
    """Per bucket: (offset in the region, parameter bytes, offset in the bucket) of each piece."""
    by_region: dict[int, list[TensorLike]] = {}
    for spec in tensors:
        by_region.setdefault(spec.region, []).append(spec)
    starts: dict[int, list[int]] = {}
    for region, specs in by_region.items():
        specs.sort(key=lambda s: s.offset)
        starts[region] = [s.offset for s in specs]
    targets = {spec.name: _param_bytes(params, spec, device) for spec in tensors}
    plan: list[list[tuple[int, torch.Tensor, int]]] = []
    for bucket in buckets:
        specs = by_region.get(bucket.region, [])
        end = bucket.offset + bucket.nbytes
        pieces = []
        k = max(bisect.bisect_right(starts.get(bucket.region, []), bucket.offset) - 1, 0)
        while k < len(specs) and specs[k].offset < end:
            spec = specs[k]
            low, high = max(spec.offset, bucket.offset), min(spec.offset + spec.nbytes, end)
            if low < high:
                piece = targets[spec.name][low - spec.offset : high - spec.offset]
                pieces.append((low, piece, low - bucket.offset))
            k += 1
        plan.append(pieces)
    return plan


def host_tensor(buffer: memoryview | bytearray | object) -> torch.Tensor:
    """A 1-D uint8 CPU tensor over an existing writable buffer (an mmap, a numpy array), no copy."""
    return torch.frombuffer(memoryview(buffer).cast("B"), dtype=torch.uint8)  # type: ignore[arg-type]
