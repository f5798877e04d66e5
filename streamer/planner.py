"""Who reads which buckets from whom: the relay plan (torch-free, pure).

Every node reading every byte from the trainer takes N x S / B on the trainer's link. Instead a
version's buckets are dealt round-robin into `fanout` (k) *stripes*, and stripe t flows down its
own k-ary tree over the subscriber nodes, rooted at the source (the trainer)::

    buckets 0 1 2 3 4 5 ...  ──>  stripe 0: 0 2 4 ...   stripe 1: 1 3 5 ...   (k = 2)

    stripe 0 tree:  source ── a ──┬── b ── d            stripe 1 tree:  source ── c ──┬── d ── b
                                  └── c                                                └── a

The node order of tree t is the node list rotated by t x ceil((N - 1) / k), and each tree is a
complete k-ary heap over that order (`parent(i) = (i - 1) // k`), so the interior (forwarding)
positions of the k trees are disjoint: a node forwards in at most one tree, to at most k children,
one stripe each. Every uplink then carries about one copy of the model (k x S / k), the trainer's
too (one stripe to each of k roots), every node's downlink receives k stripes that add up to one
copy, and the depth is about log_k(N). Buckets flow store-and-forward (a node serves bucket b once
it has verified b), pipelined, so the time to N nodes is about S / B plus depth x k x c / B, near
the floor S / B + (ceil(log2(N + 1)) - 1) x c / B (bench/relay_sim.py measures the ratio).

Why stripes and not one tree or one chain: a binary tree's interior nodes upload two copies (~2 S
/ B); a chain uploads one copy but its depth is N (S / B + (N - 1) c / B, and one slow node slows
everyone after it). Stripes keep one copy per uplink and logarithmic depth.

When a node goes there are two answers. `heal` re-parents only its orphans, to their nearest
live ancestor, which then serves more streams on one uplink; `plan` over the survivors balances
every uplink again, and every node keeps the buckets it has. Simulated (bench/relay_sim.py, 1 TB
at 400 Gb/s to 1,024 nodes, the root of a stripe's tree killed half-way, a 1 s read deadline):
healing costs 1.30 x the floor, a fresh plan 1.05 x (the deadline, and nothing else), so the relay
replans on a failure and `heal` is the stop-gap between a death and the new plan.

>>> p = plan(["a", "b", "c", "d"], source="trainer", fanout=2)
>>> [p.parent_of(node, stripe=0) for node in p.nodes]
['trainer', 'a', 'a', 'b']
>>> p.source_for("b", bucket=1)
'd'
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

__all__ = ["Plan", "heal", "plan"]


@dataclass(frozen=True)
class Plan:
    """Each node's parent in each stripe's tree; the source's id stands for the trainer."""

    source: str
    nodes: tuple[str, ...]
    fanout: int
    parents: dict[str, tuple[str, ...]] = field(repr=False)
    """node -> its parent in tree 0 .. fanout - 1 (the source for a tree's root)."""

    @property
    def stripes(self) -> int:
        return self.fanout

    def stripe_of(self, bucket: int) -> int:
        return bucket % self.fanout

    def parent_of(self, node: str, *, stripe: int) -> str:
        return self.parents[node][stripe]

    def source_for(self, node: str, *, bucket: int) -> str:
        """Where `node` reads bucket `bucket` from (a node id, or the source)."""
        return self.parents[node][self.stripe_of(bucket)]

    def children(self, node: str, *, stripe: int) -> list[str]:
        """Who reads stripe `stripe` from `node` (or from the source, for `source`)."""
        return [child for child in self.nodes if self.parents[child][stripe] == node]

    def uplink_stripes(self, node: str) -> int:
        """How many (child, stripe) streams `node` serves; each stripe is 1/fanout of the model."""
        return sum(parents.count(node) for parents in self.parents.values())

    def uplink_copies(self, node: str) -> float:
        """Copies of the model `node`'s uplink carries per version."""
        return self.uplink_stripes(node) / self.fanout

    def depth(self, node: str, *, stripe: int) -> int:
        """Hops from the source to `node` in one stripe's tree (1 for a root)."""
        hops = 1
        parent = self.parents[node][stripe]
        while parent != self.source:
            hops += 1
            parent = self.parents[parent][stripe]
            if hops > len(self.nodes):
                raise ValueError("the plan has a cycle")
        return hops

    def max_depth(self) -> int:
        return max(
            (self.depth(node, stripe=t) for node in self.nodes for t in range(self.fanout)),
            default=0,
        )


def plan(nodes: Sequence[str], *, source: str, fanout: int = 2) -> Plan:
    """The striped plan for `nodes` (in a stable order: sort them for a deterministic plan).

    `fanout` is both the number of stripes and each tree's arity; 2 is a good default (depth
    log2 N). It stays the same however few nodes there are, since it decides which bucket is in
    which stripe (a replan of the survivors must keep the version's stripes).
    """
    if fanout < 1:
        raise ValueError(f"fanout must be at least 1, not {fanout}")
    order = list(nodes)
    if len(set(order)) != len(order):
        raise ValueError("node ids must be unique")
    if source in order:
        raise ValueError(f"the source {source!r} cannot also be a node")
    count = len(order)
    stripes = fanout
    parents: dict[str, list[str]] = {node: [] for node in order}
    # Tree t's interior is the first ceil((N - 1) / k) positions of its order: rotating by
    # that much keeps the k interiors disjoint whenever k * ceil((N - 1) / k) <= N.
    shift = max(1, math.ceil((count - 1) / stripes)) if count else 0
    for stripe in range(stripes):
        rotated = order[stripe * shift :] + order[: stripe * shift]
        for position, node in enumerate(rotated):
            parent = source if position == 0 else rotated[(position - 1) // stripes]
            parents[node].append(parent)
    return Plan(
        source=source,
        nodes=tuple(order),
        fanout=stripes,
        parents={node: tuple(p) for node, p in parents.items()},
    )


def heal(current: Plan, *, gone: Iterable[str]) -> Plan:
    """`current` without the `gone` nodes: each orphan reads from its nearest live ancestor.

    Only the orphans change source; the rest of every tree stays as it was, so reads in flight
    elsewhere are not disturbed. Plan the next version afresh with `plan`.

    >>> p = heal(plan(["a", "b", "c", "d"], source="t"), gone=["b"])
    >>> p.parent_of("d", stripe=0)
    'a'
    """
    dead = set(gone)
    unknown = dead - set(current.nodes)
    if unknown:
        raise ValueError(f"not in the plan: {sorted(unknown)}")
    parents: dict[str, tuple[str, ...]] = {}
    for node in current.nodes:
        if node in dead:
            continue
        healed = []
        for stripe in range(current.fanout):
            parent = current.parents[node][stripe]
            while parent in dead:
                parent = current.parents[parent][stripe]
            healed.append(parent)
        parents[node] = tuple(healed)
    return Plan(
        source=current.source,
        nodes=tuple(n for n in current.nodes if n not in dead),
        fanout=current.fanout,
        parents=parents,
    )
