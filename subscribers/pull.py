"""Pull a version into staging: buckets fetched in parallel, each verified as it lands.

    buckets ──> [fetch i+1]                  (`max_inflight` fetches at a time, in threads)
                  └──> [verify i]            (checksum in a thread, while the next one fetches)
                                └──> progress (bytes done, rate) every `progress_interval_s`

A bucket whose checksum does not match is fetched again once (a torn read), then the pull
fails with `ChecksumMismatch`; any transport error fails it with `TransportError`. Either
way nothing has touched the engine yet: staging is private to the subscriber.

A same-host publisher's shared memory is copied into staging like any other transport's
bytes (a memcpy) and verified there, unless the caller asks for `map_shared` (a swapper that
verifies on its device). Every fetch carries the pull's `deadline`, so a frozen publisher
costs the deadline plus one bucket, and a failed or cancelled pull waits for its fetch and
verify threads before it returns: nothing of it writes into staging afterwards.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from schemas.manifest import ShmLocator
from streamer.checksum import ALGORITHM, SUPPORTED_ALGORITHMS, bucket_digest
from streamer.errors import ChecksumMismatch, StreamerError, TransportError
from streamer.signing import digest_matches
from streamer.transport.base import BulkReceiver, Fetch
from streamer.transport.shm import ShmReceiver

if TYPE_CHECKING:
    import torch

    from schemas.manifest import BucketSpec, Manifest
    from subscribers.staging import Staging

__all__ = ["PullReport", "PullTimeout", "pull"]

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int, float], Awaitable[None]]


class PullTimeout(StreamerError, TimeoutError):
    """A version was not pulled (and staged) within `pull_timeout_s`; says how far it got."""


@dataclass(frozen=True)
class PullReport:
    version: int
    nbytes: int
    seconds: float
    refetched: int

    @property
    def bytes_per_s(self) -> float:
        return self.nbytes / self.seconds if self.seconds > 0 else 0.0


class _Throttle:
    """Caps the pull rate (bytes/s) so a background pull leaves bandwidth to the engine."""

    def __init__(self, bytes_per_s: float | None) -> None:
        self.bytes_per_s = bytes_per_s
        self._next = time.monotonic()

    async def wait(self, nbytes: int) -> None:
        if not self.bytes_per_s:
            return
        now = time.monotonic()
        start = max(now, self._next)
        self._next = start + nbytes / self.bytes_per_s
        if start > now:
            await asyncio.sleep(start - now)


def _verify(staging: Staging, bucket: BucketSpec, fast: bool) -> str | None:
    """What the bucket's bytes fail ("checksum", "blake3 digest"), or None if nothing."""
    raw = staging.bytes_of(bucket.region, bucket.offset, bucket.nbytes).numpy()
    # The digest first: in the secure mode a forged bucket may match the fast checksum.
    if bucket.digest and not digest_matches(raw.data, bucket.digest):
        return "blake3 digest"
    return "checksum" if fast and bucket_digest(raw.data) != bucket.checksum else None


def _receiver_for(
    manifest: Manifest, region: int, receivers: Sequence[BulkReceiver]
) -> tuple[BulkReceiver, int]:
    """The first receiver (in the subscriber's order of preference) that can read a locator."""
    for receiver in receivers:
        for locator_index, locator in enumerate(manifest.regions[region].locators):
            if receiver.accepts(locator):
                return receiver, locator_index
    kinds = sorted({type(loc).__name__ for loc in manifest.regions[region].locators})
    raise TransportError(
        f"no configured transport can read region {region} (offered: {', '.join(kinds)}); "
        "install mooncake-transfer-engine or enable the zmq transport on both sides"
    )


