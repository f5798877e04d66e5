"""The ledger itself: wrong bytes and growth past a bound fail the test that records them."""

from __future__ import annotations

import pytest

from tests.faults.ledger import FaultLedger, Faults


def test_wrong_bytes_and_growth_fail_and_are_counted():
    ledger = FaultLedger()
    faults = Faults(test="t", ledger=ledger)
    faults.inject("nothing really")
    faults.applied(version=1, ok=True)
    with pytest.raises(AssertionError, match="wrong bytes"):
        faults.applied(version=2, ok=False)
    faults.bounded("rss", value=1, bound=2)
    with pytest.raises(AssertionError, match="exceeds its bound"):
        faults.bounded("rss", value=3, bound=2)
    assert ledger.summary() == (
        "fault suite: 1 faults injected, 0 hangs, 2 versions applied, 1 with wrong bytes, "
        "1 unbounded growth"
    )
