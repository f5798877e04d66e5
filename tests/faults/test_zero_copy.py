"""Same-host (shm) subscribers never apply bytes they did not verify.

A real engine process (`tests/faults/zero_copy_engine.py`: Subscriber + TorchSwapper +
VersionGate) stages version 2 of a same-host publisher and waits at the swap, its engine
holding a step open. Then the fault: the broker restarts (leases lost), the subscriber freezes
past its lease (SIGSTOP), or the publisher writes over version 2's buffers. Whatever the
engine then reports applied must hold exactly that version's bytes (the dumps are compared
with the synthetic model of that version): before the private-staging rule, TorchSwapper
copied from the publisher's memory at the swap and ran "version 2" with other bytes.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import zmq.asyncio

from publishers.publisher import open_publisher
from publishers.sources import synthetic_llama
from streamer.transport.zmq_frames import ZmqFrameSender
from tests.e2e.procs import (
    ENV,
    Fleet,
    Proc,
    assert_dump_equals,
    file_exists,
    start_broker,
    wait_for,
)
from tests.support import test_keys

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from publishers.publisher import Publisher
    from tests.e2e.procs import BrokerInfo
    from tests.faults.ledger import Faults

pytestmark = pytest.mark.slow

SIZE = 4 << 20
BUCKET = 1 << 20
REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@asynccontextmanager
async def _fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    fleet = Fleet(tmp_path)
    try:
        yield fleet
    finally:
        await fleet.stop_all()


async def _start_engine(fleet: Fleet, broker: str, model: str, tmp_path: Path) -> Proc:
    log = tmp_path / "engine.log"
    with log.open("ab") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.faults.zero_copy_engine",
            "--broker",
            broker,
            "--model",
            model,
            "--dump-dir",
            str(tmp_path / "dumps"),
            "--hold-file",
            str(tmp_path / "hold"),
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
            env={**ENV, **test_keys().env(), "PYTHONPATH": str(REPO)},
            cwd=REPO,
        )
    proc = Proc("engine", process, log)
    fleet.procs.append(proc)
    return proc


class Scene:
    """Broker, same-host publisher (in this process) and the engine process, for one test."""

    def __init__(self, fleet: Fleet, tmp_path: Path, broker: BrokerInfo, publisher: Publisher):
        self.fleet = fleet
        self.tmp_path = tmp_path
        self.broker = broker
        self.publisher = publisher
        self.engine: Proc | None = None
        self.dumps = tmp_path / "dumps"
        self.hold = tmp_path / "hold"

    async def publish(self, version: int) -> None:
        await self.publisher.publish(version, synthetic_llama(SIZE, version=version))

    async def wait_dump(self, version: int) -> None:
        path = self.dumps / f"v{version}.safetensors"
        await wait_for(
            lambda: file_exists(path), timeout_s=30, what=f"dump of v{version}", fleet=self.fleet
        )

    async def hold_at_the_swap(self, version: int) -> None:
        """Hold an engine step open, publish `version`, and wait until it is staged."""
        self.hold.touch()
        stepping = self.hold.with_name("hold.stepping")
        await wait_for(
            lambda: file_exists(stepping), timeout_s=10, what="a held step", fleet=self.fleet
        )
        await self.publish(version)
        assert self.engine is not None

        async def staged() -> bool:
            text = await asyncio.to_thread(self.engine.log.read_text, errors="replace")  # type: ignore[union-attr]
            return f"staged model={self.publisher.model} version={version}" in text

        await wait_for(staged, timeout_s=30, what=f"v{version} staged", fleet=self.fleet)

    def release(self) -> None:
        self.hold.unlink()

    def check_dumps(self, faults: Faults, must: set[int]) -> None:
        seen = {int(p.stem[1:]) for p in self.dumps.glob("v*.safetensors")}
        assert must <= seen, f"versions dumped {sorted(seen)}, expected at least {sorted(must)}"
        for version in sorted(seen):
            try:
                assert_dump_equals(self.dumps / f"v{version}.safetensors", SIZE, version)
            except AssertionError as exc:
                faults.applied(version=version, ok=False, what=str(exc)[:200])
            else:
                faults.applied(version=version, ok=True)


@asynccontextmanager
async def _scene(tmp_path: Path, *broker_args: str) -> AsyncIterator[Scene]:
    model = f"zc{uuid.uuid4().hex[:8]}"
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    ctx = zmq.asyncio.Context()
    async with _fleet(tmp_path) as fleet:
        broker = await start_broker(fleet, "--retention", "1", *broker_args, endpoint=endpoint)
        try:
            async with open_publisher(
                broker.client_config(request_timeout_s=20),
                model=model,
                sender=ZmqFrameSender(),
                node_local=True,
                bucket_bytes=BUCKET,
                context=ctx,
            ) as publisher:
                scene = Scene(fleet, tmp_path, broker, publisher)
                await scene.publish(1)
                scene.engine = await _start_engine(fleet, endpoint, model, tmp_path)
                await scene.wait_dump(1)
                yield scene
        finally:
            ctx.destroy(linger=0)


async def test_broker_restart_while_a_shm_subscriber_waits_at_the_swap(tmp_path, faults):
    state = tmp_path / "state"
    async with _scene(tmp_path, "--state-dir", str(state)) as scene:
        await scene.hold_at_the_swap(2)
        faults.inject("broker killed and restarted while a shm subscriber waits at the swap")
        scene.broker.proc.process.kill()
        await scene.broker.proc.process.wait()
        scene.broker = await start_broker(
            scene.fleet,
            "--retention",
            "1",
            "--state-dir",
            str(state),
            endpoint=scene.broker.endpoint,
        )
        for version in (3, 4, 5):  # reuses freed buffers, version 2's once it is retired
            await scene.publish(version)
        scene.release()
        await scene.wait_dump(5)
        scene.check_dumps(faults, must={1, 2, 5})


async def test_lease_expiry_while_a_shm_subscriber_waits_at_the_swap(tmp_path, faults):
    async with _scene(tmp_path, "--lease-ttl-s", "1", "--peer-timeout-s", "1.5") as scene:
        await scene.hold_at_the_swap(2)
        publisher = scene.publisher
        await wait_for(
            lambda: _gone(publisher, 1), timeout_s=10, what="v1 retired", fleet=scene.fleet
        )
        v2_buffer = publisher.live[2].buffers[0].data_ptr()
        assert scene.engine is not None
        faults.inject("subscriber frozen (SIGSTOP) past its lease while waiting at the swap")
        scene.engine.process.send_signal(signal.SIGSTOP)
        try:
            await scene.publish(3)
            await wait_for(
                lambda: _gone(publisher, 2), timeout_s=15, what="v2 retired", fleet=scene.fleet
            )
            await scene.publish(4)
            # The publisher now packs version 4 into the buffers version 2 was staged from.
            assert publisher.live[4].buffers[0].data_ptr() == v2_buffer
        finally:
            scene.engine.process.send_signal(signal.SIGCONT)
        scene.release()
        await scene.wait_dump(4)
        scene.check_dumps(faults, must={1, 2, 4})


async def test_publisher_reusing_buffers_under_a_staged_shm_subscriber(tmp_path, faults):
    async with _scene(tmp_path) as scene:
        await scene.hold_at_the_swap(2)
        faults.inject("publisher writes over a staged version's shm buffers before the swap")
        for buffer in scene.publisher.live[2].buffers:
            buffer.fill_(0x5A)
        scene.release()
        await scene.wait_dump(2)
        await scene.publish(3)
        await scene.wait_dump(3)
        scene.check_dumps(faults, must={1, 2, 3})


async def _gone(publisher: Publisher, version: int) -> bool:
    return version not in publisher.live
