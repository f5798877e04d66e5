"""Prometheus metrics of the broker, through `prometheus-client`.

    BrokerStats          counters the broker bumps, and per-model histograms it observes on
                         every Applied: pull seconds, pause seconds, announce -> applied seconds;
                         and applied versions by where their manifest came from
    RegistryCollector    gauges read from the registry at scrape time (latest, pending and
                         unreadable versions, subscribers' versions and lag, peers by role,
                         relay subscribers), and the bytes each relay holder served
    render(stats)        the text exposition; CONTENT_TYPE is its Content-Type
    render_off_loop      the same from the event loop: the registry copied there, the text made
                         in a worker thread (10,000 subscribers: ~10 ms on the loop, not ~0.3 s)

Each broker has its own `CollectorRegistry` (never the process-global one), so tests and
several brokers in one process do not share samples. Subscriber labels use the peer's stable
name (Hello's `name`, else host:pid), never the per-connection peer id.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from collections.abc import Iterator

    from prometheus_client.core import Metric

    from streamer.registry import Registry

__all__ = [
    "ANNOUNCED_TOTAL",
    "ANNOUNCE_TO_APPLIED_SECONDS",
    "APPLIED_MANIFEST_SOURCES_TOTAL",
    "APPLIED_TOTAL",
    "CONTENT_TYPE",
    "FORBIDDEN_TOTAL",
    "INSECURE",
    "LATEST_VERSION",
    "MANIFEST_FETCHES_TOTAL",
    "MANIFEST_FETCH_BYTES_TOTAL",
    "MANIFEST_FETCH_REFUSED_TOTAL",
    "MANIFEST_PUSHES_TOTAL",
    "MANIFEST_SOURCES",
    "MESSAGES_TOTAL",
    "NODE_LINKS",
    "PAUSE_SECONDS",
    "PEERS",
    "PEER_CONNECTIONS",
    "PENDING_MISSING_RANKS",
    "PENDING_VERSIONS",
    "PROTOCOL_ERRORS_TOTAL",
    "PULL_FAILURES_TOTAL",
    "PULL_SECONDS",
    "RELAY_SERVED_BYTES_TOTAL",
    "RELAY_SUBSCRIBERS",
    "STATE_WRITE_ERRORS_TOTAL",
    "SUBSCRIBER_LAG",
    "SUBSCRIBER_VERSION",
    "UNREADABLE_VERSIONS",
    "BrokerStats",
    "RegistryCollector",
    "RelaySnapshot",
    "relay_families",
    "relay_snapshot",
    "render",
    "render_off_loop",
]

MESSAGES_TOTAL = "weightstream_broker_messages_total"
PROTOCOL_ERRORS_TOTAL = "weightstream_broker_protocol_errors_total"
STATE_WRITE_ERRORS_TOTAL = "weightstream_broker_state_write_errors_total"
ANNOUNCED_TOTAL = "weightstream_versions_announced_total"
APPLIED_TOTAL = "weightstream_versions_applied_total"
APPLIED_MANIFEST_SOURCES_TOTAL = "weightstream_versions_applied_manifest_sources_total"
MANIFEST_SOURCES = ("broker", "peer", "unknown")
"""`APPLIED_MANIFEST_SOURCES_TOTAL`'s `source` label: the broker, a relay peer (any: peer
names would make a series per node), or not said (an older subscriber)."""
PULL_FAILURES_TOTAL = "weightstream_pull_failures_total"
LATEST_VERSION = "weightstream_latest_version"
PENDING_VERSIONS = "weightstream_pending_versions"
PENDING_MISSING_RANKS = "weightstream_pending_missing_ranks"
UNREADABLE_VERSIONS = "weightstream_unreadable_versions"
SUBSCRIBER_VERSION = "weightstream_subscriber_version"
SUBSCRIBER_LAG = "weightstream_subscriber_lag_versions"
PEERS = "weightstream_peers"
PEER_CONNECTIONS = "weightstream_peer_connections"
NODE_LINKS = "weightstream_node_links"
PULL_SECONDS = "weightstream_pull_seconds"
PAUSE_SECONDS = "weightstream_pause_seconds"
ANNOUNCE_TO_APPLIED_SECONDS = "weightstream_announce_to_applied_seconds"
FORBIDDEN_TOTAL = "weightstream_broker_forbidden_total"
INSECURE = "weightstream_broker_insecure"
RELAY_SUBSCRIBERS = "weightstream_relay_subscribers"
RELAY_SERVED_BYTES_TOTAL = "weightstream_relay_served_bytes_total"
MANIFEST_FETCHES_TOTAL = "weightstream_broker_manifest_fetches_total"
MANIFEST_FETCH_BYTES_TOTAL = "weightstream_broker_manifest_fetch_bytes_total"
MANIFEST_FETCH_REFUSED_TOTAL = "weightstream_broker_manifest_fetch_refused_total"
MANIFEST_PUSHES_TOTAL = "weightstream_broker_manifest_pushes_total"

CONTENT_TYPE = CONTENT_TYPE_LATEST

# `_created` series (a timestamp per label set) only change with every restart: leave them out.
disable_created_metrics()  # type: ignore[no-untyped-call]

_SECONDS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_PAUSE = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class BrokerStats:
    def __init__(self, *, started_at: float = 0.0) -> None:
        self.started_at = started_at
        self.messages_total = 0
        self.protocol_errors_total = 0
        self.announced_total = 0
        self.applied_total = 0
        self.applied_manifest_sources = dict.fromkeys(MANIFEST_SOURCES, 0)
        """Applied versions by where their manifest came from (`MANIFEST_SOURCES`)."""
        self.pull_failures_total = 0
        self.forbidden_total = 0
        self.manifest_fetches_total = 0
        """FetchManifest answered with the body (protocol 2: about one per subscriber and version)."""
        self.manifest_fetch_bytes_total = 0
        self.manifest_fetch_refused_total = 0
        self.manifest_pushes_total = 0
        """Manifest bodies pushed to node links with an announcement (one per link and version)."""
        self.security = "loopback"
        """`curve`, `loopback` (no keys, loopback only) or `insecure` (no keys, off loopback)."""
        self.state_write_errors_total = 0
        self.state_last_error: str | None = None
        self.state_written_at: float | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector: RegistryCollector | None = None
        """The registry's gauges, set where they are registered (`streamer.broker.Broker`)."""
        self.pull_seconds = Histogram(
            PULL_SECONDS,
            "Seconds from a subscriber's first byte to a verified version, per model.",
            ["model"],
            buckets=_SECONDS,
            registry=self.registry,
        )
        self.pause_seconds = Histogram(
            PAUSE_SECONDS,
            "Seconds an engine paused to swap a version in, per model.",
            ["model"],
            buckets=_PAUSE,
            registry=self.registry,
        )
        self.announce_to_applied = Histogram(
            ANNOUNCE_TO_APPLIED_SECONDS,
            "Seconds from a version's announcement to a subscriber applying it, per model.",
            ["model"],
            buckets=_SECONDS,
            registry=self.registry,
        )

    def observe_applied(
        self,
        model: str,
        *,
        pull_s: float,
        pause_s: float,
        since_announce_s: float | None,
        manifest_source: str = "",
    ) -> None:
        """`manifest_source`: `Applied.manifest_source` ("broker", "peer:<name>", "")."""
        label = (
            "broker"
            if manifest_source == "broker"
            else "peer"
            if manifest_source.startswith("peer:")
            else "unknown"
        )
        self.applied_manifest_sources[label] += 1
        self.pull_seconds.labels(model).observe(max(0.0, pull_s))
        self.pause_seconds.labels(model).observe(max(0.0, pause_s))
        if since_announce_s is not None:
            self.announce_to_applied.labels(model).observe(max(0.0, since_announce_s))


