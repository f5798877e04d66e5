"""Helpers shared by the tests: a broker running in this event loop, and a deadline poll.

    async with run_broker(BrokerConfig(...)) as broker:   # streamer.server.serve in a task
        broker.endpoint, broker.url                       # known once on_ready has fired
    # leaving the block cancels serve(), as SIGTERM does in production

Mooncake TransferEngines start in milliseconds but take 1-2 s each to destroy, so tests
borrow them from one `MooncakeEngines` per session and give them back closed (for both
sides `close()` unregisters every region; the engine itself lives on). One exception: after
a few failed reads of a sender, a receiver refuses that sender's session for about a second,
so a test that makes reads fail borrows a `disposable` sender, which no later test sees.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec

from streamer.config import BrokerConfig, ClientConfig
from streamer.server import serve
from streamer.transport import MooncakeReceiver, MooncakeSender, mooncake_available

__all__ = [
    "MooncakeEngines",
    "RunningBroker",
    "broker_config",
    "client_config",
    "eventually",
    "run_broker",
    "until",
]

T = TypeVar("T")


@dataclass(frozen=True)
class RunningBroker:
    endpoint: str
    http_port: int
    config: BrokerConfig

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def client_config(self, **overrides: float) -> ClientConfig:
        return client_config(self.endpoint, **overrides)


def broker_config(**overrides: object) -> BrokerConfig:
    """A broker on a free loopback port with a free HTTP port."""
    base = BrokerConfig(endpoint="tcp://127.0.0.1:0", http_port=0, heartbeat_interval_s=0.2)
    return msgspec.structs.replace(base, **overrides)


def client_config(endpoint: str, **overrides: float) -> ClientConfig:
    base = ClientConfig(broker=endpoint, request_timeout_s=5.0, heartbeat_interval_s=0.2)
    return msgspec.structs.replace(base, **overrides)


@contextlib.asynccontextmanager
async def run_broker(config: BrokerConfig) -> AsyncIterator[RunningBroker]:
    """Run `serve(config)` until the block ends; fail if it dies before it is ready."""
    ready: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()

    def on_ready(endpoint: str, http_port: int) -> None:
        ready.set_result((endpoint, http_port))

    task = asyncio.create_task(serve(config, on_ready=on_ready), name="test-broker")
    try:
        waiters: list[asyncio.Future[Any]] = [ready, task]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            task.result()  # serve() ended before it was ready: raise its error
            raise AssertionError("serve() returned before it was ready")
        endpoint, http_port = ready.result()
        yield RunningBroker(endpoint=endpoint, http_port=http_port, config=config)
    finally:
        task.cancel()
        [outcome] = await asyncio.gather(task, return_exceptions=True)
        ready.cancel()
        if isinstance(outcome, Exception):
            raise outcome


async def eventually(
    probe: Callable[[], Awaitable[T | None]], *, timeout_s: float = 5.0, interval_s: float = 0.01
) -> T:
    """Await `probe()` until it gives something truthy, and return that; fail at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s (last value: {value!r})")
        await asyncio.sleep(interval_s)


async def until(predicate: Callable[[], object], *, timeout_s: float = 5.0) -> None:
    """Poll a plain condition (one that something else in this loop will make true)."""

    async def probe() -> bool:
        return bool(predicate())

    await eventually(probe, timeout_s=timeout_s)


class MooncakeEngines:
    """Senders and receivers on loopback tcp, lent out and taken back (see the module doc)."""

    def __init__(self) -> None:
        self._senders: list[MooncakeSender] = []
        self._receivers: list[MooncakeReceiver] = []
        self._lent: list[MooncakeSender | MooncakeReceiver] = []
        self._disposable: list[MooncakeSender] = []

    @staticmethod
    def available() -> bool:
        return mooncake_available()

    def sender(self, *, disposable: bool = False) -> MooncakeSender:
        """A sender; `disposable` for one this test will make reads of fail."""
        if disposable:
            sender = MooncakeSender(host="127.0.0.1")
            self._disposable.append(sender)
            return sender
        sender = self._senders.pop() if self._senders else MooncakeSender(host="127.0.0.1")
        self._lent.append(sender)
        return sender

    def receiver(self) -> MooncakeReceiver:
        receiver = self._receivers.pop() if self._receivers else MooncakeReceiver(host="127.0.0.1")
        self._lent.append(receiver)
        return receiver

    def take_back(self) -> None:
        """Close everything lent since the last call; keep all but the disposable senders."""
        for engine in self._lent:
            engine.close()
            if isinstance(engine, MooncakeSender):
                self._senders.append(engine)
            else:
                self._receivers.append(engine)
        self._lent.clear()
        for sender in self._disposable:
            sender.close()
        self._disposable.clear()  # destroyed with the last reference: about a second each
