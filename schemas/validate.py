"""The one manifest validator: run by the broker on every shard it is sent and on the manifest
it assembles, and by every subscriber before it allocates anything for a manifest.

The wire types already bound every field (lengths, ranges, digests as hex); this module checks
the rules across fields, against caps that an operator can set (`ManifestLimits`):

    counts and sizes     regions, tensors, buckets, bytes per region and in all <= the limits
    tensors              known dtype, nbytes == prod(shape) * itemsize, unique names,
                         inside their region, offset aligned to ALIGNMENT, no two overlapping
    buckets              inside their region, aligned, non-empty, no two overlapping, and
                         covering every tensor byte (so each byte lies in exactly one bucket)
    regions, locators    a locator wherever there are bytes; shm names plain file names,
                         endpoints `tcp://host:port`, sessions `host:port`
    checksum             a known algorithm; digests of its length

Everything is one sort of tensors and buckets by (region, offset) and linear scans: a
100k-tensor manifest validates in a fraction of a second. A failure raises `InvalidManifest`
(a `ValueError`) naming the field and what is wrong:

>>> validate_shard(Shard(regions=(), tensors=(), buckets=()), ManifestLimits())
>>> from schemas.manifest import TensorSpec
>>> spec = TensorSpec(name="w", dtype="float32", shape=(4,), region=0, offset=0, nbytes=16)
>>> validate_shard(Shard(regions=(), tensors=(spec,), buckets=()), ManifestLimits())
Traceback (most recent call last):
...
schemas.validate.InvalidManifest: tensors[0].region: region 0 does not exist (the shard has 0 regions)
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Annotated, get_args

import msgspec

from schemas.manifest import (
    ALIGNMENT,
    MAX_BUCKETS,
    MAX_NAME_CHARS,
    MAX_REGIONS,
    MAX_TENSORS,
    CudaIpcLocator,
    DType,
    FrameLocator,
    Manifest,
    MooncakeLocator,
    Shard,
    ShmLocator,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    from schemas.manifest import BucketSpec, Locator, RegionSpec, TensorSpec

__all__ = [
    "CHECKSUM_DIGEST_CHARS",
    "DTYPE_BYTES",
    "InvalidManifest",
    "ManifestLimits",
    "validate_manifest",
    "validate_shard",
]

DTYPE_BYTES: dict[str, int] = {
    "bfloat16": 2,
    "float16": 2,
    "float32": 4,
    "float64": 8,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int8": 1,
    "uint8": 1,
    "int16": 2,
    "int32": 4,
    "int64": 8,
    "bool": 1,
}
assert set(DTYPE_BYTES) == set(get_args(DType))

CHECKSUM_DIGEST_CHARS: dict[str, int] = {"wmix128": 32}
"""Known checksum algorithms and the hex digits of their digests. A new algorithm is added
here (and to the subscribers' verifiers) before any publisher uses it."""

MOONCAKE_PROTOCOLS = frozenset({"tcp", "rdma"})

_HOST = r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]{2,45}\])"
_ENDPOINT = re.compile(rf"tcp://({_HOST}):([0-9]{{1,5}})")
_SESSION = re.compile(rf"({_HOST}):([0-9]{{1,5}})")
_SHM_NAME = re.compile(r"[A-Za-z0-9._-]{1,255}")

GiB = 1 << 30
Count = Annotated[int, msgspec.Meta(ge=0)]


