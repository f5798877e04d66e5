"""The registry's life cycle rules past the happy path: pending versions expire, shards and
leases survive a restart, unreadable versions are withdrawn, and every collection is bounded."""

from __future__ import annotations

import pytest

from schemas.messages import Announced, AppliedReached, Error, Retire, Withdraw
from streamer.errors import BrokerError
from streamer.http import fleet, model_summary
from streamer.registry import Limits, Outbox, Registry
from tests.streamer.test_registry import MODEL, publish, registry, retired, shard


def reasons(out: Outbox) -> list[tuple[str, int, str]]:
    return [(peer, m.version, m.reason) for peer, m in out if isinstance(m, Retire)]


def test_a_version_missing_a_rank_expires_and_its_publishers_are_told_which() -> None:
    reg = Registry(limits=Limits(pending_timeout_s=5.0), peer_timeout_s=100.0)
    reg.hello("rank0", "publisher", "host", 1, now=0.0)
    reg.publish("rank0", MODEL, 1, 0, 2, shard("a"), now=0.0)
    assert model_summary(reg, MODEL, 1.0)["pending"] == [
        {"version": 1, "world_size": 2, "ranks_in": [0], "missing_ranks": [1], "age_s": 1.0}
    ]

    assert reg.expire(now=5.0) == []
    [(peer, version, reason)] = reasons(reg.expire(now=5.1))

    assert (peer, version) == ("rank0", 1)
    assert "expired after 5 s: ranks [1] of 2 never published" in reason
    summary = model_summary(reg, MODEL, 6.0)
    assert summary["pending"] == []
    assert [(e["version"], e["missing_ranks"]) for e in summary["expired"]] == [(1, [1])]


def test_past_the_pending_cap_the_oldest_pending_version_is_dropped() -> None:
    reg = Registry(limits=Limits(pending_versions_per_model=2))
    reg.hello("rank0", "publisher", "host", 1, now=0.0)
    for version in (1, 2):
        _, out = reg.publish("rank0", MODEL, version, 0, 2, shard("a"), now=0.0)
        assert out == []

    _, out = reg.publish("rank0", MODEL, 3, 0, 2, shard("a"), now=0.0)

    [(peer, version, reason)] = reasons(out)
    assert (peer, version) == ("rank0", 1)
    assert "2 newer versions were already waiting" in reason
    assert sorted(reg.models[MODEL].pending) == [2, 3]


def test_a_half_published_version_survives_a_restart_and_completes() -> None:
    reg = registry()
    reg.publish("pub", MODEL, 1, 0, 2, shard("a"), now=0.0)
    restored = Registry()
    restored.restore(reg.snapshot(), now=10.0)
    restored.hello("pub1", "publisher", "host", 3, now=10.0)
    restored.hello("sub", "subscriber", "host", 2, now=10.0)
    restored.subscribe("sub", MODEL)

    announced, out = restored.publish("pub1", MODEL, 1, 1, 2, shard("b", rank=1), now=10.0)

    assert announced
    [(peer, message)] = out
    assert peer == "sub"
    assert isinstance(message, Announced)
    manifest = restored.models[MODEL].versions[1].manifest
    assert [t.name for t in manifest.tensors] == ["a", "b"]
    assert restored.models[MODEL].versions[1].publishers == {"pub", "pub1"}


def test_a_restored_lease_outlives_the_restart_long_enough_to_be_renewed() -> None:
    reg = registry(retention=1, lease_ttl_s=30.0)
    publish(reg, 1)
    reg.acquire_lease("sub", MODEL, 1, now=0.0)
    publish(reg, 2)
    restored = Registry(retention=1, lease_ttl_s=30.0, peer_timeout_s=10.0)
    # The broker was down longer than the lease: it still lives peer_timeout_s after restart.
    restored.restore(reg.snapshot(), now=100.0)
    assert restored.models[MODEL].versions[1].leases == {"sub": 110.0}
    restored.hello("pub", "publisher", "host", 1, now=100.0)
    restored.hello("sub", "subscriber", "host", 2, now=100.0)

    # The holder renews a lease it holds on a retiring version; nobody else may take one.
    assert restored.acquire_lease("sub", MODEL, 1, now=105.0) == 30.0
    restored.touch("pub", now=130.0)
    restored.touch("sub", now=130.0)
    assert retired(restored.expire(now=131.0)) == []
    assert retired(restored.release_lease("sub", MODEL, 1, now=132.0)) == [("pub", 1)]


