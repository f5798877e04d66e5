"""Who may do what on the control plane: CURVE keys, the allowlist, rights per model.

Identity is a key, never a claim. The broker's ROUTER is a CURVE server; pyzmq's
`AsyncioAuthenticator` (ZAP) admits a client only if its public key is in the allowlist and
stamps every message of that connection with the key's name (the frame property `User-Id`).
The broker then binds each routing id to the key that said Hello with it, and asks `Guard`
before it handles any message:

    CURVE handshake ── ZAP: key in allowlist? ──no──> connection refused (our code never runs)
          │ yes, User-Id = key name
    recv(copy=False) ── routing id bound to another key? ──yes──> Error("forbidden")
          │
    Guard.authorize(principal, message) ── rights, owner, version bound ──> Error("forbidden")
          │
    Broker._handle

The allowlist is a TOML file of keys and their rights::

    [[key]]
    name = "trainer"                          # what logs, status and the owner rule show
    public_key = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"   # z85, 40 characters
    publish = ["policy"]                      # models this key may publish ("*": any)
    subscribe = []                            # models this key may follow, lease, report on
    admin = false                             # may retire versions and delete models

Keys are z85 certificate files as `zmq.auth.create_certificates` writes them (`NAME.key`
public, `NAME.key_secret` both halves); `weightstream keys new` makes them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import msgspec
import zmq
import zmq.asyncio
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator

from schemas.messages import (
    AcquireLease,
    Applied,
    DeleteModel,
    FetchManifest,
    Heartbeat,
    Message,
    Progress,
    PublishShard,
    PullFailed,
    ReleaseLease,
    RetireVersion,
    Subscribe,
    WaitApplied,
)
from streamer.errors import BrokerError, StreamerError

if TYPE_CHECKING:
    from streamer.config import BrokerConfig

__all__ = [
    "ANONYMOUS",
    "CLOSED_HANDSHAKES",
    "HANDSHAKE_EVENTS",
    "Allowlist",
    "AuthError",
    "CurveKeys",
    "Forbidden",
    "Grant",
    "Guard",
    "Principal",
    "create_keys",
    "is_loopback",
    "load_keys",
    "load_public_key",
    "make_local_keys",
    "read_token",
    "render_grants",
    "security_mode",
    "start_authenticator",
]

logger = logging.getLogger(__name__)

ZAP_DOMAIN = "weightstream"
ANY_MODEL = "*"
FIRST_VERSION_LIMIT = 2**53
"""The largest first version of a model (a global step fits; 2^64-1 does not)."""
_MAX_KEYS = 10_000
HANDSHAKE_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
"""The CURVE handshake events a client of the broker watches (`BrokerClient`, `NodeLink`)."""
CLOSED_HANDSHAKES = 3
"""Handshakes in a row the broker closes before they complete (no success between) that
mean the two sides disagree on keys: a keyless client's greeting to a CURVE broker is often
answered only by the connection closing (the mechanism mismatch seen by the broker first), not
by a protocol error. One or two are a broker restarting."""
_Z85 = r"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$"

KeyName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]
Z85Key = Annotated[str, msgspec.Meta(pattern=_Z85)]
ModelPattern = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class AuthError(StreamerError):
    """A key file, token file or allowlist is missing or malformed, or a key was refused."""


class Forbidden(BrokerError):
    """The authenticated key has no right to do this (wire code `forbidden`)."""

    def __init__(self, detail: str) -> None:
        super().__init__("forbidden", detail)


# keys


@dataclass(frozen=True)
class CurveKeys:
    """One side's CURVE key pair (z85 bytes, 40 characters each)."""

    public: bytes
    secret: bytes


