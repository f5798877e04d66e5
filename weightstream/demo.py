"""`weightstream demo`: the whole loop on one machine, checked bit for bit at the end.

    broker process ── HTTP status ──> this process prints progress and the final table
        ▲      ▲
        │      └── N subscriber processes (`weightstream subscribe`), each keeping a torch model current
        └───────── the trainer (this process) publishes versions 1..V of a synthetic Llama-like model

At the end every subscriber's live tensors (dumped after each swap) must equal the
trainer's last version byte for byte; the demo exits non-zero otherwise.

Security is on, as in production: the demo makes CURVE keys for the broker, the trainer
(publisher of `demo`) and the subscribers (subscribers of `demo`) and an allowlist in its
work directory (`weightstream keys new` and docs/security.md do the same by hand).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import zmq.asyncio

from publishers.publisher import open_publisher
from publishers.sources import synthetic_llama
from streamer.auth import make_local_keys
from streamer.config import ClientConfig
from streamer.server import run_until_signal
from streamer.transport.choice import make_senders
from weightstream.status import fetch_status, render_status

__all__ = ["run_demo"]

logger = logging.getLogger(__name__)

_APPLY_TIMEOUT_S = 300.0
"""How long a version may take to reach every subscriber before the demo gives up."""


def run_demo(*, size: int, versions: int, subscribers: int, transport: list[str]) -> int:
    # The demo prints its own progress; keep the libraries' INFO lines for the log files.
    logging.getLogger().setLevel(logging.WARNING)

    code = run_until_signal(
        _demo(size=size, versions=versions, subscribers=subscribers, transport=transport)
    )
    if code is None:
        print("demo interrupted")
        return 130
    return code


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(  # noqa: S603 - our own module, fixed arguments
            [sys.executable, "-m", "weightstream", *args], stdout=out, stderr=subprocess.STDOUT
        )


async def _wait_for_file(path: Path, process: subprocess.Popen[bytes], timeout_s: float) -> Any:
    async with asyncio.timeout(timeout_s):
        while True:
            with contextlib.suppress(FileNotFoundError):
                return json.loads(await asyncio.to_thread(path.read_text))
            if process.poll() is not None:
                raise RuntimeError(
                    f"the broker exited with code {process.returncode}; see {path.parent}"
                )
            await asyncio.sleep(0.05)


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def _progress_line(version: int, status: dict[str, Any]) -> str:
    parts = []
    for row in status["subscribers"]:
        name = "sub-" + row["peer_id"].split("-")[-1]
        if row["state"] == "gone":
            continue
        if row["applied_version"] is not None and row["applied_version"] >= version:
            parts.append(
                f"{name} applied (pull {row['last_pull_s']:.2f}s, pause {row['last_pause_s'] * 1e3:.0f}ms)"
            )
        elif row["progress"] is not None:
            parts.append(
                f"{name} {row['progress'] * 100:3.0f}% {row['bytes_per_s'] / 1e9:.2f} GB/s"
            )
        else:
            parts.append(f"{name} waiting")
    return f"  v{version}: " + " | ".join(parts)


async def _demo(*, size: int, versions: int, subscribers: int, transport: list[str]) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="weightstream-demo-"))
    keep = False  # a failed run (a timeout, a version that differs) keeps its logs
    processes: list[subprocess.Popen[bytes]] = []
    ctx = zmq.asyncio.Context()
    print(
        f"weightstream demo: {subscribers} subscribers, {versions} versions of a {size / 1e6:.0f} MB "
        f"synthetic Llama-like model; logs in {workdir}"
    )
    try:
        keys = make_local_keys(workdir / "keys", model="demo")
        broker = _spawn(
            [
                "broker",
                "--key-file",
                str(keys["broker"]),
                "--allowlist-file",
                str(keys["allowlist"]),
                "--endpoint",
                "tcp://127.0.0.1:0",
                "--http-port",
                "0",
                "--ready-file",
                str(workdir / "broker.json"),
            ],
            workdir / "broker.log",
        )
        processes.append(broker)
        ready = await _wait_for_file(workdir / "broker.json", broker, timeout_s=30)
        endpoint, http = ready["endpoint"], f"http://127.0.0.1:{ready['http_port']}"
        print(f"broker at {endpoint} (CURVE keys, allowlist {keys['allowlist']}), status at {http}")
        common = [
            "--broker",
            endpoint,
            "--model",
            "demo",
            "--transport",
            ",".join(transport),
            "--key-file",
            str(keys["subscriber"]),
            "--broker-key-file",
            str(keys["broker.public"]),
        ]
        processes.extend(
            _spawn(
                [
                    "subscribe",
                    *common,
                    # Each subscriber dumps every version it applies and runs until the demo
                    # stops it: one that exited on its own after the last version could be
                    # gone before the trainer's wait for it reached the broker (which counts
                    # live subscribers), and the demo would wait for nobody.
                    "--dump-dir",
                    str(workdir / f"subscriber-{index}"),
                ],
                workdir / f"subscriber-{index}.log",
            )
            for index in range(subscribers)
        )
        config = ClientConfig(
            broker=endpoint,
            key_file=str(keys["trainer"]),
            broker_key_file=str(keys["broker.public"]),
        )
        tensors: dict[str, torch.Tensor] = {}
        senders, node_local = make_senders(transport, host="127.0.0.1")
        async with open_publisher(
            config, model="demo", sender=senders, node_local=node_local, context=ctx
        ) as publisher:
            for version in range(1, versions + 1):
                tensors = await asyncio.to_thread(synthetic_llama, size, version=version)
                result = await publisher.publish(version, tensors)
                print(f"published v{version} in {result.seconds:.2f}s")
                started = time.perf_counter()
                wait = asyncio.create_task(publisher.wait_applied(version, subscribers))
                shown = ""
                try:
                    async with asyncio.timeout(_APPLY_TIMEOUT_S):
                        while not wait.done():
                            await asyncio.wait({wait}, timeout=0.25)
                            line = _progress_line(version, await fetch_status(http))
                            if line != shown:
                                print(line)
                                shown = line
                        await wait
                except TimeoutError:
                    keep = True
                    raise TimeoutError(
                        f"version {version} did not reach all {subscribers} subscribers within "
                        f"{_APPLY_TIMEOUT_S:.0f} s (last status: {shown.strip() or 'none'}); "
                        f"the processes' logs are kept in {workdir}"
                    ) from None
                print(
                    f"  v{version} on all {subscribers} subscribers {time.perf_counter() - started:.2f}s after publishing"
                )
            print()
            print(render_status(await fetch_status(http)))
            print()
            code = await asyncio.to_thread(_verify, workdir, subscribers, versions, tensors)
            if code:
                keep = True
                print(f"the processes' logs are kept in {workdir}")
            return code
    finally:
        _stop(processes)
        ctx.destroy(linger=0)
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def _verify(
    workdir: Path, subscribers: int, version: int, expected: dict[str, torch.Tensor]
) -> int:
    from safetensors.torch import load_file

    failures = 0
    deadline = time.monotonic() + 30
    for index in range(subscribers):
        path = workdir / f"subscriber-{index}" / f"v{version}.safetensors"
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        if not path.exists():
            print(f"FAIL subscriber-{index}: no dump of version {version}")
            failures += 1
            continue
        live = load_file(str(path))
        wrong = [
            name
            for name, tensor in expected.items()
            if not torch.equal(live.get(name, torch.empty(0)), tensor)
        ]
        if wrong or set(live) != set(expected):
            print(
                f"FAIL subscriber-{index}: {len(wrong)} tensors differ from version {version}, e.g. {wrong[:3]}"
            )
            failures += 1
        else:
            print(
                f"OK   subscriber-{index}: all {len(live)} tensors equal version {version} byte for byte"
            )
    return 1 if failures else 0
