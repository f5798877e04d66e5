"""Applying a staged version inside a running vLLM engine (the only module importing vllm).

Two halves, joined by vLLM's weight-transfer API and by node-local shared memory:

    subscriber process (front end)                 every worker process of the engine
    ------------------------------                 ----------------------------------
    Staging(shm_name) holds version v, verified
    VllmSwapper.swap_in(manifest, staging)
      pause_generation(mode)       (AsyncLLM only)
      start_weight_update()  ───── collective_rpc ──> initialize_layerwise_reload(model)
      update_weights(info)   ───── collective_rpc ──> WeightstreamTransferEngine.receive_weights
                                                        map /dev/shm/<shm_name> (read-only copy)
                                                        model.load_weights(views, layer by layer)
      finish_weight_update(weight_version=str(v)) ──> finalize_layerwise_reload(model)
      resume_generation()          (AsyncLLM only)

`info` is small JSON-able data: the subscriber's own staging segment (never a publisher's
memory: the engine reads it at the swap) and one (name, dtype, shape, segment, offset, nbytes)
row per tensor, in layer order.

Failure policy: everything (names, dtypes, sizes, shapes, every range against its segment) is
verified before the bracket opens. A failure inside it closes the bracket in the workers
(`finish_weight_update`), then the previous version is reloaded from its retained staging
(the subscriber keeps it untouched until the next version applies) before generation
resumes; only with no retained version (the start-up checkpoint) does the `SwapError` say
that the engine may hold a mix. No tensor ever travels through
RPC or pickle, and a tensor-parallel engine's workers all read the one copy on the node.

The engine must be started with `weight_transfer_config={"backend": "weightstream"}` (or
`--weight-transfer-config '{"backend": "weightstream"}'`); the backend reaches every worker
process through the `vllm.general_plugins` entry point `register_backend`.

Two front ends: an `AsyncLLM` (the OpenAI server's engine client) is driven with its async
calls from the subscriber's event loop; an offline `LLM` must be driven from the thread that
calls `generate`, so `swap_in` hands the staged version over and waits until that thread
calls `apply_staged()` between two generate calls.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import math
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import msgspec
import torch
from vllm import LLM
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferInitRequest,
    WeightTransferUpdateInfo,
    WeightTransferUpdateRequest,
    layerwise_groups,
)
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

from streamer.transport.shm import SHM_DIR
from subscribers.dtypes import torch_dtype
from subscribers.staging import map_shared
from subscribers.swap import SwapError, SwapReport, refuse_if

if TYPE_CHECKING:
    from collections.abc import Iterator

    from schemas.manifest import Manifest
    from subscribers.staging import Staging

__all__ = [
    "BACKEND",
    "EXTENSION",
    "PauseMode",
    "VllmSwapper",
    "WeightstreamTransferEngine",
    "WeightstreamWorkerExtension",
    "checkpoint_tensors",
    "register_backend",
    "update_info",
]

logger = logging.getLogger(__name__)

BACKEND = "weightstream"
"""The name of the backend in `weight_transfer_config`."""

PauseMode = Literal["wait", "keep"]

# safetensors header dtype codes -> our manifest dtype names
_SAFETENSORS_DTYPES = {
    "BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "BOOL": "bool",
    "I8": "int8", "U8": "uint8", "I16": "int16", "I32": "int32", "I64": "int64",
}  # fmt: skip


# --- worker side: the "weightstream" weight-transfer backend -----------------------------


@dataclass
class WeightstreamInitInfo(WeightTransferInitInfo):  # type: ignore[misc]
    """Nothing to rendezvous: the bytes are already on this node."""


@dataclass
class WeightstreamUpdateInfo(WeightTransferUpdateInfo):  # type: ignore[misc]
    """Where one staged version lies, in node-local shared memory.

    `segments` rows are [name under /dev/shm, nbytes]; `tensors` rows are [name, dtype,
    shape, segment index, offset in the segment, nbytes], in layer order.
    """

    segments: list[list[Any]]
    tensors: list[list[Any]] = field(default_factory=list)
    version: int = -1


class WeightstreamTransferEngine(
    WeightTransferEngine[WeightstreamInitInfo, WeightstreamUpdateInfo]  # type: ignore[misc]
):
    """Loads a version staged in node-local shared memory, whole layers in layer order.

    Runs in each worker process; vLLM builds it in `Worker.load_model` when the engine is
    started with `weight_transfer_config={"backend": "weightstream"}`.
    """

    init_info_cls = WeightstreamInitInfo
    update_info_cls = WeightstreamUpdateInfo
    supports_draft_weight_update = False

    def init_transfer_engine(self, init_info: WeightstreamInitInfo) -> None:
        """Nothing to set up: each update names the shared memory to read."""

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        _quiet_rotary_warning()  # a worker started without our general plugin loaded
        initialize_layerwise_reload(self.model)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # The base class ends with torch.accelerator.synchronize(), which raises on CPU.
        self.receive_weights(self.parse_update_info(update_info))
        if torch.accelerator.is_available():
            torch.accelerator.synchronize()

    def receive_weights(self, update_info: WeightstreamUpdateInfo) -> None:
        try:
            with _mapped_weights(update_info) as weights:
                self.model.load_weights(iter(weights))
        except BaseException:
            # Mapping or loading failed inside the bracket: put back the kernel tensors of the
            # layers that got nothing, so the engine never runs forward passes on meta
            # tensors; the worker then marks the bracket closed, and the front end restores.
            self.finish_weight_update()
            raise

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def shutdown(self) -> None:
        """Nothing to release: mappings live only inside `receive_weights`."""


class WeightstreamWorkerExtension:
    """The same load for vLLM versions without the weight-transfer API.

    Start the engine with `worker_extension_cls="subscribers.vllm.swap.WeightstreamWorkerExtension"`
    instead of `weight_transfer_config`; vLLM mixes this class into every worker, and the
    swapper calls `collective_rpc("weightstream_reload", args=(json,))`: one reload bracket
    (`model_runner.reload_weights`, checkpoint format, layer order) per version.
    """

    def weightstream_reload(self, info_json: str) -> None:
        _quiet_rotary_warning()
        runner: Any = self.model_runner  # type: ignore[attr-defined]
        with _mapped_weights(WeightstreamUpdateInfo(**json.loads(info_json))) as weights:
            runner.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)


EXTENSION = f"{WeightstreamWorkerExtension.__module__}.{WeightstreamWorkerExtension.__qualname__}"
"""The value of `worker_extension_cls` for the extension route."""


@contextlib.contextmanager
def _mapped_weights(info: WeightstreamUpdateInfo) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """The staged version's tensors, in layer order, viewing the mapped shared memory.

    Every range is checked before any tensor is handed out: a bad update leaves the model
    untouched rather than half loaded. The mappings close on the way out (or with their last
    view, if a deferred layer still holds one).
    """
    mapped = [map_shared(name, nbytes) for name, nbytes in info.segments]
    mappings = [mapping for mapping, _ in mapped]
    views = [view for _, view in mapped]
    del mapped
    weights: list[tuple[str, torch.Tensor]] = []
    try:
        weights.extend(_staged_tensors(views, info))
        yield weights
    finally:
        weights.clear()
        views.clear()
        for mapping in mappings:
            try:
                mapping.close()
            except BufferError:
                logger.debug("staging of version=%d still viewed", info.version)


def _staged_tensors(
    segments: list[torch.Tensor], info: WeightstreamUpdateInfo
) -> Iterator[tuple[str, torch.Tensor]]:
    rows = {row[0]: row for row in info.tensors}
    for name in _layer_order(list(rows)):
        _, dtype_name, shape, segment, offset, nbytes = rows[name]
        dtype = torch_dtype(dtype_name)
        numel = 1
        for size in shape:
            numel *= size
        size = segments[segment].numel()
        if offset < 0 or offset + nbytes > size or numel * dtype.itemsize != nbytes:
            raise ValueError(
                f"version {info.version}: tensor {name!r} ({dtype_name}{list(shape)}, "
                f"{nbytes} bytes at {offset}) does not fit segment {segment} ({size} bytes)"
            )
        view = segments[segment][offset : offset + nbytes]
        yield name, view.view(dtype).view(tuple(shape))


def _layer_order(names: list[str]) -> list[str]:
    """Embeddings, layer 0, layer 1, ..., final norm and head: layerwise reload then
    processes (and frees the buffers of) one layer before the next arrives."""
    return [name for group in layerwise_groups(names) for name in group]


def register_backend() -> None:
    """The `vllm.general_plugins` entry point: make "weightstream" a backend in this process.

    vLLM loads general plugins in every process (API server, engine core, workers), possibly
    more than once, so this is idempotent.
    """
    _quiet_rotary_warning()
    try:
        WeightTransferEngineFactory.register_engine(BACKEND, WeightstreamTransferEngine)
    except ValueError:  # "already registered": this process loaded the plugin before
        logger.debug("weight-transfer backend %r already registered", BACKEND)


_RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


def _drop_rotary_warning(record: logging.LogRecord) -> bool:
    return not (record.msg == "%s: Failed to load weights" and record.args == ("RotaryEmbedding",))


def _quiet_rotary_warning() -> None:
    """Drop vLLM's `RotaryEmbedding: Failed to load weights` warning, logged on every swap.

    A rotary embedding has no weights in any checkpoint, only its computed cos/sin cache
    buffer, which layerwise reload counts as loadable and then puts back unchanged: the
    warning is a false alarm. Other layers' warnings still show (they are real).
    """
    reload_logger = logging.getLogger(_RELOAD_LOGGER)
    if _drop_rotary_warning not in reload_logger.filters:
        reload_logger.addFilter(_drop_rotary_warning)


# --- front end: what a checkpoint holds, and the update info of a staged version -----------


def checkpoint_tensors(model_path: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """`{name: (dtype, shape)}` of a model directory's safetensors files, headers only.

    >>> checkpoint_tensors("/models/tiny-llama")["lm_head.weight"]  # doctest: +SKIP
    ('float32', (384, 128))
    """
    root = Path(model_path)
    files = [root] if root.is_file() else sorted(root.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no .safetensors files in {root}: pass the model directory")
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    for path in files:
        with path.open("rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            header: dict[str, Any] = msgspec.json.decode(file.read(length))
        for name, entry in header.items():
            if name != "__metadata__":
                dtype = _SAFETENSORS_DTYPES.get(entry["dtype"], entry["dtype"])
                tensors[name] = (dtype, tuple(entry["shape"]))
    return tensors


def _model_dir(model: str) -> Path:
    path = Path(model)
    if not path.exists():
        raise ValueError(
            f"the engine's model {model!r} is not a local path: pass model_path=<the checkpoint "
            "directory> (WEIGHTSTREAM_MODEL_PATH), so manifests can be checked against it"
        )
    return path


def update_info(manifest: Manifest, staging: Staging) -> dict[str, Any]:
    """The JSON-able update info naming where each tensor of a staged version lies.

    Every region lies in the subscriber's own staging segment, `staging.shm_name`: the engine
    reads staging at the swap, so it never names a publisher's memory (which the publisher
    may reuse once a lease is lost), only the private copy the pull verified.
    """
    if staging.shm_name is None:
        raise ValueError(
            "a vLLM engine reads staging from shared memory: pass Staging(shm_name=...)"
        )
    segments: dict[str, int] = {staging.shm_name: staging.buffer.numel()}
    places: list[tuple[str, int]] = []  # per region: (segment name, offset of the region)
    for index in range(len(manifest.regions)):
        if staging.is_mapped(index):
            raise ValueError(
                f"region {index} of {manifest.model} version {manifest.version} maps a "
                "publisher's memory; a vLLM engine swaps only from private staging"
            )
        places.append((staging.shm_name, staging.region_offsets[index]))
    numbers = {name: number for number, name in enumerate(segments)}
    rows = {
        spec.name: [
            spec.name,
            spec.dtype,
            list(spec.shape),
            numbers[places[spec.region][0]],
            places[spec.region][1] + spec.offset,
            spec.nbytes,
        ]
        for spec in manifest.tensors
    }
    return {
        "segments": [[name, nbytes] for name, nbytes in segments.items()],
        "tensors": [rows[name] for name in _layer_order(list(rows))],
        "version": manifest.version,
    }


# --- front end: the swapper -----------------------------------------------------------------


@dataclass
class _Handover:
    manifest: Manifest
    info: dict[str, Any]
    done: concurrent.futures.Future[SwapReport]


class VllmSwapper:
    """Applies versions to a running vLLM engine: an offline `LLM` or an `AsyncLLM`.

    With an `AsyncLLM`, `swap_in` pauses the engine (`pause_mode="wait"`: requests in
    flight finish on the old version, new ones wait), swaps, labels the engine with the
    version and resumes. With an `LLM`, `swap_in` waits until the thread that owns it calls
    `apply_staged()` (between generate calls, so nothing is in flight).

    >>> swapper = VllmSwapper(engine_client)  # AsyncLLM: Subscriber(swapper=swapper, ...)
    >>> swapper = VllmSwapper(llm)            # LLM: call swapper.apply_staged() before generate
    """

    verifies_on_device = False

    def reads_device_offer(self, manifest: Manifest) -> bool:
        """Never: the engine loads from host staging."""
        return False

    retains_staging = True
    """The subscriber keeps the applied version's staging untouched until the next one
    applies (it pulls into a second staging), so a failed update can reload it."""

    def __init__(
        self,
        engine: Any,
        *,
        model_path: str | Path | None = None,
        pause_mode: PauseMode = "wait",
        strict: bool = True,
    ) -> None:
        self.engine = engine
        self.offline = isinstance(engine, LLM)
        vllm_config = engine.llm_engine.vllm_config if self.offline else engine.vllm_config
        transfer = getattr(vllm_config, "weight_transfer_config", None)
        extension = getattr(vllm_config.parallel_config, "worker_extension_cls", "")
        self.route: Literal["native", "extension"]
        if transfer is not None and transfer.backend == BACKEND:
            self.route = "native"  # vLLM's weight-transfer API, with a version label
        elif extension == EXTENSION:
            self.route = "extension"  # older vLLM: one collective_rpc per version
        else:
            raise ValueError(
                "start the engine with weight_transfer_config={'backend': 'weightstream'} "
                '(vllm serve: --weight-transfer-config \'{"backend": "weightstream"}\'), '
                f"or, on a vLLM without that API, with worker_extension_cls={EXTENSION!r}"
            )
        if pause_mode not in ("wait", "keep"):
            raise ValueError(f"pause_mode must be 'wait' or 'keep', not {pause_mode!r}")
        self.pause_mode = pause_mode
        self.strict = strict
        self.model_path = (
            Path(model_path) if model_path else _model_dir(vllm_config.model_config.model)
        )
        self.expected = checkpoint_tensors(self.model_path)
        self.changed = threading.Condition()
        """Notified when a version is handed over or applied (offline engines)."""
        self._handover: _Handover | None = None
        self.retained: tuple[int, dict[str, Any]] | None = None
        """The applied version and its update info, restored if a later update fails; its
        staging must stay untouched until the next version applies (`retains_staging`)."""
        self._initialized = False
        self._step = ""
        self.last_drain_s = 0.0
        """How long the last pause waited for requests in flight (AsyncLLM, mode "wait")."""

    def label(self, version: int) -> None:
        """Label an offline engine with `version` without updating it (WEIGHTSTREAM_APPLIED):
        vLLM's weight version and its outputs' `weight_versions` say it, not `default`."""
        if self.route == "native":
            self.engine.update_weight_version(str(version))

    async def label_async(self, version: int) -> None:
        """`label` for an `AsyncLLM`."""
        if self.route == "native":
            await self.engine.update_weight_version(str(version))

    def check(self, manifest: Manifest) -> None:
        problems: list[str] = []
        names = set()
        for spec in manifest.tensors:
            if spec.name in names:
                problems.append(f"{spec.name}: twice in the manifest")
            names.add(spec.name)
            expected = self.expected.get(spec.name)
            if expected is None:
                problems.append(f"{spec.name}: not in the engine's checkpoint")
                continue
            if expected[1] != spec.shape:
                problems.append(f"{spec.name}: shape {spec.shape} != engine {expected[1]}")
            if expected[0] != spec.dtype:
                problems.append(f"{spec.name}: dtype {spec.dtype} != engine {expected[0]}")
            needed = math.prod(spec.shape) * torch_dtype(spec.dtype).itemsize
            if spec.nbytes != needed:
                problems.append(
                    f"{spec.name}: {spec.nbytes} bytes where shape {spec.shape} of {spec.dtype} "
                    f"needs {needed}"
                )
        if self.strict:
            problems.extend(
                f"{name}: missing from the manifest" for name in sorted(set(self.expected) - names)
            )
        refuse_if(problems, manifest, f"the vLLM engine ({self.model_path})")

    async def stage(self, manifest: Manifest, staging: Staging) -> None:
        """Nothing to prepare: the workers read the staged bytes at the boundary."""

    async def swap_in(self, manifest: Manifest, staging: Staging) -> SwapReport:
        self.check(manifest)
        info = update_info(manifest, staging)
        verify_info(manifest, info)  # before the bracket: a bad update never opens one
        if self.offline:
            return await self._hand_over(manifest, info)
        return await self._swap_async(manifest, info)

    # AsyncLLM: driven from the subscriber's event loop (the API server's loop).

    async def _swap_async(self, manifest: Manifest, info: dict[str, Any]) -> SwapReport:
        engine = self.engine
        if not self._initialized and self.route == "native":
            await engine.init_weight_transfer_engine(WeightTransferInitRequest(init_info={}))
            self._initialized = True
        started = time.perf_counter()
        # Without the pause the scheduler runs forward passes between start and finish, on
        # layers that layerwise reload has moved to the meta device. The caches are cleared:
        # prefix-cache entries computed with the old weights are wrong for the new ones.
        pause = engine.pause_generation(mode=self.pause_mode, clear_cache=True)
        await self._guarded(manifest, "pause_generation", pause)
        paused = time.perf_counter()
        self.last_drain_s = paused - started
        try:
            try:
                await self._load_async(manifest, info)
            except _StepFailed as failed:
                if "start_weight_update failed" in failed.base:
                    raise  # the bracket never opened: nothing changed
                # Inside the bracket: the workers closed it; reload the previous version
                # before anything is generated again.
                raise SwapError(await self._restore_async(failed.base)) from failed
        finally:
            await self._guarded(manifest, "resume_generation", engine.resume_generation())
        self.retained = (manifest.version, info)
        return SwapReport(
            version=manifest.version,
            pause_s=time.perf_counter() - paused,
            nbytes=manifest.payload_bytes,
        )

    async def _load_async(self, manifest: Manifest, info: dict[str, Any]) -> None:
        engine = self.engine
        if self.route == "extension":
            reload = engine.collective_rpc("weightstream_reload", args=(json.dumps(info),))
            await self._guarded(manifest, "update_weights", reload)
            return
        await self._guarded(manifest, "start_weight_update", engine.start_weight_update())
        update = engine.update_weights(WeightTransferUpdateRequest(update_info=info))
        await self._guarded(manifest, "update_weights", update)
        finish = engine.finish_weight_update(weight_version=str(manifest.version))
        await self._guarded(manifest, "finish_weight_update", finish)

    async def _restore_async(self, failure: str) -> str:
        if self.retained is None:
            return f"{failure}; {_MIXED} (no previous version retained to restore)"
        version, info = self.retained
        try:
            await self._load_async(_label(version), info)
        except SwapError as exc:
            return f"{failure}; restoring version {version} failed too ({exc}): {_MIXED}"
        logger.warning("restored version=%d after a failed update", version)
        return f"{failure}; restored version {version}: the engine serves it"

    async def _guarded(self, manifest: Manifest, step: str, call: Any) -> None:
        try:
            await call
        except Exception as exc:
            inside = step in ("update_weights", "finish_weight_update")
            outcome = _MIXED if inside else "the engine's weights are unchanged"
            raise _StepFailed(_failure(manifest, step, exc), outcome) from exc

    # LLM: handed over to the thread that calls generate.

    async def _hand_over(self, manifest: Manifest, info: dict[str, Any]) -> SwapReport:
        done: concurrent.futures.Future[SwapReport] = concurrent.futures.Future()
        with self.changed:
            self._handover = _Handover(manifest, info, done)
            self.changed.notify_all()
        logger.info("version=%d staged; waiting for the engine thread", manifest.version)
        try:
            return await asyncio.wrap_future(done)
        finally:
            self._withdraw(done)

    def _withdraw(self, done: concurrent.futures.Future[SwapReport]) -> None:
        """Take back a hand-over the engine thread has not picked up (we were cancelled)."""
        with self.changed:
            handover = self._handover
            if handover is not None and handover.done is done:
                self._handover = None
                done.cancel()

    @property
    def staged(self) -> int | None:
        """The version waiting for `apply_staged()`, if any (offline engines)."""
        handover = self._handover
        return handover.manifest.version if handover is not None else None

    def apply_staged(self) -> SwapReport | None:
        """Apply the version `swap_in` handed over, if any; call it on the engine's thread.

        Blocks for the swap itself (one reload bracket); returns None if nothing was
        waiting. A failed swap is logged and reported to the subscriber, not raised here.
        """
        with self.changed:
            handover, self._handover = self._handover, None
        if handover is None or not handover.done.set_running_or_notify_cancel():
            return None
        manifest = handover.manifest
        started = time.perf_counter()
        try:
            self._load(handover.manifest, handover.info)
        except Exception as exc:  # noqa: BLE001  (handed to the subscriber thread as SwapError)
            failure = _failed(manifest, self._step, exc)
            if self._step not in ("init_weight_transfer_engine", "start_weight_update"):
                # Inside the bracket: back to the previous version before the next generate.
                failure = self._restore(_failure(manifest, self._step, exc))
            error = SwapError(failure)
            logger.error("%s", error)  # noqa: TRY400  (the traceback travels with the error)
            handover.done.set_exception(error)
            return None
        finally:
            with self.changed:
                self.changed.notify_all()
        self.retained = (manifest.version, handover.info)
        report = SwapReport(
            version=manifest.version,
            pause_s=time.perf_counter() - started,
            nbytes=manifest.payload_bytes,
        )
        handover.done.set_result(report)
        return report

    def _load(self, manifest: Manifest, info: dict[str, Any]) -> None:
        """One reload bracket on the offline engine; `_step` names the call under way."""
        self._step = "update_weights"
        if self.route == "extension":
            self.engine.collective_rpc("weightstream_reload", args=(json.dumps(info),))
            return
        llm = self.engine
        if not self._initialized:
            self._step = "init_weight_transfer_engine"
            llm.init_weight_transfer_engine({"init_info": {}})
            self._initialized = True
        self._step = "start_weight_update"
        llm.start_weight_update()
        self._step = "update_weights"
        llm.update_weights({"update_info": info})
        self._step = "finish_weight_update"
        llm.finish_weight_update(weight_version=str(manifest.version))

    def _restore(self, failure: str) -> str:
        """Reload the retained previous version after a failed bracket (offline engine)."""
        if self.retained is None:
            return f"{failure}; {_MIXED} (no previous version retained to restore)"
        version, info = self.retained
        try:
            self._load(_label(version), info)
        except Exception as exc:  # noqa: BLE001  (reported with the first failure)
            return f"{failure}; restoring version {version} failed too ({exc}): {_MIXED}"
        logger.warning("restored version=%d after a failed update", version)
        return f"{failure}; restored version {version}: the engine serves it"

    def wait_staged(self, timeout_s: float) -> None:
        """Block up to `timeout_s` for a hand-over or any other notification on `changed`."""
        with self.changed:
            if self._handover is None:
                self.changed.wait(timeout_s)


def _label(version: int) -> Manifest:
    """A stand-in manifest that names `version` for a restore's bracket and messages."""
    from schemas.manifest import Manifest

    return Manifest(model="restore", version=version, regions=(), tensors=(), buckets=())


