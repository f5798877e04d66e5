"""What a user sees of an offline engine that follows: its label, its status, its warnings.

One in-process engine starts on v1, which the trainer published as version 1
(`applied=1`, WEIGHTSTREAM_APPLIED=1): the engine is labelled `1` before any swap. Version 2
is pulled and waits: status says `staged`; a direct `llm.generate` still runs version 1 and
warns once that staged versions wait for `ws.generate`. Version 3 is refused (wrong shape) and
its error shows until version 4 applies. No swap logs vLLM's rotary-embedding false alarm.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

with warnings.catch_warnings():  # vLLM's own imports warn; pytest turns warnings into errors
    warnings.simplefilter("ignore")
    pytest.importorskip("vllm")
    from subscribers.vllm.follow import WeightStream

from publishers.publisher import SyncPublisher
from publishers.sources import load_checkpoint
from streamer.config import ClientConfig
from streamer.transport import MooncakeSender
from tests.vllm.conftest import BAD_TENSOR
from tests.vllm.reference import engine_kwargs, greedy
from tests.vllm.support import BrokerProcess, wait_until

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning"),
]

MODEL = "tiny-status"
RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self, level: int = logging.WARNING) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= level]


@pytest.fixture(scope="module")
def llm(checkpoints: dict[str, Path]) -> Iterator[Any]:
    from vllm import LLM

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        engine = LLM(
            **engine_kwargs(checkpoints["v1"], weight_transfer_config={"backend": "weightstream"})
        )
    yield engine
    # An in-process engine left running keeps its CPU worker (and its thread binding): the
    # next module's TP=2 engine then finds no CPUs left to bind its two workers to.
    engine.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="module")
def publisher(broker: BrokerProcess) -> Iterator[SyncPublisher]:
    sender = MooncakeSender(host="127.0.0.1")
    with SyncPublisher(ClientConfig(broker=broker.endpoint), model=MODEL, sender=sender) as pub:
        yield pub


@pytest.fixture
def records() -> Iterator[_Records]:
    handler = _Records()
    loggers = [logging.getLogger(name) for name in ("subscribers", RELOAD_LOGGER)]
    for each in loggers:
        each.addHandler(handler)
    yield handler
    for each in loggers:
        each.removeHandler(handler)


def test_label_status_and_warnings_of_an_offline_follower(
    llm: Any,
    publisher: SyncPublisher,
    broker: BrokerProcess,
    checkpoints: dict[str, Path],
    references: dict[str, list[list[int]]],
    records: _Records,
) -> None:
    publisher.publish(1, load_checkpoint(checkpoints["v1"]))
    with WeightStream.follow(
        llm, broker=broker.endpoint, model=MODEL, transport="mooncake", applied=1
    ) as ws:
        # Labelled with the version its checkpoint is, before any swap.
        assert llm.get_weight_version() == "1"
        outputs = llm.generate(["hello world the cat"], use_tqdm=False)
        assert [span.version for span in outputs[0].outputs[0].weight_versions] == ["1"]

        # 2: pulled, waiting for the engine: staged, not pulling.
        publisher.publish(2, load_checkpoint(checkpoints["v2"]))
        wait_until(lambda: ws.swapper.staged == 2, timeout_s=60, what="version 2 staged")
        assert (ws.status.staged, ws.status.pulling) == (2, None)

        # A direct llm.generate runs version 1 and warns, once.
        assert greedy(llm.generate) == references["v1"]
        assert greedy(llm.generate) == references["v1"]
        direct = [m for m in records.messages() if "llm.generate called while" in m]
        assert len(direct) == 1, records.messages()
        assert "ws.generate" in direct[0]
        assert "ws.apply_latest()" in direct[0]

        assert greedy(ws.generate) == references["v2"]
        assert ws.version == 2
        wait_until(lambda: ws.status.staged is None, timeout_s=10, what="staged cleared")

        # 3: refused; its error shows until 4 applies.
        publisher.publish(3, load_checkpoint(checkpoints["bad"]))
        assert ws.apply_latest(min_version=3, timeout_s=60) == 2
        assert BAD_TENSOR in (ws.status.last_error or "")
        publisher.publish(4, load_checkpoint(checkpoints["v3"]))
        assert ws.apply_latest(min_version=4, timeout_s=60) == 4
        assert greedy(ws.generate) == references["v3"]
        wait_until(lambda: ws.status.applied == 4, timeout_s=10, what="status applied 4")
        assert ws.status.last_error is None
        assert ws.status.failed == 3

    # Two swaps, and no rotary-embedding false alarm from vLLM's layerwise reload.
    assert not [m for m in records.messages() if "Failed to load weights" in m]
    assert "generate" not in llm.__dict__  # closing gave llm.generate back
