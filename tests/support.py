"""Helpers shared by the tests: a broker running in this event loop, and a deadline poll.

Security is on: `broker_config()` gives the broker CURVE keys and an allowlist, and
`client_config()` the key `peer` (publisher and subscriber of every model), all made once per
session by `test_keys()` (see `ALLOWLIST` for the other names tests may use).

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
import atexit
import contextlib
import functools
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import zmq

from streamer.auth import Grant, create_keys, load_keys, load_public_key, render_grants
from streamer.config import BrokerConfig, ClientConfig
from streamer.server import serve
from streamer.transport import MooncakeReceiver, MooncakeSender, mooncake_available

__all__ = [
    "ALLOWLIST",
    "Keys",
    "MooncakeEngines",
    "RunningBroker",
    "broker_config",
    "client_config",
    "eventually",
    "run_broker",
    "test_keys",
    "until",
]

T = TypeVar("T")

ALLOWLIST: dict[str, dict[str, Any]] = {
    "peer": {"publish": ["*"], "subscribe": ["*"]},
    "admin": {"admin": True},
    "trainer": {"publish": ["policy"]},
    "rival": {"publish": ["policy"]},
    "engine": {"subscribe": ["policy"]},
    "other": {"publish": ["other"], "subscribe": ["other"]},
    "mallory": {},
}
"""The keys of the test allowlist and their rights; `stranger` has a key but is not listed."""


@dataclass(frozen=True)
class Keys:
    """The session's CURVE keys: the broker's, one per ALLOWLIST name, and `stranger`."""

    directory: Path

    @property
    def broker_key_file(self) -> str:
        return str(self.directory / "broker.key_secret")

    @property
    def broker_public_file(self) -> str:
        return str(self.directory / "broker.key")

    @property
    def allowlist_file(self) -> str:
        return str(self.directory / "allowlist.toml")

    def key_file(self, name: str = "peer") -> str:
        return str(self.directory / f"{name}.key_secret")

    def env(self, name: str = "peer") -> dict[str, str]:
        """What the CLI reads to use key `name` (`weightstream publish|subscribe|admin`)."""
        return {
            "WEIGHTSTREAM_KEY_FILE": self.key_file(name),
            "WEIGHTSTREAM_BROKER_KEY_FILE": self.broker_public_file,
        }

    def apply(self, socket: zmq.Socket[Any], name: str = "peer") -> None:
        """Make a bare socket a CURVE client of the test broker with key `name`."""
        keys = load_keys(self.key_file(name))
        socket.curve_secretkey = keys.secret
        socket.curve_publickey = keys.public
        socket.curve_serverkey = load_public_key(self.broker_public_file)

    def args(self, name: str = "peer") -> list[str]:
        return ["--key-file", self.key_file(name), "--broker-key-file", self.broker_public_file]


@functools.cache
def test_keys() -> Keys:
    """Made once per test session (in a temporary directory removed at exit)."""
    directory = Path(tempfile.mkdtemp(prefix="weightstream-keys-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    create_keys("broker", directory)
    create_keys("stranger", directory)
    grants = [
        Grant(
            name=name,
            public_key=load_public_key(create_keys(name, directory)[0]).decode(),
            **rights,
        )
        for name, rights in ALLOWLIST.items()
    ]
    (directory / "allowlist.toml").write_text(render_grants(grants))
    return Keys(directory)


test_keys.__test__ = False  # type: ignore[attr-defined]  # not a test, whatever its name


@dataclass(frozen=True)
class RunningBroker:
    endpoint: str
    http_port: int
    config: BrokerConfig

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def client_config(self, *, key: str | None = "peer", **overrides: float) -> ClientConfig:
        if self.config.key_file is None:
            key = None  # a broker started without keys
        return client_config(self.endpoint, key=key, **overrides)


def broker_config(**overrides: object) -> BrokerConfig:
    """A broker on a free loopback port with a free HTTP port, CURVE keys and the test
    allowlist (pass `key_file=None, allowlist_file=None` for one without)."""
    keys = test_keys()
    base = BrokerConfig(
        endpoint="tcp://127.0.0.1:0",
        http_port=0,
        heartbeat_interval_s=0.2,
        key_file=keys.broker_key_file,
        allowlist_file=keys.allowlist_file,
    )
    return msgspec.structs.replace(base, **overrides)


def client_config(endpoint: str, *, key: str | None = "peer", **overrides: float) -> ClientConfig:
    """A client of `endpoint` with the test key `key` (None: no key, for a broker without)."""
    keys = test_keys()
    base = ClientConfig(
        broker=endpoint,
        request_timeout_s=5.0,
        heartbeat_interval_s=0.2,
        key_file=keys.key_file(key) if key else None,
        broker_key_file=keys.broker_public_file if key else None,
    )
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
