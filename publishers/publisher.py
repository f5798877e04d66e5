"""The trainer side: `publish(version, named_tensors)`.

    publish(v) ── take buffers (pool) ── pack + checksum (thread) ── expose on the bulk path
        └──── PublishShard(v, rank) ──> broker ── all ranks in ──> Announce to subscribers
    retire loop: Retire(v) from the broker ──> v's buffers back to the pool (they stay
                 registered: the next version packed into them is exposed at the same place)

A publisher holds at most `max_buffer_sets` versions' buffers (the broker's retention + 1
being pulled + its pending cap, 2 + 1 + 4 by default), whatever the broker does: a publish
past that is refused with `PublishRefused`, which says which versions still hold buffers.

Each rank of a trainer publishes its own shard of the tensors under the same version; the
broker announces the version once every rank's shard is in, and only from one trainer *job*:
all ranks of one trainer pass the same `job` id (torchrun's run id, say), and a shard of a
version another job began is refused (`job_conflict`). The bytes stay in this
process's memory and are read by subscribers directly (mooncake) or through the fallback
transport; they never pass through the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import threading
import time
from collections.abc import AsyncIterator, Coroutine, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

import torch
import zmq.asyncio

from gpu.ipc import export_buffer
from publishers import gpu_snapshot
from publishers.memory import BufferPool, BufferSet
from publishers.packing import DEFAULT_BUCKET_BYTES, DEFAULT_REGION_BYTES, pack, plan
from streamer.client import BrokerClient, connect
from streamer.errors import BrokerError, StreamerError
from streamer.signing import add_digests, sign_shard
from streamer.transport.shm import ShmSender

if TYPE_CHECKING:
    from concurrent.futures import Future

    from publishers.gpu_snapshot import GpuSnapshot
    from publishers.packing import Layout
    from schemas.ipc import CudaIpcBuffer
    from schemas.manifest import Locator, Shard
    from streamer.config import ClientConfig
    from streamer.signing_keys import SigningKey
    from streamer.transport.base import BulkSender

__all__ = [
    "DEFAULT_BACKGROUND_TIMEOUT_S",
    "DEFAULT_MAX_BUFFER_SETS",
    "BackgroundPublishFailed",
    "PublishRefused",
    "PublishResult",
    "Publisher",
    "SnapshotPublish",
    "SyncPublisher",
    "open_publisher",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_MAX_BUFFER_SETS = 2 + 1 + 4
"""The broker's default retention, one version being pulled past it, its pending cap."""

DEFAULT_BACKGROUND_TIMEOUT_S = 60.0
"""How long a publish waits for the previous snapshot publish's host copy and PublishShard."""


class PublishRefused(StreamerError):
    """This rank already holds as many versions' buffers as it may; none was retired."""


class BackgroundPublishFailed(StreamerError):
    """The background part (host copy, PublishShard) of a snapshot publish failed or is stuck."""


class PublishResult:
    """What `publish` did: the shard it sent and whether that completed the version.

    `seconds` (= `readable_seconds`) runs from the call to the broker having the shard;
    `stall_seconds` is how long the trainer waited: the GPU snapshot in snapshot mode, the
    whole publish otherwise.
    """

    def __init__(
        self,
        version: int,
        shard: Shard,
        complete: bool,
        seconds: float,
        *,
        stall_seconds: float | None = None,
        readable_seconds: float | None = None,
        gpu_readable_seconds: float | None = None,
    ) -> None:
        self.version = version
        self.shard = shard
        self.complete = complete
        self.seconds = seconds
        self.stall_seconds = seconds if stall_seconds is None else stall_seconds
        self.readable_seconds = seconds if readable_seconds is None else readable_seconds
        self.gpu_readable_seconds = gpu_readable_seconds
        """`offer_gpu`: from the call to the broker announcing the GPU copy (a same-GPU engine
        may read it from then on), before the host copy; None otherwise."""

    def __repr__(self) -> str:
        return (
            f"PublishResult(version={self.version}, complete={self.complete}, "
            f"seconds={self.seconds:.3f}, stall_seconds={self.stall_seconds:.4f})"
        )


