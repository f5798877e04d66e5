"""A node link killed while its engines pull: they reach the broker again through its
successor, every version they apply bit-exact, and the trainer's wait for them still ends.

Real processes: the broker, a node link (`weightstream link`, the test key), two subscribers
that reach the broker only through the link (no key of their own), a trainer over mooncake tcp.
"""

from __future__ import annotations

import asyncio
import json
import signal
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio

from schemas.codec import encode
from schemas.messages import Error, Hello, Welcome
from streamer.frames import decode_header
from tests.e2e.procs import (
    BrokerInfo,
    Fleet,
    Proc,
    dump_matches,
    file_exists,
    publish_args,
    start_broker,
    subscribe_args,
    subscriber_rows,
    wait_for,
)
from tests.faults.ledger import Faults
from tests.support import test_keys

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

SIZE = 4_000_000


async def start_link(
    fleet: Fleet, broker: BrokerInfo, listen: str, name: str, *extra: str
) -> tuple[Proc, str]:
    """A node link process; (it, its routing id) once it listens."""
    ready = fleet.workdir / f"{name}.json"
    args = ["link", "--broker", broker.endpoint, "--listen", listen, "--ready-file", str(ready)]
    proc = await fleet.start(name, *args, *extra)
    await wait_for(partial(file_exists, ready), timeout_s=30, what=f"{name} ready", fleet=fleet)
    return proc, json.loads(ready.read_text())["link_id"]


def linked(rows: list[dict[str, Any]], link_id: str) -> list[dict[str, Any]]:
    return [r for r in rows if r["peer_id"].startswith(f"{link_id}/") and r["state"] != "gone"]


async def test_engines_reach_the_broker_through_a_restarted_link_and_apply_bit_exact(
    fleet: Fleet, tmp_path: Path, faults: Faults
):
    broker = await start_broker(fleet)
    listen = f"ipc://{tmp_path}/link/engines.sock"
    link, link_id = await start_link(fleet, broker, listen, "link")
    dumps = [tmp_path / "engine-0", tmp_path / "engine-1"]
    for index, dump in enumerate(dumps):
        # 4 MB at 1 MB/s: the pull of version 1 takes about four seconds.
        args = subscribe_args(listen, dump)
        await fleet.start(f"engine-{index}", *args, "--max-rate", "1MB", keyless=True)

    async def both_behind(link_id: str) -> list[dict[str, Any]] | None:
        rows = linked(await subscriber_rows(broker), link_id)
        return rows if len(rows) == 2 else None

    await wait_for(partial(both_behind, link_id), timeout_s=30, what="2 engines", fleet=fleet)
    # Version 2 only once both engines run version 1: the wait spans the link's death.
    args = publish_args(broker.endpoint, size=SIZE, versions="1-2")
    await fleet.start("trainer", *args, "--wait-subscribers", "2")

    async def mid_pull() -> bool:
        rows = linked(await subscriber_rows(broker), link_id)
        return any(r["progress"] is not None and 0 < r["progress"] < 0.8 for r in rows)

    await wait_for(mid_pull, timeout_s=60, what="a pull in progress", fleet=fleet)
    link.process.send_signal(signal.SIGKILL)
    faults.inject("SIGKILL of a node link while its engines pull")
    assert await link.process.wait() == -signal.SIGKILL
    _, successor = await start_link(fleet, broker, listen, "link-2")
    assert successor != link_id

    for version in (1, 2):
        for dump in dumps:
            path = dump / f"v{version}.safetensors"
            await wait_for(partial(file_exists, path), timeout_s=90, what=str(path), fleet=fleet)
            faults.applied(version=version, ok=dump_matches(path, SIZE, version))

    async def both_at_2() -> list[dict[str, Any]] | None:
        rows = await both_behind(successor)
        return rows if rows and all(r["applied_version"] == 2 for r in rows) else None

    rows = await wait_for(both_at_2, timeout_s=30, what="both at v2 via link-2", fleet=fleet)
    assert {r["pid"] for r in rows} == {p.process.pid for p in fleet.procs if "engine" in p.name}


ENVELOPES = {
    "a member id with a space (it would split a fan-out frame)": [b"bad member", b"x"],
    "a member id with a slash (it would pose as another link's member)": [b"m/1", b"x"],
    "three routing frames (a link behind a link)": [b"a", b"b", b"c"],
}
DEEP_FETCH = encode({"kind": "fetch_manifest", "zz": None})[:-1] + b"\x91" * 1000 + b"\xc0"
"""A 1 KB frame the link decodes (it names fetch_manifest) with a 1000-deep unknown field."""


async def test_hostile_envelopes_and_members_leave_the_broker_and_the_link_serving(
    fleet: Fleet, tmp_path: Path, zmq_ctx: zmq.asyncio.Context, faults: Faults
):
    broker = await start_broker(fleet)
    listen = f"ipc://{tmp_path}/link/engines.sock"
    link, _ = await start_link(fleet, broker, listen, "link", "--max-members", "2")

    raw = zmq_ctx.socket(zmq.DEALER)  # at the broker, with a listed key
    raw.setsockopt(zmq.LINGER, 0)
    test_keys().apply(raw)
    raw.connect(broker.endpoint)
    members = [zmq_ctx.socket(zmq.DEALER) for _ in range(3)]  # at the link, no key
    try:
        for what, frames in ENVELOPES.items():
            await raw.send_multipart(frames)
            faults.inject(f"to the broker: {what}")
            assert (await _error(raw)).code == "protocol"

        for index, member in enumerate(members):
            member.setsockopt(zmq.LINGER, 0)
            member.setsockopt(zmq.ROUTING_ID, f"member-{index}".encode())
            member.connect(listen)
        await members[0].send_multipart([b"a", b"b"])
        faults.inject("to the link: a member's message of two frames")
        assert (await _error(members[0])).code == "protocol"
        await members[0].send(DEEP_FETCH)
        faults.inject("to the link: a 1 KB FetchManifest-like frame nested 1000 deep")
        # Forwarded (it does not decode): the broker refuses it, and the link lives on.
        assert (await _error(members[0])).code == "protocol"
        for member in members[:2]:
            await member.send(encode(Hello(peer_id="m", role="subscriber")))
            assert isinstance(await _one(member), Welcome)
        await members[2].send(encode(Hello(peer_id="m", role="subscriber")))
        faults.inject("to the link: one member more than --max-members")
        assert "--max-members" in (await _error(members[2])).detail
    finally:
        raw.close(linger=0)
        for member in members:
            member.close(linger=0)

    # Both still serve: a real engine behind the link subscribes once a member slot is free
    # (the link forgets members silent for three fetch timeouts; here a fresh link).
    assert link.process.returncode is None
    assert broker.proc.process.returncode is None
    await fleet.stop(link)
    _, successor = await start_link(fleet, broker, listen, "link-2")
    engine = await fleet.start("engine", *subscribe_args(listen, tmp_path / "engine"), keyless=True)

    async def engine_shown() -> bool:
        rows = linked(await subscriber_rows(broker), successor)
        return any(r["pid"] == engine.process.pid for r in rows)

    await wait_for(engine_shown, timeout_s=30, what="the engine behind the link", fleet=fleet)


async def _one(socket: zmq.asyncio.Socket) -> object:
    async with asyncio.timeout(10):
        frames = await socket.recv_multipart()
    assert len(frames) == 1, frames
    return decode_header(frames[0])


async def _error(socket: zmq.asyncio.Socket) -> Error:
    error = await _one(socket)
    assert isinstance(error, Error), error
    return error
