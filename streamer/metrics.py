"""Prometheus metric names and the text exposition of the broker's counters and gauges."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "ANNOUNCED_TOTAL",
    "APPLIED_TOTAL",
    "FORBIDDEN_TOTAL",
    "INSECURE",
    "LATEST_VERSION",
    "MESSAGES_TOTAL",
    "PEERS",
    "PROTOCOL_ERRORS_TOTAL",
    "PULL_FAILURES_TOTAL",
    "SUBSCRIBER_LAG",
    "SUBSCRIBER_VERSION",
    "BrokerStats",
    "render",
]

MESSAGES_TOTAL = "weightstream_broker_messages_total"
PROTOCOL_ERRORS_TOTAL = "weightstream_broker_protocol_errors_total"
ANNOUNCED_TOTAL = "weightstream_versions_announced_total"
APPLIED_TOTAL = "weightstream_versions_applied_total"
PULL_FAILURES_TOTAL = "weightstream_pull_failures_total"
LATEST_VERSION = "weightstream_latest_version"
SUBSCRIBER_VERSION = "weightstream_subscriber_version"
SUBSCRIBER_LAG = "weightstream_subscriber_lag_versions"
PEERS = "weightstream_peers"
FORBIDDEN_TOTAL = "weightstream_broker_forbidden_total"
INSECURE = "weightstream_broker_insecure"

_HELP = {
    MESSAGES_TOTAL: ("counter", "Control messages received by the broker."),
    PROTOCOL_ERRORS_TOTAL: ("counter", "Messages the broker could not decode or did not expect."),
    ANNOUNCED_TOTAL: ("counter", "Versions announced (all shards in)."),
    APPLIED_TOTAL: ("counter", "Versions reported applied by subscribers."),
    PULL_FAILURES_TOTAL: ("counter", "Pulls that subscribers reported as failed."),
    LATEST_VERSION: ("gauge", "Latest announced version per model."),
    SUBSCRIBER_VERSION: ("gauge", "Version each subscriber has applied, per model."),
    SUBSCRIBER_LAG: ("gauge", "Versions each subscriber is behind the latest, per model."),
    PEERS: ("gauge", "Connected peers by role."),
    FORBIDDEN_TOTAL: ("counter", "Messages refused because the sender's key has no right."),
    INSECURE: ("gauge", "1 if the broker serves off loopback without CURVE keys (--insecure)."),
}


@dataclass
class BrokerStats:
    messages_total: int = 0
    protocol_errors_total: int = 0
    announced_total: int = 0
    applied_total: int = 0
    pull_failures_total: int = 0
    started_at: float = 0.0
    forbidden_total: int = 0
    security: str = "loopback"
    """`curve`, `loopback` (no keys, loopback only) or `insecure` (no keys, off loopback)."""
    gauges: dict[str, list[tuple[dict[str, str], float]]] = field(default_factory=dict)


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render(stats: BrokerStats) -> str:
    """Prometheus text format, version 0.0.4."""
    samples: dict[str, list[tuple[dict[str, str], float]]] = {
        MESSAGES_TOTAL: [({}, stats.messages_total)],
        PROTOCOL_ERRORS_TOTAL: [({}, stats.protocol_errors_total)],
        ANNOUNCED_TOTAL: [({}, stats.announced_total)],
        APPLIED_TOTAL: [({}, stats.applied_total)],
        PULL_FAILURES_TOTAL: [({}, stats.pull_failures_total)],
        FORBIDDEN_TOTAL: [({}, stats.forbidden_total)],
        INSECURE: [({}, 1.0 if stats.security == "insecure" else 0.0)],
    }
    samples.update(stats.gauges)
    lines: list[str] = []
    for name, values in samples.items():
        kind, text = _HELP[name]
        lines.append(f"# HELP {name} {text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(f"{name}{_labels(labels)} {_number(value)}" for labels, value in values)
    return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    """Whole numbers exactly (versions are often step counts: `:g` would round 12345678)."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))
