"""CPU benchmark: publish -> every subscriber applied, against raw mooncake tcp reads, one run.

    sudo python bench/cpu_bench.py [--size 1GB] [--subscribers 4] [--versions 3] [--loopback]

Topology (network namespaces when root, else loopback):

    root namespace: broker, trainer (publishes a synthetic Llama-like model over mooncake tcp)
        ├── node 0: `weightstream subscribe`      each in its own namespace, behind a veth pair
        ├── ...                                   and a bridge, so every byte crosses a real
        └── node N-1                              (virtual) link

The floor is raw `batch_transfer_sync_read` of the same number of bytes (`bench/mooncake_raw.py`):
from one node alone once, and from all nodes at once in every round. Ours: version 1 is a
warm-up (connection handshakes, page faults of fresh staging); each of the next `--versions` is
a round, a raw read of all nodes at once right before the version, so that every ratio compares
the two on the same minute of this host (its rates swing 2x between runs). Figures are medians,
ratios the median of the per-round ratios; the table goes to stdout and into bench/RESULTS.md
between the cpu-bench markers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import zmq.asyncio

from publishers.publisher import open_publisher
from publishers.sources import synthetic_llama
from streamer.auth import make_local_keys
from streamer.config import ClientConfig
from streamer.transport import MooncakeSender
from weightstream.cli import _size
from weightstream.netns import NodeNet, netns_available

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "MC_LOG_LEVEL": "ERROR", "PYTHONPATH": str(ROOT)}


class Nodes:
    """Where each subscriber runs: a namespace per node, or plain loopback."""

    def __init__(self, count: int, loopback: bool) -> None:
        self.net = None if loopback else NodeNet(count, prefix="wsb", net=77).open()
        self.host = "127.0.0.1" if self.net is None else self.net.host_address

    def address(self, node: int) -> str:
        return "127.0.0.1" if self.net is None else self.net.address(node)

    def prefix(self, node: int) -> list[str]:
        return [] if self.net is None else list(self.net.exec_prefix(node))

    def close(self) -> None:
        if self.net is not None:
            self.net.close()


def raw_reads(nodes: Nodes, nbytes: int, count: int) -> tuple[float, float]:
    """(GB/s of one node alone, aggregate GB/s of `count` nodes reading at once)."""
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.mooncake_raw",
            "serve",
            "--host",
            nodes.host,
            "--nbytes",
            str(nbytes),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=ENV,
        cwd=ROOT,
    )
    try:
        assert server.stdout is not None
        info = json.loads(server.stdout.readline())

        def reader(node: int) -> subprocess.Popen[bytes]:
            return subprocess.Popen(
                [
                    *nodes.prefix(node),
                    sys.executable,
                    "-m",
                    "bench.mooncake_raw",
                    "read",
                    "--host",
                    nodes.address(node),
                    "--session",
                    info["session"],
                    "--address",
                    str(info["address"]),
                    "--nbytes",
                    str(nbytes),
                ],
                stdout=subprocess.PIPE,
                env=ENV,
                cwd=ROOT,
            )

        alone = json.loads(reader(0).communicate()[0])["gbps"]
        readers = [reader(node) for node in range(count)]
        together = sum(json.loads(r.communicate()[0])["gbps"] for r in readers)
        return alone, together
    finally:
        server.stdin.close()  # type: ignore[union-attr]
        server.wait(timeout=30)


async def ours(
    nodes: Nodes,
    size: int,
    count: int,
    versions: int,
    workdir: Path,
    raw: Callable[[], float],
) -> dict[str, float]:
    """Each measured version is one round: `raw()` (every node reading the same bytes raw, at
    once) right before it, so each round's ratio compares like with like on this noisy host."""
    ready = workdir / "broker.json"
    # A broker on the bridge (off loopback) runs with keys, as in production.
    keys = {k: str(v) for k, v in make_local_keys(workdir / "keys", model="bench").items()}
    broker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "weightstream",
            "--log-level",
            "WARNING",
            "broker",
            "--endpoint",
            f"tcp://{nodes.host}:0",
            "--http-port",
            "0",
            "--ready-file",
            str(ready),
            "--key-file",
            keys["broker"],
            "--allowlist-file",
            keys["allowlist"],
        ],
        env=ENV,
        cwd=ROOT,
    )
    subscribers: list[subprocess.Popen[bytes]] = []
    ctx = zmq.asyncio.Context()
    try:
        while not ready.exists():
            await asyncio.sleep(0.05)
        info = json.loads(ready.read_text())
        http = f"http://127.0.0.1:{info['http_port']}"
        for node in range(count):
            subscribers.append(
                subprocess.Popen(
                    [
                        *nodes.prefix(node),
                        sys.executable,
                        "-m",
                        "weightstream",
                        "--log-level",
                        "WARNING",
                        "subscribe",
                        "--broker",
                        info["endpoint"],
                        "--model",
                        "bench",
                        "--transport",
                        "mooncake",
                        "--host",
                        nodes.address(node),
                        "--key-file",
                        keys["subscriber"],
                        "--broker-key-file",
                        keys["broker.public"],
                    ],
                    env=ENV,
                    cwd=ROOT,
                )
            )
        rows: list[dict[str, float]] = []
        config = ClientConfig(
            broker=info["endpoint"],
            request_timeout_s=60,
            key_file=keys["trainer"],
            broker_key_file=keys["broker.public"],
        )
        async with open_publisher(
            config, model="bench", sender=MooncakeSender(host=nodes.host), context=ctx
        ) as pub:
            for version in range(1, versions + 2):
                raw_all = await asyncio.to_thread(raw) if version > 1 else 0.0
                tensors = await asyncio.to_thread(synthetic_llama, size, version=version)
                started = time.perf_counter()
                result = await pub.publish(version, tensors)
                async with asyncio.timeout(600):
                    await pub.wait_applied(version, count)
                seconds = time.perf_counter() - started
                async with (
                    aiohttp.ClientSession() as session,
                    session.get(f"{http}/v1/subscribers") as response,
                ):
                    fleet = (await response.json())["subscribers"]
                pulls = [row["last_pull_s"] for row in fleet if row["applied_version"] == version]
                nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
                label = "warm-up" if version == 1 else "measured"
                print(
                    f"  v{version} ({label}): publish {result.seconds:.2f}s, all {count} applied after "
                    f"{seconds:.2f}s, pulls {', '.join(f'{p:.2f}' for p in pulls)}s",
                    flush=True,
                )
                if version > 1:
                    rows.append(
                        {
                            "e2e_s": seconds,
                            "publish_s": result.seconds,
                            "pull_s": statistics.median(pulls),
                            "slowest_pull_s": max(pulls),
                            "nbytes": nbytes,
                            "raw_all": raw_all,
                        }
                    )
        return {
            "nbytes": rows[0]["nbytes"],
            "e2e_s": statistics.median(r["e2e_s"] for r in rows),
            "publish_s": statistics.median(r["publish_s"] for r in rows),
            "pull_s": statistics.median(r["pull_s"] for r in rows),
            "slowest_pull_s": statistics.median(r["slowest_pull_s"] for r in rows),
            "raw_all": statistics.median(r["raw_all"] for r in rows),
            # Per-round ratios, then their median (the host's rates swing between rounds).
            "pull_ratio": statistics.median(
                count * r["nbytes"] / r["slowest_pull_s"] / 1e9 / r["raw_all"] for r in rows
            ),
            "e2e_ratio": statistics.median(
                count * r["nbytes"] / r["e2e_s"] / 1e9 / r["raw_all"] for r in rows
            ),
        }
    finally:
        for process in subscribers:
            process.terminate()
        for process in subscribers:
            process.wait(timeout=30)
        broker.terminate()
        broker.wait(timeout=30)
        ctx.destroy(linger=0)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=_size, default=_size("1GB"))
    parser.add_argument("--subscribers", type=int, default=4)
    parser.add_argument(
        "--versions", type=int, default=3, help="measured versions (after a warm-up)"
    )
    parser.add_argument("--loopback", action="store_true", help="no network namespaces")
    parser.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    args = parser.parse_args()
    loopback = args.loopback or not netns_available()
    nodes = Nodes(args.subscribers, loopback)
    workdir = Path(f"/tmp/weightstream-bench-{os.getpid()}")
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        nbytes = sum(
            t.numel() * t.element_size() for t in synthetic_llama(args.size, version=0).values()
        )
        print(f"raw mooncake tcp reads of {nbytes / 1e9:.2f} GB ...", flush=True)
        raw_one, _ = raw_reads(nodes, nbytes, 1)
        print(f"  one node {raw_one:.2f} GB/s", flush=True)

        def raw_round() -> float:
            _, together = raw_reads(nodes, nbytes, args.subscribers)
            print(f"  raw: {args.subscribers} nodes at once {together:.2f} GB/s", flush=True)
            return together

        print(f"weightstream: broker + trainer + {args.subscribers} subscribers ...", flush=True)
        result = asyncio.run(
            ours(nodes, args.size, args.subscribers, args.versions, workdir, raw_round)
        )
        raw_all = result["raw_all"]
    finally:
        nodes.close()
    report(args, loopback, nbytes, raw_one, raw_all, result)


