"""Host staging memory a subscriber pulls a version into, allocated once and reused.

The staging area mirrors the manifest's regions back to back (each region starting on an
aligned offset). It is registered with the receivers once and grows only when a version is
larger than any before it, so the hot path never allocates or registers memory.

With `shm_name` set, the buffer lives in POSIX shared memory (`/dev/shm/<shm_name>`), so the
node's other processes (say, the workers of a tensor-parallel vLLM engine) map the staged
version instead of fetching it again: one fetch per node.
"""

from __future__ import annotations

import logging
import mmap
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from schemas.manifest import ALIGNMENT, Manifest, TensorSpec
from streamer.transport.base import BulkReceiver, Region
from subscribers.dtypes import torch_dtype

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["SHM_DIR", "Staging", "map_shared", "region_offsets"]

logger = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")  # noqa: S108 - POSIX shared memory, names chosen by us


def _align(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def region_offsets(manifest: Manifest) -> tuple[list[int], int]:
    """Where each region starts in staging, and the staging size a manifest needs."""
    offsets: list[int] = []
    cursor = 0
    for region in manifest.regions:
        offsets.append(cursor)
        cursor = _align(cursor + region.nbytes)
    return offsets, cursor


def map_shared(shm_name: str, nbytes: int) -> tuple[mmap.mmap, torch.Tensor]:
    """Map another process's staging; the tensor views the mapping (no copy).

    The mapping is private copy-on-write: a write through it (there should be none) would
    stay in this process and never reach the staged bytes other processes read.
    """
    path = SHM_DIR / shm_name
    with path.open("rb") as file:
        mapping = mmap.mmap(file.fileno(), nbytes, access=mmap.ACCESS_COPY)
    return mapping, torch.frombuffer(mapping, dtype=torch.uint8)


class Staging:
    """One contiguous host buffer holding a whole version.

    >>> staging = Staging(receivers=[receiver])  # doctest: +SKIP
    >>> staging.prepare(manifest)  # doctest: +SKIP
    >>> staging.tensor(manifest.tensors[0])  # a view, no copy  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        receivers: Sequence[BulkReceiver],
        pin_memory: bool | None = None,
        shm_name: str | None = None,
    ) -> None:
        self.receivers = list(receivers)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.shm_name = shm_name
        self.buffer = torch.empty(0, dtype=torch.uint8)
        self.region_offsets: list[int] = []
        self._mapping: mmap.mmap | None = None

    @property
    def region(self) -> Region:
        return Region(self.buffer.data_ptr(), self.buffer.numel())

    def prepare(self, manifest: Manifest) -> None:
        """Lay out `manifest`'s regions; grow (and re-register) the buffer only if needed."""
        self.region_offsets, needed = region_offsets(manifest)
        if needed <= self.buffer.numel():
            return
        if self.buffer.numel():
            for receiver in self.receivers:
                receiver.unregister(self.region)
        self.buffer = self._allocate(needed)
        for receiver in self.receivers:
            receiver.register(self.region)
        logger.info(
            "allocated staging bytes=%d pinned=%s shm=%s", needed, self.pin_memory, self.shm_name
        )

    def _allocate(self, nbytes: int) -> torch.Tensor:
        if self.shm_name is None:
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin_memory)
        self._release_mapping()
        path = SHM_DIR / self.shm_name
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, nbytes)
            self._mapping = mmap.mmap(fd, nbytes)
        finally:
            os.close(fd)
        return torch.frombuffer(self._mapping, dtype=torch.uint8)

    def address(self, region: int, offset: int) -> int:
        return self.buffer.data_ptr() + self.region_offsets[region] + offset

    def bytes_of(self, region: int, offset: int, nbytes: int) -> torch.Tensor:
        start = self.region_offsets[region] + offset
        return self.buffer[start : start + nbytes]

    def tensor(self, spec: TensorSpec) -> torch.Tensor:
        """A view of a staged tensor with its dtype and shape."""
        raw = self.bytes_of(spec.region, spec.offset, spec.nbytes)
        return raw.view(torch_dtype(spec.dtype)).view(spec.shape)

    def _release_mapping(self) -> None:
        self.buffer = torch.empty(0, dtype=torch.uint8)
        if self._mapping is not None:
            try:
                self._mapping.close()
            except BufferError:
                logger.debug("staging mapping still viewed; the OS frees it with the last view")
            self._mapping = None

    def close(self) -> None:
        if self.buffer.numel():
            for receiver in self.receivers:
                receiver.unregister(self.region)
        self._release_mapping()
        if self.shm_name is not None:
            (SHM_DIR / self.shm_name).unlink(missing_ok=True)
