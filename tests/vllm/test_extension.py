"""The route for vLLM versions without the weight-transfer API: a worker extension.

The engine is started with `worker_extension_cls` instead of `weight_transfer_config`; the
swapper then applies each version with one `collective_rpc("weightstream_reload", json)`, one
`reload_weights` bracket per version, every worker mapping the staged bytes from /dev/shm.
In-process mode here (its engine starts in seconds); the offline test covers multiprocess.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

with warnings.catch_warnings():  # vLLM's own imports warn; pytest turns warnings into errors
    warnings.simplefilter("ignore")
    pytest.importorskip("vllm")
    from subscribers.vllm_follow import WeightStream
    from subscribers.vllm_swap import EXTENSION

from publishers.publisher import SyncPublisher
from publishers.sources import load_checkpoint
from streamer.config import ClientConfig
from streamer.transport import MooncakeSender
from tests.vllm.reference import engine_kwargs, greedy
from tests.vllm.support import BrokerProcess

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.timeout(240),
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning"),
]

MODEL = "tiny-extension"


@pytest.fixture(scope="module")
def llm(checkpoints: dict[str, Path]) -> Iterator[Any]:
    from vllm import LLM

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        engine = LLM(**engine_kwargs(checkpoints["v1"], worker_extension_cls=EXTENSION))
    yield engine
    engine.llm_engine.engine_core.shutdown()


def test_worker_extension_route_applies_versions_token_for_token(
    llm: Any,
    broker: BrokerProcess,
    checkpoints: dict[str, Path],
    references: dict[str, list[list[int]]],
) -> None:
    sender = MooncakeSender(host="127.0.0.1")
    with (
        SyncPublisher(
            ClientConfig(broker=broker.endpoint), model=MODEL, sender=sender
        ) as publisher,
        WeightStream.follow(llm, broker=broker.endpoint, model=MODEL, transport="mooncake") as ws,
    ):
        assert ws.swapper.route == "extension"
        assert greedy(ws.generate) == references["v1"]
        publisher.publish(2, load_checkpoint(checkpoints["v2"]))
        assert ws.apply_latest(min_version=2, timeout_s=60) == 2
        assert greedy(ws.generate) == references["v2"]
        publisher.publish(3, load_checkpoint(checkpoints["v3"]))
        assert ws.apply_latest(min_version=3, timeout_s=60) == 3
        assert greedy(ws.generate) == references["v3"]
