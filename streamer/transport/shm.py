"""Node-local transport: regions in POSIX shared memory, mapped by same-host subscribers.

A publisher that allocates its regions under /dev/shm offers a `ShmLocator` beside its network
locators. A subscriber on the same machine maps the segment instead of fetching it: its staging
then points straight at the publisher's memory (zero copy on a CPU, one host-to-device copy on
a GPU), and the segment stays mapped across versions because publishers reuse their buffers.
The lease a subscriber holds while it reads is what keeps the publisher from reusing them early.

`fetch` (a plain copy out of the mapping) is there for callers that want their own copy.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import socket
import threading
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from schemas.manifest import Locator, ShmLocator
from streamer.errors import TransportError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from streamer.transport.base import Fetch, Region

__all__ = ["SHM_DIR", "ShmReceiver", "ShmSender", "host_id"]

logger = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")  # noqa: S108 - POSIX shared memory, names chosen by the publisher


@cache
def host_id() -> str:
    """This machine: hostname plus boot id (a container sharing the host's /dev/shm agrees)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = "unknown-boot"
    return f"{socket.gethostname()}/{boot}"


class ShmSender:
    """Offers regions that live in shared memory; `name_of(address)` says which segment."""

    def __init__(self, name_of: Callable[[int], str | None]) -> None:
        self._name_of = name_of

    def expose(self, regions: Sequence[Region]) -> list[Locator]:
        locators: list[Locator] = []
        for region in regions:
            name = self._name_of(region.address)
            if name is None:
                raise ValueError(f"region at {region.address:#x} is not in shared memory")
            locators.append(ShmLocator(host=host_id(), name=name, nbytes=region.nbytes))
        return locators

    def retract(self, regions: Sequence[Region]) -> None:
        """Nothing to do: the segment goes away with the publisher's buffer."""

    def close(self) -> None:
        """Nothing to close."""


class ShmReceiver:
    """Maps same-host publishers' segments (read-only use, private copy-on-write mapping)."""

    def __init__(self) -> None:
        self._mappings: dict[str, mmap.mmap] = {}
        self._lock = threading.Lock()

    def accepts(self, locator: Locator) -> bool:
        return (
            isinstance(locator, ShmLocator)
            and locator.host == host_id()
            and (SHM_DIR / locator.name).exists()
        )

    def mapping(self, locator: ShmLocator) -> mmap.mmap:
        """The segment mapped into this process, once; stays valid until `close`."""
        with self._lock:
            mapped = self._mappings.get(locator.name)
            if mapped is not None and len(mapped) >= locator.nbytes:
                return mapped
            try:
                with (SHM_DIR / locator.name).open("rb") as file:
                    mapped = mmap.mmap(file.fileno(), locator.nbytes, access=mmap.ACCESS_COPY)
            except (OSError, ValueError) as exc:
                raise TransportError(
                    f"cannot map shared memory {locator.name!r} ({exc}); is the publisher alive?"
                ) from exc
            self._mappings[locator.name] = mapped
            return mapped

    def register(self, region: Region) -> None:
        """Nothing to register."""

    def unregister(self, region: Region) -> None:
        """Nothing to unregister."""

    def fetch(self, fetches: Sequence[Fetch]) -> None:
        for fetch in fetches:
            if not isinstance(fetch.locator, ShmLocator):
                raise TypeError(f"ShmReceiver cannot read {type(fetch.locator).__name__}")
            if fetch.offset + fetch.nbytes > fetch.locator.nbytes:
                raise TransportError(f"range past the end of {fetch.locator.name!r}")
            mapped = self.mapping(fetch.locator)
            source = ctypes.addressof(ctypes.c_char.from_buffer(mapped)) + fetch.offset
            ctypes.memmove(fetch.address, source, fetch.nbytes)

    def close(self) -> None:
        with self._lock:
            for mapped in self._mappings.values():
                try:
                    mapped.close()
                except BufferError:
                    logger.debug("a mapping is still viewed; the OS unmaps it with the last view")
            self._mappings.clear()
