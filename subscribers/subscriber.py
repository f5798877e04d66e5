"""The inference side: follow a model, pull each new version, swap it in by itself.

    announcements ──> next_manifest(after=applied)     (skips to the newest complete version)
        │ validate it (schemas.validate), check it fits the engine (before allocating a byte)
        │ acquire a lease (the publisher keeps the version readable while we read it)
        ▼
    pull: fetch buckets into staging (a same-host publisher's by memcpy), verify each ── Progress ──> broker
        │ swapper.stage (e.g. to the GPU, verified there), still serving the old version
        ▼                                              Progress(state="staged") ──> broker
    swapper.swap_in at a step boundary, then release the lease
        └── Applied(version) ──> broker

Staging is private: a swapper that reads staging at the swap (TorchSwapper, VllmSwapper) gets
the verified copy, never the publisher's memory, so a lost lease (broker restart, a frozen
subscriber) and a publisher reusing its buffers cannot change the bytes between the check and
the swap. Only a swapper that copies each byte once into its own device memory in `stage` and
verifies it there (`verifies_on_device`) maps a same-host publisher's memory instead.

A version is applied whole or not at all. A failed pull (dead or slow publisher, a bucket
that fails its checksum, a retired version, `pull_timeout_s` passed: `PullTimeout`) is
reported, leaves the engine on its previous version, and is retried `max_attempts` times; an
invalid manifest, or one that does not fit the engine, is never retried. Either way the
subscriber then waits for the next version. Any other error (a bug, or a foreign error no seam
translated) is reported to the broker too, and stops the loop with `FollowerStopped` naming it.

Relay (`relay=RelayServer(...)`, docs/relay.md): the subscriber offers its relay server when
it subscribes, reads each version along the broker's `Route` (peers first, the trainer last,
every byte verified against the trainer's manifest: `subscribers.pull`), and serves the
version it pulls bucket by bucket as each one verifies, then keeps serving it once applied.
It holds what others read with two alternating stagings (`spare_staging`, required): the
applied version stays in one while the next is pulled into the other. Before a pull reuses
a staging that still serves an older version, it waits for the broker's `Retire` of that
version (readers hold leases while they read, so a retire means no reader is left), at most
`relay_hold_s` (default the lease TTL: a reader silent that long has lost its lease); past
that it stops serving the version first (its readers fail over) and then reuses the staging.
The swap only reads staging, so serving never races the engine's own update. Manifests
travel the same way: with `PeerManifests` as its client's `manifest_peers` (installed here
unless the client has one: the `subscribe` command installs it before subscribing), an
announced manifest is read from the Route's stripe-0 parent (the broker's if that is the
trainer, or the parent fails), and every manifest the client takes is offered to the relay
server at once, for the readers one level down.

    Retire(v) from the broker ──> relay.drop(v) ──> a pull waiting to reuse v's staging goes on
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Annotated

import msgspec

from schemas.manifest import Manifest
from schemas.messages import RelayOffer
from schemas.validate import InvalidManifest, ManifestLimits, validate_manifest
from streamer.errors import StreamerError, TransportError
from streamer.signing import UntrustedVersion
from streamer.transport.mooncake import MooncakeReceiver
from subscribers.pull import PullReport, PullTimeout, pull
from subscribers.relay_client import PeerManifests, RelayClient
from subscribers.staging import Staging
from subscribers.swap import SwapError, Swapper, SwapReport

if TYPE_CHECKING:
    from schemas.messages import Route
    from streamer.client import BrokerClient
    from streamer.signing_keys import TrustedKeys
    from streamer.transport.base import BulkReceiver
    from subscribers.relay import RelayServer

__all__ = ["FollowerStopped", "PullConfig", "Subscriber"]

logger = logging.getLogger(__name__)

Positive = Annotated[float, msgspec.Meta(gt=0)]
AppliedCallback = Callable[[Manifest, PullReport, SwapReport], Awaitable[None]]


class FollowerStopped(StreamerError):
    """The subscriber loop stopped on an error outside its retry policy (reported first)."""


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
    manifest_limits: ManifestLimits = ManifestLimits()
    """Caps a manifest must meet (checked with every other rule before anything is allocated)."""
    require_digests: bool = False
    """Refuse versions whose buckets carry no BLAKE3 digest (untrusted networks); needs
    `trusted_keys`, since only a signature makes the digests the trainer's."""
    relay_timeout_s: Positive = 5.0
    """Relay: how long one bucket's read from a peer may take (waiting for the peer to verify
    it included) before the bucket moves to the next source; well inside `pull_timeout_s`."""
    route_wait_s: Positive = 1.0
    """Relay: how long to wait for the broker's `Route` of a version before reading it all
    from the trainer."""
    relay_hold_s: Positive | None = None
    """Relay: how long a pull waits for the broker's `Retire` of the version held in the
    staging it reuses, before it stops serving it; None: the broker's lease TTL (a reader
    silent that long has lost its lease)."""


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
        spare_staging: Staging | None = None,
        applied: int | None = None,
        on_applied: AppliedCallback | None = None,
        trusted_keys: TrustedKeys | None = None,
        relay: RelayServer | None = None,
    ) -> None:
        """`trusted_keys`: apply only versions signed by these publisher keys (`streamer.signing`).
        `relay`: serve what this subscriber holds to others (needs `spare_staging`, and
        `run()`, which follows the broker's Retires); the caller owns it (and closes it)."""
        if not receivers:
            raise ValueError("a subscriber needs at least one receiver")
        if relay is not None and spare_staging is None:
            raise ValueError(
                "a relay subscriber needs spare_staging: it keeps serving the applied version "
                "from one staging while it pulls the next into the other"
            )
        if config is not None and config.require_digests and trusted_keys is None:
            raise ValueError("require_digests needs trusted_keys: unsigned digests prove nothing")
        self.client = client
        self.receivers = list(receivers)
        self.swapper = swapper
        self.model = model
        self.config = config or PullConfig()
        self.staging = staging or Staging(receivers=self.receivers)
        self.spare_staging = spare_staging
        """With a spare, each version is pulled into the staging the applied version does not
        occupy, so the applied version's bytes stay intact until the next one applies (a
        swapper that can restore the previous version after a failed swap needs them)."""
        self.applied = applied
        """The version the engine runs now; None before the first one."""
        self.on_applied = on_applied
        self.trusted_keys = trusted_keys
        self.failures = 0
        self.last_error: BaseException | None = None
        """The last failure (reported to the broker as well)."""
        self._pulled = 0
        self._lock = asyncio.Lock()
        self.relay = relay
        self._relay_client: RelayClient | None = None
        """Reads from peers' relay servers, made on the first `Route` (its ZeroMQ context then
        lives until `close`; a subscriber never routed has none)."""
        self._sources: dict[str, int] = {}
        """Verified bytes per source of the pull in progress (for `Progress.sources`)."""
        self._served: dict[int, int] = {}
        """id(staging) -> the version the relay serves from it (two stagings: <= 2 entries)."""
        self._retired: deque[int] = deque(maxlen=64)
        """Versions of our model the broker retired lately (newest last)."""
        self._retire_changed = asyncio.Condition()
        self._lease_ttl_s: float | None = None
        self._route: Route | None = None
        """The route of the version `apply` pulls now (None: from the trainer only)."""
        self.waiting_for_retire: int | None = None
        """The served version a pull waits to see retired before reusing its staging."""
        self._peer_manifests: PeerManifests | None = None
        """Installed as the client's `manifest_peers` (a relay subscriber whose client has
        none yet: the `subscribe` command installs its own before subscribing)."""
        if relay is not None and client.manifest_peers is None:
            self._peer_manifests = PeerManifests(
                server=relay, routes=client.route, reader=self._reader
            )
            client.manifest_peers = self._peer_manifests

    async def run(self) -> None:
        """Follow the model forever (until cancelled)."""
        await self.client.subscribe(self.model, relay=self.relay_offer)
        if self.relay is None:
            await self._follow()
            return
        async with asyncio.TaskGroup() as group:
            group.create_task(self._follow_retires(), name="relay-retires")
            await self._follow()

    @property
    def relay_offer(self) -> RelayOffer | None:
        """What to tell the broker in `Subscribe.relay` (None without a relay server)."""
        if self.relay is None:
            return None
        return RelayOffer(endpoint=self.relay.endpoint, server_key=self.relay.server_key)

    async def _follow(self) -> None:
        given_up = -1
        while True:
            after = max(self.applied if self.applied is not None else -1, given_up)
            manifest = await self.client.next_manifest(self.model, after=after)
            if not await self._apply_with_retries(manifest):
                given_up = manifest.version

    async def apply_latest(self) -> int | None:
        """Apply the newest announced version now if it is newer; returns the applied version.

        For engines that update between steps on their own schedule (an offline rollout loop).
        Raises the last error if that version could not be applied (the engine stays where it
        was), rather than quietly returning the old version.
        """
        manifest = self.client.latest_manifest(self.model)
        if manifest is None or (self.applied is not None and manifest.version <= self.applied):
            return self.applied
        if not await self._apply_with_retries(manifest):
            assert self.last_error is not None  # every failed attempt records its error
            raise self.last_error
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
            except (InvalidManifest, SwapError, UntrustedVersion) as exc:
                await self._report_failure(manifest, exc)
                return False
            except StreamerError as exc:  # transport, checksum, broker, timeout, staging...
                await self._report_failure(manifest, exc)
                if attempt < self.config.max_attempts:
                    await asyncio.sleep(self.config.retry_backoff_s * attempt)
            except Exception as exc:
                # Outside the policy: say so to the broker and stop, never die silently.
                await self._report_failure(manifest, exc)
                raise FollowerStopped(
                    f"the subscriber of model {self.model} stopped on version {manifest.version}: "
                    f"{type(exc).__name__}: {exc} (engine stays on version {self.applied}); "
                    "this is a bug or an untranslated error: report it with the log"
                ) from exc
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
        self.last_error = exc
        reason = f"{type(exc).__name__}: {exc}"
        logger.warning(
            "pull failed model=%s version=%d staying_on=%s reason=%s",
            self.model,
            manifest.version,
            self.applied,
            reason,
        )
        try:
            async with asyncio.timeout(self.client.config.request_timeout_s):
                await self.client.report_failure(self.model, manifest.version, reason)
        except (StreamerError, TimeoutError) as report_error:
            logger.warning("could not report the failure to the broker: %s", report_error)

    async def apply(self, manifest: Manifest) -> None:
        """Pull, verify and swap in one version, or raise and leave the engine as it was."""
        async with self._lock:
            if self.applied is not None and manifest.version <= self.applied:
                return
            offered = await self._readable(manifest)
            if offered.version != manifest.version:
                return  # a newer version came while we waited: the loop takes that one
            manifest = offered
            validate_manifest(manifest, self.config.manifest_limits)
            if self.trusted_keys is not None:  # before a byte is pulled; large manifests: a thread
                await asyncio.to_thread(
                    self.trusted_keys.verify, manifest, require_digests=self.config.require_digests
                )
            self.swapper.check(manifest)
            await self._free_for_pull(self.staging)
            started = time.perf_counter()
            # The lease holds until the swap is done: staging may map the publisher's memory.
            self._lease_ttl_s = await self.client.acquire_lease(self.model, manifest.version)
            try:
                self._route = await self._route_for(manifest.version)
                if self.relay is not None:
                    self.relay.hold(manifest, self.staging)
                    self._served[id(self.staging)] = manifest.version
                report = await self._pull_and_stage(manifest)
                logger.info("staged model=%s version=%d", self.model, manifest.version)
                await self.client.report_progress(
                    self.model,
                    manifest.version,
                    report.nbytes,
                    report.nbytes,
                    report.bytes_per_s,
                    state="staged",
                    sources=report.sources,
                )
                swap = await self.swapper.swap_in(manifest, self.staging)
            except BaseException:
                if self.relay is not None:
                    # Half a version: stop serving it (its readers fail over), so the retry
                    # may rewrite this staging (waiting briefly for the sends in flight).
                    self._served.pop(id(self.staging), None)
                    self.relay.drop(self.model, manifest.version, wait_s=0.2)
                raise
            finally:
                await self.client.release_lease(self.model, manifest.version)
            self.applied = manifest.version
            if self.spare_staging is not None:
                self.staging, self.spare_staging = self.spare_staging, self.staging
            total_s = time.perf_counter() - started
            logger.info(
                "applied model=%s version=%d bytes=%d pull_s=%.3f rate_gb_per_s=%.2f pause_ms=%.1f total_s=%.3f sources=%s",
                self.model,
                manifest.version,
                report.nbytes,
                report.seconds,
                report.bytes_per_s / 1e9,
                swap.pause_s * 1e3,
                total_s,
                ",".join(f"{name or 'trainer'}:{n}" for name, n in sorted(report.sources.items())),
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

    async def _readable(self, manifest: Manifest) -> Manifest:
        """`manifest` once this subscriber can read every region of it.

        A colocated trainer announces its GPU copy first (CUDA IPC, for an engine on its GPU)
        and the same version again once its host copy is filled: a subscriber that cannot read
        the first offer waits (within `pull_timeout_s`) for the second, or a newer version.
        """
        limit_s = self.config.pull_timeout_s
        deadline = time.monotonic() + limit_s
        while not self._can_read(manifest):
            left = deadline - time.monotonic()
            if left <= 0:
                kinds = sorted({type(loc).__name__ for r in manifest.regions for loc in r.locators})
                raise TransportError(
                    f"{self.model} version {manifest.version} is offered only as "
                    f"{', '.join(kinds) or 'nothing'}, which no transport of this subscriber "
                    f"reads, and no other offer came within pull_timeout_s={limit_s:g} s: "
                    "check that the publisher offers a host copy (mooncake, zmq or shm)"
                )
            newer = await self.client.manifest_changed(self.model, manifest, timeout_s=left)
            if newer.version != manifest.version:
                return newer
            manifest = newer
        return manifest

    def _from_device_offer(self, manifest: Manifest) -> bool:
        """The swapper reads this version from a same-device publisher's copy, and nothing is
        pulled to the host (never for a relay: it serves host staging to others)."""
        return self.relay is None and self.swapper.reads_device_offer(manifest)

    def _can_read(self, manifest: Manifest) -> bool:
        if self._from_device_offer(manifest):
            return True
        return all(
            any(receiver.accepts(loc) for receiver in self.receivers for loc in region.locators)
            for region in manifest.regions
        )

    async def _pull_and_stage(self, manifest: Manifest) -> PullReport:
        """Pull and stage within `pull_timeout_s`, or raise `PullTimeout` saying how far it got.
        Along `self._route` (the broker's, set by `apply`) when there is one."""
        route = self._route
        limit_s = self.config.pull_timeout_s
        started = time.monotonic()
        self._pulled = 0
        self._sources = {}
        # Zero copy only for a swapper that reads each byte once into its own verified memory;
        # relay bytes (read or served) are verified on the host, into our own staging.
        host_verified = self.relay is not None or route is not None
        shared = self.swapper.verifies_on_device and not host_verified
        relay = self.relay
        version = manifest.version

        def on_verified(bucket: int) -> None:
            if relay is not None:
                relay.mark_verified(self.model, version, bucket)

        relay_client = None
        if route is not None:
            relay_client = self._reader()
            relay_client.keep_only(
                [p for p in route.parents if p is not None] + list(route.fallbacks)
            )
        try:
            async with asyncio.timeout(limit_s):
                if self._from_device_offer(manifest):  # verified on the device
                    await self.swapper.stage(manifest, self.staging)
                    return PullReport(manifest.version, manifest.payload_bytes, 0.0, 0)
                report = await pull(
                    manifest,
                    self.staging,
                    self.receivers,
                    max_inflight=self.config.max_inflight,
                    max_bytes_per_s=self.config.max_bytes_per_s,
                    on_progress=self._progress(manifest.version),
                    progress_interval_s=self.config.progress_interval_s,
                    verify=not shared,
                    map_shared=shared,
                    deadline=started + limit_s,
                    routes=self._newest_route(manifest.version) if route is not None else None,
                    relay_client=relay_client,
                    relay_one_sided=next(
                        (r for r in self.receivers if isinstance(r, MooncakeReceiver)), None
                    ),
                    relay_timeout_s=self.config.relay_timeout_s,
                    on_verified=on_verified if relay is not None else None,
                    sources=self._sources,
                )
                await self.swapper.stage(manifest, self.staging)
        except TimeoutError as exc:  # our deadline, or a fetch's (FetchTimeout)
            if isinstance(exc, StreamerError) and time.monotonic() < started + limit_s:
                raise  # a transport's own per-reply limit, not the pull's deadline
            raise PullTimeout(
                f"{self.model} version {manifest.version} not pulled and staged within "
                f"pull_timeout_s={limit_s:g} s (gave up after {time.monotonic() - started:.1f} s, "
                f"{self._pulled} of {manifest.payload_bytes} bytes verified): the publisher is "
                "frozen, overloaded or unreachable; check it, or raise pull_timeout_s"
                + (f" ({exc})" if str(exc) else "")
            ) from exc
        return report

    def _progress(self, version: int) -> Callable[[int, int, float], Awaitable[None]]:
        async def report(done: int, total: int, rate: float) -> None:
            self._pulled = done
            await self.client.report_progress(
                self.model, version, done, total, rate, sources=self._sources
            )

        return report

    # relay

    async def _route_for(self, version: int) -> Route | None:
        """The broker's `Route` for `version` (a relay subscriber waits `route_wait_s` for
        it; others take one only if it came), less any source that is this subscriber."""
        route = self.client.route(self.model, version)
        if route is None and self.relay is not None:
            try:
                async with asyncio.timeout(self.config.route_wait_s):
                    route = await self.client.wait_route(self.model, version)
            except TimeoutError:
                logger.info(
                    "no route model=%s version=%d within %.1f s: reading from the trainer",
                    self.model,
                    version,
                    self.config.route_wait_s,
                )
                return None
        return route if route is None else self._without_self(route)

    def _reader(self) -> RelayClient:
        """The client for peers' relay servers, made on first use (a `Route` came)."""
        if self._relay_client is None:
            self._relay_client = RelayClient()
        return self._relay_client

    def _without_self(self, route: Route) -> Route:
        """`route` less any source that is this subscriber's own relay server."""
        if self.relay is None:
            return route
        own = self.relay.endpoint
        parents = [p if p is not None and p.endpoint != own else None for p in route.parents]
        fallbacks = [f for f in route.fallbacks if f.endpoint != own]
        return msgspec.structs.replace(route, parents=parents, fallbacks=fallbacks)

    def _newest_route(self, version: int) -> Callable[[], Route | None]:
        """The broker's newest Route for `version`, asked as each bucket starts (it re-plans
        when a holder goes); filtered once per Route it sends."""
        first = self._route
        latest: list[tuple[Route, Route]] = []
        """(the broker's newest Route, it filtered): one entry, replaced when a new one comes."""

        def newest() -> Route | None:
            route = self.client.route(self.model, version)
            if route is None or first is None:
                return first
            if not latest or latest[0][0] is not route:
                latest[:] = [(route, self._without_self(route))]
            return latest[0][1]

        return newest

    async def _free_for_pull(self, staging: Staging) -> None:
        """Make sure the relay no longer serves from `staging` before a pull rewrites it:
        wait for the broker's `Retire` of the version there, at most `relay_hold_s`."""
        version = self._served.get(id(staging))
        if self.relay is None or version is None:
            return
        relay = self.relay
        if relay.holds(self.model, version):
            limit_s = self.config.relay_hold_s or self._lease_ttl_s or 30.0
            self.waiting_for_retire = version
            try:
                async with asyncio.timeout(limit_s), self._retire_changed:
                    await self._retire_changed.wait_for(lambda: version in self._retired)
            except TimeoutError:
                logger.warning(
                    "not retired within relay_hold_s=%.1f: stop serving model=%s version=%d "
                    "before reusing its staging (its readers fail over)",
                    limit_s,
                    self.model,
                    version,
                )
            finally:
                self.waiting_for_retire = None
        await asyncio.to_thread(relay.drop, self.model, version)
        del self._served[id(staging)]

    async def _follow_retires(self) -> None:
        """Retires of our model's versions from the broker: stop serving them. Runs forever."""
        assert self.relay is not None
        while True:
            retire = await self.client.retired.get()
            if retire.model != self.model:
                continue
            logger.info("retired model=%s version=%d", retire.model, retire.version)
            await asyncio.to_thread(self.relay.drop, self.model, retire.version)
            async with self._retire_changed:
                self._retired.append(retire.version)
                self._retire_changed.notify_all()

    def close(self) -> None:
        if self._peer_manifests is not None and self.client.manifest_peers is self._peer_manifests:
            self.client.manifest_peers = None
        self.staging.close()
        if self.spare_staging is not None:
            self.spare_staging.close()
        if self._relay_client is not None:
            self._relay_client.close()
            self._relay_client = None
