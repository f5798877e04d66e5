"""Indexes over the registry's peers, so that per-message work stays O(1) at 10,000 peers.

    Liveness        peer ids in the order they were last heard (live) and went (gone):
                    a heartbeat moves one id to the end; the housekeeping tick pops only the
                    silent ones from the front, and forgets only the gone ones past their TTL
    AppliedCounts   model -> version -> live subscribers that run it, so "how many run
                    version >= v" (WaitApplied, status) costs the distinct versions, not the peers

Owned by `streamer.registry.Registry`, which updates them wherever a peer's liveness or
applied version changes; each holds at most one entry per peer (and model).

>>> live = Liveness()
>>> live.heard("a", 0.0); live.heard("b", 1.0); live.heard("a", 2.0)
>>> live.silent(now=11.5, timeout_s=10.0)
['b']
"""

from __future__ import annotations

from collections import OrderedDict

__all__ = ["AppliedCounts", "Liveness"]


class Liveness:
    """Who was heard when, oldest first; who went when, oldest first.

    The order is that of the calls, whose `now` only grows (a wall clock stepped back
    delays detection by the step, it never marks a peer heard since as silent)."""

    def __init__(self) -> None:
        self._heard: OrderedDict[str, float] = OrderedDict()
        self._gone: OrderedDict[str, float] = OrderedDict()

    def heard(self, peer_id: str, now: float) -> None:
        """A live peer sent something (or said Hello, also after it was gone)."""
        self._gone.pop(peer_id, None)
        self._heard[peer_id] = now
        self._heard.move_to_end(peer_id)

    def went(self, peer_id: str, now: float) -> None:
        self._heard.pop(peer_id, None)
        self._gone[peer_id] = now
        self._gone.move_to_end(peer_id)

    def forgot(self, peer_id: str) -> None:
        self._heard.pop(peer_id, None)
        self._gone.pop(peer_id, None)

    def silent(self, *, now: float, timeout_s: float) -> list[str]:
        """Live peers not heard for more than `timeout_s`: only the front of the order is read."""
        out: list[str] = []
        for peer_id, last in self._heard.items():
            if now - last <= timeout_s:
                break
            out.append(peer_id)
        return out

    def gone_since(self, *, now: float, ttl_s: float) -> list[str]:
        """Gone peers that went at least `ttl_s` ago (all of them with `ttl_s=0`)."""
        out: list[str] = []
        for peer_id, at in self._gone.items():
            if now - at < ttl_s:
                break
            out.append(peer_id)
        return out


class AppliedCounts:
    """model -> {version: live subscribers whose applied version of that model it is}."""

    def __init__(self) -> None:
        self._counts: dict[str, dict[int, int]] = {}

    def add(self, model: str, version: int) -> None:
        counts = self._counts.setdefault(model, {})
        counts[version] = counts.get(version, 0) + 1

    def remove(self, model: str, version: int) -> None:
        counts = self._counts[model]
        counts[version] -= 1
        if not counts[version]:
            del counts[version]
            if not counts:
                del self._counts[model]

    def at_least(self, model: str, version: int) -> int:
        """Live subscribers running `version` of `model` or a newer one."""
        return sum(n for v, n in self._counts.get(model, {}).items() if v >= version)
