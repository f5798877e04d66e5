"""Applying versions to CUDA parameters: staged and verified on the GPU ahead of the boundary.

`CudaSwapper` is the `Swapper` for an engine whose parameters live on one GPU. The host only
fetches (or, on the publisher's node, maps) the bytes; the GPU copies them in, checks every
bucket's wmix128 digest itself and, at the version boundary, copies the staged version into the
parameters device to device:

    Subscriber.apply:  pull(verify=False) ──> stage() ──> [boundary] swap_in() ──> release lease
                       (engine serves the old version)    (engine paused: the D2D copies only)

    stage, staged mode (in a thread):
      host region tensors ── cudaHostRegister'ed once (HostPins; cached, the buffers are reused)
        │  copy stream: H2D bucket 0, 1, ...        verify stream: wmix128(bucket i) on the GPU
        ▼                                            (one host sync: which buckets failed)
      GPU staging (CudaStager, allocated once) ── plan the D2D copies (SwapPlan)
    swap_in: with gate.exclusive(): apply the plan (9.2 ms for 16.75 GB, 325 tensors, one H200)

`mode="streaming"` keeps no GPU staging (half the memory): `stage` does nothing, and `swap_in`
copies host to device straight into the parameters under the gate, verifying as it goes, so
the engine's pause is the whole transfer. Staged is the default because streaming cannot undo:
see `swap_in`.

With a `NodeShare` (one process per GPU of a node, each with its own `Subscriber` and
`CudaSwapper`), each rank stages its 1/N of the buckets over its own PCIe link and reads the
rest from its peers' GPU staging over NVLink; the ranks must apply the same versions in the
same order, since `NodeShare.pull` meets them at a barrier.

On a CPU device the same code runs without streams and without host registration (CI runs it
that way); timings there are meaningless.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from gpu.ipc import device_index, device_uuid, open_buffer
from schemas.ipc import buffer_of
from schemas.manifest import ALIGNMENT, CudaIpcLocator
from streamer.errors import ChecksumMismatch, TransportError
from streamer.transport.shm import host_id
from subscribers.cuda.host_pins import HostPins
from subscribers.cuda.stage import CudaStager
from subscribers.swap import (
    SwapError,
    SwapReport,
    TorchSwapper,
    VersionGate,
    raise_if_cancelled,
    run_cancellable,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from schemas.manifest import Manifest
    from subscribers.cuda.node_share import NodeShare
    from subscribers.cuda.stage import PullResult, SwapPlan
    from subscribers.staging import Staging

__all__ = ["CudaSwapper", "StageReport", "SwapMode"]

logger = logging.getLogger(__name__)

SwapMode = Literal["staged", "streaming"]


@dataclass(frozen=True)
class StageReport:
    """What `stage` did: bytes copied and verified on the device, and how long it took."""

    version: int
    nbytes: int
    seconds: float
    """Host to device, verified, and the swap planned (registration excluded)."""
    register_s: float
    """Time spent registering host memory this time (0 once every buffer is registered)."""
    source: Literal["host", "cuda_ipc", "cuda_ipc_peer"] = "host"
    """Where the bytes came from: host staging, this GPU's peer process, another GPU's."""
    """Where the bytes came from: the host regions, or the publisher's GPU copy (same GPU)."""


@dataclass(frozen=True)
class _Staged:
    version: int
    plan: SwapPlan


