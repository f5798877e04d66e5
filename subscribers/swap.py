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

Stage and swap work runs in a thread of its own (`run_cancellable`). A cancel (a caller's
timeout, a shutdown) sets the attempt's cancel token: the work checks it between buckets and
while it waits for the gate, and the awaiting side waits (bounded) for the thread to stop
before the cancellation propagates, so nothing of a cancelled attempt touches staging or the
engine afterwards. A swap that holds the gate completes whole: never half a version.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

import torch

from streamer.errors import StreamerError
from subscribers.dtypes import torch_dtype

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping

    from schemas.manifest import Manifest
    from subscribers.staging import Staging

__all__ = [
    "SwapCancelled",
    "SwapError",
    "SwapReport",
    "Swapper",
    "TorchSwapper",
    "VersionGate",
    "refuse_if",
    "run_cancellable",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

SETTLE_S = 60.0
"""How long a cancelled stage or swap may take to stop (one bucket, or one whole swap)."""


class SwapError(StreamerError):
    """A manifest does not fit the engine (missing name, wrong shape or dtype)."""


class SwapCancelled(StreamerError):
    """A stage or swap was cancelled before it touched the engine (raised in its thread)."""


def raise_if_cancelled(cancel: threading.Event | None, what: str) -> None:
    if cancel is not None and cancel.is_set():
        raise SwapCancelled(f"{what} cancelled")


async def run_cancellable(
    work: Callable[[threading.Event], T], *, name: str, settle_s: float = SETTLE_S
) -> T:
    """Run blocking `work(cancel)` in a thread of its own and await its result.

    If the awaiting task is cancelled, `cancel` is set and the thread is waited for (at most
    `settle_s`) before `CancelledError` propagates: `work` checks `cancel` between its steps
    and raises `SwapCancelled`; once it holds the gate it finishes what it started.
    """
    cancel = threading.Event()
    done: concurrent.futures.Future[T] = concurrent.futures.Future()

    def body() -> None:
        try:
            result = work(cancel)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting side, never lost
            done.set_exception(exc)
        else:
            done.set_result(result)

    done.set_running_or_notify_cancel()  # running: a cancelled await cannot cancel it under us
    thread = threading.Thread(target=body, name=name, daemon=True)
    thread.start()
    try:
        return await asyncio.wrap_future(done)
    except asyncio.CancelledError:
        cancel.set()
        await asyncio.to_thread(thread.join, settle_s)
        if thread.is_alive():
            logger.warning("%s still running %.0f s after a cancel", name, settle_s)
        elif not done.cancelled() and done.exception() is not None:
            logger.debug("%s ended after its cancel: %s", name, done.exception())
        raise


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

    def reads_device_offer(self, manifest: Manifest) -> bool:
        """True if `stage` reads this version from a same-device publisher's copy (CUDA IPC)
        and verifies it there: the subscriber then pulls nothing to the host."""

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

    @property
    def swap_waiting(self) -> bool:
        """True while a swap holds the gate or waits for running steps to finish."""
        with self._cond:
            return self._swapping

    def _wait(self, cancel: threading.Event | None) -> None:
        if cancel is None:
            self._cond.wait()
            return
        raise_if_cancelled(cancel, "swap waiting at the gate")
        self._cond.wait(0.02)  # a cancel from another thread does not notify this condition

    @contextlib.contextmanager
    def exclusive(self, cancel: threading.Event | None = None) -> Iterator[None]:
        """Wait for running steps to finish, hold new ones off, and let the swap run.

        With `cancel`, the wait ends with `SwapCancelled` once it is set (the engine untouched);
        once the gate is held, the swap runs to its end.
        """
        with self._cond:
            raise_if_cancelled(cancel, "swap")
            while self._swapping:
                self._wait(cancel)
            self._swapping = True
            try:
                while self._steps:
                    self._wait(cancel)
            except SwapCancelled:
                self._swapping = False
                self._cond.notify_all()
                raise
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

    def reads_device_offer(self, manifest: Manifest) -> bool:
        """Never: the swap reads host staging."""
        return False

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
        return await run_cancellable(
            lambda cancel: self._swap(manifest, staging, cancel), name="weightstream-swap"
        )

    def _swap(
        self, manifest: Manifest, staging: Staging, cancel: threading.Event | None = None
    ) -> SwapReport:
        self.check(manifest)
        with self.gate.exclusive(cancel):
            started = time.perf_counter()
            try:
                with torch.no_grad():
                    for spec in manifest.tensors:
                        self.tensors[spec.name].copy_(staging.tensor(spec))
            except RuntimeError as exc:  # torch's, at its seam; check() makes it unexpected
                raise SwapError(
                    f"{manifest.model} version {manifest.version}: copy into the engine failed "
                    f"({exc}); the engine may hold a mix of versions until the next one applies"
                ) from exc
            if any(t.is_cuda for t in self.tensors.values()):
                torch.cuda.synchronize()
            self.gate.version = manifest.version
            pause_s = time.perf_counter() - started
        return SwapReport(version=manifest.version, pause_s=pause_s, nbytes=manifest.payload_bytes)
