"""The broker's registry, driven directly: no sockets, the clock passed in."""

from __future__ import annotations

import pytest

from schemas.manifest import BucketSpec, FrameLocator, RegionSpec, Shard, TensorSpec
from schemas.messages import Announced, AppliedReached, Retire
from streamer.errors import BrokerError, VersionUnavailable
from streamer.registry import Outbox, Registry

MODEL = "org/model"


def shard(*names: str, rank: int = 0) -> Shard:
    """One 1 KiB region holding each named tensor (16 bytes at 256-byte steps), one bucket."""
    return Shard(
        regions=(
            RegionSpec(
                nbytes=1024,
                locators=(FrameLocator(endpoint="tcp://127.0.0.1:1", key=f"r{rank}"),),
                rank=rank,
            ),
        ),
        tensors=tuple(
            TensorSpec(name=n, dtype="float32", shape=(4,), region=0, offset=256 * i, nbytes=16)
            for i, n in enumerate(names)
        ),
        buckets=(BucketSpec(region=0, offset=0, nbytes=1024, checksum="0" * 32),),
    )


def registry(**kwargs: float) -> Registry:
    reg = Registry(**kwargs)  # type: ignore[arg-type]
    reg.hello("pub", "publisher", "host", 1, now=0.0)
    reg.hello("sub", "subscriber", "host", 2, now=0.0)
    return reg


def publish(reg: Registry, version: int, *, now: float = 0.0, peer: str = "pub") -> Outbox:
    announced, out = reg.publish(peer, MODEL, version, 0, 1, shard("w"), now)
    assert announced
    return out


def retired(out: Outbox) -> list[tuple[str, int]]:
    return [(peer, m.version) for peer, m in out if isinstance(m, Retire)]


def readable(reg: Registry) -> list[int]:
    return sorted(v for v, r in reg.models[MODEL].versions.items() if not r.retiring)


def test_only_the_last_retention_versions_stay_readable() -> None:
    reg = registry(retention=2)
    outs = [publish(reg, v) for v in (1, 2, 3, 4)]

    assert readable(reg) == [3, 4]
    assert sorted(reg.models[MODEL].versions) == [3, 4]
    assert [retired(out) for out in outs] == [[], [], [("pub", 1)], [("pub", 2)]]
    assert reg.models[MODEL].latest == 4


def test_a_lease_holds_a_version_past_the_retention_window_until_released() -> None:
    reg = registry(retention=1)
    publish(reg, 1)
    reg.acquire_lease("sub", MODEL, 1, now=0.0)

    assert retired(publish(reg, 2)) == []
    record = reg.models[MODEL].versions[1]
    assert record.retiring
    with pytest.raises(VersionUnavailable, match="latest is 2"):
        reg.acquire_lease("other", MODEL, 1, now=0.0)  # retiring: no new leases

    assert retired(reg.release_lease("sub", MODEL, 1, now=1.0)) == [("pub", 1)]
    assert 1 not in reg.models[MODEL].versions


def test_a_lease_not_renewed_expires_and_the_version_retires() -> None:
    reg = registry(retention=1, lease_ttl_s=1.0, peer_timeout_s=100.0)
    publish(reg, 1)
    assert reg.acquire_lease("sub", MODEL, 1, now=0.0) == 1.0
    publish(reg, 2)

    assert retired(reg.expire(now=0.5)) == []
    assert retired(reg.expire(now=1.5)) == [("pub", 1)]
    assert not reg.peers["sub"].gone


def test_any_message_from_the_holder_renews_its_lease() -> None:
    reg = registry(retention=1, lease_ttl_s=1.0, peer_timeout_s=100.0)
    publish(reg, 1)
    reg.acquire_lease("sub", MODEL, 1, now=0.0)
    publish(reg, 2)

    reg.touch("sub", now=0.9)
    assert retired(reg.expire(now=1.5)) == []
    assert retired(reg.expire(now=2.0)) == [("pub", 1)]


def test_a_silent_peer_is_marked_gone_and_loses_its_leases() -> None:
    reg = registry(retention=1, lease_ttl_s=100.0, peer_timeout_s=1.0)
    publish(reg, 1)
    reg.acquire_lease("sub", MODEL, 1, now=0.0)
    publish(reg, 2)
    reg.touch("pub", now=1.5)

    assert retired(reg.expire(now=2.0)) == [("pub", 1)]
    assert reg.peers["sub"].gone
    assert not reg.known("sub")
    assert reg.known("pub")


