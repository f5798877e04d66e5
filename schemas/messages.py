"""Control messages between peers and the broker: one tagged union, msgpack on the wire.

Every message is a frozen msgspec Struct whose `kind` tag names it on the wire; the tags are
stable strings, so renaming a class never changes the protocol. New fields go last with
defaults. Requests carry a `request_id` that the reply echoes.

    peer (DEALER)                      broker (ROUTER)
      Hello ------------------------->   (protocol check)
            <------------------------- Welcome | Error
      PublishShard ------------------>   all ranks in?  -> Announce to subscribers
            <------------------------- Published
      Subscribe --------------------->
            <------------------------- Subscribed, then Announce (latest, and every new one)
      AcquireLease / ReleaseLease --->   (a version is retired only when no lease holds it)
            <------------------------- LeaseGranted | Error("version_unavailable")
      Heartbeat / Progress / Applied / PullFailed ->   (no reply)
      WaitApplied ------------------->
            <------------------------- AppliedReached (once enough subscribers applied it)
            <------------------------- Retire (to publishers: free that version's memory)
      RetireVersion / DeleteModel --->   (admin keys only)
            <------------------------- AdminDone | Error("forbidden")
      Heartbeat --------------------->
            <------------------------- Alive (a peer that stops hearing these is cut off)
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from schemas.manifest import Manifest, ModelName, Shard, Version

__all__ = [
    "PROTOCOL_VERSION",
    "AcquireLease",
    "AdminDone",
    "Alive",
    "Announce",
    "Applied",
    "AppliedReached",
    "DeleteModel",
    "Error",
    "ErrorCode",
    "Goodbye",
    "Heartbeat",
    "Hello",
    "LeaseGranted",
    "Message",
    "Progress",
    "PublishShard",
    "Published",
    "PullFailed",
    "ReleaseLease",
    "Retire",
    "RetireVersion",
    "Role",
    "Subscribe",
    "Subscribed",
    "WaitApplied",
    "Welcome",
    "Wire",
]

PROTOCOL_VERSION = 1

Role = Literal["publisher", "subscriber", "observer"]
ErrorCode = Literal[
    "protocol",
    "incompatible",
    "unknown_peer",
    "unknown_model",
    "version_unavailable",
    "stale_version",
    "bad_request",
    "forbidden",
]
RequestId = Annotated[int, msgspec.Meta(ge=0)]
NonNegative = Annotated[int, msgspec.Meta(ge=0)]


class Wire(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind"):
    """Base of every control message; `kind` names the type on the wire."""


class Hello(Wire, frozen=True, tag="hello"):
    peer_id: str
    role: Role
    protocol_version: int = PROTOCOL_VERSION
    host: str = ""
    pid: int = 0


class Welcome(Wire, frozen=True, tag="welcome"):
    broker_id: str
    protocol_version: int = PROTOCOL_VERSION
    heartbeat_interval_s: float = 1.0


class Error(Wire, frozen=True, tag="error"):
    code: ErrorCode
    detail: str
    request_id: RequestId = 0


class Goodbye(Wire, frozen=True, tag="goodbye"):
    reason: str = ""


class PublishShard(Wire, frozen=True, tag="publish"):
    request_id: RequestId
    model: ModelName
    version: Version
    rank: NonNegative
    world_size: Annotated[int, msgspec.Meta(ge=1)]
    shard: Shard


class Published(Wire, frozen=True, tag="published"):
    request_id: RequestId
    model: str
    version: Version
    complete: bool
    """True once every rank's shard is in and the version was announced."""


class Subscribe(Wire, frozen=True, tag="subscribe"):
    request_id: RequestId
    model: ModelName


class Subscribed(Wire, frozen=True, tag="subscribed"):
    request_id: RequestId
    model: str
    latest: Version | None = None


class Announce(Wire, frozen=True, tag="announce"):
    manifest: Manifest


class AcquireLease(Wire, frozen=True, tag="lease"):
    request_id: RequestId
    model: ModelName
    version: Version


class LeaseGranted(Wire, frozen=True, tag="lease_granted"):
    request_id: RequestId
    model: str
    version: Version
    ttl_s: float


class ReleaseLease(Wire, frozen=True, tag="release"):
    model: ModelName
    version: Version


class Heartbeat(Wire, frozen=True, tag="heartbeat"):
    applied: dict[str, int] = {}


class Progress(Wire, frozen=True, tag="progress"):
    model: ModelName
    version: Version
    bytes_done: NonNegative
    bytes_total: NonNegative
    bytes_per_s: float = 0.0


class Applied(Wire, frozen=True, tag="applied"):
    model: ModelName
    version: Version
    pull_s: float = 0.0
    pause_s: float = 0.0
    bytes_total: NonNegative = 0


class PullFailed(Wire, frozen=True, tag="pull_failed"):
    model: ModelName
    version: Version
    reason: str


class WaitApplied(Wire, frozen=True, tag="wait_applied"):
    request_id: RequestId
    model: ModelName
    version: Version
    num_subscribers: Annotated[int, msgspec.Meta(ge=1)]


class AppliedReached(Wire, frozen=True, tag="applied_reached"):
    request_id: RequestId
    model: str
    version: Version
    num_subscribers: int


class Retire(Wire, frozen=True, tag="retire"):
    model: str
    version: Version


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
    | RetireVersion
    | DeleteModel
    | AdminDone
    | Alive
)
