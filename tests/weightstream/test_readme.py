"""Every ```python block of the README runs as pasted, against a real broker.

Blocks that follow a model (they construct a `Subscriber(`) run in the background first; the
others run to completion. The trainer snippet waits for one subscriber to apply each step, so
the run only finishes if the inference snippet really applied every version; its printed
weight sums are then compared with the trainer's model, recomputed here.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import pytest
import torch

from tests.e2e.procs import Fleet, start_broker, wait_for

REPO = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)

pytestmark = pytest.mark.slow


def _blocks() -> list[str]:
    return BLOCK.findall((REPO / "README.md").read_text())


def test_the_readme_has_a_trainer_and_an_inference_snippet():
    blocks = _blocks()
    assert any("SyncPublisher(" in b for b in blocks)
    assert any("Subscriber(" in b for b in blocks)


async def _run(code: str, env: dict[str, str], log: Path) -> asyncio.subprocess.Process:
    with log.open("wb") as out:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            code,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            cwd=str(REPO),
        )


async def test_readme_snippets_run_as_pasted_against_a_local_broker(fleet: Fleet, tmp_path: Path):
    # As a newcomer runs them: a loopback broker without keys (the README's first steps).
    broker = await start_broker(fleet, secure=False)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "PYTHONUNBUFFERED": "1",
        "MC_LOG_LEVEL": "ERROR",
        "WEIGHTSTREAM_BROKER": broker.endpoint,
        "WEIGHTSTREAM_HOST": "127.0.0.1",
    }
    blocks = _blocks()
    followers = [b for b in blocks if "Subscriber(" in b]
    followers_out = [tmp_path / f"follower-{i}.log" for i in range(len(followers))]
    background = [await _run(b, env, log) for b, log in zip(followers, followers_out, strict=True)]
    try:

        async def subscribed() -> bool:
            from tests.e2e.procs import get_json

            rows = (await get_json(f"{broker.http}/v1/subscribers"))["subscribers"]
            return len(rows) >= len(followers)

        await wait_for(subscribed, timeout_s=60, what="the inference snippet's hello", fleet=fleet)
        for index, block in enumerate(b for b in blocks if "Subscriber(" not in b):
            log = tmp_path / f"block-{index}.log"
            process = await _run(block, env, log)
            try:
                async with asyncio.timeout(90):
                    code = await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()
                raise AssertionError(f"README block {index} hung:\n{log.read_text()}") from None
            assert code == 0, f"README block {index} failed:\n{log.read_text()}"
        trainer_out = (tmp_path / "block-0.log").read_text()
        assert "step 3: applied by the fleet" in trainer_out, trainer_out
    finally:
        for process in background:
            if process.returncode is None:
                process.send_signal(signal.SIGINT)
        for process in background:
            try:
                async with asyncio.timeout(15):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()

    # The trainer's model, step by step, as the snippet builds it: the bytes the follower holds.
    torch.manual_seed(0)
    model = torch.nn.Linear(512, 512)
    want = []
    with torch.no_grad():
        for _ in range(3):
            model.weight.mul_(0.5)
            want.append(f"{model.weight.sum().item():.6f}")
    follower = followers_out[0].read_text()
    for version, weight_sum in enumerate(want, start=1):
        assert f"version {version}: weight sum {weight_sum}" in follower, follower
