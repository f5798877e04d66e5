"""Host buffers a publisher packs versions into, allocated once and reused.

A version stays readable until the broker retires it, so a publisher holds up to
`retention + 1` sets of buffers (one being packed while `retention` are readable).
Buffers are pinned when CUDA is present (fast device-to-host packing, and RDMA-friendly),
registered with the bulk transport once, and returned to the pool on `Retire`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from streamer.transport.base import Region

__all__ = ["BufferPool", "BufferSet"]

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class BufferSet:
    """The buffers of one version: one 1-D uint8 tensor per region."""

    buffers: list[torch.Tensor]

    @property
    def regions(self) -> list[Region]:
        return [Region(b.data_ptr(), b.numel()) for b in self.buffers]

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for b in self.buffers)

    def fits(self, region_bytes: tuple[int, ...]) -> bool:
        return len(region_bytes) == len(self.buffers) and all(
            b.numel() >= n for b, n in zip(self.buffers, region_bytes, strict=True)
        )


class BufferPool:
    """Free buffer sets, reused when a new version's layout fits in one."""

    def __init__(self, *, pin_memory: bool | None = None) -> None:
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._free: list[BufferSet] = []
        self.allocated_bytes = 0

    def take(self, region_bytes: tuple[int, ...]) -> tuple[BufferSet, bool]:
        """A buffer set for this layout; returns (set, newly_allocated)."""
        for index, candidate in enumerate(self._free):
            if candidate.fits(region_bytes):
                return self._free.pop(index), False
        buffers = [
            torch.empty(n, dtype=torch.uint8, pin_memory=self.pin_memory) for n in region_bytes
        ]
        self.allocated_bytes += sum(region_bytes)
        logger.info(
            "allocated publish buffers bytes=%d pinned=%s pool_bytes=%d",
            sum(region_bytes),
            self.pin_memory,
            self.allocated_bytes,
        )
        return BufferSet(buffers), True

    def give_back(self, buffer_set: BufferSet) -> None:
        self._free.append(buffer_set)

    def drop(self, buffer_set: BufferSet) -> None:
        self.allocated_bytes -= buffer_set.nbytes
