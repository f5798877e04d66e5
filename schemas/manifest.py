"""What a published version holds: tensors, the regions they live in, buckets and locators.

A version's payload is laid out as a few large contiguous *regions* per trainer rank. Every
tensor lives at an aligned offset inside one region; every region is cut into *buckets*
(contiguous byte ranges, each with a checksum) that subscribers fetch and verify one by one.
A `Locator` says where a region's bytes can be read; a region may offer several.

Every field a peer controls is bounded in its type (lengths, ranges, digests as short hex), so
a decoded manifest is already small and well typed; the cross-field rules (ranges inside
regions, coverage by buckets, overlaps, alignment, size caps) are `schemas.validate`'s.

    Manifest(model, version)
      regions[k]  nbytes, locators (mooncake | zmq | shm | cuda_ipc)  <- one or more per rank
      tensors[i]  name, dtype, shape, region, offset, nbytes
      buckets[j]  region, offset, nbytes, checksum
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

__all__ = [
    "ALIGNMENT",
    "BucketSpec",
    "CudaIpcLocator",
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
]

ALIGNMENT = 256
"""Byte alignment of every tensor inside a region (and of every bucket boundary)."""

MAX_INT = 2**63 - 1
"""Every count, offset and size on the wire fits a signed 64-bit integer."""
MAX_WORLD_SIZE = 4096
"""Trainer ranks of one version."""
MAX_NAME_CHARS = 1024
"""Tensor names (real ones are a few hundred characters at most)."""
MAX_REGIONS = 65_536
MAX_TENSORS = 1 << 21
"""A 1 T-parameter model has ~100k tensors; the validator's default caps are tighter."""
MAX_BUCKETS = 1 << 21
MAX_LOCATORS = 16
"""Transports one region is offered on."""
MAX_DIMS = 16

Version = Annotated[int, msgspec.Meta(ge=0, le=MAX_INT)]
ModelName = Annotated[
    str, msgspec.Meta(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._/-]+$")
]
NonNegative = Annotated[int, msgspec.Meta(ge=0, le=MAX_INT)]
Rank = Annotated[int, msgspec.Meta(ge=0, lt=MAX_WORLD_SIZE)]
WorldSize = Annotated[int, msgspec.Meta(ge=1, le=MAX_WORLD_SIZE)]
TensorName = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME_CHARS)]
Address = Annotated[str, msgspec.Meta(max_length=300)]
"""Hosts, `host:port` sessions and ZeroMQ endpoints."""
Key = Annotated[str, msgspec.Meta(max_length=255)]
"""Region keys and shared-memory segment names."""
Digest = Annotated[str, msgspec.Meta(max_length=128, pattern=r"^[0-9a-f]*$")]
"""A bucket checksum: lowercase hex, at most 512 bits."""
AlgorithmName = Annotated[str, msgspec.Meta(max_length=32)]
Timestamp = Annotated[float, msgspec.Meta(ge=0.0, le=1e11)]
"""Seconds since the epoch (finite: NaN and infinities fail the bounds)."""
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


class MooncakeLocator(msgspec.Struct, frozen=True, tag="mooncake"):
    """A region registered with a mooncake TransferEngine: read it one-sided."""

    session: Address
    """The engine's `host:rpc_port`."""
    address: NonNegative
    protocol: Annotated[str, msgspec.Meta(max_length=16)] = "tcp"


class FrameLocator(msgspec.Struct, frozen=True, tag="zmq"):
    """A region served over a ZeroMQ ROUTER socket, read by (key, offset, nbytes) requests."""

    endpoint: Address
    """`tcp://host:port`."""
    key: Key
    server_key: Annotated[str, msgspec.Meta(max_length=40)] = ""
    """The sender's CURVE public key (z85); set, the reads are encrypted (CurveZMQ)."""


