"""A relay that answers a reader's small bucket read with a 1 GiB frame.

Real processes: the broker (relay fanout 2), a trainer, and a relay subscriber ("b-reader")
whose plan has it read stripe 0 from "a-hostile": a raw peer that offers a relay and serves
every read with `RelayReply(ok)` and 1 GiB of payload. The reader's relay socket takes no frame
past its read's size class, so libzmq drops that connection unread: the reader fails over to
the trainer, applies the version bit-exact, and its peak memory does not grow by the frame
(before, it buffered each frame whole, then refused it for its size).
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import threading
from functools import partial
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq
import zmq.asyncio

from schemas.codec import encode
from schemas.frames import RelayReply, decode_relay_read
from schemas.messages import Heartbeat, Hello, RelayOffer, Subscribe
from tests.e2e.procs import (
    dump_matches,
    file_exists,
    get_json,
    publish_args,
    start_broker,
    subscribe_args,
    wait_for,
)
from tests.faults.ledger import Faults
from tests.support import test_keys

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

SIZE = 4_000_000
FRAME_BYTES = 1 << 30
GROWTH_BOUND = 256 << 20
"""The reader's peak RSS may grow by its stagings and a pull's working set, not by a frame."""


class HostileRelay:
    """A relay server that answers every read (at most `answers`) with `FRAME_BYTES` of payload."""

    def __init__(self, *, answers: int = 64) -> None:
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        port = self.socket.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.payload = mmap.mmap(-1, FRAME_BYTES)  # untouched: read as the zero page, no RSS
        self.answered = 0
        self._answers = answers
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self.socket.poll(100):
                continue
            identity, request = self.socket.recv_multipart()[:2]
            try:
                read = decode_relay_read(request)
            except msgspec.DecodeError:
                continue
            if self.answered >= self._answers:
                continue
            reply = msgspec.msgpack.encode(RelayReply(request_id=read.request_id, code="ok"))
            with contextlib.suppress(zmq.ZMQError):
                self.socket.send_multipart([identity, reply, self.payload], copy=False)
                self.answered += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.context.destroy(linger=0)
        self.payload.close()


async def offer_relay(socket: zmq.asyncio.Socket, endpoint: str) -> None:
    """As a relay subscriber named a-hostile (first in the plan's order), then heartbeat."""
    await socket.send(encode(Hello(peer_id="a-hostile", role="subscriber", name="a-hostile")))
    await socket.send(
        encode(Subscribe(request_id=1, model="llama", relay=RelayOffer(endpoint=endpoint)))
    )
    while True:
        await socket.send(encode(Heartbeat(applied={})))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.5):
                while True:
                    await socket.recv()  # Welcome, Subscribed, Route, Announced, Alive: unread


def peak_rss(pid: int) -> int:
    """VmHWM of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


async def test_a_relay_answering_with_a_1_gib_frame_costs_its_reader_a_failover_not_memory(
    fleet: Any, tmp_path: Path, zmq_ctx: zmq.asyncio.Context, faults: Faults
):
    broker = await start_broker(fleet, "--relay-fanout", "2")
    hostile = HostileRelay()
    peer = zmq_ctx.socket(zmq.DEALER)
    peer.setsockopt(zmq.LINGER, 0)
    test_keys().apply(peer)
    peer.connect(broker.endpoint)
    heartbeat = asyncio.create_task(offer_relay(peer, hostile.endpoint))
    dump = tmp_path / "reader"
    try:
        reader = await fleet.start(
            "reader",
            *subscribe_args(broker.endpoint, dump),
            "--name",
            "b-reader",
            "--relay-listen",
            "127.0.0.1",
        )

        async def both_offered() -> bool:
            rows = (await get_json(f"{broker.http}/v1/subscribers"))["subscribers"]
            return sum(row["relay_endpoint"] is not None for row in rows) == 2

        await wait_for(both_offered, timeout_s=30, what="two relay offers", fleet=fleet)
        before = peak_rss(reader.process.pid)
        await fleet.start("trainer", *publish_args(broker.endpoint, size=SIZE, versions="1"))
        path = dump / "v1.safetensors"
        await wait_for(partial(file_exists, path), timeout_s=90, what="v1 applied", fleet=fleet)
        assert hostile.answered >= 1, "the reader never read from the hostile relay"
        faults.inject(f"a relay answered {hostile.answered} bucket reads with 1 GiB frames")
        faults.applied(version=1, ok=dump_matches(path, SIZE, 1))
        faults.bounded(
            "the reader's peak RSS growth, reading from a relay that sends 1 GiB frames",
            value=peak_rss(reader.process.pid) - before,
            bound=GROWTH_BOUND,
        )
    finally:
        heartbeat.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await heartbeat
        peer.close(linger=0)
        hostile.close()