def test_a_version_whose_publisher_is_gone_is_withdrawn_and_not_offered() -> None:
    reg = registry()
    reg.subscribe("sub", MODEL)
    publish(reg, 1)

    out = reg.goodbye("pub", now=1.0)

    withdrawn = [(peer, m) for peer, m in out if isinstance(m, Withdraw)]
    assert withdrawn == [("sub", Withdraw(model=MODEL, version=1, reason="publisher pub is gone"))]
    assert model_summary(reg, MODEL, 1.0)["withdrawn"][0]["version"] == 1
    reg.hello("late", "subscriber", "host", 9, now=2.0)
    assert reg.subscribe("late", MODEL) is None  # a late joiner waits for the next version


def test_a_restored_version_whose_publisher_never_returns_is_withdrawn_after_a_grace() -> None:
    reg = registry()
    publish(reg, 1)
    restored = Registry(peer_timeout_s=10.0)
    restored.restore(reg.snapshot(), now=100.0)
    restored.hello("sub", "subscriber", "host", 2, now=100.0)
    restored.subscribe("sub", MODEL)

    assert restored.expire(now=105.0) == []  # its publisher may still say hello again
    restored.touch("sub", now=111.0)
    out = restored.expire(now=111.0)

    assert [(p, type(m).__name__) for p, m in out] == [("sub", "Withdraw"), ("pub", "Retire")]
    assert restored.readable_latest(MODEL) is None
    assert restored.models[MODEL].latest == 1  # versions still only increase


def test_gone_peers_and_their_rows_leave_after_their_ttl() -> None:
    reg = Registry(limits=Limits(gone_peer_ttl_s=60.0), peer_timeout_s=100.0)
    reg.hello("sub", "subscriber", "host", 2, now=0.0)
    reg.subscribe("sub", MODEL)
    reg.goodbye("sub", now=1.0)
    assert [r.state for r in fleet(reg, 2.0)[1]] == ["gone"]

    reg.expire(now=61.5)

    assert "sub" not in reg.peers
    assert fleet(reg, 62.0) == (0, [])


def test_waiters_are_capped_per_peer_and_expire_with_an_error() -> None:
    reg = Registry(limits=Limits(waiters_per_peer=2, waiter_ttl_s=10.0), peer_timeout_s=100.0)
    reg.hello("trainer", "publisher", "host", 1, now=0.0)
    assert reg.wait_applied("trainer", 1, MODEL, 1, 1, now=0.0) == []
    assert reg.wait_applied("trainer", 2, MODEL, 1, 1, now=5.0) == []
    with pytest.raises(BrokerError, match="too many WaitApplied"):
        reg.wait_applied("trainer", 3, MODEL, 1, 1, now=5.0)

    [(peer, error)] = reg.expire(now=10.0)

    assert peer == "trainer"
    assert isinstance(error, Error)
    assert (error.code, error.request_id) == ("expired", 1)
    assert "expired after 10 s with 0 of 1 subscribers" in error.detail
    assert reg.wait_applied("trainer", 4, MODEL, 1, 1, now=10.0) == []  # room again


def test_one_applied_wakes_every_waiter_it_satisfies_counting_once_per_version() -> None:
    reg = Registry(peer_timeout_s=100.0)
    for i in range(3):
        reg.hello(f"sub{i}", "subscriber", "host", i, now=0.0)
    reg.hello("w", "observer", "host", 9, now=0.0)
    for rid, need in enumerate([2, 1, 3, 1]):
        reg.wait_applied("w", rid, MODEL, 5, need, now=0.0)
    counted: list[tuple[str, int]] = []
    count = reg.count_applied

    def counting(model: str, version: int) -> int:
        counted.append((model, version))
        return count(model, version)

    reg.count_applied = counting  # type: ignore[method-assign]
    first = reg.applied("sub0", MODEL, 5, 0.1, 0.01, now=1.0)
    second = reg.applied("sub1", MODEL, 6, 0.1, 0.01, now=1.0)

    assert sorted(m.request_id for _, m in first if isinstance(m, AppliedReached)) == [1, 3]
    assert [m.request_id for _, m in second if isinstance(m, AppliedReached)] == [0]
    assert counted == [(MODEL, 5), (MODEL, 5)]
    assert reg.num_waiters() == 1


def test_a_repeated_subscribe_does_not_resend_the_manifest() -> None:
    reg = registry()
    publish(reg, 1)
    assert reg.subscribe("sub", MODEL) is not None
    assert all(reg.subscribe("sub", MODEL) is None for _ in range(1000))
    reg.hello("sub", "subscriber", "host", 2, now=1.0)  # a new handshake: send it again
    assert reg.subscribe("sub", MODEL) is not None


def test_per_peer_caps_on_models_followed_and_heartbeat_entries() -> None:
    reg = Registry(limits=Limits(subscriptions_per_peer=3))
    reg.hello("sub", "subscriber", "host", 2, now=0.0)
    for i in range(3):
        reg.subscribe("sub", f"m{i}")
    with pytest.raises(BrokerError, match="already follows 3 models"):
        reg.subscribe("sub", "m3")

    reg.heartbeat("sub", {f"x{i}": i for i in range(100_000)}, now=1.0)

    assert len(reg.peers["sub"].applied) == 3


