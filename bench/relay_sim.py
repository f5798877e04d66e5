"""The relay plan simulated to 1,024 nodes: time to every node against the floor.

Drives the planner the relay uses (`streamer.planner.plan` / `heal`) with a model of the links:
N nodes and one source, each with a full-duplex link of B bytes/s, buckets of c bytes flowing
store-and-forward down each stripe's tree (a node forwards bucket b once it has it and has
verified it), a per-hop latency, and one node's failure mid-transfer.

    python bench/relay_sim.py              # the table in bench/RESULTS_RELAY_SIM.md

The model, per tree edge p -> v of stripe t: the edge carries stripe t's buckets in order at a
fixed rate r = min(B / streams(p), B / k) (p's uplink shared by every child stream it serves, v's
downlink by the k stripes it receives), so with d = c / r and x_j the time p has bucket j plus
the hop latency::

    done_v[j] = max(x_j, done_v[j-1]) + d     =>   done_v = (j+1) d + cummax(x_j - j d)

(vectorised, so a thousand nodes and tens of thousands of buckets take a second). A failure of
node f at time t_f: every bucket a node had verified by t_f stays; the plan is healed (orphans
read from their nearest live ancestor, which then shares its uplink among more streams); the
orphans start again after a detection delay (the per-bucket deadline); everyone downstream
follows.

What it leaves out (say so with the figures): TCP/RDMA dynamics (slow start, congestion,
incast at a node serving several streams); rates are static shares, not re-balanced when a
stream finishes early; the control plane (announce, manifest fetch, plan distribution) and the
swap; heterogeneous or shared links (a top-of-rack switch's oversubscription); the partial
bucket in flight at a failure is lost, not resumed; a node is assumed to verify at a fixed rate.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import numpy as np

from streamer.planner import Plan, heal, plan

GB = 1e9


@dataclass(frozen=True)
class Links:
    total_bytes: float
    bucket_bytes: float
    bytes_per_s: float
    hop_latency_s: float = 100e-6
    verify_bytes_per_s: float = 1.7e12  # the GPU digest; a CPU node verifies far slower

    @property
    def num_buckets(self) -> int:
        return math.ceil(self.total_bytes / self.bucket_bytes)


def floor_s(links: Links, nodes: int) -> float:
    depth = math.ceil(math.log2(nodes + 1)) - 1
    return links.total_bytes / links.bytes_per_s + depth * links.bucket_bytes / links.bytes_per_s


def _streams(p: Plan) -> dict[str, int]:
    """How many (child, stripe) streams each node's uplink serves."""
    counts = dict.fromkeys((*p.nodes, p.source), 0)
    for parents in p.parents.values():
        for parent in parents:
            counts[parent] += 1
    return counts


def _bfs(p: Plan, stripe: int) -> list[tuple[str, str]]:
    children: dict[str, list[str]] = {}
    for node in p.nodes:
        children.setdefault(p.parent_of(node, stripe=stripe), []).append(node)
    order: list[tuple[str, str]] = []
    frontier = [p.source]
    while frontier:
        nxt: list[str] = []
        for parent in frontier:
            for child in children.get(parent, []):
                order.append((parent, child))
                nxt.append(child)
        frontier = nxt
    return order


def _edge_times(parent_done: np.ndarray, d: float, links: Links, start: float) -> np.ndarray:
    """Verified-arrival times of a stripe's buckets over one edge, from index 0."""
    idx = np.arange(parent_done.size, dtype=np.float64)
    x = np.maximum(parent_done + links.hop_latency_s, start)
    done = (idx + 1) * d + np.maximum.accumulate(x - idx * d)
    return done + links.bucket_bytes / links.verify_bytes_per_s


def simulate(
    p: Plan,
    links: Links,
    *,
    fail: str | None = None,
    fail_at_s: float = 0.0,
    detect_s: float = 1.0,
    replan_s: float = 0.01,
    strategy: str = "heal",
) -> dict[str, float]:
    """Each live node's time to hold every bucket, verified.

    After `fail` dies at `fail_at_s`: `strategy="heal"` re-parents its orphans to their
    nearest live ancestor (`heal`); `"replan"` plans the survivors afresh (`plan`), so every
    uplink is back to about one copy. Orphans switch after `detect_s` (their reads time out);
    other nodes whose source changes switch after `replan_s` (the broker's new plan).
    """
    k = p.fanout
    counts = [len(range(t, links.num_buckets, k)) for t in range(k)]
    times = _run(p, links, counts, previous=None)
    if fail is None:
        return {node: max(float(times[(node, t)][-1]) for t in range(k)) for node in p.nodes}
    if strategy == "heal":
        after_plan = heal(p, gone=[fail])
    elif strategy == "replan":
        after_plan = plan([n for n in p.nodes if n != fail], source=p.source, fanout=p.fanout)
    else:
        raise ValueError(f"unknown strategy {strategy!r}")
    after = _run(
        after_plan, links, counts, previous=(p, times, fail_at_s, detect_s, replan_s, fail)
    )
    return {node: max(float(after[(node, t)][-1]) for t in range(k)) for node in after_plan.nodes}


