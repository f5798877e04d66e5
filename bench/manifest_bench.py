"""A trillion-parameter manifest (issue 10): Kimi-K2's public architecture, 64 trainer ranks.

    PYTHONPATH=. python bench/manifest_bench.py [--ranks 64] [--fleet 1000] [--protocols 2,1]
        [--fetch process] [--json out.json]

The layout is the public config of Kimi-K2 (DeepSeek-V3's shape): 61 layers, the first dense
(intermediate 18432), the other 60 MoE with 384 routed experts and 1 shared (intermediate
2048), hidden 7168, MLA attention (64 heads, q_lora_rank 1536, kv_lora_rank 512, qk_nope 128,
qk_rope 64, v_head 128), vocab 163840. Expert weights (routed and shared) are FP8
(`float8_e4m3fn`) with a float32 scale per 128 x 128 block (`weight_scale_inv`), everything
else BF16: ~1.03 T parameters, ~1.0 TB. The tensors are split the way expert parallelism
does: rank r holds experts [6r, 6r+6) of every layer, and each layer's attention, norms, router
and shared expert go to rank layer % 64 (embeddings to rank 0, the head to the last rank), so no
tensor is published twice. Each rank's shard is built as `Publisher` builds it:
`publishers.packing.plan` over tensors that have shapes and no storage (1 GiB regions, 64 MiB
buckets), a mooncake locator per region, a wmix128 checksum per bucket.

Measured: the encoded size of each rank's PublishShard and of the assembled manifest (what
protocol 1 sends in every Announce, and protocol 2 once per fetch), `schemas.validate` of a
shard and of the whole manifest, decoding it (every subscriber does), the broker's assembly
(`streamer.registry.Registry.publish` of the 64 shards: the last one assembles, validates and
announces), and the time to reach `--fleet` subscribers with bench/fleet_bench.py's harness
(a real broker process), protocol 2 against protocol 1 where the fan-out fits
(`--max-fanout-gib`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench import fleet_bench
from schemas.codec import decode_manifest, encode
from schemas.manifest import Manifest, Shard
from schemas.messages import Announce, Announced, PublishShard
from schemas.validate import ManifestLimits, validate_manifest, validate_shard

# Kimi-K2 (moonshotai/Kimi-K2-Instruct config.json)
LAYERS = 61
FIRST_DENSE = 1
EXPERTS = 384
SHARED_EXPERTS = 1
HIDDEN = 7168
MOE_INTER = 2048
DENSE_INTER = 18432
HEADS = 64
Q_LORA = 1536
KV_LORA = 512
QK_NOPE = 128
QK_ROPE = 64
V_HEAD = 128
VOCAB = 163840
BLOCK = 128
"""FP8 weights carry one float32 scale per 128 x 128 block."""


def _blocks(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK


def kimi_k2_tensors(ranks: int) -> list[dict[str, tuple[str, tuple[int, ...]]]]:
    """name -> (dtype, shape) for each rank, in layer order."""
    per_rank: list[dict[str, tuple[str, tuple[int, ...]]]] = [{} for _ in range(ranks)]
    if EXPERTS % ranks:
        raise SystemExit(f"--ranks must divide {EXPERTS} experts")
    experts_per_rank = EXPERTS // ranks

    def fp8(out: dict[str, tuple[str, tuple[int, ...]]], name: str, rows: int, cols: int) -> None:
        out[f"{name}.weight"] = ("float8_e4m3fn", (rows, cols))
        out[f"{name}.weight_scale_inv"] = ("float32", (_blocks(rows), _blocks(cols)))

    per_rank[0]["model.embed_tokens.weight"] = ("bfloat16", (VOCAB, HIDDEN))
    for layer in range(LAYERS):
        p = f"model.layers.{layer}"
        own = per_rank[layer % ranks]
        own[f"{p}.input_layernorm.weight"] = ("bfloat16", (HIDDEN,))
        own[f"{p}.self_attn.q_a_proj.weight"] = ("bfloat16", (Q_LORA, HIDDEN))
        own[f"{p}.self_attn.q_a_layernorm.weight"] = ("bfloat16", (Q_LORA,))
        own[f"{p}.self_attn.q_b_proj.weight"] = ("bfloat16", (HEADS * (QK_NOPE + QK_ROPE), Q_LORA))
        own[f"{p}.self_attn.kv_a_proj_with_mqa.weight"] = ("bfloat16", (KV_LORA + QK_ROPE, HIDDEN))
        own[f"{p}.self_attn.kv_a_layernorm.weight"] = ("bfloat16", (KV_LORA,))
        own[f"{p}.self_attn.kv_b_proj.weight"] = ("bfloat16", (HEADS * (QK_NOPE + V_HEAD), KV_LORA))
        own[f"{p}.self_attn.o_proj.weight"] = ("bfloat16", (HIDDEN, HEADS * V_HEAD))
        own[f"{p}.post_attention_layernorm.weight"] = ("bfloat16", (HIDDEN,))
        if layer < FIRST_DENSE:
            own[f"{p}.mlp.gate_proj.weight"] = ("bfloat16", (DENSE_INTER, HIDDEN))
            own[f"{p}.mlp.up_proj.weight"] = ("bfloat16", (DENSE_INTER, HIDDEN))
            own[f"{p}.mlp.down_proj.weight"] = ("bfloat16", (HIDDEN, DENSE_INTER))
            continue
        own[f"{p}.mlp.gate.weight"] = ("bfloat16", (EXPERTS, HIDDEN))
        own[f"{p}.mlp.gate.e_score_correction_bias"] = ("float32", (EXPERTS,))
        shared = MOE_INTER * SHARED_EXPERTS
        fp8(own, f"{p}.mlp.shared_experts.gate_proj", shared, HIDDEN)
        fp8(own, f"{p}.mlp.shared_experts.up_proj", shared, HIDDEN)
        fp8(own, f"{p}.mlp.shared_experts.down_proj", HIDDEN, shared)
        for expert in range(EXPERTS):
            out = per_rank[expert // experts_per_rank]
            e = f"{p}.mlp.experts.{expert}"
            fp8(out, f"{e}.gate_proj", MOE_INTER, HIDDEN)
            fp8(out, f"{e}.up_proj", MOE_INTER, HIDDEN)
            fp8(out, f"{e}.down_proj", HIDDEN, MOE_INTER)
    per_rank[0]["model.norm.weight"] = ("bfloat16", (HIDDEN,))
    per_rank[-1]["lm_head.weight"] = ("bfloat16", (VOCAB, HIDDEN))
    return per_rank


def kimi_k2_shards(ranks: int = 64) -> list[Shard]:
    """Each rank's shard, built by `publishers.packing.plan` (meta tensors: no storage)."""
    import torch

    from publishers.packing import plan

    dtypes = {
        "bfloat16": torch.bfloat16,
        "float32": torch.float32,
        "float8_e4m3fn": torch.float8_e4m3fn,
    }
    shards = []
    for rank, tensors in enumerate(kimi_k2_tensors(ranks)):
        meta = {
            name: torch.empty(shape, dtype=dtypes[dtype], device="meta")
            for name, (dtype, shape) in tensors.items()
        }
        shards.append(fleet_bench.shard_of(plan(meta), rank))
    return shards


