"""A version snapshotted on the GPU: the trainer stalls for device-to-device copies only.

`snapshot` packs the trainer's CUDA tensors into one device buffer laid out like the host
regions (a D2D copy per tensor, padding zeroed) and returns once the copies are done, after
which the trainer may change its tensors freely: its stall is the copies alone. The bucket
digests are computed on the device from the packed buffer afterwards (enqueued by `copy_to`, or
before returning with ``wait="digested"``). `GpuSnapshot.copy_to` moves the packed buckets to
the host buffers (D2H on two streams) and returns the digests:

    trainer stream ──> snapshot stream: zero padding, D2D tensor k -> packed[region][offset]
                                        ── event copied   (snapshot returns here)
    copy_to:  copy streams (2)  wait copied; D2H bucket b -> host[region][offset]
              snapshot stream   wmix128(bucket b) of the packed buffer ── event digested
              host              wait digested, read sums once; wait for the copies

Memory: one extra device buffer of the version's size (`Layout.total_bytes`), reusable through
`into=`; where that is short, `publishers.gpu_pack.pack_on_device` packs with no GPU copy (the
trainer then waits for the D2H). On a CPU device the same code runs without streams (tests).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from gpu.digest import wmix128_ranges
from gpu.ipc import export_buffer
from gpu.streams import event_on, new_stream, on_stream
from publishers.gpu_pack import NUM_COPY_STREAMS, zero_padding
from schemas.manifest import CudaIpcLocator
from streamer.checksum import format_digest
from streamer.transport.shm import host_id

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from publishers.packing import Layout
    from schemas.ipc import CudaIpcBuffer

__all__ = ["GpuSnapshot", "snapshot"]


@dataclass(eq=False)
class GpuSnapshot:
    """A packed version on the device, with its bucket digests being computed there."""

    layout: Layout
    packed: torch.Tensor
    """The device buffer: the regions back to back (each region's size is aligned)."""
    regions: list[torch.Tensor]
    stream: torch.cuda.Stream | None
    """The stream the copies ran on, and the digests run on."""
    copied: torch.cuda.Event | None
    sums: torch.Tensor | None = None
    """[buckets, 2] int64 lane sums on the device, once `digest` enqueued them."""
    digested: torch.cuda.Event | None = None

    def digest(self) -> torch.Tensor:
        """Enqueue the bucket digests of the packed buffer (once); their [buckets, 2] sums."""
        if self.sums is None:
            ranges = self.layout.bucket_ranges()
            base = self.packed.data_ptr()
            starts = [region.data_ptr() - base for region in self.regions]
            with on_stream(self.stream):  # one launch for every bucket (gpu.digest)
                sums = wmix128_ranges(
                    self.packed, [(starts[r] + offset, n) for r, offset, n in ranges]
                )
                self.digested = event_on(self.stream)
            self.sums = sums
        return self.sums

    def ipc_offers(self, exported: CudaIpcBuffer | None = None) -> list[CudaIpcLocator]:
        """A `CudaIpcLocator` per region: where a same-GPU process finds it in `packed`.

        `exported` is `gpu.ipc.export_buffer(self.packed)`, if the caller keeps it.
        """
        if exported is None:
            exported = export_buffer(self.packed)
        host = host_id()
        offers = []
        start = 0
        for region in self.regions:
            offers.append(
                CudaIpcLocator(
                    host=host,
                    device_uuid=exported.device_uuid,
                    device=exported.device,
                    handle=exported.handle,
                    size_bytes=exported.size_bytes,
                    region_offset=start,
                    nbytes=region.numel(),
                    offset_bytes=exported.offset_bytes,
                    ref_counter_handle=exported.ref_counter_handle,
                    ref_counter_offset=exported.ref_counter_offset,
                    event_handle=exported.event_handle,
                    event_sync_required=exported.event_sync_required,
                )
            )
            start += region.numel()
        return offers

    def copy_to(
        self, buffers: Sequence[torch.Tensor], *, num_copy_streams: int = NUM_COPY_STREAMS
    ) -> list[str]:
        """Copy every bucket to its place in the host `buffers`; the bucket digests. Blocking."""
        if len(buffers) != len(self.regions):
            raise ValueError(f"{len(buffers)} buffers for {len(self.regions)} regions")
        device = self.packed.device
        streams = (
            [new_stream(device) for _ in range(num_copy_streams)] if device.type == "cuda" else []
        )
        for stream in streams:
            assert self.copied is not None
            stream.wait_event(self.copied)
        for index, (region, offset, nbytes) in enumerate(self.layout.bucket_ranges()):
            copy_stream = streams[index % len(streams)] if streams else None
            with on_stream(copy_stream):
                buffers[region][offset : offset + nbytes].copy_(
                    self.regions[region][offset : offset + nbytes],
                    non_blocking=copy_stream is not None,
                )
        digests = self.digests()
        for stream in streams:
            stream.synchronize()
        return digests

    def digests(self) -> list[str]:
        """The bucket digests of the packed buffer (enqueued once, then read back). Blocking."""
        sums = self.digest()
        if self.digested is not None:
            self.digested.synchronize()
        return [format_digest(int(a), int(b)) for a, b in sums.cpu().tolist()]


def snapshot(
    layout: Layout,
    named_tensors: Mapping[str, torch.Tensor],
    *,
    into: torch.Tensor | None = None,
    wait: Literal["copied", "digested"] = "copied",
) -> GpuSnapshot:
    """Pack `named_tensors` into a device buffer; blocks until `wait`.

    All tensors are on one device; `into` (a 1-D uint8 tensor on it, at least
    `layout.total_bytes`) is reused instead of allocating. Returns once the copies are done
    (``wait="copied"``: the trainer may change its tensors; the digests come later, from the
    packed buffer) or once the digests are done too.
    """
    devices = {tensor.device for tensor in named_tensors.values()}
    if len(devices) != 1:
        raise ValueError(
            f"snapshot needs every tensor on one device, got {sorted(map(str, devices))}"
        )
    device = devices.pop()
    if into is None:
        into = torch.empty(layout.total_bytes, dtype=torch.uint8, device=device)
    elif into.dtype != torch.uint8 or into.dim() != 1 or into.device != device:
        raise ValueError(f"into must be a 1-D uint8 tensor on {device}")
    elif into.numel() < layout.total_bytes:
        raise ValueError(f"into has {into.numel()} bytes, the version needs {layout.total_bytes}")
    starts = list(itertools.accumulate(layout.region_bytes, initial=0))
    regions = [into[starts[k] : starts[k + 1]] for k in range(len(layout.region_bytes))]
    stream = new_stream(device) if device.type == "cuda" else None
    if stream is not None:
        stream.wait_stream(torch.cuda.current_stream(device))
    with on_stream(stream):
        zero_padding(layout, regions)
        for spec in layout.tensors:
            source = named_tensors[spec.name].detach().contiguous().reshape(-1).view(torch.uint8)
            regions[spec.region][spec.offset : spec.offset + spec.nbytes].copy_(source)
        copied = event_on(stream)
    taken = GpuSnapshot(layout, into, regions, stream, copied)
    if wait == "digested":
        taken.digest()
    done = taken.copied if wait == "copied" else taken.digested
    if done is not None:
        done.synchronize()
    return taken