class CudaSwapper:
    """Applies versions to parameters on one device (CUDA, or CPU for tests), verified there.

    >>> params = dict(model.named_parameters())  # every one on cuda:0  # doctest: +SKIP
    >>> swapper = CudaSwapper(params, gate=gate)  # doctest: +SKIP
    >>> subscriber = Subscriber(client=client, receivers=[ShmReceiver()], swapper=swapper,
    ...                         model="llama")  # doctest: +SKIP

    `strict=True` (the default) wants a manifest to cover every parameter. `node` and
    `barrier` share the staging of the node's GPUs (see the module doc); then `node.stager`
    is the staging, sized by the caller for the largest version.
    """

    @property
    def verifies_on_device(self) -> bool:
        """Staged mode: `stage` reads each byte once into GPU staging and verifies it there, so
        the host checksums nothing and may map a same-host publisher's memory. Streaming mode
        reads host staging at the swap: it gets a private, host-verified copy instead."""
        return self.mode == "staged"

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor],
        *,
        gate: VersionGate | None = None,
        strict: bool = True,
        mode: SwapMode = "staged",
        node: NodeShare | None = None,
        barrier: Callable[[], None] | None = None,
        pins: HostPins | None = None,
    ) -> None:
        if mode not in ("staged", "streaming"):
            raise ValueError(f"mode must be 'staged' or 'streaming', not {mode!r}")
        if not tensors:
            raise ValueError("CudaSwapper needs at least one tensor")
        devices = {t.device for t in tensors.values()}
        if len(devices) != 1:
            raise ValueError(f"every tensor must be on one device, not {sorted(map(str, devices))}")
        self.device = devices.pop()
        loose = [name for name, t in tensors.items() if not t.is_contiguous()]
        if loose:
            raise ValueError(f"tensors must be contiguous: {loose[:5]}")
        if (node is None) != (barrier is None):
            raise ValueError("node and barrier go together")
        if node is not None and (mode != "staged" or node.stager.device != self.device):
            raise ValueError("a NodeShare needs staged mode and a stager on the tensors' device")
        self.tensors = dict(tensors)
        self.gate = gate or VersionGate()
        self.strict = strict
        self.mode: SwapMode = mode
        self.node = node
        self.barrier = barrier
        self.pins = pins or HostPins()
        self.last_stage: StageReport | None = None
        self._checker = TorchSwapper(self.tensors, gate=self.gate, strict=strict)
        self._stager: CudaStager | None = node.stager if node is not None else None
        self._staged: _Staged | None = None
        self._stage_lock = threading.Lock()
        """One stage at a time: a cancelled one still running keeps the next off the staging."""
        self._peers: dict[bytes, torch.Tensor] = {}
        self._offer_failed = False
        self._peer_access: dict[int, bool] = {}
        """Other GPUs' indices -> whether this GPU reads their memory directly."""
        self._plan_cache: tuple[object, SwapPlan] | None = None
        """A GPU offer failed to open: read host copies from then on."""
        """Same-GPU publishers' GPU copies opened over CUDA IPC, by handle (at most 8)."""

    def reads_device_offer(self, manifest: Manifest) -> bool:
        """Staged, on its own GPU, and every region offered on this very GPU over CUDA IPC (a
        colocated trainer's copy): `stage` reads and verifies it device to device. False after
        such an offer failed to open once (the host copy is read from then on)."""
        return (
            self.mode == "staged"
            and self.node is None
            and not self._offer_failed
            and self._device_offers(manifest) is not None
        )

    def check(self, manifest: Manifest) -> None:
        """Names, shapes, dtypes and sizes, as `TorchSwapper.check`; raises `SwapError`."""
        self._checker.check(manifest)

    async def stage(self, manifest: Manifest, staging: Staging) -> None:
        """Copy the pulled version to the GPU and verify it there; the engine keeps serving.

        Raises `ChecksumMismatch` naming the buckets whose bytes differ from the manifest's
        digests; nothing of the engine's has been touched then. No-op in streaming mode.
        """
        if self.mode == "streaming":
            return
        await run_cancellable(
            lambda cancel: self._stage(manifest, staging, cancel), name="weightstream-stage"
        )

    async def swap_in(self, manifest: Manifest, staging: Staging) -> SwapReport:
        """Apply the version under `gate.exclusive()`; returns the engine's pause.

        Staged mode: the planned device-to-device copies of what `stage` verified (if `stage`
        was not called for this version, it runs first, outside the gate).

        Streaming mode: host to device straight into the parameters, each bucket verified as
        it lands; the pause is the whole transfer. A bucket that fails its checksum raises
        `ChecksumMismatch` *after* the parameters were written: they then hold a mix of the
        old and the new version until a good version is applied. That is why staged is the
        default.
        """
        return await run_cancellable(
            lambda cancel: self._swap(manifest, staging, cancel), name="weightstream-swap"
        )

    def close(self) -> None:
        """Unregister the host buffers, close the peers' GPU copies, free the GPU staging."""
        self.pins.close()
        self._peers.clear()
        self._staged = None
        self._plan_cache = None
        if self.node is None:
            self._stager = None

    # -- blocking halves, run in a thread ---------------------------------------------------

    def _stage(
        self, manifest: Manifest, staging: Staging, cancel: threading.Event | None = None
    ) -> None:
        with self._stage_lock:
            self._stage_locked(manifest, staging, cancel)

    def _stage_locked(
        self, manifest: Manifest, staging: Staging, cancel: threading.Event | None
    ) -> None:
        self._staged = None
        raise_if_cancelled(cancel, "stage")
        with self._on_device():
            expected = self.reads_device_offer(manifest)  # then nothing was pulled to the host
            peers = self._peer_sources(manifest) if self.node is None else None
            if peers is None and expected:
                raise TransportError(
                    f"{manifest.model} version {manifest.version}: the publisher's GPU copy "
                    "could not be opened; the next attempt reads its host copy"
                )
            if peers is None:
                hosts, register_s = self.pins.sources(
                    manifest, staging, register=self.device.type == "cuda"
                )
            stager = self._stager_for(manifest)
            started = time.perf_counter()
            stager.prepare([region.nbytes for region in manifest.regions])
            if peers is not None:
                register_s = 0.0
                result = stager.pull_peer(peers, manifest.buckets)
            elif self.node is not None:
                assert self.barrier is not None
                result = self.node.pull(hosts, manifest.buckets, barrier=self.barrier)
            else:
                result = stager.pull(hosts, manifest.buckets)
            _raise_if_failed(manifest, result, self.device, applied=False)
            raise_if_cancelled(cancel, "stage")  # cancelled meanwhile: the staging stays unused
            plan = self._plan(manifest, stager)
            self._staged = _Staged(manifest.version, plan)
            self.last_stage = StageReport(
                version=manifest.version,
                nbytes=result.nbytes,
                seconds=time.perf_counter() - started,
                register_s=register_s,
                source=_source_of(peers, self.device),
            )
        logger.info(
            "staged model=%s version=%d bytes=%d seconds=%.3f register_s=%.3f device=%s source=%s",
            manifest.model,
            manifest.version,
            result.nbytes,
            self.last_stage.seconds,
            register_s,
            self.device,
            self.last_stage.source,
        )

    def _plan(self, manifest: Manifest, stager: CudaStager) -> SwapPlan:
        """The swap's copies; the last plan again while the layout, the staging and every
        parameter's storage are the same (a trainer's versions usually share one layout)."""
        key = (
            manifest.tensors,
            tuple(stager.region_offsets),
            stager.staging.data_ptr(),
            tuple(t.data_ptr() for t in self.tensors.values()),
        )
        if self._plan_cache is not None and self._plan_cache[0] == key:
            return self._plan_cache[1]
        self._plan_cache = None
        try:
            plan = stager.plan_swap(manifest.tensors, self.tensors)
        except ValueError as exc:
            raise SwapError(f"{manifest.model} version {manifest.version}: {exc}") from exc
        self._plan_cache = (key, plan)
        return plan

    def _device_offers(self, manifest: Manifest) -> list[CudaIpcLocator] | None:
        """Each region's CUDA IPC offer on this host, on this GPU where there is one, else on
        another GPU this one can read directly (peer access: NVLink or PCIe P2P); None if a
        region has neither."""
        if self.device.type != "cuda":
            return None
        here, index = host_id(), self.device.index or 0
        gpu = device_uuid(index)
        if not gpu:
            return None  # torch cannot name this GPU: no way to tell which one an offer is on
        offers: list[CudaIpcLocator] = []
        for region in manifest.regions:
            on_host = [
                loc
                for loc in region.locators
                if isinstance(loc, CudaIpcLocator) and loc.host == here
            ]
            mine = [loc for loc in on_host if loc.device_uuid == gpu]
            if mine:
                offers.append(mine[0])
                continue
            peers = [loc for loc in on_host if self._can_read_gpu(index, loc.device_uuid)]
            if not peers:
                return None
            offers.append(peers[0])
        return offers

    def _can_read_gpu(self, index: int, uuid: str) -> bool:
        other = device_index(uuid)
        if other is None:
            return False
        if other not in self._peer_access:
            self._peer_access[other] = bool(torch.cuda.can_device_access_peer(index, other))
        return self._peer_access[other]

    def _peer_sources(self, manifest: Manifest) -> list[torch.Tensor] | None:
        """Each region in a same-GPU publisher's GPU copy, or None (then the host regions)."""
        offers = self._device_offers(manifest)
        if offers is None:
            return None
        sources: list[torch.Tensor] = []
        for region, offer in zip(manifest.regions, offers, strict=True):
            peer = self._peers.get(offer.handle)
            if peer is None:
                try:
                    _, peer = open_buffer(buffer_of(offer))
                except RuntimeError as exc:  # torch's cudaIpcOpenMemHandle failure
                    self._offer_failed = True
                    logger.warning(
                        "cannot open the publisher's GPU copy, reading the host copy model=%s "
                        "version=%d error=%s",
                        manifest.model,
                        manifest.version,
                        exc,
                    )
                    return None
                while len(self._peers) >= 8:
                    self._peers.pop(next(iter(self._peers)))
                self._peers[offer.handle] = peer
            if offer.region_offset + region.nbytes > peer.numel():
                raise SwapError(
                    f"{manifest.model} version {manifest.version}: the GPU offer of a region "
                    f"({offer.region_offset}+{region.nbytes}) lies outside the opened buffer "
                    f"({peer.numel()} bytes)"
                )
            sources.append(peer[offer.region_offset : offer.region_offset + region.nbytes])
        return sources

    def _swap(
        self, manifest: Manifest, staging: Staging, cancel: threading.Event | None = None
    ) -> SwapReport:
        if self.mode == "streaming":
            return self._stream(manifest, staging, cancel)
        if self._staged is None or self._staged.version != manifest.version:
            self._stage(manifest, staging, cancel)
        staged = self._staged
        assert staged is not None
        stager = self._stager
        assert stager is not None
        with self._on_device(), self.gate.exclusive(cancel):
            started = time.perf_counter()
            if self.device.type == "cuda":
                # A step may leave kernels that read the parameters in flight after it
                # released the gate; they must finish before the parameters change.
                torch.cuda.synchronize(self.device)
            stager.apply_swap(staged.plan)
            self.gate.version = manifest.version
            pause_s = time.perf_counter() - started
        self._staged = None
        return SwapReport(version=manifest.version, pause_s=pause_s, nbytes=manifest.payload_bytes)

    def _stream(
        self, manifest: Manifest, staging: Staging, cancel: threading.Event | None
    ) -> SwapReport:
        self.check(manifest)
        with self._on_device():
            hosts, register_s = self.pins.sources(
                manifest, staging, register=self.device.type == "cuda"
            )
            if self._stager is None:
                self._stager = CudaStager(self.device, 0)  # streams only: no staging
            with self.gate.exclusive(cancel):
                started = time.perf_counter()
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                try:
                    result = self._stager.pull_streaming(
                        hosts, manifest.buckets, manifest.tensors, self.tensors
                    )
                except ValueError as exc:
                    raise SwapError(f"{manifest.model} version {manifest.version}: {exc}") from exc
                _raise_if_failed(manifest, result, self.device, applied=True)
                self.gate.version = manifest.version
                pause_s = time.perf_counter() - started
        self.last_stage = StageReport(
            version=manifest.version, nbytes=result.nbytes, seconds=pause_s, register_s=register_s
        )
        return SwapReport(version=manifest.version, pause_s=pause_s, nbytes=manifest.payload_bytes)

    def _stager_for(self, manifest: Manifest) -> CudaStager:
        needed = _staging_bytes([region.nbytes for region in manifest.regions])
        if self._stager is not None and self._stager.total_bytes >= needed:
            return self._stager
        if self.node is not None:
            raise SwapError(
                f"{manifest.model} version {manifest.version} needs {needed} staging bytes; the "
                f"node's stager has {self._stager.total_bytes if self._stager else 0}"
            )
        self._stager = None  # free the smaller one first
        self._stager = CudaStager(self.device, needed)
        logger.info("allocated device staging bytes=%d device=%s", needed, self.device)
        return self._stager

    def _on_device(self) -> contextlib.AbstractContextManager[object]:
        """Worker threads start on device 0: make ours current there."""
        if self.device.type == "cuda":
            return torch.cuda.device(self.device)
        return contextlib.nullcontext()


def _source_of(
    peers: Sequence[torch.Tensor] | None, device: torch.device
) -> Literal["host", "cuda_ipc", "cuda_ipc_peer"]:
    if peers is None:
        return "host"
    return "cuda_ipc" if all(p.device == device for p in peers) else "cuda_ipc_peer"


def _staging_bytes(region_nbytes: Sequence[int]) -> int:
    cursor = 0
    for nbytes in region_nbytes:
        cursor = (cursor + nbytes + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT
    return cursor


def _raise_if_failed(
    manifest: Manifest, result: PullResult, device: torch.device, *, applied: bool
) -> None:
    if result.ok:
        return
    shown = ", ".join(
        f"{index} (region {manifest.buckets[index].region} offset {manifest.buckets[index].offset})"
        for index in result.failed[:8]
    )
    more = f" and {len(result.failed) - 8} more" if len(result.failed) > 8 else ""
    state = (
        "the parameters now hold a mix of versions (streaming mode)"
        if applied
        else "nothing was applied"
    )
    raise ChecksumMismatch(
        f"{manifest.model} version {manifest.version}: buckets {shown}{more} fail their checksum "
        f"on {device}; {state}"
    )
