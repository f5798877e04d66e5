"""Attacks on the control plane, against a real broker process with CURVE keys and an allowlist.

The victim is a real engine (`weightstream subscribe --key-file engine.key_secret`, model
`policy`, dumping its live tensors after each swap); the trainer is this test process (key
`trainer`) publishing over the encrypted ZeroMQ bulk transport. Each attacker is a real socket
with a real key (or none): `mallory` (allowlisted, no rights), `stranger` (not allowlisted),
`engine` (a subscriber), `other` (publisher and subscriber of another model), `rival` (a
second publisher of policy), `peer` (rights on every model, not admin). After every attack the
engine's bytes are checked against the trainer's real versions.
"""

from __future__ import annotations

import asyncio
import contextlib
from functools import partial
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
import zmq
import zmq.asyncio

from publishers.publisher import open_publisher
from publishers.sources import synthetic_llama
from schemas.codec import decode_message, encode
from schemas.messages import Applied, Error, Hello, Subscribe, Welcome
from streamer.auth import AuthError, Forbidden
from streamer.client import connect
from streamer.config import ClientConfig
from streamer.errors import BrokerError
from streamer.transport.zmq_frames import ZmqFrameSender
from tests.e2e.procs import Fleet, assert_dump_equals, file_exists, get_json, start_broker, wait_for
from tests.support import test_keys

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from tests.e2e.procs import BrokerInfo, Proc
    from tests.faults.ledger import Faults

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

SIZE = 1_000_000
MODEL = "policy"


async def start_engine(fleet: Fleet, broker: BrokerInfo, name: str, dump: Path) -> Proc:
    return await fleet.start(
        name,
        "subscribe",
        "--broker",
        broker.endpoint,
        "--model",
        MODEL,
        "--transport",
        "zmq",
        "--dump-dir",
        str(dump),
        "--dump-all",
        *test_keys().args("engine"),
    )


async def applied(fleet: Fleet, faults: Faults, dump: Path, version: int) -> None:
    """Wait for the engine's dump of `version` and record whether its bytes are the trainer's."""
    path = dump / f"v{version}.safetensors"
    await wait_for(partial(file_exists, path), timeout_s=90, what=f"v{version}", fleet=fleet)
    try:
        assert_dump_equals(path, SIZE, version)
        ok = True
    except AssertionError:
        ok = False
    faults.applied(version=version, ok=ok, what=str(path))


@contextlib.asynccontextmanager
async def raw(
    ctx: zmq.asyncio.Context, endpoint: str, key: str, routing_id: str
) -> AsyncIterator[zmq.asyncio.Socket]:
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
    async with asyncio.timeout(10):
        return decode_message(await socket.recv())


async def test_foreign_keys_neither_publish_nor_pull_policy_and_the_engine_keeps_real_bytes(
    fleet: Fleet, tmp_path: Path, zmq_ctx, faults: Faults
):
    broker = await start_broker(fleet)
    dump = tmp_path / "engine"
    await start_engine(fleet, broker, "engine", dump)
    trainer_sender = ZmqFrameSender(encrypt=True)
    async with open_publisher(
        broker.client_config("trainer"), model=MODEL, sender=trainer_sender, context=zmq_ctx
    ) as trainer:
        first = await trainer.publish(1, synthetic_llama(SIZE, version=1))
        await applied(fleet, faults, dump, 1)

        # Keys that may not publish policy, each with bytes of its own ready to serve.
        evil = synthetic_llama(SIZE, version=2, seed=666)
        for key, what in [
            ("mallory", "an allowlisted key without rights"),
            ("engine", "the subscriber's own key"),
            ("other", "a publisher of another model"),
        ]:
            faults.inject(f"key {key!r} ({what}) publishes policy version 2")
            sender = ZmqFrameSender(encrypt=True)
            async with open_publisher(
                broker.client_config(key), model=MODEL, sender=sender, context=zmq_ctx
            ) as attacker:
                with pytest.raises(Forbidden, match="may not publish 'policy'"):
                    await attacker.publish(2, evil)
        for stranger in ("stranger", None):
            faults.inject(f"{'key stranger (not allowlisted)' if stranger else 'no key'} connects")
            config = (
                broker.client_config(stranger) if stranger else ClientConfig(broker=broker.endpoint)
            )
            with pytest.raises(AuthError):
                async with connect(config, role="publisher", context=zmq_ctx):
                    pytest.fail(f"{stranger} was admitted")

        faults.inject("key 'other' subscribes to policy and leases version 1 to pull it")
        async with connect(
            broker.client_config("other"), role="subscriber", context=zmq_ctx
        ) as other:
            with pytest.raises(Forbidden):
                await other.subscribe(MODEL)
            with pytest.raises(Forbidden):
                await other.acquire_lease(MODEL, 1)
            assert other.latest_manifest(MODEL) is None

        async with connect(
            broker.client_config("rival"), role="publisher", context=zmq_ctx
        ) as rival:
            faults.inject("key 'rival' (a publisher of policy) pre-claims version 2, world size 3")
            with pytest.raises(Forbidden, match="belongs to key 'trainer'"):
                await rival.publish(MODEL, 2, 0, 3, first.shard)
        faults.inject("the trainer's key publishes version 2^64-1")
        with pytest.raises(BrokerError, match=r"protocol: .*at `\$\.version`"):
            await trainer.publish(2**64 - 1, synthetic_llama(SIZE, version=1))
        faults.inject("the trainer's key jumps a million and one versions ahead")
        with pytest.raises(Forbidden, match="more than 1000000 past the latest"):
            await trainer.publish(1 + 1_000_001, synthetic_llama(SIZE, version=1))

        # The real trainer's next version goes through and the engine runs its bytes.
        await trainer.publish(2, synthetic_llama(SIZE, version=2))
        await applied(fleet, faults, dump, 2)
        assert sorted(p.name for p in dump.glob("v*.safetensors")) == [
            "v1.safetensors",
            "v2.safetensors",
        ]
        metrics = await text(f"{broker.http}/metrics")
        assert "weightstream_broker_forbidden_total 7" in metrics
        assert "weightstream_broker_insecure 0" in metrics
    trainer_sender.close()


