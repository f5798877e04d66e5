"""Pending `WaitApplied` requests: who waits for how many subscribers at which version.

    (model, version) -> [waiter, ...] sorted by num_subscribers

An `Applied` (or a heartbeat) that moves a subscriber to version v of a model wakes, for each
waited-for version <= v of that model, the prefix of waiters it satisfies: one count of the
fleet per waited-for version, not one per waiter (4k waiters and 500 subscribers once cost
minutes of CPU). Bounded per peer and in all; each waiter expires after `ttl_s` with
`Error("expired")`. Pure state, like the registry that owns it.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from schemas.messages import AppliedReached, Error, Message
from streamer.errors import BrokerError

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["Waiters"]


@dataclass(order=True)
class _Waiter:
    num_subscribers: int
    seq: int
    peer_id: str = field(compare=False)
    request_id: int = field(compare=False)
    expires_at: float = field(compare=False)


class Waiters:
    def __init__(self, *, per_peer: int, total: int, ttl_s: float) -> None:
        self.per_peer = per_peer
        self.total = total
        self.ttl_s = ttl_s
        self._by_version: dict[tuple[str, int], list[_Waiter]] = {}
        self._per_peer: dict[str, int] = {}
        self._seq = itertools.count()

    def __len__(self) -> int:
        return sum(self._per_peer.values())

    def add(
        self, peer_id: str, request_id: int, model: str, version: int, count: int, now: float
    ) -> None:
        held = self._per_peer.get(peer_id, 0)
        if held >= self.per_peer or len(self) >= self.total:
            raise BrokerError(
                "bad_request",
                f"too many WaitApplied pending ({held} from this peer; limits.waiters_per_peer "
                f"{self.per_peer}): wait for the ones already asked",
            )
        waiter = _Waiter(count, next(self._seq), peer_id, request_id, now + self.ttl_s)
        bisect.insort(self._by_version.setdefault((model, version), []), waiter)
        self._per_peer[peer_id] = held + 1

    def wake(
        self, model: str, version: int, count: Callable[[str, int], int]
    ) -> list[tuple[str, Message]]:
        """A subscriber reached `version` of `model`: answer every waiter now satisfied."""
        out: list[tuple[str, Message]] = []
        for key in [k for k in self._by_version if k[0] == model and k[1] <= version]:
            waiters = self._by_version[key]
            reached = count(*key)
            woken = bisect.bisect_right(waiters, reached, key=lambda w: w.num_subscribers)
            for waiter in waiters[:woken]:
                reply = AppliedReached(
                    request_id=waiter.request_id,
                    model=key[0],
                    version=key[1],
                    num_subscribers=reached,
                )
                out.append((waiter.peer_id, reply))
                self._release(waiter.peer_id)
            del waiters[:woken]
            if not waiters:
                del self._by_version[key]
        return out

    def drop_peer(self, peer_id: str) -> None:
        if peer_id not in self._per_peer:
            return
        for key in list(self._by_version):
            self._by_version[key] = [w for w in self._by_version[key] if w.peer_id != peer_id]
            if not self._by_version[key]:
                del self._by_version[key]
        del self._per_peer[peer_id]

    def expire(self, now: float, count: Callable[[str, int], int]) -> list[tuple[str, Message]]:
        out: list[tuple[str, Message]] = []
        for key in list(self._by_version):
            waiters = self._by_version[key]
            for waiter in [w for w in waiters if w.expires_at <= now]:
                detail = (
                    f"WaitApplied for {key[0]} version {key[1]} expired after {self.ttl_s:g} s "
                    f"with {count(*key)} of {waiter.num_subscribers} subscribers there; ask "
                    "again or check `weightstream status`"
                )
                out.append(
                    (
                        waiter.peer_id,
                        Error(code="expired", detail=detail, request_id=waiter.request_id),
                    )
                )
                waiters.remove(waiter)
                self._release(waiter.peer_id)
            if not waiters:
                del self._by_version[key]
        return out

    def _release(self, peer_id: str) -> None:
        left = self._per_peer.pop(peer_id, 1) - 1
        if left > 0:
            self._per_peer[peer_id] = left
