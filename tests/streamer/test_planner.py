"""The relay plan: every node gets every stripe from one live parent, no uplink carries much
more than one copy of the model, depth stays logarithmic, and healing only moves orphans."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings, strategies as st

from streamer.planner import heal, plan


def _nodes(count: int) -> list[str]:
    return [f"n{i:04d}" for i in range(count)]


@settings(max_examples=200, deadline=None)
@given(count=st.integers(1, 300), fanout=st.integers(1, 4))
def test_every_node_reads_every_stripe_from_the_source_or_an_earlier_node(count, fanout):
    p = plan(_nodes(count), source="trainer", fanout=fanout)
    for node in p.nodes:
        assert len(p.parents[node]) == p.fanout
        for stripe in range(p.fanout):
            # Reaches the source without a cycle (depth raises on one).
            assert p.depth(node, stripe=stripe) <= count
    # Each stripe's tree has exactly one root, fed by the source.
    for stripe in range(p.fanout):
        assert len(p.children("trainer", stripe=stripe)) == 1


@settings(max_examples=200, deadline=None)
@given(count=st.integers(2, 600), fanout=st.integers(2, 4))
def test_uplinks_carry_about_one_copy_and_depth_is_logarithmic(count, fanout):
    p = plan(_nodes(count), source="trainer", fanout=fanout)
    interior = math.ceil((count - 1) / fanout)
    copies = [p.uplink_copies(node) for node in p.nodes]
    if fanout * interior <= count:  # the interiors of the trees are disjoint
        assert max(copies) <= 1.0
    else:  # small fleets where some node must forward in two trees
        assert max(copies) <= 2.0
    assert p.uplink_copies("trainer") == 1.0
    # Every copy the nodes need comes from someone's uplink: N copies in all.
    assert sum(copies) + p.uplink_copies("trainer") == pytest.approx(count)
    assert p.max_depth() <= math.ceil(math.log(count * (fanout - 1) + 1, fanout)) + 1


def test_a_thousand_nodes_in_two_stripes():
    p = plan(_nodes(1024), source="trainer", fanout=2)
    assert p.max_depth() == 11  # ceil(log2(1025))
    assert max(p.uplink_copies(n) for n in p.nodes) == 1.0
    assert sum(p.uplink_copies(n) == 1.0 for n in p.nodes) == 1022  # 511 forward per tree
    assert p.source_for("n0000", bucket=0) == "trainer"
    assert p.source_for("n0000", bucket=1) != "trainer"


@settings(max_examples=150, deadline=None)
@given(
    count=st.integers(2, 200),
    fanout=st.integers(1, 3),
    data=st.data(),
)
def test_heal_reparents_only_the_orphans_to_a_live_ancestor(count, fanout, data):
    before = plan(_nodes(count), source="trainer", fanout=fanout)
    gone = set(data.draw(st.sets(st.sampled_from(before.nodes), max_size=count - 1)))
    after = heal(before, gone=gone)
    assert set(after.nodes) == set(before.nodes) - gone
    for node in after.nodes:
        for stripe in range(after.fanout):
            old = before.parent_of(node, stripe=stripe)
            new = after.parent_of(node, stripe=stripe)
            assert new not in gone
            if old not in gone:
                assert new == old  # untouched
            else:
                # The nearest live ancestor in the old tree.
                ancestor = old
                while ancestor in gone:
                    ancestor = before.parent_of(ancestor, stripe=stripe)
                assert new == ancestor
            assert after.depth(node, stripe=stripe) <= before.depth(node, stripe=stripe)


def test_bad_plans_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="unique"):
        plan(["a", "a"], source="t")
    with pytest.raises(ValueError, match="cannot also be a node"):
        plan(["a", "t"], source="t")
    with pytest.raises(ValueError, match="fanout"):
        plan(["a"], source="t", fanout=0)
    with pytest.raises(ValueError, match="not in the plan"):
        heal(plan(["a"], source="t"), gone=["b"])
