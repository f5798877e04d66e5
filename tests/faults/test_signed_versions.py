"""Signed versions against a broker that announces anything: impostors and forged buckets.

A real broker process (no broker auth here: the broker is the party not trusted), trainers in
this test process, and a `weightstream subscribe --trust KEY` process that trusts only the real
trainer's key. What the broker announces is not what the engine applies: only versions that
verify under the trusted key, with buckets whose bytes match what the trainer signed.
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import TYPE_CHECKING

import aiohttp
import pytest
import torch
import zmq.asyncio
from safetensors.torch import load_file

from publishers.publisher import open_publisher
from publishers.sources import synthetic_llama
from streamer.checksum import C1, C2, GAMMA, bucket_digest
from streamer.signing_keys import new_signing_key
from streamer.transport import MooncakeSender, ZmqFrameSender
from tests.e2e.procs import Fleet, expected, file_exists, get_json, start_broker, wait_for
from weightstream.commands import shard_of

if TYPE_CHECKING:
    from pathlib import Path

    from tests.faults.ledger import Faults

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

SIZE = 2_000_000


def dump_matches(path: Path, version: int) -> bool:
    live = load_file(str(path))
    want = expected(SIZE, version)
    return set(live) == set(want) and all(torch.equal(live[n], t) for n, t in want.items())


async def last_error(http: str) -> str | None:
    rows = (await get_json(f"{http}/v1/subscribers"))["subscribers"]
    return rows[0]["last_error"] if rows and rows[0]["last_error"] else None


async def applied_version(http: str) -> int | None:
    rows = (await get_json(f"{http}/v1/subscribers"))["subscribers"]
    version: int | None = rows[0]["applied_version"]
    return version


async def pull_failures(http: str) -> int:
    timeout = aiohttp.ClientTimeout(total=5)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(f"{http}/metrics") as response,
    ):
        text = await response.text()
    line = next(x for x in text.splitlines() if x.startswith("weightstream_pull_failures_total "))
    return int(float(line.split()[1]))  # prometheus-client prints counters as floats


async def start_subscriber(fleet: Fleet, endpoint: str, dump: Path, *extra: str) -> None:
    await fleet.start(
        "sub",
        "subscribe",
        "--broker",
        endpoint,
        "--model",
        "llama",
        "--dump-dir",
        str(dump),
        "--dump-all",
        "--max-attempts",
        "2",
        *extra,
    )


async def wait_applied(fleet: Fleet, dump: Path, version: int) -> None:
    await wait_for(
        partial(file_exists, dump / f"v{version}.safetensors"),
        timeout_s=60,
        what=f"v{version} applied",
        fleet=fleet,
    )


async def test_an_impostors_versions_announced_by_the_broker_are_never_applied(
    fleet: Fleet, tmp_path: Path, faults: Faults
):
    real = new_signing_key(tmp_path / "trainer.key", job="run-7")
    impostor = new_signing_key(tmp_path / "impostor.key", job="run-7")  # claims the same job
    broker = await start_broker(fleet)
    dump = tmp_path / "sub"
    await start_subscriber(
        fleet,
        broker.endpoint,
        dump,
        "--transport",
        "mooncake",
        "--trust",
        str(tmp_path / "trainer.key.pub"),
    )
    config = broker.client_config()
    ctx = zmq.asyncio.Context()
    try:
        async with (
            open_publisher(
                config, model="llama", sender=MooncakeSender(), signing_key=real, context=ctx
            ) as trainer,
            open_publisher(
                config, model="llama", sender=MooncakeSender(), signing_key=impostor, context=ctx
            ) as attacker,
            open_publisher(config, model="llama", sender=MooncakeSender(), context=ctx) as unsigned,
        ):
            # The impostor comes first, with another model's shapes: the engine must not even
            # take its shapes (the subscriber shapes its tensors after the first trusted version).
            faults.inject("an impostor's version 1, signed by an untrusted key, announced first")
            await attacker.publish(1, synthetic_llama(2 * SIZE, version=1, seed=666))
            error = await wait_for(
                partial(last_error, broker.http), timeout_s=60, what="v1 refused", fleet=fleet
            )
            assert "UntrustedVersion" in error
            assert "llama version 1" in error
            assert impostor.key_id in error
            assert "--trust" in error
            assert await applied_version(broker.http) is None

            await trainer.publish(2, synthetic_llama(SIZE, version=2))
            await wait_applied(fleet, dump, 2)
            faults.applied(version=2, ok=dump_matches(dump / "v2.safetensors", 2))

            faults.inject("an impostor's version 3 announced while the engine runs version 2")
            await attacker.publish(3, synthetic_llama(SIZE, version=3, seed=666))

            async def refused(version: int) -> str | None:
                error = await last_error(broker.http)
                return error if error and f"llama version {version}" in error else None

            error = await wait_for(
                partial(refused, 3), timeout_s=60, what="v3 refused", fleet=fleet
            )
            assert impostor.key_id in error
            # Refused before a byte was pulled, and never retried: the state is final now.
            assert await applied_version(broker.http) == 2
            assert not (dump / "v3.safetensors").exists()  # every applied version is dumped

            faults.inject("an unsigned version 4 announced")
            await unsigned.publish(4, synthetic_llama(SIZE, version=4, seed=667))
            error = await wait_for(
                partial(refused, 4), timeout_s=60, what="v4 refused", fleet=fleet
            )
            assert "is not signed" in error
            assert await applied_version(broker.http) == 2
            # One report per refused version: a signature does not get better on a retry.
            assert await pull_failures(broker.http) == 3

            await trainer.publish(5, synthetic_llama(SIZE, version=5))
            await wait_applied(fleet, dump, 5)
            faults.applied(version=5, ok=dump_matches(dump / "v5.safetensors", 5))
            assert sorted(p.name for p in dump.glob("v*.safetensors")) == [
                "v2.safetensors",
                "v5.safetensors",
            ]
    finally:
        ctx.destroy(linger=0)


def forge_bucket(
    buffer: torch.Tensor, offset: int, nbytes: int, checksum: str, algorithm: str
) -> None:
    """Change bytes of the bucket at `offset` as an attacker on the path would: so that the
    fast digest still matches (it has no key, so anyone can).

    wmix128 sums m_i = mix(w_i + (i + 1) GAMMA) in two lanes, s1 = sum m_i and
    s2 = sum (i + 1) m_i, and mix is a bijection: adding +1, -2, +1 to three consecutive mixed
    words keeps both sums, and un-mixing gives the words that produce them.
    """
    assert algorithm == "wmix128", algorithm
    first = 4096 // 8  # word index inside the bucket
    words = buffer[offset + 4096 : offset + 4096 + 24].view(torch.int64)
    for k, delta in enumerate((1, -2, 1)):
        position = first + k + 1
        mixed = _mix((int(words[k]) + position * GAMMA) & _MASK)
        forged = (_unmix((mixed + delta) & _MASK) - position * GAMMA) & _MASK
        words[k] = forged - (1 << 64) if forged >= 1 << 63 else forged
    bucket = buffer[offset : offset + nbytes].numpy()
    assert bucket_digest(bucket.data) == checksum, "the forgery must pass the fast checksum"


_MASK = (1 << 64) - 1


def _mix(z: int) -> int:
    z ^= z >> 30
    z = z * C1 & _MASK
    z ^= z >> 27
    z = z * C2 & _MASK
    return z ^ (z >> 31)


def _unxorshift(z: int, shift: int) -> int:
    x = z
    for _ in range(64 // shift + 1):
        x = z ^ (x >> shift)
    return x


def _unmix(z: int) -> int:
    z = _unxorshift(z, 31)
    z = z * pow(C2, -1, 1 << 64) & _MASK
    z = _unxorshift(z, 27)
    z = z * pow(C1, -1, 1 << 64) & _MASK
    return _unxorshift(z, 30)


async def test_a_forged_bucket_matching_the_fast_checksum_is_refused_by_blake3(
    fleet: Fleet, tmp_path: Path, faults: Faults
):
    key = new_signing_key(tmp_path / "trainer.key", job="run-7")
    broker = await start_broker(fleet)
    dump = tmp_path / "sub"
    await start_subscriber(
        fleet,
        broker.endpoint,
        dump,
        "--transport",
        "zmq",
        "--trust",
        str(tmp_path / "trainer.key.pub"),
        "--require-digests",
    )
    config = broker.client_config()
    ctx = zmq.asyncio.Context()
    ranks = [
        open_publisher(
            config,
            model="llama",
            sender=ZmqFrameSender(host="127.0.0.1"),
            rank=rank,
            world_size=2,
            job="run-7",  # the job the signing key is for
            bucket_bytes=256 << 10,
            signing_key=key,
            secure_digests=True,
            context=ctx,
        )
        for rank in range(2)
    ]
    try:
        async with contextlib.AsyncExitStack() as stack:
            rank0, rank1 = [await stack.enter_async_context(rank) for rank in ranks]

            async def publish(version: int, *, forge: bool) -> None:
                tensors = synthetic_llama(SIZE, version=version)
                result = await rank0.publish(version, shard_of(tensors, 0, 2))
                if forge:
                    # After signing, before the announce (rank 1 is not in yet).
                    bucket = result.shard.buckets[0]
                    forge_bucket(
                        rank0.live[version].buffers[bucket.region],
                        bucket.offset,
                        bucket.nbytes,
                        bucket.checksum,
                        result.shard.checksum_algorithm,
                    )
                await rank1.publish(version, shard_of(tensors, 1, 2))

            await publish(1, forge=False)
            await wait_applied(fleet, dump, 1)
            faults.applied(version=1, ok=dump_matches(dump / "v1.safetensors", 1))

            faults.inject("a bucket of version 2 forged on the path, fast checksum kept")
            await publish(2, forge=True)
            error = await wait_for(
                partial(last_error, broker.http), timeout_s=60, what="v2 refused", fleet=fleet
            )
            assert "ChecksumMismatch" in error
            assert "version 2" in error
            assert "fails its blake3 digest twice" in error
            assert await applied_version(broker.http) == 1
            assert not (dump / "v2.safetensors").exists()

            await publish(3, forge=False)
            await wait_applied(fleet, dump, 3)
            faults.applied(version=3, ok=dump_matches(dump / "v3.safetensors", 3))
            assert not (dump / "v2.safetensors").exists()
    finally:
        ctx.destroy(linger=0)
