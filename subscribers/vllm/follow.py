"""A vLLM engine that stays on the newest version by itself: a Subscriber driving a VllmSwapper.

    broker ── Announce ──> Subscriber.run()                 (its own event loop and task)
                             │ check: names and shapes vs the engine's checkpoint
                             │ pull into Staging(shm_name)  (the engine keeps generating)
                             ▼
                           VllmSwapper.swap_in
      server  (AsyncLLM)  on the API server's loop: pause -> start/update/finish -> resume
      offline (LLM)       handed to the thread that owns the LLM: WeightStream.generate()
                          applies it before its next generate call, apply_latest() on demand

`follow()` is the coroutine both modes run: `WeightStream` runs it on a background thread for
an offline `LLM`; `subscribers.vllm.server` runs it on the API server's event loop. Failed
pulls follow the Subscriber's policy: reported to the broker (its /v1/subscribers shows
`last_error`), the engine stays on its version, the next version is tried as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import threading
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec
import zmq.asyncio

from streamer.client import connect
from streamer.config import ClientConfig
from streamer.signing_keys import load_trusted_keys
from streamer.transport.choice import make_receivers, parse_transports, receiver_names
from subscribers.staging import Staging
from subscribers.subscriber import FollowerStopped, PullConfig, Subscriber
from subscribers.vllm.swap import PauseMode, VllmSwapper

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from types import TracebackType

    from schemas.manifest import Manifest
    from streamer.signing_keys import TrustedKeys
    from streamer.transport.base import BulkReceiver
    from subscribers.pull import PullReport
    from subscribers.swap import SwapReport

__all__ = [
    "FollowConfig",
    "FollowStatus",
    "WeightStream",
    "follow",
    "transport_names",
]

logger = logging.getLogger(__name__)


ENV_PREFIX = "WEIGHTSTREAM_"


class FollowConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What a following engine needs to know; `from_env` reads it from WEIGHTSTREAM_* vars."""

    model: str
    """The model name the trainer publishes under."""
    broker: str = "tcp://127.0.0.1:5555"
    transport: str = "auto"
    """`auto` (shm, then mooncake or zmq) or a comma-separated list of mooncake, zmq, shm,
    in order of preference; shm maps a same-host publisher's memory instead of copying it."""
    host: str = "127.0.0.1"
    """This machine's address as publishers reach it (mooncake)."""
    protocol: Literal["tcp", "rdma"] = "tcp"
    """mooncake's protocol (WEIGHTSTREAM_PROTOCOL): tcp, or rdma where both sides have RDMA NICs."""
    model_path: str | None = None
    """The engine's checkpoint directory (default: the engine's own model path)."""
    pause_mode: PauseMode = "wait"
    """Server mode: "wait" lets requests in flight finish on the old version (see docs)."""
    shm_name: str | None = None
    """Name of the staging file in /dev/shm (default: unique per process)."""
    applied: int | None = None
    """The version the engine's checkpoint already is, if it is a published one."""
    pull: PullConfig = msgspec.field(default_factory=PullConfig)
    key_file: str | None = None
    """This engine's CURVE key pair (WEIGHTSTREAM_KEY_FILE; docs/security.md)."""
    broker_key_file: str | None = None
    """The broker's public key (WEIGHTSTREAM_BROKER_KEY_FILE)."""
    trust: str = ""
    """Comma-separated publisher public key files: apply only versions they signed."""
    name: Annotated[str, msgspec.Meta(max_length=128)] = ""
    """This engine's stable name in status and metric labels (WEIGHTSTREAM_NAME), kept across
    its restarts, e.g. node-3/gpu-0 (default host:pid, which changes with every restart)."""

    def __post_init__(self) -> None:
        transport_names(self.transport)  # raises ValueError on a bad list

    def trusted_keys(self) -> TrustedKeys | None:
        """The keys `trust` names, read now (ValueError or OSError for a bad file)."""
        return load_trusted_keys(self.trust.split(",")) if self.trust else None

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> FollowConfig:
        """WEIGHTSTREAM_MODEL (required), _BROKER, _TRANSPORT, _HOST, _PROTOCOL, _MODEL_PATH, _PAUSE_MODE,
        _SHM_NAME, _APPLIED, _KEY_FILE, _BROKER_KEY_FILE, _TRUST, _NAME; raises ValueError naming
        the bad variable."""
        fields: dict[str, Any] = {}
        for name in cls.__struct_fields__:
            value = environ.get(ENV_PREFIX + name.upper())
            if value and name != "pull":
                fields[name] = value
        if "model" not in fields:
            raise ValueError(f"set {ENV_PREFIX}MODEL to the model name the trainer publishes")
        try:
            return msgspec.convert(fields, cls, strict=False)
        except msgspec.ValidationError as exc:
            raise ValueError(f"bad {ENV_PREFIX}* configuration: {exc}") from exc


