"""Within a node: fetch each bucket once per node, share it over NVLink through CUDA IPC.

N processes, one per GPU, each with its own `CudaStager` over the same host regions (the
publisher's shared memory, or the node's host staging, mapped by all). Rank r copies a
contiguous 1/N of the buckets host to device over its own PCIe link, then reads every other
rank's buckets out of that rank's staging (a CUDA IPC handle, NVLink), and verifies every bucket
it holds on its own GPU. An all-gather, not N copies of the whole version over one link:

    rank r  copy stream    H2D own[0] own[1] ... own[m-1]  (IPC event g recorded after group g)
            peer j streams   wait event(j, g) -> copy j's bucket -> ...     (one pair per peer)
            verify stream    wmix128 of every bucket as it lands       -> one host sync at the end
    host    enqueue own copies -> barrier -> enqueue peer copies -> sync -> barrier

The first barrier guarantees every IPC event a peer waits on was already recorded for this
version (a wait on an event takes its latest record); the last, that no rank overwrites its
staging for the next version while a peer still reads it. With `use_events=False` a rank
instead finishes its own copies before the first barrier (simpler, no overlap).

Handles and events travel once, as a `schemas.ipc.StagingShare` (msgpack, never pickle; made
and opened by `gpu.ipc`, shared with the publishers),
through any key-value store (`exchange_shares`: torch.distributed's TCPStore will do).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import msgspec
import torch

from gpu.ipc import export_buffer, export_event, ipc_event, open_buffer, open_event
from gpu.streams import new_stream
from schemas.ipc import StagingShare, decode_staging_share, encode_staging_share
from streamer.errors import ProtocolError
from subscribers.cuda.stage import PullResult

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from gpu.digest import DigestBatch
    from subscribers.cuda.stage import BucketLike, CudaStager

__all__ = ["KeyValueStore", "NodeShare", "event_group", "exchange_shares", "owner_blocks"]

logger = logging.getLogger(__name__)


def owner_blocks(num_buckets: int, world_size: int) -> list[range]:
    """Which rank fetches which buckets: contiguous blocks whose sizes differ by at most one.

    >>> owner_blocks(5, 2)
    [range(0, 2), range(2, 5)]
    """
    return [
        range(r * num_buckets // world_size, (r + 1) * num_buckets // world_size)
        for r in range(world_size)
    ]


def event_group(position: int, count: int, num_events: int) -> int:
    """The ready-event that covers the `position`-th of a rank's `count` own buckets.

    >>> [event_group(p, 5, 2) for p in range(5)]
    [0, 0, 0, 1, 1]
    """
    return position * num_events // count


class KeyValueStore(Protocol):
    """Enough of `torch.distributed.Store` to swap shares: `get` blocks until the key is set."""

    def set(self, key: str, value: Any) -> None: ...  # torch's stubs say str; it takes bytes
    def get(self, key: str) -> bytes: ...


def exchange_shares(
    store: KeyValueStore, share: StagingShare, *, prefix: str
) -> list[StagingShare]:
    """Publish this rank's share under `prefix` and collect every rank's, in rank order."""
    store.set(f"{prefix}/{share.rank}", encode_staging_share(share))
    shares = []
    for rank in range(share.world_size):
        try:
            shares.append(decode_staging_share(store.get(f"{prefix}/{rank}")))
        except msgspec.DecodeError as exc:
            raise ProtocolError(
                f"rank {rank} sent a staging share we cannot decode: {exc}"
            ) from exc
    return shares


@dataclass(eq=False)
class _Peer:
    rank: int
    staging: torch.Tensor
    """The peer's staging buffer, opened from its IPC handle (lives on the peer's device)."""
    events: list[torch.cuda.Event]
    source_stream: torch.cuda.Stream
    """On the peer's device: torch runs a cross-device copy on the source device's stream."""
    target_stream: torch.cuda.Stream
    """On our device: the copy is ordered against it, and the verify stream waits on it."""


class NodeShare:
    """One rank's side of the node-local all-gather of a version.

    >>> share = NodeShare(stager, rank=rank, world_size=4)  # doctest: +SKIP
    >>> share.connect(exchange_shares(store, share.export(), prefix="staging"))  # doctest: +SKIP
    >>> result = share.pull(host_regions, manifest.buckets, barrier=dist.barrier)  # doctest: +SKIP
    """

    def __init__(
        self,
        stager: CudaStager,
        *,
        rank: int,
        world_size: int,
        num_events: int = 16,
        use_events: bool = True,
    ) -> None:
        if not stager.is_cuda:
            raise ValueError("NodeShare needs a CUDA stager")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of {world_size}")
        if num_events < 1:
            raise ValueError("num_events must be at least 1")
        self.stager = stager
        self.rank = rank
        self.world_size = world_size
        self.num_events = num_events
        self.use_events = use_events
        with torch.cuda.device(stager.device):
            self._events = [ipc_event() for _ in range(num_events)] if use_events else []
        self._peers: dict[int, _Peer] = {}

    def export(self) -> StagingShare:
        """This rank's staging buffer and ready-events, for the other ranks of the node."""
        buffer = export_buffer(self.stager.staging)
        with torch.cuda.device(self.stager.device):
            events = tuple(export_event(event) for event in self._events)
        return StagingShare(
            rank=self.rank, world_size=self.world_size, buffer=buffer, events=events
        )

    def connect(self, shares: Sequence[StagingShare]) -> None:
        """Open every other rank's staging buffer and events (once; reused for every version)."""
        for share in shares:
            if share.rank == self.rank:
                continue
            if share.world_size != self.world_size:
                raise ValueError(
                    f"rank {share.rank} is in a world of {share.world_size}, we in one of {self.world_size}"
                )
            if len(share.events) != len(self._events):
                raise ValueError(
                    f"rank {share.rank} exports {len(share.events)} events, we use {len(self._events)}"
                )
            self._peers[share.rank] = self._open(share)
        missing = sorted(set(range(self.world_size)) - {self.rank} - set(self._peers))
        if missing:
            raise ValueError(f"no staging share from ranks {missing}")
        logger.info("node share connected rank=%d world_size=%d", self.rank, self.world_size)

    def pull(
        self,
        host_regions: Sequence[torch.Tensor],
        buckets: Sequence[BucketLike],
        *,
        barrier: Callable[[], None],
    ) -> PullResult:
        """Fetch this rank's buckets, read the rest from the peers, verify all; see the module doc.

        `barrier` blocks until every rank of the node reached it (called twice). Call the
        stager's `prepare` first, with the same layout on every rank.
        """
        if len(self._peers) != self.world_size - 1:
            raise RuntimeError("call connect() before pull()")
        stager = self.stager
        assert stager.copy_stream is not None
        started = time.perf_counter()
        blocks = owner_blocks(len(buckets), self.world_size)
        batch = stager.start([b.checksum for b in buckets])
        current = torch.cuda.current_stream(stager.device)
        for peer in self._peers.values():
            peer.target_stream.wait_stream(current)
        mine = blocks[self.rank]
        copied = []
        for position, index in enumerate(mine):
            copied.append(stager.copy_in(buckets[index], host_regions))
            group = event_group(position, len(mine), self.num_events)
            if self.use_events and (
                position + 1 == len(mine)
                or event_group(position + 1, len(mine), self.num_events) != group
            ):
                self._events[group].record(stager.copy_stream)
        if not self.use_events:
            stager.copy_stream.synchronize()
        barrier()
        # Verify in arrival order: position k of every rank lands at about the same time.
        waited = dict.fromkeys(self._peers, -1)
        for position in range(max(len(block) for block in blocks)):
            if position < len(mine):
                target, done = copied[position]
                stager.verify_when(done, batch, mine[position], target)
            for step in range(1, self.world_size):
                peer_rank = (self.rank + step) % self.world_size
                block = blocks[peer_rank]
                if position < len(block):
                    self._copy_from(
                        self._peers[peer_rank],
                        block[position],
                        buckets,
                        batch,
                        position,
                        len(block),
                        waited,
                    )
        failed = stager.finish(batch)
        barrier()
        return PullResult(failed, sum(b.nbytes for b in buckets), time.perf_counter() - started)

    def close(self) -> None:
        """Drop the peers' buffers and events (their owners free them)."""
        self._peers.clear()

    def _copy_from(
        self,
        peer: _Peer,
        index: int,
        buckets: Sequence[BucketLike],
        batch: DigestBatch,
        position: int,
        count: int,
        waited: dict[int, int],
    ) -> None:
        if self.use_events:
            group = event_group(position, count, self.num_events)
            if group > waited[peer.rank]:
                peer.source_stream.wait_event(peer.events[group])
                waited[peer.rank] = group
        bucket = buckets[index]
        start = self.stager.offset_of(bucket.region, bucket.offset, bucket.nbytes)
        target = self.stager.staging[start : start + bucket.nbytes]
        source = peer.staging[start : start + bucket.nbytes]
        with torch.cuda.stream(peer.source_stream), torch.cuda.stream(peer.target_stream):
            target.copy_(source, non_blocking=True)
        self.stager.verify_after(peer.target_stream, batch, index, target)

    def _open(self, share: StagingShare) -> _Peer:
        device, staging = open_buffer(share.buffer)
        with torch.cuda.device(device):
            events = [open_event(device, handle) for handle in share.events]
            source_stream = new_stream(device)
        same_device = device == self.stager.device.index
        target_stream = source_stream if same_device else new_stream(self.stager.device)
        return _Peer(share.rank, staging, events, source_stream, target_stream)
