"""A node link killed while its engines pull: they reach the broker again through its
successor, every version they apply bit-exact, and the trainer's wait for them still ends.

Real processes: the broker, a node link (`weightstream link`, the test key), two subscribers
that reach the broker only through the link (no key of their own), a trainer over mooncake tcp.
"""

from __future__ import annotations

import json
import signal
from functools import partial
from pathlib import Path
from typing import Any

import pytest

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

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

SIZE = 4_000_000


async def start_link(fleet: Fleet, broker: BrokerInfo, listen: str, name: str) -> tuple[Proc, str]:
    """A node link process; (it, its routing id) once it listens."""
    ready = fleet.workdir / f"{name}.json"
    proc = await fleet.start(
        name, "link", "--broker", broker.endpoint, "--listen", listen, "--ready-file", str(ready)
    )
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
