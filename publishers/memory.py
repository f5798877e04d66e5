"""Host buffers a publisher packs versions into, allocated once and reused.

A version stays readable until the broker retires it, so a publisher holds up to
`retention + 1` sets of buffers (one being packed while `retention` are readable).
Buffers are pinned when CUDA is present (fast device-to-host packing, and RDMA-friendly),
registered with the bulk transport once, and returned to the pool on `Retire`.

With `shm_prefix`, buffers live in POSIX shared memory (`/dev/shm/<prefix>-<n>`), so that
subscribers on the same machine map them instead of fetching them (`streamer.transport.shm`).
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from gpu.host import HostRegisterError, HostRegistration
from streamer.transport.base import Region
from streamer.transport.shm import SHM_DIR, create_segment

if TYPE_CHECKING:
    import mmap
    from pathlib import Path

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

    def __init__(
        self,
        *,
        pin_memory: bool | None = None,
        shm_prefix: str | None = None,
        shm_dir: Path = SHM_DIR,
    ) -> None:
        """`shm_dir` is where shared-memory segments go (a tmpfs; /dev/shm by default)."""
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.shm_prefix = shm_prefix
        self.shm_dir = shm_dir
        self._free: list[BufferSet] = []
        self._names: dict[int, str] = {}
        self._mappings: list[mmap.mmap] = []
        self._registered: list[HostRegistration] = []
        self._counter = itertools.count()
        self.allocated_bytes = 0

    def take(self, region_bytes: tuple[int, ...]) -> tuple[BufferSet, bool]:
        """A buffer set for this layout; returns (set, newly_allocated)."""
        for index, candidate in enumerate(self._free):
            if candidate.fits(region_bytes):
                return self._free.pop(index), False
        buffer_set = BufferSet([self._allocate(n) for n in region_bytes])
        self.allocated_bytes += sum(region_bytes)
        logger.info(
            "allocated publish buffers bytes=%d pinned=%s shm=%s pool_bytes=%d",
            sum(region_bytes),
            self.pin_memory,
            self.shm_prefix is not None,
            self.allocated_bytes,
        )
        return buffer_set, True

    def _allocate(self, nbytes: int) -> torch.Tensor:
        if self.shm_prefix is None:
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin_memory)
        name = f"{self.shm_prefix}-{next(self._counter)}"
        # Reserved up front: a tmpfs too small fails here, with the fix, not with SIGBUS later.
        mapping = create_segment(self.shm_dir / name, nbytes, exclusive=True)
        self._mappings.append(mapping)
        tensor = torch.frombuffer(mapping, dtype=torch.uint8)[:nbytes]
        if self.pin_memory:
            # Page-locked for fast device-to-host packing; once per buffer, never per version.
            self._register(tensor)
        self._names[tensor.data_ptr()] = name
        return tensor

    def _register(self, tensor: torch.Tensor) -> None:
        try:
            registration = HostRegistration(tensor)
        except HostRegisterError as exc:
            logger.warning("%s; packing into pageable memory", exc)
            return
        self._registered.append(registration)

    def shm_name(self, address: int) -> str | None:
        """The shared-memory segment a buffer starting at `address` lives in, if any."""
        return self._names.get(address)

    def give_back(self, buffer_set: BufferSet) -> None:
        self._free.append(buffer_set)

    def close(self) -> None:
        """Unregister and unlink every shared-memory segment (mappings go with their last view)."""
        for registration in self._registered:
            try:
                registration.close()
            except HostRegisterError as exc:
                logger.warning("%s; leaving the pages pinned", exc)
        self._registered.clear()
        for name in self._names.values():
            (self.shm_dir / name).unlink(missing_ok=True)
        self._names.clear()
