"""Swapping a staged version into live tensors: in place, whole, and only between steps."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from functools import partial

import msgspec
import pytest
import torch

from publishers.packing import pack, plan
from schemas.manifest import FrameLocator, Manifest
from subscribers.staging import Staging
from subscribers.swap import SwapError, TorchSwapper, VersionGate
from tests.support import until

MODEL = "org/model"


def stage(tensors: dict[str, torch.Tensor], version: int) -> tuple[Manifest, Staging]:
    """Pack `tensors` as a publisher would and lay the bytes into staging as a pull would."""
    layout = plan(tensors, bucket_bytes=1024, region_bytes=8192)
    buffers = [torch.empty(n, dtype=torch.uint8) for n in layout.region_bytes]
    checksums = pack(layout, tensors, buffers)
    locators = [
        [FrameLocator(endpoint="tcp://127.0.0.1:1", key=str(r))] for r in range(len(buffers))
    ]
    manifest = Manifest.assemble(MODEL, version, [layout.shard(locators, checksums, rank=0)])
    staging = Staging(receivers=[], pin_memory=False)
    staging.prepare(manifest)
    for region, buffer in enumerate(buffers):
        staging.bytes_of(region, 0, buffer.numel()).copy_(buffer)
    return manifest, staging


def engine_tensors() -> dict[str, torch.Tensor]:
    return {
        "embed": torch.zeros(40, 16, dtype=torch.bfloat16),
        "proj": torch.zeros(16, 16),
        "fp8": torch.zeros(8, dtype=torch.float8_e4m3fn),
        "mask": torch.zeros(9, dtype=torch.bool),
        "scale": torch.tensor(0.0),
    }


def version_of(template: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, tensor in template.items():
        values = torch.randn(tensor.shape, generator=generator)
        out[name] = values > 0 if tensor.dtype == torch.bool else values.to(tensor.dtype)
    return out


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(-1).view(torch.uint8)


class WatchedCondition(threading.Condition):
    """The gate's condition, telling the test when a swap is held off and waits on it."""

    def __init__(self) -> None:
        super().__init__()
        self.waited = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        self.waited.set()
        return super().wait(timeout)


def watched(gate: VersionGate) -> WatchedCondition:
    """Swap `gate`'s condition for one the test can watch (before the gate is first used)."""
    condition = WatchedCondition()
    gate._cond = condition
    return condition


async def test_swap_in_copies_new_values_into_the_same_storage() -> None:
    engine = engine_tensors()
    pointers = {name: t.data_ptr() for name, t in engine.items()}
    new = version_of(engine, seed=1)
    manifest, staging = stage(new, version=7)
    swapper = TorchSwapper(engine)

    report = await swapper.swap_in(manifest, staging)

    for name, tensor in engine.items():
        assert tensor.data_ptr() == pointers[name], f"{name} was reallocated"
        assert torch.equal(bits(tensor), bits(new[name])), name
    assert (report.version, report.nbytes) == (7, manifest.payload_bytes)
    assert report.pause_s >= 0
    assert swapper.gate.version == 7


async def test_a_step_in_progress_delays_the_swap_until_it_ends() -> None:
    engine = engine_tensors()
    old = {name: t.clone() for name, t in engine.items()}
    manifest, staging = stage(version_of(engine, seed=2), version=1)
    swapper = TorchSwapper(engine)
    condition = watched(swapper.gate)
    in_step, end_step = threading.Event(), threading.Event()

    def one_long_step() -> None:
        with swapper.gate.step() as version:
            assert version is None
            in_step.set()
            end_step.wait(10)

    stepper = threading.Thread(target=one_long_step)
    stepper.start()
    try:
        assert in_step.wait(5)
        swap = asyncio.create_task(swapper.swap_in(manifest, staging))
        # The swap reached the gate and waits there: from here on it can only go on once the
        # step ends, so nothing it would copy can have been copied yet.
        assert await asyncio.to_thread(condition.waited.wait, 10), "the swap never waited"
        assert not swap.done(), "the swap ran while a step was in progress"
        assert swapper.gate.version is None
        for name, tensor in engine.items():
            assert torch.equal(bits(tensor), bits(old[name]))
    finally:
        end_step.set()
        stepper.join(5)
    report = await asyncio.wait_for(swap, 5)
    assert report.version == 1
    assert swapper.gate.version == 1


async def test_no_step_ever_sees_half_a_version() -> None:
    # Every tensor of version v holds the value v: a step must see one value everywhere,
    # and it must be the version the gate says the step runs on.
    shapes = {f"layer{i}": (256, 256) for i in range(8)}
    engine = {name: torch.zeros(shape) for name, shape in shapes.items()}
    swapper = TorchSwapper(engine)
    stop = threading.Event()
    seen: list[float] = []
    torn: list[str] = []

    def steps() -> None:
        while not stop.is_set():
            with swapper.gate.step() as version:
                values = {float(t[0, 0]) for t in engine.values()}
                values |= {float(t[-1, -1]) for t in engine.values()}
                expected = 0.0 if version is None else float(version)
                if values != {expected}:
                    torn.append(f"step on version {version} saw {sorted(values)}")
                seen.append(expected)

    stepper = threading.Thread(target=steps)
    stepper.start()
    try:
        for version in range(1, 16):
            full = {name: torch.full(shape, float(version)) for name, shape in shapes.items()}
            manifest, staging = stage(full, version)
            await swapper.swap_in(manifest, staging)
            await until(partial(_last_is, seen, float(version)))  # a step ran on this version
    finally:
        stop.set()
        stepper.join(10)
    assert torn == []
    assert set(range(1, 16)) <= set(seen)  # steps ran on every version, each whole


