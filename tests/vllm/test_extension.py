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
    from subscribers.vllm.follow import WeightStream
    from subscribers.vllm.swap import EXTENSION

from publishers.publisher import SyncPublisher
from publishers.sources import load_checkpoint
from streamer.config import ClientConfig
from streamer.transport import MooncakeSender
from subscribers.subscriber import PullConfig
from tests.vllm.reference import engine_kwargs, greedy
from tests.vllm.support import BrokerProcess, wait_until

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


def test_failed_pulls_leave_the_engine_on_its_version_and_it_catches_up(
    llm: Any,
    broker: BrokerProcess,
    checkpoints: dict[str, Path],
    references: dict[str, list[list[int]]],
) -> None:
    """A bucket corrupted after publishing, then a publisher that dies mid-transfer: each time
    the engine keeps generating the previous version's tokens; the next good version applies."""
    model = "tiny-extension-failures"
    # 64 KiB buckets pulled at 400 kB/s: a version takes ~4 s, so failures land mid-pull.
    pull = PullConfig(max_bytes_per_s=400_000, max_attempts=2, retry_backoff_s=0.2)
    config = ClientConfig(broker=broker.endpoint)
    good = SyncPublisher(config, model=model, sender=MooncakeSender(), bucket_bytes=64 << 10)
    try:
        with WeightStream.follow(
            llm, broker=broker.endpoint, model=model, transport="mooncake", pull=pull
        ) as ws:
            good.publish(1, load_checkpoint(checkpoints["v2"]))
            assert ws.apply_latest(min_version=1, timeout_s=60) == 1
            assert greedy(ws.generate) == references["v2"]

            # A flipped bit in the last bucket, after its checksum was computed.
            good.publish(2, load_checkpoint(checkpoints["v3"]))
            good.publisher.live[2].buffers[0][-300] ^= 0x01
            assert ws.apply_latest(min_version=2, timeout_s=60) == 1
            assert "ChecksumMismatch" in (ws.status.last_error or "")
            assert greedy(ws.generate) == references["v2"]

            # A publisher that dies while the engine is pulling from it.
            dying = SyncPublisher(
                config, model=model, sender=MooncakeSender(), bucket_bytes=64 << 10
            )
            dying.publish(3, load_checkpoint(checkpoints["v3"]))
            wait_until(lambda: ws.status.pulling == 3, timeout_s=30, what="pulling version 3")
            dying.close()
            assert ws.apply_latest(min_version=3, timeout_s=60) == 1
            assert "TransportError" in (ws.status.last_error or "")
            assert greedy(ws.generate) == references["v2"]

            # The next good version applies.
            good.publish(4, load_checkpoint(checkpoints["v3"]))
            assert ws.apply_latest(min_version=4, timeout_s=60) == 4
            assert greedy(ws.generate) == references["v3"]
    finally:
        good.close()
