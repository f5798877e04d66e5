"""Across a broker restart, with real sockets: a leased version stays held (its publisher gets
no Retire) until the lease is released, and a reconnecting peer keeps its leases."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import msgspec

from streamer.client import connect
from tests.streamer.test_broker import MODEL, shard
from tests.support import broker_config, eventually, run_broker


async def test_a_leased_version_survives_a_broker_restart_until_released(
    zmq_ctx, tmp_path: Path
) -> None:
    config = broker_config(state_dir=str(tmp_path), retention=1, lease_ttl_s=30.0)
    async with contextlib.AsyncExitStack() as first_broker:
        first = await first_broker.enter_async_context(run_broker(config))
        config = msgspec.structs.replace(config, endpoint=first.endpoint)
        client_config = first.client_config()
        async with (
            connect(client_config, role="publisher", context=zmq_ctx) as publisher,
            connect(client_config, role="subscriber", context=zmq_ctx) as reader,
        ):
            await publisher.publish(MODEL, 1, 0, 1, shard())
            await reader.acquire_lease(MODEL, 1)
            await publisher.publish(MODEL, 2, 0, 1, shard())  # 1 leaves the window: retiring

            first_id = reader.broker_id
            await first_broker.aclose()
            async with run_broker(config):

                async def both_back() -> bool:
                    # Both clients said hello again (their heartbeats met unknown_peer).
                    ids = {publisher.broker_id, reader.broker_id}
                    return len(ids) == 1 and first_id not in ids

                await eventually(both_back)
                # Renewing the lease it held before the restart works on the retiring version.
                assert await reader.acquire_lease(MODEL, 1) == 30.0
                assert publisher.retired.empty()

                await reader.release_lease(MODEL, 1)
                retire = await asyncio.wait_for(publisher.retired.get(), 5)
                assert (retire.model, retire.version, retire.reason) == (MODEL, 1, "")
