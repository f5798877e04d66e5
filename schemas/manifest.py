"""What a published version holds: tensors, the regions they live in, buckets and locators.

A version's payload is laid out as a few large contiguous *regions* per trainer rank. Every
tensor lives at an aligned offset inside one region; every region is cut into *buckets*
(contiguous byte ranges, each with a checksum) that subscribers fetch and verify one by one.
A `Locator` says where a region's bytes can be read; a region may offer several.

    Manifest(model, version)
      regions[k]  nbytes, locators (mooncake | zmq | shm)   <- one or more per trainer rank
      tensors[i]  name, dtype, shape, region, offset, nbytes
      buckets[j]  region, offset, nbytes, checksum
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

__all__ = [
    "ALIGNMENT",
    "BucketSpec",
    "DType",
    "FrameLocator",
    "Locator",
    "Manifest",
    "ModelName",
    "MooncakeLocator",
    "RegionSpec",
    "Shard",
    "ShardSignature",
    "ShmLocator",
    "TensorSpec",
    "Version",
    "validate_shard",
]

ALIGNMENT = 256
"""Byte alignment of every tensor inside a region (and of every bucket boundary)."""

Version = Annotated[int, msgspec.Meta(ge=0)]
ModelName = Annotated[
    str, msgspec.Meta(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._/-]+$")
]
DType = Literal[
    "bfloat16",
    "float16",
    "float32",
    "float64",
    "float8_e4m3fn",
    "float8_e5m2",
    "int8",
    "uint8",
    "int16",
    "int32",
    "int64",
    "bool",
]
NonNegative = Annotated[int, msgspec.Meta(ge=0)]


class MooncakeLocator(msgspec.Struct, frozen=True, tag="mooncake"):
    """A region registered with a mooncake TransferEngine: read it one-sided."""

    session: str
    """The engine's `host:rpc_port`."""
    address: NonNegative
    protocol: str = "tcp"


class FrameLocator(msgspec.Struct, frozen=True, tag="zmq"):
    """A region served over a ZeroMQ ROUTER socket, read by (key, offset, nbytes) requests."""

    endpoint: str
    key: str


class ShmLocator(msgspec.Struct, frozen=True, tag="shm"):
    """A region in POSIX shared memory on host `host`: same-host subscribers map it, no copy."""

    host: str
    """An id of the machine (hostname and boot id): shared memory is only shared there."""
    name: str
    """The segment's name under /dev/shm."""
    nbytes: NonNegative


Locator = MooncakeLocator | FrameLocator | ShmLocator


class RegionSpec(msgspec.Struct, frozen=True, gc=False):
    nbytes: NonNegative
    locators: tuple[Locator, ...]
    rank: NonNegative = 0


class TensorSpec(msgspec.Struct, frozen=True, gc=False):
    name: str
    dtype: DType
    shape: tuple[NonNegative, ...]
    region: NonNegative
    offset: NonNegative
    nbytes: NonNegative


class BucketSpec(msgspec.Struct, frozen=True, gc=False):
    region: NonNegative
    offset: NonNegative
    nbytes: NonNegative
    checksum: str
    digest: CryptoDigest = ""
    """A cryptographic digest of the bucket (`blake3:<hex>`) in the secure mode, else empty."""


class Shard(msgspec.Struct, frozen=True):
    """What one trainer rank publishes; region indices are local to the shard."""

    regions: tuple[RegionSpec, ...]
    tensors: tuple[TensorSpec, ...]
    buckets: tuple[BucketSpec, ...]
    checksum_algorithm: str = "wsum64"
    signature: ShardSignature | None = None
    """The publishing rank's signature over the shard (`streamer.signing`), if it signs."""