class SnapshotPublish:
    """A snapshot publish: the trainer's tensors are copied; the rest runs in the background."""

    def __init__(
        self, version: int, stall_seconds: float, task: asyncio.Task[PublishResult]
    ) -> None:
        self.version = version
        self.stall_seconds = stall_seconds
        """From the call to the snapshot's D2D copies done (the trainer's stall)."""
        self.task = task
        self.reported = False
        """Whether `readable` handed the caller the outcome (then the next publish does not)."""

    async def readable(self) -> PublishResult:
        """Wait until the broker has the shard; its `PublishResult`. No own timeout."""
        try:
            return await asyncio.shield(self.task)
        except Exception:
            self.reported = True
            raise


class Publisher:
    """Publishes versions of one model from one trainer rank.

    >>> async with open_publisher(config, model="llama", sender=MooncakeSender()) as publisher:
    ...     await publisher.publish(step, dict(model.named_parameters()))  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        client: BrokerClient,
        sender: BulkSender | Sequence[BulkSender],
        model: str,
        rank: int = 0,
        world_size: int = 1,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        region_bytes: int = DEFAULT_REGION_BYTES,
        pool: BufferPool | None = None,
        node_local: bool = False,
        job: str | None = None,
        max_buffer_sets: int = DEFAULT_MAX_BUFFER_SETS,
        signing_key: SigningKey | None = None,
        secure_digests: bool = False,
        background_timeout_s: float = DEFAULT_BACKGROUND_TIMEOUT_S,
        offer_gpu: bool = False,
    ) -> None:
        """`node_local=True` puts the buffers in POSIX shared memory and offers them to
        same-host subscribers, who map them instead of fetching them. `job` names the
        trainer job, the same on every rank (a single rank may leave it to a random id).
        `max_buffer_sets` bounds the versions whose buffers this rank keeps (see the module
        docstring). `signing_key` signs every shard (subscribers that trust its public key
        verify it); `secure_digests` adds a BLAKE3 digest to every bucket, for untrusted
        networks (docs/security.md). `background_timeout_s` bounds how long a publish waits
        for the previous snapshot publish's background part. `offer_gpu=True` also offers each
        snapshot publish's GPU copy over CUDA IPC (a `CudaIpcLocator` per region, first) to
        subscribers on the same GPU; each such version then keeps its own GPU copy until the
        broker retires it (see docs/design.md, memory)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, {world_size})")
        if job is None:
            if world_size > 1:
                raise ValueError(
                    f"a publisher of world_size {world_size} needs job=..., one id shared by "
                    "all its ranks (e.g. torchrun's TORCHELASTIC_RUN_ID), so the broker never "
                    "mixes shards of two trainers into one version"
                )
            job = secrets.token_hex(8)
        if len(job) > 128:
            raise ValueError(f"job ids have at most 128 characters, not {len(job)}")
        self.job = job
        if max_buffer_sets < 1:
            raise ValueError("max_buffer_sets must be >= 1")
        self.max_buffer_sets = max_buffer_sets
        self.client = client
        self.senders: list[BulkSender] = list(sender) if isinstance(sender, Sequence) else [sender]
        if node_local:
            if pool is None:
                safe = "".join(c if c.isalnum() else "_" for c in model)[:40]
                prefix = f"weightstream-{safe}-r{rank}-{os.getpid()}-{secrets.token_hex(3)}"
                pool = BufferPool(shm_prefix=prefix)
            if pool.shm_prefix is None:
                raise ValueError("node_local needs a pool with shm_prefix")
            self.senders.append(ShmSender(pool.shm_name))
        if not self.senders:
            raise ValueError("a publisher needs at least one sender")
        self.model = model
        self.rank = rank
        self.world_size = world_size
        self.bucket_bytes = bucket_bytes
        self.region_bytes = region_bytes
        self.pool = pool or BufferPool()
        self.signing_key = signing_key
        self.secure_digests = secure_digests
        self.live: dict[int, BufferSet] = {}
        """Versions whose bytes are still readable, by version."""
        if background_timeout_s <= 0:
            raise ValueError("background_timeout_s must be > 0")
        self.background_timeout_s = background_timeout_s
        self._background: SnapshotPublish | None = None
        """The last snapshot publish, until a later publish (or `flush`) saw it finish."""
        self._device_buffer: torch.Tensor | None = None
        """The GPU snapshot buffer (one version's bytes), reused by every snapshot publish."""
        self.offer_gpu = offer_gpu
        self.gpu_live: dict[int, torch.Tensor] = {}
        """With `offer_gpu`: the GPU copy of each version offered over CUDA IPC, until retired."""
        self._gpu_free: list[torch.Tensor] = []
        """Retired versions' GPU copies, reused (at most `max_buffer_sets`)."""
        self._exported: dict[int, CudaIpcBuffer] = {}
        """The IPC handle of each GPU copy (by data pointer), exported once."""

    @overload
    async def publish(
        self,
        version: int,
        named_tensors: Mapping[str, torch.Tensor],
        *,
        snapshot: Literal[False] = False,
    ) -> PublishResult: ...

    @overload
    async def publish(
        self,
        version: int,
        named_tensors: Mapping[str, torch.Tensor],
        *,
        snapshot: Literal[True],
    ) -> SnapshotPublish: ...

    async def publish(
        self, version: int, named_tensors: Mapping[str, torch.Tensor], *, snapshot: bool = False
    ) -> PublishResult | SnapshotPublish:
        """Pack `named_tensors` as `version` of this rank's shard and tell the broker.

        Returns once the broker has the shard (not once subscribers have it: see
        `wait_applied`). Raises `BrokerError("stale_version")` if `version` is not newer
        than the latest announced one.

        ``snapshot=True`` (tensors on one CUDA device) returns once the version is copied
        device-to-device into the publisher's GPU snapshot buffer: the trainer may change its
        tensors as soon as this returns. The host copy, the digests and the PublishShard run
        in the background; `SnapshotPublish.readable()` waits for them. Every publish first
        waits (at most `background_timeout_s`) for the previous one's background part and
        raises `BackgroundPublishFailed` if it failed.
        """
        if not named_tensors:
            raise ValueError("nothing to publish: named_tensors is empty")
        await self._settle_background()
        if version not in self.live and len(self.live) >= self.max_buffer_sets:
            raise PublishRefused(
                f"{self.model} rank {self.rank} already holds buffers of {len(self.live)} versions "
                f"{sorted(self.live)} (max_buffer_sets={self.max_buffer_sets}) that the broker has "
                "not retired: subscribers still lease them or other ranks have not published "
                "them. Wait for subscribers (wait_applied) or for the pending versions to expire, "
                "check `weightstream status`, or raise max_buffer_sets"
            )
        started = time.perf_counter()
        layout = plan(named_tensors, bucket_bytes=self.bucket_bytes, region_bytes=self.region_bytes)
        if snapshot:
            taken = await self._snapshot(layout, named_tensors)
            stall = time.perf_counter() - started
            task = asyncio.create_task(
                self._publish_snapshot(version, layout, taken, started, stall),
                name=f"publish-snapshot-{version}",
            )
            self._background = SnapshotPublish(version, stall, task)
            return self._background
        buffer_set, _ = self.pool.take(layout.region_bytes)
        try:
            checksums = await asyncio.to_thread(pack, layout, named_tensors, buffer_set.buffers)
        except BaseException:
            self.pool.give_back(buffer_set)
            raise
        return await self._announce(version, layout, buffer_set, checksums, started, None)

    async def _snapshot(
        self, layout: Layout, named_tensors: Mapping[str, torch.Tensor]
    ) -> GpuSnapshot:
        """Copy the tensors into a device snapshot buffer: the trainer's stall."""
        device = next(iter(named_tensors.values())).device
        if not self.offer_gpu:
            into = self._device_buffer  # one, reused: the previous version's copy is done
            if into is None or into.device != device or into.numel() < layout.total_bytes:
                self._device_buffer = None  # free the old one before allocating its successor
                into = torch.empty(layout.total_bytes, dtype=torch.uint8, device=device)
                self._device_buffer = into
            return await asyncio.to_thread(gpu_snapshot.snapshot, layout, named_tensors, into=into)
        if device.type != "cuda":
            raise ValueError(f"offer_gpu needs CUDA tensors, not tensors on {device}")
        into = self._take_gpu_copy(device, layout.total_bytes)
        try:
            return await asyncio.to_thread(gpu_snapshot.snapshot, layout, named_tensors, into=into)
        except BaseException:
            self._give_back_gpu_copy(into)
            raise

    def _take_gpu_copy(self, device: torch.device, nbytes: int) -> torch.Tensor:
        """A free GPU copy of at least `nbytes` (a retired version's), else a new one."""
        for index, free in enumerate(self._gpu_free):
            if free.device == device and free.numel() >= nbytes:
                return self._gpu_free.pop(index)
        if len(self.gpu_live) >= self.max_buffer_sets:
            raise PublishRefused(
                f"{self.model} rank {self.rank} holds GPU copies of versions {sorted(self.gpu_live)}"
                " that the broker has not retired; wait for subscribers or raise max_buffer_sets"
            )
        for free in self._gpu_free:  # too small or elsewhere: free them before allocating
            self._exported.pop(free.data_ptr(), None)
        self._gpu_free.clear()
        return torch.empty(nbytes, dtype=torch.uint8, device=device)

    def _give_back_gpu_copy(self, packed: torch.Tensor) -> None:
        if len(self._gpu_free) < self.max_buffer_sets:
            self._gpu_free.append(packed)
        else:
            self._exported.pop(packed.data_ptr(), None)

    def _gpu_offers(self, taken: GpuSnapshot) -> list[list[Locator]]:
        """One `CudaIpcLocator` per region of the snapshot's packed buffer (exported once)."""
        key = taken.packed.data_ptr()
        exported = self._exported.get(key)
        if exported is None:
            exported = self._exported[key] = export_buffer(taken.packed)
        return [[offer] for offer in taken.ipc_offers(exported)]

    async def _publish_snapshot(
        self, version: int, layout: Layout, taken: GpuSnapshot, started: float, stall: float
    ) -> PublishResult:
        """The background part of a snapshot publish: D2H + digests, then the PublishShard.

        With `offer_gpu` (and no BLAKE3 digests, which need the host bytes) the version is
        announced twice: first offered on the GPU alone, once its digests are computed there
        (a same-GPU engine reads it from then on), then again with the host copy's locators
        added once the D2H copy is done (every other subscriber reads that). The broker takes
        the second shard as more places to read the same bytes (`Registry._offer_more`)."""
        gpu_copy = taken.packed if self.offer_gpu else None
        gpu_readable: float | None = None
        try:
            offers = self._gpu_offers(taken) if gpu_copy is not None else None
            if offers is not None and not self.secure_digests:
                digests = await asyncio.to_thread(taken.digests)
                await self._offer_gpu_copy(version, layout, offers, digests, taken.packed)
                gpu_readable = time.perf_counter() - started
            buffer_set, _ = self.pool.take(layout.region_bytes)
            copying = asyncio.ensure_future(asyncio.to_thread(taken.copy_to, buffer_set.buffers))
            try:
                # Shielded: a cancel must not give the buffers back while the copy still writes.
                checksums = await asyncio.shield(copying)
            except BaseException:
                await asyncio.wait([copying])
                self.pool.give_back(buffer_set)
                raise
        except BaseException:
            if gpu_copy is not None and version not in self.gpu_live:
                self._give_back_gpu_copy(gpu_copy)
            raise
        try:
            result = await self._announce(
                version, layout, buffer_set, checksums, started, stall, offers=offers
            )
        except BrokerError as exc:
            if gpu_readable is None:
                if gpu_copy is not None:
                    self._give_back_gpu_copy(gpu_copy)  # refused: nobody opened it
                raise
            # The GPU copy is out; only the host offer was refused (a restarted broker forgot
            # the version's shards, or it was retired meanwhile): same-GPU engines still read it.
            logger.warning(
                "host copy not offered model=%s version=%d rank=%d error=%s",
                self.model,
                version,
                self.rank,
                exc,
            )
            return PublishResult(
                version,
                layout.shard(offers or [], checksums, self.rank),
                True,
                gpu_readable,
                stall_seconds=stall,
                gpu_readable_seconds=gpu_readable,
            )
        except BaseException:
            if gpu_copy is not None and version not in self.gpu_live:
                # No answer: it may be announced, so it stays until a Retire (as the host
                # buffers do).
                if version in self.live:
                    self.gpu_live[version] = gpu_copy
                else:
                    self._give_back_gpu_copy(gpu_copy)
            raise
        if gpu_copy is not None:
            self.gpu_live[version] = gpu_copy
        result.gpu_readable_seconds = gpu_readable
        return result

    async def _offer_gpu_copy(
        self,
        version: int,
        layout: Layout,
        offers: list[list[Locator]],
        digests: list[str],
        gpu_copy: torch.Tensor,
    ) -> None:
        """Announce the version with its GPU copy as the only place to read it."""
        shard = layout.shard(offers, digests, self.rank)
        if self.signing_key is not None:
            shard = await asyncio.to_thread(self._sign, version, shard)
        try:
            await self.client.publish(
                self.model, version, self.rank, self.world_size, shard, job=self.job
            )
        except BrokerError:
            raise  # refused: nobody can have opened the copy
        except BaseException:
            # No answer: it may be announced all the same, so the copy stays until a Retire.
            self.gpu_live[version] = gpu_copy
            raise
        self.gpu_live[version] = gpu_copy
        logger.info(
            "offered on the gpu model=%s version=%d rank=%d/%d bytes=%d",
            self.model,
            version,
            self.rank,
            self.world_size,
            layout.total_bytes,
        )

    async def _settle_background(self) -> None:
        """Wait (bounded) for the previous snapshot publish's background part; raise its error."""
        pending = self._background
        if pending is None:
            return
        # asyncio.wait, not a timeout around the task: the task may raise a TimeoutError of
        # its own (the broker did not answer), which is a failure, not our bound.
        done, _ = await asyncio.wait({pending.task}, timeout=self.background_timeout_s)
        if not done:
            raise BackgroundPublishFailed(
                f"version {pending.version} of {self.model} rank {self.rank}: its host copy and "
                f"PublishShard did not finish within background_timeout_s="
                f"{self.background_timeout_s}s; the next version waits for it (its snapshot "
                "buffer is reused). Check the broker (`weightstream status`) or raise the timeout"
            )
        self._background = None
        if pending.task.cancelled():
            raise BackgroundPublishFailed(
                f"version {pending.version} of {self.model} rank {self.rank} was snapshotted "
                "but its publish was cancelled; it is not readable. Publish the next version"
            )
        exc = pending.task.exception()
        if exc is not None and not pending.reported:
            raise BackgroundPublishFailed(
                f"version {pending.version} of {self.model} rank {self.rank} was snapshotted "
                f"but not published: {exc}. It is not readable; publish the next version"
            ) from exc

    async def flush(self) -> None:
        """Wait until the last snapshot publish is readable (or raise why it is not)."""
        await self._settle_background()

    async def _announce(
        self,
        version: int,
        layout: Layout,
        buffer_set: BufferSet,
        checksums: list[str],
        started: float,
        stall: float | None,
        *,
        offers: list[list[Locator]] | None = None,
    ) -> PublishResult:
        """Expose the packed `buffer_set`, seal the shard and send it to the broker; `offers`
        (the GPU copy's, per region) come first in each region's locators."""
        try:
            regions = buffer_set.regions
            # Each region is offered on every transport; subscribers read from one they have.
            per_sender = [sender.expose(regions) for sender in self.senders]
            locators = [list(offers) for offers in zip(*per_sender, strict=True)]
            if offers is not None:
                locators = [[*gpu, *host] for gpu, host in zip(offers, locators, strict=True)]
            shard = layout.shard(locators, checksums, self.rank)
            if self.secure_digests or self.signing_key is not None:
                shard = await asyncio.to_thread(self._seal, version, shard, buffer_set)
        except BaseException:
            self.pool.give_back(buffer_set)
            raise
        try:
            reply = await self.client.publish(
                self.model, version, self.rank, self.world_size, shard, job=self.job
            )
        except BrokerError:
            self.pool.give_back(buffer_set)  # refused: nobody can have seen these bytes
            raise
        except BaseException:
            # No answer (a timeout, a cancel): the broker may have announced the version all
            # the same, so subscribers may be reading these buffers. They wait for a Retire.
            if version not in self.live:
                self.live[version] = buffer_set
            else:
                self.pool.give_back(buffer_set)
            raise
        # Only once the broker took it: a refused `version` may be one still live here.
        self.live[version] = buffer_set
        seconds = time.perf_counter() - started
        logger.info(
            "published model=%s version=%d rank=%d/%d bytes=%d buckets=%d seconds=%.3f "
            "stall=%.4f complete=%s",
            self.model,
            version,
            self.rank,
            self.world_size,
            layout.total_bytes,
            len(shard.buckets),
            seconds,
            seconds if stall is None else stall,
            reply.complete,
        )
        return PublishResult(
            version, shard, reply.complete, seconds, stall_seconds=stall, readable_seconds=seconds
        )

    def _seal(self, version: int, shard: Shard, buffer_set: BufferSet) -> Shard:
        """Add the BLAKE3 digests and the signature, as configured. Blocking."""
        if self.secure_digests:
            shard = add_digests(shard, [b.numpy().data for b in buffer_set.buffers])
        return self._sign(version, shard)

    def _sign(self, version: int, shard: Shard) -> Shard:
        """The shard with this rank's signature, if it signs. Blocking."""
        if self.signing_key is None:
            return shard
        return sign_shard(
            shard,
            model=self.model,
            version=version,
            rank=self.rank,
            world_size=self.world_size,
            key=self.signing_key,
        )

    async def wait_applied(self, version: int, num_subscribers: int) -> int:
        """Wait until `num_subscribers` have applied `version` (on-policy RL); no own timeout."""
        return await self.client.wait_applied(self.model, version, num_subscribers)

    async def retire_loop(self) -> None:
        """Free the memory of versions the broker retires; runs until cancelled."""
        while True:
            retire = await self.client.retired.get()
            if retire.model != self.model:
                continue
            buffer_set = self.live.pop(retire.version, None)
            gpu_copy = self.gpu_live.pop(retire.version, None)
            if gpu_copy is not None:
                self._give_back_gpu_copy(gpu_copy)  # no subscriber leases it any more
            if retire.reason:
                # Not the normal end of a version: a pending one expired, say (ranks missing).
                logger.warning(
                    "retired early model=%s version=%d freed_bytes=%d reason=%s",
                    self.model,
                    retire.version,
                    buffer_set.nbytes if buffer_set else 0,
                    retire.reason,
                )
            if buffer_set is None:
                continue
            # Regions stay registered: the buffers are reused for the next version.
            self.pool.give_back(buffer_set)
            if not retire.reason:
                logger.info(
                    "retired model=%s version=%d freed_bytes=%d",
                    self.model,
                    retire.version,
                    buffer_set.nbytes,
                )

    async def settle(self) -> None:
        """Before closing: let the last snapshot publish finish (bounded), or cancel it."""
        pending, self._background = self._background, None
        if pending is None:
            return
        done, _ = await asyncio.wait({pending.task}, timeout=self.background_timeout_s)
        if not done:
            pending.task.cancel()
            await asyncio.gather(pending.task, return_exceptions=True)
            return
        exc = None if pending.task.cancelled() else pending.task.exception()
        if exc is not None and not pending.reported:
            logger.warning(
                "snapshot publish failed model=%s version=%d error=%s",
                self.model,
                pending.version,
                exc,
            )

    def close(self) -> None:
        self._device_buffer = None
        self.gpu_live.clear()
        self._gpu_free.clear()
        self._exported.clear()
        for sender in self.senders:
            sender.close()
        self.pool.close()


