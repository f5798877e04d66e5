"""Packing from tensors on a device: the digests are computed there, from the tensors' own bytes,
and equal the numpy digests of the packed host buffers (CPU here; CUDA under the `gpu` mark)."""

from __future__ import annotations

import pytest
import torch

from publishers.gpu_pack import pack_on_device
from publishers.gpu_snapshot import snapshot
from publishers.packing import Layout, pack, plan
from streamer.checksum import wmix128
from tests.publishers.test_packing import buffers_for, mixed_tensors, same_bits, unpack

HAS_CUDA = torch.cuda.is_available()
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")],
    ),
]


def host_digests(layout: Layout, buffers: list[torch.Tensor]) -> list[str]:
    return [
        wmix128(buffers[region][offset : offset + nbytes].numpy().tobytes())
        for region, offset, nbytes in layout.bucket_ranges()
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bucket_bytes", [256, 1024, 1 << 20])
def test_device_digests_are_the_digests_of_the_packed_host_bytes(
    device: str, bucket_bytes: int
) -> None:
    tensors = {name: t.to(device) for name, t in mixed_tensors().items()}
    layout = plan(tensors, bucket_bytes=bucket_bytes, region_bytes=4096)
    buffers = buffers_for(layout, fill=0xFF)  # stale bytes everywhere: padding must be zeroed
    digests = pack_on_device(layout, tensors, buffers)
    assert digests == host_digests(layout, buffers)
    restored = unpack(layout, buffers)
    for name, tensor in tensors.items():
        assert same_bits(restored[name], tensor.cpu()), name


@pytest.mark.parametrize("device", DEVICES)
def test_device_packing_gives_the_same_bytes_and_digests_as_the_host_path(device: str) -> None:
    tensors = mixed_tensors()
    layout = plan(tensors, bucket_bytes=512, region_bytes=2048)
    on_host = buffers_for(layout)
    expected = pack(layout, tensors, on_host)
    on_device = buffers_for(layout, fill=0x11)
    moved = {name: t.to(device) for name, t in tensors.items()}
    assert pack_on_device(layout, moved, on_device) == expected
    for host, device_packed in zip(on_host, on_device, strict=True):
        assert torch.equal(host, device_packed)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_pack_sends_cuda_tensors_to_the_device_path_and_waits_for_the_trainer_stream() -> None:
    # The tensors are written on the current stream just before pack: the side streams must
    # see those writes, not what was there before.
    tensors = {f"w{i}": torch.zeros(1 << 20, dtype=torch.bfloat16, device="cuda") for i in range(4)}
    for tensor in tensors.values():
        tensor.normal_()
    layout = plan(tensors, bucket_bytes=1 << 20)
    buffers = buffers_for(layout)
    digests = pack(layout, tensors, buffers)
    assert digests == host_digests(layout, buffers)
    for name, tensor in unpack(layout, buffers).items():
        assert same_bits(tensor, tensors[name].cpu()), name


def test_tensors_on_two_devices_are_refused() -> None:
    tensors = {"a": torch.zeros(4), "b": torch.zeros(4, device="meta")}
    layout = plan(tensors)
    with pytest.raises(ValueError, match="one device"):
        pack_on_device(layout, tensors, buffers_for(layout))


# --- the GPU snapshot: the trainer waits for the D2D copies only --------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("wait", ["copied", "digested"])
def test_a_snapshot_copied_to_the_host_gives_the_bytes_and_digests_of_pack(
    device: str, wait: str
) -> None:
    tensors = mixed_tensors()
    layout = plan(tensors, bucket_bytes=512, region_bytes=2048)
    on_host = buffers_for(layout)
    expected = pack(layout, tensors, on_host)
    moved = {name: t.to(device) for name, t in tensors.items()}
    taken = snapshot(layout, moved, wait=wait)  # type: ignore[arg-type]
    from_snapshot = buffers_for(layout, fill=0x3C)
    assert taken.copy_to(from_snapshot) == expected
    for host, copied in zip(on_host, from_snapshot, strict=True):
        assert torch.equal(host, copied)


@pytest.mark.parametrize("device", DEVICES)
def test_the_trainer_may_change_its_tensors_once_snapshot_returns(device: str) -> None:
    tensors = {f"w{i}": torch.randn(70_000, device=device) for i in range(3)}
    before = {name: t.clone() for name, t in tensors.items()}
    layout = plan(tensors, bucket_bytes=64 << 10)
    taken = snapshot(layout, tensors)
    for tensor in tensors.values():
        tensor.mul_(-3.0).add_(1.0)  # the next optimizer step, on the trainer's stream
    buffers = buffers_for(layout)
    digests = taken.copy_to(buffers)
    assert digests == host_digests(layout, buffers)
    for name, tensor in unpack(layout, buffers).items():
        assert same_bits(tensor, before[name].cpu()), name


def test_a_snapshot_reuses_a_buffer_only_if_it_is_large_enough() -> None:
    tensors = mixed_tensors()
    layout = plan(tensors, bucket_bytes=512, region_bytes=2048)
    into = torch.full((layout.total_bytes + 100,), 7, dtype=torch.uint8)
    taken = snapshot(layout, tensors, into=into)
    assert taken.packed.data_ptr() == into.data_ptr()
    with pytest.raises(ValueError, match="needs"):
        snapshot(layout, tensors, into=into[: layout.total_bytes - 1])
