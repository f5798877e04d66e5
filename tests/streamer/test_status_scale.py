"""Status at fleet scale: the indexed `/v1/subscribers` pages and the off-loop `/metrics` show
exactly what a plain scan of every peer shows."""

from __future__ import annotations

import asyncio
import random
from typing import Any

from streamer.http import (
    _COUNT_COST,
    _SCAN_STEP,
    SubscriberRow,
    _behind,
    _scan,
    _state,
    _subscriber_row,
    fleet,
    fleet_async,
)
from streamer.metrics import BrokerStats, RegistryCollector, render, render_off_loop
from streamer.registry import Registry
from tests.streamer.test_announced import shard

MODELS = ("org/a", "org/b")


def scan(
    reg: Registry,
    now: float,
    *,
    limit: int,
    offset: int,
    model: str | None = None,
    state: str | None = None,
    min_lag: int | None = None,
) -> tuple[int, list[SubscriberRow]]:
    """The page as the unindexed code made it: every peer sorted, every row considered."""
    rows = []
    for peer in sorted(reg.peers.values(), key=lambda p: p.peer_id):
        if peer.role != "subscriber":
            continue
        for name in sorted(peer.subscriptions | set(peer.applied)):
            if model is not None and name != model:
                continue
            if state is not None and _state(peer, name) != state:
                continue
            latest = reg.models[name].latest if name in reg.models else None
            if min_lag is not None and not _behind(latest, peer.applied.get(name), min_lag):
                continue
            rows.append(_subscriber_row(reg, peer, name, now))
    return len(rows), rows[offset : offset + limit]


def fleet_of(num_subscribers: int) -> Registry:
    """Subscribers of one or two models at assorted versions; some gone, some reconnected
    under the same name, some observers."""
    rng = random.Random(11)  # noqa: S311  # a reproducible fleet
    reg = Registry(retention=2)
    reg.hello("pub", "publisher", "host", 1, now=0.0)
    for i in range(num_subscribers):
        peer_id = f"sub-{rng.randrange(10**6):06d}-{i}"
        reg.hello(peer_id, "subscriber", "host", i, now=float(i), name=f"node-{i % 500}")
        for model in rng.sample(MODELS, rng.choice((1, 1, 1, 2))):
            reg.subscribe(peer_id, model)
    reg.hello("watcher", "observer", "host", 9, now=0.0)
    for version in (1, 2, 3):
        for model in MODELS:
            reg.publish("pub", model, version, 0, 1, shard(1), now=0.0)
    for peer_id in list(reg.peers):
        peer = reg.peers[peer_id]
        if peer.role != "subscriber":
            continue
        for model in sorted(peer.subscriptions):
            if rng.random() < 0.8:
                reg.applied(peer_id, model, rng.choice((1, 2, 3)), 0.1, 0.01, now=1.0)
        if rng.random() < 0.05:
            reg.applied(peer_id, "org/unfollowed", 1, 0.1, 0.01, now=1.0)
        if rng.random() < 0.1:
            reg.goodbye(peer_id, now=2.0)
        elif rng.random() < 0.1:
            reg.progress(peer_id, next(iter(peer.subscriptions)), 3, 10, 100, 5.0)
    return reg


def test_subscriber_pages_match_a_scan_of_every_peer() -> None:
    reg = fleet_of(3000)
    queries: list[dict[str, Any]] = [
        {"limit": 1000, "offset": 0},
        {"limit": 1000, "offset": 2500},
        {"limit": 10_000, "offset": 0},
        {"limit": 50, "offset": 100, "model": "org/a"},
        {"limit": 50, "offset": 0, "model": "org/unfollowed"},
        {"limit": 1000, "offset": 0, "state": "gone"},
        {"limit": 1000, "offset": 0, "state": "pulling"},
        {"limit": 1000, "offset": 10, "min_lag": 1},
        {"limit": 1000, "offset": 0, "min_lag": 2, "model": "org/b", "state": "idle"},
        {"limit": 1000, "offset": 0, "min_lag": 0},
    ]
    for query in queries:
        expected = scan(reg, 5.0, **query)
        assert expected[0] > 0, query
        assert fleet(reg, 5.0, **query) == expected, query
    # A subscriber that joins later and one that is forgotten show up in the next page.
    reg.hello("sub-000000-new", "subscriber", "host", 1, now=3.0)
    reg.subscribe("sub-000000-new", "org/a")
    reg.expire(now=2.0 + reg.limits.gone_peer_ttl_s + reg.peer_timeout_s + 1)
    for query in queries:
        assert fleet(reg, 5.0, **query) == scan(reg, 5.0, **query), query