@contextlib.asynccontextmanager
async def open_publisher(
    config: ClientConfig,
    *,
    model: str,
    sender: BulkSender | Sequence[BulkSender],
    rank: int = 0,
    world_size: int = 1,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    node_local: bool = False,
    max_buffer_sets: int = DEFAULT_MAX_BUFFER_SETS,
    context: zmq.asyncio.Context | None = None,
    job: str | None = None,
    signing_key: SigningKey | None = None,
    secure_digests: bool = False,
    background_timeout_s: float = DEFAULT_BACKGROUND_TIMEOUT_S,
    offer_gpu: bool = False,
) -> AsyncIterator[Publisher]:
    """Connect to the broker and run the retire loop while the publisher is in use."""
    ctx = context or zmq.asyncio.Context()
    try:
        async with connect(config, role="publisher", context=ctx) as client:
            publisher = Publisher(
                client=client,
                sender=sender,
                model=model,
                rank=rank,
                world_size=world_size,
                bucket_bytes=bucket_bytes,
                node_local=node_local,
                job=job,
                max_buffer_sets=max_buffer_sets,
                signing_key=signing_key,
                secure_digests=secure_digests,
                background_timeout_s=background_timeout_s,
                offer_gpu=offer_gpu,
            )
            retire = asyncio.create_task(publisher.retire_loop(), name="retire")
            try:
                yield publisher
                await publisher.settle()
            finally:
                retire.cancel()
                await asyncio.gather(retire, return_exceptions=True)
                publisher.close()
    finally:
        if context is None:
            ctx.destroy(linger=0)