def report(
    args: argparse.Namespace,
    loopback: bool,
    nbytes: int,
    raw_one: float,
    raw_all: float,
    result: dict[str, float],
) -> None:
    n = args.subscribers
    size_gb = nbytes / 1e9
    start, end = f"<!-- cpu-bench:{n}:start -->", f"<!-- cpu-bench:{n}:end -->"
    pull_s, slowest, e2e_s, publish_s = (
        result[k] for k in ("pull_s", "slowest_pull_s", "e2e_s", "publish_s")
    )
    per_sub = size_gb / pull_s
    aggregate = n * size_gb / slowest
    lines = [
        start,
        f"### CPU, {size_gb:.2f} GB model, {n} subscriber{'s' if n > 1 else ''} ({'loopback' if loopback else 'one network namespace each'}), mooncake tcp",
        "",
        f"Run: `python bench/cpu_bench.py --size {args.size} --subscribers {n} --versions {args.versions}"
        f"{' --loopback' if loopback else ''}` on {platform.node()} ({os.cpu_count()} cores), "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Medians of {args.versions} versions after a warm-up; "
        "each version is a round with its own raw read right before it, and the ratios are the "
        "median of the per-round ratios.",
        "",
        "| figure | value | vs raw mooncake |",
        "|---|---|---|",
        f"| raw mooncake tcp read, one node alone | {raw_one:.2f} GB/s | 1.00 |",
        *(
            [f"| raw mooncake tcp read, {n} nodes at once (sum) | {raw_all:.2f} GB/s | 1.00 |"]
            if n > 1
            else []
        ),
        f"| ours: pull + verify, per subscriber (median) | {per_sub:.2f} GB/s ({pull_s:.2f} s) | {per_sub / (raw_all / n):.2f} of the per-node share |",
        f"| ours: all {n} subscribers pulled (aggregate) | {aggregate:.2f} GB/s | {result['pull_ratio']:.2f} |",
        f"| ours: publish (pack + checksums) | {publish_s:.2f} s | |",
        f"| ours: publish() call -> all {n} applied | {e2e_s:.2f} s ({n * size_gb / e2e_s:.2f} GB/s delivered) | {result['e2e_ratio']:.2f} |",
        "",
        "The anchor (checkpoint-engine) cannot run here: CUDA or Ascend only, RDMA/EFA only.",
        end,
    ]
    text = "\n".join(lines)
    print()
    print(text)
    if not args.no_write:
        path = ROOT / "bench" / "RESULTS.md"
        current = path.read_text() if path.exists() else "# Benchmark results\n\n"
        if start in current:
            head, _, rest = current.partition(start)
            _, _, tail = rest.partition(end)
            current = head + text + tail
        else:
            current = current.rstrip() + "\n\n" + text + "\n"
        path.write_text(current)


if __name__ == "__main__":
    main()
