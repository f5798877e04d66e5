"""What security costs: announce latency with and without CURVE, and the ZeroMQ bulk transport's
throughput with and without encryption, in one run, alternating rounds.

    python bench/security_bench.py [--subscribers 100] [--rounds 15] [--bulk 256MiB]

Control plane: two broker processes at once on loopback, one with CURVE keys and an allowlist
and one without; `--subscribers` clients follow a model on each (all in this process, one
ZeroMQ context). Each round publishes a version to one broker, then the other, and times
publish() -> the last subscriber holding the announcement. Bulk: one `ZmqFrameSender` with
`encrypt=True` and one without; a receiver reads `--bulk` bytes in 64 MiB buckets from each in
turn. Figures are medians; the table goes to stdout and into bench/RESULTS.md between the
security-bench markers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zmq.asyncio

from schemas.manifest import BucketSpec, FrameLocator, RegionSpec, Shard, TensorSpec
from streamer.auth import Grant, create_keys, load_public_key, render_grants
from streamer.client import BrokerClient, connect
from streamer.config import ClientConfig
from streamer.transport.base import Fetch, Region
from streamer.transport.zmq_frames import ZmqFrameReceiver, ZmqFrameSender
from weightstream.cli import _size

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
MODEL = "bench"
BUCKET = 64 << 20


def _shard() -> Shard:
    return Shard(
        regions=(
            RegionSpec(nbytes=1 << 20, locators=(FrameLocator(endpoint="tcp://x:1", key="k"),)),
        ),
        tensors=(
            TensorSpec(
                name="w", dtype="uint8", shape=(1 << 20,), region=0, offset=0, nbytes=1 << 20
            ),
        ),
        buckets=(BucketSpec(region=0, offset=0, nbytes=1 << 20, checksum="c"),),
    )


def _keys(directory: Path) -> dict[str, str]:
    paths: dict[str, str] = {}
    grants = []
    for name, publish, subscribe in (("broker", [], []), ("bench", ["*"], ["*"])):
        public, secret = create_keys(name, directory)
        paths[name], paths[f"{name}.public"] = str(secret), str(public)
        if name != "broker":
            key = load_public_key(public).decode()
            grants.append(Grant(name=name, public_key=key, publish=publish, subscribe=subscribe))
    paths["allowlist"] = str(directory / "allowlist.toml")
    Path(paths["allowlist"]).write_text(render_grants(grants))
    return paths


def _start_broker(
    workdir: Path, name: str, extra: list[str]
) -> tuple[subprocess.Popen[bytes], str]:
    ready = workdir / f"{name}.json"
    args = ["--endpoint", "tcp://127.0.0.1:0", "--http-port", "0", "--ready-file", str(ready)]
    with (workdir / f"{name}.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "streamer", *args, *extra, "--log-level", "WARNING"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=ENV,
        )
    deadline = time.monotonic() + 60
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"broker {name} did not start; see {workdir}")
        time.sleep(0.05)
    return process, json.loads(ready.read_text())["endpoint"]


async def _announce_round(
    publisher: BrokerClient, subscribers: list[BrokerClient], version: int
) -> float:
    started = time.perf_counter()
    await publisher.publish(MODEL, version, 0, 1, _shard())
    await asyncio.gather(*(s.next_manifest(MODEL, after=version - 1) for s in subscribers))
    return time.perf_counter() - started


async def control_plane(
    endpoints: dict[str, ClientConfig], num: int, rounds: int
) -> dict[str, float]:
    ctx = zmq.asyncio.Context()
    try:
        async with _Clients(ctx, endpoints, num) as clients:
            for _, subs in clients.values():
                await asyncio.gather(*(s.subscribe(MODEL) for s in subs))
            times: dict[str, list[float]] = {name: [] for name in clients}
            for version in range(1, rounds + 2):
                for name, (publisher, subs) in clients.items():
                    elapsed = await _announce_round(publisher, subs, version)
                    if version > 1:  # the first round is a warm-up
                        times[name].append(elapsed)
        return {name: statistics.median(t) for name, t in times.items()}
    finally:
        ctx.destroy(linger=0)


class _Clients:
    """One publisher and `num` subscribers per broker, connected for the block."""

    def __init__(self, ctx: zmq.asyncio.Context, endpoints: dict[str, ClientConfig], num: int):
        self.ctx, self.endpoints, self.num = ctx, endpoints, num
        self.stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> dict[str, tuple[BrokerClient, list[BrokerClient]]]:
        out: dict[str, tuple[BrokerClient, list[BrokerClient]]] = {}
        for name, config in self.endpoints.items():
            publisher = await self.stack.enter_async_context(
                connect(config, role="publisher", context=self.ctx)
            )
            subs = [
                await self.stack.enter_async_context(
                    connect(config, role="subscriber", context=self.ctx)
                )
                for _ in range(self.num)
            ]
            out[name] = (publisher, subs)
        return out

    async def __aexit__(self, *exc: object) -> None:
        await self.stack.aclose()


def bulk(nbytes: int, rounds: int) -> dict[str, float]:
    source = (ctypes.c_char * nbytes)()
    ctypes.memset(source, 7, nbytes)
    target = (ctypes.c_char * nbytes)()
    senders = {"plain": ZmqFrameSender(), "curve": ZmqFrameSender(encrypt=True)}
    receiver = ZmqFrameReceiver(timeout_s=60)
    rates: dict[str, list[float]] = {name: [] for name in senders}
    try:
        locators = {
            name: sender.expose([Region(ctypes.addressof(source), nbytes)])[0]
            for name, sender in senders.items()
        }
        for index in range(rounds + 1):
            for name, locator in locators.items():
                fetches = [
                    Fetch(
                        locator,
                        offset,
                        min(BUCKET, nbytes - offset),
                        ctypes.addressof(target) + offset,
                    )
                    for offset in range(0, nbytes, BUCKET)
                ]
                started = time.perf_counter()
                receiver.fetch(fetches)
                elapsed = time.perf_counter() - started
                if index:
                    rates[name].append(nbytes / elapsed / 1e9)
        assert ctypes.string_at(target, 4096) == ctypes.string_at(source, 4096)
    finally:
        receiver.close()
        for sender in senders.values():
            sender.close()
    return {name: statistics.median(r) for name, r in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--subscribers", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--bulk", type=_size, default=_size("256MiB"))
    parser.add_argument("--bulk-rounds", type=int, default=5)
    parser.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    workdir = Path(tempfile.mkdtemp(prefix="weightstream-security-bench-"))
    keys = _keys(workdir)
    brokers = []
    try:
        curve, curve_endpoint = _start_broker(
            workdir, "curve", ["--key-file", keys["broker"], "--allowlist-file", keys["allowlist"]]
        )
        brokers.append(curve)
        plain, plain_endpoint = _start_broker(workdir, "plain", [])
        brokers.append(plain)
        configs = {
            "plain": ClientConfig(broker=plain_endpoint, request_timeout_s=30),
            "curve": ClientConfig(
                broker=curve_endpoint,
                request_timeout_s=30,
                key_file=keys["bench"],
                broker_key_file=keys["broker.public"],
            ),
        }
        announce = asyncio.run(control_plane(configs, args.subscribers, args.rounds))
    finally:
        for process in brokers:
            process.terminate()
            process.wait(timeout=10)
    rates = bulk(args.bulk, args.bulk_rounds)
    _write(args, load, announce, rates)


def _write(
    args: argparse.Namespace, load: float, announce: dict[str, float], rates: dict[str, float]
) -> None:
    start, end = "<!-- security-bench:start -->", "<!-- security-bench:end -->"
    n = args.subscribers
    lines = [
        start,
        "## What security costs (CURVE on the control plane and on the ZeroMQ bulk transport)",
        "",
        f"Run: `python bench/security_bench.py --subscribers {n} --rounds {args.rounds} --bulk {args.bulk >> 20}MiB` "
        f"on {platform.node()} ({os.cpu_count()} cores shared with other work, load average {load:.1f} "
        f"at the start), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Two brokers at once on "
        "loopback, rounds alternating between them; medians.",
        "",
        "| figure | without CURVE | with CURVE | ratio |",
        "|---|---|---|---|",
        f"| publish() -> all {n} subscribers hold the announcement | {announce['plain'] * 1e3:.1f} ms | "
        f"{announce['curve'] * 1e3:.1f} ms | {announce['curve'] / announce['plain']:.2f} |",
        f"| ZeroMQ bulk transport, {args.bulk / 2**20:.0f} MiB in 64 MiB buckets, one stream | "
        f"{rates['plain']:.2f} GB/s | {rates['curve']:.2f} GB/s | {rates['curve'] / rates['plain']:.2f} |",
        "",
        "CURVE encrypts every frame (Curve25519 key exchange, XSalsa20-Poly1305 per message) in "
        "libzmq's I/O thread; the control plane's messages are small, so its cost is mostly the "
        "per-message box; the bulk path pays it per byte. mooncake tcp (the default data path) is "
        "not encrypted: it belongs on a trusted fabric (docs/security.md).",
        end,
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        path = ROOT / "bench" / "RESULTS.md"
        current = path.read_text()
        if start in current:
            head, _, rest = current.partition(start)
            _, _, tail = rest.partition(end)
            current = head + text + tail
        else:
            current = current.rstrip() + "\n\n" + text + "\n"
        path.write_text(current)


if __name__ == "__main__":
    main()
