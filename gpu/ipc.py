"""CUDA IPC: export a GPU buffer (and events) to another process of the node, open a peer's.

    exporter: tensor ── export_buffer ──> schemas.ipc.CudaIpcBuffer (plain bytes and ints)
              ipc_event() ── export_event ──> cudaIpcEventHandle bytes
    peer:     CudaIpcBuffer ── open_buffer ──> (our device index, uint8 tensor over its memory)
              handle bytes ── open_event ──> torch.cuda.Event

The handles travel as msgspec structs (`schemas.ipc`), never pickles. torch makes and opens
them (`_share_cuda_`, `_new_shared_cuda`); this module is the one place that calls those
private hooks, so the node share of subscribers and a publisher's same-GPU offer use the same
code. A handle means something only on the same node, to another process.
"""

from __future__ import annotations

import torch

from schemas.ipc import CudaIpcBuffer

__all__ = [
    "device_index",
    "device_uuid",
    "export_buffer",
    "export_event",
    "ipc_event",
    "local_device",
    "open_buffer",
    "open_event",
]


def export_buffer(tensor: torch.Tensor) -> CudaIpcBuffer:
    """The IPC handle of the whole storage under CUDA `tensor`."""
    if tensor.device.type != "cuda":
        raise ValueError(f"only CUDA memory has IPC handles, not {tensor.device}")
    storage = tensor.untyped_storage()
    with torch.cuda.device(tensor.device):
        (
            device,
            handle,
            size_bytes,
            offset_bytes,
            ref_handle,
            ref_offset,
            event_handle,
            event_sync,
        ) = storage._share_cuda_()  # type: ignore[no-untyped-call]
    return CudaIpcBuffer(
        device=int(device),
        handle=bytes(handle),
        size_bytes=int(size_bytes),
        offset_bytes=int(offset_bytes),
        device_uuid=device_uuid(int(device)),
        ref_counter_handle=bytes(ref_handle),
        ref_counter_offset=int(ref_offset),
        event_handle=bytes(event_handle or b""),
        event_sync_required=bool(event_sync),
    )


def open_buffer(buffer: CudaIpcBuffer) -> tuple[int, torch.Tensor]:
    """Open a peer's exported buffer: our index of its device and a uint8 tensor over it."""
    device = local_device(buffer)
    with torch.cuda.device(device):
        storage = torch.UntypedStorage._new_shared_cuda(
            device,
            buffer.handle,
            buffer.size_bytes,
            buffer.offset_bytes,
            buffer.ref_counter_handle,
            buffer.ref_counter_offset,
            buffer.event_handle,
            buffer.event_sync_required,
        )
        tensor = torch.empty(0, dtype=torch.uint8, device=torch.device("cuda", device))
        return device, tensor.set_(storage)


def ipc_event() -> torch.cuda.Event:
    """An event another process may wait on (on the current device)."""
    return torch.cuda.Event(interprocess=True)  # type: ignore[no-untyped-call]


def export_event(event: torch.cuda.Event) -> bytes:
    return bytes(event.ipc_handle())  # type: ignore[no-untyped-call]


def open_event(device: int, handle: bytes) -> torch.cuda.Event:
    event: torch.cuda.Event = torch.cuda.Event.from_ipc_handle(device, handle)  # type: ignore[no-untyped-call]
    return event


def device_uuid(index: int) -> str:
    """The GPU's UUID ("" where torch cannot say)."""
    try:
        return str(torch.cuda.get_device_properties(index).uuid)
    except (AttributeError, RuntimeError):
        return ""


def device_index(uuid: str) -> int | None:
    """Our index of the GPU with this UUID, or None if this process does not see it."""
    if not uuid or not torch.cuda.is_available():
        return None
    for index in range(torch.cuda.device_count()):
        if device_uuid(index) == uuid:
            return index
    return None


def local_device(buffer: CudaIpcBuffer) -> int:
    """Our index of the exporter's GPU: by UUID when both sides know it, else its own index."""
    if buffer.device_uuid:
        for index in range(torch.cuda.device_count()):
            if device_uuid(index) == buffer.device_uuid:
                return index
    return buffer.device
