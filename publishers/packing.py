"""Lay named tensors out in a few large contiguous regions and cut them into buckets.

    named tensors ──plan()──> Layout: regions [nbytes], tensors [region, offset], buckets
                  ──pack()──> bytes copied into the buffers, bucket digests (wmix128) computed
                              (CUDA tensors: on the GPU, publishers/gpu_pack.py; else numpy)

Every tensor starts on an `ALIGNMENT` (256 B) boundary, in the order given (name or layer
order: subscribers apply in that order too). A region holds up to `region_bytes`; a tensor
larger than that gets a region of its own. Buckets are contiguous `bucket_bytes` ranges of
a region, so a tensor larger than a bucket spans several.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from publishers.dtypes import dtype_name
from publishers.gpu_pack import pack_on_device
from schemas.manifest import ALIGNMENT, BucketSpec, Locator, RegionSpec, Shard, TensorSpec
from streamer.checksum import ALGORITHM, wmix128_words

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

__all__ = ["DEFAULT_BUCKET_BYTES", "DEFAULT_REGION_BYTES", "Layout", "pack", "plan"]

DEFAULT_BUCKET_BYTES = 64 << 20
DEFAULT_REGION_BYTES = 1 << 30
_MAX_DIGEST_WORKERS = 4


def _align(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


@dataclass(frozen=True)
class Layout:
    region_bytes: tuple[int, ...]
    tensors: tuple[TensorSpec, ...]
    bucket_bytes: int

    @property
    def total_bytes(self) -> int:
        return sum(self.region_bytes)

    def bucket_ranges(self) -> list[tuple[int, int, int]]:
        """(region, offset, nbytes) of every bucket, in order."""
        return [
            (region, offset, min(self.bucket_bytes, size - offset))
            for region, size in enumerate(self.region_bytes)
            for offset in range(0, size, self.bucket_bytes)
        ]

    def shard(
        self, locators: Sequence[Sequence[Locator]], checksums: Sequence[str], rank: int
    ) -> Shard:
        ranges = self.bucket_ranges()
        if len(checksums) != len(ranges):
            raise ValueError(f"{len(checksums)} checksums for {len(ranges)} buckets")
        return Shard(
            regions=tuple(
                RegionSpec(nbytes=size, locators=tuple(locs), rank=rank)
                for size, locs in zip(self.region_bytes, locators, strict=True)
            ),
            tensors=self.tensors,
            buckets=tuple(
                BucketSpec(region=r, offset=o, nbytes=n, checksum=c)
                for (r, o, n), c in zip(ranges, checksums, strict=True)
            ),
            checksum_algorithm=ALGORITHM,
        )


def plan(
    named_tensors: Mapping[str, torch.Tensor],
    *,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    region_bytes: int = DEFAULT_REGION_BYTES,
) -> Layout:
    """Place every tensor; no bytes move yet.

    >>> layout = plan({"w": torch.zeros(3, dtype=torch.float32)})
    >>> layout.tensors[0].offset, layout.region_bytes
    (0, (256,))
    """
    if bucket_bytes <= 0 or bucket_bytes % ALIGNMENT:
        raise ValueError(f"bucket_bytes must be a positive multiple of {ALIGNMENT}")
    regions: list[int] = []
    specs: list[TensorSpec] = []
    for name, tensor in named_tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        size = _align(max(nbytes, 1))
        if not regions or (regions[-1] and regions[-1] + size > region_bytes):
            regions.append(0)
        specs.append(
            TensorSpec(
                name=name,
                dtype=dtype_name(tensor.dtype),
                shape=tuple(tensor.shape),
                region=len(regions) - 1,
                offset=regions[-1],
                nbytes=nbytes,
            )
        )
        regions[-1] += size
    return Layout(region_bytes=tuple(regions), tensors=tuple(specs), bucket_bytes=bucket_bytes)


def pack(
    layout: Layout,
    named_tensors: Mapping[str, torch.Tensor],
    buffers: Sequence[torch.Tensor],
    *,
    digest_workers: int | None = None,
) -> list[str]:
    """Copy every tensor into its place and return the bucket digests. Blocking.

    `buffers` are 1-D uint8 CPU tensors, one per region, at least as large as the region.
    Padding bytes are zeroed so that digests do not depend on stale memory. The buckets are
    digested by `digest_workers` threads (default: one per core, at most 4): numpy releases
    the GIL inside each operation, and the digest runs at a few GB/s per core.
    Tensors all on one CUDA device are packed by `publishers.gpu_pack.pack_on_device` instead:
    digests computed on the GPU, device-to-host copies straight into `buffers`.
    """
    if len(buffers) != len(layout.region_bytes):
        raise ValueError(f"{len(buffers)} buffers for {len(layout.region_bytes)} regions")
    devices = {tensor.device for tensor in named_tensors.values()}
    if len(devices) == 1 and next(iter(devices)).type == "cuda":
        return pack_on_device(layout, named_tensors, buffers)
    cursor = [0] * len(buffers)
    for spec in layout.tensors:
        tensor = named_tensors[spec.name]
        buffer = buffers[spec.region]
        if spec.offset > cursor[spec.region]:
            buffer[cursor[spec.region] : spec.offset].zero_()
        source = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        buffer[spec.offset : spec.offset + spec.nbytes].copy_(source, non_blocking=source.is_cuda)
        cursor[spec.region] = spec.offset + spec.nbytes
    for region, size in enumerate(layout.region_bytes):
        if cursor[region] < size:
            buffers[region][cursor[region] : size].zero_()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    views = [
        buffers[region][offset : offset + nbytes].numpy().view(np.uint64)
        for region, offset, nbytes in layout.bucket_ranges()
    ]
    workers = digest_workers or min(_MAX_DIGEST_WORKERS, os.cpu_count() or 1)
    if workers <= 1 or len(views) <= 1:
        return [wmix128_words(view) for view in views]
    with ThreadPoolExecutor(max_workers=min(workers, len(views))) as pool:
        return list(pool.map(wmix128_words, views))
