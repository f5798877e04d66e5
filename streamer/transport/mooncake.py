"""Bulk transport over mooncake-transfer-engine: one-sided reads of registered memory.

The publisher registers its regions with a `TransferEngine` and hands out
`MooncakeLocator(session="host:rpc_port", address)`; a subscriber's engine reads ranges of
them straight into its own registered staging memory, with no code running on the
publisher's side per read. Protocol `rdma` on clusters with RDMA NICs, `tcp` elsewhere
(loopback, network namespaces, our CI).

Reads are submitted asynchronously (`batch_transfer_async_read`) and polled
(`transfer_check_status`), so a fetch honours its caller's deadline instead of mooncake's own
transfer timeout (`MC_TRANSFER_TIMEOUT`, 30 s by default). mooncake cannot cancel a submitted
read: one given up at a deadline is kept as *abandoned* and waited for (it ends by mooncake's
own timeout at the latest) before this receiver writes into, or unregisters, any memory again.

Mooncake reports failures as return codes; they become `TransportError` here, once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from schemas.manifest import Locator, MooncakeLocator
from streamer.errors import TransportError
from streamer.transport.base import FetchTimeout

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from streamer.transport.base import Fetch, Region

__all__ = ["MooncakeReceiver", "MooncakeSender", "mooncake_available"]

logger = logging.getLogger(__name__)

_DONE, _RUNNING = 1, 0  # transfer_check_status: 1 done, 0 running, -1 failed, -2 timed out
_POLL_S = 0.0005
_POLL_MAX_S = 0.005
SETTLE_S = 35.0
"""How long an abandoned read may still run: mooncake's own transfer timeout (30 s) plus margin."""


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
        self._abandoned: dict[int, tuple[str, list[Fetch]]] = {}
        """Reads given up at a deadline that may still write (at most one batch per fetch thread)."""
        self._lock = threading.Lock()

    @property
    def session(self) -> str:
        """This engine's `host:rpc_port`: others may read the memory registered here (a relay)."""
        return self._engine.session

    @property
    def protocol(self) -> str:
        return self._engine.protocol

    def accepts(self, locator: Locator) -> bool:
        return isinstance(locator, MooncakeLocator) and locator.protocol == self._engine.protocol

    def register(self, region: Region) -> None:
        self._engine.register(region)

    def unregister(self, region: Region) -> None:
        self._settle(time.monotonic() + SETTLE_S)
        self._engine.unregister(region)

    def fetch(self, fetches: Sequence[Fetch], *, deadline: float | None = None) -> None:
        """Read every range, polling until done, failed, or past `deadline` (`FetchTimeout`)."""
        by_session: dict[str, list[Fetch]] = defaultdict(list)
        for fetch in fetches:
            if not isinstance(fetch.locator, MooncakeLocator):
                raise TypeError(f"MooncakeReceiver cannot read {type(fetch.locator).__name__}")
            by_session[fetch.locator.session].append(fetch)
        self._settle(deadline)
        started = time.monotonic()
        running: dict[int, tuple[str, list[Fetch]]] = {}
        try:
            for session, group in by_session.items():
                # One range per batch: transfer_check_status reports a batch's first task only.
                for fetch in group:
                    batch = self._engine.engine.batch_transfer_async_read(
                        session,
                        [fetch.address],
                        [fetch.locator.address + fetch.offset],  # type: ignore[union-attr]
                        [fetch.nbytes],
                    )
                    if batch <= 0:
                        raise TransportError(
                            f"mooncake could not submit a read of {fetch.nbytes} bytes from "
                            f"{session} (returned {batch}): is the publisher alive?"
                        )
                    running[batch] = (session, [fetch])
            self._wait(running, deadline, started)
        finally:
            if running:
                # Given up (deadline, or another batch failed): these may still write.
                with self._lock:
                    self._abandoned.update(running)

    def _wait(
        self, running: dict[int, tuple[str, list[Fetch]]], deadline: float | None, started: float
    ) -> None:
        pause = _POLL_S
        while running:
            for batch in list(running):
                status = self._engine.engine.transfer_check_status(batch)
                if status == _RUNNING:
                    continue
                session, group = running.pop(batch)  # finished: mooncake frees the batch
                if status != _DONE:
                    raise TransportError(
                        f"mooncake read of {_total(group)} bytes in {len(group)} ranges from "
                        f"{session} failed (status {status}: publisher gone, or the version "
                        "was retired)"
                    )
            if not running:
                return
            if deadline is not None and time.monotonic() >= deadline:
                sessions = sorted({session for session, _ in running.values()})
                raise FetchTimeout(
                    f"mooncake read of {sum(_total(g) for _, g in running.values())} bytes from "
                    f"{', '.join(sessions)} not done after {time.monotonic() - started:.1f} s "
                    "(the caller's deadline): the publisher is frozen, overloaded or unreachable; "
                    "check it, or allow more time (pull_timeout_s)"
                )
            time.sleep(pause)
            pause = min(pause * 2, _POLL_MAX_S)

    def _settle(self, deadline: float | None) -> None:
        """Wait for reads abandoned earlier to end, so none writes into memory reused now."""
        with self._lock:
            abandoned = dict(self._abandoned)
            self._abandoned.clear()
        if not abandoned:
            return
        logger.info("waiting for abandoned mooncake reads to end count=%d", len(abandoned))
        limit = time.monotonic() + SETTLE_S
        settle_by = limit if deadline is None else min(limit, deadline)
        while abandoned:
            for batch in list(abandoned):
                if self._engine.engine.transfer_check_status(batch) != _RUNNING:
                    del abandoned[batch]
            if abandoned and time.monotonic() >= settle_by:
                with self._lock:
                    self._abandoned.update(abandoned)
                raise FetchTimeout(
                    f"{len(abandoned)} mooncake reads given up earlier are still in flight into "
                    "this staging; refusing to write over them (they end within mooncake's "
                    "transfer timeout, 30 s by default): try again later"
                )
            if abandoned:
                time.sleep(_POLL_MAX_S)

    def close(self) -> None:
        try:
            self._settle(time.monotonic() + SETTLE_S)
        except FetchTimeout:
            logger.warning("closing with mooncake reads still in flight")
        self._engine.close()


def _total(group: Sequence[Fetch]) -> int:
    return sum(fetch.nbytes for fetch in group)
