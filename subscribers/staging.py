"""Host staging memory a subscriber pulls a version into, allocated once and reused.

The staging area mirrors the manifest's regions back to back (each region starting on an
aligned offset). It is registered with the receivers once and grows only when a version is
larger than any before it, so the hot path never allocates or registers memory.

With `shm_name` set, the buffer lives in POSIX shared memory (`/dev/shm/<shm_name>`), so the
node's other processes (say, the workers of a tensor-parallel vLLM engine) map the staged
version instead of fetching it again: one fetch per node.

A region that a same-host publisher offers in shared memory is copied in (and verified) like
any other, except for a swapper that verifies on its device: for it `prepare` takes the
region as `mapped`, and that region's views point straight at the publisher's memory.

    staging: [ region 0 | region 2 ]  own buffer (fetched into)
             region 1 -> publisher's /dev/shm segment (mapped, zero copy; verifies_on_device only)

A shared-memory staging file reserves its space when it is made (`SharedMemoryFull` names the
size and the fix, instead of SIGBUS later); an allocation that fails is a `StagingError`.
"""

from __future__ import annotations

import logging
import mmap
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from schemas.manifest import ALIGNMENT, Manifest, TensorSpec
from streamer.errors import StreamerError
from streamer.transport.base import BulkReceiver, Region
from streamer.transport.shm import SHM_DIR, create_segment
from subscribers.dtypes import torch_dtype

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

__all__ = ["Staging", "StagingError", "map_shared"]

logger = logging.getLogger(__name__)


def _align(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


class StagingError(StreamerError):
    """Staging memory could not be allocated or registered (out of host or pinned memory)."""


def map_shared(
    shm_name: str, nbytes: int, *, shm_dir: Path = SHM_DIR
) -> tuple[mmap.mmap, torch.Tensor]:
    """Map another process's staging; the tensor views the mapping (no copy).

    The mapping is private copy-on-write: a write through it (there should be none) would
    stay in this process and never reach the staged bytes other processes read.
    """
    path = shm_dir / shm_name
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
        shm_dir: Path = SHM_DIR,
    ) -> None:
        """`shm_name` puts the buffer in shared memory, as the file `shm_dir / shm_name`."""
        self.receivers = list(receivers)
        self.shm_dir = Path(shm_dir)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.shm_name = shm_name
        self.buffer = torch.empty(0, dtype=torch.uint8)
        self.region_offsets: list[int] = []
        self._regions: list[torch.Tensor] = []
        self._mapped: set[int] = set()
        self._segments: dict[str, torch.Tensor] = {}
        self._mapping: mmap.mmap | None = None

    @property
    def region(self) -> Region:
        return Region(self.buffer.data_ptr(), self.buffer.numel())

    def prepare(self, manifest: Manifest, mapped: Mapping[int, torch.Tensor] | None = None) -> None:
        """Lay out `manifest`'s regions; grow (and re-register) the buffer only if needed.

        Regions in `mapped` (region index -> host uint8 tensor, e.g. `segment(...)`) are not
        laid out in the buffer: their views are the given tensors.
        """
        mapped = dict(mapped or {})
        offsets: list[int] = []
        cursor = 0
        for index, region in enumerate(manifest.regions):
            offsets.append(cursor)
            if index not in mapped:
                cursor = _align(cursor + region.nbytes)
        self.region_offsets = offsets
        if cursor > self.buffer.numel():
            if self.buffer.numel():
                for receiver in self.receivers:
                    receiver.unregister(self.region)
            self.buffer = self._allocate(cursor)
            for receiver in self.receivers:
                receiver.register(self.region)
            logger.info(
                "allocated staging bytes=%d pinned=%s shm=%s",
                cursor,
                self.pin_memory,
                self.shm_name,
            )
        self._mapped = set(mapped)
        self._regions = [
            mapped[index][: region.nbytes]
            if index in mapped
            else self.buffer[offsets[index] : offsets[index] + region.nbytes]
            for index, region in enumerate(manifest.regions)
        ]

    def segment(self, name: str, mapping: mmap.mmap) -> torch.Tensor:
        """A host tensor over a mapped publisher segment, made once per segment and reused,
        so that its address is stable across versions (register it with CUDA only once)."""
        view = self._segments.get(name)
        if view is None or view.numel() < len(mapping):
            view = torch.frombuffer(mapping, dtype=torch.uint8)
            self._segments[name] = view
        return view

    def is_mapped(self, region: int) -> bool:
        """True if `region` points at a publisher's memory rather than our own buffer."""
        return region in self._mapped

    def region_tensor(self, region: int) -> torch.Tensor:
        """Region `region`'s host bytes (our buffer, or a publisher's mapped segment)."""
        return self._regions[region]

    def _allocate(self, nbytes: int) -> torch.Tensor:
        if self.shm_name is None:
            try:
                return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin_memory)
            except (RuntimeError, MemoryError) as exc:  # torch's out-of-memory, pinned or not
                raise StagingError(
                    f"cannot allocate {nbytes} bytes of staging (pinned={self.pin_memory}): "
                    f"{exc}; free host memory, or run the subscriber where the version fits"
                ) from exc
        self._release_mapping()
        # Reserved up front (SharedMemoryFull with the size and the fix), never SIGBUS later.
        self._mapping = create_segment(self.shm_dir / self.shm_name, nbytes)
        return torch.frombuffer(self._mapping, dtype=torch.uint8)

    def address(self, region: int, offset: int) -> int:
        return int(self._regions[region].data_ptr()) + offset

    def bytes_of(self, region: int, offset: int, nbytes: int) -> torch.Tensor:
        return self._regions[region][offset : offset + nbytes]

    def tensor(self, spec: TensorSpec) -> torch.Tensor:
        """A view of a staged tensor with its dtype and shape."""
        raw = self.bytes_of(spec.region, spec.offset, spec.nbytes)
        return raw.view(torch_dtype(spec.dtype)).view(spec.shape)

    def _release_mapping(self) -> None:
        self.buffer = torch.empty(0, dtype=torch.uint8)
        self._regions = []
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
        self._segments.clear()
        if self.shm_name is not None:
            (self.shm_dir / self.shm_name).unlink(missing_ok=True)
