"""Fixtures: a ZeroMQ asyncio context, a free endpoint, a running broker (ROUTER + HTTP) per
test, and mooncake engines lent from one pool per session (see `tests.support`)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import zmq.asyncio

from tests.support import (
    Keys,
    MooncakeEngines,
    RunningBroker,
    broker_config,
    run_broker,
    test_keys,
)


@pytest.fixture(scope="session")
def keys() -> Keys:
    """The session's CURVE keys and allowlist (`tests.support.test_keys`)."""
    return test_keys()


@pytest.fixture
async def zmq_ctx() -> AsyncIterator[zmq.asyncio.Context]:
    ctx = zmq.asyncio.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
def endpoint() -> str:
    return f"ipc://@weightstream-test-{uuid.uuid4().hex}"  # abstract socket: no file, no path limit


@pytest.fixture
async def broker() -> AsyncIterator[RunningBroker]:
    """`streamer.server.serve` on tcp://127.0.0.1:0 with HTTP on port 0, CURVE keys and the
    test allowlist; cancelled afterwards."""
    async with run_broker(broker_config()) as running:
        yield running


@pytest.fixture(scope="session")
def _mooncake_pool() -> MooncakeEngines:
    return MooncakeEngines()


@pytest.fixture
def mooncake(_mooncake_pool: MooncakeEngines) -> Iterator[MooncakeEngines]:
    """Mooncake senders and receivers (tcp, loopback) for one test; skips without mooncake."""
    if not _mooncake_pool.available():
        pytest.skip("mooncake-transfer-engine is not importable")
    yield _mooncake_pool
    _mooncake_pool.take_back()
