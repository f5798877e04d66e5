"""Ours through the service: Publisher -> broker -> Subscriber + CudaSwapper, timed per version.

Run by gpu_bench.py (`--cases service`, and `service-multi` on several GPUs), or alone:

    python3 bench/gpu_service.py --gb 16 --versions 7 --warmup 2            # 1 GPU
    python3 bench/gpu_service.py --gb 16 --ranks 4                          # NodeShare, 4 GPUs
    python3 bench/gpu_service.py --device cpu --gb 0.05 --versions 3 --warmup 1   # CPU smoke

    publisher process (GPU 0, or CPU)                  subscriber process (one per GPU; torchrun)
      broker: streamer.server.serve, same loop           Subscriber(ShmReceiver) + CudaSwapper
      Publisher(node_local=True): version v packed         pull: map the publisher's segments
        into /dev/shm (registered), bucket checksums         (no copy, no host checksums)
      digests of every tensor -> work/digests-v.json       stage: H2D + wmix128 of every bucket
      ── Announce v ───────────────────────────────>         on the GPU (NodeShare: 1/N each,
      <── AppliedReached (wait_applied, all ranks) ──         the rest over NVLink), plan
                                                           swap_in: D2D into preallocated params
                                                           on_applied: each param's digest vs v's

Every version has new random bytes. The first `--warmup` versions (host registration of both
of the publisher's buffer sets, CUDA start-up) are not counted; the rest give medians. Results:
$OUT/gpu_service*.json, and the summary lines gpu_bench.py prints.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import multiprocessing as mp
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
import zmq.asyncio

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gpu_bench import (  # type: ignore[import-not-found]  # noqa: E402
    GB,
    Log,
    MiB,
    _env,
    median,
    run_phase,
    say,
    synthetic_model,
)

from gpu.digest import DigestBatch, wmix128_tensor  # noqa: E402
from publishers.packing import plan  # noqa: E402
from publishers.publisher import open_publisher  # noqa: E402
from schemas.manifest import Manifest  # noqa: E402
from streamer.checksum import format_digest  # noqa: E402
from streamer.client import connect  # noqa: E402
from streamer.config import BrokerConfig, ClientConfig  # noqa: E402
from streamer.server import serve  # noqa: E402
from streamer.transport import ShmReceiver  # noqa: E402
from subscribers.cuda.stage import CudaStager  # noqa: E402
from subscribers.cuda.swap import CudaSwapper  # noqa: E402
from subscribers.pull import PullReport  # noqa: E402
from subscribers.staging import Staging  # noqa: E402
from subscribers.subscriber import PullConfig, Subscriber  # noqa: E402
from subscribers.swap import SwapReport  # noqa: E402

MODEL = "bench/llama-8b-like"


def model_shapes(gb: float) -> list[tuple[str, tuple[int, ...]]]:
    """The benchmark's model; below 1 GB a narrower one of the same structure (CPU smoke runs)."""
    if gb >= 1:
        full: list[tuple[str, tuple[int, ...]]] = synthetic_model(gb)
        return full
    h, ff = 512, 1792
    per_layer = [("q", (h, h)), ("k", (128, h)), ("v", (128, h)), ("o", (h, h)),
                 ("gate", (ff, h)), ("up", (ff, h)), ("down", (h, ff)), ("ln1", (h,)), ("ln2", (h,))]  # fmt: skip
    layer_bytes = sum(torch.Size(s).numel() for _, s in per_layer) * 2
    shapes: list[tuple[str, tuple[int, ...]]] = [("embed", (16000, h))]
    for i in range(max(1, int(gb * GB // layer_bytes))):
        shapes += [(f"layers.{i}.{n}", s) for n, s in per_layer]
    return shapes


def _client(endpoint: str) -> ClientConfig:
    return ClientConfig(broker=endpoint, request_timeout_s=60.0, heartbeat_interval_s=1.0)


def _digests(named: dict[str, torch.Tensor]) -> list[str]:
    sums = torch.stack([wmix128_tensor(t.reshape(-1).view(torch.uint8)) for t in named.values()])
    return [format_digest(int(a), int(b)) for a, b in sums.tolist()]


# --- publisher + broker ---------------------------------------------------------------------------


def _broker_config() -> BrokerConfig:
    # Retention 1: the publisher alternates between two buffer sets. Generous timeouts: a
    # publisher busy allocating sends no heartbeats for a while.
    return BrokerConfig(
        endpoint="tcp://127.0.0.1:0",
        http_port=0,
        retention=1,
        lease_ttl_s=120.0,
        peer_timeout_s=120.0,
    )


def _broker_main(config: BrokerConfig, conn: Any) -> None:
    def on_ready(endpoint: str, _http_port: int) -> None:
        conn.send(endpoint)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(config, on_ready=on_ready))


class BrokerProcess:
    """The broker in a process of its own, as deployed: sharing a GIL with the trainer (a
    thread) adds up to a switch interval (5 ms) to each control message while the trainer's
    process runs Python, which a same-GPU path of tens of milliseconds would count."""

    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        ours, theirs = ctx.Pipe()
        self._process = ctx.Process(target=_broker_main, args=(_broker_config(), theirs))
        self._process.start()
        if not ours.poll(60):
            self._process.kill()
            raise RuntimeError("the broker did not start")
        self.endpoint: str = ours.recv()

    def stop(self) -> None:
        self._process.terminate()
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.kill()


class BrokerThread:
    """The broker on its own event loop in a thread: the publisher's loop blocks at times
    (allocating and registering 17 GB of shared memory), and the broker must not."""

    def __init__(self) -> None:
        self.config = _broker_config()
        self.endpoint = ""
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._task: asyncio.Task[None] | None = None
        self._thread = threading.Thread(target=self._run, name="broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout=60):
            raise RuntimeError("the broker did not start")

    def _run(self) -> None:
        def on_ready(endpoint: str, _http_port: int) -> None:
            self.endpoint = endpoint
            self._ready.set()

        self._task = self._loop.create_task(serve(self.config, on_ready=on_ready))
        with contextlib.suppress(asyncio.CancelledError):
            self._loop.run_until_complete(self._task)
        self._loop.close()

    def stop(self) -> None:
        if self._task is not None:
            self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(timeout=10)


async def _publish_main(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device if args.device == "cpu" else "cuda:0")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    broker = BrokerProcess() if args.broker == "process" else BrokerThread()
    work = Path(args.work)
    out: dict[str, Any] = {"versions": []}
    try:
        endpoint = broker.endpoint
        named = {
            n: torch.empty(s, dtype=torch.bfloat16, device=device) for n, s in model_shapes(args.gb)
        }
        ctx = zmq.asyncio.Context()
        try:
            async with open_publisher(
                _client(endpoint),
                model=MODEL,
                sender=[],
                bucket_bytes=args.bucket_mib * MiB,
                node_local=True,
                context=ctx,
                offer_gpu=args.publish_mode == "colocated",
            ) as publisher:
                say(f"READY {endpoint}")
                for version in range(1, args.versions + 1):
                    g = torch.Generator(device=device).manual_seed(1000 + version)
                    for t in named.values():
                        t.normal_(generator=g)
                    digests = _digests(named)
                    (work / f"digests-{version}.json").write_text(json.dumps(digests))
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)  # the trainer's step is done
                    t0 = time.perf_counter()
                    if args.publish_mode in ("snapshot", "colocated"):
                        pending = await publisher.publish(version, named, snapshot=True)
                        stalled = time.perf_counter()
                        # The trainer changes its parameters right away (the next step): the
                        # subscriber's check against digests-v proves v's bytes were kept.
                        for t in named.values():
                            t.fill_(-7.5)
                        # Waited for beside the host copy: a same-GPU engine may apply the
                        # version from its GPU offer before the host copy is even offered.
                        applied_at: list[float] = []
                        waiting = asyncio.ensure_future(publisher.wait_applied(version, args.ranks))
                        waiting.add_done_callback(functools.partial(_stamp, applied_at))
                        async with asyncio.timeout(args.version_timeout_s):
                            result = await pending.readable()
                        announced = time.perf_counter()
                        async with asyncio.timeout(args.version_timeout_s):
                            await waiting
                        applied = applied_at[0]
                    else:
                        result = await publisher.publish(version, named)
                        stalled = time.perf_counter()
                        announced = time.perf_counter()
                        async with asyncio.timeout(args.version_timeout_s):
                            await publisher.wait_applied(version, args.ranks)
                        applied = time.perf_counter()
                    device_buffer = publisher._device_buffer
                    gpu_copies = [*publisher.gpu_live.values(), *publisher._gpu_free]
                    row = {
                        "version": version,
                        "publish_mode": args.publish_mode,
                        "stall_s": stalled - t0,
                        "stall_result_s": result.stall_seconds,
                        "publish_s": announced - t0,
                        "readable_result_s": result.readable_seconds,
                        "gpu_readable_s": result.gpu_readable_seconds,
                        "announce_to_all_applied_s": applied - announced,
                        "end_to_end_s": applied - t0,
                        "pool_bytes": publisher.pool.allocated_bytes,
                        "gpu_snapshot_bytes": sum(c.numel() for c in gpu_copies)
                        + (0 if device_buffer is None else device_buffer.numel()),
                        "complete": result.complete,
                    }
                    out["versions"].append(row)
                    say(f"published {row}")
        finally:
            ctx.destroy(linger=0)
    finally:
        broker.stop()
    return out


def _stamp(into: list[float], _: object) -> None:
    into.append(time.perf_counter())


def phase_publish(args: argparse.Namespace) -> None:
    out = asyncio.run(_publish_main(args))
    Path(args.result).write_text(json.dumps(out, indent=1))


# --- subscriber (one per GPU) ---------------------------------------------------------------------


def _count_bad(params: dict[str, torch.Tensor], digests: list[str], device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.set_device(device)
    batch = DigestBatch(digests, device)
    for index, param in enumerate(params.values()):
        batch.record(index, param.reshape(-1).view(torch.uint8))
    return len(batch.failed())


async def _subscribe_main(args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if args.device == "cpu":
        device = torch.device("cpu")
    else:
        device = torch.device("cuda", (args.first_gpu + rank) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    shapes = model_shapes(args.gb)
    params = {n: torch.empty(s, dtype=torch.bfloat16, device=device) for n, s in shapes}
    for p in params.values():
        p.fill_(-3.25)  # poison: a tensor never written cannot pass its digest
    node = barrier = None
    if world > 1 and not args.independent:
        import torch.distributed as dist

        from subscribers.cuda.node_share import NodeShare, exchange_shares

        dist.init_process_group("gloo")
        store = dist.TCPStore(  # type: ignore[attr-defined]
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]) + 7, world, rank == 0
        )
        meta = {n: torch.empty(s, dtype=torch.bfloat16, device="meta") for n, s in shapes}
        layout = plan(meta, bucket_bytes=args.bucket_mib * MiB)
        staging_bytes = sum((n + 255) // 256 * 256 for n in layout.region_bytes)
        node = NodeShare(
            CudaStager(device, staging_bytes), rank=rank, world_size=world, num_events=16
        )
        node.connect(exchange_shares(store, node.export(), prefix="service"))
        barrier = dist.barrier
    swapper = CudaSwapper(params, mode=args.mode, node=node, barrier=barrier)
    receiver = ShmReceiver()
    rows: list[dict[str, Any]] = []
    done = asyncio.Event()

    async def on_applied(manifest: Manifest, pull: PullReport, swap: SwapReport) -> None:
        now = time.time()
        stage = swapper.last_stage
        assert stage is not None
        digests = json.loads((Path(args.work) / f"digests-{manifest.version}.json").read_text())
        bad = await asyncio.to_thread(_count_bad, params, digests, device)
        row = {
            "version": manifest.version,
            "announce_to_applied_s": now - manifest.published_at,
            "pull_s": pull.seconds,
            "stage_s": stage.seconds,
            "register_s": stage.register_s,
            "pause_s": swap.pause_s,
            "verified_bytes": stage.nbytes,
            "source": stage.source,
            "bad_params": bad,
        }
        rows.append(row)
        say(f"rank {rank} applied {row}")
        if manifest.version >= args.versions:
            done.set()

    ctx = zmq.asyncio.Context()
    try:
        async with connect(_client(args.endpoint), role="subscriber", context=ctx) as client:
            subscriber = Subscriber(
                client=client,
                receivers=[receiver],
                swapper=swapper,
                model=MODEL,
                config=PullConfig(pull_timeout_s=args.timeout_s, max_attempts=1),
                staging=Staging(receivers=[receiver], pin_memory=False),
                on_applied=on_applied,
            )
            task = asyncio.create_task(subscriber.run())
            try:
                async with asyncio.timeout(args.timeout_s):
                    # Until the last version, or the first failure (then fail fast).
                    while not (done.is_set() or task.done() or subscriber.failures):
                        await asyncio.sleep(0.05)
                if task.done():
                    task.result()  # run() ended early: raise its error
                if subscriber.failures:
                    raise RuntimeError(f"rank {rank}: a version failed; see the log")
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                subscriber.close()
    finally:
        ctx.destroy(linger=0)
        swapper.close()
        receiver.close()
    result = {
        "rank": rank,
        "device": str(device),
        "failures": subscriber.failures,
        "rows": rows,
        "registered_bytes": swapper.pins.registered_bytes,
    }
    return result, node


def phase_subscribe(args: argparse.Namespace) -> None:
    result, node = asyncio.run(_subscribe_main(args))
    Path(f"{args.result}.{result['rank']}").write_text(json.dumps(result, indent=1))
    if node is not None:
        import torch.distributed as dist

        dist.barrier()
        node.close()
        dist.destroy_process_group()


# --- orchestration --------------------------------------------------------------------------------


def run_service(
    args: argparse.Namespace, log: Log, work: Path, nproc: int, name: str = "service"
) -> dict[str, Any] | None:
    """Start the publisher (with the broker), then the subscriber(s); collect their results."""
    me = [sys.executable, str(Path(__file__).resolve())]
    common = ["--gb", str(args.gb), "--versions", str(args.versions), "--bucket-mib",
              str(args.service_bucket_mib), "--ranks", str(nproc), "--work", str(work),
              "--device", args.device, "--timeout-s", str(args.timeout_s),
              "--version-timeout-s", str(getattr(args, "version_timeout_s", 90)),
              "--publish-mode", getattr(args, "publish_mode", "pack")]  # fmt: skip
    pub_result = work / f"{name}-publisher.json"
    log.line(f"=== {name}: publisher {' '.join([*me, '--phase', 'publish', *common])}")
    publisher = subprocess.Popen(
        [*me, "--phase", "publish", *common, "--result", str(pub_result)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
        start_new_session=True,
    )  # fmt: skip
    endpoint: list[str] = []
    ready = threading.Event()

    def forward() -> None:
        assert publisher.stdout is not None
        for raw in publisher.stdout:
            text = raw.rstrip("\n")
            log.line(f"[{name}-pub] {text}")
            if text.startswith("READY "):
                endpoint.append(text.split()[1])
                ready.set()

    reader = threading.Thread(target=forward, daemon=True)
    reader.start()
    sub_result = work / f"{name}-subscriber.json"
    try:
        if not ready.wait(timeout=args.timeout_s):
            log.line(f"=== {name}: the publisher did not get ready")
            return None
        sub = [*common, "--endpoint", endpoint[0], "--mode", args.mode, "--result", str(sub_result),
               "--first-gpu", str(getattr(args, "first_gpu", 0)),
               *(["--independent"] if getattr(args, "independent", False) else [])]  # fmt: skip
        if nproc > 1:
            port = 29700 + os.getpid() % 200
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                   "--master-addr", "127.0.0.1", "--master-port", str(port), me[1],
                   "--phase", "subscribe", *sub]  # fmt: skip
        else:
            cmd = [*me, "--phase", "subscribe", *sub]
        ok = run_phase(cmd, log, f"{name}-sub", args.timeout_s)
        if ok:
            publisher.wait(timeout=60)
    finally:
        if publisher.poll() is None:
            publisher.kill()
            publisher.wait()
        reader.join(timeout=10)
    if not ok or not pub_result.exists():
        return None
    ranks = [json.loads(Path(f"{sub_result}.{r}").read_text()) for r in range(nproc)]
    return summarize_service(json.loads(pub_result.read_text()), ranks, args.warmup)


def summarize_service(
    pub: dict[str, Any], ranks: list[dict[str, Any]], warmup: int
) -> dict[str, Any]:
    """Medians over the timed versions; per version the slowest rank counts."""
    timed = [row["version"] for row in pub["versions"]][warmup:]
    by_rank = [{row["version"]: row for row in r["rows"]} for r in ranks]

    def worst(key: str) -> list[float]:
        return [max(r[v][key] for r in by_rank) for v in timed if all(v in r for r in by_rank)]

    published = {row["version"]: row for row in pub["versions"]}
    return {
        "versions_timed": timed,
        "ranks": len(ranks),
        "stage_s": worst("stage_s"),
        "pause_s": worst("pause_s"),
        "pull_s": worst("pull_s"),
        "announce_to_applied_s": worst("announce_to_applied_s"),
        "publisher_announce_to_all_applied_s": [
            published[v]["announce_to_all_applied_s"] for v in timed
        ],
        "publish_s": [published[v]["publish_s"] for v in timed],
        "publish_mode": pub["versions"][-1].get("publish_mode", "pack"),
        "stall_s": [published[v]["stall_s"] for v in timed],
        "end_to_end_s": [published[v]["end_to_end_s"] for v in timed],
        "gpu_readable_s": [published[v].get("gpu_readable_s") or 0.0 for v in timed],
        "gpu_snapshot_bytes": pub["versions"][-1].get("gpu_snapshot_bytes", 0),
        "sources": sorted({row.get("source", "host") for r in ranks for row in r["rows"]}),
        "register_s_warmup": [max(r[v]["register_s"] for r in by_rank) for v in published][:warmup],
        "register_s_timed": worst("register_s"),
        "stage_median_s": median(worst("stage_s")),
        "pause_median_s": median(worst("pause_s")),
        "pull_median_s": median(worst("pull_s")),
        "total_median_s": median(worst("announce_to_applied_s")),
        "stage_plus_pause_median_s": median(
            [a + b for a, b in zip(worst("stage_s"), worst("pause_s"), strict=True)]
        ),
        "verified_bytes": min(r[v]["verified_bytes"] for r in by_rank for v in timed),
        "bad_params": sum(row["bad_params"] for r in ranks for row in r["rows"]),
        "checked_versions": sum(len(r["rows"]) for r in ranks),
        "failures": sum(r["failures"] for r in ranks),
        "pool_bytes": pub["versions"][-1]["pool_bytes"],
    }


def service_lines(s: dict[str, Any], floor: float, anchor: float, label: str) -> list[str]:
    """Summary lines; `floor` and `anchor` are seconds from the same run (nan if not run)."""
    total, sp = s["total_median_s"], s["stage_plus_pause_median_s"]
    gb = s["verified_bytes"] / GB
    return [
        f"{label}: ours through Publisher -> broker -> Subscriber + CudaSwapper ({s['ranks']} subscriber process(es), "
        f"versions {s['versions_timed']})",
        f"  stage (H2D + wmix128 on the GPU, plan){' ' * 9} {s['stage_median_s']:7.3f}s {gb / s['stage_median_s']:7.1f} GB/s"
        f"  x floor {s['stage_median_s'] / floor:5.2f}   runs {[round(x, 3) for x in s['stage_s']]}",
        f"  swap pause (gate held, D2D)                   {s['pause_median_s'] * 1e3:7.1f} ms  runs {[round(x * 1e3, 1) for x in s['pause_s']]}",
        f"  stage + pause                                 {sp:7.3f}s  x floor {sp / floor:5.2f}  / anchor {sp / anchor:5.2f}",
        f"  announce -> applied (lease, map, stage, swap, report) {total:7.3f}s  x floor {total / floor:5.2f}  / anchor {total / anchor:5.2f}",
        f"  host pull (map, no host checksums) {s['pull_median_s'] * 1e3:.1f} ms; publish (pack + checksums) "
        f"{median(s['publish_s']):.2f}s; registration in warm-up {[round(x, 2) for x in s['register_s_warmup']]} s, timed {[round(x, 3) for x in s['register_s_timed']]}",
        f"  verified {s['verified_bytes'] / GB:.2f} GB per version on the GPU; params vs source digests: bad {s['bad_params']} "
        f"in {s['checked_versions']} applied versions; failures {s['failures']}; publisher pool {s['pool_bytes'] / GB:.1f} GB",
        f"  trainer side, publish mode {s['publish_mode']}: stall {median(s['stall_s']) * 1e3:.1f} ms (runs {[round(x * 1e3, 1) for x in s['stall_s']]}), "
        f"publish -> readable on the GPU {median(s['gpu_readable_s']) * 1e3:.1f} ms, on the host {median(s['publish_s']):.3f}s, end to end (trainer params -> engine params, verified) "
        f"{median(s['end_to_end_s']):.3f}s (runs {[round(x, 3) for x in s['end_to_end_s']]})",
        f"  memory: host {s['pool_bytes'] / GB:.2f} GB in the publisher's pool (one buffer set per version held), "
        f"GPU snapshot copies {s['gpu_snapshot_bytes'] / GB:.2f} GB in all; subscriber read from {s['sources']}",
    ]  # fmt: skip


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--phase", default="main", choices=["main", "publish", "subscribe"])
    ap.add_argument("--gb", type=float, default=16)
    ap.add_argument("--versions", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--bucket-mib", dest="service_bucket_mib", type=int, default=64)
    # Not --nproc: torchrun would take it for an abbreviation of its --nproc-per-node.
    ap.add_argument("--ranks", type=int, default=1, help="subscriber processes (one per GPU)")
    ap.add_argument("--mode", default="staged", choices=["staged", "streaming"])
    ap.add_argument("--publish-mode", default="pack", choices=["pack", "snapshot", "colocated"])
    ap.add_argument(
        "--broker",
        default="process",
        choices=["process", "thread"],
        help="the broker in its own process (default, as deployed) or a thread of the trainer's",
    )
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument(
        "--first-gpu", type=int, default=0, help="subscriber rank r runs on GPU first+r"
    )
    ap.add_argument(
        "--independent",
        action="store_true",
        help="several subscribers each read on their own (no node share): with colocated, every "
        "engine reads the trainer's GPU copy GPU to GPU",
    )
    ap.add_argument("--timeout-s", type=float, default=300)
    ap.add_argument("--version-timeout-s", type=float, default=90)
    ap.add_argument("--work", default=None)
    ap.add_argument("--endpoint", default=None)
    ap.add_argument("--result", default=None)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    args.bucket_mib = args.service_bucket_mib
    return args


def main(args: argparse.Namespace) -> None:
    out_dir = Path(os.environ.get("OUT", "/tmp/gpu_bench"))
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(f"/tmp/gpu_service.{os.getpid()}")
    work.mkdir()
    log = Log(out_dir / f"gpu_service{args.tag}.log")
    summary = run_service(args, log, work, args.ranks)
    (out_dir / f"gpu_service{args.tag}.json").write_text(json.dumps(summary, indent=1))
    if summary is None:
        log.line("service: FAILED")
        sys.exit(1)
    for text in service_lines(summary, float("nan"), float("nan"), "service"):
        log.line(text)


if __name__ == "__main__":
    a = parse()
    {"main": main, "publish": phase_publish, "subscribe": phase_subscribe}[a.phase](a)