class Manifest(msgspec.Struct, frozen=True):
    """Everything a subscriber needs to pull, verify and apply one version."""

    model: ModelName
    version: Version
    regions: tuple[RegionSpec, ...]
    tensors: tuple[TensorSpec, ...]
    buckets: tuple[BucketSpec, ...]
    checksum_algorithm: str = "wsum64"
    world_size: int = 1
    published_at: float = 0.0
    signatures: Annotated[tuple[ShardSignature, ...], msgspec.Meta(max_length=MAX_SIGNATURES)] = ()
    """Each signing rank's signature over its part (`streamer.signing.verify_manifest`)."""

    @property
    def total_bytes(self) -> int:
        return sum(region.nbytes for region in self.regions)

    @property
    def payload_bytes(self) -> int:
        return sum(tensor.nbytes for tensor in self.tensors)

    @classmethod
    def assemble(
        cls, model: str, version: int, shards: list[Shard], *, published_at: float = 0.0
    ) -> Manifest:
        """Join the shards of every rank (in rank order) into one manifest.

        Region indices of each shard are shifted past the regions of the shards before it.

        >>> m = Manifest.assemble("m", 1, [Shard(regions=(), tensors=(), buckets=())])
        >>> m.total_bytes
        0
        """
        algorithms = {shard.checksum_algorithm for shard in shards}
        if len(algorithms) > 1:
            raise ValueError(f"shards disagree on the checksum algorithm: {sorted(algorithms)}")
        regions: list[RegionSpec] = []
        tensors: list[TensorSpec] = []
        buckets: list[BucketSpec] = []
        names: set[str] = set()
        for shard in shards:
            base = len(regions)
            regions.extend(shard.regions)
            for tensor in shard.tensors:
                if tensor.name in names:
                    raise ValueError(f"tensor {tensor.name!r} is published by two ranks")
                names.add(tensor.name)
                tensors.append(msgspec.structs.replace(tensor, region=tensor.region + base))
            buckets.extend(
                msgspec.structs.replace(bucket, region=bucket.region + base)
                for bucket in shard.buckets
            )
        return cls(
            model=model,
            version=version,
            regions=tuple(regions),
            tensors=tuple(tensors),
            buckets=tuple(buckets),
            checksum_algorithm=algorithms.pop() if algorithms else "wsum64",
            world_size=len(shards),
            published_at=published_at,
            signatures=tuple(shard.signature for shard in shards if shard.signature is not None),
        )


def validate_shard(shard: Shard) -> None:
    """Check that every tensor and bucket lies inside its region; raise ValueError if not."""
    for tensor in shard.tensors:
        _check_range(shard, tensor.region, tensor.offset, tensor.nbytes, f"tensor {tensor.name!r}")
    for index, bucket in enumerate(shard.buckets):
        _check_range(shard, bucket.region, bucket.offset, bucket.nbytes, f"bucket {index}")


def _check_range(shard: Shard, region: int, offset: int, nbytes: int, what: str) -> None:
    if region >= len(shard.regions):
        raise ValueError(f"{what} names region {region}, but the shard has {len(shard.regions)}")
    if offset + nbytes > shard.regions[region].nbytes:
        raise ValueError(
            f"{what} ends at byte {offset + nbytes}, past the end of region {region} "
            f"({shard.regions[region].nbytes} bytes)"
        )


# Signed versions (streamer/signing.py signs and verifies; these are the wire shapes).

MAX_SIGNATURES = 1 << 16
"""At most one signature per trainer rank."""

JobName = Annotated[str, msgspec.Meta(max_length=200, pattern=r"^[A-Za-z0-9._/-]*$")]
CryptoDigest = Annotated[str, msgspec.Meta(max_length=80, pattern=r"^([a-z0-9]+:[0-9a-f]+)?$")]


class ShardSignature(msgspec.Struct, frozen=True, gc=False):
    """One trainer rank's Ed25519 signature over its shard, locators left out.

    `key_id` names the signing key (`ed25519:` and 16 bytes of its SHA-256, in hex); `job` is
    the trainer job the signer claims, inside the signed bytes.
    """

    rank: NonNegative
    key_id: Annotated[str, msgspec.Meta(min_length=1, max_length=80)]
    signature: Annotated[bytes, msgspec.Meta(min_length=64, max_length=64)]
    job: JobName = ""
