"""Progress of long work as one updating line on a terminal, and sizes with their unit.

On a TTY the line is rewritten in place (carriage return) and ended once the work is done;
when stderr is not a TTY (a log file, CI, a pipe) nothing is written: the INFO lifecycle lines
say the same once.
"""

from __future__ import annotations

import sys
from typing import TextIO

__all__ = ["Progress", "format_bytes", "format_rate"]


def format_bytes(nbytes: float) -> str:
    """Decimal units, as the CLI's sizes are read: MB = 10**6 bytes, GB = 10**9.

    >>> format_bytes(600e6), format_bytes(16.75e9), format_bytes(512)
    ('600.0 MB', '16.75 GB', '512 B')
    """
    if nbytes >= 1e9:
        return f"{nbytes / 1e9:.2f} GB"
    if nbytes >= 1e6:
        return f"{nbytes / 1e6:.1f} MB"
    if nbytes >= 1e3:
        return f"{nbytes / 1e3:.1f} kB"
    return f"{int(nbytes)} B"


def format_rate(bytes_per_s: float) -> str:
    """>>> format_rate(2.1e9)
    '2.10 GB/s'
    """
    return f"{bytes_per_s / 1e9:.2f} GB/s"


class Progress:
    """`label detail`, rewritten in place on a TTY; silent elsewhere."""

    def __init__(self, label: str, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty()
        self.label = label
        self._width = 0

    def update(self, detail: str) -> None:
        if not self.enabled:
            return
        line = f"{self.label} {detail}"
        self.stream.write("\r" + line.ljust(self._width))
        self.stream.flush()
        self._width = max(self._width, len(line))

    def close(self) -> None:
        """End the line (it stays on screen); later updates start a new one."""
        if self.enabled and self._width:
            self.stream.write("\n")
            self.stream.flush()
        self._width = 0
