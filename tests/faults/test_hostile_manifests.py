"""Hostile manifests against real processes (issue 7, point 3): refused, never applied.

A raw DEALER peer sends every manifest of issue 7 that used to be accepted (or to crash a
subscriber) to a real broker, which refuses each with a typed `Error` naming the field, while
three running subscribers stay on their version with the right bytes, a late joiner gets it,
and the next good version reaches all of them. A broker with very loose limits shows the
subscriber's own validator: `weightstream subscribe` refuses a 2^50-byte first manifest (and,
later, a 10^12-byte one) before it allocates anything, reports it, and applies the next good
version bit for bit. A second trainer job cannot slip a shard into another job's version.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import msgspec
import pytest
import zmq.asyncio

from schemas.manifest import ShmLocator, TensorSpec
from schemas.messages import Error, Published
from tests.e2e.procs import (
    Fleet,
    assert_dump_equals,
    file_exists,
    get_json,
    publish_args,
    start_broker,
    subscribe_args,
    subscribers_at,
    wait_for,
)
from tests.faults.hostile import RawPeer, good_shard, replace_at

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

SIZE = 2_000_000


def _publish_args(broker: str, versions: str, *extra: str) -> list[str]:
    # The job comes from `extra` or the environment (the rival-job test sets it per process).
    return [
        *publish_args(broker, size=SIZE, versions=versions, transport="zmq", job=None),
        *extra,
    ]


def _subscribe_args(broker: str, dump: Path) -> list[str]:
    return subscribe_args(broker, dump, transport="zmq")


async def _wait_dump(fleet: Fleet, dump: Path, version: int) -> None:
    path = dump / f"v{version}.safetensors"
    await wait_for(partial(file_exists, path), timeout_s=60, what=str(path), fleet=fleet)


def _hostile_shards() -> dict[str, tuple[object, str, str]]:
    """case -> (shard, error code, what the detail must say)."""
    good = good_shard()
    t, b, r = good.tensors, good.buckets, good.regions

    def locator(bad: object) -> object:
        return msgspec.structs.replace(good, regions=replace_at(r, 0, locators=(bad,)))

    endpoint = msgspec.structs.replace(r[0].locators[0], endpoint="not-an-endpoint")
    return {
        "no buckets": (
            msgspec.structs.replace(good, buckets=()),
            "invalid_manifest",
            "shard.tensors[0]: bytes 0..16 of region 0 are not all inside buckets",
        ),
        "misaligned offset": (
            msgspec.structs.replace(good, tensors=replace_at(t, 1, offset=300)),
            "invalid_manifest",
            "shard.tensors[1].offset: 300 is not a multiple of the alignment 256",
        ),
        "tensor offset off by one": (
            msgspec.structs.replace(good, tensors=replace_at(t, 1, offset=257)),
            "invalid_manifest",
            "shard.tensors[1].offset: 257 is not a multiple",
        ),
        "2^50-byte region": (
            msgspec.structs.replace(good, regions=replace_at(r, 0, nbytes=2**50)),
            "invalid_manifest",
            "shard.regions[0].nbytes: 1125899906842624 bytes, more than the limit",
        ),
        "10^12-byte region": (
            msgspec.structs.replace(good, regions=replace_at(r, 0, nbytes=10**12)),
            "invalid_manifest",
            "shard.regions[0].nbytes: 1000000000000 bytes, more than the limit",
        ),
        "ShmLocator name with ../": (
            locator(ShmLocator(host="h", name="../../etc/passwd", nbytes=4096)),
            "invalid_manifest",
            "shard.regions[0].locators[0].name: '../../etc/passwd' is not a plain file name",
        ),
        "endpoint not-an-endpoint": (
            locator(endpoint),
            "invalid_manifest",
            "shard.regions[0].locators[0].endpoint: 'not-an-endpoint' is not of the form",
        ),
        "overlapping tensors": (
            msgspec.structs.replace(good, tensors=replace_at(t, 0, shape=(128,), nbytes=512)),
            "invalid_manifest",
            "shard.tensors[1].offset: bytes 256..272 of region 0 overlap tensors[0]",
        ),
        "10 MB tensor name": (
            msgspec.structs.replace(good, tensors=replace_at(t, 0, name="n" * 10_000_000)),
            "protocol",
            "Expected `str` of length <= 1024 - at `$.shard.tensors[0].name`",
        ),
        "10 MB checksum": (
            msgspec.structs.replace(good, buckets=replace_at(b, 0, checksum="0" * 10_000_000)),
            "protocol",
            "Expected `str` of length <= 128 - at `$.shard.buckets[0].checksum`",
        ),
    }


async def test_the_broker_refuses_every_hostile_manifest_and_keeps_serving(
    fleet: Fleet, tmp_path: Path, zmq_ctx: zmq.asyncio.Context, faults
):
    broker = await start_broker(fleet)
    await fleet.start("trainer-v1", *_publish_args(broker.endpoint, "1"))
    dumps = [tmp_path / f"sub{i}" for i in range(3)]
    for index, dump in enumerate(dumps):
        await fleet.start(f"sub{index}", *_subscribe_args(broker.endpoint, dump))
    for dump in dumps:
        await _wait_dump(fleet, dump, 1)

    hostile = RawPeer.connect(zmq_ctx, broker.endpoint, "manifests")
    try:
        await hostile.hello()
        for case, (shard, code, detail) in _hostile_shards().items():
            faults.inject(f"PublishShard v2 from a raw peer: {case}")
            reply = await hostile.publish(2, shard)  # type: ignore[arg-type]
            assert isinstance(reply, Error), (case, reply)
            assert reply.code == code, (case, reply)
            assert detail in reply.detail, (case, reply.detail)
            assert len(reply.detail) < 1000, case  # a 10 MB field is never echoed back
            assert broker.proc.process.returncode is None, fleet.logs()
    finally:
        hostile.close()

    # Nothing was announced: every subscriber is still on v1, bytes unchanged.
    model = await get_json(f"{broker.http}/v1/models/llama")
    assert model["latest"] == 1, model
    rows = (await get_json(f"{broker.http}/v1/subscribers"))["subscribers"]
    assert len(subscribers_at(rows, 1)) == 3, rows
    for dump in dumps:
        assert sorted(p.name for p in dump.glob("v*.safetensors")) == ["v1.safetensors"]
        assert_dump_equals(dump / "v1.safetensors", SIZE, 1)
        faults.applied(version=1, ok=True)

    # A late joiner gets v1; then the next good version reaches all four, bit for bit.
    late = tmp_path / "late"
    await fleet.start("late", *_subscribe_args(broker.endpoint, late))
    await _wait_dump(fleet, late, 1)
    assert_dump_equals(late / "v1.safetensors", SIZE, 1)
    faults.applied(version=1, ok=True)
    await fleet.start("trainer-v3", *_publish_args(broker.endpoint, "3"))
    for dump in [*dumps, late]:
        await _wait_dump(fleet, dump, 3)
        assert_dump_equals(dump / "v3.safetensors", SIZE, 3)
        faults.applied(version=3, ok=True)
    assert all(p.process.returncode is None for p in fleet.procs), fleet.logs()


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


async def test_the_subscriber_refuses_what_a_loose_broker_accepts_before_allocating(
    fleet: Fleet, tmp_path: Path, zmq_ctx: zmq.asyncio.Context, faults
):
    config = tmp_path / "loose.toml"
    config.write_text(
        "[manifest_limits]\nmax_region_bytes = 4611686018427387904\n"
        "max_total_bytes = 4611686018427387904\n"
    )
    broker = await start_broker(fleet, "--config", str(config))
    dump = tmp_path / "sub"
    sub = await fleet.start("sub", *_subscribe_args(broker.endpoint, dump))

    async def subscribed():
        rows = (await get_json(f"{broker.http}/v1/subscribers"))["subscribers"]
        return rows if rows else None

    await wait_for(subscribed, timeout_s=60, what="the subscriber's hello", fleet=fleet)
    rss_before = _rss_bytes(sub.process.pid)

    hostile = RawPeer.connect(zmq_ctx, broker.endpoint, "loose")
    try:
        await hostile.hello()
        # First manifest: one 2^50-byte tensor (what `weightstream subscribe` used to allocate
        # at once); later, a 10^12-byte region (what a running subscriber used to stage).
        huge_tensor = TensorSpec(
            name="a", dtype="float32", shape=(2**48,), region=0, offset=0, nbytes=2**50
        )
        first = good_shard(region_bytes=2**50)
        first = msgspec.structs.replace(
            first,
            tensors=(huge_tensor,),
            buckets=replace_at(first.buckets, 0, nbytes=2**50),
        )
        for version, nbytes, shard in (
            (1, 2**50, first),
            (3, 10**12, good_shard(region_bytes=10**12)),
        ):
            if version == 3:
                await fleet.start("trainer-v2", *_publish_args(broker.endpoint, "2"))
                await _wait_dump(fleet, dump, 2)
                assert_dump_equals(dump / "v2.safetensors", SIZE, 2)
                faults.applied(version=2, ok=True)
            faults.inject(f"a {nbytes}-byte region through a loose broker, as version {version}")
            await hostile.hello()
            reply = await hostile.publish(version, shard)
            assert isinstance(reply, Published), reply
            assert reply.complete, reply

            async def refused(version: int = version):
                rows = (await get_json(f"{broker.http}/v1/subscribers"))["subscribers"]
                error = rows[0]["last_error"] or ""
                return error if error.startswith(f"version {version}: InvalidManifest") else None

            error = await wait_for(refused, timeout_s=30, what=f"v{version} refused", fleet=fleet)
            assert f"regions[0].nbytes: {nbytes} bytes, more than the limit" in error, error
            assert sub.process.returncode is None, sub.tail()
            faults.bounded(
                f"subscriber RSS growth after a {nbytes}-byte manifest",
                value=_rss_bytes(sub.process.pid) - rss_before,
                bound=256 << 20,
            )
    finally:
        hostile.close()

    # Still on v2 with v2's bytes, never v1 or v3; the next good version applies bit for bit.
    assert sorted(p.name for p in dump.glob("v*.safetensors")) == ["v2.safetensors"]
    await fleet.start("trainer-v4", *_publish_args(broker.endpoint, "4"))
    await _wait_dump(fleet, dump, 4)
    assert_dump_equals(dump / "v4.safetensors", SIZE, 4)
    faults.applied(version=4, ok=True)
    assert sorted(p.name for p in dump.glob("v*.safetensors")) == [
        "v2.safetensors",
        "v4.safetensors",
    ]


async def test_a_rival_job_cannot_add_a_shard_to_another_jobs_version(
    fleet: Fleet, tmp_path: Path, zmq_ctx: zmq.asyncio.Context, faults
):
    """Issue 7 point 2: a second trainer's rank 0 used to replace the first's shard."""
    broker = await start_broker(fleet)
    dump = tmp_path / "sub"
    await fleet.start("sub", *_subscribe_args(broker.endpoint, dump))
    # Rank 1 of job A waits for its rank 0 (which the test plays last, after the rival).
    job_a = ("env", "WEIGHTSTREAM_JOB=A")  # the CLI's default for --job
    await fleet.start(
        "job-a-rank1",
        *_publish_args(broker.endpoint, "1", "--rank", "1", "--world-size", "2"),
        prefix=job_a,
    )

    rank1_log = fleet.procs[-1]

    async def rank1_published():
        return "published model=llama version=1 rank=1/2" in rank1_log.tail(50)

    await wait_for(rank1_published, timeout_s=60, what="job A rank 1's shard", fleet=fleet)

    rival = RawPeer.connect(zmq_ctx, broker.endpoint, "rival")
    try:
        await rival.hello()
        faults.inject("rank 0 of another job publishes the same model and version")
        reply = await rival.publish(1, good_shard(), rank=0, world_size=2, job="B")
        assert isinstance(reply, Error), reply
        assert reply.code == "job_conflict", reply
        assert "job 'A'" in reply.detail, reply.detail
        assert "not job 'B'" in reply.detail, reply.detail
        assert "(first shard from peer publisher-" in reply.detail, reply.detail
    finally:
        rival.close()

    await fleet.start(
        "job-a-rank0",
        *_publish_args(broker.endpoint, "1", "--rank", "0", "--world-size", "2"),
        prefix=job_a,
    )
    await _wait_dump(fleet, dump, 1)
    assert_dump_equals(dump / "v1.safetensors", SIZE, 1)
    faults.applied(version=1, ok=True)