RelaySnapshot = tuple[dict[str, int], dict[tuple[str, str], int]]
"""Relay offers per model, and bytes served per (model, holder label)."""


def relay_snapshot(registry: Registry) -> RelaySnapshot:
    """Copy what the relay metrics show; on the event loop, which owns the registry."""
    relays = registry.relays
    return {name: len(offers) for name, offers in relays.offers.items()}, dict(relays.served_total)


def relay_families(snapshot: RelaySnapshot) -> Iterator[Metric]:
    """The relay gauges and counter from a `relay_snapshot` (any thread)."""
    offers, served_total = snapshot
    offering = GaugeMetricFamily(
        RELAY_SUBSCRIBERS, "Subscribers offering to relay, per model.", labels=["model"]
    )
    for name, count in sorted(offers.items()):
        offering.add_metric([name], count)
    yield offering
    # Labels: stable names of holders readers reported (capped, then "(other)"); the
    # trainer is "(trainer)".
    served = CounterMetricFamily(
        RELAY_SERVED_BYTES_TOTAL,
        "Bytes subscribers verified from each source (a relay holder, or the trainer), per model.",
        labels=["model", "holder"],
    )
    for (name, holder), nbytes in sorted(served_total.items()):
        served.add_metric([name, holder], nbytes)
    yield served


