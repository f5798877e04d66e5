"""The vLLM OpenAI server follows a model by itself: a `vllm.endpoint_plugins` entry.

    VLLM_PLUGINS=weightstream WEIGHTSTREAM_BROKER=tcp://trainer:5555 WEIGHTSTREAM_MODEL=llama \\
    python -m vllm.entrypoints.openai.api_server --model /models/llama \\
        --weight-transfer-config '{"backend": "weightstream"}'

vLLM loads endpoint plugins in the API server process only, and only when named in
VLLM_PLUGINS. `init_state` runs on the server's event loop with the engine client (an
AsyncLLM): it starts `subscribers.vllm.follow.follow` there as a task, so versions are pulled
while the server serves, and swapped in between requests:

    pause_generation(mode="wait")   requests in flight finish on the old version; new ones queue
    start / update / finish         the engine reads the staged version from /dev/shm
    resume_generation()             queued requests run on the new version

`GET /weightstream/status` shows the version applied (ours and the engine's label), what is
being pulled, and the last error. A follower that stops on an error outside the retry policy
(reported to the broker first) is restarted after a growing backoff, and the status says so
(`restarts`, `last_error`, `restart_in_s`); the engine keeps serving its version meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING, Any

from subscribers.vllm.follow import FollowConfig, FollowStatus, follow
from subscribers.vllm.swap import VllmSwapper

if TYPE_CHECKING:
    from argparse import Namespace

__all__ = ["STATUS_ROUTE", "WeightstreamEndpoint"]

logger = logging.getLogger(__name__)

STATUS_ROUTE = "/weightstream/status"
RECONNECT_S = 5.0
RESTART_MAX_S = 60.0


class WeightstreamEndpoint:
    """The endpoint plugin (`vllm.endpoint_plugins` entry point `weightstream`)."""

    name = "weightstream"
    required_tasks = ("generate",)

    def __init__(self) -> None:
        self.config: FollowConfig | None = None
        self.status: FollowStatus | None = None
        self.engine: Any = None
        self.swapper: VllmSwapper | None = None
        self.task: asyncio.Task[None] | None = None

    def attach_router(self, app: Any) -> None:
        app.add_api_route(STATUS_ROUTE, self.report, methods=["GET"], response_model=None)

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        if engine_client is None:  # the CPU-only render server has no engine to update
            return
        self.config = FollowConfig.from_env(os.environ)
        _log_like_vllm()
        self.engine = engine_client
        self.swapper = VllmSwapper(
            engine_client, model_path=self.config.model_path, pause_mode=self.config.pause_mode
        )
        self.status = FollowStatus(model=self.config.model, applied=self.config.applied)
        if self.config.applied is not None:
            await self.swapper.label_async(self.config.applied)
        self.task = asyncio.get_running_loop().create_task(self._run(), name="weightstream-follow")
        self.task.add_done_callback(self._stopped)

    async def _run(self) -> None:
        assert self.config is not None
        assert self.swapper is not None
        assert self.status is not None
        backoff_s = RECONNECT_S
        while True:
            try:
                await follow(self.config, self.swapper, self.status)
            except TimeoutError as exc:  # no broker yet: keep serving, try again
                self.status.last_error = str(exc)
                logger.warning("%s; trying again in %.0f s", exc, RECONNECT_S)
                await asyncio.sleep(RECONNECT_S)
            except Exception as exc:  # noqa: BLE001 - reported, shown, and restarted, not hidden
                self.status.restarts += 1
                self.status.last_error = f"follower stopped: {type(exc).__name__}: {exc}"
                self.status.restart_in_s = backoff_s
                logger.error(  # noqa: TRY400 - the traceback is in the follower's own report
                    "weightstream follower stopped (restart %d in %.0f s); the engine stays on "
                    "version=%s: %s: %s",
                    self.status.restarts,
                    backoff_s,
                    self.status.applied,
                    type(exc).__name__,
                    exc,
                )
                await asyncio.sleep(backoff_s)
                self.status.restart_in_s = None
                backoff_s = min(backoff_s * 2, RESTART_MAX_S)

    def _stopped(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            if self.status is not None:
                self.status.last_error = f"follower stopped: {task.exception()!r}"
            logger.error(
                "weightstream follower stopped; the engine stays on version=%s: %r",
                self.status.applied if self.status else None,
                task.exception(),
            )

    async def report(self) -> dict[str, Any]:
        """The body of GET /weightstream/status."""
        if self.status is None or self.config is None:
            return {"enabled": False}
        body = self.status.as_dict()
        body.update(
            enabled=True,
            broker=self.config.broker,
            state=_state(self.status),
            engine_weight_version=await self.engine.get_weight_version(),
            last_drain_s=self.swapper.last_drain_s if self.swapper else None,
            following=self.task is not None and not self.task.done(),
        )
        return body


def _state(status: FollowStatus) -> str:
    if status.pulling is not None:
        return "pulling"
    return "staged" if status.staged is not None else "idle"


def _log_like_vllm() -> None:
    """Send our INFO lines (applied, pull failed, ...) where vLLM's own go.

    The API server configures only the `vllm` logger; without this, our loggers would
    print warnings and errors only, bare, through logging's last resort.
    """
    if logging.getLogger().handlers:
        return  # the application configured logging itself
    handlers = logging.getLogger("vllm").handlers
    for name in ("subscribers", "streamer"):
        ours = logging.getLogger(name)
        if not ours.handlers:
            for handler in handlers:
                ours.addHandler(handler)
            ours.setLevel(logging.INFO)