def test_goodbye_drops_the_peers_leases() -> None:
    reg = registry(retention=1)
    publish(reg, 1)
    reg.acquire_lease("sub", MODEL, 1, now=0.0)
    publish(reg, 2)

    assert retired(reg.goodbye("sub", now=0.0)) == [("pub", 1)]
    assert not reg.known("sub")


@pytest.mark.parametrize("version", [1, 3])
def test_a_version_not_above_the_latest_is_rejected_as_stale(version: int) -> None:
    reg = registry()
    publish(reg, 3)
    with pytest.raises(BrokerError, match="already at version 3") as raised:
        reg.publish("pub", MODEL, version, 0, 1, shard("w"), now=0.0)
    assert raised.value.code == "stale_version"


def test_lease_on_an_unknown_model_or_version_is_unavailable() -> None:
    reg = registry()
    publish(reg, 1)
    with pytest.raises(VersionUnavailable) as raised:
        reg.acquire_lease("sub", MODEL, 7, now=0.0)
    assert raised.value.code == "version_unavailable"
    with pytest.raises(VersionUnavailable, match="latest is None"):
        reg.acquire_lease("sub", "nope", 1, now=0.0)


def test_a_multi_rank_version_is_announced_only_once_every_rank_is_in() -> None:
    reg = registry()
    reg.hello("pub1", "publisher", "host", 3, now=0.0)
    reg.subscribe("sub", MODEL)

    announced, out = reg.publish("pub", MODEL, 1, 1, 2, shard("b", rank=1), now=0.0)
    assert (announced, out) == (False, [])
    assert reg.subscribe("sub", MODEL) is None  # nothing readable yet

    announced, out = reg.publish("pub1", MODEL, 1, 0, 2, shard("a"), now=0.0)
    assert announced
    [(peer, message)] = out
    assert peer == "sub"
    assert isinstance(message, Announced)
    manifest = reg.models[MODEL].versions[1].manifest
    assert message.digest == reg.models[MODEL].versions[1].digest
    assert manifest.world_size == 2
    # Rank order, not arrival order: rank 0's region first.
    assert [(t.name, t.region) for t in manifest.tensors] == [("a", 0), ("b", 1)]
    assert reg.models[MODEL].versions[1].publishers == {"pub", "pub1"}


def test_shards_of_one_version_must_agree_on_world_size() -> None:
    reg = registry()
    reg.publish("pub", MODEL, 1, 0, 2, shard("a"), now=0.0)
    with pytest.raises(BrokerError, match="being published by 2 ranks, not 3") as raised:
        reg.publish("pub", MODEL, 1, 1, 3, shard("b", rank=1), now=0.0)
    assert raised.value.code == "bad_request"


def test_a_rank_outside_the_world_is_a_bad_request() -> None:
    with pytest.raises(BrokerError, match="rank 2 is not below world_size 2"):
        registry().publish("pub", MODEL, 1, 2, 2, shard("a"), now=0.0)


def test_a_shard_with_ranges_outside_its_regions_is_an_invalid_manifest() -> None:
    bad = shard("a")
    bucket = BucketSpec(0, 768, 512, "0" * 32)
    bad = Shard(regions=bad.regions, tensors=bad.tensors, buckets=(bucket,))
    with pytest.raises(
        BrokerError, match=r"shard\.buckets\[0\]\.nbytes: .* past region 0"
    ) as raised:
        registry().publish("pub", MODEL, 1, 0, 1, bad, now=0.0)
    assert raised.value.code == "invalid_manifest"
    assert MODEL not in registry().models


def test_a_shard_past_the_configured_limits_is_an_invalid_manifest() -> None:
    from schemas.validate import ManifestLimits

    reg = registry(manifest_limits=ManifestLimits(max_region_bytes=512))  # type: ignore[arg-type]
    with pytest.raises(BrokerError, match=r"shard\.regions\[0\]\.nbytes: 1024 bytes") as raised:
        reg.publish("pub", MODEL, 1, 0, 1, shard("a"), now=0.0)
    assert raised.value.code == "invalid_manifest"


def test_a_shard_from_another_job_is_refused_naming_the_owner() -> None:
    reg = registry()
    reg.hello("rival", "publisher", "host", 5, now=0.0)
    reg.publish("pub", MODEL, 1, 0, 2, shard("a"), now=0.0, job="job-a")

    with pytest.raises(BrokerError, match=r"job 'job-a' .*peer pub.*not job 'job-b'") as raised:
        reg.publish("rival", MODEL, 1, 1, 2, shard("b", rank=1), now=0.0, job="job-b")
    assert raised.value.code == "job_conflict"
    with pytest.raises(BrokerError, match="job 'job-a'"):
        reg.publish("rival", MODEL, 1, 0, 2, shard("a"), now=0.0, job="job-b")

    announced, _ = reg.publish("pub", MODEL, 1, 1, 2, shard("b", rank=1), now=0.0, job="job-a")
    assert announced
    manifest = reg.models[MODEL].versions[1].manifest
    assert [t.name for t in manifest.tensors] == ["a", "b"]