@dataclass
class FollowStatus:
    """What a following engine is doing; updated by the follower, read by anyone."""

    model: str
    applied: int | None = None
    pulling: int | None = None
    staged: int | None = None
    """Pulled and verified, waiting for the engine (offline: the next `ws.generate`)."""
    failed: int | None = None
    """The last version that failed (pull, checksum, or a manifest that does not fit)."""
    last_error: str | None = None
    """Why the last version failed; cleared once a later version applies."""
    failures: int = 0
    last_pull_s: float | None = None
    last_pause_s: float | None = None
    connected: bool = False
    restarts: int = 0
    """Times the follower stopped on an error outside its policy and was started again."""
    restart_in_s: float | None = None
    """Set while a stopped follower waits to be started again."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Following(Subscriber):
    """A Subscriber that records what it is doing in a `FollowStatus`."""

    def __init__(
        self, *, status: FollowStatus, changed: threading.Condition, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.status = status
        self.changed = changed

    def _update(self, **changes: Any) -> None:
        with self.changed:
            for name, value in changes.items():
                setattr(self.status, name, value)
            self.changed.notify_all()

    async def apply(self, manifest: Manifest) -> None:
        self._update(pulling=manifest.version)
        try:
            await super().apply(manifest)
        except Exception as exc:  # recorded for status, then raised on: never swallowed
            self._update(
                failed=manifest.version,
                last_error=f"version {manifest.version}: {type(exc).__name__}: {exc}",
                failures=self.status.failures + 1,
            )
            raise
        finally:
            self._update(pulling=None, staged=None)

    async def _pull_and_stage(self, manifest: Manifest) -> PullReport:
        # The pull is over once the bytes are staged; an offline engine may then wait long
        # for its thread (the next ws.generate): status says "staged", not "pulling".
        report = await super()._pull_and_stage(manifest)
        self._update(pulling=None, staged=manifest.version)
        return report


def transport_names(transport: str) -> list[str]:
    """`auto` -> shm then mooncake (zmq without mooncake); else the comma-separated list."""
    return receiver_names(parse_transports(transport))


def _shm_name(model: str) -> str:
    return f"weightstream-{re.sub(r'[^A-Za-z0-9._-]', '_', model)}-{os.getpid()}-{secrets.token_hex(3)}"


async def follow(
    config: FollowConfig,
    swapper: VllmSwapper,
    status: FollowStatus,
    *,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Follow `config.model` until cancelled: pull each new version and swap it in.

    `on_ready` runs once the broker has answered our Hello. The staging file in /dev/shm
    is removed on the way out.
    """
    ctx = zmq.asyncio.Context()
    receivers: list[BulkReceiver] = []
    staging: Staging | None = None
    spare: Staging | None = None

    async def on_applied(manifest: Manifest, pull: PullReport, swap: SwapReport) -> None:
        with swapper.changed:
            status.applied = manifest.version
            status.last_error = None  # the failure it named is behind the engine now
            status.last_pull_s = round(pull.seconds, 4)
            status.last_pause_s = round(swap.pause_s, 4)
            swapper.changed.notify_all()

    try:
        trusted_keys = config.trusted_keys()
        receivers = make_receivers(
            parse_transports(config.transport), host=config.host, protocol=config.protocol
        )
        shm_name = config.shm_name or _shm_name(config.model)
        staging = Staging(receivers=receivers, shm_name=shm_name)
        # The applied version's staging stays intact until the next applies: a failed update
        # reloads it (the price: two versions in /dev/shm).
        spare = Staging(receivers=receivers, shm_name=f"{shm_name}-spare")
        async with connect(
            ClientConfig(
                broker=config.broker,
                key_file=config.key_file,
                broker_key_file=config.broker_key_file,
                name=config.name,
            ),
            role="subscriber",
            context=ctx,
        ) as client:
            subscriber = _Following(
                status=status,
                changed=swapper.changed,
                client=client,
                receivers=receivers,
                swapper=swapper,
                model=config.model,
                config=config.pull,
                staging=staging,
                spare_staging=spare,
                applied=config.applied,
                on_applied=on_applied,
                trusted_keys=trusted_keys,
            )
            status.connected = True
            logger.info(
                "following model=%s broker=%s shm=%s applied=%s",
                config.model,
                config.broker,
                staging.shm_name,
                config.applied,
            )
            if on_ready is not None:
                on_ready()
            await subscriber.run()
    finally:
        status.connected = False
        for each in (staging, spare):
            if each is not None:
                each.close()
        for receiver in receivers:
            receiver.close()
        ctx.destroy(linger=0)


