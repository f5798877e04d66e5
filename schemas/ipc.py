"""CUDA IPC handles as wire types: how a GPU process lets its node-local peers read its staging.

Within a node, each GPU process fetches part of a version and exports its GPU staging buffer;
its peers open the handle and copy the rest over NVLink (`subscribers.cuda.node_share`). What they
exchange is a `StagingShare`: msgpack bytes of plain, bounded fields, never a pickle. The handle bytes
are opaque here (torch's `_share_cuda_()` makes them; `_new_shared_cuda` opens them), so this
module needs no torch. A handle only means something on the same node, to another process.

>>> share = StagingShare(rank=1, world_size=2, buffer=CudaIpcBuffer(device=1, handle=b"h", size_bytes=512))
>>> decode_staging_share(encode_staging_share(share)) == share
True
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from schemas.codec import guarded_decode
from schemas.manifest import MAX_WORLD_SIZE, CudaIpcLocator, NonNegative, Rank, WorldSize

__all__ = [
    "CudaIpcBuffer",
    "StagingShare",
    "buffer_of",
    "decode_staging_share",
    "encode_staging_share",
]

MAX_SHARE_BYTES = 1 << 20
Device = Annotated[int, msgspec.Meta(ge=0, lt=1024)]
Handle = Annotated[bytes, msgspec.Meta(max_length=1024)]
"""cudaIpcMemHandle_t and cudaIpcEventHandle_t are 64 bytes; torch's names are short too."""


class CudaIpcBuffer(msgspec.Struct, frozen=True, kw_only=True):
    """One exported CUDA allocation (cudaIpcMemHandle plus torch's bookkeeping for it)."""

    device: Device
    """CUDA device index in the exporting process."""
    handle: Handle
    """The IPC memory handle of the allocation that holds the buffer."""
    size_bytes: NonNegative
    """Bytes of the buffer."""
    offset_bytes: NonNegative = 0
    """Where the buffer starts inside the allocation."""
    device_uuid: Annotated[str, msgspec.Meta(max_length=128)] = ""
    """The GPU's UUID, so a peer with other CUDA_VISIBLE_DEVICES finds the same device."""
    ref_counter_handle: Handle = b""
    """torch's shared reference counter (a shared-memory name) and slot, released on close."""
    ref_counter_offset: NonNegative = 0
    event_handle: Handle = b""
    """IPC event to wait for before the first read, if `event_sync_required`."""
    event_sync_required: bool = False


class StagingShare(
    msgspec.Struct, frozen=True, kw_only=True, tag="staging_share", tag_field="kind"
):
    """What one node-local rank tells the others, once: its staging buffer and ready-events."""

    rank: Rank
    world_size: WorldSize
    buffer: CudaIpcBuffer
    events: Annotated[tuple[Handle, ...], msgspec.Meta(max_length=MAX_WORLD_SIZE)] = ()
    """cudaIpcEventHandle of each event group, in order: group g is recorded once the rank's
    own buckets of that group are in its staging, every version."""


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(StagingShare)


def encode_staging_share(share: StagingShare) -> bytes:
    return _encoder.encode(share)


def decode_staging_share(data: bytes | memoryview) -> StagingShare:
    """Raises `msgspec.DecodeError` (or its `ValidationError`), only, for anything else."""
    return guarded_decode(_decoder, data, max_bytes=MAX_SHARE_BYTES)


def buffer_of(locator: CudaIpcLocator) -> CudaIpcBuffer:
    """The exported allocation a same-GPU offer (`CudaIpcLocator`) names."""
    return CudaIpcBuffer(
        device=locator.device,
        handle=locator.handle,
        size_bytes=locator.size_bytes,
        offset_bytes=locator.offset_bytes,
        device_uuid=locator.device_uuid,
        ref_counter_handle=locator.ref_counter_handle,
        ref_counter_offset=locator.ref_counter_offset,
        event_handle=locator.event_handle,
        event_sync_required=locator.event_sync_required,
    )
