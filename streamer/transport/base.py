"""The seams of the bulk data path: what publishers and subscribers need from a transport.

Transports move raw byte ranges between registered memory and never see tensors: a `Region`
is an address and a length. A publisher `expose`s its regions and gets a `Locator` for each;
a subscriber `fetch`es (locator, offset, nbytes) ranges into its own registered memory.

Implementations do not inherit from these Protocols; one conformance suite
(`tests/streamer/test_transport.py`) runs against each of them.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, NamedTuple, Protocol

from streamer.errors import TransportError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from schemas.manifest import Locator

__all__ = ["BulkReceiver", "BulkSender", "Fetch", "FetchTimeout", "Region", "seconds_left"]


class FetchTimeout(TransportError, TimeoutError):
    """A fetch did not complete by its deadline (a frozen or overloaded publisher)."""


def seconds_left(deadline: float | None, default_s: float) -> float:
    """Seconds until `deadline` (a `time.monotonic()` value), at most `default_s`, never < 0."""
    if deadline is None:
        return default_s
    return max(0.0, min(default_s, deadline - time.monotonic()))


class Region(NamedTuple):
    """A range of host memory: ``Region(address, nbytes)``."""

    address: int
    nbytes: int


class Fetch(NamedTuple):
    """Read ``nbytes`` at ``offset`` of the remote region at ``locator`` into ``address``."""

    locator: Locator
    offset: int
    nbytes: int
    address: int


class BulkSender(Protocol):
    """What a publisher needs from a bulk path: make regions readable, say where they are.

    >>> locators = sender.expose([Region(buf_address, buf_nbytes)])  # doctest: +SKIP
    """

    def expose(self, regions: Sequence[Region]) -> list[Locator]: ...

    def retract(self, regions: Sequence[Region]) -> None: ...

    def close(self) -> None: ...


class BulkReceiver(Protocol):
    """What a subscriber needs: pull ranges of remote regions into local memory.

    `register` makes local memory a valid destination (done once per buffer, not per fetch).
    `fetch` blocks until every range has landed, or raises `TransportError`; callers run it
    in a thread (`asyncio.to_thread`). With a `deadline` (a `time.monotonic()` value) it
    raises `FetchTimeout` once the deadline passes, and no write of that fetch lands in local
    memory afterwards unless the receiver says otherwise: a read it cannot abandon is waited
    for before the same receiver writes (or unregisters) anything again.
    """

    def accepts(self, locator: Locator) -> bool: ...

    def register(self, region: Region) -> None: ...

    def unregister(self, region: Region) -> None: ...

    def fetch(self, fetches: Sequence[Fetch], *, deadline: float | None = None) -> None: ...

    def close(self) -> None: ...
