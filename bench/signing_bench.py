"""What signed versions and the secure mode cost: signature checks and BLAKE3 on one core.

    python -m bench.signing_bench            # prints a markdown table (bench/RESULTS.md)

1. Signing and verifying a version: manifests of 1,000 and 100,000 tensors (64 MiB buckets,
   1 and 8 ranks), the per-rank signature made by the trainer and every rank's checked by a
   subscriber (`verify_manifest`), against the msgpack decode of the same manifest.
2. Bucket digests on one core: BLAKE3 (the secure mode) against the fast checksum (wmix128) and
   hashlib's BLAKE2b, over a 256 MiB buffer that stays in memory.

Times are the best of several runs (a shared machine: the best is the least disturbed).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable

import numpy as np

from schemas.codec import decode_message, encode
from schemas.manifest import BucketSpec, FrameLocator, Manifest, RegionSpec, Shard, TensorSpec
from schemas.messages import Announce
from streamer.checksum import bucket_digest
from streamer.signing import crypto_digest, sign_shard
from streamer.signing_keys import SigningKey, TrustedKeys

BUCKET_BYTES = 64 << 20
TENSOR_BYTES = 160 << 10  # a 100k-tensor model of ~16 GB


def best_of(runs: int, work: Callable[[], object]) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times)


def shard(rank: int, num_tensors: int) -> Shard:
    """One region holding `num_tensors` tensors, cut into 64 MiB buckets with digests."""
    nbytes = num_tensors * TENSOR_BYTES
    tensors = tuple(
        TensorSpec(
            f"model.layers.{rank}.{i}.weight",
            "bfloat16",
            (80, 1024),
            0,
            i * TENSOR_BYTES,
            TENSOR_BYTES,
        )
        for i in range(num_tensors)
    )
    buckets = tuple(
        BucketSpec(0, o, min(BUCKET_BYTES, nbytes - o), "0" * 32, digest="blake3:" + "0" * 64)
        for o in range(0, nbytes, BUCKET_BYTES)
    )
    locator = FrameLocator(endpoint="tcp://10.0.0.1:5600", key=f"r{rank}")
    return Shard(
        regions=(RegionSpec(nbytes=nbytes, locators=(locator,), rank=rank),),
        tensors=tensors,
        buckets=buckets,
    )


def signatures(num_tensors: int, world_size: int) -> dict[str, float | int]:
    key = SigningKey.generate(job="bench")
    parts = [shard(rank, num_tensors // world_size) for rank in range(world_size)]
    sign_s = best_of(
        3,
        lambda: sign_shard(
            parts[0], model="policy", version=1, rank=0, world_size=world_size, key=key
        ),
    )
    signed = [
        sign_shard(p, model="policy", version=1, rank=r, world_size=world_size, key=key)
        for r, p in enumerate(parts)
    ]
    manifest = Manifest.assemble("policy", 1, signed)
    wire = encode(Announce(manifest=manifest))
    trusted = TrustedKeys.of(key.public())
    return {
        "tensors": num_tensors,
        "ranks": world_size,
        "buckets": len(manifest.buckets),
        "manifest_bytes": len(wire),
        "sign_rank_s": sign_s,
        "verify_s": best_of(5, lambda: trusted.verify(manifest, require_digests=True)),
        "decode_s": best_of(5, lambda: decode_message(wire)),
    }


def digests(nbytes: int = 256 << 20) -> dict[str, float]:
    data = memoryview(np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8).data)
    rates = {
        "wmix128 (fast checksum, numpy)": lambda: bucket_digest(data),
        "BLAKE3 (secure mode, blake3 package)": lambda: crypto_digest(data),
        "BLAKE3, all cores (the trainer sealing a version)": lambda: crypto_digest(
            data, all_cores=True
        ),
        "BLAKE2b (hashlib)": lambda: hashlib.blake2b(data).digest(),
    }
    return {name: nbytes / best_of(3, work) / 1e9 for name, work in rates.items()}


def main() -> None:
    rows = [signatures(n, w) for n in (1_000, 100_000) for w in (1, 8)]
    print(
        "| tensors | ranks | buckets | manifest | sign (one rank) | verify (all ranks) | decode |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['tensors']:,} | {row['ranks']} | {row['buckets']} | "
            f"{row['manifest_bytes'] / 1e6:.2f} MB | {row['sign_rank_s'] * 1e3:.1f} ms | "
            f"{row['verify_s'] * 1e3:.1f} ms | {row['decode_s'] * 1e3:.1f} ms |"
        )
    print()
    print("| digest (one core unless said) | GB/s |")
    print("|---|---:|")
    for name, rate in digests().items():
        print(f"| {name} | {rate:.2f} |")


if __name__ == "__main__":
    main()
