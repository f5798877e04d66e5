"""Signed versions and cryptographic bucket digests: the broker is not trusted with weights.

    trainer rank r                         broker (carries, never signs)       subscriber
      pack ── [add_digests: blake3 per bucket, secure mode]
      sign_shard(key) ──> Shard.signature ──> Manifest.signatures[r] ──> verify_manifest(trusted)
                                                                          before a byte is pulled
      bucket bytes ────────────── any path (relays, mooncake, zmq) ────> blake3 check per bucket
                                                                          before the swap

What a rank signs (Ed25519) is a canonical msgpack encoding of `(model, version, rank,
world_size, job, checksum algorithm, regions' sizes and ranks, tensors, buckets with their
checksums and digests)`. Locators are left out: the broker and relays may say where bytes can
be read, not what they are. The encoding is an explicit tuple layout, not the structs' own
encoding, so that a field added to a struct later does not change what old signatures cover;
a field that must be signed gets a new `_DOMAIN`.

A version verifies when every rank's part verifies under a trusted key and all ranks claim
the same trainer job (a key pinned to a job may sign only for it). Keys and key files: `streamer.signing_keys`.

>>> from streamer.signing_keys import SigningKey, TrustedKeys
>>> key = SigningKey.generate(job="run-7")
>>> shard = sign_shard(Shard(regions=(), tensors=(), buckets=()), model="m", version=1,
...                    rank=0, world_size=1, key=key)
>>> TrustedKeys.of(key.public()).verify(Manifest.assemble("m", 1, [shard]))
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import blake3
import msgspec
from cryptography.exceptions import InvalidSignature

from schemas.manifest import BucketSpec, Manifest, RegionSpec, Shard, ShardSignature, TensorSpec
from streamer.errors import StreamerError

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from streamer.signing_keys import PublicKey, SigningKey

__all__ = [
    "DIGEST_ALGORITHM",
    "UntrustedVersion",
    "add_digests",
    "crypto_digest",
    "digest_matches",
    "sign_shard",
    "verify_manifest",
]

DIGEST_ALGORITHM = "blake3"
_DOMAIN = "weightstream.shard.v1"
_ENCODER = msgspec.msgpack.Encoder()


class UntrustedVersion(StreamerError):
    """A version is unsigned, signed by a key this subscriber does not trust, or tampered with.

    `key_id` names the key that signed the refused part ("" when unsigned).
    """

    def __init__(self, message: str, *, key_id: str = "") -> None:
        super().__init__(message)
        self.key_id = key_id


# what is signed


def _canonical(
    *,
    model: str,
    version: int,
    rank: int,
    world_size: int,
    job: str,
    algorithm: str,
    regions: Sequence[RegionSpec],
    tensors: Sequence[TensorSpec],
    buckets: Sequence[BucketSpec],
    base: int,
) -> bytes:
    """The bytes a rank signs; region indices are the shard's own (`base` is subtracted)."""
    return _ENCODER.encode(
        (
            _DOMAIN,
            model,
            version,
            rank,
            world_size,
            job,
            algorithm,
            [(r.nbytes, r.rank) for r in regions],
            [(t.name, t.dtype, t.shape, t.region - base, t.offset, t.nbytes) for t in tensors],
            [(b.region - base, b.offset, b.nbytes, b.checksum, b.digest) for b in buckets],
        )
    )


def sign_shard(
    shard: Shard, *, model: str, version: int, rank: int, world_size: int, key: SigningKey
) -> Shard:
    """`shard` with this rank's signature over it (replacing any earlier one)."""
    message = _canonical(
        model=model,
        version=version,
        rank=rank,
        world_size=world_size,
        job=key.job,
        algorithm=shard.checksum_algorithm,
        regions=shard.regions,
        tensors=shard.tensors,
        buckets=shard.buckets,
        base=0,
    )
    signature = ShardSignature(
        rank=rank, key_id=key.key_id, signature=key.private.sign(message), job=key.job
    )
    return msgspec.structs.replace(shard, signature=signature)


def _parts(manifest: Manifest) -> dict[int, tuple[int, list[int]]]:
    """Each rank's first region index and its region indices; refuses interleaved ranks."""
    parts: dict[int, tuple[int, list[int]]] = {}
    previous = -1
    for index, region in enumerate(manifest.regions):
        if region.rank != previous and region.rank in parts:
            raise UntrustedVersion(
                f"{_name(manifest)}: the regions of rank {region.rank} are not contiguous; "
                "the manifest was rearranged after it was signed"
            )
        parts.setdefault(region.rank, (index, []))[1].append(index)
        previous = region.rank
    return parts


def _name(manifest: Manifest) -> str:
    return f"{manifest.model} version {manifest.version}"


