"""The fault suite's ledger: what each fault test injected, applied and measured.

Every test in `tests/faults/` takes the `faults` fixture and records, as it goes:

    faults.inject("broker restart while a subscriber waits at the swap")
    faults.applied(version=2, ok=dump_matches)      # a version an engine runs, bytes checked
    faults.bounded("broker RSS after 200 join/leave cycles", value=rss, bound=limit)

`applied(ok=False)` and `bounded(value > bound)` also fail the test at once. A test that
pytest-timeout stops counts as a hang. The session ends with one summary line::

    fault suite: 31 faults injected, 0 hangs, 57 versions applied, 0 with wrong bytes, 0 unbounded growth

(`hangs`, `wrong bytes` and `unbounded growth` must always be 0.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["LEDGER", "FaultLedger"]


@dataclass
class FaultLedger:
    injected: list[str] = field(default_factory=list)
    versions_applied: int = 0
    wrong_bytes: list[str] = field(default_factory=list)
    growth: list[str] = field(default_factory=list)
    hangs: list[str] = field(default_factory=list)
    tests: int = 0

    def summary(self) -> str:
        return (
            f"fault suite: {len(self.injected)} faults injected, {len(self.hangs)} hangs, "
            f"{self.versions_applied} versions applied, {len(self.wrong_bytes)} with wrong bytes, "
            f"{len(self.growth)} unbounded growth"
        )


LEDGER = FaultLedger()


@dataclass
class Faults:
    """The per-test handle on the ledger (the `faults` fixture)."""

    test: str
    ledger: FaultLedger = field(default_factory=lambda: LEDGER)

    def inject(self, what: str) -> None:
        """Record one fault or hostile input, as it is injected."""
        self.ledger.injected.append(f"{self.test}: {what}")

    def applied(self, *, version: int, ok: bool, what: str = "") -> None:
        """Record a version an engine applied; `ok` says its bytes equal that version's."""
        self.ledger.versions_applied += 1
        if not ok:
            note = f"{self.test}: version {version} applied with wrong bytes {what}".rstrip()
            self.ledger.wrong_bytes.append(note)
            raise AssertionError(note)

    def bounded(self, what: str, *, value: float, bound: float) -> None:
        """Record a measured size or count against its bound; fails above it."""
        if value > bound:
            note = f"{self.test}: {what} = {value} exceeds its bound {bound}"
            self.ledger.growth.append(note)
            raise AssertionError(note)
