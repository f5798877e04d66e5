"""CUDA streams and events, typed, with a CPU fallback: what every GPU path here shares.

On a CPU device there are no streams: `event_on(None)` is None and `on_stream(None)` does
nothing, so the same code runs in CI on the CPU and on the GPU machine.

>>> event_on(None) is None
True
>>> with on_stream(None):
...     pass
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["event_on", "new_stream", "on_stream"]


def new_stream(device: torch.device | int) -> torch.cuda.Stream:
    """A new CUDA stream on `device` (typed: torch's constructor is not)."""
    return torch.cuda.Stream(device)  # type: ignore[no-untyped-call]


def event_on(stream: torch.cuda.Stream | None) -> torch.cuda.Event | None:
    """An event recorded on `stream` now (None on the CPU, where there are no streams)."""
    if stream is None:
        return None
    event = torch.cuda.Event()  # type: ignore[no-untyped-call]
    event.record(stream)
    return event


def on_stream(stream: torch.cuda.Stream | None) -> contextlib.AbstractContextManager[object]:
    """`torch.cuda.stream(stream)`, or nothing for None (a CPU device)."""
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
