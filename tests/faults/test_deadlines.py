"""Deadlines are deadlines: a frozen publisher costs `pull_timeout_s` plus one bucket, no more.

Real processes: a broker, a `weightstream subscribe` over mooncake tcp, and the publisher
process of version 2 (versions 1 and 3 come from a publisher in the test). It is frozen (SIGSTOP) in the middle of the subscriber's
pull. Before, mooncake's blocking read had no deadline of its own (its transfer timeout is
30 s), the pull waited for it, and the report read `TimeoutError: `; now the subscriber
reports a `PullTimeout` that says what timed out, after how long and what to try, within
`pull_timeout_s` plus one bucket's time of the freeze, stays on version 1 (its bytes
checked) and applies version 3 once a live publisher publishes it.
"""

from __future__ import annotations

import contextlib
import signal
import time
import uuid
from typing import TYPE_CHECKING, Any

import pytest
import zmq.asyncio

from publishers.publisher import open_publisher
from publishers.sources import synthetic_llama
from streamer.transport.mooncake import MooncakeSender, mooncake_available
from tests.e2e.procs import Fleet, assert_dump_equals, file_exists, get_json, start_broker, wait_for

if TYPE_CHECKING:
    from tests.faults.ledger import Faults  # noqa: F401

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not mooncake_available(), reason="needs mooncake-transfer-engine"),
]

SIZE = 32 << 20
BUCKET = 2 << 20
RATE = 16 << 20  # bytes/s: a pull of SIZE takes ~2 s, one bucket ~0.13 s
PULL_TIMEOUT_S = 4.0


async def test_a_frozen_publisher_costs_the_pull_deadline_and_a_clear_error(tmp_path, faults):
    fleet = Fleet(tmp_path)
    ctx = zmq.asyncio.Context()
    stack = contextlib.AsyncExitStack()
    model = f"deadline{uuid.uuid4().hex[:8]}"
    dumps = tmp_path / "dumps"
    try:
        broker = await start_broker(fleet)
        common = ("--broker", broker.endpoint, "--model", model, "--transport", "mooncake")

        def publisher(name: str, version: int):
            return fleet.start(
                name,
                "publish",
                *common,
                "--versions",
                str(version),
                "--synthetic",
                str(SIZE),
                "--bucket",
                str(BUCKET),
            )

        trainer = await stack.enter_async_context(
            open_publisher(
                broker.client_config(),
                model=model,
                sender=MooncakeSender(),
                bucket_bytes=BUCKET,
                context=ctx,
            )
        )
        await trainer.publish(1, synthetic_llama(SIZE, version=1))
        await fleet.start(
            "subscriber",
            "subscribe",
            *common,
            "--dump-dir",
            str(dumps),
            "--dump-all",
            "--max-rate",
            str(RATE),
            "--pull-timeout-s",
            str(PULL_TIMEOUT_S),
            "--max-attempts",
            "1",
        )
        await wait_for(
            lambda: file_exists(dumps / "v1.safetensors"), timeout_s=60, what="v1", fleet=fleet
        )

        async def rows() -> list[dict[str, Any]]:
            page: dict[str, list[dict[str, Any]]] = await get_json(f"{broker.http}/v1/subscribers")
            return page["subscribers"]

        async def mid_pull() -> bool:
            return any(
                r["pulling_version"] == 2 and r["progress"] and 0 < r["progress"] < 0.7
                for r in await rows()
            )

        frozen = await publisher("publisher-2", 2)
        await wait_for(mid_pull, timeout_s=60, what="v2 mid-pull", fleet=fleet)
        faults.inject("publisher frozen (SIGSTOP) in the middle of a pull")
        frozen.process.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()

        async def timed_out() -> str | None:
            for row in await rows():
                error = row["last_error"] or ""
                if "version 2" in error:
                    return error
            return None

        error = await wait_for(timed_out, timeout_s=60, what="v2 timeout report", fleet=fleet)
        waited_s = time.monotonic() - stopped_at
        bucket_s = BUCKET / RATE
        # Within the deadline plus one bucket, and 1 s of slack for this poll's tick and the
        # report's trip through the broker (the pull started before the freeze: a bound).
        assert waited_s <= PULL_TIMEOUT_S + bucket_s + 1.0, (waited_s, error)
        assert "PullTimeout" in error, error
        assert f"pull_timeout_s={PULL_TIMEOUT_S:g}" in error, error
        assert "raise pull_timeout_s" in error, error

        # Still on version 1, bytes and all; no other version was applied.
        assert sorted(p.name for p in dumps.glob("v*.safetensors")) == ["v1.safetensors"]
        assert_dump_equals(dumps / "v1.safetensors", SIZE, 1)
        faults.applied(version=1, ok=True)

        frozen.process.send_signal(signal.SIGKILL)
        await frozen.process.wait()
        await trainer.publish(3, synthetic_llama(SIZE, version=3))
        await wait_for(
            lambda: file_exists(dumps / "v3.safetensors"), timeout_s=60, what="v3", fleet=fleet
        )
        try:
            assert_dump_equals(dumps / "v3.safetensors", SIZE, 3)
        except AssertionError as exc:
            faults.applied(version=3, ok=False, what=str(exc)[:200])
        else:
            faults.applied(version=3, ok=True)
    finally:
        await stack.aclose()
        await fleet.stop_all()
        ctx.destroy(linger=0)
