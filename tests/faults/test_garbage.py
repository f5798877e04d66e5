"""Garbage on the broker's sockets: typed errors for framed garbage, nothing for raw bytes,
and the broker serves the whole loop afterwards (a real broker, trainer and subscriber)."""

from __future__ import annotations

import asyncio
import os
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
    dump_matches,
    file_exists,
    get_json,
    get_text,
    metric,
    publish_args,
    start_broker,
    subscribe_args,
    wait_for,
)
from tests.faults.ledger import Faults
from tests.support import test_keys

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

SIZE = 4_000_000
ERRORS = "weightstream_broker_protocol_errors_total"


async def test_garbage_on_broker_sockets_and_http_leaves_it_serving(
    fleet: Fleet, tmp_path: Path, faults: Faults
):
    broker = await start_broker(fleet)
    # Valid ZeroMQ framing, garbage inside: the broker answers each with a typed error.
    ctx = zmq.asyncio.Context()
    try:
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        test_keys().apply(dealer)  # an allowlisted key: hostile bytes, admitted peer
        dealer.connect(broker.endpoint)
        await dealer.send(b"\xc1\xc1 definitely not msgpack")
        faults.inject("a frame that is not msgpack")
        async with asyncio.timeout(10):
            error = decode_message(await dealer.recv())
        assert isinstance(error, Error)
        assert error.code == "protocol"
        await dealer.send_multipart([b"one", b"two", b"three"])
        faults.inject("a message of three frames")
        async with asyncio.timeout(10):
            assert decode_message(await dealer.recv()).code == "protocol"  # type: ignore[union-attr]
        await dealer.send(encode(Hello(peer_id="ok", role="observer")))
        async with asyncio.timeout(10):
            assert isinstance(decode_message(await dealer.recv()), Welcome)
        dealer.close()
    finally:
        ctx.destroy(linger=0)
    # Both answered, so both counted; nothing else has reached the broker yet.
    assert metric(await get_text(f"{broker.http}/metrics"), ERRORS) == 2

    # Raw bytes that are not even ZMTP, and not even HTTP.
    host, port = broker.endpoint.removeprefix("tcp://").rsplit(":", 1)
    http_port = int(broker.http.rsplit(":", 1)[1])
    for target, what in ((int(port), "ZeroMQ"), (http_port, "HTTP")):
        with socket.create_connection((host, target), timeout=5) as raw:
            raw.sendall(os.urandom(4096) + b"\r\n\r\n")
        faults.inject(f"4 KiB of random bytes on the broker's {what} port")

    # ... and the full loop still works afterwards.
    health = await get_json(f"{broker.http}/healthz")
    assert health["status"] == "ok"
    dump = tmp_path / "sub"
    await fleet.start("sub", *subscribe_args(broker.endpoint, dump), "--exit-after-version", "1")
    for rank in (0, 1):
        args = publish_args(broker.endpoint, size=SIZE, versions="1", rank=rank, world_size=2)
        await fleet.start(f"rank{rank}", *args)
    await wait_for(
        partial(file_exists, dump / "v1.safetensors"), timeout_s=60, what="v1", fleet=fleet
    )
    faults.applied(version=1, ok=dump_matches(dump / "v1.safetensors", SIZE, 1))
    assert await fleet.stop(broker.proc) == 0, broker.proc.tail()