def test_two_ranks_publishing_one_tensor_name_is_a_bad_request() -> None:
    reg = registry()
    reg.publish("pub", MODEL, 1, 0, 2, shard("a"), now=0.0)
    with pytest.raises(BrokerError, match="published by two ranks"):
        reg.publish("pub", MODEL, 1, 1, 2, shard("a", rank=1), now=0.0)


def test_an_incomplete_older_version_is_retired_when_a_newer_one_is_announced() -> None:
    reg = registry()
    reg.hello("straggler", "publisher", "host", 4, now=0.0)
    reg.publish("straggler", MODEL, 1, 0, 2, shard("a"), now=0.0)

    out = publish(reg, 2)

    assert ("straggler", 1) in retired(out)
    assert 1 not in reg.models[MODEL].pending


def test_announcements_reach_subscribers_only() -> None:
    reg = registry()
    reg.hello("sub2", "subscriber", "host", 5, now=0.0)
    reg.subscribe("sub", MODEL)
    reg.subscribe("sub2", "other-model")

    out = publish(reg, 1)

    assert [peer for peer, m in out if isinstance(m, Announced)] == ["sub"]
    assert reg.subscribe("sub2", MODEL) is not None  # a late joiner gets the latest at once


def test_wait_applied_wakes_once_enough_subscribers_reach_the_version() -> None:
    reg = registry()
    reg.hello("sub2", "subscriber", "host", 5, now=0.0)
    publish(reg, 1)
    publish(reg, 2)

    assert reg.wait_applied("pub", 9, MODEL, 2, 2, now=0.0) == []
    assert reg.applied("sub", MODEL, 2, 0.1, 0.01, now=1.0) == []
    # A publisher reporting Applied does not count as a subscriber.
    assert reg.applied("pub", MODEL, 2, 0.1, 0.01, now=1.0) == []
    # A newer version counts as having reached the older one.
    out = reg.applied("sub2", MODEL, 3, 0.1, 0.01, now=1.0)
    assert out == [("pub", AppliedReached(request_id=9, model=MODEL, version=2, num_subscribers=2))]
    assert reg.applied("sub", MODEL, 3, 0.1, 0.01, now=1.0) == []  # woken once only


def test_wait_applied_answers_at_once_when_already_reached() -> None:
    reg = registry()
    publish(reg, 1)
    reg.applied("sub", MODEL, 1, 0.1, 0.01, now=1.0)
    [(peer, reached)] = reg.wait_applied("pub", 4, MODEL, 1, 1, now=0.0)
    assert peer == "pub"
    assert reached == AppliedReached(request_id=4, model=MODEL, version=1, num_subscribers=1)


def test_gone_subscribers_do_not_count_and_gone_waiters_are_forgotten() -> None:
    reg = registry()
    reg.hello("sub2", "subscriber", "host", 5, now=0.0)
    reg.hello("waiter", "observer", "host", 6, now=0.0)
    publish(reg, 1)
    reg.applied("sub", MODEL, 1, 0.1, 0.01, now=1.0)
    reg.goodbye("sub", now=1.0)
    assert reg.count_applied(MODEL, 1) == 0

    reg.wait_applied("waiter", 1, MODEL, 1, 1, now=0.0)
    reg.goodbye("waiter", now=1.0)
    assert reg.applied("sub2", MODEL, 1, 0.1, 0.01, now=1.0) == []


def test_an_older_applied_report_does_not_move_a_subscriber_back() -> None:
    reg = registry()
    reg.applied("sub", MODEL, 5, 0.1, 0.01, now=1.0)
    reg.applied("sub", MODEL, 4, 0.1, 0.01, now=2.0)
    assert reg.peers["sub"].applied[MODEL] == 5


def test_applied_clears_progress_and_the_last_error() -> None:
    reg = registry()
    reg.subscribe("sub", MODEL)
    reg.progress("sub", MODEL, 2, 10, 100, 5.0)
    reg.pull_failed("sub", MODEL, 2, "TransportError: gone")
    assert reg.peers["sub"].last_error[MODEL] == "version 2: TransportError: gone"
    assert MODEL not in reg.peers["sub"].progress

    reg.progress("sub", MODEL, 3, 10, 100, 5.0)
    reg.applied("sub", MODEL, 3, 0.1, 0.01, now=1.0)
    assert MODEL not in reg.peers["sub"].progress
    assert MODEL not in reg.peers["sub"].last_error


