"""Helpers for the vLLM tests: a broker process, its HTTP view, polling, a free port.

Everything here is synchronous: vLLM's offline engine blocks the calling thread, so the
tests drive it from plain functions and keep asyncio inside our own components.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["BrokerProcess", "free_port", "get_json", "start_broker", "stop", "wait_until"]

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[2]


@dataclass
class BrokerProcess:
    process: subprocess.Popen[bytes]
    endpoint: str
    http: str
    log: Path

    def subscriber(self, model: str) -> dict[str, Any] | None:
        """The broker's /v1/subscribers row for `model` (one subscriber per model here)."""
        rows = get_json(f"{self.http}/v1/subscribers")["subscribers"]
        live = [row for row in rows if row["model"] == model and row["state"] != "gone"]
        return live[0] if live else None


def start_broker(workdir: Path) -> BrokerProcess:
    ready, log = workdir / "broker.json", workdir / "broker.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "weightstream", "broker", "--endpoint", "tcp://127.0.0.1:0",
             "--http-port", "0", "--ready-file", str(ready)],
            stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, "MC_LOG_LEVEL": "ERROR"},
        )  # fmt: skip
    try:
        wait_until(
            lambda: ready.exists() or process.poll() is not None, timeout_s=60, what="broker"
        )
        assert process.poll() is None, log.read_text()
    except BaseException:
        stop(process)
        raise
    info = json.loads(ready.read_text())
    return BrokerProcess(process, info["endpoint"], f"http://127.0.0.1:{info['http_port']}", log)


def stop(process: subprocess.Popen[bytes], *, timeout_s: float = 30) -> int:
    """SIGTERM, then SIGKILL after `timeout_s`; returns the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise


def get_json(url: str, *, timeout_s: float = 10) -> Any:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310  (our URLs)
        return json.loads(response.read())


def post_json(url: str, body: Any, *, timeout_s: float = 60) -> Any:
    request = urllib.request.Request(  # noqa: S310  (our URLs)
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
        return json.loads(response.read())


def wait_until(
    probe: Callable[[], T | None], *, timeout_s: float, what: str, interval_s: float = 0.05
) -> T:
    """Poll `probe` until it returns something truthy; fail with its last value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}: {value!r}")
        time.sleep(interval_s)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
