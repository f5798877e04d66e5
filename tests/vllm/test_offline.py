"""An offline `vllm.LLM` follows published versions by itself (WeightStream).

One engine, in vLLM's default multiprocess mode with tensor_parallel_size=2 (each worker
maps the staged version from /dev/shm), lives through five versions published by a real
publisher through a real broker process, over mooncake (tcp):

    start on v1 -> 2 = v2 -> 3 = v3 -> 4 = bad shapes (refused) -> 5 = v2 again

After each applied version, greedy outputs equal those of a fresh engine started from that
version's checkpoint, token for token.
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

MODEL = "tiny-offline"


@pytest.fixture(scope="module")
def llm(checkpoints: dict[str, Path]) -> Iterator[Any]:
    """A TP=2 engine in vLLM's default (multiprocess) mode, started on v1."""
    from vllm import LLM

    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
        patch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core per worker
        engine = LLM(
            **engine_kwargs(
                checkpoints["v1"],
                tensor_parallel_size=2,
                weight_transfer_config={"backend": "weightstream"},
            )
        )
    yield engine
    client = engine.llm_engine.engine_core
    client.shutdown()
    client.ctx.destroy(linger=0)  # vLLM's sync client closes its sockets but not its context


@pytest.fixture(scope="module")
def publisher(broker: BrokerProcess) -> Iterator[SyncPublisher]:
    sender = MooncakeSender(host="127.0.0.1")
    with SyncPublisher(ClientConfig(broker=broker.endpoint), model=MODEL, sender=sender) as pub:
        yield pub


def test_offline_engine_follows_versions_and_refuses_a_bad_one(
    llm: Any,
    publisher: SyncPublisher,
    broker: BrokerProcess,
    checkpoints: dict[str, Path],
    references: dict[str, list[list[int]]],
) -> None:
    assert greedy(llm.generate) == references["v1"]
    with WeightStream.follow(llm, broker=broker.endpoint, model=MODEL, transport="mooncake") as ws:
        # 2: applied on demand, waiting for the pull
        publisher.publish(2, load_checkpoint(checkpoints["v2"]))
        assert ws.apply_latest(min_version=2, timeout_s=60) == 2
        outputs = llm.generate(["hello world the cat"], use_tqdm=False)
        assert [span.version for span in outputs[0].outputs[0].weight_versions] == ["2"]
        assert greedy(llm.generate) == references["v2"]
        assert llm.get_weight_version() == "2"
        row = wait_until(lambda: _row_at(broker, 2), timeout_s=10, what="broker shows 2")
        assert row["last_pause_s"] is not None

        # 3: pulled in the background, applied by ws.generate before it generates
        publisher.publish(3, load_checkpoint(checkpoints["v3"]))
        wait_until(lambda: ws.swapper.staged == 3, timeout_s=60, what="version 3 staged")
        assert greedy(ws.generate) == references["v3"]
        assert ws.version == 3

        # 4: one tensor has the wrong shape: refused before a byte is pulled
        publisher.publish(4, load_checkpoint(checkpoints["bad"]))
        assert ws.apply_latest(min_version=4, timeout_s=60) == 3
        assert BAD_TENSOR in (ws.status.last_error or "")
        assert greedy(ws.generate) == references["v3"]
        row = wait_until(lambda: _row_with_error(broker), timeout_s=10, what="broker error")
        assert row["applied_version"] == 3
        assert BAD_TENSOR in row["last_error"]

        # 5: the next good version applies
        publisher.publish(5, load_checkpoint(checkpoints["v2"]))
        assert ws.apply_latest(min_version=5, timeout_s=60) == 5
        assert greedy(ws.generate) == references["v2"]
        wait_until(lambda: _row_at(broker, 5), timeout_s=10, what="broker shows 5")
    assert not ws._thread.is_alive()
    assert not list(Path("/dev/shm").glob(f"weightstream-{MODEL}-*")), "staging left behind"


def _row_at(broker: BrokerProcess, version: int) -> dict[str, Any] | None:
    row = broker.subscriber(MODEL)
    return row if row is not None and row["applied_version"] == version else None


def _row_with_error(broker: BrokerProcess) -> dict[str, Any] | None:
    row = broker.subscriber(MODEL)
    return row if row is not None and row["last_error"] else None