def _run(
    p: Plan,
    links: Links,
    counts: list[int],
    *,
    previous: tuple[Plan, dict[tuple[str, int], np.ndarray], float, float, float, str] | None,
) -> dict[tuple[str, int], np.ndarray]:
    k = p.fanout
    streams = _streams(p)
    old_streams = _streams(previous[0]) if previous is not None else streams
    times: dict[tuple[str, int], np.ndarray] = {}
    for t in range(k):
        times[(p.source, t)] = np.zeros(counts[t])
        for parent, child in _bfs(p, t):
            rate = min(links.bytes_per_s / streams[parent], links.bytes_per_s / k)
            d = links.bucket_bytes / rate
            if previous is None:
                times[(child, t)] = _edge_times(times[(parent, t)], d, links, 0.0)
                continue
            old_plan, old_times, fail_at, detect, replan, dead = previous
            old = old_times[(child, t)]
            held = int(np.searchsorted(old, fail_at, side="right"))  # in order: a prefix
            old_parent = old_plan.parent_of(child, stripe=t)
            moved = old_parent != parent
            slowed = old_streams[parent] != streams[parent]
            upstream_changed = not np.array_equal(
                times[(parent, t)], old_times.get((parent, t), times[(parent, t)])
            )
            if not (moved or slowed or upstream_changed):
                times[(child, t)] = old
                continue
            if not moved:
                start = fail_at
            elif old_parent == dead:
                start = fail_at + detect  # an orphan: its reads from the dead node time out
            else:
                start = fail_at + replan  # told a new source by the broker
            if held:
                start = max(start, float(old[held - 1]))
            tail = _edge_times(times[(parent, t)][held:], d, links, start)
            times[(child, t)] = np.concatenate([old[:held], tail])
    return times


def report(links: Links, sizes: list[int], fanout: int) -> str:
    lines = [
        f"S = {links.total_bytes / GB:g} GB, B = {links.bytes_per_s * 8 / GB:g} Gb/s "
        f"({links.bytes_per_s / GB:g} GB/s), c = {links.bucket_bytes / 2**20:g} MiB, "
        f"hop latency {links.hop_latency_s * 1e6:g} us, verify {links.verify_bytes_per_s / GB:g} GB/s, "
        f"{fanout} stripes",
        "",
        "| N | floor S/B + (ceil(log2(N+1))-1) c/B | striped plan (sim) | / floor | "
        "root killed at T/2, heal | / floor | root killed at T/2, replan | / floor | "
        "direct N S/B | chain S/B+(N-1)c/B | binary tree ~2S/B |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in sizes:
        nodes = [f"n{i:05d}" for i in range(n)]
        p = plan(nodes, source="trainer", fanout=fanout)
        floor = floor_s(links, n)
        ours = max(simulate(p, links).values())
        # The worst single failure: the root of stripe 0's tree (half the fleet's stripe 0
        # comes through it), killed half-way.
        victim = p.children("trainer", stripe=0)[0]
        failed = (
            {"heal": math.nan, "replan": math.nan}
            if n == 1
            else {
                strategy: max(
                    simulate(
                        p, links, fail=victim, fail_at_s=ours / 2, detect_s=1.0, strategy=strategy
                    ).values()
                )
                for strategy in ("heal", "replan")
            }
        )
        s_over_b = links.total_bytes / links.bytes_per_s
        c_over_b = links.bucket_bytes / links.bytes_per_s
        depth = math.ceil(math.log2(n + 1))
        lines.append(
            f"| {n} | {floor:.3f} s | {ours:.3f} s | {ours / floor:.3f} | "
            f"{failed['heal']:.3f} s | {failed['heal'] / floor:.3f} | "
            f"{failed['replan']:.3f} s | {failed['replan'] / floor:.3f} | "
            f"{n * s_over_b:.1f} s | {s_over_b + (n - 1) * c_over_b:.3f} s | "
            f"{2 * s_over_b + depth * 2 * c_over_b:.3f} s |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fanout", type=int, default=2)
    args = parser.parse_args()
    trillion = Links(total_bytes=1e12, bucket_bytes=64 * 2**20, bytes_per_s=400e9 / 8)
    print(report(trillion, [8, 128, 1024], args.fanout))
    print()
    big_buckets = Links(total_bytes=1e12, bucket_bytes=1 * 2**30, bytes_per_s=400e9 / 8)
    print(report(big_buckets, [128, 1024], args.fanout))
    print()
    # The scale of the CPU relay benchmark (issue 11): 8 namespaces, links shaped with tc.
    cpu = Links(
        total_bytes=0.5e9,
        bucket_bytes=16 * 2**20,
        bytes_per_s=100e6,
        hop_latency_s=200e-6,
        verify_bytes_per_s=3e9,
    )
    print(report(cpu, [1, 2, 4, 8], args.fanout))


if __name__ == "__main__":
    main()
