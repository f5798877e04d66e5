"""Host memory that a GPU stage copies from: each region's bytes, registered with CUDA once.

    manifest region k ──(mapped from a same-host publisher?)── yes: our own shared mapping of
          │                                                          its /dev/shm segment
          └── no: the subscriber's staging buffer (Staging.region_tensor)
    each buffer (whole segment / whole staging buffer) ── cudaHostRegister once, kept while used

Registering costs ~0.05-0.3 s per GiB, so it happens the first time a buffer is seen and never
per version: publishers reuse their buffers, so their addresses are stable.
"""

from __future__ import annotations

import logging
import mmap
import os
import time
from typing import TYPE_CHECKING

import torch

from gpu.host import HostRegisterError, HostRegistration
from schemas.manifest import ShmLocator
from streamer.transport.shm import SHM_DIR

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from schemas.manifest import Manifest
    from subscribers.staging import Staging

__all__ = ["HostPins"]

logger = logging.getLogger(__name__)


class HostPins:
    """The host side of `stage`: each region's bytes as a pinned 1-D uint8 tensor, pinned once.

    A region the subscriber's staging maps from a same-host publisher (a `ShmLocator`) is read
    through a shared mapping of the segment made here, not through staging's private
    (copy-on-write) one: pinning private pages for DMA may give this process a snapshot that
    the publisher's next version never reaches, while pinned shared pages are the publisher's
    own. Every other region is read from staging's buffer. A buffer is registered through its
    whole storage (one segment, or the staging buffer), so neighbouring regions never register
    the same page twice; memory torch already pinned is left alone. A buffer unused for
    `keep_rounds` calls of `sources` is dropped (the publisher stopped using it); while it is
    kept, its address cannot be reused.

    >>> pins = HostPins()
    >>> pins.pin([torch.zeros(8, dtype=torch.uint8)])  # on a machine without CUDA: nothing to do
    0.0
    """

    def __init__(self, *, keep_rounds: int = 8) -> None:
        self.keep_rounds = keep_rounds
        self.registered_bytes = 0
        self._pins: dict[tuple[int, int], tuple[HostRegistration | None, int]] = {}
        self._segments: dict[str, tuple[torch.Tensor, int]] = {}
        self._round = 0

    def sources(
        self, manifest: Manifest, staging: Staging, *, register: bool = True
    ) -> tuple[list[torch.Tensor], float]:
        """Each region's host bytes (pinned if `register`); and the seconds spent registering."""
        hosts = [self._source(manifest, staging, index) for index in range(len(manifest.regions))]
        return hosts, self.pin(hosts) if register else 0.0

    def pin(self, hosts: Sequence[torch.Tensor]) -> float:
        """Register every buffer under `hosts` not registered yet; returns the seconds it took."""
        self._round += 1
        for name, (_view, last) in list(self._segments.items()):
            if self._round - last > self.keep_rounds:
                del self._segments[name]  # unmapped once its registration lets go of it too
        if not torch.cuda.is_available():
            return 0.0
        started = time.perf_counter()
        spent = False
        for host in hosts:
            if not host.numel():
                continue
            whole = _whole_storage(host)
            key = (whole.data_ptr(), whole.numel())
            if key in self._pins:
                self._pins[key] = (self._pins[key][0], self._round)
                continue
            spent = True
            self._pins[key] = (self._register(whole), self._round)
        for key, (registration, last) in list(self._pins.items()):
            if self._round - last >= self.keep_rounds:
                del self._pins[key]
                if registration is not None:
                    self.registered_bytes -= registration.nbytes
                    registration.close()
        return time.perf_counter() - started if spent else 0.0

    def _source(self, manifest: Manifest, staging: Staging, index: int) -> torch.Tensor:
        region = manifest.regions[index]
        is_mapped: Callable[[int], bool] | None = getattr(staging, "is_mapped", None)
        if is_mapped is not None and is_mapped(index):
            for locator in region.locators:
                if isinstance(locator, ShmLocator):
                    shared = self._shared(locator)
                    if shared is not None:
                        return shared[: region.nbytes]
        region_tensor: Callable[[int], torch.Tensor] | None = getattr(
            staging, "region_tensor", None
        )
        if region_tensor is not None:
            return region_tensor(index)[: region.nbytes]
        return staging.bytes_of(index, 0, region.nbytes)

    def _shared(self, locator: ShmLocator) -> torch.Tensor | None:
        """The segment mapped shared (never written here), once; None if we may not."""
        known = self._segments.get(locator.name)
        if known is not None and known[0].numel() >= locator.nbytes:
            self._segments[locator.name] = (known[0], self._round + 1)
            return known[0]
        try:
            fd = os.open(SHM_DIR / locator.name, os.O_RDWR)
        except OSError:
            logger.debug("cannot open segment %s read-write; using staging's mapping", locator.name)
            return None
        try:
            mapping = mmap.mmap(fd, max(locator.nbytes, 1))
        finally:
            os.close(fd)
        view = torch.frombuffer(mapping, dtype=torch.uint8)
        self._segments[locator.name] = (view, self._round + 1)
        return view

    def _register(self, whole: torch.Tensor) -> HostRegistration | None:
        if whole.is_pinned():
            return None  # torch's pinned allocator, or registered by someone else
        started = time.perf_counter()
        try:
            registration = HostRegistration(whole, read_only=True)
        except HostRegisterError:
            # Writable pinning would break copy-on-write of a private mapping (a stale
            # snapshot); only our own shared mappings and torch's buffers get here, but be sure.
            if whole.data_ptr() not in {v.data_ptr() for v, _ in self._segments.values()}:
                logger.warning(
                    "cannot register host buffer bytes=%d read-only: copies from it are slow",
                    whole.numel(),
                )
                return None
            try:
                registration = HostRegistration(whole)
            except HostRegisterError:
                logger.warning(
                    "cannot register host buffer bytes=%d: copies from it are slow",
                    whole.numel(),
                    exc_info=True,
                )
                return None
        self.registered_bytes += registration.nbytes
        logger.info(
            "registered host buffer bytes=%d seconds=%.3f",
            registration.nbytes,
            time.perf_counter() - started,
        )
        return registration

    def close(self) -> None:
        for registration, _ in self._pins.values():
            if registration is not None:
                registration.close()
        self._pins.clear()
        self._segments.clear()
        self.registered_bytes = 0


def _whole_storage(host: torch.Tensor) -> torch.Tensor:
    """A 1-D uint8 tensor over all of `host`'s storage (the whole mapping or buffer)."""
    storage = host.untyped_storage()
    return torch.empty(0, dtype=torch.uint8).set_(storage)
