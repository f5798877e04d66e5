"""Start and watch real weightstream processes for the end-to-end tests.

Security is on: `start_broker` gives the broker the session's CURVE keys and allowlist
(`tests.support.test_keys`), and every process started here uses the key `peer` through
WEIGHTSTREAM_KEY_FILE (a command's own `--key-file` wins).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import torch
from safetensors.torch import load_file

from publishers.sources import synthetic_llama
from streamer.config import ClientConfig
from tests.support import test_keys

ENV = {**os.environ, "MC_LOG_LEVEL": "ERROR", "PYTHONUNBUFFERED": "1", **test_keys().env()}


@dataclass
class Proc:
    name: str
    process: asyncio.subprocess.Process
    log: Path

    def tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Fleet:
    """Every process a test starts; all are stopped at the end."""

    workdir: Path
    procs: list[Proc] = field(default_factory=list)

    async def start(
        self, name: str, *args: str, prefix: tuple[str, ...] = (), keyless: bool = False
    ) -> Proc:
        """Start `python -m weightstream ARGS`; `keyless`: without the test key (an engine
        behind a node link, which speaks for it with its own key)."""
        log = self.workdir / f"{name}.log"
        env = {k: v for k, v in ENV.items() if k not in test_keys().env()} if keyless else ENV
        with log.open("ab") as out:
            process = await asyncio.create_subprocess_exec(
                *prefix,
                sys.executable,
                "-m",
                "weightstream",
                *args,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
            )
        proc = Proc(name, process, log)
        self.procs.append(proc)
        return proc

    async def stop(self, proc: Proc, *, timeout_s: float = 15) -> int:
        if proc.process.returncode is None:
            proc.process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(timeout_s):
                return await proc.process.wait()
        except TimeoutError:
            proc.process.kill()
            await proc.process.wait()
            raise AssertionError(f"{proc.name} ignored SIGTERM:\n{proc.tail()}") from None

    async def stop_all(self) -> None:
        for proc in reversed(self.procs):
            if proc.process.returncode is None:
                proc.process.kill()
                await proc.process.wait()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.tail()}" for p in self.procs)


@dataclass
class BrokerInfo:
    proc: Proc
    endpoint: str
    http: str
    secure: bool = True

    def client_config(self, key: str = "peer", **overrides: Any) -> ClientConfig:
        """A client of this broker with test key `key` (none if the broker has no keys)."""
        keys = test_keys()
        return ClientConfig(
            broker=self.endpoint,
            key_file=keys.key_file(key) if self.secure else None,
            broker_key_file=keys.broker_public_file if self.secure else None,
            **overrides,
        )


async def start_broker(
    fleet: Fleet, *extra: str, endpoint: str = "tcp://127.0.0.1:0", secure: bool = True
) -> BrokerInfo:
    """A broker process; `secure` (the default) gives it the test keys and allowlist."""
    keys = test_keys()
    security = (
        ["--key-file", keys.broker_key_file, "--allowlist-file", keys.allowlist_file]
        if secure
        else []
    )
    ready = fleet.workdir / f"broker-{len(fleet.procs)}.json"
    proc = await fleet.start(
        "broker",
        "broker",
        "--endpoint",
        endpoint,
        "--http-port",
        "0",
        "--ready-file",
        str(ready),
        "--peer-timeout-s",
        "3",
        *security,
        *extra,
    )
    async with asyncio.timeout(30):
        while not ready.exists():
            assert proc.process.returncode is None, proc.tail()
            await asyncio.sleep(0.05)
    info = json.loads(ready.read_text())
    return BrokerInfo(
        proc, info["endpoint"], f"http://127.0.0.1:{info['http_port']}", secure=secure
    )


def publish_args(
    broker: str,
    *,
    size: int,
    versions: str,
    rank: int = 0,
    world_size: int = 1,
    transport: str = "mooncake",
    job: str | None = "e2e-trainer",
) -> list[str]:
    """`weightstream publish` of the synthetic llama (mooncake tcp by default), 256 KiB buckets;
    every rank of one trainer names the same `job` (None: from WEIGHTSTREAM_JOB, or random)."""
    return [
        "publish",
        "--broker",
        broker,
        "--model",
        "llama",
        "--transport",
        transport,
        "--synthetic",
        str(size),
        "--bucket",
        "256KiB",
        "--versions",
        versions,
        "--rank",
        str(rank),
        "--world-size",
        str(world_size),
        *(["--job", job] if job is not None else []),
    ]


def subscribe_args(broker: str, dump: Path, *, transport: str = "mooncake") -> list[str]:
    """`weightstream subscribe` (mooncake tcp by default), dumping every version it applies."""
    return [
        "subscribe",
        "--broker",
        broker,
        "--model",
        "llama",
        "--transport",
        transport,
        "--dump-dir",
        str(dump),
        "--dump-all",
    ]


async def subscriber_rows(broker: BrokerInfo) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = (await get_json(f"{broker.http}/v1/subscribers"))["subscribers"]
    return rows


def row_of(rows: list[dict[str, Any]], proc: Proc) -> dict[str, Any] | None:
    """The broker's row for the subscriber process `proc` (by its pid), if it has one."""
    mine = [r for r in rows if r["pid"] == proc.process.pid]
    assert len(mine) <= 1, mine
    return mine[0] if mine else None


async def get_text(url: str) -> str:
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as response:
        assert response.status == 200, (url, response.status)
        return await response.text()


def metric(text: str, name: str) -> float:
    """The value of one unlabelled metric in Prometheus text."""
    [line] = [line for line in text.splitlines() if line.startswith(f"{name} ")]
    return float(line.split()[1])


async def get_json(url: str) -> Any:
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as response:
        assert response.status == 200, (url, response.status, await response.text())
        return await response.json()


async def wait_for(
    check: Callable[[], Any],
    *,
    timeout_s: float,
    what: str,
    fleet: Fleet | None = None,
    every_s: float = 0.1,
) -> Any:
    """Poll an async `check` until it returns something truthy."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(every_s)
    logs = fleet.logs() if fleet else ""
    raise AssertionError(f"timed out waiting for {what}; last={last!r}\n{logs}")


async def file_exists(path: Path) -> bool:
    return await asyncio.to_thread(path.exists)


def subscribers_at(rows: list[dict[str, Any]], version: int) -> list[dict[str, Any]]:
    return [r for r in rows if r["state"] != "gone" and r["applied_version"] == version]


_expected: dict[tuple[int, int], dict[str, torch.Tensor]] = {}


def expected(size: int, version: int) -> dict[str, torch.Tensor]:
    key = (size, version)
    if key not in _expected:
        _expected[key] = synthetic_llama(size, version=version)
    return _expected[key]


def assert_dump_equals(path: Path, size: int, version: int) -> None:
    live = load_file(str(path))
    want = expected(size, version)
    assert set(live) == set(want), f"{path}: tensor names differ"
    different = [n for n, t in want.items() if not torch.equal(_bits(live[n]), _bits(t))]
    assert not different, (
        f"{path}: {len(different)} tensors differ from version {version}: {different[:3]}"
    )


def dump_matches(path: Path, size: int, version: int) -> bool:
    """Whether a subscriber's dump holds exactly version `version`'s bytes (for the ledger)."""
    try:
        assert_dump_equals(path, size, version)
    except AssertionError:
        return False
    return True


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(-1).view(torch.uint8)