def test_a_reconnecting_peer_keeps_what_it_applied_and_its_leases() -> None:
    reg = registry()
    publish(reg, 1)
    reg.applied("sub", MODEL, 1, 0.1, 0.01, now=1.0)
    reg.acquire_lease("sub", MODEL, 1, now=1.0)

    reg.hello("sub", "subscriber", "host", 2, now=2.0)

    assert reg.peers["sub"].applied == {MODEL: 1}
    # It may be reading version 1 right now: a reconnect is no reason to let it retire.
    assert reg.models[MODEL].versions[1].leases == {"sub": 31.0}


def test_snapshot_and_restore_round_trip_versions_history_and_publishers() -> None:
    reg = registry(retention=2)
    reg.hello("pub1", "publisher", "host", 3, now=0.0)
    for v in (1, 2):
        publish(reg, v, now=float(v))
    reg.publish("pub", MODEL, 3, 0, 2, shard("a"), now=3.0)
    reg.publish("pub1", MODEL, 3, 1, 2, shard("b", rank=1), now=3.0)
    publish(reg, 4, peer="pub1", now=4.0)
    dirty_before = reg.dirty
    data = reg.snapshot()
    assert (dirty_before, reg.dirty) == (True, False)
    restored = Registry(retention=2)
    restored.restore(data, now=100.0)

    model = restored.models[MODEL]
    assert model.latest == 4
    assert sorted(model.versions) == [3, 4]
    assert model.versions[3].manifest == reg.models[MODEL].versions[3].manifest
    assert model.versions[3].publishers == {"pub", "pub1"}
    assert model.versions[3].announced_at == 3.0
    assert model.history == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]
    assert not restored.dirty

    # The restored registry behaves like the old one: stale versions are refused, and when
    # version 3 retires its Retire goes to both publishers that were restored with it.
    with pytest.raises(BrokerError, match="already at version 4"):
        restored.publish("pub", MODEL, 4, 0, 1, shard("w"), now=101.0)
    restored.hello("pub", "publisher", "host", 1, now=101.0)
    _, out = restored.publish("pub", MODEL, 5, 0, 1, shard("w"), now=101.0)
    assert sorted(retired(out)) == [("pub", 3), ("pub1", 3)]


def test_snapshot_keeps_a_leased_retiring_version_until_its_lease_lapses() -> None:
    reg = registry(retention=1, lease_ttl_s=30.0)
    publish(reg, 1)
    reg.acquire_lease("sub", MODEL, 1, now=0.0)
    publish(reg, 2)
    assert reg.models[MODEL].versions[1].retiring

    restored = Registry(retention=1, lease_ttl_s=30.0, peer_timeout_s=10.0)
    restored.restore(reg.snapshot(), now=5.0)
    record = restored.models[MODEL].versions[1]
    assert (record.retiring, record.leases) == (True, {"sub": 30.0})
    restored.hello("pub", "publisher", "host", 1, now=29.0)
    assert retired(restored.expire(now=29.0)) == []
    assert retired(restored.expire(now=31.0)) == [("pub", 1)]


def test_restore_of_version_zero_makes_it_the_latest() -> None:
    reg = registry()
    publish(reg, 0)
    restored = Registry()
    restored.restore(reg.snapshot())
    assert restored.models[MODEL].latest == 0


def test_retention_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="retention"):
        Registry(retention=0)


def test_heartbeat_restores_applied_versions_and_wakes_waiters_after_a_restart():
    registry = Registry(retention=2)
    registry.hello("trainer", "publisher", "h", 1, now=0.0)
    registry.hello("sub", "subscriber", "h", 2, now=0.0)
    # A restarted broker knows nothing of what "sub" runs until it says so.
    assert registry.wait_applied("trainer", 7, "m", 3, 1, now=0.0) == []
    assert registry.heartbeat("sub", {"m": 2}, now=1.0) == []
    out = registry.heartbeat("sub", {"m": 3}, now=2.0)
    assert [(peer, type(message).__name__) for peer, message in out] == [
        ("trainer", "AppliedReached")
    ]
    assert registry.peers["sub"].applied == {"m": 3}
    assert registry.heartbeat("sub", {"m": 1}, now=3.0) == []  # never backwards
    assert registry.peers["sub"].applied == {"m": 3}