@dataclass(frozen=True)
class _Snapshot:
    """What a scrape shows, copied from the registry on the event loop (plain data, so the
    text can be made in a worker thread while the loop goes on)."""

    counters: tuple[tuple[str, str, int], ...]
    manifest_sources: tuple[tuple[str, int], ...]
    """(source label, applied versions) in `MANIFEST_SOURCES` order"""
    insecure: bool
    models: list[tuple[str, int | None, int, int, int]]
    """(model, latest, pending versions, missing ranks, unreadable versions)"""
    subscribers: list[tuple[str, str, int, int | None]]
    """(model, subscriber name, applied version, the model's latest)"""
    roles: dict[str, int]
    connections: int
    """Connections the live peers use: a node link's engines share one."""
    node_links: int
    relay: RelaySnapshot


class RegistryCollector:
    """The broker's counters and the registry's gauges, computed at each scrape.

    `collect()` (prometheus-client's hook) reads the registry itself when called on the loop;
    `render_off_loop` copies it on the loop (~10 ms at 10,000 subscribers) and formats the
    text (~0.2 s there) in a worker thread, so a scrape does not stall the ZeroMQ loop."""

    def __init__(self, registry: Registry, stats: BrokerStats) -> None:
        self._registry = registry
        self._stats = stats
        self._pinned = threading.local()

    def collect(self) -> Iterator[Metric]:
        snapshot: _Snapshot | None = getattr(self._pinned, "snapshot", None)
        yield from _families(snapshot if snapshot is not None else self.snapshot())

    def render_pinned(self, snapshot: _Snapshot) -> bytes:
        """The exposition with this collector's part taken from `snapshot` (any thread)."""
        self._pinned.snapshot = snapshot
        try:
            return generate_latest(self._stats.registry)
        finally:
            self._pinned.snapshot = None

    def snapshot(self) -> _Snapshot:
        """Copy what a scrape shows; on the event loop, which owns the registry."""
        stats, registry = self._stats, self._registry
        counters = (
            (MESSAGES_TOTAL, "Control messages received by the broker.", stats.messages_total),
            (
                PROTOCOL_ERRORS_TOTAL,
                "Messages the broker could not decode or did not expect.",
                stats.protocol_errors_total,
            ),
            (
                STATE_WRITE_ERRORS_TOTAL,
                "Failed writes of the state file (the broker keeps serving and retries).",
                stats.state_write_errors_total,
            ),
            (ANNOUNCED_TOTAL, "Versions announced (all shards in).", stats.announced_total),
            (APPLIED_TOTAL, "Versions reported applied by subscribers.", stats.applied_total),
            (
                PULL_FAILURES_TOTAL,
                "Pulls that subscribers reported as failed.",
                stats.pull_failures_total,
            ),
            (
                FORBIDDEN_TOTAL,
                "Messages refused because the sender's key has no right.",
                stats.forbidden_total,
            ),
            (
                MANIFEST_FETCHES_TOTAL,
                "Manifests served by digest (FetchManifest).",
                stats.manifest_fetches_total,
            ),
            (
                MANIFEST_FETCH_BYTES_TOTAL,
                "Bytes of manifests served by digest.",
                stats.manifest_fetch_bytes_total,
            ),
            (
                MANIFEST_FETCH_REFUSED_TOTAL,
                "FetchManifest refused (unknown digest, unreadable version, over the per-connection cap).",
                stats.manifest_fetch_refused_total,
            ),
            (
                MANIFEST_PUSHES_TOTAL,
                "Manifest bodies pushed to node links ahead of an announcement (once per link).",
                stats.manifest_pushes_total,
            ),
        )
        models = [
            (
                name,
                model.latest,
                len(model.pending),
                sum(len(p.missing()) for p in model.pending.values()),
                sum(1 for r in model.versions.values() if r.unreadable is not None),
            )
            for name, model in sorted(registry.models.items())
        ]
        latest = {name: model.latest for name, model in registry.models.items()}
        newest: dict[tuple[str, str], tuple[float, int]] = {}
        roles: dict[str, int] = {}
        links: set[str] = set()
        direct = 0
        # One pass, no sort: the newest connection of a name wins (a restarted subscriber's
        # row over its old self).
        for peer in registry.peers.values():
            if peer.gone:
                continue
            roles[peer.role] = roles.get(peer.role, 0) + 1
            link, slash, _ = peer.peer_id.partition("/")
            if slash:
                links.add(link)
            else:
                direct += 1
            if peer.role != "subscriber":
                continue
            for name, applied in peer.applied.items():
                key = (name, peer.name)
                held = newest.get(key)
                if held is None or peer.connected_at > held[0]:
                    newest[key] = (peer.connected_at, applied)
        subscribers = [
            (name, subscriber, applied, latest.get(name))
            for (name, subscriber), (_, applied) in newest.items()
        ]
        return _Snapshot(
            counters=counters,
            manifest_sources=tuple(stats.applied_manifest_sources.items()),
            insecure=stats.security == "insecure",
            models=models,
            subscribers=subscribers,
            roles=roles,
            connections=direct + len(links),
            node_links=len(links),
            relay=relay_snapshot(registry),
        )


