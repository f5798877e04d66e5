"""A failure inside vLLM's reload bracket leaves the engine on its previous version.

An offline engine (in-process, one worker) follows a model. Version 2 applies. Version 3 is
pulled, verified and handed over; then, after every check and before the engine maps it, its
staging file disappears (renamed away: a /dev/shm clean-up, a dying node), so the update fails
inside the bracket, after `start_weight_update`. The bracket closes, version 2 is reloaded
from its retained staging, and greedy outputs stay version 2's, token for token; the failure
is reported. Once the file is back, the next version applies.
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
from streamer.transport.shm import SHM_DIR
from tests.vllm.reference import engine_kwargs, greedy
from tests.vllm.support import BrokerProcess, wait_until

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning"),
]

MODEL = "tiny-restore"


@pytest.fixture(scope="module")
def llm(checkpoints: dict[str, Path]) -> Any:
    from vllm import LLM

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        engine = LLM(
            **engine_kwargs(checkpoints["v1"], weight_transfer_config={"backend": "weightstream"})
        )
    return engine


@pytest.fixture(scope="module")
def publisher(broker: BrokerProcess) -> Iterator[SyncPublisher]:
    sender = MooncakeSender(host="127.0.0.1")
    with SyncPublisher(ClientConfig(broker=broker.endpoint), model=MODEL, sender=sender) as pub:
        yield pub


def test_a_failure_inside_the_bracket_restores_the_previous_version(
    llm: Any,
    publisher: SyncPublisher,
    broker: BrokerProcess,
    checkpoints: dict[str, Path],
    references: dict[str, list[list[int]]],
) -> None:
    with WeightStream.follow(llm, broker=broker.endpoint, model=MODEL, transport="mooncake") as ws:
        publisher.publish(2, load_checkpoint(checkpoints["v2"]))
        assert ws.apply_latest(min_version=2, timeout_s=60) == 2
        assert greedy(llm.generate) == references["v2"]

        publisher.publish(3, load_checkpoint(checkpoints["v3"]))
        wait_until(lambda: ws.swapper.staged == 3, timeout_s=60, what="version 3 staged")
        handover = ws.swapper._handover
        assert handover is not None
        [[segment, _]] = handover.info["segments"]
        path = SHM_DIR / segment
        hidden = path.with_name(path.name + ".hidden")
        path.rename(hidden)  # the fault: verified, handed over, then gone before the load
        try:
            assert ws.apply_latest() == 2
        finally:
            hidden.rename(path)
        wait_until(
            lambda: "restored version 2" in (ws.status.last_error or ""),
            timeout_s=10,
            what="the failure recorded",
        )
        assert "may hold a mix" not in (ws.status.last_error or "")
        assert greedy(llm.generate) == references["v2"], "not version 2's tokens after restore"
        assert llm.get_weight_version() == "2"
        row = wait_until(
            lambda: _row_with_error(broker, "restored version 2"), timeout_s=10, what="reported"
        )
        assert row["applied_version"] == 2

        publisher.publish(4, load_checkpoint(checkpoints["v3"]))
        assert ws.apply_latest(min_version=4, timeout_s=60) == 4
        assert greedy(ws.generate) == references["v3"]


def _row_with_error(broker: BrokerProcess, text: str) -> dict[str, Any] | None:
    row = broker.subscriber(MODEL)
    return row if row is not None and text in (row["last_error"] or "") else None
