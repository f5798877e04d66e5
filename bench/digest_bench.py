"""Bucket digest throughput: wmix128 beside crc32c, xxh3 and the old wsum64, on CPU and GPU.

    cpu   one core (pinned with sched_setaffinity), 256 MiB buffers of random bytes; rounds
          alternate between the algorithms, 5 rounds, median and spread per algorithm
    gpu   1 GiB and 16 GiB buffers on one CUDA device: wmix128 as the fused Triton kernel (a few
          launch shapes) and as torch ops, the old wsum64 (torch ops, row/column), one plain
          int64 sum, 16 x 64 MiB buckets back to back, and a D2D copy of the same buffer as the
          floor; CUDA events, warm-up first, median of the repeats; before timing, the backends
          are checked against each other and against numpy (bit for bit)

    python bench/digest_bench.py cpu [--json PATH]     (crc32c and xxhash: pip install .[bench])
    python bench/digest_bench.py gpu [--json PATH]

The table is printed last; `--json` keeps every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from streamer.checksum import wmix128, wmix128_words

GB = 1e9
MiB = 1 << 20
GiB = 1 << 30


# --- the old digest, kept here only to be measured ------------------------------------------------


def wsum64_numpy(words: np.ndarray) -> tuple[int, int]:
    """The linear wsum64 this project used before wmix128 (row/column reduction, numpy)."""
    block = 4096
    with np.errstate(over="ignore"):
        full = words.size // block * block
        grid = words[:full].reshape(-1, block)
        rows = np.add.reduce(grid, axis=1, dtype=np.int64)
        cols = np.add.reduce(grid, axis=0, dtype=np.int64)
        row_weights = np.arange(rows.size, dtype=np.int64) * block
        col_weights = np.arange(1, block + 1, dtype=np.int64)
        s1 = int(rows.sum(dtype=np.int64))
        s2 = int((rows * row_weights).sum(dtype=np.int64)) + int(
            (cols * col_weights).sum(dtype=np.int64)
        )
    return s1, s2


def wsum64_torch(words: Any) -> Any:
    """The same, in torch ops (the old GPU twin): two passes, row sums and column sums."""
    import torch

    block = 4096
    grid = words.view(-1, block)
    rows = grid.sum(dim=1)
    cols = grid.sum(dim=0)
    row_weights = torch.arange(rows.numel(), dtype=torch.int64, device=words.device).mul_(block)
    col_weights = torch.arange(1, block + 1, dtype=torch.int64, device=words.device)
    return torch.stack([rows.sum(), (rows * row_weights).sum() + (cols * col_weights).sum()])


# --- CPU ------------------------------------------------------------------------------------------


def cpu_bench(rounds: int) -> dict[str, object]:
    import crc32c
    import xxhash

    core = sorted(os.sched_getaffinity(0))[-1]
    os.sched_setaffinity(0, {core})
    data = np.random.default_rng(0).integers(0, 256, 256 * MiB, dtype=np.uint8)
    raw = data.tobytes()
    words = data.view(np.uint64)
    signed = data.view(np.int64)
    algorithms: dict[str, Callable[[], object]] = {
        "wmix128 (ours, numpy)": lambda: wmix128_words(words),
        "crc32c (hardware crc32 instruction)": lambda: crc32c.crc32c(raw),
        "xxh3_64": lambda: xxhash.xxh3_64_intdigest(raw),
        "xxh3_128": lambda: xxhash.xxh3_128_intdigest(raw),
        "wsum64 (old, numpy)": lambda: wsum64_numpy(signed),
        "memcpy (numpy copy into a reused buffer)": lambda: np.copyto(scratch, data),
    }
    scratch = np.empty_like(data)
    assert wmix128(raw) == wmix128_words(words)
    for run in algorithms.values():
        run()  # warm-up: pages touched, code loaded
    seconds: dict[str, list[float]] = {name: [] for name in algorithms}
    for _ in range(rounds):
        for name, run in algorithms.items():
            started = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - started)
    rows = {
        name: {
            "GBps_median": data.nbytes / statistics.median(times) / GB,
            "GBps_min": data.nbytes / max(times) / GB,
            "GBps_max": data.nbytes / min(times) / GB,
        }
        for name, times in seconds.items()
    }
    return {
        "machine": f"{os.uname().nodename}, core {core} of {os.cpu_count()}",
        "load_average": os.getloadavg(),
        "buffer_bytes": data.nbytes,
        "rounds": rounds,
        "rows": rows,
    }


# --- GPU ------------------------------------------------------------------------------------------


def gpu_bench() -> dict[str, object]:
    import torch

    from gpu.digest import digest_of, wmix128_tensor

    device = torch.device("cuda")
    results: dict[str, object] = {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
    }
    try:
        import triton

        results["triton"] = triton.__version__
    except ImportError:
        results["triton"] = None

    # Bit for bit: numpy, torch ops (CPU and CUDA) and Triton on one random 64 MiB + 13 B buffer.
    probe = np.random.default_rng(1).integers(0, 256, 64 * MiB + 13, dtype=np.uint8)
    expected = wmix128(probe.tobytes())
    on_gpu = torch.from_numpy(probe).to(device)
    checks = {
        "torch_cpu": digest_of(wmix128_tensor(torch.from_numpy(probe), backend="torch")),
        "torch_cuda": digest_of(wmix128_tensor(on_gpu, backend="torch")),
        "triton_cuda": digest_of(wmix128_tensor(on_gpu, backend="triton")),
    }
    results["bit_identical_to_numpy"] = {k: v == expected for k, v in checks.items()}
    if not all(results["bit_identical_to_numpy"].values()):  # type: ignore[attr-defined]
        print(f"DIGESTS DIFFER: numpy {expected}, {checks}", flush=True)
    del on_gpu
    results["host_numpy"] = _host_rows()

    table = {
        label: _gpu_rows(nbytes, repeats=10 if nbytes <= GiB else 5)
        for label, nbytes in {"1GiB": GiB, "16GiB": 16 * GiB}.items()
    }
    results["rows"] = table
    return results


def _host_rows() -> dict[str, float]:
    """The numpy digest on the device machine's host: one core, and threads over buckets."""
    from concurrent.futures import ThreadPoolExecutor

    data = np.random.default_rng(2).integers(0, 256, 256 * MiB, dtype=np.uint8).view(np.uint64)
    wmix128_words(data)
    one = []
    for _ in range(3):
        started = time.perf_counter()
        wmix128_words(data)
        one.append(time.perf_counter() - started)
    buckets = np.array_split(data, 16)
    threaded = {}
    for workers in (4, 8):
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(wmix128_words, buckets))
            started = time.perf_counter()
            list(pool.map(wmix128_words, buckets))
            threaded[workers] = time.perf_counter() - started
    return {
        "cores": float(os.cpu_count() or 0),
        "one_core_GBps": data.nbytes / statistics.median(one) / GB,
        "threads4_16_buckets_GBps": data.nbytes / threaded[4] / GB,
        "threads8_16_buckets_GBps": data.nbytes / threaded[8] / GB,
    }


