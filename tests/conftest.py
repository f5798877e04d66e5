"""Fixtures: a ZeroMQ asyncio context, a free endpoint, a running broker (ROUTER + HTTP) per
test, mooncake engines lent from one pool per session (see `tests.support`), and a `fleet`
of real processes for the end-to-end and fault tests."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

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

if TYPE_CHECKING:
    from pathlib import Path

    from tests.e2e.procs import Fleet


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


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    """Real weightstream processes for one test (`tests.e2e.procs.Fleet`), all stopped after."""
    from tests.e2e.procs import Fleet

    fleet = Fleet(tmp_path)
    yield fleet
    await fleet.stop_all()


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
