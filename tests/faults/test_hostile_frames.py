"""Frames that used to kill a process (issue 7, point 8), sent to real processes.

A ~1 KB msgpack frame nested 1000 deep (and a 100 KB one nested 100 000 deep) used to raise
`RecursionError` out of every decoder: the broker exited, a trainer's ZeroMQ bulk thread
died (its bytes no longer readable) and a client's receive loop stopped. Each is sent here to
a broker, to a trainer's bulk port and, from a stand-in broker, to a `weightstream subscribe`
process; each keeps running and serving, shown by what it does next.
"""

from __future__ import annotations

import asyncio
from functools import partial
from pathlib import Path

import msgspec
import pytest
import zmq
import zmq.asyncio

from schemas.codec import decode_message, encode
from schemas.frames import FrameRead, FrameReply
from schemas.manifest import FrameLocator
from schemas.messages import (
    Announce,
    Error,
    Hello,
    Subscribe,
    Subscribed,
    Welcome,
)
from streamer.auth import load_keys
from tests.e2e.procs import (
    Fleet,
    assert_dump_equals,
    file_exists,
    get_json,
    start_broker,
    wait_for,
)
from tests.faults.hostile import RawPeer
from tests.support import test_keys

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

SIZE = 1_000_000
_HEAD = encode({"kind": "heartbeat", "zz": None})[:-1]  # `zz`, an unknown field, last
DEEP = {
    "1 KB frame nested 1000 deep": (_HEAD + b"\x91" * 1000 + b"\xc0", "nested too deeply"),
    "300 KB frame nested 100000 deep": (
        _HEAD + b"\x81\xa1k" * 100_000 + b"\xc0",
        "nested too deeply",
    ),
    "1 KB array nested 1000 deep": (b"\x91" * 1000 + b"\xc0", "Expected `object`, got `array`"),
}
BULK_DEEP = encode({"type": "read", "zz": None})[:-1] + b"\x91" * 1000 + b"\xc0"
"""A bulk read header (under the 4 KB header limit) with a 1000-deep unknown field."""


def _subscribe_args(broker: str, dump: Path) -> list[str]:
    return [
        "subscribe",
        "--broker",
        broker,
        "--model",
        "llama",
        "--transport",
        "zmq",
        "--dump-dir",
        str(dump),
    ]


async def test_deep_frames_to_the_broker_and_a_trainers_bulk_port_kill_neither(
    fleet: Fleet, tmp_path: Path, zmq_ctx: zmq.asyncio.Context, faults
):
    broker = await start_broker(fleet)
    await fleet.start(
        "trainer",
        "publish",
        "--broker",
        broker.endpoint,
        "--model",
        "llama",
        "--transport",
        "zmq",
        "--synthetic",
        str(SIZE),
        "--versions",
        "1",
    )
    peer = RawPeer.connect(zmq_ctx, broker.endpoint, "frames")
    try:
        # The broker: each deep frame is answered Error("protocol"), before and after a hello.
        for what, (frame, detail) in DEEP.items():
            faults.inject(f"to the broker: {what}")
            await peer.send_raw(frame)
            reply = await peer.reply()
            assert isinstance(reply, Error), reply
            assert reply.code == "protocol", reply
            assert detail in reply.detail, reply
            await peer.hello("observer")
        assert broker.proc.process.returncode is None, broker.proc.tail()

        # The trainer's bulk port, found in the manifest the broker sends a new subscriber.
        async def announced():
            models = (await get_json(f"{broker.http}/v1/models"))["models"]
            return [m["latest"] for m in models] == [1]

        await wait_for(announced, timeout_s=60, what="version 1", fleet=fleet)
        # Again (a raw peer sends no heartbeats), as a protocol-1 peer: the whole manifest.
        await peer.hello("observer", protocol=1)
        await peer.send_raw(encode(Subscribe(request_id=1, model="llama")))
        announce = None
        while announce is None:
            message = await peer.recv(timeout_s=10)
            if isinstance(message, Announce):
                announce = message
        locator = announce.manifest.regions[0].locators[0]
        assert isinstance(locator, FrameLocator), locator
    finally:
        peer.close()

    bulk = zmq_ctx.socket(zmq.DEALER)
    bulk.setsockopt(zmq.LINGER, 0)
    bulk.connect(locator.endpoint)
    try:
        for what, frame in [("1 KB read header nested 1000 deep", BULK_DEEP)] * 3:
            faults.inject(f"to the trainer's bulk port: {what}")
            await bulk.send(frame)
        # Still serving: a real read of the first 256 bytes is answered with them.
        read = FrameRead(request_id=7, key=locator.key, offset=0, nbytes=256)
        await bulk.send(encode(read))
        async with asyncio.timeout(10):
            header, payload = await bulk.recv_multipart()
        answer = msgspec.msgpack.decode(header, type=FrameReply)
        assert (answer.request_id, answer.ok, len(payload)) == (7, True, 256), answer
    finally:
        bulk.close(linger=0)

    # And a real subscriber still pulls the whole version from it, bit for bit.
    dump = tmp_path / "sub"
    await fleet.start("sub", *_subscribe_args(broker.endpoint, dump))
    path = dump / "v1.safetensors"
    await wait_for(partial(file_exists, path), timeout_s=60, what=str(path), fleet=fleet)
    assert_dump_equals(path, SIZE, 1)
    faults.applied(version=1, ok=True)
    assert all(p.process.returncode is None for p in fleet.procs), fleet.logs()


async def test_deep_frames_from_the_broker_do_not_stop_a_clients_receive_loop(
    fleet: Fleet, tmp_path: Path, zmq_ctx: zmq.asyncio.Context, faults
):
    """A stand-in broker (a raw ROUTER) answers the subscriber's hello, sends the deep frames,
    then the reply to its Subscribe, then `unknown_peer`: only a live receive loop reads the
    last two, and its hello again is what the test waits for."""
    router = zmq_ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    # The processes here speak CURVE to the test broker's key: the stand-in has that key.
    broker_keys = load_keys(test_keys().broker_key_file)
    router.curve_secretkey = broker_keys.secret
    router.curve_publickey = broker_keys.public
    router.curve_server = True
    port = router.bind_to_random_port("tcp://127.0.0.1")
    try:
        sub = await fleet.start(
            "sub", *_subscribe_args(f"tcp://127.0.0.1:{port}", tmp_path / "sub")
        )

        async def next_of(kind: type) -> tuple[bytes, object]:
            async with asyncio.timeout(60):
                while True:
                    identity, data = await router.recv_multipart()
                    message = decode_message(data)
                    if isinstance(message, kind):
                        return identity, message

        identity, _ = await next_of(Hello)
        await router.send_multipart([identity, encode(Welcome(broker_id="stand-in"))])
        identity, subscribe = await next_of(Subscribe)
        assert isinstance(subscribe, Subscribe)
        for what, (frame, _) in DEEP.items():
            faults.inject(f"to a subscriber's client: {what}")
            await router.send_multipart([identity, frame])
        subscribed = Subscribed(request_id=subscribe.request_id, model="llama")
        await router.send_multipart([identity, encode(subscribed)])
        unknown = Error(code="unknown_peer", detail="stand-in forgot you")
        await router.send_multipart([identity, encode(unknown)])

        identity, hello = await next_of(Hello)
        assert isinstance(hello, Hello)
        assert hello.role == "subscriber"
        assert sub.process.returncode is None, sub.tail()
    finally:
        router.close(linger=0)
