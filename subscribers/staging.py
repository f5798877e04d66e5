"""Host staging memory a subscriber pulls a version into, allocated once and reused.

The staging area mirrors the manifest's regions back to back (each region starting on an
aligned offset). It is registered with the receivers once and grows only when a version is
larger than any before it, so the hot path never allocates or registers memory.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from schemas.manifest import ALIGNMENT, Manifest, TensorSpec
from streamer.transport.base import BulkReceiver, Region
from subscribers.dtypes import torch_dtype

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["Staging"]

logger = logging.getLogger(__name__)


def _align(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


class Staging:
    """One contiguous host buffer holding a whole version.

    >>> staging = Staging(receivers=[receiver])  # doctest: +SKIP
    >>> staging.prepare(manifest)  # doctest: +SKIP
    >>> staging.tensor(manifest.tensors[0])  # a view, no copy  # doctest: +SKIP
    """

    def __init__(
        self, *, receivers: Sequence[BulkReceiver], pin_memory: bool | None = None
    ) -> None:
        self.receivers = list(receivers)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.buffer = torch.empty(0, dtype=torch.uint8)
        self.region_offsets: list[int] = []

    @property
    def region(self) -> Region:
        return Region(self.buffer.data_ptr(), self.buffer.numel())

    def prepare(self, manifest: Manifest) -> None:
        """Lay out `manifest`'s regions; grow (and re-register) the buffer only if needed."""
        offsets: list[int] = []
        cursor = 0
        for region in manifest.regions:
            offsets.append(cursor)
            cursor = _align(cursor + region.nbytes)
        self.region_offsets = offsets
        if cursor > self.buffer.numel():
            if self.buffer.numel():
                for receiver in self.receivers:
                    receiver.unregister(self.region)
            self.buffer = torch.empty(cursor, dtype=torch.uint8, pin_memory=self.pin_memory)
            for receiver in self.receivers:
                receiver.register(self.region)
            logger.info("allocated staging bytes=%d pinned=%s", cursor, self.pin_memory)

    def address(self, region: int, offset: int) -> int:
        return self.buffer.data_ptr() + self.region_offsets[region] + offset

    def bytes_of(self, region: int, offset: int, nbytes: int) -> torch.Tensor:
        start = self.region_offsets[region] + offset
        return self.buffer[start : start + nbytes]

    def tensor(self, spec: TensorSpec) -> torch.Tensor:
        """A view of a staged tensor with its dtype and shape."""
        raw = self.bytes_of(spec.region, spec.offset, spec.nbytes)
        return raw.view(torch_dtype(spec.dtype)).view(spec.shape)

    def close(self) -> None:
        if self.buffer.numel():
            for receiver in self.receivers:
                receiver.unregister(self.region)
        self.buffer = torch.empty(0, dtype=torch.uint8)
