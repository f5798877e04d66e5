"""What needs no engine: reading a checkpoint's tensor names and shapes, the env config."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

with warnings.catch_warnings():  # vLLM's own imports warn; pytest turns warnings into errors
    warnings.simplefilter("ignore")
    pytest.importorskip("vllm")
    from subscribers.vllm.follow import FollowConfig, transport_names
    from subscribers.vllm.swap import checkpoint_tensors

from safetensors.torch import load_file

from tests.vllm.conftest import BAD_TENSOR
from tests.vllm.tiny_llama import WEIGHTS_FILE

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_checkpoint_tensors_reads_names_and_shapes_from_headers(
    checkpoints: dict[str, Path],
) -> None:
    state = load_file(str(checkpoints["v1"] / WEIGHTS_FILE))
    assert checkpoint_tensors(checkpoints["v1"]) == {
        name: ("float32", tuple(tensor.shape)) for name, tensor in state.items()
    }
    bad = checkpoint_tensors(checkpoints["bad"])
    assert bad[BAD_TENSOR][1] != checkpoint_tensors(checkpoints["v1"])[BAD_TENSOR][1]


def test_checkpoint_tensors_needs_safetensors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no \.safetensors"):
        checkpoint_tensors(tmp_path)


def test_follow_config_reads_weightstream_variables() -> None:
    config = FollowConfig.from_env(
        {
            "WEIGHTSTREAM_MODEL": "llama",
            "WEIGHTSTREAM_BROKER": "tcp://trainer:5555",
            "WEIGHTSTREAM_TRANSPORT": "mooncake,shm",
            "WEIGHTSTREAM_HOST": "10.0.0.7",
            "WEIGHTSTREAM_PAUSE_MODE": "keep",
            "WEIGHTSTREAM_APPLIED": "3",
            "WEIGHTSTREAM_PROTOCOL": "rdma",
            "WEIGHTSTREAM_NAME": "node-3/gpu-0",
            "UNRELATED": "x",
        }
    )
    assert (config.model, config.broker, config.host) == ("llama", "tcp://trainer:5555", "10.0.0.7")
    assert (config.pause_mode, config.applied, config.protocol) == ("keep", 3, "rdma")
    assert config.name == "node-3/gpu-0"  # the stable label in status and /metrics
    assert transport_names(config.transport) == ["mooncake", "shm"]


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({}, "WEIGHTSTREAM_MODEL"),
        ({"WEIGHTSTREAM_MODEL": "m", "WEIGHTSTREAM_TRANSPORT": "carrier-pigeon"}, "transport"),
        ({"WEIGHTSTREAM_MODEL": "m", "WEIGHTSTREAM_PAUSE_MODE": "abort"}, "pause_mode"),
        ({"WEIGHTSTREAM_MODEL": "m", "WEIGHTSTREAM_PROTOCOL": "carrier-pigeon"}, "protocol"),
    ],
)
def test_follow_config_names_what_is_wrong(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FollowConfig.from_env(environ)
