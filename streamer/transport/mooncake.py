"""Bulk transport over mooncake-transfer-engine: one-sided reads of registered memory.

The publisher registers its regions with a `TransferEngine` and hands out
`MooncakeLocator(session="host:rpc_port", address)`; a subscriber's engine reads ranges of
them straight into its own registered staging memory (`batch_transfer_sync_read`), with no
code running on the publisher's side per read. Protocol `rdma` on clusters with RDMA NICs,
`tcp` elsewhere (loopback, network namespaces, our CI).

Mooncake reports failures as return codes; they become `TransportError` here, once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from schemas.manifest import Locator, MooncakeLocator
from streamer.errors import TransportError

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from streamer.transport.base import Fetch, Region

__all__ = ["MooncakeReceiver", "MooncakeSender", "mooncake_available"]

logger = logging.getLogger(__name__)


def mooncake_available() -> bool:
    """True if `mooncake.engine` imports (it needs the `libibverbs1` system package)."""
    try:
        import mooncake.engine  # noqa: F401
    except ImportError:
        return False
    return True


_START_LOCK = threading.Lock()


@contextlib.contextmanager
def _quiet_start() -> Iterator[None]:
    """At MC_LOG_LEVEL=ERROR (the CLI's default), hide what a healthy start writes to stderr.

    Even at ERROR, mooncake's glog prints "Logging before InitGoogleLogging()" and an E-level
    "Local segment descriptor not found" on every healthy start (the engine has no segment
    before its first registration). fd 2 points at /dev/null for the initialize call only; a
    failed start still raises TransportError with mooncake's return code. Any other level
    (TRACE, INFO, WARNING) shows everything.
    """
    if os.environ.get("MC_LOG_LEVEL", "").upper() != "ERROR":
        yield
        return
    with _START_LOCK:
        saved = os.dup(2)
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(null, 2)
            finally:
                os.close(null)
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _start_engine(host: str, protocol: str, device: str) -> Any:
    try:
        from mooncake.engine import TransferEngine
    except ImportError as exc:
        raise TransportError(
            "mooncake-transfer-engine is not importable; install it (and the Debian package "
            f"libibverbs1), or choose the zmq transport ({exc})"
        ) from exc
    engine = TransferEngine()
    with _quiet_start():
        rc = engine.initialize(host, "P2PHANDSHAKE", protocol, device)
    if rc != 0:
        raise TransportError(
            f"mooncake TransferEngine.initialize({host!r}, protocol={protocol!r}) returned {rc}"
        )
    return engine


class _Engine:
    def __init__(self, host: str, protocol: str, device: str) -> None:
        self.host = host
        self.protocol = protocol
        self.engine = _start_engine(host, protocol, device)
        self.session = f"{host}:{self.engine.get_rpc_port()}"
        self._registered: dict[int, int] = {}
        self._lock = threading.Lock()

    def register(self, region: Region) -> None:
        with self._lock:
            if self._registered.get(region.address) == region.nbytes:
                return
            rc = self.engine.register_memory(region.address, region.nbytes)
            if rc != 0:
                raise TransportError(
                    f"mooncake register_memory of {region.nbytes} bytes returned {rc}"
                )
            self._registered[region.address] = region.nbytes

    def unregister(self, region: Region) -> None:
        with self._lock:
            if self._registered.pop(region.address, None) is not None:
                self.engine.unregister_memory(region.address)

    def close(self) -> None:
        with self._lock:
            for address in list(self._registered):
                self.engine.unregister_memory(address)
            self._registered.clear()


class MooncakeSender:
    """Registers a publisher's regions; readers need nothing else from it.

    >>> sender = MooncakeSender(host="127.0.0.1")  # doctest: +SKIP
    >>> [locator] = sender.expose([Region(address, nbytes)])  # doctest: +SKIP
    """

    def __init__(self, *, host: str = "127.0.0.1", protocol: str = "tcp", device: str = "") -> None:
        self._engine = _Engine(host, protocol, device)

    @property
    def session(self) -> str:
        return self._engine.session

    def expose(self, regions: Sequence[Region]) -> list[Locator]:
        locators: list[Locator] = []
        for region in regions:
            self._engine.register(region)
            locators.append(
                MooncakeLocator(
                    session=self._engine.session,
                    address=region.address,
                    protocol=self._engine.protocol,
                )
            )
        return locators

    def retract(self, regions: Sequence[Region]) -> None:
        for region in regions:
            self._engine.unregister(region)

    def close(self) -> None:
        self._engine.close()


class MooncakeReceiver:
    """Reads ranges of remote registered memory into local registered memory."""

    def __init__(self, *, host: str = "127.0.0.1", protocol: str = "tcp", device: str = "") -> None:
        self._engine = _Engine(host, protocol, device)

    def accepts(self, locator: Locator) -> bool:
        return isinstance(locator, MooncakeLocator) and locator.protocol == self._engine.protocol

    def register(self, region: Region) -> None:
        self._engine.register(region)

    def unregister(self, region: Region) -> None:
        self._engine.unregister(region)

    def fetch(self, fetches: Sequence[Fetch]) -> None:
        by_session: dict[str, list[Fetch]] = defaultdict(list)
        for fetch in fetches:
            if not isinstance(fetch.locator, MooncakeLocator):
                raise TypeError(f"MooncakeReceiver cannot read {type(fetch.locator).__name__}")
            by_session[fetch.locator.session].append(fetch)
        for session, group in by_session.items():
            rc = self._engine.engine.batch_transfer_sync_read(
                session,
                [fetch.address for fetch in group],
                [fetch.locator.address + fetch.offset for fetch in group],  # type: ignore[union-attr]
                [fetch.nbytes for fetch in group],
            )
            if rc != 0:
                total = sum(fetch.nbytes for fetch in group)
                raise TransportError(
                    f"mooncake read of {total} bytes in {len(group)} ranges from {session} "
                    f"returned {rc} (publisher gone, or the version was retired)"
                )

    def close(self) -> None:
        self._engine.close()