def _timed(run: Callable[[], object], repeats: int) -> dict[str, float]:
    """Median, min and max seconds of `run` by CUDA events, after two warm-up calls."""
    import torch

    for _ in range(2):
        run()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


TRITON_SHAPES = [
    (1024, 16, 4),
    (1024, 8, 4),
    (2048, 8, 8),
    (1024, 32, 4),
    (512, 16, 4),
    (2048, 16, 8),
]


def _gpu_rows(nbytes: int, *, repeats: int) -> dict[str, dict[str, float]]:
    """Every GPU figure for one buffer of `nbytes` random bytes."""
    import torch

    from gpu import _triton_digest
    from gpu.digest import DigestBatch, digest_of, wmix128_tensor

    device = torch.device("cuda")
    buf = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device)
    words = buf.view(torch.int64)
    target = torch.empty_like(buf)
    rows: dict[str, dict[str, float]] = {}

    def add(name: str, run: Callable[[], object], nbytes: int = nbytes) -> None:
        row = _timed(run, repeats)
        row["TBps"] = nbytes / row["median_s"] / 1e12
        rows[name] = row

    add("D2D copy (floor: reads and writes every byte)", lambda: target.copy_(buf))
    add("int64 sum, one torch reduction (read-only floor)", lambda: words.sum())
    fused = wmix128_tensor(buf, backend="triton")
    if not torch.equal(fused, wmix128_tensor(buf, backend="torch")):
        print(f"DIGESTS DIFFER on {nbytes} bytes: triton != torch ops", flush=True)
    for block, iters, warps in TRITON_SHAPES:

        def shaped(block: int = block, iters: int = iters, warps: int = warps) -> object:
            return _triton_digest.lane_sums(words, 0, block=block, iters=iters, num_warps=warps)

        add(f"wmix128 Triton block={block} iters={iters} warps={warps}", shaped)
    add("wmix128 Triton, default (as verified)", lambda: wmix128_tensor(buf, backend="triton"))
    add("wmix128 torch ops (fallback, 32 MiB chunks)", lambda: wmix128_tensor(buf, backend="torch"))
    add("wsum64 torch ops (old, linear)", lambda: wsum64_torch(words))
    buckets = [buf[k * 64 * MiB : (k + 1) * 64 * MiB] for k in range(16)]
    digests = [digest_of(wmix128_tensor(b)) for b in buckets]

    def verify_buckets() -> None:
        batch = DigestBatch(digests, device)
        for index, bucket in enumerate(buckets):
            batch.record(index, bucket)
        batch.mismatches()

    add("wmix128 DigestBatch, 16 x 64 MiB buckets", verify_buckets, nbytes=16 * 64 * MiB)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["cpu", "gpu"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = cpu_bench(args.rounds) if args.mode == "cpu" else gpu_bench()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.mode == "cpu":
        print(
            f"{results['machine']}, load {results['load_average']}, 256 MiB, {args.rounds} rounds"
        )
        print(f"{'algorithm':45s} {'GB/s median':>12s} {'min-max':>14s}")
        for name, row in results["rows"].items():  # type: ignore[attr-defined]
            spread = f"{row['GBps_min']:.2f}-{row['GBps_max']:.2f}"
            print(f"{name:45s} {row['GBps_median']:12.2f} {spread:>14s}")
        return
    print(
        f"{results['device']}, torch {results['torch']}, triton {results['triton']}; "
        f"bit-identical to numpy: {results['bit_identical_to_numpy']}"
    )
    print(f"host numpy: {results['host_numpy']}")
    for label, rows in results["rows"].items():  # type: ignore[attr-defined]
        print(f"-- {label}")
        print(f"{'':60s} {'median':>10s} {'TB/s':>7s} {'min-max ms':>14s}")
        for name, row in rows.items():
            spread = f"{row['min_s'] * 1e3:.2f}-{row['max_s'] * 1e3:.2f}"
            print(f"{name:60s} {row['median_s'] * 1e3:8.2f}ms {row['TBps']:7.2f} {spread:>14s}")


if __name__ == "__main__":
    main()
