"""What a node link adds on its node (issue 10): announce -> every engine holds the manifest,
through a real `NodeLink` against the same engines connected to the broker directly.

    PYTHONPATH=. python bench/link_handoff_bench.py [--engines 8] [--versions 30]
        [--tensors 630] [--json out.json]

bench/fleet_bench.py's node mode runs a node's members in the worker process that holds the
node's connection, so the link's local hop (the ipc socket, the link's Python loop, its
manifest cache) is not in its figures. This measures that hop on one node:

    broker (in this process) ──tcp── weightstream link (a process) ──ipc── engines x M
                             └─────────────────tcp──────────────────────── engines x M

The broker is `streamer.broker.Broker` run in this process, so that the moment its fan-out of
an `Announced` leaves (`_send_one`, the first call for that version) is on this clock; the
link runs as `weightstream link` (a process of its own, as on a node; no keys); the engines are
M `BrokerClient`s (`streamer.client.connect`, role subscriber) on the link and M connected to
the broker, each group subscribed to a model of its own. Rounds alternate link / direct; each
publishes a new version of that group's model (one small shard, `--tensors` tensors) and
times broker send -> each engine's `next_manifest` returns (the engine fetched the manifest
and checked its digest; through the link the node's first fetch goes to the broker and the
others wait for it). The link process's CPU per round is read from /proc.

The broker, the publisher and all 2 x M engines share this process's one event loop, in both
kinds of round: the engines' work (decoding Announced, fetching, checking the digest,
decoding the manifest) is serialised here, as it would not be with an engine per process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq.asyncio

from schemas.codec import encode
from schemas.manifest import BucketSpec, FrameLocator, Manifest, RegionSpec, Shard, TensorSpec
from schemas.messages import Announced, Message
from streamer.broker import Broker
from streamer.client import connect
from streamer.config import BrokerConfig, ClientConfig

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from streamer.client import BrokerClient

ROOT = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")
LINKED, DIRECT = "handoff/linked", "handoff/direct"


class TimedBroker(Broker):
    """The broker, noting when the first frame of each version's `Announced` leaves."""

    def __init__(self, config: BrokerConfig, *, context: zmq.asyncio.Context) -> None:
        super().__init__(config, context=context)
        self.sent_at: dict[tuple[str, int], float] = {}

    def _send_one(self, peer_id: str, members: list[str], message: Message, data: bytes) -> None:
        if isinstance(message, Announced):
            self.sent_at.setdefault((message.model, message.version), time.monotonic())
        super()._send_one(peer_id, members, message, data)


def shard(num_tensors: int) -> Shard:
    """One region of `num_tensors` 16-byte tensors, 256 bytes apart, in one bucket (the shape
    of tests/streamer/test_announced.py's `shard`)."""
    nbytes = 256 * num_tensors
    return Shard(
        regions=(
            RegionSpec(nbytes=nbytes, locators=(FrameLocator(endpoint="tcp://x:1", key="k"),)),
        ),
        tensors=tuple(
            TensorSpec(
                name=f"model.layers.{i}.weight",
                dtype="uint8",
                shape=(16,),
                region=0,
                offset=256 * i,
                nbytes=16,
            )
            for i in range(num_tensors)
        ),
        buckets=(BucketSpec(region=0, offset=0, nbytes=nbytes, checksum="c" * 32),),
    )


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


@contextlib.contextmanager
def link_process(broker: str, workdir: Path) -> Any:
    """`weightstream link` against `broker`; yields (process, its endpoint)."""
    ready = workdir / "link.json"
    log = (workdir / "link.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "weightstream",
            "link",
            "--broker",
            broker,
            "--listen",
            f"ipc://{workdir}/link/engines.sock",
            "--link-id",
            "bench-node",
            "--ready-file",
            str(ready),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"link did not start:\n{(workdir / 'link.log').read_text()}")
            time.sleep(0.05)
        yield process, json.loads(ready.read_text())["endpoint"]
    finally:
        process.terminate()
        process.wait(timeout=10)


@contextlib.asynccontextmanager
async def engines(
    endpoint: str, model: str, count: int, context: zmq.asyncio.Context
) -> AsyncIterator[list[BrokerClient]]:
    config = ClientConfig(broker=endpoint, request_timeout_s=10.0)
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(connect(config, role="subscriber", context=context))
            for _ in range(count)
        ]
        for client in clients:
            await client.subscribe(model)
        yield clients


