"""Configuration of the broker and of the clients that talk to it.

One frozen, keyword-only Struct per process, decoded by the CLI from flags, a TOML file or
the environment, then passed down; nothing below the CLI reads `os.environ`.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from schemas.validate import ManifestLimits
from streamer.registry import Limits

__all__ = ["BrokerConfig", "ClientConfig"]

Seconds = Annotated[float, msgspec.Meta(gt=0)]
Count = Annotated[int, msgspec.Meta(ge=1)]


class BrokerConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    endpoint: str = "tcp://127.0.0.1:5555"
    """Where the broker's ROUTER socket binds (requests and announcements)."""
    http_host: str = "127.0.0.1"
    http_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8790
    """Port of the HTTP status endpoint; 0 picks a free one."""
    state_dir: str | None = None
    """Where the registry persists, so a restarted broker still knows the published versions."""
    retention: Annotated[int, msgspec.Meta(ge=1)] = 2
    """How many latest versions per model stay readable."""
    lease_ttl_s: Seconds = 30.0
    """A lease not renewed (by heartbeats) for this long is dropped."""
    heartbeat_interval_s: Seconds = 1.0
    peer_timeout_s: Seconds = 10.0
    """A peer silent for this long is shown as gone and loses its leases."""
    connection_heartbeat_s: Annotated[float, msgspec.Meta(ge=0.1, le=3600.0)] = 5.0
    """ZMTP PING interval on every connection (timeout 3 x): a connection that died silently
    is closed, so its peer's reconnect with the same routing id is not ignored as a duplicate.
    libzmq cancels a timer in O(its timers) on each PONG, so the I/O threads' cost grows as
    connections^2 / (io_threads x interval): 2 s on one thread took a whole core at 10,000."""
    io_threads: Annotated[int, msgspec.Meta(ge=1, le=64)] = 4
    """libzmq I/O threads of the broker's context (connections are spread over them)."""
    max_heartbeats_per_s: Annotated[float, msgspec.Meta(ge=0.0)] = 2000.0
    """Heartbeat pacing: past this many heartbeats a second at `heartbeat_interval_s` (peers /
    interval), the broker asks every peer to heartbeat less often (`Welcome`/`Alive`
    `heartbeat_at_least_s`, doubling steps) and stretches `peer_timeout_s` and `lease_ttl_s` by
    the same factor, so that a large fleet's heartbeats never crowd out announcements and a
    live peer is never marked gone. 0: a fixed interval, whatever the fleet."""
    queue_size: Annotated[int, msgspec.Meta(ge=1)] = 10_000
    """High-water mark of the broker's sockets, in messages."""
    manifest_limits: ManifestLimits = ManifestLimits()
    """Caps on every published manifest (TOML table `[manifest_limits]`); a shard or manifest
    past them, or breaking any rule of `schemas.validate`, is refused `invalid_manifest`."""
    discard_bad_state: bool = False
    """Move an unreadable state file aside (to `<file>.bad-<time>`) and start empty."""
    pending_timeout_s: Seconds = 120.0
    """A version still missing ranks this long after its first shard expires: the ranks
    that did publish get a Retire saying which ranks are missing, and free its buffers."""
    max_pending_versions: Count = 4
    """Incomplete versions per model at once; a newer one expires the oldest. A publisher
    holds at most retention + 1 + this many buffer sets."""
    max_pending_shards: Count = 65_536
    max_models: Count = 1024
    max_peers: Count = 100_000
    max_subscriptions_per_peer: Count = 64
    max_waiters_per_peer: Count = 64
    max_waiters: Count = 100_000
    waiter_ttl_s: Seconds = 3600.0
    """A WaitApplied not reached in this long is answered Error("expired")."""
    gone_peer_ttl_s: Seconds = 300.0
    """A gone peer's status rows stay this long, then it is forgotten."""
    http_idle_timeout_s: Seconds = 15.0
    """HTTP connections idle (or sending a request slower than this) are closed."""
    relay_fanout: Annotated[int, msgspec.Meta(ge=0, le=64)] = 2
    """Relay: stripes per version (and each stripe tree's arity) when subscribers offer to
    relay; 0 sends no Routes, so every subscriber reads from the trainer."""
    link_manifest_push: bool = True
    """Push a version's manifest to each node link once, ahead of its announcement to the
    link's members (never to a link whose members all relay: peers serve them manifests)."""

    def limits(self) -> Limits:
        return Limits(
            pending_timeout_s=self.pending_timeout_s,
            pending_versions_per_model=self.max_pending_versions,
            pending_shards=self.max_pending_shards,
            models=self.max_models,
            peers=self.max_peers,
            subscriptions_per_peer=self.max_subscriptions_per_peer,
            waiters_per_peer=self.max_waiters_per_peer,
            waiters=self.max_waiters,
            waiter_ttl_s=self.waiter_ttl_s,
            gone_peer_ttl_s=self.gone_peer_ttl_s,
        )

    # security (streamer/auth.py; docs/security.md)
    key_file: str | None = None
    """The broker's CURVE key pair (`NAME.key_secret`); with it every peer must present a key."""
    allowlist_file: str | None = None
    """TOML allowlist of public keys and their rights (required with `key_file`)."""
    insecure: bool = False
    """Allow a broker without keys on a non-loopback endpoint (it says so in logs and status)."""
    max_version_jump: Annotated[int, msgspec.Meta(ge=1)] = 1_000_000
    """A publish more than this past a model's latest version is refused."""
    http_read_token_file: str | None = None
    """If set, the read-only HTTP routes (all but /healthz) need this bearer token."""
    http_admin_token_file: str | None = None
    """Bearer token of the HTTP routes that change state; without it they are off."""


class ClientConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    broker: str = "tcp://127.0.0.1:5555"
    request_timeout_s: Seconds = 10.0
    heartbeat_interval_s: Seconds = 1.0
    queue_size: Annotated[int, msgspec.Meta(ge=1)] = 1000
    # security (streamer/auth.py)
    key_file: str | None = None
    """This peer's CURVE key pair (`NAME.key_secret`), listed in the broker's allowlist."""
    broker_key_file: str | None = None
    """The broker's public key (`NAME.key`); needed with `key_file`."""
    name: Annotated[str, msgspec.Meta(max_length=128)] = ""
    """A stable name for this peer in status and metric labels, kept across its restarts
    (say, the node and engine it serves); default host:pid."""
