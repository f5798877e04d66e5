"""Control messages between peers and the broker: one tagged union, msgpack on the wire.

Every message is a frozen msgspec Struct whose `kind` tag names it on the wire; the tags are
stable strings, so renaming a class never changes the protocol. New fields go last with
defaults. Requests carry a `request_id` that the reply echoes. Every field a peer controls
is bounded in its type (string lengths, integer and float ranges, collection sizes), so no
decoded message is larger or stranger than its type allows.

    peer (DEALER)                      broker (ROUTER)
      Hello ------------------------->   (protocol check)
            <------------------------- Welcome | Error
      PublishShard ------------------>   all ranks in?  -> Announce to subscribers
            <------------------------- Published
      Subscribe --------------------->
            <------------------------- Subscribed, then Announce (latest, and every new one)
                                       (protocol 2: Announced, a digest; the peer fetches
      FetchManifest ----------------->  the manifest it lacks once, by digest, and caches it)
            <------------------------- ManifestBody | Error("version_unavailable")
            <------------------------- Route (relay: where to read each stripe of buckets)
      AcquireLease / ReleaseLease --->   (a version is retired only when no lease holds it)
            <------------------------- LeaseGranted | Error("version_unavailable")
      Heartbeat / Progress / Applied / PullFailed ->   (no reply)
      WaitApplied ------------------->
            <------------------------- AppliedReached (once enough subscribers applied it)
            <------------------------- Retire (to publishers: free that version's memory)
            <------------------------- Withdraw (to subscribers: nobody can read that version)
      RetireVersion / DeleteModel --->   (admin keys only)
            <------------------------- AdminDone | Error("forbidden")
      Heartbeat --------------------->
            <------------------------- Alive (a peer that stops hearing these is cut off)
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from schemas.manifest import (
    MAX_INT,
    Manifest,
    ModelName,
    NonNegative,
    Rank,
    Shard,
    Version,
    WorldSize,
)

__all__ = [
    "MIN_PROTOCOL_VERSION",
    "PROTOCOL_VERSION",
    "AcquireLease",
    "AdminDone",
    "Alive",
    "Announce",
    "Announced",
    "Applied",
    "AppliedReached",
    "DeleteModel",
    "Error",
    "ErrorCode",
    "FetchManifest",
    "Goodbye",
    "Heartbeat",
    "Hello",
    "LeaseGranted",
    "ManifestBody",
    "Message",
    "Progress",
    "PublishShard",
    "Published",
    "PullFailed",
    "RelayOffer",
    "RelaySource",
    "ReleaseLease",
    "Retire",
    "RetireVersion",
    "Role",
    "Route",
    "Subscribe",
    "Subscribed",
    "WaitApplied",
    "Welcome",
    "Wire",
    "Withdraw",
]

PROTOCOL_VERSION = 2
"""2: announcements name the manifest by digest (`Announced`), peers fetch it (`FetchManifest`)."""
MIN_PROTOCOL_VERSION = 1
"""The oldest protocol a broker still serves: a protocol-1 peer gets the whole manifest in
every `Announce`."""

Role = Literal["publisher", "subscriber", "observer"]
ErrorCode = Literal[
    "protocol",
    "incompatible",
    "unknown_peer",
    "unknown_model",
    "version_unavailable",
    "stale_version",
    "bad_request",
    "invalid_manifest",
    "job_conflict",
    "expired",
    "forbidden",
]
RequestId = Annotated[int, msgspec.Meta(ge=0, le=MAX_INT)]
PeerId = Annotated[str, msgspec.Meta(max_length=255)]
"""A ZeroMQ routing id is at most 255 bytes."""
JobId = Annotated[str, msgspec.Meta(max_length=128)]
"""One trainer job (incarnation): every rank of it sends the same id; "" from older peers."""
Host = Annotated[str, msgspec.Meta(max_length=300)]
Detail = Annotated[str, msgspec.Meta(max_length=8192)]
Seconds = Annotated[float, msgspec.Meta(ge=0.0, le=1e9)]
"""Finite, non-negative durations (NaN and infinities fail the bounds)."""
Rate = Annotated[float, msgspec.Meta(ge=0.0, le=1e15)]
Small = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]
ManifestDigest = Annotated[str, msgspec.Meta(min_length=64, max_length=64, pattern=r"^[0-9a-f]+$")]
"""SHA-256 (hex) of a manifest's msgpack encoding, as the broker sends it in `ManifestBody`."""
Endpoint = Annotated[str, msgspec.Meta(max_length=300)]
CurveKey = Annotated[str, msgspec.Meta(max_length=64)]
"""A Z85 CURVE public key (40 characters), or "" for a plain socket."""
PeerName = Annotated[str, msgspec.Meta(max_length=128)]
ManifestSource = Annotated[str, msgspec.Meta(max_length=160)]
"""Where a subscriber took a version's manifest: "broker", or "peer:<name>" (a relay peer's
stable name, at most 128 characters); "" unknown (an older subscriber)."""
MAX_STRIPES = 64
MAX_SOURCES = 64