def _families(snapshot: _Snapshot) -> Iterator[Metric]:
    for name, text, value in snapshot.counters:
        counter = CounterMetricFamily(name, text)
        counter.add_metric([], value)
        yield counter
    sources = CounterMetricFamily(
        APPLIED_MANIFEST_SOURCES_TOTAL,
        "Versions reported applied, by where the subscriber took the manifest "
        "(broker, a relay peer, or unknown: an older subscriber).",
        labels=["source"],
    )
    for source, count in snapshot.manifest_sources:
        sources.add_metric([source], count)
    yield sources
    insecure = GaugeMetricFamily(
        INSECURE, "1 if the broker serves off loopback without CURVE keys (--insecure)."
    )
    insecure.add_metric([], 1.0 if snapshot.insecure else 0.0)
    yield insecure
    latest = GaugeMetricFamily(
        LATEST_VERSION, "Latest announced version per model.", labels=["model"]
    )
    pending = GaugeMetricFamily(
        PENDING_VERSIONS, "Versions waiting for ranks, per model.", labels=["model"]
    )
    missing = GaugeMetricFamily(
        PENDING_MISSING_RANKS,
        "Ranks not yet in, over the versions waiting for ranks, per model.",
        labels=["model"],
    )
    unreadable = GaugeMetricFamily(
        UNREADABLE_VERSIONS,
        "Announced versions nobody can read (a publisher is gone), per model.",
        labels=["model"],
    )
    for name, model_latest, num_pending, num_missing, num_unreadable in snapshot.models:
        if model_latest is not None:
            latest.add_metric([name], model_latest)
        pending.add_metric([name], num_pending)
        missing.add_metric([name], num_missing)
        unreadable.add_metric([name], num_unreadable)
    yield from (latest, pending, missing, unreadable)
    version = GaugeMetricFamily(
        SUBSCRIBER_VERSION,
        "Version each subscriber has applied, per model.",
        labels=["model", "subscriber"],
    )
    lag = GaugeMetricFamily(
        SUBSCRIBER_LAG,
        "Versions each subscriber is behind the latest, per model.",
        labels=["model", "subscriber"],
    )
    for name, subscriber, applied, model_latest in snapshot.subscribers:
        version.add_metric([name, subscriber], applied)
        if model_latest is not None:
            lag.add_metric([name, subscriber], model_latest - applied)
    yield from (version, lag)
    peers = GaugeMetricFamily(PEERS, "Connected peers by role.", labels=["role"])
    for role, count in sorted(snapshot.roles.items()):
        peers.add_metric([role], count)
    yield peers
    yield GaugeMetricFamily(
        PEER_CONNECTIONS,
        "Connections the live peers use (the engines behind a node link share one).",
        value=snapshot.connections,
    )
    yield GaugeMetricFamily(NODE_LINKS, "Node links with live engines.", value=snapshot.node_links)
    yield from relay_families(snapshot.relay)


def render(stats: BrokerStats) -> bytes:
    """The Prometheus text exposition of everything registered on `stats.registry`."""
    return generate_latest(stats.registry)


async def render_off_loop(stats: BrokerStats) -> bytes:
    """`render(stats)`, with the registry copied here on the loop and the text made in a
    worker thread (prometheus-client's histograms take their own locks)."""
    collector = stats.collector
    if collector is None:
        return await asyncio.to_thread(render, stats)
    return await asyncio.to_thread(collector.render_pinned, collector.snapshot())
