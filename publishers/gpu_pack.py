"""Pack a version straight from the trainer's CUDA tensors: digests on the GPU, D2H pipelined.

`pack` (publishers/packing.py) sends CUDA tensors here. Nothing is staged on the GPU: every
tensor is copied device-to-host straight into its place in the (registered) host buffers, and
each bucket's `wmix128` digest is computed on the GPU from the same tensor bytes, as pieces
(`gpu.digest.wmix128_pieces`: the bytes between tensors count as the zero padding the host
buffers get), so the digest is computed once, on the device, and never re-read on the host:

    trainer's current stream ──> (side streams wait for it once)
    copy streams (2, alternating per tensor)   D2H tensor k -> host[region][offset]   (DMA)
    digest stream                              wmix128 of bucket b from its pieces -> sums [n, 2]
    host                                       zero the padding; wait for all; read sums once

The GPU memory it costs is the digest's scratch (a few KiB per bucket); the trainer must not
change its tensors until `pack` returns (a GPU snapshot mode, returning earlier, is not done).
On a CPU device the same code runs without streams, which is how the tests compare it with the
numpy path.
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING

import torch

from gpu.digest import wmix128_pieces
from gpu.streams import new_stream, on_stream
from streamer.checksum import format_digest

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from publishers.packing import Layout
    from schemas.manifest import TensorSpec

__all__ = ["NUM_COPY_STREAMS", "bucket_pieces", "pack_on_device"]

NUM_COPY_STREAMS = 2
"""Copy streams the D2H copies alternate over: one copy's setup overlaps the previous one's DMA."""


def pack_on_device(
    layout: Layout,
    named_tensors: Mapping[str, torch.Tensor],
    buffers: Sequence[torch.Tensor],
    *,
    num_copy_streams: int = NUM_COPY_STREAMS,
) -> list[str]:
    """Copy every tensor into its place in `buffers` and return the bucket digests. Blocking.

    All tensors are on one device (a CUDA device, or the CPU); `buffers` are 1-D uint8 CPU
    tensors, one per region (registered with CUDA for full-speed copies). Padding bytes of
    the buffers are zeroed, so the digests are those of the host bytes, as `pack`'s.
    """
    if len(buffers) != len(layout.region_bytes):
        raise ValueError(f"{len(buffers)} buffers for {len(layout.region_bytes)} regions")
    device = _one_device(named_tensors)
    sources = {spec.name: _bytes_of(named_tensors[spec.name]) for spec in layout.tensors}
    is_cuda = device.type == "cuda"
    copy_streams = [new_stream(device) for _ in range(num_copy_streams)] if is_cuda else []
    digest_stream = new_stream(device) if is_cuda else None
    if digest_stream is not None:
        current = torch.cuda.current_stream(device)
        for stream in [*copy_streams, digest_stream]:
            stream.wait_stream(current)  # the trainer's last writes to its tensors come first
    zero_padding(layout, buffers)
    for index, spec in enumerate(layout.tensors):
        target = buffers[spec.region][spec.offset : spec.offset + spec.nbytes]
        copy_stream = copy_streams[index % len(copy_streams)] if copy_streams else None
        with on_stream(copy_stream):
            target.copy_(sources[spec.name], non_blocking=is_cuda)
    ranges = layout.bucket_ranges()
    with on_stream(digest_stream):
        sums = torch.empty((len(ranges), 2), dtype=torch.int64, device=device)
        for index, pieces in enumerate(bucket_pieces(layout, sources)):
            sums[index].copy_(wmix128_pieces(pieces, ranges[index][2], device=device))
        host_sums = sums.cpu()  # waits for the digest stream only
    for stream in copy_streams:
        stream.synchronize()
    return [format_digest(int(a), int(b)) for a, b in host_sums.tolist()]


def bucket_pieces(
    layout: Layout, sources: Mapping[str, torch.Tensor]
) -> list[list[tuple[int, torch.Tensor]]]:
    """For each bucket: (offset in the bucket, bytes) of every tensor piece inside it."""
    by_region: dict[int, list[TensorSpec]] = {}
    for spec in layout.tensors:
        by_region.setdefault(spec.region, []).append(spec)
    starts = {region: [s.offset for s in specs] for region, specs in by_region.items()}
    plan: list[list[tuple[int, torch.Tensor]]] = []
    for region, offset, nbytes in layout.bucket_ranges():
        specs = by_region.get(region, [])
        end = offset + nbytes
        pieces = []
        k = max(bisect.bisect_right(starts.get(region, []), offset) - 1, 0)
        while k < len(specs) and specs[k].offset < end:
            spec = specs[k]
            low, high = max(spec.offset, offset), min(spec.offset + spec.nbytes, end)
            if low < high:
                pieces.append(
                    (low - offset, sources[spec.name][low - spec.offset : high - spec.offset])
                )
            k += 1
        plan.append(pieces)
    return plan


def zero_padding(layout: Layout, buffers: Sequence[torch.Tensor]) -> None:
    """Zero every byte of the regions that no tensor covers (alignment gaps, region tails)."""
    cursor = [0] * len(buffers)
    for spec in sorted(layout.tensors, key=lambda s: (s.region, s.offset)):
        if spec.offset > cursor[spec.region]:
            buffers[spec.region][cursor[spec.region] : spec.offset].zero_()
        cursor[spec.region] = max(cursor[spec.region], spec.offset + spec.nbytes)
    for region, size in enumerate(layout.region_bytes):
        if cursor[region] < size:
            buffers[region][cursor[region] : size].zero_()


def _one_device(named_tensors: Mapping[str, torch.Tensor]) -> torch.device:
    devices = {tensor.device for tensor in named_tensors.values()}
    if len(devices) != 1:
        raise ValueError(
            f"pack_on_device needs every tensor on one device, got {sorted(map(str, devices))}"
        )
    return devices.pop()


def _bytes_of(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)
