"""The broker's state dir under faults: unusable at start, damaged state file, full disk
while serving. Real broker processes; clients in the test."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from pathlib import Path

import pytest
import zmq.asyncio

from streamer.client import connect
from tests.e2e.procs import Fleet, get_json, start_broker, wait_for
from tests.streamer.test_registry import shard

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]


async def _exit_code(fleet: Fleet, *args: str) -> tuple[int, str]:
    proc = await fleet.start(f"broker-{len(fleet.procs)}", "broker", "--http-port", "0", *args)
    async with asyncio.timeout(30):
        code = await proc.process.wait()
    return code, proc.log.read_text()


async def test_an_unusable_state_dir_is_refused_at_start_with_the_path_and_the_fix(
    fleet: Fleet, tmp_path: Path, faults
):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the state dir should be")
    state = blocker / "state"
    faults.inject("state dir under a regular file")

    code, log = await _exit_code(
        fleet, "--endpoint", "tcp://127.0.0.1:0", "--state-dir", str(state)
    )

    assert code == 2, log
    lines = [line for line in log.splitlines() if "broker not started" in line]
    assert len(lines) == 1, log
    assert f"state dir {state} is not usable" in lines[0]
    assert "--state-dir" in lines[0]
    assert "Traceback" not in log


async def test_a_truncated_state_file_names_the_file_and_the_way_out(
    fleet: Fleet, tmp_path: Path, faults
):
    state = tmp_path / "state"
    broker = await start_broker(fleet, "--state-dir", str(state))
    ctx = zmq.asyncio.Context()
    try:
        config = broker.client_config(request_timeout_s=5)
        async with connect(config, role="publisher", context=ctx) as client:
            await client.publish("m", 1, 0, 1, shard("w"))
    finally:
        ctx.destroy(linger=0)
    assert await fleet.stop(broker.proc) == 0
    path = state / "registry.msgpack"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    faults.inject("state file truncated to half")

    code, log = await _exit_code(
        fleet, "--endpoint", "tcp://127.0.0.1:0", "--state-dir", str(state)
    )

    assert code == 2, log
    [line] = [line for line in log.splitlines() if "broker not started" in line]
    assert f"state file {path} is damaged" in line
    assert "--discard-bad-state" in line
    assert "Traceback" not in log

    broker = await start_broker(fleet, "--state-dir", str(state), "--discard-bad-state")
    assert (await get_json(f"{broker.http}/v1/models")) == {"models": []}
    [aside] = state.glob("registry.msgpack.bad-*")
    assert aside.read_bytes() == data[: len(data) // 2]


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str):
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


async def test_a_full_disk_is_reported_and_the_broker_keeps_serving(
    fleet: Fleet, tmp_path: Path, faults
):
    with small_tmpfs(tmp_path / "disk", "256k") as disk:
        state = disk / "state"
        broker = await start_broker(fleet, "--state-dir", str(state))
        filler = disk / "filler"
        with contextlib.suppress(OSError), filler.open("wb") as file:
            while True:
                file.write(b"\0" * 4096)
                file.flush()
                os.fsync(file.fileno())
        faults.inject("state dir's disk full")
        ctx = zmq.asyncio.Context()
        try:
            config = broker.client_config(request_timeout_s=5)
            async with connect(config, role="publisher", context=ctx) as client:
                for version in range(1, 6):
                    reply = await client.publish("m", version, 0, 1, shard("w" * 200))
                    assert reply.complete

                async def write_failed():
                    health = await get_json(f"{broker.http}/healthz")
                    return health["state"] if health["state"]["last_error"] else None

                failed = await wait_for(write_failed, timeout_s=10, what="a write error in status")
                assert "No space left on device" in failed["last_error"]
                assert failed["write_errors_total"] >= 1
                model = await get_json(f"{broker.http}/v1/models/m")
                assert model["latest"] == 5  # still serving

                filler.unlink()

                async def written_again():
                    health = await get_json(f"{broker.http}/healthz")
                    return health["state"]["last_error"] is None

                await wait_for(written_again, timeout_s=10, what="the state written again")
        finally:
            ctx.destroy(linger=0)
        assert await fleet.stop(broker.proc) == 0
        log = broker.proc.log.read_text()
        assert log.count("state write failed") == 1, log  # reported once, not every tick
        assert "state written again" in log
        broker = await start_broker(fleet, "--state-dir", str(state))
        assert (await get_json(f"{broker.http}/v1/models/m"))["latest"] == 5