class Wire(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind"):
    """Base of every control message; `kind` names the type on the wire."""


class Hello(Wire, frozen=True, tag="hello"):
    peer_id: PeerId
    role: Role
    protocol_version: Small = PROTOCOL_VERSION
    host: Host = ""
    pid: Small = 0
    name: Annotated[str, msgspec.Meta(max_length=128)] = ""
    """A stable name for status and metric labels (kept across restarts); default host:pid."""


HeartbeatPace = Annotated[float, msgspec.Meta(ge=0.0, le=3600.0)]
"""Seconds; 0 when the broker asks for no pacing."""


class Welcome(Wire, frozen=True, tag="welcome"):
    broker_id: PeerId
    protocol_version: Small = PROTOCOL_VERSION
    heartbeat_interval_s: Annotated[float, msgspec.Meta(gt=0.0, le=3600.0)] = 1.0
    heartbeat_at_least_s: HeartbeatPace = 0.0
    """Pacing: heartbeat no more often than this (a large fleet; 0: at your own interval)."""


class Error(Wire, frozen=True, tag="error"):
    code: ErrorCode
    detail: Detail
    request_id: RequestId = 0


class Goodbye(Wire, frozen=True, tag="goodbye"):
    reason: Detail = ""


class PublishShard(Wire, frozen=True, tag="publish"):
    request_id: RequestId
    model: ModelName
    version: Version
    rank: Rank
    world_size: WorldSize
    shard: Shard
    job: JobId = ""
    """The trainer job this shard is from: a version's shards all come from one job."""


class Published(Wire, frozen=True, tag="published"):
    request_id: RequestId
    model: ModelName
    version: Version
    complete: bool
    """True once every rank's shard is in and the version was announced."""


class RelayOffer(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A subscriber that serves the verified buckets it holds to other subscribers (relay)."""

    endpoint: Endpoint
    """Its relay server (tcp://host:port), answering reads of the versions it holds."""
    server_key: CurveKey = ""
    """The relay server's CURVE public key, when it encrypts."""


class Subscribe(Wire, frozen=True, tag="subscribe"):
    request_id: RequestId
    model: ModelName
    relay: RelayOffer | None = None
    """Set by a subscriber that serves what it holds: the broker plans it into `Route`s."""


class Subscribed(Wire, frozen=True, tag="subscribed"):
    request_id: RequestId
    model: ModelName
    latest: Version | None = None
    """The newest readable version (its manifest follows as an Announce)."""
    newest: Version | None = None
    """The newest version ever announced, readable or not: a next version must exceed it."""


class Announce(Wire, frozen=True, tag="announce"):
    manifest: Manifest


class Announced(Wire, frozen=True, tag="announced"):
    """Protocol 2: a version is readable; its manifest is the one whose encoding has `digest`."""

    model: ModelName
    version: Version
    digest: ManifestDigest
    nbytes: NonNegative
    """The manifest's encoded size (what `FetchManifest` returns)."""


class FetchManifest(Wire, frozen=True, tag="fetch_manifest"):
    request_id: RequestId
    model: ModelName
    version: Version
    digest: ManifestDigest


class ManifestBody(Wire, frozen=True, tag="manifest_body"):
    """The manifest's msgpack encoding: the peer checks its SHA-256 against the digest, then
    decodes and validates it like any other manifest."""

    request_id: RequestId
    digest: ManifestDigest
    body: Annotated[bytes, msgspec.Meta(max_length=64 * 1024 * 1024)]
    """At most the codec's frame limit (`schemas.codec.MAX_MESSAGE_BYTES`)."""


class RelaySource(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A subscriber to read buckets from: its stable name and its relay server."""

    name: PeerName
    endpoint: Endpoint
    server_key: CurveKey = ""


class Route(Wire, frozen=True, tag="route"):
    """Relay: where this subscriber reads each bucket of `version` (sent with the announcement,
    and again when the plan changes). Bucket b belongs to stripe b % fanout; `parents[s]` is the
    holder to read stripe s from (None: the trainer). `fallbacks` are other holders to try, in
    order, when a parent fails; the trainer's locators in the manifest come last."""

    model: ModelName
    version: Version
    fanout: Annotated[int, msgspec.Meta(ge=1, le=MAX_STRIPES)]
    parents: Annotated[list[RelaySource | None], msgspec.Meta(max_length=MAX_STRIPES)]
    fallbacks: Annotated[list[RelaySource], msgspec.Meta(max_length=MAX_SOURCES)] = []


class AcquireLease(Wire, frozen=True, tag="lease"):
    request_id: RequestId
    model: ModelName
    version: Version


class LeaseGranted(Wire, frozen=True, tag="lease_granted"):
    request_id: RequestId
    model: ModelName
    version: Version
    ttl_s: Seconds


class ReleaseLease(Wire, frozen=True, tag="release"):
    model: ModelName
    version: Version


class Heartbeat(Wire, frozen=True, tag="heartbeat"):
    applied: Annotated[dict[ModelName, Version], msgspec.Meta(max_length=1024)] = {}


class Progress(Wire, frozen=True, tag="progress"):
    model: ModelName
    version: Version
    bytes_done: NonNegative
    bytes_total: NonNegative
    bytes_per_s: Rate = 0.0
    state: Literal["pulling", "staged"] = "pulling"
    sources: Annotated[dict[PeerName, NonNegative], msgspec.Meta(max_length=MAX_SOURCES)] = {}
    """Relay: bytes verified so far per source ("" for the trainer, else the holder's name)."""


class Applied(Wire, frozen=True, tag="applied"):
    model: ModelName
    version: Version
    pull_s: Seconds = 0.0
    pause_s: Seconds = 0.0
    bytes_total: NonNegative = 0
    manifest_source: ManifestSource = ""
    """Where this version's manifest came from (`ManifestSource`); "" from older peers."""


class PullFailed(Wire, frozen=True, tag="pull_failed"):
    model: ModelName
    version: Version
    reason: Detail


class WaitApplied(Wire, frozen=True, tag="wait_applied"):
    request_id: RequestId
    model: ModelName
    version: Version
    num_subscribers: Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)]


class AppliedReached(Wire, frozen=True, tag="applied_reached"):
    request_id: RequestId
    model: ModelName
    version: Version
    num_subscribers: Small


class Retire(Wire, frozen=True, tag="retire"):
    model: ModelName
    version: Version
    reason: Annotated[str, msgspec.Meta(max_length=1024)] = ""
    """Why, when it is not the normal end of a version (a pending version expired, say)."""


class Withdraw(Wire, frozen=True, tag="withdraw"):
    """A version announced earlier can no longer be read (its publisher is gone): drop it."""

    model: ModelName
    version: Version
    reason: Annotated[str, msgspec.Meta(max_length=1024)] = ""


class RetireVersion(Wire, frozen=True, tag="admin_retire"):
    """Admin: stop serving a version (retired once no lease holds it)."""

    request_id: RequestId
    model: ModelName
    version: Version


class DeleteModel(Wire, frozen=True, tag="admin_delete"):
    """Admin: forget a model, every version and its owner; its publishers get Retire."""

    request_id: RequestId
    model: ModelName


class AdminDone(Wire, frozen=True, tag="admin_done"):
    request_id: RequestId
    detail: Annotated[str, msgspec.Meta(max_length=2000)] = ""


class Alive(Wire, frozen=True, tag="alive"):
    """The broker's answer to a Heartbeat: it still hears this peer on this routing id."""

    heartbeat_at_least_s: HeartbeatPace = 0.0
    """The broker's pacing now, as in `Welcome` (it changes as the fleet grows or shrinks)."""


Message = (
    Hello
    | Welcome
    | Error
    | Goodbye
    | PublishShard
    | Published
    | Subscribe
    | Subscribed
    | Announce
    | Announced
    | FetchManifest
    | ManifestBody
    | Route
    | AcquireLease
    | LeaseGranted
    | ReleaseLease
    | Heartbeat
    | Progress
    | Applied
    | PullFailed
    | WaitApplied
    | AppliedReached
    | Retire
    | Withdraw
    | RetireVersion
    | DeleteModel
    | AdminDone
    | Alive
)
