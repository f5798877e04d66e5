"""Fixtures of the vLLM tests (run them with .venv-vllm's python; elsewhere they skip).

    checkpoints   v1 = a tiny Llama, v2 and v3 = two perturbations of it, bad = v2 with one
                  tensor of the wrong shape
    references    greedy tokens of a fresh engine on v1, v2 and v3 (child process, in-process
                  engines)
    broker        one `weightstream broker` process for the session; each test follows its
                  own model name

Nothing here imports vllm, so the main venv collects this directory and skips its modules.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.vllm.support import REPO, BrokerProcess, start_broker, stop
from tests.vllm.tiny_llama import WEIGHTS_FILE, build_tiny_llama, perturb_checkpoint

# What every vLLM process of these tests needs; set for the session, restored afterwards.
VLLM_ENV = {
    "HF_HUB_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "MC_LOG_LEVEL": "ERROR",
    "TOKENIZERS_PARALLELISM": "false",
}

BAD_TENSOR = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture(scope="session", autouse=True)
def vllm_env() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        for name, value in VLLM_ENV.items():
            patch.setenv(name, value)
        yield


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    v1 = build_tiny_llama(root / "v1", seed=0)
    v2 = perturb_checkpoint(v1, root / "v2", seed=1, scale=0.5)
    v3 = perturb_checkpoint(v1, root / "v3", seed=2, scale=0.5)
    bad = perturb_checkpoint(v1, root / "bad", seed=3, scale=0.5)
    state = load_file(str(bad / WEIGHTS_FILE))
    state[BAD_TENSOR] = torch.zeros(state[BAD_TENSOR].shape[0], 8)  # wrong shape
    save_file(state, str(bad / WEIGHTS_FILE), metadata={"format": "pt"})
    return {"v1": v1, "v2": v2, "v3": v3, "bad": bad}


@pytest.fixture(scope="session")
def references(
    checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, list[list[int]]]:
    """Greedy tokens per checkpoint name, from fresh engines started on each checkpoint."""
    out = tmp_path_factory.mktemp("references") / "references.json"
    names = ("v1", "v2", "v3")
    log = out.with_suffix(".log")
    with log.open("wb") as stream:
        result = subprocess.run(
            [sys.executable, "-m", "tests.vllm.reference", str(out)]
            + [str(checkpoints[name]) for name in names],
            cwd=REPO, env=dict(os.environ), stdout=stream, stderr=subprocess.STDOUT, check=False,
        )  # fmt: skip
    assert result.returncode == 0, log.read_text()[-5000:]
    by_path = json.loads(out.read_text())
    tokens = {name: by_path[str(checkpoints[name])] for name in names}
    assert len({json.dumps(t) for t in tokens.values()}) == 3, "versions must differ in output"
    return tokens


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    running = start_broker(tmp_path_factory.mktemp("broker"))
    yield running
    assert stop(running.process) == 0, running.log.read_text()[-3000:]