def verify_info(manifest: Manifest, info: dict[str, Any]) -> None:
    """Check every row of an update against its segment, as the workers will: `SwapError`."""
    problems: list[str] = []
    sizes = []
    for name, nbytes in info["segments"]:
        try:
            actual = (SHM_DIR / name).stat().st_size
        except OSError as exc:
            problems.append(f"segment {name}: {exc.strerror}")
            actual = 0
        if actual < nbytes:
            problems.append(f"segment {name}: {actual} bytes, update needs {nbytes}")
        sizes.append(nbytes)
    seen: set[str] = set()
    for name, dtype_name, shape, segment, offset, nbytes in info["tensors"]:
        if name in seen:
            problems.append(f"{name}: twice in the update")
        seen.add(name)
        if not 0 <= segment < len(sizes):
            problems.append(f"{name}: no segment {segment}")
            continue
        needed = math.prod(shape) * torch_dtype(dtype_name).itemsize
        if needed != nbytes or offset < 0 or offset + nbytes > sizes[segment]:
            problems.append(
                f"{name}: {dtype_name}{list(shape)} ({nbytes} bytes at {offset}) does not fit "
                f"segment {segment} ({sizes[segment]} bytes)"
            )
    refuse_if(problems, manifest, "its staged update")


class _StepFailed(SwapError):
    """One call of the reload bracket failed; `base` says which, without the outcome."""

    def __init__(self, base: str, outcome: str) -> None:
        super().__init__(f"{base}; {outcome}")
        self.base = base


_MIXED = "the engine may hold a mix of versions until the next version applies"


def _failure(manifest: Manifest, step: str, exc: BaseException) -> str:
    return (
        f"{manifest.model} version {manifest.version}: {step} failed in the engine "
        f"({type(exc).__name__}: {exc})"
    )


def _failed(manifest: Manifest, step: str, exc: BaseException) -> str:
    inside = step in ("update_weights", "finish_weight_update")
    outcome = _MIXED if inside else "the engine's weights are unchanged"
    return f"{_failure(manifest, step, exc)}; {outcome}"
