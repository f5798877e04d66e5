"""Run the broker and its HTTP status endpoint together, in one TaskGroup; and the one
signal-aware `asyncio.run` every command line of ours uses."""

from __future__ import annotations

import asyncio
import logging
import resource
import signal
from typing import TYPE_CHECKING, Any, TypeVar

import zmq.asyncio

from streamer.auth import read_token
from streamer.broker import Broker
from streamer.http import serve_http

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine

    from streamer.config import BrokerConfig

__all__ = ["raise_fd_limit", "run_until_signal", "serve"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_LOW_FD_LIMIT = 4096
"""Below this many open files the broker says so: every peer's TCP connection is one."""


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one; returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            logger.warning("could not raise the open-file limit from %d: %s", soft, exc)
    if soft < _LOW_FD_LIMIT:
        logger.warning(
            "open-file limit is low limit=%d: each peer holds one connection, so the broker "
            "serves fewer than that many; raise it (ulimit -n, LimitNOFILE=, docker --ulimit)",
            soft,
        )
    else:
        logger.info("open-file limit=%d", soft)
    return soft


async def serve(
    config: BrokerConfig, *, on_ready: Callable[[str, int], None] | None = None
) -> None:
    """Serve until cancelled. `on_ready(endpoint, http_port)` runs once both are listening."""
    raise_fd_limit()
    tokens = [
        read_token(path) if path else None
        for path in (config.http_read_token_file, config.http_admin_token_file)
    ]
    ctx = zmq.asyncio.Context(io_threads=config.io_threads)
    try:
        broker = Broker(config, context=ctx)
        http_ready = asyncio.Event()
        http_port = 0

        def _http_ready(port: int) -> None:
            nonlocal http_port
            http_port = port
            http_ready.set()

        async with asyncio.TaskGroup() as tg:
            tg.create_task(broker.run(), name="broker")
            tg.create_task(
                serve_http(
                    broker.registry,
                    broker.stats,
                    host=config.http_host,
                    port=config.http_port,
                    idle_timeout_s=config.http_idle_timeout_s,
                    on_ready=_http_ready,
                    admin=broker,
                    read_token=tokens[0],
                    admin_token=tokens[1],
                ),
                name="http",
            )
            await http_ready.wait()
            if on_ready is not None:
                on_ready(broker.endpoint, http_port)
    finally:
        ctx.destroy(linger=0)


def run_until_signal(coroutine: Coroutine[Any, Any, T]) -> T | None:
    """`asyncio.run(coroutine)`, cancelled by SIGTERM or SIGINT; returns None if it was.

    A signal is a normal, clean stop: the coroutine's `finally` blocks run.
    """

    async def main() -> T | None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        try:
            return await coroutine
        except asyncio.CancelledError:
            return None

    return asyncio.run(main())