def _timed(fn: Any, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def measure(shards: list[Shard], repeats: int) -> dict[str, Any]:
    from streamer.registry import Limits, Registry

    limits = ManifestLimits()
    ranks = len(shards)
    publish_bytes = [
        len(
            encode(
                PublishShard(
                    request_id=1, model="kimi-k2", version=1, rank=r, world_size=ranks, shard=s
                )
            )
        )
        for r, s in enumerate(shards)
    ]
    manifest = Manifest.assemble("kimi-k2", 1, shards, published_at=time.time())
    body = encode(manifest)
    announce = encode(Announce(manifest=manifest))
    announced = encode(Announced(model="kimi-k2", version=1, digest="0" * 64, nbytes=len(body)))
    out: dict[str, Any] = {
        "ranks": ranks,
        "parameters": sum(_numel(t.shape) for t in manifest.tensors),
        "payload_bytes": manifest.payload_bytes,
        "total_bytes": manifest.total_bytes,
        "tensors": len(manifest.tensors),
        "buckets": len(manifest.buckets),
        "regions": len(manifest.regions),
        "shard_bytes_median": statistics.median(publish_bytes),
        "shard_bytes_max": max(publish_bytes),
        "shard_bytes_sum": sum(publish_bytes),
        "manifest_bytes": len(body),
        "announce_bytes": len(announce),
        "announced_bytes": len(announced),
    }
    out["validate_shard_ms"] = (
        statistics.median(
            statistics.median(_timed(lambda s=s: validate_shard(s, limits), 3)) for s in shards
        )
        * 1e3
    )
    out["validate_manifest_ms"] = (
        statistics.median(_timed(lambda: validate_manifest(manifest, limits), repeats)) * 1e3
    )
    out["encode_manifest_ms"] = statistics.median(_timed(lambda: encode(manifest), repeats)) * 1e3
    out["decode_manifest_ms"] = (
        statistics.median(_timed(lambda: decode_manifest(body), repeats)) * 1e3
    )

    def assemble_in_registry(version: int) -> tuple[float, float]:
        registry = Registry(
            retention=2, lease_ttl_s=30, peer_timeout_s=10, manifest_limits=limits, limits=Limits()
        )
        now = time.time()
        t0 = time.perf_counter()
        for rank, shard in enumerate(shards[:-1]):
            registry.publish("trainer", "kimi-k2", version, rank, ranks, shard, now)
        t1 = time.perf_counter()
        announced, _ = registry.publish(
            "trainer", "kimi-k2", version, ranks - 1, ranks, shards[-1], now
        )
        t2 = time.perf_counter()
        assert announced
        return t1 - t0, t2 - t1

    runs = [assemble_in_registry(1) for _ in range(repeats)]
    out["registry_first_63_shards_ms"] = statistics.median(r[0] for r in runs) * 1e3
    out["registry_last_shard_assembly_ms"] = statistics.median(r[1] for r in runs) * 1e3
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def print_table(out: dict[str, Any]) -> None:
    print()
    print(
        f"Kimi-K2-shaped manifest, {out['ranks']} ranks: {out['parameters'] / 1e12:.3f} T parameters, "
        f"{out['total_bytes'] / 1e12:.3f} TB, {out['tensors']} tensors, {out['buckets']} buckets, "
        f"{out['regions']} regions"
    )
    print("| measure | value |")
    print("|---|---|")
    rows = [
        (
            "PublishShard per rank (median / max)",
            f"{out['shard_bytes_median'] / 1e6:.2f} / {out['shard_bytes_max'] / 1e6:.2f} MB",
        ),
        ("manifest, assembled (ManifestBody)", f"{out['manifest_bytes'] / 1e6:.2f} MB"),
        ("Announce (protocol 1, every subscriber)", f"{out['announce_bytes'] / 1e6:.2f} MB"),
        ("Announced (protocol 2, every subscriber)", f"{out['announced_bytes']} B"),
        ("validate one shard (median of ranks)", f"{out['validate_shard_ms']:.1f} ms"),
        ("validate the manifest", f"{out['validate_manifest_ms']:.0f} ms"),
        ("encode the manifest", f"{out['encode_manifest_ms']:.0f} ms"),
        ("decode the manifest (each subscriber)", f"{out['decode_manifest_ms']:.0f} ms"),
        (
            "Registry.publish of ranks 0..62 (each validated)",
            f"{out['registry_first_63_shards_ms']:.0f} ms",
        ),
        (
            "Registry.publish of the last rank (assemble + validate)",
            f"{out['registry_last_shard_assembly_ms']:.0f} ms",
        ),
    ]
    for label, value in rows:
        print(f"| {label} | {value} |")
    for key in ("fleet", "small_fleet"):
        fleet = out.get(key, {})
        for row in fleet.get("summary", []):
            print(
                f"| reach {fleet['subscribers']} subscribers, protocol {row['protocol']} "
                f"(fetch={fleet['fetch']}), p50 / p99 / max | {row['p50_ms']:.0f} / "
                f"{row['p99_ms']:.0f} / {row['max_ms']:.0f} ms (broker CPU {row['cpu_ms']:.0f} ms) |"
            )
        for note in fleet.get("skipped", []):
            print(f"| {note} | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fleet", type=int, default=1000, help="subscribers (0: no fleet run)")
    parser.add_argument(
        "--small-fleet",
        type=int,
        default=50,
        help="a second run this size, one fetch per subscriber, where protocol 1 fits (0: none)",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--protocols", default="2,1")
    parser.add_argument("--fetch", choices=("subscriber", "process"), default="process")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-fanout-gib", type=float, default=2.0)
    parser.add_argument("--no-curve", dest="curve", action="store_false")
    parser.add_argument("--json", help="write every figure here")
    args = parser.parse_args()
    t0 = time.perf_counter()
    shards = kimi_k2_shards(args.ranks)
    print(f"built {len(shards)} shards in {time.perf_counter() - t0:.1f} s", flush=True)
    out = measure(shards, args.repeats)
    out["command"] = " ".join(sys.argv)
    out["machine"] = f"{platform.node()} {os.cpu_count()} cores, {platform.python_version()}"
    out["load_before"] = os.getloadavg()
    fleet_bench.SIZES["kimi-k2"] = lambda: shards
    runs = [("fleet", args.fleet, args.fetch), ("small_fleet", args.small_fleet, "subscriber")]
    for key, subscribers, fetch in runs:
        if not subscribers:
            continue
        fleet_args = fleet_bench.parser().parse_args(
            [
                "--subscribers",
                str(subscribers),
                "--workers",
                str(args.workers),
                "--rounds",
                str(args.rounds),
                "--sizes",
                "kimi-k2",
                "--protocols",
                args.protocols,
                "--fetch",
                fetch,
                "--max-fanout-gib",
                str(args.max_fanout_gib),
                *([] if args.curve else ["--no-curve"]),
            ]
        )
        fleet = asyncio.run(fleet_bench.run(fleet_args))
        fleet_bench.print_summary(fleet)
        fleet.pop("broker_log_tail", None)
        out[key] = fleet
    print_table(out)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
