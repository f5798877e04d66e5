"""Prometheus metrics of the broker, through `prometheus-client`.

    BrokerStats          counters the broker bumps, and per-model histograms it observes on
                         every Applied: pull seconds, pause seconds, announce -> applied seconds
    RegistryCollector    gauges read from the registry at scrape time (latest, pending and
                         unreadable versions, subscribers' versions and lag, peers by role,
                         relay subscribers), and the bytes each relay holder served
    render(stats)        the text exposition; CONTENT_TYPE is its Content-Type

Each broker has its own `CollectorRegistry` (never the process-global one), so tests and
several brokers in one process do not share samples. Subscriber labels use the peer's stable
name (Hello's `name`, else host:pid), never the per-connection peer id.
"""

from __future__ import annotations

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
    "APPLIED_TOTAL",
    "CONTENT_TYPE",
    "FORBIDDEN_TOTAL",
    "INSECURE",
    "LATEST_VERSION",
    "MESSAGES_TOTAL",
    "PAUSE_SECONDS",
    "PEERS",
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
]

MESSAGES_TOTAL = "weightstream_broker_messages_total"
PROTOCOL_ERRORS_TOTAL = "weightstream_broker_protocol_errors_total"
STATE_WRITE_ERRORS_TOTAL = "weightstream_broker_state_write_errors_total"
ANNOUNCED_TOTAL = "weightstream_versions_announced_total"
APPLIED_TOTAL = "weightstream_versions_applied_total"
PULL_FAILURES_TOTAL = "weightstream_pull_failures_total"
LATEST_VERSION = "weightstream_latest_version"
PENDING_VERSIONS = "weightstream_pending_versions"
PENDING_MISSING_RANKS = "weightstream_pending_missing_ranks"
UNREADABLE_VERSIONS = "weightstream_unreadable_versions"
SUBSCRIBER_VERSION = "weightstream_subscriber_version"
SUBSCRIBER_LAG = "weightstream_subscriber_lag_versions"
PEERS = "weightstream_peers"
PULL_SECONDS = "weightstream_pull_seconds"
PAUSE_SECONDS = "weightstream_pause_seconds"
ANNOUNCE_TO_APPLIED_SECONDS = "weightstream_announce_to_applied_seconds"
FORBIDDEN_TOTAL = "weightstream_broker_forbidden_total"
INSECURE = "weightstream_broker_insecure"
RELAY_SUBSCRIBERS = "weightstream_relay_subscribers"
RELAY_SERVED_BYTES_TOTAL = "weightstream_relay_served_bytes_total"

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
        self.pull_failures_total = 0
        self.forbidden_total = 0
        self.security = "loopback"
        """`curve`, `loopback` (no keys, loopback only) or `insecure` (no keys, off loopback)."""
        self.state_write_errors_total = 0
        self.state_last_error: str | None = None
        self.state_written_at: float | None = None
        self.registry = CollectorRegistry(auto_describe=False)
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
        self, model: str, *, pull_s: float, pause_s: float, since_announce_s: float | None
    ) -> None:
        self.pull_seconds.labels(model).observe(max(0.0, pull_s))
        self.pause_seconds.labels(model).observe(max(0.0, pause_s))
        if since_announce_s is not None:
            self.announce_to_applied.labels(model).observe(max(0.0, since_announce_s))


class RegistryCollector:
    """The broker's counters and the registry's gauges, computed at each scrape."""

    def __init__(self, registry: Registry, stats: BrokerStats) -> None:
        self._registry = registry
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats, registry = self._stats, self._registry
        for name, text, value in (
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
        ):
            counter = CounterMetricFamily(name, text)
            counter.add_metric([], value)
            yield counter
        insecure = GaugeMetricFamily(
            INSECURE, "1 if the broker serves off loopback without CURVE keys (--insecure)."
        )
        insecure.add_metric([], 1.0 if stats.security == "insecure" else 0.0)
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
        for name, model in sorted(registry.models.items()):
            if model.latest is not None:
                latest.add_metric([name], model.latest)
            pending.add_metric([name], len(model.pending))
            missing.add_metric([name], sum(len(p.missing()) for p in model.pending.values()))
            unreadable.add_metric(
                [name], sum(1 for r in model.versions.values() if r.unreadable is not None)
            )
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
        seen: set[tuple[str, str]] = set()
        roles: dict[str, int] = {}
        # Newest connection first: a restarted subscriber's row wins over its gone self.
        for peer in sorted(registry.peers.values(), key=lambda p: -p.connected_at):
            if peer.gone:
                continue
            roles[peer.role] = roles.get(peer.role, 0) + 1
            if peer.role != "subscriber":
                continue
            for name, applied in sorted(peer.applied.items()):
                if (name, peer.name) in seen:
                    continue
                seen.add((name, peer.name))
                version.add_metric([name, peer.name], applied)
                followed = registry.models.get(name)
                if followed is not None and followed.latest is not None:
                    lag.add_metric([name, peer.name], followed.latest - applied)
        yield from (version, lag)
        peers = GaugeMetricFamily(PEERS, "Connected peers by role.", labels=["role"])
        for role, count in sorted(roles.items()):
            peers.add_metric([role], count)
        yield peers
        yield from relay_families(relay_snapshot(registry))


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


def render(stats: BrokerStats) -> bytes:
    """The Prometheus text exposition of everything registered on `stats.registry`."""
    return generate_latest(stats.registry)