class ManifestLimits(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Caps on what one manifest may declare; the defaults fit a 1 T-parameter model.

    A subscriber allocates `total_bytes` of staging for a version, so `max_total_bytes` is
    also what one hostile manifest could make it try to allocate: lower it to the largest
    model a fleet serves. Set in the broker's config (`[manifest_limits]`) and `PullConfig`.

    >>> ManifestLimits(max_total_bytes=8 << 40).max_total_bytes
    8796093022208
    """

    max_region_bytes: Count = 64 * GiB
    """One region (packing makes 1 GiB regions; a tensor larger than that gets its own)."""
    max_total_bytes: Count = 4096 * GiB
    """All regions of a version together (2 TB is a 1 T-parameter model in bf16)."""
    max_regions: Annotated[int, msgspec.Meta(ge=0, le=MAX_REGIONS)] = MAX_REGIONS
    max_tensors: Annotated[int, msgspec.Meta(ge=0, le=MAX_TENSORS)] = 1_000_000
    max_buckets: Annotated[int, msgspec.Meta(ge=0, le=MAX_BUCKETS)] = 1_000_000
    max_name_chars: Annotated[int, msgspec.Meta(ge=1, le=MAX_NAME_CHARS)] = MAX_NAME_CHARS


class InvalidManifest(ValueError):
    """A manifest (or one rank's shard of it) breaks a rule; `field` names where.

    Never retried: the same bytes fail the same way. The message is `field: what is wrong`.
    """

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


def validate_shard(shard: Shard, limits: ManifestLimits) -> None:
    """Check one rank's shard (region indices local to it); raise `InvalidManifest`."""
    _validate(
        shard.regions,
        shard.tensors,
        shard.buckets,
        shard.checksum_algorithm,
        limits,
        unit="shard",
        world_size=None,
    )


def validate_manifest(manifest: Manifest, limits: ManifestLimits) -> None:
    """Check a whole manifest before anything is allocated for it; raise `InvalidManifest`."""
    _validate(
        manifest.regions,
        manifest.tensors,
        manifest.buckets,
        manifest.checksum_algorithm,
        limits,
        unit="manifest",
        world_size=manifest.world_size,
    )


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"


def _validate(
    regions: Sequence[RegionSpec],
    tensors: Sequence[TensorSpec],
    buckets: Sequence[BucketSpec],
    checksum_algorithm: str,
    limits: ManifestLimits,
    *,
    unit: str,
    world_size: int | None,
) -> None:
    for what, items, cap in (
        ("regions", regions, limits.max_regions),
        ("tensors", tensors, limits.max_tensors),
        ("buckets", buckets, limits.max_buckets),
    ):
        if len(items) > cap:
            raise InvalidManifest(what, f"{len(items)} entries, more than the limit of {cap}")
    digest_chars = CHECKSUM_DIGEST_CHARS.get(checksum_algorithm)
    if digest_chars is None:
        raise InvalidManifest(
            "checksum_algorithm",
            f"unknown algorithm {_short(checksum_algorithm)}; known: {sorted(CHECKSUM_DIGEST_CHARS)}",
        )
    _check_regions(regions, limits, world_size)
    ends = [region.nbytes for region in regions]
    tensor_order = _check_tensors(tensors, ends, limits, unit)
    bucket_order = _check_buckets(buckets, ends, digest_chars, unit)
    _check_coverage(tensors, tensor_order, buckets, bucket_order)


def _check_regions(
    regions: Sequence[RegionSpec], limits: ManifestLimits, world_size: int | None
) -> None:
    total = 0
    for r, region in enumerate(regions):
        where = f"regions[{r}]"
        if region.nbytes > limits.max_region_bytes:
            raise InvalidManifest(
                f"{where}.nbytes",
                f"{region.nbytes} bytes, more than the limit of {limits.max_region_bytes} per region",
            )
        total += region.nbytes
        if world_size is not None and region.rank >= world_size:
            raise InvalidManifest(
                f"{where}.rank", f"rank {region.rank} is not below world_size {world_size}"
            )
        if region.nbytes and not region.locators:
            raise InvalidManifest(f"{where}.locators", "a region with bytes needs a locator")
        for k, locator in enumerate(region.locators):
            _check_locator(locator, region, f"{where}.locators[{k}]")
    if total > limits.max_total_bytes:
        raise InvalidManifest(
            "regions",
            f"{total} bytes in all, more than the limit of {limits.max_total_bytes}",
        )


def _check_locator(locator: Locator, region: RegionSpec, where: str) -> None:
    match locator:
        case CudaIpcLocator():
            if not locator.device_uuid:
                raise InvalidManifest(f"{where}.device_uuid", "a CUDA IPC offer names its GPU")
            if not locator.handle:
                raise InvalidManifest(f"{where}.handle", "a CUDA IPC offer needs a handle")
            if locator.nbytes < region.nbytes:
                raise InvalidManifest(
                    f"{where}.nbytes",
                    f"the offer has {locator.nbytes} bytes, fewer than its region's {region.nbytes}",
                )
            if locator.region_offset + locator.nbytes > locator.size_bytes:
                raise InvalidManifest(
                    f"{where}.region_offset",
                    f"{locator.region_offset}+{locator.nbytes} lies outside the exported buffer "
                    f"({locator.size_bytes} bytes)",
                )
        case ShmLocator(name=name, nbytes=nbytes):
            if _SHM_NAME.fullmatch(name) is None or name in {".", ".."}:
                raise InvalidManifest(
                    f"{where}.name",
                    f"{_short(name)} is not a plain file name under /dev/shm "
                    "(letters, digits, '.', '_', '-'; no '/')",
                )
            if nbytes < region.nbytes:
                raise InvalidManifest(
                    f"{where}.nbytes",
                    f"the segment has {nbytes} bytes, fewer than its region's {region.nbytes}",
                )
        case FrameLocator(endpoint=endpoint):
            _check_address(_ENDPOINT, endpoint, f"{where}.endpoint", "tcp://host:port")
        case MooncakeLocator(session=session, protocol=protocol):
            _check_address(_SESSION, session, f"{where}.session", "host:port")
            if protocol not in MOONCAKE_PROTOCOLS:
                raise InvalidManifest(
                    f"{where}.protocol",
                    f"unknown protocol {_short(protocol)}; known: {sorted(MOONCAKE_PROTOCOLS)}",
                )


def _check_address(pattern: re.Pattern[str], text: str, where: str, form: str) -> None:
    match = pattern.fullmatch(text)
    if match is None or not 0 < int(match.group(2)) < 65536:
        raise InvalidManifest(where, f"{_short(text)} is not of the form {form}")


def _check_tensors(
    tensors: Sequence[TensorSpec], ends: list[int], limits: ManifestLimits, unit: str
) -> list[int]:
    """Per-tensor rules, then overlaps; returns the tensor indices sorted by (region, offset).

    One tight pass tests every rule at once; only a failing tensor is explained in detail.
    """
    if len({tensor.name for tensor in tensors}) != len(tensors):
        _explain_duplicate(tensors)
    sizes, prod, align, regions = DTYPE_BYTES, math.prod, ALIGNMENT, len(ends)
    max_chars = limits.max_name_chars
    for t, tensor in enumerate(tensors):
        region, offset, nbytes = tensor.region, tensor.offset, tensor.nbytes
        itemsize = sizes.get(tensor.dtype)
        if (
            itemsize is None
            or not 0 < len(tensor.name) <= max_chars
            or offset % align
            or region >= regions
            or offset + nbytes > ends[region]
            or nbytes != prod(tensor.shape) * itemsize
        ):
            _explain_tensor(f"tensors[{t}]", tensor, ends, limits, unit)
    order = sorted(range(len(tensors)), key=lambda t: (tensors[t].region, tensors[t].offset))
    _check_overlaps("tensors", tensors, order)
    return order


def _explain_duplicate(tensors: Sequence[TensorSpec]) -> None:
    names: set[str] = set()
    for t, tensor in enumerate(tensors):
        if tensor.name in names:
            raise InvalidManifest(f"tensors[{t}].name", f"{_short(tensor.name)} appears twice")
        names.add(tensor.name)


def _explain_tensor(
    where: str, tensor: TensorSpec, ends: list[int], limits: ManifestLimits, unit: str
) -> None:
    if not 0 < len(tensor.name) <= limits.max_name_chars:
        raise InvalidManifest(
            f"{where}.name",
            f"{len(tensor.name)} characters; names have 1 to {limits.max_name_chars}",
        )
    itemsize = DTYPE_BYTES.get(tensor.dtype)
    if itemsize is None:
        raise InvalidManifest(f"{where}.dtype", f"unknown dtype {_short(tensor.dtype)}")
    expected = math.prod(tensor.shape) * itemsize
    if tensor.nbytes != expected:
        raise InvalidManifest(
            f"{where}.nbytes",
            f"{tensor.nbytes}, but shape {_short(tensor.shape)} of {tensor.dtype} "
            f"holds {expected} bytes",
        )
    _check_range(where, tensor.region, tensor.offset, tensor.nbytes, ends, unit)


def _check_buckets(
    buckets: Sequence[BucketSpec], ends: list[int], digest_chars: int, unit: str
) -> list[int]:
    align, regions = ALIGNMENT, len(ends)
    for b, bucket in enumerate(buckets):
        region, offset, nbytes = bucket.region, bucket.offset, bucket.nbytes
        if (
            not nbytes
            or offset % align
            or region >= regions
            or offset + nbytes > ends[region]
            or ((offset + nbytes) % align and offset + nbytes != ends[region])
            or len(bucket.checksum) != digest_chars
        ):
            _explain_bucket(f"buckets[{b}]", bucket, ends, digest_chars, unit)
    order = sorted(range(len(buckets)), key=lambda b: (buckets[b].region, buckets[b].offset))
    _check_overlaps("buckets", buckets, order)
    return order


def _explain_bucket(
    where: str, bucket: BucketSpec, ends: list[int], digest_chars: int, unit: str
) -> None:
    if bucket.nbytes == 0:
        raise InvalidManifest(f"{where}.nbytes", "an empty bucket")
    _check_range(where, bucket.region, bucket.offset, bucket.nbytes, ends, unit)
    end = bucket.offset + bucket.nbytes
    if end % ALIGNMENT and end != ends[bucket.region]:
        raise InvalidManifest(
            f"{where}.nbytes",
            f"the bucket ends at byte {end}, neither a multiple of {ALIGNMENT} "
            f"nor the end of region {bucket.region}",
        )
    raise InvalidManifest(
        f"{where}.checksum",
        f"{len(bucket.checksum)} hex digits; the algorithm's digests have {digest_chars}",
    )


def _check_range(
    where: str, region: int, offset: int, nbytes: int, ends: list[int], unit: str
) -> None:
    if region >= len(ends):
        raise InvalidManifest(
            f"{where}.region",
            f"region {region} does not exist (the {unit} has {len(ends)} regions)",
        )
    if offset % ALIGNMENT:
        raise InvalidManifest(
            f"{where}.offset", f"{offset} is not a multiple of the alignment {ALIGNMENT}"
        )
    if offset + nbytes > ends[region]:
        raise InvalidManifest(
            f"{where}.nbytes",
            f"bytes {offset}..{offset + nbytes} end past region {region} ({ends[region]} bytes)",
        )


def _check_overlaps(
    what: str, items: Sequence[TensorSpec] | Sequence[BucketSpec], order: list[int]
) -> None:
    previous: int | None = None
    for index in order:
        item = items[index]
        if item.nbytes == 0:
            continue
        if previous is not None:
            before = items[previous]
            if before.region == item.region and before.offset + before.nbytes > item.offset:
                raise InvalidManifest(
                    f"{what}[{index}].offset",
                    f"bytes {item.offset}..{item.offset + item.nbytes} of region {item.region} "
                    f"overlap {what}[{previous}] (bytes {before.offset}..{before.offset + before.nbytes})",
                )
        previous = index


def _check_coverage(
    tensors: Sequence[TensorSpec],
    tensor_order: list[int],
    buckets: Sequence[BucketSpec],
    bucket_order: list[int],
) -> None:
    """Every tensor byte lies in a bucket (buckets do not overlap, so in exactly one)."""
    # Runs of adjacent buckets, as (region, start, end), in order.
    runs: list[tuple[int, int, int]] = []
    for b in bucket_order:
        bucket = buckets[b]
        end = bucket.offset + bucket.nbytes
        if runs and runs[-1][0] == bucket.region and runs[-1][2] == bucket.offset:
            runs[-1] = (bucket.region, runs[-1][1], end)
        else:
            runs.append((bucket.region, bucket.offset, end))
    k, num_runs = 0, len(runs)
    for t in tensor_order:
        tensor = tensors[t]
        nbytes = tensor.nbytes
        if not nbytes:
            continue
        region, offset = tensor.region, tensor.offset
        while k < num_runs and (
            runs[k][0] < region or (runs[k][0] == region and runs[k][2] <= offset)
        ):
            k += 1  # this run ends at or before the tensor's start
        covered = (
            k < num_runs
            and runs[k][0] == region
            and runs[k][1] <= offset
            and offset + nbytes <= runs[k][2]
        )
        if not covered:
            hint = " (the manifest has no buckets)" if not buckets else ""
            raise InvalidManifest(
                f"tensors[{t}]",
                f"bytes {tensor.offset}..{tensor.offset + tensor.nbytes} of region {tensor.region} "
                f"are not all inside buckets{hint}: they would be applied unverified",
            )
