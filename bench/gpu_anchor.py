"""The anchor, checkpoint-engine 0.4.2, driven as ../shared/bench does, on gpu_bench.py's model.

Started by gpu_bench.py (never alone): the publisher's shared-memory regions are the source.

anchor1  one ParameterServer (world 1): `register_checkpoint(named_tensors=...)` copies the weights
         into its pinned host memory, `gather_metas`, then `update()` into a separate receiver
         process that copies every tensor into its preallocated GPU parameters
         (`update_weights_from_ipc`), as a colocated inference engine would.
anchor4  under torchrun, one rank per GPU, each owning a round-robin share of the tensors in its
         pinned memory; every GPU's receiver gets the whole model (NCCL broadcast).

After every update the receiver checks each parameter's digest against the source (not timed).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import torch
import torch.multiprocessing as mp
from gpu_bench import (  # type: ignore[import-not-found]
    BenchManifest,
    count_bad_params,
    load_manifest,
    map_regions,
    median,
    new_params,
    poison,
    say,
    tensor_views,
    write_json,
)


def _receiver(queue: Any, results: Any, manifest_path: str, uuid: str, device_index: int) -> None:
    import zmq
    from checkpoint_engine.worker import update_weights_from_ipc  # type: ignore[import-not-found]

    torch.cuda.set_device(device_index)
    manifest = load_manifest(manifest_path)
    params = new_params(manifest, torch.device("cuda", device_index))
    ctx = zmq.Context()
    seen = [0]
    while True:
        paths = queue.get()
        if paths is None:
            break
        seen[0] = 0

        def run(weights: list[tuple[str, torch.Tensor]]) -> None:
            for name, w in weights:
                params[name].copy_(w)
                seen[0] += 1

        update_weights_from_ipc(
            ctx,
            dict(paths)[uuid],
            device_id=device_index,
            run=run,
            post_hook=torch.cuda.synchronize,
        )
        bad = count_bad_params(params, manifest)
        poison(list(params.values()))  # so the next update must write every byte again
        torch.cuda.synchronize()
        results.put((seen[0], bad))


def _serve_per_version(ps: Any, manifest: BenchManifest, named: dict[str, torch.Tensor],
                       args: argparse.Namespace, uuid: str) -> dict[str, Any]:  # fmt: skip
    """End to end from the trainer's GPU tensors, per version: `register_checkpoint` (into the
    reused shared pinned pool), `gather_metas`, `update()`, `unregister_checkpoint`."""
    ctx = mp.get_context("spawn")
    queue, results = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_receiver, args=(queue, results, args.manifest, uuid, 0))
    proc.start()
    times, registers, bad, seen = [], [], 0, []
    for run in range(args.runs + 1):  # run 0 is the warm-up (allocates the pinned pool)
        name = f"v{run}"
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        ps.register_checkpoint(name, named_tensors=named, use_shared_memory_pool=True)
        registered = time.perf_counter()
        ps.gather_metas(name)
        ps.update(name, queue.put)
        dt = time.perf_counter() - t0
        ps.unregister_checkpoint(name)
        applied, nbad = results.get()
        bad += nbad
        seen.append(applied)
        if run:
            times.append(dt)
            registers.append(registered - t0)
        say(f"anchor end to end {run}: {dt:.3f}s (register {registered - t0:.3f}s), bad {nbad}")
        time.sleep(1.0)
    queue.put(None)
    proc.join()
    return {"end_to_end_s": times, "register_s": registers, "end_to_end_median_s": median(times),
            "register_median_s": median(registers), "bad": bad, "applied": seen}  # fmt: skip


def phase_anchor1e2e(args: argparse.Namespace) -> None:
    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
    from checkpoint_engine.ps import (  # type: ignore[import-not-found]
        ParameterServer,
        _get_physical_gpu_id,
    )

    torch.cuda.set_device(0)
    manifest = load_manifest(args.manifest)
    named = {n: t.cuda() for n, t in tensor_views(manifest, map_regions(manifest)).items()}
    ps = ParameterServer(auto_pg=True)
    out = _serve_per_version(ps, manifest, named, args, _get_physical_gpu_id(ps.device_manager, 0))
    write_json(args.result, out)


def _serve(ps: Any, manifest: BenchManifest, named: dict[str, torch.Tensor], args: argparse.Namespace,
           uuid: str, device_index: int, pause_s: float) -> dict[str, Any]:  # fmt: skip
    ctx = mp.get_context("spawn")
    queue, results = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_receiver, args=(queue, results, args.manifest, uuid, device_index))
    proc.start()
    t0 = time.perf_counter()
    ps.register_checkpoint("ckpt", named_tensors=named)
    register_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ps.gather_metas("ckpt")
    gather_s = time.perf_counter() - t0
    times, bad, seen = [], 0, []
    for run in range(args.runs + 1):  # run 0 is the warm-up
        t0 = time.perf_counter()
        ps.update("ckpt", queue.put)
        dt = time.perf_counter() - t0
        applied, nbad = results.get()
        bad += nbad
        seen.append(applied)
        if run:
            times.append(dt)
        say(
            f"anchor update {run}: {dt:.3f}s {manifest.model_bytes / dt / 1e9:.1f} GB/s, applied {applied}, bad {nbad}"
        )
        time.sleep(pause_s)
    queue.put(None)
    proc.join()
    return {"register_s": register_s, "gather_s": gather_s, "update_s": times,
            "update_median_s": median(times), "bad": bad, "applied": seen}  # fmt: skip


def phase_anchor1(args: argparse.Namespace) -> None:
    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
    from checkpoint_engine.ps import (
        ParameterServer,
        _get_physical_gpu_id,
    )

    torch.cuda.set_device(0)
    manifest = load_manifest(args.manifest)
    named = tensor_views(manifest, map_regions(manifest))
    ps = ParameterServer(auto_pg=True)
    out = _serve(
        ps, manifest, named, args, _get_physical_gpu_id(ps.device_manager, 0), 0, pause_s=1.0
    )
    write_json(args.result, out)


def phase_anchor4(args: argparse.Namespace) -> None:
    import torch.distributed as dist
    from checkpoint_engine.ps import (
        ParameterServer,
        _get_physical_gpu_id,
    )

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(rank)
    manifest = load_manifest(args.manifest)
    views = tensor_views(manifest, map_regions(manifest))
    mine = {t.name: views[t.name] for i, t in enumerate(manifest.tensors) if i % world == rank}
    store = dist.TCPStore(  # type: ignore[attr-defined]
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]) + 9, world, rank == 0
    )
    ps = ParameterServer(auto_pg=True)
    out = _serve(
        ps, manifest, mine, args, _get_physical_gpu_id(ps.device_manager, rank), rank, pause_s=2.0
    )
    store.set(f"bad/{rank}", str(out["bad"]))
    if rank == 0:
        out["bad"] = sum(int(store.get(f"bad/{r}")) for r in range(world))
        out["world"] = world
        write_json(args.result, out)
    store.set(f"done/{rank}", "1")
    store.wait([f"done/{r}" for r in range(world)])


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--phase", required=True, choices=["anchor1", "anchor1e2e", "anchor4"])
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--result", required=True)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--port", type=int, default=29640)
    ap.add_argument("--gb", type=float, default=16)  # accepted for a common command line
    ap.add_argument("--bucket-mib", default="")
    a = ap.parse_args()
    {"anchor1": phase_anchor1, "anchor1e2e": phase_anchor1e2e, "anchor4": phase_anchor4}[a.phase](a)