class WeightStream:
    """An offline `vllm.LLM` that follows a model's versions while it generates.

    Pulls run on a background thread with its own event loop; each pulled version is
    applied on the thread that calls `generate` (vLLM's offline engine is not thread-safe),
    right before the next generate call, so a generate call never spans two versions.

    >>> llm = LLM(model=path, weight_transfer_config={"backend": "weightstream"})
    >>> with WeightStream.follow(llm, broker="tcp://trainer:5555", model="llama") as ws:
    ...     outputs = ws.generate(prompts, params)    # on the newest version pulled so far
    ...     ws.apply_latest(min_version=7, timeout_s=60)  # on-policy: wait for version 7
    """

    def __init__(self, llm: Any, config: FollowConfig) -> None:
        config.trusted_keys()  # a bad key file fails here, in the caller's thread
        self.llm = llm
        self.config = config
        self.swapper = VllmSwapper(llm, model_path=config.model_path)
        self.status = FollowStatus(model=config.model, applied=config.applied)
        self.version: int | None = config.applied
        """The version the engine runs now (None: its start-up checkpoint)."""
        if config.applied is not None:
            self.swapper.label(config.applied)
        self._warned_direct = False
        # `llm.generate` itself, kept so that a direct call can warn while a version waits.
        self._generate = llm.generate
        llm.generate = self._direct_generate
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._thread = threading.Thread(target=self._run, name="weightstream-follow", daemon=True)

    @classmethod
    def follow(
        cls,
        llm: Any,
        *,
        model: str,
        broker: str = "tcp://127.0.0.1:5555",
        model_path: str | None = None,
        transport: str = "auto",
        host: str = "127.0.0.1",
        protocol: Literal["tcp", "rdma"] = "tcp",
        applied: int | None = None,
        pull: PullConfig | None = None,
        connect_timeout_s: float = 30.0,
        key_file: str | None = None,
        broker_key_file: str | None = None,
        trust: str = "",
    ) -> WeightStream:
        """Start following; returns once the broker has answered (raises if it does not)."""
        config = FollowConfig(
            model=model,
            broker=broker,
            transport=transport,
            host=host,
            protocol=protocol,
            model_path=model_path,
            applied=applied,
            pull=pull or PullConfig(),
            key_file=key_file,
            broker_key_file=broker_key_file,
            trust=trust,
        )
        stream = cls(llm, config)
        stream.start(connect_timeout_s)
        return stream

    def start(self, connect_timeout_s: float = 30.0) -> None:
        self._thread.start()
        if not self._ready.wait(connect_timeout_s):
            self.close()
            raise TimeoutError(f"no broker answered at {self.config.broker}")
        if self._error is not None:
            self.close()
            raise self._error

    def _run(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        try:
            await follow(self.config, self.swapper, self.status, on_ready=self._ready.set)
        except Exception as exc:  # noqa: BLE001 - kept and raised by apply_latest, never silent
            logger.error("weightstream follower stopped: %s: %s", type(exc).__name__, exc)  # noqa: TRY400
            self._error = exc
        finally:
            self._ready.set()
            with self.swapper.changed:
                self.swapper.changed.notify_all()

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """`llm.generate(...)`, on the newest version pulled so far."""
        self.apply_latest()
        return self._generate(*args, **kwargs)

    def _direct_generate(self, *args: Any, **kwargs: Any) -> Any:
        """`llm.generate` while following: as before, but says once that staged versions wait."""
        staged = self.swapper.staged
        if staged is not None and not self._warned_direct:
            self._warned_direct = True
            logger.warning(
                "llm.generate called while version=%d is staged: it runs on version=%s; staged "
                "versions apply only in ws.generate(...) or ws.apply_latest()",
                staged,
                self.version,
            )
        return self._generate(*args, **kwargs)

    def apply_latest(
        self,
        *,
        wait: bool = False,
        min_version: int | None = None,
        timeout_s: float | None = None,
    ) -> int | None:
        """Apply a version that is pulled and waiting; returns the version the engine runs.

        `wait=True` first waits for a pull in flight; `min_version=n` waits until version
        `n` or newer is applied, or a version >= n has failed (then the engine stays where
        it was). Raises TimeoutError after `timeout_s`, and the follower's error if it died.
        Call it on the thread that calls `generate`.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            if self._error is not None:
                raise FollowerStopped(
                    f"the weightstream follower stopped: {type(self._error).__name__}: "
                    f"{self._error}; the engine stays on version {self.version}"
                ) from self._error
            report = self.swapper.apply_staged()
            if report is not None:
                self.version = report.version
                logger.info(
                    "applied version=%d pause_ms=%.1f", report.version, report.pause_s * 1e3
                )
                continue
            if not self._busy(wait=wait, min_version=min_version):
                return self.version
            remaining = 1.0 if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"version >= {min_version} not applied within {timeout_s} s; status: "
                    f"{self.status.as_dict()}"
                )
            self.swapper.wait_staged(min(remaining, 1.0))

    def _busy(self, *, wait: bool, min_version: int | None) -> bool:
        with self.swapper.changed:
            if self.swapper.staged is not None:
                return True
            if not self._thread.is_alive():
                return False
            pending = self.status.pulling is not None or self.status.staged is not None
            if (wait or min_version is not None) and pending:
                return True
            if min_version is None:
                return False
            applied = max(v for v in (self.version, self.status.applied, -1) if v is not None)
            failed = self.status.failed
            return applied < min_version and (failed is None or failed < min_version)

    def close(self) -> None:
        """Stop following (the engine stays on its version); call it on the engine's thread."""
        if self.llm.__dict__.get("generate") == self._direct_generate:
            del self.llm.generate  # back to the class's own method
        if self._loop is not None and self._task is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop ended meanwhile
                self._loop.call_soon_threadsafe(self._task.cancel)
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def __enter__(self) -> WeightStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
