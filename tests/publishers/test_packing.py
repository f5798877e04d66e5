"""Packing named CPU tensors into aligned regions and checksummed buckets, and back."""

from __future__ import annotations

import math

import pytest
import torch

from publishers.packing import Layout, pack, plan
from schemas.manifest import ALIGNMENT, FrameLocator, TensorSpec
from streamer.checksum import wmix128
from subscribers.dtypes import torch_dtype


def buffers_for(layout: Layout, *, fill: int = 0xA5) -> list[torch.Tensor]:
    """Buffers full of junk, as reused pool memory would be."""
    return [torch.full((n,), fill, dtype=torch.uint8) for n in layout.region_bytes]


def unpack(layout: Layout, buffers: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a subscriber does with staged bytes: a view per tensor spec."""
    return {spec.name: view(buffers[spec.region], spec) for spec in layout.tensors}


def view(buffer: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    raw = buffer[spec.offset : spec.offset + spec.nbytes]
    return raw.view(torch_dtype(spec.dtype)).view(spec.shape)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality, NaNs included."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(
        a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8)
    )


def mixed_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    return {
        "embed.weight": randn(33, 17).to(torch.bfloat16),
        "fp8.weight": randn(5, 7).to(torch.float8_e4m3fn),
        "fp8_e5m2.weight": randn(3).to(torch.float8_e5m2),
        "mask": randn(13) > 0,
        "scale": torch.tensor(3.25),  # 0-dim
        "empty": torch.empty(0, 4),
        "half": randn(9).half(),
        "double": randn(3, 3).double(),
        "ids": torch.arange(-5, 6, dtype=torch.int64),
        "bytes": torch.arange(0, 255, 7, dtype=torch.uint8),
        "int8": torch.arange(-8, 8, dtype=torch.int8),
        "int16": torch.arange(-300, 300, 37, dtype=torch.int16),
        "int32": torch.arange(11, dtype=torch.int32),
        "nan": torch.tensor([float("nan"), float("inf"), -0.0]),
    }


def test_every_tensor_starts_on_an_aligned_offset_in_the_given_order() -> None:
    tensors = mixed_tensors()
    layout = plan(tensors, bucket_bytes=ALIGNMENT, region_bytes=1 << 20)
    assert [spec.name for spec in layout.tensors] == list(tensors)
    for spec in layout.tensors:
        assert spec.offset % ALIGNMENT == 0
    for size in layout.region_bytes:
        assert size % ALIGNMENT == 0
    # Back to back: each tensor starts at the aligned end of the one before it.
    ends = [0]
    for spec in layout.tensors:
        assert spec.offset == ends[-1]
        ends.append(spec.offset + math.ceil(max(spec.nbytes, 1) / ALIGNMENT) * ALIGNMENT)


def test_specs_record_dtype_shape_and_byte_count() -> None:
    tensors = mixed_tensors()
    layout = plan(tensors)
    specs = {spec.name: spec for spec in layout.tensors}
    for name, tensor in tensors.items():
        spec = specs[name]
        assert torch_dtype(spec.dtype) == tensor.dtype
        assert spec.shape == tuple(tensor.shape)
        assert spec.nbytes == tensor.numel() * tensor.element_size()
    assert specs["scale"].shape == ()
    assert specs["empty"].nbytes == 0


def test_regions_split_at_region_bytes_and_a_large_tensor_gets_its_own() -> None:
    tensors = {
        "a": torch.zeros(300, dtype=torch.uint8),  # 512 aligned
        "b": torch.zeros(300, dtype=torch.uint8),  # 512: fills region 0 (1024)
        "c": torch.zeros(10, dtype=torch.uint8),  # 256: region 1
        "big": torch.zeros(5000, dtype=torch.uint8),  # larger than a region: its own
        "d": torch.zeros(10, dtype=torch.uint8),
    }
    layout = plan(tensors, bucket_bytes=ALIGNMENT, region_bytes=1024)
    placed = {spec.name: (spec.region, spec.offset) for spec in layout.tensors}
    assert placed == {"a": (0, 0), "b": (0, 512), "c": (1, 0), "big": (2, 0), "d": (3, 0)}
    assert layout.region_bytes == (1024, 256, 5120, 256)
    assert layout.total_bytes == sum(layout.region_bytes)


def test_buckets_tile_every_region_and_a_tensor_may_span_several() -> None:
    tensors = {"small": torch.zeros(3), "wide": torch.zeros(1000)}  # 4000 bytes -> 4096
    layout = plan(tensors, bucket_bytes=1024, region_bytes=1 << 20)
    ranges = layout.bucket_ranges()
    assert ranges == [
        (0, 0, 1024),
        (0, 1024, 1024),
        (0, 2048, 1024),
        (0, 3072, 1024),
        (0, 4096, 256),
    ]
    wide = layout.tensors[1]
    assert (wide.offset, wide.nbytes) == (256, 4000)
    spanned = [r for r in ranges if r[1] < wide.offset + wide.nbytes and wide.offset < r[1] + r[2]]
    assert len(spanned) == 5


def test_bucket_checksums_are_wmix128_of_the_bucket_bytes() -> None:
    tensors = mixed_tensors()
    layout = plan(tensors, bucket_bytes=512, region_bytes=2048)
    buffers = buffers_for(layout)
    checksums = pack(layout, tensors, buffers)
    ranges = layout.bucket_ranges()
    assert len(checksums) == len(ranges) > 3
    for (region, offset, nbytes), checksum in zip(ranges, checksums, strict=True):
        assert checksum == wmix128(buffers[region][offset : offset + nbytes].numpy().tobytes())


def test_padding_and_region_tails_are_zeroed_over_junk() -> None:
    tensors = mixed_tensors()
    layout = plan(tensors, bucket_bytes=512, region_bytes=2048)
    buffers = buffers_for(layout, fill=0xFF)
    pack(layout, tensors, buffers)
    covered = [torch.zeros(n, dtype=torch.bool) for n in layout.region_bytes]
    for spec in layout.tensors:
        covered[spec.region][spec.offset : spec.offset + spec.nbytes] = True
    assert sum(int((~mask).sum()) for mask in covered) > 1000  # plenty of padding to check
    for buffer, mask in zip(buffers, covered, strict=True):
        assert torch.count_nonzero(buffer[~mask]) == 0


def test_checksums_do_not_depend_on_what_the_buffers_held_before() -> None:
    tensors = mixed_tensors()
    layout = plan(tensors, bucket_bytes=512)
    assert pack(layout, tensors, buffers_for(layout, fill=0)) == pack(
        layout, tensors, buffers_for(layout, fill=0x5A)
    )


def test_a_larger_reused_buffer_packs_the_same_bytes() -> None:
    tensors = mixed_tensors()
    layout = plan(tensors, bucket_bytes=512)
    exact = buffers_for(layout)
    larger = [torch.full((n + 4096,), 7, dtype=torch.uint8) for n in layout.region_bytes]
    assert pack(layout, tensors, exact) == pack(layout, tensors, larger)
    for a, b in zip(exact, larger, strict=True):
        assert torch.equal(a, b[: a.numel()])


def test_packed_bytes_unpack_to_the_same_tensors_bit_for_bit() -> None:
    tensors = mixed_tensors()
    tensors["transposed"] = torch.arange(12.0).view(3, 4).t()  # not contiguous
    tensors["sliced"] = torch.arange(20, dtype=torch.int32)[3:17:2]  # strided, offset storage
    layout = plan(tensors, bucket_bytes=256, region_bytes=1024)
    buffers = buffers_for(layout)
    pack(layout, tensors, buffers)

    restored = unpack(layout, buffers)
    assert list(restored) == list(tensors)
    for name, tensor in tensors.items():
        assert same_bits(restored[name], tensor), name


def test_shard_joins_layout_locators_and_checksums() -> None:
    tensors = {"a": torch.zeros(100), "b": torch.ones(100)}
    layout = plan(tensors, bucket_bytes=256, region_bytes=512)
    checksums = pack(layout, tensors, buffers_for(layout))
    locators = [
        [FrameLocator(endpoint="tcp://h:1", key=f"k{r}")] for r in range(len(layout.region_bytes))
    ]

    shard = layout.shard(locators, checksums, rank=3)

    assert [r.nbytes for r in shard.regions] == list(layout.region_bytes)
    assert all(r.rank == 3 for r in shard.regions)
    assert [r.locators for r in shard.regions] == [tuple(locs) for locs in locators]
    assert [b.checksum for b in shard.buckets] == checksums
    assert shard.tensors == layout.tensors
    assert shard.checksum_algorithm == "wmix128"
    with pytest.raises(ValueError, match="checksums for"):
        layout.shard(locators, checksums[:-1], rank=0)


@pytest.mark.parametrize("bucket_bytes", [0, -256, 100, 257])
def test_bucket_bytes_must_be_a_positive_multiple_of_the_alignment(bucket_bytes: int) -> None:
    with pytest.raises(ValueError, match="multiple of 256"):
        plan({"a": torch.zeros(1)}, bucket_bytes=bucket_bytes)


def test_a_dtype_without_a_wire_name_is_refused() -> None:
    with pytest.raises(TypeError, match="complex64"):
        plan({"z": torch.zeros(2, dtype=torch.complex64)})


def test_pack_refuses_the_wrong_number_of_buffers() -> None:
    tensors = {"a": torch.zeros(1)}
    layout = plan(tensors)
    with pytest.raises(ValueError, match="2 buffers for 1 regions"):
        pack(layout, tensors, buffers_for(layout) * 2)