class ShmLocator(msgspec.Struct, frozen=True, tag="shm"):
    """A region in POSIX shared memory on host `host`: same-host subscribers map it, no copy."""

    host: Address
    """An id of the machine (hostname and boot id): shared memory is only shared there."""
    name: Key
    """The segment's name under /dev/shm: a plain file name (checked by the validator)."""
    nbytes: NonNegative


# The same-GPU offer (publishers/publisher.py `offer_gpu`; subscribers/cuda/swap.py reads it).

IpcHandle = Annotated[bytes, msgspec.Meta(max_length=1024)]
"""cudaIpcMemHandle_t and cudaIpcEventHandle_t are 64 bytes; torch's names are short too."""


class CudaIpcLocator(msgspec.Struct, frozen=True, tag="cuda_ipc"):
    """A region in the publisher's GPU memory: a subscriber on the same GPU (same host, same
    device UUID) opens the CUDA IPC handle and copies it device to device. The fields up to
    `event_sync_required` are one exported allocation (`schemas.ipc.CudaIpcBuffer`'s);
    the region lies at `region_offset` inside that buffer."""

    host: Address
    """`streamer.transport.shm.host_id()`: handles mean something only on that machine."""
    device_uuid: Annotated[str, msgspec.Meta(max_length=128)]
    device: Annotated[int, msgspec.Meta(ge=0, lt=1024)]
    handle: IpcHandle
    size_bytes: NonNegative
    region_offset: NonNegative
    nbytes: NonNegative
    offset_bytes: NonNegative = 0
    ref_counter_handle: IpcHandle = b""
    ref_counter_offset: NonNegative = 0
    event_handle: IpcHandle = b""
    event_sync_required: bool = False


Locator = MooncakeLocator | FrameLocator | ShmLocator | CudaIpcLocator


class RegionSpec(msgspec.Struct, frozen=True, gc=False):
    nbytes: NonNegative
    locators: Annotated[tuple[Locator, ...], msgspec.Meta(max_length=MAX_LOCATORS)]
    rank: Rank = 0


class TensorSpec(msgspec.Struct, frozen=True, gc=False):
    name: TensorName
    dtype: DType
    shape: Annotated[tuple[NonNegative, ...], msgspec.Meta(max_length=MAX_DIMS)]
    region: NonNegative
    offset: NonNegative
    nbytes: NonNegative


class BucketSpec(msgspec.Struct, frozen=True, gc=False):
    region: NonNegative
    offset: NonNegative
    nbytes: NonNegative
    checksum: Digest
    digest: CryptoDigest = ""
    """A cryptographic digest of the bucket (`blake3:<hex>`) in the secure mode, else empty."""


Regions = Annotated[tuple[RegionSpec, ...], msgspec.Meta(max_length=MAX_REGIONS)]
Tensors = Annotated[tuple[TensorSpec, ...], msgspec.Meta(max_length=MAX_TENSORS)]
Buckets = Annotated[tuple[BucketSpec, ...], msgspec.Meta(max_length=MAX_BUCKETS)]


class Shard(msgspec.Struct, frozen=True):
    """What one trainer rank publishes; region indices are local to the shard."""

    regions: Regions
    tensors: Tensors
    buckets: Buckets
    checksum_algorithm: AlgorithmName = "wmix128"
    signature: ShardSignature | None = None
    """The publishing rank's signature over the shard (`streamer.signing`), if it signs."""


class Manifest(msgspec.Struct, frozen=True):
    """Everything a subscriber needs to pull, verify and apply one version."""

    model: ModelName
    version: Version
    regions: Regions
    tensors: Tensors
    buckets: Buckets
    checksum_algorithm: AlgorithmName = "wmix128"
    world_size: WorldSize = 1
    published_at: Timestamp = 0.0
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
            checksum_algorithm=algorithms.pop() if algorithms else "wmix128",
            world_size=len(shards),
            published_at=published_at,
            signatures=tuple(shard.signature for shard in shards if shard.signature is not None),
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
