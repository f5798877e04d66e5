"""The inference side: follow a model, pull each new version, swap it in by itself.

    announcements ──> next_manifest(after=applied)     (skips to the newest complete version)
        │ check it fits the engine (before pulling a byte)
        │ acquire a lease (the publisher keeps the version readable while we read it)
        ▼
    pull: fetch buckets into staging (or map a same-host publisher's), verify each ── Progress ──> broker
        │ swapper.stage (e.g. to the GPU, verified there), still serving the old version
        ▼
    swapper.swap_in at a step boundary, then release the lease
        └── Applied(version) ──> broker

A version is applied whole or not at all. A failed pull (dead or slow publisher, a bucket
that fails its checksum, a retired version) is reported, leaves the engine on its previous
version, and is retried `max_attempts` times; a manifest that does not fit the engine is
never retried. Either way the subscriber then waits for the next version.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Annotated

import msgspec

from schemas.manifest import Manifest
from streamer.errors import BrokerError, ChecksumMismatch, TransportError
from subscribers.pull import PullReport, pull
from subscribers.staging import Staging
from subscribers.swap import SwapError, Swapper, SwapReport

if TYPE_CHECKING:
    from streamer.client import BrokerClient
    from streamer.transport.base import BulkReceiver

__all__ = ["PullConfig", "Subscriber"]

logger = logging.getLogger(__name__)

Positive = Annotated[float, msgspec.Meta(gt=0)]
AppliedCallback = Callable[[Manifest, PullReport, SwapReport], Awaitable[None]]


class PullConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    max_inflight: Annotated[int, msgspec.Meta(ge=1)] = 1
    """Buckets fetched at once (checksums always overlap the next fetch). Over mooncake tcp one
    large read at a time is fastest (bench/RESULTS.md); RDMA NICs like a few in flight."""
    max_bytes_per_s: Positive | None = None
    """Cap on the pull rate, to leave bandwidth to the engine; None for no cap."""
    pull_timeout_s: Positive = 600.0
    """A version not pulled within this long counts as a failed attempt (slow publisher)."""
    max_attempts: Annotated[int, msgspec.Meta(ge=1)] = 3
    retry_backoff_s: Positive = 0.5
    progress_interval_s: Positive = 0.5


class Subscriber:
    """Keeps one engine on the newest version of one model.

    >>> subscriber = Subscriber(client=client, receivers=[MooncakeReceiver()],
    ...                         swapper=TorchSwapper(dict(model.named_parameters())), model="llama")
    >>> await subscriber.run()  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        client: BrokerClient,
        receivers: Sequence[BulkReceiver],
        swapper: Swapper,
        model: str,
        config: PullConfig | None = None,
        staging: Staging | None = None,
        applied: int | None = None,
        on_applied: AppliedCallback | None = None,
    ) -> None:
        if not receivers:
            raise ValueError("a subscriber needs at least one receiver")
        self.client = client
        self.receivers = list(receivers)
        self.swapper = swapper
        self.model = model
        self.config = config or PullConfig()
        self.staging = staging or Staging(receivers=self.receivers)
        self.applied = applied
        """The version the engine runs now; None before the first one."""
        self.on_applied = on_applied
        self.failures = 0
        self._lock = asyncio.Lock()

    async def run(self) -> None:
        """Follow the model forever (until cancelled)."""
        await self.client.subscribe(self.model)
        given_up = -1
        while True:
            after = max(self.applied if self.applied is not None else -1, given_up)
            manifest = await self.client.next_manifest(self.model, after=after)
            if not await self._apply_with_retries(manifest):
                given_up = manifest.version

    async def apply_latest(self) -> int | None:
        """Apply the newest announced version now if it is newer; returns the applied version.

        For engines that update between steps on their own schedule (an offline rollout loop).
        """
        manifest = self.client.latest_manifest(self.model)
        if manifest is not None and (self.applied is None or manifest.version > self.applied):
            await self._apply_with_retries(manifest)
        return self.applied

    async def _apply_with_retries(self, manifest: Manifest) -> bool:
        for attempt in range(1, self.config.max_attempts + 1):
            newest = self.client.latest_manifest(self.model)
            if newest is not None and newest.version > manifest.version:
                logger.info(
                    "skipping version=%d: version=%d is out", manifest.version, newest.version
                )
                return True  # not a failure; the loop picks the newer one
            try:
                await self.apply(manifest)
            except SwapError as exc:
                await self._report_failure(manifest, exc)
                return False
            except (TransportError, ChecksumMismatch, BrokerError, TimeoutError) as exc:
                await self._report_failure(manifest, exc)
                if attempt < self.config.max_attempts:
                    await asyncio.sleep(self.config.retry_backoff_s * attempt)
            else:
                return True
        logger.error(
            "giving up on model=%s version=%d after %d attempts; staying on version=%s until the next one",
            self.model,
            manifest.version,
            self.config.max_attempts,
            self.applied,
        )
        return False

    async def _report_failure(self, manifest: Manifest, exc: Exception) -> None:
        self.failures += 1
        reason = f"{type(exc).__name__}: {exc}"
        logger.warning(
            "pull failed model=%s version=%d staying_on=%s reason=%s",
            self.model,
            manifest.version,
            self.applied,
            reason,
        )
        await self.client.report_failure(self.model, manifest.version, reason)

    async def apply(self, manifest: Manifest) -> None:
        """Pull, verify and swap in one version, or raise and leave the engine as it was."""
        async with self._lock:
            if self.applied is not None and manifest.version <= self.applied:
                return
            self.swapper.check(manifest)
            started = time.perf_counter()
            # The lease holds until the swap is done: staging may map the publisher's memory.
            await self.client.acquire_lease(self.model, manifest.version)
            try:
                async with asyncio.timeout(self.config.pull_timeout_s):
                    report = await pull(
                        manifest,
                        self.staging,
                        self.receivers,
                        max_inflight=self.config.max_inflight,
                        max_bytes_per_s=self.config.max_bytes_per_s,
                        on_progress=self._progress(manifest.version),
                        progress_interval_s=self.config.progress_interval_s,
                        verify=not self.swapper.verifies_on_device,
                    )
                    await self.swapper.stage(manifest, self.staging)
                swap = await self.swapper.swap_in(manifest, self.staging)
            finally:
                await self.client.release_lease(self.model, manifest.version)
            self.applied = manifest.version
            total_s = time.perf_counter() - started
            logger.info(
                "applied model=%s version=%d bytes=%d pull_s=%.3f rate_gb_per_s=%.2f pause_ms=%.1f total_s=%.3f",
                self.model,
                manifest.version,
                report.nbytes,
                report.seconds,
                report.bytes_per_s / 1e9,
                swap.pause_s * 1e3,
                total_s,
            )
            await self.client.report_applied(
                self.model,
                manifest.version,
                pull_s=report.seconds,
                pause_s=swap.pause_s,
                nbytes=report.nbytes,
            )
            if self.on_applied is not None:
                await self.on_applied(manifest, report, swap)

    def _progress(self, version: int) -> Callable[[int, int, float], Awaitable[None]]:
        async def report(done: int, total: int, rate: float) -> None:
            await self.client.report_progress(self.model, version, done, total, rate)

        return report

    def close(self) -> None:
        self.staging.close()