def _last_is(seen: list[float], value: float) -> bool:
    return bool(seen) and seen[-1] == value


def test_version_gate_lets_steps_overlap_but_not_with_a_swap() -> None:
    gate = VersionGate()
    with gate.step(), gate.step():  # two steps at once: no deadlock
        pass
    condition = watched(gate)
    entered = threading.Event()

    def swap() -> None:
        with gate.exclusive():
            entered.set()

    with gate.step():
        swapper = threading.Thread(target=swap)
        swapper.start()
        assert condition.waited.wait(10), "the swap never waited for the step"
        assert not entered.is_set()  # it waits, and only the step's end lets it on
    swapper.join(5)
    assert entered.is_set()


def rename_proj(new: dict[str, torch.Tensor]) -> None:
    new["projection"] = new.pop("proj")


def reshape_proj(new: dict[str, torch.Tensor]) -> None:
    new["proj"] = torch.zeros(8, 32)


def retype_proj(new: dict[str, torch.Tensor]) -> None:
    new["proj"] = new["proj"].half()


def drop_mask(new: dict[str, torch.Tensor]) -> None:
    del new["mask"]


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (rename_proj, "projection: not in the engine"),
        (reshape_proj, "proj: shape (8, 32) != engine (16, 16)"),
        (retype_proj, "proj: dtype float16 != engine torch.float32"),
        (drop_mask, "mask: missing from the manifest"),
    ],
    ids=["unknown-name", "wrong-shape", "wrong-dtype", "missing-name"],
)
async def test_check_refuses_a_manifest_that_does_not_fit_and_says_why(
    change: Callable[[dict[str, torch.Tensor]], None], problem: str
) -> None:
    engine = engine_tensors()
    before = {name: t.clone() for name, t in engine.items()}
    new = version_of(engine, seed=3)
    change(new)
    manifest, staging = stage(new, version=4)
    swapper = TorchSwapper(engine)

    with pytest.raises(SwapError, match="does not fit this engine") as raised:
        swapper.check(manifest)
    assert problem in str(raised.value)
    assert f"{MODEL} version 4" in str(raised.value)

    with pytest.raises(SwapError):
        await swapper.swap_in(manifest, staging)  # swap_in checks again: nothing is copied
    for name, tensor in engine.items():
        assert torch.equal(bits(tensor), bits(before[name]))
    assert swapper.gate.version is None


def test_check_lists_five_problems_and_counts_the_rest() -> None:
    engine = {f"t{i}": torch.zeros(2) for i in range(8)}
    manifest, _ = stage({f"t{i}": torch.zeros(3) for i in range(8)}, version=1)
    with pytest.raises(SwapError, match="and 3 more"):
        TorchSwapper(engine).check(manifest)


async def test_check_refuses_byte_counts_that_disagree_with_shape_and_dtype() -> None:
    # A manifest from a buggy or foreign publisher: right names, shapes and dtypes, but one
    # tensor's nbytes is wrong. It must be refused before the swap copies anything.
    engine = engine_tensors()
    before = {name: t.clone() for name, t in engine.items()}
    manifest, staging = stage(version_of(engine, seed=4), version=2)
    tensors = list(manifest.tensors)
    last = tensors[-1]
    tensors[-1] = msgspec.structs.replace(last, nbytes=last.nbytes + 4)
    bad = msgspec.structs.replace(manifest, tensors=tuple(tensors))
    swapper = TorchSwapper(engine)

    with pytest.raises(SwapError, match=f"{last.name}: "):
        swapper.check(bad)
    with pytest.raises(SwapError):
        await swapper.swap_in(bad, staging)
    for name, tensor in engine.items():
        assert torch.equal(bits(tensor), bits(before[name])), f"{name} changed"


async def test_a_non_strict_swapper_applies_a_subset_and_leaves_the_rest() -> None:
    engine = engine_tensors()
    before = {name: t.clone() for name, t in engine.items()}
    new = version_of(engine, seed=5)
    subset = {"proj": new["proj"], "scale": new["scale"]}
    manifest, staging = stage(subset, version=3)

    with pytest.raises(SwapError, match="missing from the manifest"):
        TorchSwapper(engine).check(manifest)
    report = await TorchSwapper(engine, strict=False).swap_in(manifest, staging)

    assert report.nbytes == subset["proj"].nbytes + subset["scale"].nbytes
    for name, tensor in engine.items():
        expected = subset.get(name, before[name])
        assert torch.equal(bits(tensor), bits(expected)), name