async def holds(client: BrokerClient, model: str, version: int) -> float:
    manifest = await client.next_manifest(model, after=version - 1)
    assert manifest.version == version, (manifest.version, version)
    return time.monotonic()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="link-handoff-"))
    context = zmq.asyncio.Context()
    broker = TimedBroker(BrokerConfig(endpoint="tcp://127.0.0.1:0"), context=context)
    the_shard = shard(args.tensors)
    times: dict[str, list[float]] = {"link": [], "direct": []}
    all_engines: dict[str, list[float]] = {"link": [], "direct": []}
    link_cpu: list[float] = []
    results: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "machine": f"{platform.node()} {os.cpu_count()} cores, {platform.python_version()}",
        "load_before": os.getloadavg(),
        "engines": args.engines,
    }
    task = asyncio.create_task(broker.run())
    try:
        with link_process(broker.endpoint, workdir) as (link, link_endpoint):
            async with (
                connect(
                    ClientConfig(broker=broker.endpoint), role="publisher", context=context
                ) as publisher,
                engines(link_endpoint, LINKED, args.engines, context) as linked,
                engines(broker.endpoint, DIRECT, args.engines, context) as direct,
            ):
                version = 0
                for r in range(2 * args.versions + 2):
                    version += 1
                    mode = "link" if r % 2 == 0 else "direct"
                    model, clients = (LINKED, linked) if mode == "link" else (DIRECT, direct)
                    waiters = [
                        asyncio.create_task(holds(client, model, version)) for client in clients
                    ]
                    cpu0 = proc_cpu_s(link.pid)
                    await publisher.publish(model, version, 0, 1, the_shard)
                    async with asyncio.timeout(30):
                        done = await asyncio.gather(*waiters)
                    await asyncio.sleep(0.05)  # the link's last sends are counted in its CPU
                    if r < 2:
                        continue  # the first of each: joins, imports, caches warm up
                    sent = broker.sent_at[(model, version)]
                    times[mode].append(max(done) - sent)
                    all_engines[mode].extend(t - sent for t in done)
                    if mode == "link":
                        link_cpu.append(proc_cpu_s(link.pid) - cpu0)
        results["link_log_tail"] = (workdir / "link.log").read_text(errors="replace")[-1500:]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        context.destroy(linger=0)
    results["manifest_bytes"] = len(encode(Manifest.assemble(LINKED, 1, [the_shard])))
    results["load_after"] = os.getloadavg()
    results["rows"] = {
        mode: {
            "versions": len(times[mode]),
            "all_hold_p50_ms": statistics.median(times[mode]) * 1e3,
            "all_hold_p90_ms": pct(times[mode], 0.9) * 1e3,
            "engine_p50_ms": statistics.median(all_engines[mode]) * 1e3,
            "engine_p90_ms": pct(all_engines[mode], 0.9) * 1e3,
        }
        for mode in times
    }
    # /proc counts in ticks (10 ms): the sum over the link rounds, per round
    results["link_cpu_per_version_ms"] = sum(link_cpu) / max(1, len(link_cpu)) * 1e3
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engines", type=int, default=8, help="engines per group (M)")
    parser.add_argument("--versions", type=int, default=30, help="versions per group")
    parser.add_argument(
        "--tensors", type=int, default=630, help="tensors (630: ~49 KB, as fleet_bench's small)"
    )
    parser.add_argument("--json", help="write every figure here")
    args = parser.parse_args()
    results = asyncio.run(run(args))
    print(
        f"{args.engines} engines per group, {results['manifest_bytes'] / 1e3:.1f} KB manifest, "
        f"load before {results['load_before']}, after {results['load_after']}"
    )
    print("| engines on | versions | all hold: p50 | p90 | each engine: p50 | p90 |")
    print("|---|---|---|---|---|---|")
    for mode, row in results["rows"].items():
        print(
            f"| {mode} | {row['versions']} | {row['all_hold_p50_ms']:.1f} ms "
            f"| {row['all_hold_p90_ms']:.1f} ms | {row['engine_p50_ms']:.1f} ms "
            f"| {row['engine_p90_ms']:.1f} ms |"
        )
    print(
        f"- the link process's CPU per link round (its members' heartbeats included): "
        f"{results['link_cpu_per_version_ms']:.1f} ms"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
