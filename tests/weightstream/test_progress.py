"""One updating line on a terminal, nothing elsewhere; sizes with their unit; JSON log lines."""

from __future__ import annotations

import io
import json
import logging

from weightstream.logs import JsonFormatter
from weightstream.progress import Progress, format_bytes, format_rate


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_rewrites_one_line_on_a_terminal_and_ends_it():
    out = _Terminal()
    line = Progress("pulling v3:", stream=out)
    line.update("10% of 64.0 MB")
    line.update("100%")
    line.close()
    # The shorter second update pads over the first; the line ends once, at close.
    assert out.getvalue() == "\rpulling v3: 10% of 64.0 MB\rpulling v3: 100%          \n"


def test_progress_is_silent_when_not_a_terminal():
    out = io.StringIO()
    line = Progress("pulling v3:", stream=out)
    line.update("10%")
    line.close()
    assert out.getvalue() == ""


def test_sizes_and_rates_say_their_decimal_unit():
    assert format_bytes(600_000_000) == "600.0 MB"
    assert format_bytes(16_750_000_000) == "16.75 GB"
    assert format_rate(2_100_000_000) == "2.10 GB/s"


def test_json_log_lines_carry_the_key_value_fields():
    record = logging.LogRecord(
        "subscribers.subscriber",
        logging.INFO,
        __file__,
        1,
        "applied model=%s version=%d pull_s=%.3f rate_gb_per_s=%.2f",
        ("demo", 3, 0.41, 2.5),
        None,
    )
    line = json.loads(JsonFormatter().format(record))
    assert line["level"] == "INFO"
    assert line["logger"] == "subscribers.subscriber"
    assert line["message"] == "applied model=demo version=3 pull_s=0.410 rate_gb_per_s=2.50"
    assert (line["model"], line["version"], line["pull_s"], line["rate_gb_per_s"]) == (
        "demo",
        3,
        0.41,
        2.5,
    )
