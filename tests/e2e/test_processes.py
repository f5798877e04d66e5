"""End to end with real processes: broker, a 2-rank trainer and subscribers over mooncake tcp.

Each subscriber process dumps its live tensors after every swap; the tests compare those
dumps, byte for byte, with the synthetic model the trainer published.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from functools import partial
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from schemas.codec import decode_message, encode
from schemas.messages import Error, Hello, Welcome
from tests.e2e.procs import (
    Fleet,
    assert_dump_equals,
    file_exists,
    get_json,
    start_broker,
    subscribers_at,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

SIZE = 4_000_000


@pytest.fixture
async def fleet(tmp_path: Path):
    fleet = Fleet(tmp_path)
    yield fleet
    await fleet.stop_all()


def _publisher_args(broker: str, rank: int, versions: str, *extra: str) -> list[str]:
    return [
        "publish",
        "--broker",
        broker,
        "--model",
        "llama",
        "--transport",
        "mooncake",
        "--synthetic",
        str(SIZE),
        "--bucket",
        "256KiB",
        "--versions",
        versions,
        "--rank",
        str(rank),
        "--world-size",
        "2",
        *extra,
    ]


def _subscriber_args(broker: str, dump: Path, *extra: str) -> list[str]:
    return [
        "subscribe",
        "--broker",
        broker,
        "--model",
        "llama",
        "--transport",
        "mooncake",
        "--dump-dir",
        str(dump),
        "--dump-all",
        *extra,
    ]


async def test_two_rank_trainer_three_subscribers_bit_exact_at_every_version(
    fleet: Fleet, tmp_path: Path
):
    broker = await start_broker(fleet)
    dumps = [tmp_path / f"sub{i}" for i in range(3)]
    for index, dump in enumerate(dumps):
        await fleet.start(f"sub{index}", *_subscriber_args(broker.endpoint, dump))
    for rank in (0, 1):
        await fleet.start(
            f"rank{rank}",
            *_publisher_args(
                broker.endpoint,
                rank,
                "1-3",
                "--wait-subscribers",
                "3",
                "--interval-s",
                "1.5",
                "--serve",  # a late joiner reads version 3 after the wait
            ),
        )

    for version in (1, 2, 3):

        async def all_applied(version: int = version):
            rows = (await get_json(f"{broker.http}/v1/subscribers"))["subscribers"]
            return rows if len(subscribers_at(rows, version)) == 3 else None

        rows = await wait_for(
            all_applied, timeout_s=90, what=f"3 subscribers at v{version}", fleet=fleet
        )
        model = await get_json(f"{broker.http}/v1/models/llama")
        # The trainer waits for all three before publishing the next version, after 1.5 s.
        assert model["latest"] == version
        assert model["subscribers_at_latest"] == 3
        assert all(r["lag"] == 0 and r["model"] == "llama" for r in rows)
        assert all(r["last_pull_s"] > 0 and r["last_error"] is None for r in rows)
        summary = await get_json(f"{broker.http}/v1/models/llama/versions/{version}")
        assert summary["world_size"] == 2
        assert summary["total_bytes"] >= SIZE * 0.9
        for dump in dumps:
            path = dump / f"v{version}.safetensors"
            await wait_for(partial(file_exists, path), timeout_s=10, what=str(path))
            assert_dump_equals(path, SIZE, version)

    # Retention 2: version 1 is retired once nobody reads it.
    model = await get_json(f"{broker.http}/v1/models/llama")
    assert model["readable_versions"] == [2, 3]

    # A late joiner gets the newest version at once, without a new publish.
    late = tmp_path / "late"
    await fleet.start("late", *_subscriber_args(broker.endpoint, late, "--exit-after-version", "3"))
    await wait_for(
        partial(file_exists, late / "v3.safetensors"),
        timeout_s=60,
        what="late joiner",
        fleet=fleet,
    )
    assert_dump_equals(late / "v3.safetensors", SIZE, 3)
    assert not (late / "v1.safetensors").exists()
    assert not (late / "v2.safetensors").exists()

    metrics = await _text(f"{broker.http}/metrics")
    assert 'weightstream_latest_version{model="llama"} 3' in metrics
    for proc in fleet.procs:
        if proc.name != "late":
            assert await fleet.stop(proc) == 0, proc.tail()


async def test_subscriber_killed_mid_pull_catches_up_after_restart(fleet: Fleet, tmp_path: Path):
    broker = await start_broker(fleet)
    for rank in (0, 1):
        await fleet.start(f"rank{rank}", *_publisher_args(broker.endpoint, rank, "1"))
    dump = tmp_path / "sub"
    # 4 MB at 1 MB/s: the pull takes about four seconds.
    slow = await fleet.start("slow", *_subscriber_args(broker.endpoint, dump, "--max-rate", "1MB"))

    async def mid_pull():
        rows = (await get_json(f"{broker.http}/v1/subscribers"))["subscribers"]
        return any(r["progress"] is not None and 0 < r["progress"] < 0.8 for r in rows)

    await wait_for(mid_pull, timeout_s=60, what="a pull in progress", fleet=fleet)
    slow.process.send_signal(signal.SIGKILL)
    assert await slow.process.wait() == -signal.SIGKILL
    assert not dump.exists() or not list(dump.glob("v*.safetensors"))

    await fleet.start(
        "restarted", *_subscriber_args(broker.endpoint, dump, "--exit-after-version", "1")
    )
    await wait_for(
        partial(file_exists, dump / "v1.safetensors"),
        timeout_s=60,
        what="catch-up",
        fleet=fleet,
    )
    assert_dump_equals(dump / "v1.safetensors", SIZE, 1)

    async def killed_is_gone():
        rows = (await get_json(f"{broker.http}/v1/subscribers"))["subscribers"]
        return sorted(r["state"] for r in rows) == ["gone", "gone"] or (
            sum(r["state"] == "gone" for r in rows) >= 1
            and any(r["applied_version"] == 1 for r in rows)
        )

    await wait_for(
        killed_is_gone, timeout_s=30, what="the killed subscriber shown gone", fleet=fleet
    )


async def test_garbage_on_broker_sockets_and_http_leaves_it_serving(fleet: Fleet, tmp_path: Path):
    broker = await start_broker(fleet)
    host, port = broker.endpoint.removeprefix("tcp://").rsplit(":", 1)
    http_port = int(broker.http.rsplit(":", 1)[1])
    # Raw bytes that are not even ZMTP, and not even HTTP.
    for target in (int(port), http_port):
        with socket.create_connection((host, target), timeout=5) as raw:
            raw.sendall(os.urandom(4096) + b"\r\n\r\n")
    # Valid ZeroMQ framing, garbage inside: the broker answers with a typed error.
    ctx = zmq.asyncio.Context()
    try:
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(broker.endpoint)
        await dealer.send(b"\xc1\xc1 definitely not msgpack")
        async with asyncio.timeout(10):
            error = decode_message(await dealer.recv())
        assert isinstance(error, Error)
        assert error.code == "protocol"
        await dealer.send_multipart([b"one", b"two", b"three"])
        async with asyncio.timeout(10):
            assert decode_message(await dealer.recv()).code == "protocol"  # type: ignore[union-attr]
        await dealer.send(encode(Hello(peer_id="ok", role="observer")))
        async with asyncio.timeout(10):
            assert isinstance(decode_message(await dealer.recv()), Welcome)
        dealer.close()
    finally:
        ctx.destroy(linger=0)
    # ... and the full loop still works afterwards.
    health = await get_json(f"{broker.http}/healthz")
    assert health["status"] == "ok"
    dump = tmp_path / "sub"
    await fleet.start("sub", *_subscriber_args(broker.endpoint, dump, "--exit-after-version", "1"))
    for rank in (0, 1):
        await fleet.start(f"rank{rank}", *_publisher_args(broker.endpoint, rank, "1"))
    await wait_for(
        partial(file_exists, dump / "v1.safetensors"),
        timeout_s=60,
        what="v1",
        fleet=fleet,
    )
    assert_dump_equals(dump / "v1.safetensors", SIZE, 1)
    metrics = await _text(f"{broker.http}/metrics")
    # At least our two; random bytes can also pass as ZMTP/1.0 frames and count too.
    errors = next(
        line
        for line in metrics.splitlines()
        if line.startswith("weightstream_broker_protocol_errors_total ")
    )
    assert int(errors.split()[1]) >= 2, metrics


async def test_broker_restart_keeps_versions_and_peers_reconnect(fleet: Fleet, tmp_path: Path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        endpoint = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
    state = str(tmp_path / "state")
    broker = await start_broker(fleet, "--state-dir", state, endpoint=endpoint)
    dump = tmp_path / "sub"
    await fleet.start("sub", *_subscriber_args(broker.endpoint, dump))
    for rank in (0, 1):
        await fleet.start(
            f"rank{rank}",
            *_publisher_args(
                broker.endpoint, rank, "1-2", "--wait-subscribers", "1", "--interval-s", "6"
            ),
        )
    await wait_for(
        partial(file_exists, dump / "v1.safetensors"),
        timeout_s=60,
        what="v1",
        fleet=fleet,
    )
    assert await fleet.stop(broker.proc) == 0
    # While the broker is down the trainer goes on to version 2; it lands once a broker is back.
    restarted = await start_broker(fleet, "--state-dir", state, endpoint=endpoint)
    model = await get_json(f"{restarted.http}/v1/models/llama")
    assert model["latest"] in (1, 2)
    await wait_for(
        partial(file_exists, dump / "v2.safetensors"),
        timeout_s=90,
        what="v2",
        fleet=fleet,
    )
    assert_dump_equals(dump / "v2.safetensors", SIZE, 2)


async def _text(url: str) -> str:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return await response.text()
