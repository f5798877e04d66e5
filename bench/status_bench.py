"""`GET /v1/subscribers` at 10,000 subscribers, over HTTP, in one process (issue 10).

    PYTHONPATH=. python bench/status_bench.py [--subscribers 10000] [--requests 30]
        [--loop-turn-ms 0] [--json out.json]

Builds a `Registry` of `--subscribers` synthetic subscribers in process (one or two models
each, assorted applied versions, some pulling, some gone, about a tenth offering to relay),
serves the broker's real aiohttp app (`streamer.http.build_app`) on 127.0.0.1 with a
random port, and times `--requests` requests each of: a page of 100, a page of 1,000 (the
default page), and every row (`limit=10000`), the body read in full, from a client in a
thread of its own (off the server's loop, one keep-alive connection). Reports the median
and p90 (ms) of each, and the in-process cost of the default page (`fleet` and the JSON
encoding) beside it.

No ZeroMQ traffic runs meanwhile: these are the route's own costs, the floor of what a busy
broker answers (bench/fleet_bench.py --status measures that, with heartbeats flowing). With
`--loop-turn-ms N` another task holds the loop N ms per turn (a stand-in for the broker's
ZeroMQ work under heartbeat load): every time the route lets the loop run (the scan's
pauses, aiohttp's reads and writes) costs a turn of it. Run the same script on old and new
code, alternately, to compare: the machine's figures swing.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import random
import statistics
import sys
import time
from typing import Any

from aiohttp import web

from schemas.manifest import BucketSpec, FrameLocator, RegionSpec, Shard, TensorSpec
from schemas.messages import RelayOffer
from streamer.http import _json, build_app, fleet  # _json: the route's encoder
from streamer.metrics import BrokerStats
from streamer.registry import Registry

MODELS = ("org/a", "org/b")
PAGES = {"page_100": 100, "page_1000": 1000, "all": 10_000}


def _shard() -> Shard:
    return Shard(
        regions=(RegionSpec(nbytes=256, locators=(FrameLocator(endpoint="tcp://x:1", key="k"),)),),
        tensors=(
            TensorSpec(
                name="layers.0.weight", dtype="uint8", shape=(16,), region=0, offset=0, nbytes=16
            ),
        ),
        buckets=(BucketSpec(region=0, offset=0, nbytes=256, checksum="c" * 32),),
    )


def build_registry(num_subscribers: int, *, seed: int = 11) -> Registry:
    """A fleet like a real one at rest: most subscribers at one of the last versions."""
    rng = random.Random(seed)  # noqa: S311  # a reproducible fleet
    reg = Registry(retention=3)
    reg.hello("pub", "publisher", "trainer-host", 1, now=0.0)
    for version in (1, 2, 3):
        for model in MODELS:
            reg.publish("pub", model, version, 0, 1, _shard(), now=float(version))
    for i in range(num_subscribers):
        peer_id = f"sub-{rng.randrange(10**6):06d}-{i}"
        reg.hello(peer_id, "subscriber", f"host-{i // 8}", 1000 + i, now=10.0, name=f"node-{i}")
        for model in rng.sample(MODELS, rng.choice((1, 1, 1, 2))):
            relay = (
                RelayOffer(endpoint=f"tcp://10.0.{i // 250}.{i % 250}:7000")
                if rng.random() < 0.1
                else None
            )
            reg.subscribe(peer_id, model, relay=relay)
            if rng.random() < 0.9:
                reg.applied(peer_id, model, rng.choice((2, 3, 3, 3)), 1.5, 0.02, now=11.0)
        if rng.random() < 0.05:
            reg.goodbye(peer_id, now=12.0)
        elif rng.random() < 0.05:
            model = next(iter(reg.peers[peer_id].subscriptions))
            reg.progress(peer_id, model, 3, 10 << 20, 100 << 20, 5e8)
    return reg


def _ms(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_ms": round(statistics.median(ordered) * 1e3, 2),
        "p90_ms": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))] * 1e3, 2),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    reg = build_registry(args.subscribers)
    build_s = time.perf_counter() - started
    runner = web.AppRunner(build_app(reg, BrokerStats(started_at=time.time())), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    stop = asyncio.Event()
    busy = asyncio.create_task(_hold_the_loop(args.loop_turn_ms / 1e3, stop))
    results: dict[str, Any] = {
        "subscribers": args.subscribers,
        "requests": args.requests,
        "build_s": round(build_s, 2),
        "loop_turn_ms": args.loop_turn_ms,
    }
    try:
        samples, rows = await asyncio.to_thread(_client, port, args.requests)
        for key in PAGES:
            results[key] = {"rows": rows[key], **_ms(samples[key])}
    finally:
        stop.set()
        await busy
        await runner.cleanup()
    scan: list[float] = []
    encode: list[float] = []
    for _ in range(args.requests):
        begun = time.perf_counter()
        total, page = fleet(reg, time.time())
        scanned = time.perf_counter()
        _json.encode({"subscribers": page, "total": total, "limit": 1000, "offset": 0})
        scan.append(scanned - begun)
        encode.append(time.perf_counter() - scanned)
    results["fleet_page_1000"] = _ms(scan)
    results["encode_page_1000"] = _ms(encode)
    results["total_rows"] = total
    return results


def _client(port: int, requests: int) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Time `requests` GETs of each page size over one keep-alive connection (a thread of
    its own, as a status client in another process would be: off the server's loop)."""
    rows: dict[str, int] = {}
    samples: dict[str, list[float]] = {key: [] for key in PAGES}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        # Interleaved, after one warm-up round: each size sees the same machine.
        for attempt in range(requests + 1):
            for key, limit in PAGES.items():
                begun = time.perf_counter()
                connection.request("GET", f"/v1/subscribers?limit={limit}")
                reply = connection.getresponse()
                body = reply.read()
                took = time.perf_counter() - begun
                if reply.status != 200:
                    raise RuntimeError(f"/v1/subscribers answered {reply.status}: {body[:200]!r}")
                if attempt:
                    samples[key].append(took)
                rows[key] = len(json.loads(body)["subscribers"])
    finally:
        connection.close()
    return samples, rows


async def _hold_the_loop(turn_s: float, stop: asyncio.Event) -> None:
    """Hold the event loop `turn_s` per turn until `stop` (nothing when 0). It sleeps (the
    GIL released), so the client thread is not slowed: only the server's loop is."""
    while turn_s > 0 and not stop.is_set():
        time.sleep(turn_s)  # noqa: ASYNC251  # on purpose: the loop is busy elsewhere
        await asyncio.sleep(0)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subscribers", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument(
        "--loop-turn-ms",
        type=float,
        default=0.0,
        help="another task holds the event loop this long per turn (0: none)",
    )
    parser.add_argument("--json", help="also write the results here")
    return parser


def main() -> None:
    args = parser().parse_args()
    results = asyncio.run(run(args))
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as out:
            out.write(text + "\n")
    sys.exit(0)


if __name__ == "__main__":
    main()
