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

Relay (`route`, a broker's `Route`): bucket b is read first from `route.parents[b %
route.fanout]` (None: the trainer), then from `route.fallbacks` in order, then from the
trainer's locators. Each relay read has its own short deadline (`relay_timeout_s`, within the
pull's), and its bytes are verified against the trainer's manifest like any other: a relay
that refuses, times out or serves bytes that fail the checksum (or digest) moves the bucket to
the next source, and is not asked again during this pull (so a dead parent costs one relay
deadline, not one per bucket); one that answers it has not verified the bucket yet (alive, but
behind: its own parent died, say) only loses that bucket, up to `MAX_BEHIND` times. Reads
from each relay queue on their own (`max_inflight` each), apart from the trainer's. The deadline starts when the read
is sent, not while it queues. With `routes` the newest `Route` is taken as each bucket
starts, so a re-plan (a holder gone) applies mid-pull. Only the trainer's failures fail the
pull. `on_verified(i)`
runs as bucket i passes (a relay holder serves it from then on); `PullReport.sources` counts
the verified bytes per source ("" for the trainer).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from schemas.manifest import ShmLocator
from streamer.checksum import ALGORITHM, SUPPORTED_ALGORITHMS, bucket_digest
from streamer.errors import ChecksumMismatch, StreamerError, TransportError
from streamer.signing import digest_matches
from streamer.transport.base import BulkReceiver, Fetch
from streamer.transport.shm import ShmReceiver
from subscribers.relay import RelayError

if TYPE_CHECKING:
    import torch

    from schemas.manifest import BucketSpec, Manifest
    from schemas.messages import RelaySource, Route
    from subscribers.relay_client import RelayClient
    from subscribers.staging import Staging

__all__ = ["PullReport", "PullTimeout", "pull"]

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int, float], Awaitable[None]]
MAX_BEHIND = 2
"""A relay that is behind (alive, bucket not verified in time) this often is not asked again."""
MAX_RELAY_THREADS = 16
"""Relays whose reads get threads of their own (more share them)."""
TRAINER = ""
"""The source name of the trainer's own locators in `PullReport.sources` and `Progress`."""


class PullTimeout(StreamerError, TimeoutError):
    """A version was not pulled (and staged) within `pull_timeout_s`; says how far it got."""


@dataclass(frozen=True)
class PullReport:
    version: int
    nbytes: int
    seconds: float
    refetched: int
    sources: dict[str, int] = field(default_factory=dict)
    """Verified bytes per source: a relay holder's name, or "" for the trainer."""

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


def _relay_sources(route: Route | None, index: int) -> list[RelaySource]:
    """The holders to try for bucket `index`, in order: its stripe's parent, then fallbacks."""
    if route is None:
        return []
    parents = route.parents
    parent = parents[index % route.fanout] if index % route.fanout < len(parents) else None
    if parent is None:
        # The trainer is this stripe's parent: the other holders are downstream of us in it
        # (they wait for what we read), so asking them first parks every read until it expires.
        return []
    sources = [parent]
    seen = {(parent.endpoint, parent.name)}
    for fallback in route.fallbacks:
        if (fallback.endpoint, fallback.name) not in seen:
            seen.add((fallback.endpoint, fallback.name))
            sources.append(fallback)
    return sources


def _all_sources(route: Route) -> list[RelaySource]:
    return [parent for parent in route.parents if parent is not None] + list(route.fallbacks)


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
    route: Route | None = None,
    routes: Callable[[], Route | None] | None = None,
    relay_client: RelayClient | None = None,
    relay_one_sided: BulkReceiver | None = None,
    relay_timeout_s: float = 5.0,
    on_verified: Callable[[int], None] | None = None,
    sources: dict[str, int] | None = None,
) -> PullReport:
    """Fetch and verify every bucket of `manifest` into `staging`.

    Regions a same-host publisher offers in shared memory (and a `ShmReceiver` accepts) are
    copied into staging, or with `map_shared=True` mapped, not copied: only for a swapper
    that reads each byte once into its own memory and verifies it there. `verify=False` skips
    the host checksums, for such a swapper (it must then raise `ChecksumMismatch` itself);
    BLAKE3 digests (the secure mode) are always verified here, on the host, before any copy to
    a device. `deadline` (a `time.monotonic()` value) bounds every fetch (`FetchTimeout`).

    `route` and `relay_client` read buckets from relay holders first (the module docstring);
    relays need `verify=True`. `routes`, instead of `route`, gives the newest route whenever a
    bucket starts (the broker re-plans when a holder goes, mid-pull). `relay_one_sided` (a
    mooncake receiver `staging` is registered with) reads from relays that offer it one-sided. `sources`, if given, is filled as buckets verify (bytes per
    source), so a progress callback can report it.
    """
    if manifest.checksum_algorithm not in SUPPORTED_ALGORITHMS:
        raise TransportError(
            f"{manifest.model} version {manifest.version} uses checksum algorithm "
            f"{manifest.checksum_algorithm!r}, which this subscriber cannot verify (it knows "
            f"{ALGORITHM!r}): upgrade the older side so both use the same weightstream"
        )
    if (route is not None or routes is not None) and (relay_client is None or not verify):
        raise ValueError("reading from relays needs a relay_client and verify=True")
    readers = [_receiver_for(manifest, r, receivers) for r in range(len(manifest.regions))]
    mapped: dict[int, torch.Tensor] = {}
    for region, (receiver, locator_index) in enumerate(readers):
        locator = manifest.regions[region].locators[locator_index]
        if map_shared and isinstance(receiver, ShmReceiver) and isinstance(locator, ShmLocator):
            mapping = await asyncio.to_thread(receiver.mapping, locator)
            mapped[region] = staging.segment(locator.name, mapping)
    staging.prepare(manifest, mapped)
    if route is not None or routes is not None:
        # Relay bytes are copied in by the relay client, not by these receivers: first let any
        # read a receiver gave up earlier (a mooncake read past a deadline) end, so that none
        # lands over what the relays bring (a receiver's own fetches do this themselves).
        for receiver in {id(r): r for r in [*receivers, relay_one_sided] if r is not None}.values():
            await asyncio.to_thread(receiver.fetch, [], deadline=deadline)
    total = sum(bucket.nbytes for bucket in manifest.buckets)
    done = 0
    refetched = 0
    counts: dict[str, int] = {} if sources is None else sources
    failed_relays: set[tuple[str, str]] = set()
    """Relays that failed a read in this pull: not asked again (bounded by the routes)."""
    behind_counts: dict[tuple[str, str], int] = {}
    relay_slots: dict[tuple[str, str], asyncio.Semaphore] = {}
    started = time.perf_counter()
    last_report = started
    slots = asyncio.Semaphore(max_inflight)
    throttle = _Throttle(max_bytes_per_s)

    async def fetch(bucket: BucketSpec) -> None:
        receiver, locator_index = readers[bucket.region]
        locator = manifest.regions[bucket.region].locators[locator_index]
        request = Fetch(
            locator, bucket.offset, bucket.nbytes, staging.address(bucket.region, bucket.offset)
        )
        await asyncio.wrap_future(pool.submit(receiver.fetch, [request], deadline=deadline))

    async def from_relay(bucket: BucketSpec, source: RelaySource) -> bool:
        """Read and verify `bucket` from one relay; False if not (a dead, frozen or lying
        relay is then not asked again in this pull; one that is only behind is)."""
        assert relay_client is not None
        peer = (source.endpoint, source.name)
        address = staging.address(bucket.region, bucket.offset)
        # One queue per relay, not the pull's slots: a read waiting for a holder that is behind
        # must not block reads from other holders (two holders, each waiting on a read from
        # the other's stripe, would otherwise stall each other until their deadlines).
        queue = relay_slots.setdefault(peer, asyncio.Semaphore(max_inflight))
        async with queue:
            if peer in failed_relays:  # it failed another bucket while this one queued
                return False
            await throttle.wait(bucket.nbytes)
            # The relay deadline starts once the read is sent, not while it queues.
            relay_deadline = time.monotonic() + relay_timeout_s
            if deadline is not None:
                relay_deadline = min(relay_deadline, deadline)
            try:
                await asyncio.wrap_future(
                    pool.submit(
                        relay_client.read,
                        source,
                        manifest.model,
                        manifest.version,
                        bucket.region,
                        bucket.offset,
                        bucket.nbytes,
                        address,
                        relay_deadline,
                        relay_one_sided,
                    )
                )
            except TransportError as exc:
                failed = str(exc)
                behind = isinstance(exc, RelayError) and exc.behind
            else:
                failed = ""
                behind = False
        if not failed:
            outcome = await asyncio.wrap_future(pool.submit(_verify, staging, bucket, True))
            if outcome is None:
                return True
            failed = f"its bytes fail the {outcome}"
        behind_counts[peer] = behind_counts.get(peer, 0) + behind
        if not behind or behind_counts[peer] >= MAX_BEHIND:
            failed_relays.add(peer)
        logger.warning(
            "relay read failed, trying the next source model=%s version=%d relay=%s "
            "region=%d offset=%d asked_again=%s reason=%s",
            manifest.model,
            manifest.version,
            source.name or source.endpoint,
            bucket.region,
            bucket.offset,
            behind,
            failed,
        )
        return False

    async def from_trainer(bucket: BucketSpec) -> None:
        nonlocal refetched
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

    async def one(index: int, bucket: BucketSpec) -> None:
        nonlocal done, refetched, last_report
        source_name = TRAINER
        tried: set[tuple[str, str]] = set()
        while True:
            # The newest route at each step: a re-plan made while this bucket waited counts.
            current = routes() if routes is not None else route
            untried = [
                source
                for source in _relay_sources(current, index)
                if (source.endpoint, source.name) not in failed_relays | tried
            ]
            if not untried:
                await from_trainer(bucket)
                break
            source = untried[0]
            tried.add((source.endpoint, source.name))
            if await from_relay(bucket, source):
                source_name = source.name
                break
            refetched += 1
        counts[source_name] = counts.get(source_name, 0) + bucket.nbytes
        if on_verified is not None:
            on_verified(index)
        done += bucket.nbytes
        now = time.perf_counter()
        if on_progress is not None and (now - last_report >= progress_interval_s or done == total):
            last_report = now
            await on_progress(done, total, done / max(now - started, 1e-9))

    # Our own pool, so that a failed pull can wait for every fetch still writing into staging
    # before it returns: no stray write may land in the next version's staging.
    # Each relay has its own queue of `max_inflight` reads (which may wait on a holder that
    # is behind): a thread for each, so they never starve the trainer's fetches or the checks.
    first = routes() if routes is not None else route
    relays = 0 if first is None else len({(s.endpoint, s.name) for s in _all_sources(first)})
    workers = max_inflight * (1 + min(relays, MAX_RELAY_THREADS)) + 2
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pull")
    try:
        async with asyncio.TaskGroup() as group:
            for index, bucket in enumerate(manifest.buckets):
                group.create_task(one(index, bucket))
    except ExceptionGroup as failed:
        raise failed.exceptions[0] from None
    finally:
        await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)
    seconds = time.perf_counter() - started
    return PullReport(
        version=manifest.version,
        nbytes=total,
        seconds=seconds,
        refetched=refetched,
        sources=dict(counts),
    )