def verify_manifest(
    manifest: Manifest, trusted: Mapping[str, PublicKey], *, require_digests: bool = False
) -> None:
    """Raise `UntrustedVersion` unless every rank's part is signed by a trusted key of one job.

    `require_digests` also refuses a version whose buckets do not all carry a BLAKE3 digest.
    Cost: one canonical encoding and one Ed25519 check per rank (bench/signing_bench.py).
    """
    name = _name(manifest)
    how = (
        "if that trainer is yours, add its public key file to the subscriber "
        "(weightstream subscribe --trust FILE, or Subscriber(trusted_keys=load_trusted_keys([FILE])))"
    )
    if not manifest.signatures:
        raise UntrustedVersion(
            f"{name} is not signed, and this subscriber applies only versions signed by a "
            "trusted key; sign on the trainer (weightstream publish --signing-key FILE, or "
            "Publisher(signing_key=load_signing_key(FILE)))"
        )
    by_rank = {signature.rank: signature for signature in manifest.signatures}
    if len(by_rank) != len(manifest.signatures) or set(by_rank) != set(range(manifest.world_size)):
        unsigned = sorted(set(range(manifest.world_size)) - set(by_rank))
        raise UntrustedVersion(
            f"{name} has {manifest.world_size} ranks but signatures for ranks "
            f"{sorted(s.rank for s in manifest.signatures)}"
            + (f" (ranks {unsigned} unsigned)" if unsigned else "")
            + "; every rank's shard must be signed once"
        )
    parts = _parts(manifest)
    if not set(parts) <= set(by_rank):
        raise UntrustedVersion(
            f"{name} has regions of ranks {sorted(set(parts) - set(by_rank))} that no signature covers"
        )
    rank_of = [region.rank for region in manifest.regions]
    tensors: dict[int, list[TensorSpec]] = {rank: [] for rank in by_rank}
    buckets: dict[int, list[BucketSpec]] = {rank: [] for rank in by_rank}
    try:
        for tensor in manifest.tensors:
            tensors[rank_of[tensor.region]].append(tensor)
        for bucket in manifest.buckets:
            buckets[rank_of[bucket.region]].append(bucket)
    except IndexError:
        raise UntrustedVersion(f"{name} names a region it does not have") from None
    for rank, signature in sorted(by_rank.items()):
        key = trusted.get(signature.key_id)
        if key is None:
            raise UntrustedVersion(
                f"{name}: rank {rank} is signed by key {signature.key_id} (job {signature.job!r}), "
                f"which is not one of the {len(trusted)} trusted keys; {how}",
                key_id=signature.key_id,
            )
        if key.job is not None and key.job != signature.job:
            raise UntrustedVersion(
                f"{name}: rank {rank} is signed by key {signature.key_id}, trusted for job "
                f"{key.job!r} only, but claims job {signature.job!r}",
                key_id=signature.key_id,
            )
        base, indices = parts.get(rank, (0, []))
        message = _canonical(
            model=manifest.model,
            version=manifest.version,
            rank=rank,
            world_size=manifest.world_size,
            job=signature.job,
            algorithm=manifest.checksum_algorithm,
            regions=[manifest.regions[i] for i in indices],
            tensors=tensors[rank],
            buckets=buckets[rank],
            base=base,
        )
        try:
            key.key.verify(signature.signature, message)
        except InvalidSignature:
            raise UntrustedVersion(
                f"{name}: rank {rank}'s signature by trusted key {signature.key_id} does not match "
                "the manifest: it was changed after signing (or the signature is another version's)",
                key_id=signature.key_id,
            ) from None
    # Checked once every claim is known to be signed: a job claim is worth nothing before.
    jobs = {signature.job for signature in by_rank.values()}
    if len(jobs) > 1:
        raise UntrustedVersion(
            f"{name} mixes shards signed for trainer jobs {sorted(jobs)}; all ranks of a version "
            "must come from one job"
        )
    if require_digests:
        missing = sum(
            1 for b in manifest.buckets if not b.digest.startswith(DIGEST_ALGORITHM + ":")
        )
        if missing:
            raise UntrustedVersion(
                f"{name}: {missing} of {len(manifest.buckets)} buckets carry no {DIGEST_ALGORITHM} "
                "digest, and this subscriber requires them (untrusted network); publish with "
                "--secure-digests (Publisher(secure_digests=True))"
            )


# cryptographic bucket digests


def crypto_digest(data: memoryview | bytes, *, all_cores: bool = False) -> str:
    """`blake3:` and the BLAKE3 digest of `data` in hex; `all_cores` hashes one buffer on every
    core (same digest), for a trainer sealing a whole version at once."""
    threads = blake3.blake3.AUTO if all_cores else 1
    return f"{DIGEST_ALGORITHM}:{blake3.blake3(data, max_threads=threads).hexdigest()}"


def digest_matches(data: memoryview | bytes, digest: str) -> bool:
    """True if `data` has `digest`; an algorithm other than BLAKE3 never matches."""
    return digest.startswith(DIGEST_ALGORITHM + ":") and crypto_digest(data) == digest


def add_digests(shard: Shard, regions: Sequence[memoryview]) -> Shard:
    """`shard` with every bucket's BLAKE3 digest, read from `regions` (one buffer per region)."""
    buckets = tuple(
        msgspec.structs.replace(
            bucket,
            digest=crypto_digest(
                regions[bucket.region][bucket.offset : bucket.offset + bucket.nbytes],
                all_cores=True,
            ),
        )
        for bucket in shard.buckets
    )
    return msgspec.structs.replace(shard, buckets=buckets)
