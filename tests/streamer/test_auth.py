"""CURVE keys, the allowlist and rights per model, over real sockets to a real broker.

The broker runs in this loop (`tests.support.run_broker`) with the session's keys; the
allowlist (`tests.support.ALLOWLIST`) has `trainer` and `rival` (publish policy), `engine`
(subscribe policy), `other` (publish and subscribe other), `admin`, `mallory` (no rights),
`peer` (everything but admin); `stranger` has a key but is not listed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
import zmq
import zmq.asyncio

from schemas.codec import encode
from schemas.manifest import BucketSpec, FrameLocator, RegionSpec, Shard, TensorSpec
from schemas.messages import Applied, Error, Hello, Subscribe, Welcome
from streamer.auth import (
    FIRST_VERSION_LIMIT,
    Allowlist,
    AuthError,
    Forbidden,
    create_keys,
    is_loopback,
    load_public_key,
)
from streamer.client import BrokerClient, connect
from streamer.errors import BrokerError, TransportError
from streamer.frames import decode_header
from streamer.server import serve
from streamer.transport.base import Fetch, Region
from streamer.transport.zmq_frames import ZmqFrameReceiver, ZmqFrameSender
from tests.support import RunningBroker, broker_config, run_broker, test_keys, until
from weightstream.cli import main

POLICY = "policy"


def shard(name: str = "w") -> Shard:
    return Shard(
        regions=(RegionSpec(nbytes=256, locators=(FrameLocator(endpoint="tcp://x:1", key="k"),)),),
        tensors=(TensorSpec(name=name, dtype="uint8", shape=(16,), region=0, offset=0, nbytes=16),),
        buckets=(BucketSpec(region=0, offset=0, nbytes=256, checksum="0" * 32),),
    )


@contextlib.asynccontextmanager
async def client(
    broker: RunningBroker, ctx: zmq.asyncio.Context, key: str | None, **kw: Any
) -> AsyncIterator[BrokerClient]:
    config = broker.client_config(key=key, request_timeout_s=3.0)
    async with connect(config, role=kw.pop("role", "publisher"), context=ctx, **kw) as c:
        yield c


@contextlib.asynccontextmanager
async def raw(
    ctx: zmq.asyncio.Context, endpoint: str, key: str, routing_id: str
) -> AsyncIterator[zmq.asyncio.Socket]:
    """A bare DEALER with key `key`: what a hostile but allowlisted peer can send."""
    socket = ctx.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.ROUTING_ID, routing_id.encode())
    test_keys().apply(socket, key)
    socket.connect(endpoint)
    try:
        yield socket
    finally:
        socket.close(linger=0)


async def answer(socket: zmq.asyncio.Socket) -> Any:
    async with asyncio.timeout(5):
        return decode_header(await socket.recv())


async def http(broker: RunningBroker, method: str, path: str, token: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, broker.url + path, headers=headers) as response,
    ):
        return response.status, await response.text()


# who may connect


@pytest.mark.parametrize("key", ["stranger", None])
async def test_a_key_outside_the_allowlist_gets_nothing(broker: RunningBroker, zmq_ctx, key):
    # CURVE refuses it in the handshake: no Welcome, and the client says why.
    with pytest.raises(AuthError, match=r"refused our key|handshake with the broker"):
        async with client(broker, zmq_ctx, key):
            pytest.fail("an unlisted key was admitted")
    # The broker serves everyone else as before.
    async with client(broker, zmq_ctx, "trainer") as trainer:
        assert (await trainer.publish(POLICY, 1, 0, 1, shard())).complete


# rights per model


async def test_publish_needs_publisher_rights_on_that_model(broker: RunningBroker, zmq_ctx):
    async with (
        client(broker, zmq_ctx, "engine") as engine,
        client(broker, zmq_ctx, "other") as other,
        client(broker, zmq_ctx, "mallory") as mallory,
    ):
        with pytest.raises(Forbidden, match="'engine' may not publish 'policy'"):
            await engine.publish(POLICY, 1, 0, 1, shard())
        with pytest.raises(Forbidden, match="'other' may not publish 'policy'"):
            await other.publish(POLICY, 1, 0, 1, shard())
        with pytest.raises(Forbidden, match="'mallory' may not publish"):
            await mallory.publish(POLICY, 1, 0, 1, shard())
        assert (await other.publish("other", 1, 0, 1, shard())).complete
    _, body = await http(broker, "GET", "/v1/models")
    assert [m["model"] for m in msgspec.json.decode(body)["models"]] == ["other"]


async def test_fetching_a_manifest_by_digest_needs_subscriber_or_publisher_rights(
    broker: RunningBroker, zmq_ctx
):
    async with client(broker, zmq_ctx, "trainer") as trainer:
        await trainer.publish(POLICY, 1, 0, 1, shard())
        async with client(broker, zmq_ctx, "engine", role="subscriber") as engine:
            assert await engine.subscribe(POLICY) == 1
            manifest = await asyncio.wait_for(engine.next_manifest(POLICY, after=-1), 5)
        digest = hashlib.sha256(encode(manifest)).hexdigest()
        async with client(broker, zmq_ctx, "other", role="subscriber") as other:
            with pytest.raises(Forbidden, match="not a subscriber of 'policy'"):
                await other._fetch_manifest_body(POLICY, 1, digest)
        # Its trainer may (it follows its own model with `publish --versions next:N`).
        assert await trainer._fetch_manifest_body(POLICY, 1, digest) == encode(manifest)


async def test_subscribe_and_leases_need_subscriber_rights(broker: RunningBroker, zmq_ctx):
    async with client(broker, zmq_ctx, "trainer") as trainer:
        await trainer.publish(POLICY, 1, 0, 1, shard())
        async with client(broker, zmq_ctx, "other", role="subscriber") as other:
            with pytest.raises(Forbidden, match="not a subscriber of 'policy'"):
                await other.subscribe(POLICY)
            with pytest.raises(Forbidden, match="not a subscriber of 'policy'"):
                await other.acquire_lease(POLICY, 1)
            assert other.latest_manifest(POLICY) is None  # never saw the locators
        async with client(broker, zmq_ctx, "engine", role="subscriber") as engine:
            assert await engine.subscribe(POLICY) == 1
            assert await engine.acquire_lease(POLICY, 1) > 0
        # The model's own trainer may follow it (to continue after the latest), not lease it.
        assert await trainer.subscribe(POLICY) == 1
        with pytest.raises(Forbidden, match="not a subscriber of 'policy'"):
            await trainer.acquire_lease(POLICY, 1)


async def test_only_the_owner_claims_the_next_version(broker: RunningBroker, zmq_ctx):
    async with (
        client(broker, zmq_ctx, "trainer") as trainer,
        client(broker, zmq_ctx, "rival") as rival,
    ):
        await trainer.publish(POLICY, 1, 0, 1, shard())
        # Another key with publisher rights pre-claims version 2 with another world size ...
        with pytest.raises(Forbidden, match="belongs to key 'trainer'"):
            await rival.publish(POLICY, 2, 0, 3, shard())
        # ... and the trainer's own version 2 goes through.
        assert (await trainer.publish(POLICY, 2, 0, 1, shard())).complete


async def test_the_owner_survives_a_broker_restart(zmq_ctx, tmp_path: Path):
    config = broker_config(state_dir=str(tmp_path))
    async with run_broker(config) as first, client(first, zmq_ctx, "trainer") as trainer:
        await trainer.publish(POLICY, 1, 0, 1, shard())
    async with run_broker(config) as second, client(second, zmq_ctx, "rival") as rival:
        with pytest.raises(Forbidden, match="belongs to key 'trainer'"):
            await rival.publish(POLICY, 2, 0, 3, shard())


async def test_versions_far_past_the_latest_are_refused(broker: RunningBroker, zmq_ctx):
    async with client(broker, zmq_ctx, "trainer") as trainer:
        # Past the wire type's bound: refused as a protocol error, answered by request id.
        with pytest.raises(BrokerError, match="protocol"):
            await trainer.publish(POLICY, 2**64 - 1, 0, 1, shard())
        with pytest.raises(Forbidden, match="largest first version"):
            await trainer.publish(POLICY, 2**53 + 1, 0, 1, shard())
        assert (await trainer.publish(POLICY, 5, 0, 1, shard())).complete
        jump = broker.config.max_version_jump
        with pytest.raises(Forbidden, match=rf"more than {jump} past the latest"):
            await trainer.publish(POLICY, 5 + jump + 1, 0, 1, shard())
        assert (await trainer.publish(POLICY, 5 + jump, 0, 1, shard())).complete
    assert FIRST_VERSION_LIMIT == 2**53


async def test_fake_applied_reports_do_not_count(broker: RunningBroker, zmq_ctx):
    async with client(broker, zmq_ctx, "trainer") as trainer:
        await trainer.publish(POLICY, 1, 0, 1, shard())
        waiting = asyncio.create_task(trainer.wait_applied(POLICY, 1, num_subscribers=1))
        async with raw(zmq_ctx, broker.endpoint, "other", "fake-engine") as fake:
            await fake.send(encode(Hello(peer_id="fake-engine", role="subscriber")))
            assert isinstance(await answer(fake), Welcome)
            await fake.send(encode(Applied(model=POLICY, version=1)))
            refused = await answer(fake)
        assert isinstance(refused, Error)
        assert refused.code == "forbidden"
        _, body = await http(broker, "GET", f"/v1/models/{POLICY}")
        assert msgspec.json.decode(body)["subscribers_at_latest"] == 0
        # A real subscriber of policy makes it return.
        async with client(broker, zmq_ctx, "engine", role="subscriber") as engine:
            await engine.subscribe(POLICY)
            await engine.report_applied(POLICY, 1, pull_s=0.1, pause_s=0.01, nbytes=256)
            async with asyncio.timeout(5):
                assert await waiting == 1


async def test_a_routing_id_belongs_to_the_key_that_said_hello(broker: RunningBroker, zmq_ctx):
    async with raw(zmq_ctx, broker.endpoint, "engine", "victim") as victim:
        await victim.send(encode(Hello(peer_id="victim", role="subscriber")))
        assert isinstance(await answer(victim), Welcome)
    # The victim's connection is gone, the broker still knows it: another key that takes its
    # routing id is refused on every message (bounded retries: the old pipe closes first).
    refused: Any = None
    for _ in range(20):
        async with raw(zmq_ctx, broker.endpoint, "peer", "victim") as thief:
            await thief.send(encode(Subscribe(request_id=1, model=POLICY)))
            if await thief.poll(500):
                refused = decode_header(await thief.recv())
                break
    assert isinstance(refused, Error), refused
    assert (refused.code, refused.detail) == (
        "forbidden",
        "routing id 'victim' belongs to another key",
    )


async def test_a_second_connection_cannot_take_over_a_live_subscriber(
    broker: RunningBroker, zmq_ctx
):
    async with (
        client(broker, zmq_ctx, "trainer") as trainer,
        client(broker, zmq_ctx, "engine", role="subscriber", peer_id="live-victim") as victim,
    ):
        await victim.subscribe(POLICY)
        async with raw(zmq_ctx, broker.endpoint, "peer", "live-victim") as thief:
            # ROUTER_HANDOVER is off: the thief's connection is ignored, the victim keeps it.
            await thief.send(encode(Hello(peer_id="live-victim", role="subscriber")))
            await thief.send(encode(Subscribe(request_id=2, model=POLICY)))
            for version in (1, 2, 3):
                await trainer.publish(POLICY, version, 0, 1, shard(f"w{version}"))
                async with asyncio.timeout(5):
                    manifest = await victim.next_manifest(POLICY, after=version - 1)
                assert manifest.version == version
        assert victim.cut_off is None


# administration


async def test_only_admins_retire_and_delete(broker: RunningBroker, zmq_ctx):
    async with (
        client(broker, zmq_ctx, "trainer") as trainer,
        client(broker, zmq_ctx, "peer", role="observer") as peer,
        client(broker, zmq_ctx, "admin", role="observer") as admin,
    ):
        await trainer.publish(POLICY, 1, 0, 1, shard())
        await trainer.publish(POLICY, 2, 0, 1, shard())
        with pytest.raises(Forbidden, match="not an admin"):
            await peer.retire_version(POLICY, 2)
        with pytest.raises(Forbidden, match="not an admin"):
            await peer.delete_model(POLICY)
        assert await admin.retire_version(POLICY, 2) == "retiring"
        async with asyncio.timeout(5):
            retired = {(await trainer.retired.get()).version for _ in range(1)}
        assert retired == {2}
        assert await admin.delete_model(POLICY) == "deleted"
        _, body = await http(broker, "GET", "/v1/models")
        assert msgspec.json.decode(body)["models"] == []
        # Deleted: ownership is gone too, so a rival publisher may start the model afresh.
        async with client(broker, zmq_ctx, "rival") as rival:
            assert (await rival.publish(POLICY, 1, 0, 1, shard())).complete


async def test_http_admin_routes_need_the_admin_token(zmq_ctx, tmp_path: Path, caplog):
    admin_token, read_token = "a" * 20 + "admin-secret", "r" * 20 + "read-secret"
    (tmp_path / "admin").write_text(admin_token + "\n")
    (tmp_path / "read").write_text(read_token)
    config = broker_config(
        http_admin_token_file=str(tmp_path / "admin"), http_read_token_file=str(tmp_path / "read")
    )
    with caplog.at_level(logging.DEBUG):
        async with run_broker(config) as broker, client(broker, zmq_ctx, "trainer") as trainer:
            await trainer.publish(POLICY, 1, 0, 1, shard())
            retire = f"/v1/models/{POLICY}/versions/1/retire"
            answers = [
                await http(broker, "POST", retire),
                await http(broker, "POST", retire, "wrong-token-of-some-length"),
                await http(broker, "POST", retire, read_token),
                await http(broker, "DELETE", f"/v1/models/{POLICY}", read_token),
                await http(broker, "GET", "/v1/models"),
                await http(broker, "GET", "/v1/models", "wrong"),
            ]
            assert [status for status, _ in answers] == [401, 401, 401, 401, 401, 401]
            assert (await http(broker, "GET", "/healthz"))[0] == 200
            assert (await http(broker, "GET", "/v1/models", read_token))[0] == 200
            status, body = await http(broker, "POST", retire, admin_token)
            assert status == 200, body
            async with asyncio.timeout(5):
                assert (await trainer.retired.get()).version == 1
            status, body = await http(broker, "DELETE", f"/v1/models/{POLICY}", admin_token)
            assert status == 200, body
            answers.append((status, body))
    for _, body in answers:
        assert admin_token not in body
        assert read_token not in body
    assert admin_token not in caplog.text
    assert read_token not in caplog.text


async def test_http_admin_routes_are_off_without_a_token(broker: RunningBroker):
    status, body = await http(broker, "DELETE", f"/v1/models/{POLICY}", "anything-at-all-here")
    assert status == 403
    assert "--http-admin-token-file" in body


# secure by default


async def test_a_broker_off_loopback_without_keys_refuses_to_start():
    config = broker_config(endpoint="tcp://0.0.0.0:0", key_file=None, allowlist_file=None)
    with pytest.raises(AuthError, match=r"refusing to bind tcp://0\.0\.0\.0:0 without keys"):
        await serve(config)


def test_the_broker_command_refuses_off_loopback_without_keys(caplog):
    with caplog.at_level(logging.ERROR):
        code = main(["broker", "--endpoint", "tcp://0.0.0.0:0", "--http-port", "0"])
    assert code == 1
    assert "pass --key-file and --allowlist-file, or pass --insecure" in caplog.text


def test_keys_new_writes_a_pair_and_an_allowlist_entry(tmp_path: Path, capsys):
    assert main(["keys", "new", "--name", "trainer-7", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    entry = printed[printed.index("[[key]]") :]
    (tmp_path / "allowlist.toml").write_text(entry)
    [principal] = Allowlist.load(tmp_path / "allowlist.toml").by_key.values()
    assert principal.name == "trainer-7"
    assert (tmp_path / "trainer-7.key_secret").stat().st_mode & 0o077 == 0


async def test_an_insecure_broker_says_so(caplog):
    config = broker_config(
        endpoint="tcp://0.0.0.0:0", key_file=None, allowlist_file=None, insecure=True
    )
    with caplog.at_level(logging.WARNING):
        async with run_broker(config) as broker:
            _, health = await http(broker, "GET", "/healthz")
            _, metrics = await http(broker, "GET", "/metrics")
    assert msgspec.json.decode(health)["security"] == "insecure"
    assert "weightstream_broker_insecure 1" in metrics
    assert "broker is INSECURE" in caplog.text


async def test_a_loopback_broker_without_keys_still_works(zmq_ctx):
    async with run_broker(broker_config(key_file=None, allowlist_file=None)) as broker:
        async with client(broker, zmq_ctx, None) as anyone:
            assert (await anyone.publish(POLICY, 1, 0, 1, shard())).complete
        _, health = await http(broker, "GET", "/healthz")
    assert msgspec.json.decode(health)["security"] == "loopback"


async def test_a_client_that_stops_hearing_the_broker_says_it_is_cut_off(zmq_ctx, caplog):
    async with contextlib.AsyncExitStack() as stack:
        broker = await stack.enter_async_context(run_broker(broker_config()))
        config = broker.client_config(request_timeout_s=1.0)
        async with connect(config, role="subscriber", context=zmq_ctx) as engine:
            assert engine.cut_off is None
            await stack.aclose()  # the broker goes away; the client does not know why
            with caplog.at_level(logging.WARNING):
                await until(lambda: engine.cut_off is not None, timeout_s=10)
    assert "cut off from the broker" in caplog.text


# keys and the allowlist


def test_keys_and_allowlist_files_are_validated(tmp_path: Path):
    public, secret = create_keys("alice", tmp_path)
    assert secret.stat().st_mode & 0o077 == 0
    with pytest.raises(AuthError, match="exists"):
        create_keys("alice", tmp_path)
    key = load_public_key(public).decode()
    good = f'[[key]]\nname = "alice"\npublic_key = "{key}"\npublish = ["policy"]\n'
    (tmp_path / "ok.toml").write_text(good)
    allowlist = Allowlist.load(tmp_path / "ok.toml")
    assert allowlist.by_name["alice"].may_publish("policy")
    assert not allowlist.by_name["alice"].may_subscribe("policy")
    for bad, error in [
        (good + good, "appears twice"),
        (good.replace(key, "~" * 40), "bad allowlist"),
        (good.replace(key, key[:39]), "bad allowlist"),
        (good + "role = 'god'\n", "bad allowlist"),
        ("[[key]\n", "not valid TOML"),
    ]:
        (tmp_path / "bad.toml").write_text(bad)
        with pytest.raises(AuthError, match=error):
            Allowlist.load(tmp_path / "bad.toml")


@pytest.mark.parametrize(
    ("endpoint", "loopback"),
    [
        ("tcp://127.0.0.1:5555", True),
        ("tcp://localhost:0", True),
        ("tcp://[::1]:5555", True),
        ("ipc://@x", True),
        ("tcp://0.0.0.0:5555", False),
        ("tcp://*:5555", False),
        ("tcp://10.0.0.5:5555", False),
    ],
)
def test_loopback_endpoints(endpoint: str, loopback: bool):
    assert is_loopback(endpoint) is loopback


# the ZeroMQ bulk transport


@pytest.mark.parametrize("encrypt", [False, True])
def test_the_zmq_bulk_transport_moves_the_bytes_with_and_without_curve(encrypt: bool):
    import ctypes

    source = (ctypes.c_char * 4096).from_buffer_copy(bytes(range(256)) * 16)
    target = (ctypes.c_char * 4096)()
    sender = ZmqFrameSender(encrypt=encrypt)
    receiver = ZmqFrameReceiver(timeout_s=5)
    try:
        [locator] = sender.expose([Region(ctypes.addressof(source), 4096)])
        assert isinstance(locator, FrameLocator)
        assert bool(locator.server_key) is encrypt
        receiver.fetch([Fetch(locator, 0, 4096, ctypes.addressof(target))])
        assert bytes(target) == bytes(source)
    finally:
        receiver.close()
        sender.close()


def test_an_encrypted_read_needs_the_senders_own_key():
    # Someone else's server key in the locator (a forged manifest, a spoofed endpoint): the
    # CURVE handshake cannot complete, so no byte is read and the fetch fails at its deadline.
    import ctypes

    source = (ctypes.c_char * 4096)()
    target = (ctypes.c_char * 4096)()
    sender = ZmqFrameSender(encrypt=True)
    receiver = ZmqFrameReceiver(timeout_s=1)
    try:
        [locator] = sender.expose([Region(ctypes.addressof(source), 4096)])
        assert isinstance(locator, FrameLocator)
        forged = msgspec.structs.replace(locator, server_key=zmq.curve_keypair()[0].decode("ascii"))
        with pytest.raises(TransportError, match="no reply"):
            receiver.fetch([Fetch(forged, 0, 4096, ctypes.addressof(target))])
        receiver.fetch([Fetch(locator, 0, 4096, ctypes.addressof(target))])
    finally:
        receiver.close()
        sender.close()
