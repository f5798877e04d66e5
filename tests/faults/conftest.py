"""The standing fault suite: real processes, real sockets, injected faults and hostile input.

Each test records into the ledger (`tests.faults.ledger`); the session prints its summary.
"""

from __future__ import annotations

import pytest

from tests.faults.ledger import LEDGER, Faults


@pytest.fixture
def faults(request: pytest.FixtureRequest) -> Faults:
    LEDGER.tests += 1
    return Faults(test=request.node.name)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    report = yield
    if (report.failed and call.excinfo is not None and "Timeout" in call.excinfo.typename) or (
        report.failed and "Timeout >" in str(report.longrepr)
    ):
        LEDGER.hangs.append(item.name)
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if LEDGER.tests:
        terminalreporter.write_line(LEDGER.summary())
        for note in LEDGER.hangs + LEDGER.wrong_bytes + LEDGER.growth:
            terminalreporter.write_line(f"  {note}")