def create_keys(name: str, out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write `NAME.key` (public) and `NAME.key_secret` (owner-only) into `out_dir`.

    >>> public, secret = create_keys("trainer", tmp_path)  # doctest: +SKIP
    """
    msgspec.convert(name, KeyName)  # the same rule as the allowlist's names
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    for path in (directory / f"{name}.key", directory / f"{name}.key_secret"):
        if path.exists():
            raise AuthError(f"{path} exists; pick another --name or remove it first")
    # The secret file is created owner-only before the key is written into it.
    secret_path = directory / f"{name}.key_secret"
    secret_path.touch(mode=0o600)
    public, secret = zmq.auth.create_certificates(directory, name)
    os.chmod(secret, 0o600)
    return Path(public), Path(secret)


def load_keys(path: str | os.PathLike[str]) -> CurveKeys:
    """Both halves from a `.key_secret` file; raises `AuthError` saying what is wrong."""
    public, secret = _load(path)
    if secret is None:
        raise AuthError(f"{path} holds only a public key; pass the .key_secret file")
    return CurveKeys(public=public, secret=secret)


def load_public_key(path: str | os.PathLike[str]) -> bytes:
    """The public half from a `.key` or `.key_secret` file."""
    return _load(path)[0]


def _load(path: str | os.PathLike[str]) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise AuthError(
            f"cannot read a CURVE key from {path}: {exc} (make one with `weightstream keys new`)"
        ) from exc
    return public, secret


def read_token(path: str | os.PathLike[str]) -> str:
    """A bearer token from a file (whitespace stripped); never logged."""
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise AuthError(f"cannot read the token file {path}: {exc.strerror}") from exc
    if len(token) < 16:
        raise AuthError(f"the token in {path} is shorter than 16 characters; use a random one")
    return token


# the allowlist


class Grant(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One allowlist entry: a public key, its name, its rights."""

    name: KeyName
    public_key: Z85Key
    publish: Annotated[list[ModelPattern], msgspec.Meta(max_length=1000)] = []
    subscribe: Annotated[list[ModelPattern], msgspec.Meta(max_length=1000)] = []
    admin: bool = False


def render_grants(grants: list[Grant]) -> str:
    """The allowlist TOML for `grants` (what `Allowlist.load` reads back).

    >>> print(render_grants([Grant(name="a", public_key="0" * 40, publish=["m"])]))  # doctest: +SKIP
    """
    lines: list[str] = []
    for grant in grants:
        # json.dumps of names, z85 keys and model names is a valid TOML basic string.
        lines += [
            "[[key]]",
            f"name = {json.dumps(grant.name)}",
            f"public_key = {json.dumps(grant.public_key)}",
            f"publish = {json.dumps(grant.publish)}",
            f"subscribe = {json.dumps(grant.subscribe)}",
            f"admin = {'true' if grant.admin else 'false'}",
            "",
        ]
    return "\n".join(lines)


class _AllowlistFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    key: Annotated[list[Grant], msgspec.Meta(max_length=_MAX_KEYS)] = []


@dataclass(frozen=True)
class Principal:
    """An authenticated key: its name and what it may do."""

    name: str
    publish: frozenset[str] = frozenset()
    subscribe: frozenset[str] = frozenset()
    admin: bool = False

    def may_publish(self, model: str) -> bool:
        return ANY_MODEL in self.publish or model in self.publish

    def may_subscribe(self, model: str) -> bool:
        return ANY_MODEL in self.subscribe or model in self.subscribe

    def describe(self) -> str:
        parts = [f"publish {sorted(self.publish)}" if self.publish else "",
                 f"subscribe {sorted(self.subscribe)}" if self.subscribe else "",
                 "admin" if self.admin else ""]  # fmt: skip
        return ", ".join(p for p in parts if p) or "nothing"


ANONYMOUS = Principal(
    "anonymous", publish=frozenset({ANY_MODEL}), subscribe=frozenset({ANY_MODEL}), admin=True
)
"""Every peer of a broker without keys (loopback, or `--insecure`): all rights."""


class Allowlist:
    """Public keys -> principals, read once from a TOML file."""

    def __init__(self, grants: list[Grant]) -> None:
        self.by_key: dict[bytes, Principal] = {}
        self.by_name: dict[str, Principal] = {}
        self._refused: set[bytes] = set()
        for grant in grants:
            key = grant.public_key.encode("ascii")
            if len(zmq.utils.z85.decode(key)) != 32:
                raise AuthError(f"key {grant.name!r}: public_key is not a 32-byte z85 key")
            if key in self.by_key or grant.name in self.by_name:
                raise AuthError(f"key {grant.name!r} appears twice in the allowlist")
            principal = Principal(
                grant.name,
                publish=frozenset(grant.publish),
                subscribe=frozenset(grant.subscribe),
                admin=grant.admin,
            )
            self.by_key[key] = principal
            self.by_name[grant.name] = principal

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Allowlist:
        try:
            with open(path, "rb") as file:
                data = tomllib.load(file)
        except OSError as exc:
            raise AuthError(f"cannot read the allowlist {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise AuthError(f"the allowlist {path} is not valid TOML: {exc}") from exc
        try:
            parsed = msgspec.convert(data, _AllowlistFile)
        except msgspec.ValidationError as exc:
            raise AuthError(f"bad allowlist {path}: {exc}") from exc
        return cls(list(parsed.key))

    def callback(self, domain: str, key: bytes) -> bool:
        """pyzmq's credentials callback: is this z85 public key allowed?"""
        if key in self.by_key:
            return True
        # Warn once per refused key (a bounded set), so that a flood of them cannot flood the log.
        if key not in self._refused and len(self._refused) < _MAX_KEYS:
            self._refused.add(key)
            logger.warning("refused an unknown CURVE key key=%s", key.decode("ascii", "replace"))
        return False


class _AllowlistAuthenticator(AsyncioAuthenticator):
    """ZAP handler whose User-Id is the key's name in the allowlist (not its z85 text)."""

    def __init__(self, context: zmq.asyncio.Context, allowlist: Allowlist) -> None:
        super().__init__(context, log=logging.getLogger("streamer.auth.zap"))
        self.allowlist = allowlist

    def curve_user_id(self, client_public_key: bytes) -> str:
        z85 = zmq.utils.z85.encode(client_public_key)
        return self.allowlist.by_key[z85].name


def start_authenticator(context: zmq.asyncio.Context, allowlist: Allowlist) -> AsyncioAuthenticator:
    """Run ZAP for `context` in this event loop; the caller `stop()`s it."""
    authenticator = _AllowlistAuthenticator(context, allowlist)
    authenticator.start()
    authenticator.configure_curve_callback(ZAP_DOMAIN, credentials_provider=allowlist)
    return authenticator


def security_mode(config: BrokerConfig) -> str:
    """`curve` (keys), `loopback` (no keys, loopback only) or `insecure`; refuses the rest.

    A broker off loopback without keys would let anyone on the network publish weights into
    every engine, so it starts only when told `insecure`.
    """
    if config.key_file is not None:
        if config.allowlist_file is None:
            raise AuthError(
                "a broker with --key-file needs --allowlist-file: the keys it admits and their "
                "rights (see docs/security.md)"
            )
        return "curve"
    if config.allowlist_file is not None:
        raise AuthError("--allowlist-file needs --key-file (the broker's own CURVE key pair)")
    if is_loopback(config.endpoint):
        return "loopback"
    if config.insecure:
        return "insecure"
    raise AuthError(
        f"refusing to bind {config.endpoint} without keys: off loopback anyone who reaches it "
        "could publish weights. Make keys (`weightstream keys new`) and pass --key-file and "
        "--allowlist-file, or pass --insecure on a network you trust"
    )


def is_loopback(endpoint: str) -> bool:
    """True for ipc/inproc endpoints and tcp on 127.0.0.0/8, ::1 or localhost."""
    transport, _, address = endpoint.partition("://")
    if transport in ("ipc", "inproc"):
        return True
    host = re.sub(r":\d+$|:\*$", "", address).strip("[]")
    return host == "localhost" or host == "::1" or host.startswith("127.")


# rights


@dataclass
class Guard:
    """The broker's rules, asked before each message is handled.

    `owners` (model -> key name) records which key published a model's latest version: only
    that key may claim its next one. It holds one entry per model the registry has.
    """

    max_version_jump: int
    owners: dict[str, str]

    def authorize(self, principal: Principal, message: Message, latest: int | None) -> None:
        """Raise `Forbidden` unless `principal` may send `message`; `latest` is its model's."""
        match message:
            case PublishShard(model=model, version=version):
                self._publish(principal, model, version, latest)
            case Subscribe(model=model) | FetchManifest(model=model) if principal.may_publish(
                model
            ):
                pass  # a trainer may follow its own model (`publish --versions next:N`)
            case (
                Subscribe(model=model)
                | FetchManifest(model=model)
                | AcquireLease(model=model)
                | ReleaseLease(model=model)
                | Progress(model=model)
                | Applied(model=model)
                | PullFailed(model=model)
            ):
                if not principal.may_subscribe(model):
                    raise Forbidden(
                        f"key {principal.name!r} is not a subscriber of {model!r} "
                        f"(it may: {principal.describe()}); ask the operator to add it to the allowlist"
                    )
            case Heartbeat(applied=applied):
                foreign = sorted(m for m in applied if not principal.may_subscribe(m))
                if foreign:
                    raise Forbidden(
                        f"key {principal.name!r} reports versions of {foreign[:5]}, "
                        "which it is not a subscriber of"
                    )
            case WaitApplied(model=model):
                if not (principal.may_publish(model) or principal.admin):
                    raise Forbidden(
                        f"key {principal.name!r} may not wait on {model!r}: only its publishers "
                        "and admins may"
                    )
            case RetireVersion() | DeleteModel():
                if not principal.admin:
                    raise Forbidden(f"key {principal.name!r} is not an admin")
            case _:
                pass  # Hello, Goodbye: any authenticated key

    def _publish(self, principal: Principal, model: str, version: int, latest: int | None) -> None:
        if not principal.may_publish(model):
            raise Forbidden(
                f"key {principal.name!r} may not publish {model!r} "
                f"(it may: {principal.describe()}); ask the operator to add it to the allowlist"
            )
        owner = self.owners.get(model)
        if owner is not None and owner != principal.name:
            raise Forbidden(
                f"{model!r} belongs to key {owner!r}, which published its latest version; "
                "an admin can delete the model to hand it over"
            )
        if latest is None and version > FIRST_VERSION_LIMIT:
            raise Forbidden(
                f"version {version} is above {FIRST_VERSION_LIMIT}, the largest first version "
                "of a model; refused so that no publish can exhaust the version space"
            )
        if latest is not None and version > latest + self.max_version_jump:
            raise Forbidden(
                f"version {version} of {model!r} is more than {self.max_version_jump} past "
                f"the latest ({latest}); refused so that no publish can exhaust the version space"
            )

    dirty: bool = False
    """True when `owners` changed since the last `snapshot()`."""

    def claimed(self, model: str, principal: Principal) -> None:
        """`principal`'s shard of `model` was accepted: it owns the model from now on."""
        if self.owners.get(model) != principal.name:
            self.owners[model] = principal.name
            self.dirty = True

    def forget(self, model: str) -> None:
        if self.owners.pop(model, None) is not None:
            self.dirty = True

    def snapshot(self) -> bytes:
        """The owners, for the broker's state directory (a restart keeps who owns what)."""
        self.dirty = False
        return msgspec.json.encode(self.owners)

    def restore(self, data: bytes) -> None:
        try:
            owners = msgspec.json.decode(data, type=dict[str, str])
        except msgspec.DecodeError as exc:
            raise AuthError(f"the saved model owners are unreadable: {exc}") from exc
        self.owners.update(owners)


def make_local_keys(directory: str | Path, *, model: str) -> dict[str, Path]:
    """Key pairs for a one-machine setup (the demo, the CPU benchmark): `broker`, `trainer`
    (publisher of `model`) and `subscriber` (subscriber of `model`), and the allowlist naming
    them. Returns their paths: NAME (secret), NAME.public, and allowlist."""
    rights = {"trainer": ([model], []), "subscriber": ([], [model])}
    directory = Path(directory)
    paths: dict[str, Path] = {}
    grants: list[Grant] = []
    for name in ("broker", "trainer", "subscriber"):
        public, secret = create_keys(name, directory)
        paths[name], paths[f"{name}.public"] = Path(secret), Path(public)
        if name in rights:
            publish, subscribe = rights[name]
            key = load_public_key(public).decode()
            grants.append(Grant(name=name, public_key=key, publish=publish, subscribe=subscribe))
    paths["allowlist"] = directory / "allowlist.toml"
    paths["allowlist"].write_text(render_grants(grants))
    return paths
