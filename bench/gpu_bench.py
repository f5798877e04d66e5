"""GPU data path: ours beside checkpoint-engine 0.4.2 and the physical floor, in one run.

On the device (wheels from BENCHMARKS.md installed under /tmp/site):

    PYTHONPATH=/tmp/site python3 bench/gpu_bench.py                 # every case the GPUs allow
    PYTHONPATH=/tmp/site python3 bench/gpu_bench.py --cases single  # 1 GPU: floor, ours, anchor
    PYTHONPATH=/tmp/site python3 bench/gpu_bench.py --cases multi   # N GPUs: rates, ours, anchor
    PYTHONPATH=/tmp/site python3 bench/gpu_bench.py --cases single,service  # + ours via the service

`service` and `service-multi` (bench/gpu_service.py) are ours through the product: Publisher ->
broker -> Subscriber + CudaSwapper (one subscriber process per GPU, NodeShare between them). They run
after the cases below, once the bench publisher has freed its memory.

One synthetic Llama-8B-like bf16 model (the shapes of ../shared/bench/gpu_probe.py, 16.75 GB)
is generated once, on GPU 0, by a *publisher* process that packs it (`publishers.packing`) into
POSIX shared memory regions it registered with CUDA, computes the bucket digests (on the GPU,
publishers.gpu_pack) and per-tensor digests, writes a manifest and stays alive holding the regions, as a
colocated trainer would. Every other phase is its own process (or torchrun job) reading that:

    orchestrator ── publish (holds /dev/shm regions) ─────────────────────────────┐
                 ├─ single:  floor | ours staged (pull + swap) | ours streaming    │ one model,
                 ├─ anchor1: checkpoint-engine, ParameterServer -> receiver proc   │ one machine,
                 ├─ multi:   torchrun N: concurrent H2D, NVLink, ours (NodeShare)  │ one call
                 └─ anchor4: torchrun N: checkpoint-engine broadcast to every GPU ─┘

Every timed figure is the median of --runs runs after a warm-up, synchronised with the device;
receivers check every tensor's digest against the source after every run. The full log and the
results go to $OUT (gpu_bench.log, gpu_bench.json); a short table is printed last.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import mmap
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgspec
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gpu.digest import DigestBatch, digest_of, wmix128_tensor  # noqa: E402
from gpu.host import HostRegistration  # noqa: E402
from publishers.packing import pack, plan  # noqa: E402
from schemas.manifest import BucketSpec, TensorSpec  # noqa: E402
from subscribers.cuda.node_share import NodeShare, exchange_shares, owner_blocks  # noqa: E402
from subscribers.cuda.stage import CudaStager, host_tensor  # noqa: E402

GB = 1e9
MiB = 1 << 20
PAGE = 4096


# --- the model, the manifest, the shared-memory regions ----------------------------------------


def synthetic_model(total_gb: float) -> list[tuple[str, tuple[int, ...]]]:
    """Llama-8B-like shapes, layers repeated up to `total_gb` (as ../shared/bench/gpu_probe.py)."""
    h, ff = 4096, 14336
    per_layer = [("q", (h, h)), ("k", (1024, h)), ("v", (1024, h)), ("o", (h, h)),
                 ("gate", (ff, h)), ("up", (ff, h)), ("down", (h, ff)), ("ln1", (h,)), ("ln2", (h,))]  # fmt: skip
    layer_bytes = sum(torch.Size(s).numel() for _, s in per_layer) * 2
    shapes: list[tuple[str, tuple[int, ...]]] = [("embed", (128256, h))]
    for i in range(max(1, int(total_gb * GB // layer_bytes))):
        shapes += [(f"layers.{i}.{n}", s) for n, s in per_layer]
    return shapes


class BenchManifest(msgspec.Struct, frozen=True):
    region_paths: tuple[str, ...]
    region_nbytes: tuple[int, ...]
    tensors: tuple[TensorSpec, ...]
    buckets: dict[str, tuple[BucketSpec, ...]]
    """Bucket lists keyed by bucket size in MiB."""
    tensor_digests: tuple[str, ...]
    model_bytes: int
    publish: dict[str, Any]

    @property
    def staging_bytes(self) -> int:
        return sum((n + 255) // 256 * 256 for n in self.region_nbytes)


_MAPPINGS: list[mmap.mmap] = []  # kept alive as long as the tensors over them


def map_regions(manifest: BenchManifest) -> list[torch.Tensor]:
    regions = []
    for path, nbytes in zip(manifest.region_paths, manifest.region_nbytes, strict=True):
        fd = os.open(path, os.O_RDWR)
        try:
            mapping = mmap.mmap(fd, nbytes)
        finally:
            os.close(fd)
        _MAPPINGS.append(mapping)
        regions.append(host_tensor(mapping))
    return regions


def tensor_views(manifest: BenchManifest, host: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        t.name: host[t.region][t.offset : t.offset + t.nbytes].view(torch.bfloat16).view(t.shape)
        for t in manifest.tensors
    }


def new_params(manifest: BenchManifest, device: torch.device) -> dict[str, torch.Tensor]:
    """Parameters allocated one by one, as an engine (and the anchor's receiver) has them."""
    return {
        t.name: torch.empty(t.shape, dtype=torch.bfloat16, device=device) for t in manifest.tensors
    }


def count_bad_params(params: dict[str, torch.Tensor], manifest: BenchManifest) -> int:
    """How many parameters differ from the source (per-tensor wmix128, one sync)."""
    device = next(iter(params.values())).device
    batch = DigestBatch(manifest.tensor_digests, device)
    for index, spec in enumerate(manifest.tensors):
        batch.record(index, params[spec.name].reshape(-1).view(torch.uint8))
    return len(batch.failed())


def poison(tensors: list[torch.Tensor]) -> None:
    """Overwrite with a pattern, so a copy that never happened cannot pass the check."""
    for t in tensors:
        t.fill_(0xA5 if t.dtype == torch.uint8 else -3.25)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def say(*parts: object) -> None:
    print(*parts, flush=True)


def write_json(path: str, obj: object) -> None:
    Path(path).write_text(json.dumps(obj, indent=1, default=str))


# --- publisher ------------------------------------------------------------------------------------


def phase_publish(args: argparse.Namespace) -> None:
    torch.cuda.set_device(0)
    started = time.perf_counter()
    g = torch.Generator(device="cuda").manual_seed(1234)
    named = {
        n: torch.randn(s, generator=g, device="cuda", dtype=torch.float32).to(torch.bfloat16)
        for n, s in synthetic_model(args.gb)
    }
    torch.cuda.synchronize()
    timings: dict[str, Any] = {"generate_s": time.perf_counter() - started}
    sizes = [int(x) for x in args.bucket_mib.split(",")]
    layout = plan(named, bucket_bytes=sizes[0] * MiB, region_bytes=args.region_mib * MiB)
    paths = [f"{args.shm_dir}/ws-bench-{os.getpid()}-{k}" for k in range(len(layout.region_bytes))]
    regions, registrations = [], []
    try:
        t0 = time.perf_counter()
        for path, nbytes in zip(paths, layout.region_bytes, strict=True):
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            try:
                os.ftruncate(fd, nbytes)
                mapping = mmap.mmap(fd, nbytes)
            finally:
                os.close(fd)
            _MAPPINGS.append(mapping)
            regions.append(host_tensor(mapping))
            registrations.append(HostRegistration(regions[-1]))
        timings["shm_create_register_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        reference = pack(layout, named, regions)  # D2H into the registered regions + GPU digests
        timings["pack_and_numpy_checksums_s"] = time.perf_counter() - t0
        # Digests for every bucket size with the torch twin, from the packed bytes on the GPU;
        # for the first size they must equal the numpy reference digests, bit for bit.
        t0 = time.perf_counter()
        buckets: dict[str, tuple[BucketSpec, ...]] = {}
        twin: dict[int, list[str]] = {size: [] for size in sizes}
        for k, region in enumerate(regions):
            on_gpu = region.to("cuda")
            for size in sizes:
                sub = dataclasses.replace(
                    layout, region_bytes=(layout.region_bytes[k],), bucket_bytes=size * MiB
                )
                twin[size] += [
                    digest_of(wmix128_tensor(on_gpu[o : o + n])) for _, o, n in sub.bucket_ranges()
                ]
            del on_gpu
        for size in sizes:
            bl = dataclasses.replace(layout, bucket_bytes=size * MiB)
            buckets[str(size)] = bl.shard([() for _ in paths], twin[size], rank=0).buckets
        mismatches = sum(a != b for a, b in zip(reference, twin[sizes[0]], strict=True))
        timings["twin_digests_s"] = time.perf_counter() - t0
        timings["twin_vs_numpy_buckets"] = len(reference)
        timings["twin_vs_numpy_mismatches"] = mismatches
        digests = tuple(
            digest_of(wmix128_tensor(named[t.name].reshape(-1).view(torch.uint8)))
            for t in layout.tensors
        )
        manifest = BenchManifest(
            region_paths=tuple(paths),
            region_nbytes=layout.region_bytes,
            tensors=layout.tensors,
            buckets=buckets,
            tensor_digests=digests,
            model_bytes=sum(t.nbytes for t in layout.tensors),
            publish=timings,
        )
        Path(args.manifest).write_bytes(msgspec.json.encode(manifest))
        del named
        torch.cuda.empty_cache()
        say(
            f"publish: {len(layout.tensors)} tensors, {manifest.model_bytes / GB:.2f} GB in {len(paths)} regions; {timings}"
        )
        if mismatches:
            say(f"publish: TWIN DIGESTS DIFFER FROM THE NUMPY REFERENCE in {mismatches} buckets")
        say("READY")
        sys.stdin.read()  # hold the regions until the orchestrator closes our stdin
    finally:
        for registration in registrations:
            registration.close()
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def load_manifest(path: str) -> BenchManifest:
    return msgspec.json.decode(Path(path).read_bytes(), type=BenchManifest)


# --- one GPU: floor, ours staged, ours streaming -----------------------------------------------------


def _timed(fn: Any) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def phase_single(args: argparse.Namespace) -> None:
    manifest = load_manifest(args.manifest)
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    out: dict[str, Any] = {
        "model_GB": manifest.model_bytes / GB,
        "gpu": torch.cuda.get_device_name(0),
    }
    host = map_regions(manifest)
    t0 = time.perf_counter()
    registrations = [HostRegistration(h) for h in host]
    out["register_s"] = time.perf_counter() - t0
    out["register_s_per_GiB"] = out["register_s"] / (sum(manifest.region_nbytes) / (1 << 30))
    views = tensor_views(manifest, host)
    stager = CudaStager(device, manifest.staging_bytes)
    stager.prepare(manifest.region_nbytes)
    params = new_params(manifest, device)
    flat = torch.empty(manifest.staging_bytes, dtype=torch.uint8, device=device)
    flat_params = {
        t.name: stager_like_view(flat, stager, t).view(torch.bfloat16).view(t.shape)
        for t in manifest.tensors
    }
    sizes = list(manifest.buckets)
    head = sizes[0]
    n = manifest.model_bytes
    say(
        f"single: registered {sum(manifest.region_nbytes) / GB:.2f} GB in {out['register_s']:.2f}s; buckets {sizes} MiB"
    )

    out.update(checksum_rates(device))

    plan, plan_fused = (stager.plan_swap(manifest.tensors, p) for p in (params, flat_params))
    floor, staged, pause, pause_planned, pause_fused, stream_s, bad = [], [], [], [], [], [], []
    for run in range(args.runs + 1):  # run 0 is the warm-up; floor and ours alternate
        poison(list(params.values()))
        dt = _timed(lambda: [params[name].copy_(v, non_blocking=True) for name, v in views.items()])
        bad.append(("floor", count_bad_params(params, manifest)))
        poison([stager.staging, *params.values()])
        torch.cuda.synchronize()
        result = stager.pull(host, manifest.buckets[head])
        swap = stager.swap_in(manifest.tensors, params)  # planning inside the pause
        bad.append(("ours", count_bad_params(params, manifest) + len(result.failed)))
        poison(list(params.values()))
        planned = stager.apply_swap(plan)  # planned while the engine served: copies only
        bad.append(("ours_planned", count_bad_params(params, manifest)))
        fused = stager.apply_swap(plan_fused)
        if run:
            floor.append(dt)
            staged.append(result.seconds)
            pause.append(swap.pause_s)
            pause_planned.append(planned.pause_s)
            pause_fused.append(fused.pause_s)
        say(f"single run {run}: floor {dt:.3f}s  ours pull {result.seconds:.3f}s + swap {swap.pause_s * 1e3:.1f}ms "
            f"({swap.num_copies} copies; planned ahead {planned.pause_s * 1e3:.1f}ms; fused {fused.pause_s * 1e3:.1f}ms, "
            f"{fused.num_copies} copies)  failed {result.failed}")  # fmt: skip
    for run in range(args.runs + 1):
        poison(list(params.values()))
        torch.cuda.synchronize()
        result = stager.pull_streaming(host, manifest.buckets[head], manifest.tensors, params)
        bad.append(("streaming", count_bad_params(params, manifest) + len(result.failed)))
        if run:
            stream_s.append(result.seconds)
    by_size = {}
    for size in sizes[1:]:
        times = []
        for run in range(max(2, args.runs // 2) + 1):
            poison([stager.staging])
            torch.cuda.synchronize()
            result = stager.pull(host, manifest.buckets[size])
            bad.append((f"ours{size}", len(result.failed)))
            if run:
                times.append(result.seconds)
        by_size[size] = median(times)
    # a bucket whose digest is wrong must be reported, and only it
    wrong = list(manifest.buckets[head])
    wrong[3] = msgspec.structs.replace(wrong[3], checksum="0" * 32)
    out["detects_bad_bucket"] = stager.pull(host, wrong).failed == (3,)
    bad.append(("fused_swap", count_bad_params(flat_params, manifest)))
    # breakdown of the pull: H2D alone, verification alone
    buckets = manifest.buckets[head]

    def h2d_only() -> None:
        with torch.cuda.stream(stager.copy_stream):
            for b in buckets:
                stager.view(b.region, b.offset, b.nbytes).copy_(
                    host[b.region][b.offset : b.offset + b.nbytes], non_blocking=True
                )

    def verify_only() -> None:
        batch = DigestBatch([b.checksum for b in buckets], device)
        for i, b in enumerate(buckets):
            batch.record(i, stager.view(b.region, b.offset, b.nbytes))
        assert not batch.failed()

    def d2h_only() -> None:  # the host copy's floor: the staging holds these same bytes now
        with torch.cuda.stream(stager.copy_stream):
            for b in buckets:
                host[b.region][b.offset : b.offset + b.nbytes].copy_(
                    stager.view(b.region, b.offset, b.nbytes), non_blocking=True
                )

    out["breakdown_h2d_only_s"] = median([_timed(h2d_only) for _ in range(3)])
    out["breakdown_d2h_only_s"] = median([_timed(d2h_only) for _ in range(3)])
    out["breakdown_verify_only_s"] = median([_timed(verify_only) for _ in range(3)])
    out["breakdown_d2d_one_copy_s"] = median(
        [_timed(lambda: flat.copy_(stager.staging)) for _ in range(3)]
    )
    out.update(
        floor_s=floor, floor_median_s=median(floor),
        ours_pull_s=staged, ours_pull_median_s=median(staged),
        ours_pause_s=pause, ours_pause_median_s=median(pause),
        ours_pause_planned_median_s=median(pause_planned),
        ours_pause_fused_median_s=median(pause_fused),
        ours_total_median_s=median([a + b for a, b in zip(staged, pause, strict=True)]),
        ours_streaming_s=stream_s, ours_streaming_median_s=median(stream_s),
        ours_pull_median_s_by_bucket_mib={head: median(staged), **by_size},
        head_bucket_mib=head,
        bad=[b for b in bad if b[1]], checked=len(bad),
    )  # fmt: skip
    say(f"single: floor {out['floor_median_s']:.3f}s ({n / out['floor_median_s'] / GB:.1f} GB/s)  ours total "
        f"{out['ours_total_median_s']:.3f}s  streaming {out['ours_streaming_median_s']:.3f}s  bad {out['bad']}")  # fmt: skip
    for registration in registrations:
        registration.close()
    write_json(args.result, out)


def checksum_rates(device: torch.device) -> dict[str, float]:
    """wmix128 throughput on the GPU (two passes) beside one plain int64 sum, and on the CPU."""
    buf = torch.randint(0, 256, (1 << 30,), dtype=torch.uint8, device=device)
    small = buf[: 64 * MiB]
    words = buf.view(torch.int64)
    cpu = torch.randint(0, 256, (256 * MiB,), dtype=torch.uint8)
    t0 = time.perf_counter()
    wmix128_tensor(cpu)
    cpu_s = time.perf_counter() - t0
    return {
        "wmix128_gpu_GBps_1GiB": buf.numel()
        / median([_timed(lambda: wmix128_tensor(buf)) for _ in range(7)])
        / GB,
        "wmix128_gpu_GBps_64MiB": small.numel()
        / median([_timed(lambda: wmix128_tensor(small)) for _ in range(15)])
        / GB,
        "int64_sum_gpu_GBps_1GiB": buf.numel()
        / median([_timed(lambda: words.sum()) for _ in range(7)])
        / GB,
        "wmix128_cpu_GBps_256MiB": cpu.numel() / cpu_s / GB,
    }


def stager_like_view(flat: torch.Tensor, stager: CudaStager, spec: TensorSpec) -> torch.Tensor:
    start = stager.offset_of(spec.region, spec.offset, spec.nbytes)
    return flat[start : start + spec.nbytes]


# --- N GPUs: concurrent H2D, NVLink, ours through NodeShare (under torchrun) ------------------------


def own_spans(
    manifest: BenchManifest, sizes: list[str], rank: int, world: int
) -> dict[int, tuple[int, int]]:
    """Per region, the byte range covering every bucket this rank fetches itself."""
    spans: dict[int, tuple[int, int]] = {}
    for size in sizes:
        buckets = manifest.buckets[size]
        for index in owner_blocks(len(buckets), world)[rank]:
            b = buckets[index]
            lo, hi = spans.get(b.region, (b.offset, b.offset + b.nbytes))
            spans[b.region] = (min(lo, b.offset), max(hi, b.offset + b.nbytes))
    return spans


def phase_multi(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    dist.init_process_group("gloo")
    store = dist.TCPStore(  # type: ignore[attr-defined]
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]) + 7, world, rank == 0
    )
    manifest = load_manifest(args.manifest)
    sizes = list(manifest.buckets)
    head = sizes[0]
    host = map_regions(manifest)
    # register only the host ranges this rank fetches (for any bucket size; page-rounded), once
    t0 = time.perf_counter()
    registrations = []
    for region, (lo, hi) in own_spans(manifest, list(manifest.buckets), rank, world).items():
        lo, hi = lo // PAGE * PAGE, min(-(-hi // PAGE) * PAGE, host[region].numel())
        registrations.append(HostRegistration(host[region][lo:hi]))
    register_s = time.perf_counter() - t0
    stager = CudaStager(device, manifest.staging_bytes)
    stager.prepare(manifest.region_nbytes)
    params = new_params(manifest, device)
    shares = {
        "events": NodeShare(stager, rank=rank, world_size=world, num_events=args.num_events),
        "barrier": NodeShare(stager, rank=rank, world_size=world, use_events=False),
    }
    for name, share in shares.items():
        share.connect(exchange_shares(store, share.export(), prefix=name))
    spans = own_spans(manifest, [head], rank, world)
    mine = [stager.view(r, lo, hi - lo) for r, (lo, hi) in spans.items()]
    sources = [host[r][lo:hi] for r, (lo, hi) in spans.items()]
    own_bytes = sum(t.numel() for t in mine)
    res: dict[str, Any] = {
        "rank": rank,
        "device": str(device),
        "register_s": register_s,
        "own_bytes": own_bytes,
    }

    def sync_all() -> None:
        for d in range(torch.cuda.device_count()):
            torch.cuda.synchronize(d)

    def barrier_timed(fn: Any) -> float:
        sync_all()
        dist.barrier()
        t = time.perf_counter()
        fn()
        sync_all()
        return time.perf_counter() - t

    def h2d() -> None:
        for target, source in zip(mine, sources, strict=True):
            target.copy_(source, non_blocking=True)

    res["h2d_concurrent_s"] = median([barrier_timed(h2d) for _ in range(args.runs + 1)][1:])
    solo = []
    for r in range(world):
        t = median([barrier_timed(h2d if r == rank else lambda: None) for _ in range(3)][1:])
        if r == rank:
            solo.append(t)
    res["h2d_solo_s"] = solo[0]
    peers = shares["events"]._peers  # the bench may look inside: NVLink rate alone
    blocks = owner_blocks(len(manifest.buckets[head]), world)

    def block_range(r: int) -> tuple[int, int]:
        first, last = manifest.buckets[head][blocks[r][0]], manifest.buckets[head][blocks[r][-1]]
        lo = stager.offset_of(first.region, first.offset)
        return lo, stager.offset_of(last.region, last.offset, last.nbytes) + last.nbytes

    def nvlink() -> None:
        for r, peer in peers.items():
            if not blocks[r]:
                continue
            lo, hi = block_range(r)
            with torch.cuda.stream(peer.source_stream), torch.cuda.stream(peer.target_stream):
                stager.staging[lo:hi].copy_(peer.staging[lo:hi], non_blocking=True)

    res["nvlink_gather_s"] = median([barrier_timed(nvlink) for _ in range(args.runs + 1)][1:])
    res["nvlink_gather_bytes"] = sum(
        block_range(r)[1] - block_range(r)[0] for r in peers if blocks[r]
    )
    plan = stager.plan_swap(manifest.tensors, params)  # made before the boundary
    cases = [("events", head), ("barrier", head)] + [("events", s) for s in sizes[1:]]
    for mode, size in cases:
        pulls, pauses, bad = [], [], 0
        for run in range(args.runs + 1):
            poison([stager.staging])
            sync_all()
            dist.barrier()
            result = shares[mode].pull(host, manifest.buckets[size], barrier=dist.barrier)
            swap = stager.apply_swap(plan) if size == head else None
            bad += len(result.failed) + (count_bad_params(params, manifest) if swap else 0)
            if run:
                pulls.append(result.seconds)
                if swap:
                    pauses.append(swap.pause_s)
        res[f"{mode}_{size}"] = {"pull_s": pulls, "pause_s": pauses, "bad": bad}
    for registration in registrations:
        registration.close()
    store.set(f"result/{rank}", json.dumps(res))
    if rank == 0:
        write_json(args.result, [json.loads(store.get(f"result/{r}")) for r in range(world)])
    dist.barrier()
    for share in shares.values():
        share.close()
    dist.destroy_process_group()


# --- orchestrator -----------------------------------------------------------------------------------


class Log:
    def __init__(self, path: Path) -> None:
        self.file = path.open("a")
        self.lock = threading.Lock()

    def line(self, text: str) -> None:
        with self.lock:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()
            self.file.write(text + "\n")
            self.file.flush()


def _forward(stream: Any, log: Log, prefix: str, ready: threading.Event | None = None) -> None:
    for raw in stream:
        text = raw.rstrip("\n")
        log.line(f"[{prefix}] {text}")
        if ready is not None and text == "READY":
            ready.set()


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    env.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    env.setdefault("NVSHMEM_DISABLE_NVLS", "1")
    return env


def run_phase(cmd: list[str], log: Log, name: str, timeout_s: float) -> bool:
    log.line(f"=== {name}: {' '.join(cmd)}")
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(),
        start_new_session=True,
    )
    reader = threading.Thread(target=_forward, args=(proc.stdout, log, name), daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        log.line(
            f"=== {name}: TIMED OUT after {timeout_s:.0f}s, killing its process group {proc.pid}"
        )
        os.killpg(proc.pid, signal.SIGKILL)
        code = proc.wait()
    reader.join(timeout=10)
    log.line(f"=== {name}: exit {code} after {time.perf_counter() - started:.1f}s")
    return code == 0


def main(args: argparse.Namespace) -> None:
    out_dir = Path(os.environ.get("OUT", "/tmp/gpu_bench"))
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(f"/tmp/gpu_bench.{os.getpid()}")
    work.mkdir()
    log = Log(out_dir / f"gpu_bench{args.tag}.log")
    num_gpus = torch.cuda.device_count()
    cases = (
        args.cases.split(",")
        if args.cases != "auto"
        else (["single", "service"] + (["multi", "service-multi"] if num_gpus > 1 else []))
    )
    nproc = num_gpus if args.nproc is None else args.nproc
    if args.shm_dir is None:
        need = args.gb * GB * 1.1
        args.shm_dir = "/dev/shm" if shutil.disk_usage("/dev/shm").free > need else "/tmp"
    info = {"torch": torch.__version__, "gpus": [torch.cuda.get_device_name(i) for i in range(num_gpus)],
            "cpus": os.cpu_count(), "cases": cases, "shm_dir": args.shm_dir, "args": vars(args)}  # fmt: skip
    log.line(f"gpu_bench {json.dumps(info)}")
    if num_gpus > 1:
        topo = subprocess.run(
            ["nvidia-smi", "topo", "-m"], capture_output=True, text=True, check=False
        )
        log.line(topo.stdout)
    me = [sys.executable, str(Path(__file__).resolve())]
    anchor = [sys.executable, str(Path(__file__).resolve().parent / "gpu_anchor.py")]
    manifest = str(work / "manifest.json")
    common = [
        "--gb",
        str(args.gb),
        "--runs",
        str(args.runs),
        "--manifest",
        manifest,
        "--bucket-mib",
        args.bucket_mib,
    ]
    results: dict[str, Any] = {"info": info}
    publisher = None
    if {"single", "multi"} & set(cases):  # the primitive-level cases, the floor and the anchor
        publisher = subprocess.Popen(
            [*me, "--phase", "publish", *common, "--region-mib", str(args.region_mib), "--shm-dir", args.shm_dir],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
        )  # fmt: skip
    ready = threading.Event()
    if publisher is not None:
        threading.Thread(
            target=_forward, args=(publisher.stdout, log, "publish", ready), daemon=True
        ).start()
    try:
        if publisher is None:
            pass
        elif not ready.wait(timeout=args.timeout_s):
            raise RuntimeError("the publisher did not get ready")
        else:
            results["publish"] = load_manifest(manifest).publish
        port = 29600 + os.getpid() % 200
        plans: list[tuple[str, list[str]]] = []
        if "single" in cases:
            plans.append(("single", [*me, "--phase", "single"]))
            if not args.skip_anchor:
                plans.append(("anchor1", [*anchor, "--phase", "anchor1", "--port", str(port + 40)]))
                plans.append(
                    ("anchor1e2e", [*anchor, "--phase", "anchor1e2e", "--port", str(port + 60)])
                )
        if "multi" in cases:
            run = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                   "--master-addr", "127.0.0.1"]  # fmt: skip
            plans.append(("multi", [*run, "--master-port", str(port), *me[1:], "--phase", "multi",
                                    "--num-events", str(args.num_events)]))  # fmt: skip
            if not args.skip_anchor:
                plans.append(
                    (
                        "anchor4",
                        [*run, "--master-port", str(port + 20), *anchor[1:], "--phase", "anchor4"],
                    )
                )
        for name, cmd in plans:
            result = str(work / f"{name}.json")
            if (
                run_phase([*cmd, *common, "--result", result], log, name, args.timeout_s)
                and Path(result).exists()
            ):
                results[name] = json.loads(Path(result).read_text())
    finally:
        if publisher is not None:
            if publisher.stdin is not None:
                publisher.stdin.close()
            try:
                publisher.wait(timeout=60)
            except subprocess.TimeoutExpired:
                publisher.kill()
    # Ours through the service, once the primitive-level publisher has freed its memory.
    try:
        for name, ranks in (("service", 1), ("service-multi", nproc)):
            if name in cases:
                import gpu_service  # type: ignore[import-not-found]

                if name == "service-multi" and args.publish_mode == "colocated":
                    # The trainer on GPU 0, an engine on each other GPU reading its copy GPU
                    # to GPU (issue 14), each on its own: no node share.
                    ranks, args.independent, args.first_gpu = nproc - 1, True, 1
                results[name] = gpu_service.run_service(args, log, work, ranks, name=name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    (out_dir / f"gpu_bench{args.tag}.json").write_text(json.dumps(results, indent=1, default=str))
    for text in summarize(results):
        log.line(text)


def summarize(results: dict[str, Any]) -> list[str]:
    lines = ["", "=== summary (medians; ratios from this one run)"]
    pub = results.get("publish", {})
    lines.append(
        f"twin digests vs numpy reference: {pub.get('twin_vs_numpy_mismatches', '?')} mismatches in {pub.get('twin_vs_numpy_buckets', '?')} buckets"
    )
    s, a1 = results.get("single"), results.get("anchor1")
    if s:
        gb = s["model_GB"]
        floor, total = s["floor_median_s"], s["ours_total_median_s"]
        anchor = a1["update_median_s"] if a1 else float("nan")
        lines += [
            f"1 GPU, {gb:.2f} GB bf16, pinned host -> GPU params       time      GB/s   /floor  /anchor",
            _row("floor: per-tensor pinned H2D", s["floor_median_s"], gb, floor, anchor),
            _row(f"anchor: checkpoint-engine update{' ' * 8}", anchor, gb, floor, anchor),
            _row(f"ours staged: pull ({s['head_bucket_mib']} MiB, verified)", s["ours_pull_median_s"], gb, floor, anchor),
            _row("ours staged: pull + swap (total)", total, gb, floor, anchor),
            _row("ours streaming (into params, verified)", s["ours_streaming_median_s"], gb, floor, anchor),
            f"  swap pause (goal <= 20 ms), per-tensor params: {s['ours_pause_median_s'] * 1e3:.1f} ms planning included, "
            f"{s.get('ours_pause_planned_median_s', float('nan')) * 1e3:.1f} ms planned ahead; params laid out like the staging: "
            f"{s['ours_pause_fused_median_s'] * 1e3:.1f} ms (one copy)",
            f"  pull by bucket MiB: { {k: round(v, 4) for k, v in s['ours_pull_median_s_by_bucket_mib'].items()} }",
            f"  breakdown: H2D alone {s['breakdown_h2d_only_s']:.3f}s, verify alone {s['breakdown_verify_only_s'] * 1e3:.1f} ms, "
            f"D2H alone {s['breakdown_d2h_only_s']:.3f}s, one D2D copy {s['breakdown_d2d_one_copy_s'] * 1e3:.1f} ms",
            f"  wmix128 GB/s: GPU {s['wmix128_gpu_GBps_1GiB']:.0f} (1 GiB), {s['wmix128_gpu_GBps_64MiB']:.0f} (64 MiB), "
            f"int64 sum {s['int64_sum_gpu_GBps_1GiB']:.0f}; CPU {s['wmix128_cpu_GBps_256MiB']:.1f}",
            f"  goal ours <= 1.10 x floor: {total / floor:.3f} -> {'MET' if total <= 1.10 * floor else 'MISSED'}; "
            f"bad runs {s['bad']} of {s['checked']}; bad bucket detected {s['detects_bad_bucket']}",
        ]  # fmt: skip
        if a1:
            lines.append(
                f"  anchor: updates {[round(x, 3) for x in a1['update_s']]}, register {a1['register_s']:.1f}s, bad {a1['bad']}"
            )
    svc = results.get("service")
    if svc:
        import gpu_service

        floor = s["floor_median_s"] if s else float("nan")
        anchor = a1["update_median_s"] if a1 else float("nan")
        lines += gpu_service.service_lines(svc, floor, anchor, "1 GPU")
        if s and svc.get("publish_s"):
            d2h = s["breakdown_d2h_only_s"]
            lines.append(
                f"  publish -> readable on the host {median(svc['publish_s']):.3f}s = "
                f"{median(svc['publish_s']) / d2h:.3f} x the D2H floor ({d2h:.3f}s, this run)"
            )
        e2e = results.get("anchor1e2e")
        if e2e:
            ours = median(svc["end_to_end_s"])
            lines.append(
                f"  anchor end to end from the trainer's GPU tensors (register_checkpoint + gather_metas + update): "
                f"{e2e['end_to_end_median_s']:.3f}s (runs {[round(x, 3) for x in e2e['end_to_end_s']]}, register "
                f"{e2e['register_median_s']:.3f}s), bad {e2e['bad']}; ours end to end {ours:.3f}s = "
                f"{e2e['end_to_end_median_s'] / ours:.1f} x faster"
            )  # fmt: skip
    elif "service" in results:
        lines.append("1 GPU service case: FAILED (see the log)")
    m, a4 = results.get("multi"), results.get("anchor4")
    if m:
        world = len(m)
        gb = results.get("single", {}).get("model_GB") or sum(r["own_bytes"] for r in m) / GB
        conc = [_ratio(r["own_bytes"] / GB, r["h2d_concurrent_s"]) for r in m]
        solo = [_ratio(r["own_bytes"] / GB, r["h2d_solo_s"]) for r in m]
        nvl = [_ratio(r["nvlink_gather_bytes"] / GB, r["nvlink_gather_s"]) for r in m]
        share = max(r["own_bytes"] for r in m) / GB
        h2d_floor = _ratio(share, min(conc))
        floor_serial = h2d_floor + _ratio(max(r["nvlink_gather_bytes"] for r in m) / GB, min(nvl))
        lines += [
            f"{world} GPUs, every GPU receives {gb:.2f} GB",
            f"  H2D per GPU, all {world} at once: {[round(x, 1) for x in conc]} GB/s; alone: {[round(x, 1) for x in solo]} GB/s",
            f"  NVLink gather per GPU (all peers at once): {[round(x) for x in nvl]} GB/s",
            f"  floor at the measured rates: H2D of 1/{world} {h2d_floor:.3f}s, then the gather: {floor_serial:.3f}s",
        ]
        keys = [k for k in m[0] if isinstance(m[0][k], dict)]
        for key in keys:
            per_run = [max(r[key]["pull_s"][i] for r in m) for i in range(len(m[0][key]["pull_s"]))]
            pauses = [p for r in m for p in r[key]["pause_s"]]
            pull = median(per_run)
            pause = max(pauses) if pauses else 0.0
            anchor = a4["update_median_s"] if a4 else float("nan")
            total = pull + pause
            lines.append(
                f"  ours {key}: all GPUs verified {pull:.3f}s (runs {[round(x, 3) for x in per_run]}), swap pause max "
                f"{pause * 1e3:.1f} ms, total {total:.3f}s = {_ratio(total, h2d_floor):.2f} x H2D floor, "
                f"{_ratio(anchor, total):.1f}x faster than the anchor, goal <= 0.2 s "
                f"{'MET' if total <= 0.2 else 'MISSED'}, bad {sum(r[key]['bad'] for r in m)}"
            )
        if a4:
            lines.append(
                f"  anchor: update {a4['update_median_s']:.3f}s (runs {[round(x, 3) for x in a4['update_s']]}), bad {a4['bad']}"
            )
    svm = results.get("service-multi")
    if svm:
        import gpu_service

        floor = float("nan")
        if m:
            floor = (
                max(r["own_bytes"] for r in m)
                / GB
                / min(_ratio(r["own_bytes"] / GB, r["h2d_concurrent_s"]) for r in m)
            )
        anchor = a4["update_median_s"] if a4 else float("nan")
        shape = (
            "engines on GPUs 1.. read GPU 0's copy"
            if svm.get("sources") == ["cuda_ipc_peer"]
            else "NodeShare"
        )
        lines += gpu_service.service_lines(svm, floor, anchor, f"{svm['ranks']} GPUs ({shape})")
    elif "service-multi" in results:
        lines.append("multi-GPU service case: FAILED (see the log)")
    return lines


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def _row(label: str, t: float, gb: float, floor: float, anchor: float) -> str:
    return f"  {label:46s} {t:7.3f}s {gb / t:7.1f} {t / floor:7.2f} {t / anchor:7.2f}"


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--phase", default="main", choices=["main", "publish", "single", "multi"])
    ap.add_argument("--cases", default="auto", help="single,multi or auto")
    ap.add_argument("--gb", type=float, default=16)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--bucket-mib", default="64,256,1024", help="first is the headline size")
    ap.add_argument("--region-mib", type=int, default=1024)
    ap.add_argument("--num-events", type=int, default=16)
    ap.add_argument(
        "--nproc", type=int, default=None, help="ranks for multi (default: one per GPU)"
    )
    ap.add_argument("--skip-anchor", action="store_true")
    ap.add_argument("--timeout-s", type=float, default=300)
    ap.add_argument("--tag", default="", help="suffix of the log and json names")
    ap.add_argument("--shm-dir", default=None)
    service = ap.add_argument_group("service cases (bench/gpu_service.py)")
    service.add_argument("--versions", type=int, default=7, help="versions published")
    service.add_argument("--warmup", type=int, default=2, help="first versions not counted")
    service.add_argument("--service-bucket-mib", type=int, default=64)
    service.add_argument("--mode", default="staged", choices=["staged", "streaming"])
    service.add_argument(
        "--publish-mode",
        default="pack",
        choices=["pack", "snapshot", "colocated"],
        help="snapshot: publish returns after the GPU snapshot (stall), the host copy follows; "
        "colocated: the same, and the GPU copy is offered over CUDA IPC (same-GPU subscriber)",
    )
    service.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--manifest", default=None)
    ap.add_argument("--result", default=None)
    return ap.parse_args()


if __name__ == "__main__":
    a = parse()
    {"main": main, "publish": phase_publish, "single": phase_single, "multi": phase_multi}[a.phase](
        a
    )
