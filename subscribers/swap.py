"""Swapping a staged version into a live engine, whole, at a version boundary.

A `Swapper` is what a subscriber needs from an engine: check that a manifest fits its
parameters (before any byte is pulled), and copy a fully staged, verified version into them.
`TorchSwapper` does that for plain torch tensors (an `nn.Module`'s parameters), in place:
every parameter keeps its storage (`data_ptr`), only the values change.

The engine and the swap share a `VersionGate`: the engine holds it around each step (a
forward pass, a generate call); the swap holds it while it copies. So no step ever sees
half a version, and the engine's pause is the copy, not the transfer.

    engine thread:   with gate.step(): model(x)      (many, concurrently with pulling)
    subscriber:      pull (no gate) ... with gate.exclusive(): copy staged -> params
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from streamer.errors import StreamerError
from subscribers.dtypes import torch_dtype

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

    from schemas.manifest import Manifest
    from subscribers.staging import Staging

__all__ = ["SwapError", "SwapReport", "Swapper", "TorchSwapper", "VersionGate", "refuse_if"]


class SwapError(StreamerError):
    """A manifest does not fit the engine (missing name, wrong shape or dtype)."""


def refuse_if(problems: list[str], manifest: Manifest, engine: str) -> None:
    """Raise one `SwapError` listing the first few `problems`, if there are any."""
    if not problems:
        return
    shown = "; ".join(problems[:5])
    more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
    raise SwapError(
        f"{manifest.model} version {manifest.version} does not fit {engine}: {shown}{more}"
    )


@dataclass(frozen=True)
class SwapReport:
    version: int
    pause_s: float
    nbytes: int


class Swapper(Protocol):
    """What a subscriber needs from an engine.

    The subscriber calls, per version: `check` (before pulling a byte), then after the pull
    `stage` (the engine still serves the old version; e.g. copy to the GPU and verify there),
    then `swap_in` at the version boundary. A swapper whose `stage` verifies every bucket on
    the device sets `verifies_on_device = True`, and the host skips its own checksums.
    """

    @property
    def verifies_on_device(self) -> bool:
        """True if `stage` checks every bucket itself (the host then skips its checksums)."""

    def check(self, manifest: Manifest) -> None:
        """Raise `SwapError` if `manifest` cannot be applied to this engine."""

    async def stage(self, manifest: Manifest, staging: Staging) -> None:
        """Prepare the pulled version off the critical path; raise to refuse it."""

    async def swap_in(self, manifest: Manifest, staging: Staging) -> SwapReport:
        """Apply the whole staged version at a step boundary, or nothing."""


class VersionGate:
    """A readers-writer gate: many engine steps at once, or one swap.

    >>> gate = VersionGate()
    >>> with gate.step():
    ...     pass
    >>> gate.version is None
    True
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._steps = 0
        self._swapping = False
        self.version: int | None = None
        """The version the engine is running now (None before the first swap)."""

    @contextlib.contextmanager
    def step(self) -> Iterator[int | None]:
        """Hold around one engine step; yields the version that step runs on."""
        with self._cond:
            while self._swapping:
                self._cond.wait()
            self._steps += 1
            version = self.version
        try:
            yield version
        finally:
            with self._cond:
                self._steps -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Wait for running steps to finish, hold new ones off, and let the swap run."""
        with self._cond:
            while self._swapping:
                self._cond.wait()
            self._swapping = True
            while self._steps:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._swapping = False
                self._cond.notify_all()


class TorchSwapper:
    """Applies versions to named tensors in place (`dict(module.named_parameters())`).

    With `strict=True` (the default) a manifest must cover every tensor; otherwise a manifest
    may update a subset (say, only the adapters).
    """

    verifies_on_device = False

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor],
        *,
        gate: VersionGate | None = None,
        strict: bool = True,
    ) -> None:
        self.tensors = dict(tensors)
        self.gate = gate or VersionGate()
        self.strict = strict

    def check(self, manifest: Manifest) -> None:
        problems: list[str] = []
        names = set()
        for spec in manifest.tensors:
            names.add(spec.name)
            target = self.tensors.get(spec.name)
            if target is None:
                problems.append(f"{spec.name}: not in the engine")
                continue
            if tuple(target.shape) != spec.shape:
                problems.append(f"{spec.name}: shape {spec.shape} != engine {tuple(target.shape)}")
            if target.dtype != torch_dtype(spec.dtype):
                problems.append(f"{spec.name}: dtype {spec.dtype} != engine {target.dtype}")
            # Caught here, not halfway through a swap that has already copied other tensors.
            needed = math.prod(spec.shape) * torch_dtype(spec.dtype).itemsize
            if spec.nbytes != needed:
                problems.append(
                    f"{spec.name}: {spec.nbytes} bytes where shape {spec.shape} of {spec.dtype} "
                    f"needs {needed}"
                )
        if self.strict:
            problems.extend(
                f"{name}: missing from the manifest" for name in sorted(set(self.tensors) - names)
            )
        refuse_if(problems, manifest, "this engine")

    async def stage(self, manifest: Manifest, staging: Staging) -> None:
        """Nothing to prepare: the staged host bytes are copied straight in at the boundary."""

    async def swap_in(self, manifest: Manifest, staging: Staging) -> SwapReport:
        return await asyncio.to_thread(self._swap, manifest, staging)

    def _swap(self, manifest: Manifest, staging: Staging) -> SwapReport:
        self.check(manifest)
        with self.gate.exclusive():
            started = time.perf_counter()
            with torch.no_grad():
                for spec in manifest.tensors:
                    self.tensors[spec.name].copy_(staging.tensor(spec))
            if any(t.is_cuda for t in self.tensors.values()):
                torch.cuda.synchronize()
            self.gate.version = manifest.version
            pause_s = time.perf_counter() - started
        return SwapReport(version=manifest.version, pause_s=pause_s, nbytes=manifest.payload_bytes)