class SyncPublisher:
    """A blocking wrapper for training loops: the publisher's event loop runs in a thread.

    >>> with SyncPublisher(config, model="llama", sender=MooncakeSender()) as publisher:
    ...     for step in range(steps):
    ...         train_step()
    ...         publisher.publish(step, model.state_dict())  # doctest: +SKIP
    """

    def __init__(
        self,
        config: ClientConfig,
        *,
        model: str,
        sender: BulkSender | Sequence[BulkSender],
        **kwargs: Any,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="weightstream-publisher", daemon=True
        )
        self._thread.start()
        self._context_manager = open_publisher(config, model=model, sender=sender, **kwargs)
        self.publisher: Publisher = self._call(self._context_manager.__aenter__())

    def _call(self, coroutine: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        return future.result(timeout=timeout_s)

    def publish(self, version: int, named_tensors: Mapping[str, torch.Tensor]) -> PublishResult:
        return self._call(self.publisher.publish(version, named_tensors))

    def publish_snapshot(
        self, version: int, named_tensors: Mapping[str, torch.Tensor]
    ) -> SnapshotPublish:
        """`publish(..., snapshot=True)`: returns after the GPU snapshot; see `flush`."""
        return self._call(self.publisher.publish(version, named_tensors, snapshot=True))

    def flush(self, *, timeout_s: float) -> None:
        """Wait until the last snapshot publish is readable (or raise why it is not)."""
        self._call(self.publisher.flush(), timeout_s=timeout_s)

    def wait_applied(self, version: int, num_subscribers: int, *, timeout_s: float) -> int:
        async def wait() -> int:
            async with asyncio.timeout(timeout_s):
                return await self.publisher.wait_applied(version, num_subscribers)

        return self._call(wait())

    def close(self) -> None:
        try:
            self._call(self._context_manager.__aexit__(None, None, None), timeout_s=30)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()

    def __enter__(self) -> SyncPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