async def test_fake_applied_and_a_stolen_routing_id_neither_count_nor_cut_the_engine_off(
    fleet: Fleet, tmp_path: Path, zmq_ctx, faults: Faults
):
    token = tmp_path / "admin-token"
    token.write_text("t0k3n-" + "x" * 30)
    broker = await start_broker(fleet, "--http-admin-token-file", str(token))
    dump = tmp_path / "engine"
    await start_engine(fleet, broker, "engine", dump)
    sender = ZmqFrameSender(encrypt=True)
    async with open_publisher(
        broker.client_config("trainer"), model=MODEL, sender=sender, context=zmq_ctx
    ) as trainer:
        await trainer.publish(1, synthetic_llama(SIZE, version=1))
        await applied(fleet, faults, dump, 1)

        # On-policy: wait for two engines while only one exists; fakes must not complete it.
        waiting = asyncio.create_task(trainer.wait_applied(1, 2))
        for key in ("other", "mallory"):
            faults.inject(f"key {key!r} (no subscriber of policy) reports policy v1 applied")
            async with raw(zmq_ctx, broker.endpoint, key, f"fake-{key}") as fake:
                await fake.send(encode(Hello(peer_id=f"fake-{key}", role="subscriber")))
                assert isinstance(await answer(fake), Welcome)
                await fake.send(encode(Applied(model=MODEL, version=1)))
                refused = await answer(fake)
            assert isinstance(refused, Error)
            assert refused.code == "forbidden"
        summary = await get_json(f"{broker.http}/v1/models/{MODEL}")
        assert summary["subscribers_at_latest"] == 1
        assert not waiting.done()

        # A stranger takes the engine's routing id (it is listed in /v1/subscribers).
        [row] = (await get_json(f"{broker.http}/v1/subscribers"))["subscribers"]
        victim_id = row["peer_id"]
        faults.inject(f"key 'peer' connects with the engine's routing id {victim_id!r}")
        async with raw(zmq_ctx, broker.endpoint, "peer", victim_id) as thief:
            await thief.send(encode(Hello(peer_id=victim_id, role="subscriber")))
            await thief.send(encode(Subscribe(request_id=1, model=MODEL)))
            # A second, real engine joins: now two engines have v1, and wait_applied returns.
            second = tmp_path / "second"
            await start_engine(fleet, broker, "second", second)
            await applied(fleet, faults, second, 1)
            async with asyncio.timeout(60):
                assert await waiting == 2
            # Every later version reaches the victim (and the second engine).
            for version in (2, 3, 4):
                await trainer.publish(version, synthetic_llama(SIZE, version=version))
                await applied(fleet, faults, dump, version)
                await applied(fleet, faults, second, version)
        engine_log = fleet.procs[1].log.read_text()
        assert "cut off" not in engine_log

        # HTTP admin: no token, a wrong one, then the right one.
        retire = f"{broker.http}/v1/models/{MODEL}/versions/3/retire"
        faults.inject("HTTP admin retire without a token, and with a wrong one")
        assert await status("POST", retire) == 401
        assert await status("POST", retire, "not-the-token-at-all-xxxxxxxx") == 401
        assert 3 in (await get_json(f"{broker.http}/v1/models/{MODEL}"))["readable_versions"]
        assert await status("POST", retire, token.read_text()) == 200

        # The admin command line: a non-admin key is refused, the admin key deletes the model.
        faults.inject("`weightstream admin delete` with a non-admin key")
        admin = ["admin", "delete", "--broker", broker.endpoint, "--model", MODEL]
        refused = await fleet.start("admin-peer", *admin, *test_keys().args("peer"))
        assert await refused.process.wait() == 1
        assert "forbidden: key 'peer' is not an admin" in refused.log.read_text()
        deleted = await fleet.start("admin", *admin, *test_keys().args("admin"))
        assert await deleted.process.wait() == 0, deleted.tail()
        models = (await get_json(f"{broker.http}/v1/models"))["models"]
        assert models == []
    sender.close()


async def status(method: str, url: str, token: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    timeout = aiohttp.ClientTimeout(total=10)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.request(method, url, headers=headers) as response,
    ):
        return response.status


async def text(url: str) -> str:
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as response:
        return await response.text()