def test_models_and_pending_shards_are_capped() -> None:
    reg = Registry(limits=Limits(models=2, pending_shards=3))
    reg.hello("pub", "publisher", "host", 1, now=0.0)
    reg.publish("pub", "a", 1, 0, 4, shard("a"), now=0.0)
    reg.publish("pub", "b", 1, 0, 4, shard("a"), now=0.0)
    with pytest.raises(BrokerError, match="already holds 2 models"):
        reg.publish("pub", "c", 1, 0, 1, shard("a"), now=0.0)
    reg.publish("pub", "a", 1, 1, 4, shard("b", rank=1), now=0.0)
    with pytest.raises(BrokerError, match="3 shards of incomplete versions"):
        reg.publish("pub", "a", 2, 0, 4, shard("a"), now=0.0)


def test_failure_reasons_and_hosts_are_truncated() -> None:
    reg = Registry(limits=Limits(text_chars=64))
    reg.hello("sub", "subscriber", "h" * 10_000, 2, now=0.0)
    reg.subscribe("sub", MODEL)
    reg.pull_failed("sub", MODEL, 1, "x" * 1_000_000)
    assert len(reg.peers["sub"].last_error[MODEL]) == 64
    assert len(reg.peers["sub"].host) == 64


def test_a_later_version_reported_by_heartbeat_clears_the_last_error() -> None:
    reg = registry()
    reg.subscribe("sub", MODEL)
    reg.pull_failed("sub", MODEL, 2, "TransportError: gone")
    reg.heartbeat("sub", {MODEL: 1}, now=1.0)
    assert MODEL in reg.peers["sub"].last_error  # v1 is older than the failure
    reg.heartbeat("sub", {MODEL: 3}, now=2.0)
    assert MODEL not in reg.peers["sub"].last_error


def test_a_staged_version_shows_as_staged_not_pulling() -> None:
    reg = registry()
    reg.subscribe("sub", MODEL)
    publish(reg, 1)
    reg.progress("sub", MODEL, 1, 100, 100, 5.0, "staged")
    [row] = fleet(reg, 1.0)[1]
    assert (row.state, row.pulling_version, row.progress) == ("staged", 1, 1.0)
    assert fleet(reg, 1.0, state="pulling") == (0, [])


def test_a_peer_is_named_by_hello_or_else_by_host_and_pid() -> None:
    reg = Registry()
    reg.hello("subscriber-h-12-abcdef", "subscriber", "h", 12, now=0.0, name="node-7")
    reg.hello("subscriber-h-13-012345", "subscriber", "h", 13, now=0.0)
    assert [p.name for p in reg.peers.values()] == ["node-7", "h:13"]


def test_a_pending_version_whose_publisher_left_expires_at_once() -> None:
    reg = Registry(peer_timeout_s=100.0)
    for rank in (0, 1):
        reg.hello(f"rank{rank}", "publisher", "host", rank, now=0.0)
    for rank in (0, 1):
        reg.publish(f"rank{rank}", MODEL, 1, rank, 3, shard(f"t{rank}", rank=rank), now=0.0)

    out = reg.goodbye("rank1", now=1.0)

    assert sorted((peer, version) for peer, version, _ in reasons(out)) == [
        ("rank0", 1),
        ("rank1", 1),
    ]
    [(_, _, reason)] = [r for r in reasons(out) if r[0] == "rank0"]
    assert reason.startswith("publisher rank1 is gone: ranks [2] of 3 never published")
    assert reg.models[MODEL].pending == {}


def test_the_manifest_source_follows_the_applied_version() -> None:
    """Kept per model with the applied version (cut like other peer text), kept across a
    reconnect, and dropped when a newer version is learnt without one (a Heartbeat)."""
    reg = registry()
    reg.subscribe("sub", MODEL)
    publish(reg, 1)
    reg.applied("sub", MODEL, 1, 0.1, 0.01, now=1.0, manifest_source="peer:" + "n" * 1000)
    [row] = fleet(reg, 1.0)[1]
    assert row.manifest_source == "peer:" + "n" * (reg.limits.text_chars - 8) + "..."
    reg.applied("sub", MODEL, 1, 0.1, 0.01, now=1.0, manifest_source="broker")
    reg.hello("sub", "subscriber", "host", 1, now=2.0)
    assert [r.manifest_source for r in fleet(reg, 2.0)[1]] == ["broker"]
    reg.heartbeat("sub", {MODEL: 2}, now=3.0)
    assert [(r.applied_version, r.manifest_source) for r in fleet(reg, 3.0)[1]] == [(2, None)]
