"""Publish from the trainer's GPU: pack + digest on the device beside the D2H floor, one process.

    model on the GPU (synthetic Llama-8B-like, bf16, --gb)     host regions: anonymous memory,
    plan(): 1 GiB regions, 64 MiB buckets                      cudaHostRegister'ed once
    floor    one D2H copy per region from one flat GPU buffer into the same host regions
    ours     publishers.gpu_pack.pack_on_device: per-tensor D2H on 2 streams, wmix128 of every
             bucket on the GPU from the tensors' bytes (what `pack` does for CUDA tensors)
    digests  the digest part alone (GPU time)
    snapshot publishers.gpu_snapshot: the trainer's stall (D2D into one device buffer, then also
             its digests), beside one D2D pass of the version; then snapshot + copy_to the host
    old      what `pack` did before: per-tensor D2H, sync, then numpy digests on the host (4 threads)

Medians of --runs after a warm-up. The bytes are checked: the old path's numpy digests of the host
bytes it copied must equal ours (computed on the GPU), and after ours the host regions must hold
the tensors' bytes (a GPU digest of each region read back equals the digest of the packed source).

    python3 bench/gpu_publish_bench.py [--gb 16.75] [--runs 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import mmap
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.gpu_bench import synthetic_model
from gpu.digest import digest_of, wmix128_pieces, wmix128_tensor
from gpu.host import HostRegistration
from publishers.gpu_pack import bucket_pieces, pack_on_device, zero_padding
from publishers.gpu_snapshot import snapshot
from publishers.packing import plan
from streamer.checksum import wmix128_words

GB = 1e9
MiB = 1 << 20


def timed(run: Callable[[], object], runs: int) -> list[float]:
    run()  # warm-up (kernels compiled, streams made)
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        run()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gb", type=float, default=16.75)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(7)
    named = {
        name: torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(
            torch.bfloat16
        )
        for name, shape in synthetic_model(args.gb)
    }
    layout = plan(named)
    model_bytes = sum(t.nbytes for t in layout.tensors)
    started = time.perf_counter()
    mappings = [mmap.mmap(-1, n) for n in layout.region_bytes]
    hosts = [torch.frombuffer(m, dtype=torch.uint8) for m in mappings]
    registrations = [HostRegistration(h) for h in hosts]
    register_s = time.perf_counter() - started
    flat = torch.empty(layout.total_bytes, dtype=torch.uint8, device=device)
    region_starts = [int(x) for x in np.cumsum([0, *layout.region_bytes])]

    def floor() -> None:
        for k, host in enumerate(hosts):
            host.copy_(flat[region_starts[k] : region_starts[k + 1]], non_blocking=True)

    digests: list[str] = []

    def ours() -> None:
        digests[:] = pack_on_device(layout, named, hosts)

    sources = {s.name: named[s.name].reshape(-1).view(torch.uint8) for s in layout.tensors}
    ranges = layout.bucket_ranges()

    def digests_only() -> None:
        for index, pieces in enumerate(bucket_pieces(layout, sources)):
            wmix128_pieces(pieces, ranges[index][2], device=device)

    results: dict[str, object] = {
        "device": torch.cuda.get_device_name(device),
        "tensors": len(layout.tensors),
        "model_bytes": model_bytes,
        "regions": len(layout.region_bytes),
        "buckets": len(ranges),
        "host_register_s": register_s,
    }
    flat.random_(0, 256)
    times = {"floor_s": timed(floor, args.runs), "ours_s": timed(ours, args.runs)}
    ours_digests = list(digests)
    times["digests_only_s"] = timed(digests_only, args.runs)

    # Check the host bytes ours left: each region back on the GPU, digested bucket by bucket.
    back = [digest_of(wmix128_tensor(hosts[r][o : o + n].to(device))) for r, o, n in ranges]
    results["host_bytes_match_gpu_digests"] = back == ours_digests

    # The GPU snapshot: the trainer's stall, then the host copy behind it.
    into = torch.empty(layout.total_bytes, dtype=torch.uint8, device=device)
    times["d2d_floor_s"] = timed(lambda: into.copy_(flat), args.runs)
    times["stall_copied_s"] = timed(lambda: snapshot(layout, named, into=into), args.runs)
    times["stall_digested_s"] = timed(
        lambda: snapshot(layout, named, into=into, wait="digested"), args.runs
    )
    snap_digests: list[str] = []

    def snapshot_then_host() -> None:
        snap_digests[:] = snapshot(layout, named, into=into).copy_to(hosts)

    for host in hosts:
        host.fill_(0xA5)  # so the check below sees what the snapshot wrote
    times["snapshot_to_host_s"] = timed(snapshot_then_host, args.runs)
    results["snapshot_digests_equal_ours"] = snap_digests == ours_digests
    back = [digest_of(wmix128_tensor(hosts[r][o : o + n].to(device))) for r, o, n in ranges]
    results["snapshot_host_bytes_match"] = back == ours_digests
    results.update(times)

    # The old path, once: per-tensor D2H on one stream, sync, numpy digests in 4 threads.
    for host in hosts:
        host.fill_(0xA5)
    started = time.perf_counter()
    zero_padding(layout, hosts)
    for spec in layout.tensors:
        hosts[spec.region][spec.offset : spec.offset + spec.nbytes].copy_(
            sources[spec.name], non_blocking=True
        )
    torch.cuda.synchronize()
    old_copy_s = time.perf_counter() - started
    views = [hosts[r][o : o + n].numpy().view(np.uint64) for r, o, n in ranges]
    with ThreadPoolExecutor(max_workers=4) as pool:
        old_digests = list(pool.map(wmix128_words, views))
    old_s = time.perf_counter() - started
    results["old_s"] = old_s
    results["old_copy_s"] = old_copy_s
    results["old_numpy_digests_equal_ours"] = old_digests == ours_digests
    for registration in registrations:
        registration.close()

    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    floor_s = statistics.median(times["floor_s"])
    ours_s = statistics.median(times["ours_s"])
    print(
        f"{results['device']}: {len(layout.tensors)} bf16 tensors, {model_bytes / GB:.2f} GB, "
        f"{len(ranges)} buckets of 64 MiB; host regions registered in {register_s:.2f} s"
    )
    print(
        f"bytes checked: host bytes == GPU digests {results['host_bytes_match_gpu_digests']}, "
        f"old numpy digests == ours {results['old_numpy_digests_equal_ours']}, snapshot digests "
        f"== ours {results['snapshot_digests_equal_ours']}, snapshot host bytes "
        f"{results['snapshot_host_bytes_match']}"
    )
    for name, runs in times.items():
        med = statistics.median(runs)
        print(
            f"{name:16s} median {med * 1e3:8.1f} ms  ({min(runs) * 1e3:.1f}-{max(runs) * 1e3:.1f})"
            f"  {model_bytes / med / GB:7.1f} GB/s  x floor {med / floor_s:.3f}"
        )
    print(
        f"old path (D2H {old_copy_s * 1e3:.0f} ms + numpy digests): {old_s:.2f} s "
        f"= {old_s / floor_s:.1f} x floor; ours / floor = {ours_s / floor_s:.3f}"
    )


if __name__ == "__main__":
    main()