async def test_metrics_rendered_off_the_loop_are_the_same_text() -> None:
    reg = fleet_of(2000)
    stats = BrokerStats()
    stats.collector = RegistryCollector(reg, stats)
    stats.registry.register(stats.collector)
    stats.observe_applied("org/a", pull_s=0.5, pause_s=0.01, since_announce_s=0.7)

    text = await render_off_loop(stats)

    assert text == render(stats)
    # One series per name: the newest live connection of that name wins.
    newest: dict[str, tuple[float, int]] = {}
    for peer in reg.peers.values():
        if peer.gone or peer.role != "subscriber" or "org/a" not in peer.applied:
            continue
        if peer.name not in newest or peer.connected_at > newest[peer.name][0]:
            newest[peer.name] = (peer.connected_at, peer.applied["org/a"])
    lines = [
        line
        for line in text.decode().splitlines()
        if line.startswith('weightstream_subscriber_version{model="org/a"')
    ]
    assert len(lines) == len(newest) > 100
    for name, (_, applied) in newest.items():
        line = f'weightstream_subscriber_version{{model="org/a",subscriber="{name}"}} {applied:.1f}'
        assert line in lines


async def test_the_http_scan_lets_the_loop_run_between_steps_and_matches_fleet() -> None:
    """The route's scan (`fleet_async`) gives `fleet`'s page, and other tasks run during it:
    a task counting loop turns sees one per `_SCAN_STEP` subscribers."""
    reg = fleet_of(3 * _SCAN_STEP)
    turns = 0
    stop = asyncio.Event()

    async def count_turns() -> None:
        nonlocal turns
        while not stop.is_set():
            turns += 1
            await asyncio.sleep(0)

    counter = asyncio.create_task(count_turns())
    await asyncio.sleep(0)
    before = turns
    page = await fleet_async(reg, 5.0, limit=10_000, offset=0)
    during = turns - before
    stop.set()
    await counter
    assert page == fleet(reg, 5.0, limit=10_000, offset=0)
    assert during >= len(reg.subscriber_ids()) // _SCAN_STEP - 1 >= 2


def test_a_peer_forgotten_during_a_pause_of_the_scan_is_skipped() -> None:
    reg = fleet_of(3 * _SCAN_STEP)
    ids = reg.subscriber_ids()
    page: list[SubscriberRow] = []
    scan_ = _scan(reg, 5.0, page, 10_000, 0, None, None, None)
    next(scan_)  # paused after the first step
    late = ids[-1]
    # What Registry._forget_gone does to a gone peer past its TTL, between two steps.
    del reg.peers[late]
    reg._subscriber_ids = None
    try:
        while True:
            next(scan_)
    except StopIteration as done:
        total = done.value
    assert late not in {row.peer_id for row in page}
    assert total == len(page) == fleet(reg, 5.0, limit=10_000, offset=0)[0]


def pauses(reg: Registry, **query: Any) -> int:
    """How often `_scan` lets the loop run for this query."""
    page: list[SubscriberRow] = []
    scan_ = _scan(
        reg,
        5.0,
        page,
        query.get("limit", 1000),
        query.get("offset", 0),
        query.get("model"),
        query.get("state"),
        query.get("min_lag"),
    )
    count = 0
    try:
        while True:
            next(scan_)
            count += 1
    except StopIteration:
        return count


def test_subscribers_only_counted_cost_a_fraction_of_a_step() -> None:
    """Rows outside an unfiltered page are counted in steps `_COUNT_COST` times longer:
    a small page of a large fleet does not pause (each pause is a loop turn a busy broker
    makes it wait), a filtered or whole-fleet scan pauses every `_SCAN_STEP` subscribers."""
    reg = fleet_of(3 * _SCAN_STEP)
    subscribers = len(reg.subscriber_ids())
    assert subscribers < _SCAN_STEP * _COUNT_COST
    assert pauses(reg, limit=100) == 0
    assert pauses(reg, limit=100, offset=5000) == 0
    assert pauses(reg, limit=10_000) == (subscribers - 1) // _SCAN_STEP
    assert pauses(reg, limit=100, state="idle") == (subscribers - 1) // _SCAN_STEP
