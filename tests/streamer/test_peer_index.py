"""The registry's peer indexes agree with a scan of every peer, whatever happens to the peers."""

from __future__ import annotations

import random

from streamer.registry import Registry

MODELS = ("org/a", "org/b")


def scan_count(reg: Registry, model: str, version: int) -> int:
    """What `count_applied` used to compute: a scan of every peer."""
    return sum(
        1
        for peer in reg.peers.values()
        if not peer.gone and peer.role == "subscriber" and peer.applied.get(model, -1) >= version
    )


def test_applied_counts_match_a_scan_through_reconnects_goodbyes_and_timeouts() -> None:
    rng = random.Random(7)  # noqa: S311  # a reproducible test sequence
    reg = Registry(peer_timeout_s=5.0)
    now = 0.0
    peers = [f"peer-{i}" for i in range(40)]
    for step in range(3000):
        now += rng.random()
        peer_id = rng.choice(peers)
        action = rng.random()
        if action < 0.2 or not reg.known(peer_id):
            # Hello: new, a reconnect while live, or a return after going; sometimes another role.
            role = "observer" if rng.random() < 0.1 else "subscriber"
            reg.hello(peer_id, role, "host", 1, now)
        elif action < 0.5:
            reg.touch(peer_id, now)
            reg.applied(peer_id, rng.choice(MODELS), rng.randrange(6), 0.1, 0.01, now)
        elif action < 0.75:
            reg.touch(peer_id, now)
            reg.heartbeat(peer_id, {m: rng.randrange(6) for m in MODELS}, now)
        elif action < 0.8:
            reg.goodbye(peer_id, now)
        else:
            reg.expire(now)  # silent peers go; gone ones are forgotten after their TTL
        for model in MODELS:
            for version in range(7):
                assert reg.count_applied(model, version) == scan_count(reg, model, version), (
                    step,
                    model,
                    version,
                )


def test_a_heard_peer_is_never_marked_gone_among_ten_thousand() -> None:
    reg = Registry(peer_timeout_s=10.0)
    ids = [f"sub-{i:05d}" for i in range(10_000)]
    for peer_id in ids:
        reg.hello(peer_id, "subscriber", "host", 1, now=0.0)
    # Every peer but the last 100 heartbeats at t=1..9.9, in a shuffled order.
    rng = random.Random(3)  # noqa: S311
    heard = ids[:-100]
    rng.shuffle(heard)
    for i, peer_id in enumerate(heard):
        reg.touch(peer_id, now=1.0 + 9.0 * i / len(heard))

    reg.expire(now=10.5)

    gone = sorted(p.peer_id for p in reg.peers.values() if p.gone)
    assert gone == ids[-100:]
    assert all(reg.known(p) for p in heard)
    # The 100 are forgotten once their TTL passed; the others, silent by then, go in turn.
    reg.expire(now=10.5 + reg.limits.gone_peer_ttl_s)
    assert sorted(reg.peers) == sorted(heard)
    assert all(p.gone for p in reg.peers.values())