async def pull(
    manifest: Manifest,
    staging: Staging,
    receivers: Sequence[BulkReceiver],
    *,
    max_inflight: int = 1,
    max_bytes_per_s: float | None = None,
    on_progress: ProgressCallback | None = None,
    progress_interval_s: float = 0.5,
    verify: bool = True,
    map_shared: bool = False,
    deadline: float | None = None,
) -> PullReport:
    """Fetch and verify every bucket of `manifest` into `staging`.

    Regions a same-host publisher offers in shared memory (and a `ShmReceiver` accepts) are
    copied into staging, or with `map_shared=True` mapped, not copied: only for a swapper
    that reads each byte once into its own memory and verifies it there. `verify=False` skips
    the host checksums, for such a swapper (it must then raise `ChecksumMismatch` itself);
    BLAKE3 digests (the secure mode) are always verified here, on the host, before any copy to
    a device. `deadline` (a `time.monotonic()` value) bounds every fetch (`FetchTimeout`).
    """
    if manifest.checksum_algorithm not in SUPPORTED_ALGORITHMS:
        raise TransportError(
            f"{manifest.model} version {manifest.version} uses checksum algorithm "
            f"{manifest.checksum_algorithm!r}, which this subscriber cannot verify (it knows "
            f"{ALGORITHM!r}): upgrade the older side so both use the same weightstream"
        )
    routes = [_receiver_for(manifest, r, receivers) for r in range(len(manifest.regions))]
    mapped: dict[int, torch.Tensor] = {}
    for region, (receiver, locator_index) in enumerate(routes):
        locator = manifest.regions[region].locators[locator_index]
        if map_shared and isinstance(receiver, ShmReceiver) and isinstance(locator, ShmLocator):
            mapping = await asyncio.to_thread(receiver.mapping, locator)
            mapped[region] = staging.segment(locator.name, mapping)
    staging.prepare(manifest, mapped)
    total = sum(bucket.nbytes for bucket in manifest.buckets)
    done = 0
    refetched = 0
    started = time.perf_counter()
    last_report = started
    slots = asyncio.Semaphore(max_inflight)
    throttle = _Throttle(max_bytes_per_s)

    async def fetch(bucket: BucketSpec) -> None:
        receiver, locator_index = routes[bucket.region]
        locator = manifest.regions[bucket.region].locators[locator_index]
        request = Fetch(
            locator, bucket.offset, bucket.nbytes, staging.address(bucket.region, bucket.offset)
        )
        await asyncio.wrap_future(pool.submit(receiver.fetch, [request], deadline=deadline))

    async def one(bucket: BucketSpec) -> None:
        nonlocal done, refetched, last_report
        if not staging.is_mapped(bucket.region):
            async with slots:
                await throttle.wait(bucket.nbytes)
                await fetch(bucket)
        # Verify outside the slot: the next bucket's fetch runs meanwhile.
        failed = None
        if verify or bucket.digest:
            failed = await asyncio.wrap_future(pool.submit(_verify, staging, bucket, verify))
        if failed:
            refetched += 1
            logger.warning(
                "bucket checksum mismatch, fetching again model=%s version=%d region=%d offset=%d",
                manifest.model,
                manifest.version,
                bucket.region,
                bucket.offset,
            )
            if not staging.is_mapped(bucket.region):
                async with slots:
                    await fetch(bucket)
            failed = await asyncio.wrap_future(pool.submit(_verify, staging, bucket, verify))
            if failed:
                raise ChecksumMismatch(
                    f"{manifest.model} version {manifest.version}: bucket at region {bucket.region} "
                    f"offset {bucket.offset} ({bucket.nbytes} bytes) fails its {failed} twice; "
                    "the publisher's memory changed after publishing, or the transport corrupts data"
                )
        done += bucket.nbytes
        now = time.perf_counter()
        if on_progress is not None and (now - last_report >= progress_interval_s or done == total):
            last_report = now
            await on_progress(done, total, done / max(now - started, 1e-9))

    # Our own pool, so that a failed pull can wait for every fetch still writing into staging
    # before it returns: no stray write may land in the next version's staging.
    pool = ThreadPoolExecutor(max_workers=max_inflight + 2, thread_name_prefix="pull")
    try:
        async with asyncio.TaskGroup() as group:
            for bucket in manifest.buckets:
                group.create_task(one(bucket))
    except ExceptionGroup as failed:
        raise failed.exceptions[0] from None
    finally:
        await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)
    seconds = time.perf_counter() - started
    return PullReport(version=manifest.version, nbytes=total, seconds=seconds, refetched=refetched)
