"""Signed versions: what verifies, what is refused and why, key files, BLAKE3 digests."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import msgspec
import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings, strategies as st

from schemas.codec import decode_message, encode
from schemas.manifest import (
    BucketSpec,
    FrameLocator,
    Manifest,
    RegionSpec,
    Shard,
    TensorSpec,
)
from schemas.messages import Announce
from streamer.signing import (
    UntrustedVersion,
    add_digests,
    crypto_digest,
    digest_matches,
    sign_shard,
)
from streamer.signing_keys import (
    PublicKey,
    SigningKey,
    TrustedKeys,
    load_signing_key,
    load_trusted_keys,
    new_signing_key,
)

if TYPE_CHECKING:
    from pathlib import Path

TRAINER = SigningKey.generate(job="run-7")
TRAINER_2 = SigningKey.generate(job="run-7")  # a second rank's key of the same job
OTHER_JOB = SigningKey.generate(job="run-8")
STRANGER = SigningKey.generate(job="run-7")  # claims the job, but nobody trusts it


def shard(rank: int, *, seed: int = 0, endpoint: str = "tcp://10.0.0.1:1") -> Shard:
    """Two regions of 512 bytes, two tensors, one bucket per region."""
    locators = (FrameLocator(endpoint=endpoint, key=f"r{rank}"),)
    return Shard(
        regions=(
            RegionSpec(nbytes=512, locators=locators, rank=rank),
            RegionSpec(nbytes=512, locators=locators, rank=rank),
        ),
        tensors=(
            TensorSpec(f"w{rank}.a", "float32", (128,), 0, 0, 512),
            TensorSpec(f"w{rank}.b", "float32", (2, 64), 1, 0, 512),
        ),
        buckets=(
            BucketSpec(0, 0, 512, f"{seed:032x}"),
            BucketSpec(1, 0, 512, f"{seed + 1:032x}"),
        ),
    )


def signed(
    version: int, keys: list[SigningKey], *, model: str = "policy", digests: bool = False
) -> Manifest:
    shards = []
    for rank, key in enumerate(keys):
        part = shard(rank, seed=version)
        if digests:
            part = add_digests(part, [memoryview(bytes([version]) * 512)] * 2)
        shards.append(
            sign_shard(part, model=model, version=version, rank=rank, world_size=len(keys), key=key)
        )
    return Manifest.assemble(model, version, shards)


TRUSTED = TrustedKeys.of(TRAINER.public(), TRAINER_2.public(), OTHER_JOB.public())


def test_a_signed_version_verifies_after_the_wire_and_a_locator_rewrite() -> None:
    manifest = signed(3, [TRAINER, TRAINER_2])
    decoded = decode_message(encode(Announce(manifest=manifest)))
    assert isinstance(decoded, Announce)
    TRUSTED.verify(decoded.manifest)
    # The broker or a relay may say where bytes are read: locators are not signed.
    moved = msgspec.structs.replace(
        manifest,
        regions=tuple(
            msgspec.structs.replace(r, locators=(FrameLocator(endpoint="tcp://relay:9", key="x"),))
            for r in manifest.regions
        ),
    )
    TRUSTED.verify(moved)


def _tamper(manifest: Manifest, what: str) -> Manifest:
    replace = msgspec.structs.replace
    if what == "bucket checksum":
        buckets = list(manifest.buckets)
        buckets[3] = replace(buckets[3], checksum="f" * 32)
        return replace(manifest, buckets=tuple(buckets))
    if what == "tensor shape":
        tensors = list(manifest.tensors)
        tensors[2] = replace(tensors[2], shape=(64, 2))
        return replace(manifest, tensors=tuple(tensors))
    if what == "tensor moved to another rank's region":
        tensors = list(manifest.tensors)
        tensors[0] = replace(tensors[0], region=2)
        return replace(manifest, tensors=tuple(tensors))
    if what == "region size":
        regions = list(manifest.regions)
        regions[1] = replace(regions[1], nbytes=1024)
        return replace(manifest, regions=tuple(regions))
    if what == "model":
        return replace(manifest, model="other")
    if what == "checksum algorithm":
        return replace(manifest, checksum_algorithm="none")
    raise AssertionError(what)


@pytest.mark.parametrize(
    "what",
    [
        "bucket checksum",
        "tensor shape",
        "tensor moved to another rank's region",
        "region size",
        "model",
        "checksum algorithm",
    ],
)
def test_a_tampered_field_is_refused(what: str) -> None:
    manifest = _tamper(signed(3, [TRAINER, TRAINER_2]), what)
    with pytest.raises(UntrustedVersion, match="changed after signing"):
        TRUSTED.verify(manifest)


def test_a_shard_re_signed_by_an_untrusted_key_is_refused_naming_the_key() -> None:
    manifest = signed(3, [TRAINER, STRANGER])
    with pytest.raises(UntrustedVersion) as refused:
        TRUSTED.verify(manifest)
    assert refused.value.key_id == STRANGER.key_id
    assert f"rank 1 is signed by key {STRANGER.key_id}" in str(refused.value)
    assert "--trust" in str(refused.value)


def test_an_unsigned_version_is_refused_saying_how_to_sign() -> None:
    manifest = Manifest.assemble("policy", 3, [shard(0)])
    with pytest.raises(UntrustedVersion, match=r"is not signed.*--signing-key"):
        TRUSTED.verify(manifest)


def test_a_rank_without_a_signature_is_refused() -> None:
    signed_rank = sign_shard(shard(0), model="policy", version=3, rank=0, world_size=2, key=TRAINER)
    manifest = Manifest.assemble("policy", 3, [signed_rank, shard(1)])
    with pytest.raises(UntrustedVersion, match=r"ranks \[1\] unsigned"):
        TRUSTED.verify(manifest)


def test_a_signature_of_another_version_replayed_is_refused() -> None:
    old = signed(3, [TRAINER])
    # Same bytes, same checksums, announced as version 4 with version 3's signature.
    replayed = msgspec.structs.replace(old, version=4)
    with pytest.raises(UntrustedVersion, match="changed after signing"):
        TRUSTED.verify(replayed)


def test_a_rank_signed_by_a_key_of_another_job_is_refused() -> None:
    with pytest.raises(
        UntrustedVersion, match=r"mixes shards signed for trainer jobs \['run-7', 'run-8'\]"
    ):
        TRUSTED.verify(signed(3, [TRAINER, OTHER_JOB]))
    # The other job's key claiming this job: its public key file pins it to run-8.
    posing = SigningKey(OTHER_JOB.private, job="run-7")
    with pytest.raises(UntrustedVersion, match="trusted for job 'run-8' only"):
        TRUSTED.verify(signed(3, [TRAINER, posing]))


def test_secure_mode_requires_digests_inside_the_signature() -> None:
    with pytest.raises(UntrustedVersion, match=r"carry no blake3 digest.*--secure-digests"):
        TRUSTED.verify(signed(3, [TRAINER]), require_digests=True)
    manifest = signed(3, [TRAINER, TRAINER_2], digests=True)
    TRUSTED.verify(manifest, require_digests=True)
    buckets = list(manifest.buckets)
    buckets[0] = msgspec.structs.replace(buckets[0], digest=crypto_digest(b"forged"))
    with pytest.raises(UntrustedVersion, match="changed after signing"):
        TRUSTED.verify(msgspec.structs.replace(manifest, buckets=tuple(buckets)))


def test_bucket_digests_are_blake3_of_the_bytes() -> None:
    data = memoryview(bytes(range(256)) * 4)
    digest = crypto_digest(data)
    assert digest == "blake3:" + __import__("blake3").blake3(bytes(data)).hexdigest()
    assert digest_matches(data, digest)
    assert not digest_matches(data[:-1], digest)
    assert not digest_matches(data, "sha1:" + digest.split(":")[1])


def test_key_files_round_trip_with_their_job(tmp_path: Path) -> None:
    made = new_signing_key(tmp_path / "trainer.key", job="run-7")
    assert os.stat(tmp_path / "trainer.key").st_mode & 0o777 == 0o600
    loaded = load_signing_key(tmp_path / "trainer.key")
    assert (loaded.key_id, loaded.job) == (made.key_id, "run-7")
    trusted = load_trusted_keys([tmp_path / "trainer.key.pub"])
    assert [(k, v.job) for k, v in trusted.keys.items()] == [(made.key_id, "run-7")]
    with pytest.raises(ValueError, match="exists"):
        new_signing_key(tmp_path / "trainer.key", job="run-7")
    # Raw 32-byte keys, and several PEM blocks in one file.
    raw = tmp_path / "raw.pub"
    raw.write_bytes(
        STRANGER.private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
    )
    bundle = tmp_path / "bundle.pem"
    bundle.write_text(TRAINER.public().pem() + PublicKey(OTHER_JOB.private.public_key()).pem())
    keys = load_trusted_keys([raw, bundle]).keys
    assert keys[STRANGER.key_id].job is None
    assert keys[TRAINER.key_id].job == "run-7"
    assert keys[OTHER_JOB.key_id].job is None
    not_a_key = tmp_path / "junk.pub"
    not_a_key.write_text("hello\n")
    with pytest.raises(ValueError, match="no public key found"):
        load_trusted_keys([not_a_key])


_INT_FIELDS = [
    ("regions", "nbytes"),
    ("regions", "rank"),
    ("tensors", "region"),
    ("tensors", "offset"),
    ("tensors", "nbytes"),
    ("buckets", "region"),
    ("buckets", "offset"),
    ("buckets", "nbytes"),
]


@settings(max_examples=200, deadline=None)
@given(
    field=st.sampled_from(_INT_FIELDS),
    index=st.integers(0, 3),
    value=st.integers(0, 5000),
)
def test_any_changed_number_is_refused_with_untrusted_version_only(
    field: tuple[str, str], index: int, value: int
) -> None:
    manifest = signed(3, [TRAINER, TRAINER_2], digests=True)
    group, name = field
    items = list(getattr(manifest, group))
    if getattr(items[index], name) == value:
        return  # not a change
    items[index] = msgspec.structs.replace(items[index], **{name: value})
    changed = msgspec.structs.replace(manifest, **{group: tuple(items)})
    with pytest.raises(UntrustedVersion):  # never an IndexError, KeyError...
        TRUSTED.verify(changed, require_digests=True)
