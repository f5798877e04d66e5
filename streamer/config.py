"""Configuration of the broker and of the clients that talk to it.

One frozen, keyword-only Struct per process, decoded by the CLI from flags, a TOML file or
the environment, then passed down; nothing below the CLI reads `os.environ`.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

__all__ = ["BrokerConfig", "ClientConfig"]

Seconds = Annotated[float, msgspec.Meta(gt=0)]


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
    queue_size: Annotated[int, msgspec.Meta(ge=1)] = 10_000
    """High-water mark of the broker's sockets, in messages."""
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
