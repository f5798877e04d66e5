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
import os
import socket
import threading
from collections import OrderedDict
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from schemas.manifest import Locator, ShmLocator
from streamer.errors import StreamerError, TransportError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from streamer.transport.base import Fetch, Region

__all__ = [
    "SHM_DIR",
    "SharedMemoryFull",
    "ShmReceiver",
    "ShmSender",
    "create_segment",
    "host_id",
]

logger = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")  # noqa: S108 - POSIX shared memory, names chosen by the publisher


class SharedMemoryFull(StreamerError):
    """The shared-memory filesystem has no room for a segment (Docker's default is 64 MiB)."""


def create_segment(path: Path, nbytes: int, *, exclusive: bool = False) -> mmap.mmap:
    """Create (or resize) the file `path` in shared memory with all `nbytes` reserved, mapped.

    The space is reserved up front (`posix_fallocate`): a tmpfs too small for the segment
    fails here with `SharedMemoryFull`, instead of killing the process with SIGBUS at the
    first write to a page the filesystem cannot supply.
    """
    flags = os.O_RDWR | os.O_CREAT | (os.O_EXCL if exclusive else 0)
    size = max(nbytes, 1)
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        raise SharedMemoryFull(f"cannot create shared memory {path}: {exc}") from exc
    try:
        os.ftruncate(fd, size)
        os.posix_fallocate(fd, 0, size)
        return mmap.mmap(fd, size)
    except OSError as exc:
        if exclusive:
            path.unlink(missing_ok=True)  # ours (O_EXCL): do not leave a file nobody can use
        free = _free_bytes(path.parent)
        raise SharedMemoryFull(
            f"{path.parent} has no room for {size} bytes of shared memory ({path.name}; "
            f"{free} bytes free, {exc.strerror}): give it at least {size} bytes more, e.g. "
            f"`docker run --shm-size={_suggest(size)}` (or shm_size in docker-compose), or "
            "choose a network transport instead of shm"
        ) from exc
    finally:
        os.close(fd)


def _free_bytes(directory: Path) -> int:
    try:
        stat = os.statvfs(directory)
    except OSError:
        return -1
    return stat.f_bavail * stat.f_frsize


def _suggest(nbytes: int) -> str:
    """A --shm-size comfortably above `nbytes` (twice, in whole GiB or MiB)."""
    gib = -(-2 * nbytes // 2**30)
    return f"{gib}g" if gib > 1 else f"{-(-2 * nbytes // 2**20)}m"


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
    """Maps same-host publishers' segments (read-only use, private copy-on-write mapping).

    At most `max_mappings` segments stay mapped; the least recently used one is closed to make
    room (a publisher that restarts or grows its buffers offers new segment names).
    """

    def __init__(self, *, max_mappings: int = 64, shm_dir: Path = SHM_DIR) -> None:
        self.shm_dir = shm_dir
        if max_mappings < 1:
            raise ValueError(f"max_mappings must be >= 1, not {max_mappings}")
        self.max_mappings = max_mappings
        self._mappings: OrderedDict[str, mmap.mmap] = OrderedDict()
        self._lock = threading.Lock()

    def accepts(self, locator: Locator) -> bool:
        return (
            isinstance(locator, ShmLocator)
            and locator.host == host_id()
            and (self.shm_dir / locator.name).exists()
        )

    def mapping(self, locator: ShmLocator) -> mmap.mmap:
        """The segment mapped into this process, once; stays valid until `close`."""
        with self._lock:
            mapped = self._mappings.get(locator.name)
            if mapped is not None and len(mapped) >= locator.nbytes:
                self._mappings.move_to_end(locator.name)
                return mapped
            try:
                with (self.shm_dir / locator.name).open("rb") as file:
                    mapped = mmap.mmap(file.fileno(), locator.nbytes, access=mmap.ACCESS_COPY)
            except (OSError, ValueError) as exc:
                raise TransportError(
                    f"cannot map shared memory {locator.name!r} ({exc}); is the publisher alive?"
                ) from exc
            old = self._mappings.pop(locator.name, None)
            if old is not None:
                _close(old)
            self._mappings[locator.name] = mapped
            while len(self._mappings) > self.max_mappings:
                _, evicted = self._mappings.popitem(last=False)
                _close(evicted)
            return mapped

    @property
    def num_mappings(self) -> int:
        return len(self._mappings)

    def register(self, region: Region) -> None:
        """Nothing to register."""

    def unregister(self, region: Region) -> None:
        """Nothing to unregister."""

    def fetch(self, fetches: Sequence[Fetch], *, deadline: float | None = None) -> None:
        """Copy ranges out of the mappings (a memcpy; `deadline` is moot for local memory)."""
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
                _close(mapped)
            self._mappings.clear()


def _close(mapped: mmap.mmap) -> None:
    try:
        mapped.close()
    except BufferError:
        logger.debug("a mapping is still viewed; the OS unmaps it with the last view")
