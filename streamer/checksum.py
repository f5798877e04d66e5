"""Bucket checksums: `wsum64`, a position-weighted sum of 64-bit words.

A bucket's bytes are read as little-endian signed 64-bit words ``w_0 .. w_{m-1}``
(the last word zero-padded) and summarised by two sums modulo 2**64::

    s1 = sum(w_i)               s2 = sum((i + 1) * w_i)

Both are plain integer reductions, so they run at memory speed in numpy on a CPU and in
torch on a GPU, and any order of summation gives the same answer (addition modulo 2**64 is
associative). A flipped bit changes ``s1``; two words swapped, or a range moved, changes
``s2``. It guards against corruption and truncation, not against an adversary: that is what
authentication is for.

The words are laid out as rows of ``BLOCK_WORDS`` so both sums need only one row reduction
and one column reduction::

    i = r * B + j   =>   s2 = sum_r (r * B) * R_r + sum_j (j + 1) * C_j + s1 ... (see below)

This module is the reference (numpy, no torch); `subscribers` holds the torch twin that runs
on a GPU, and the tests hold the two to the same digests.

>>> wsum64(b"\\x01" + bytes(7))
'00000000000000010000000000000001'
"""

from __future__ import annotations

import numpy as np

ALGORITHM = "wsum64"
BLOCK_WORDS = 4096
_MASK = (1 << 64) - 1

__all__ = ["ALGORITHM", "BLOCK_WORDS", "format_digest", "wsum64", "wsum64_words"]


def format_digest(s1: int, s2: int) -> str:
    """Render the two sums as 32 hex digits (both taken modulo 2**64)."""
    return f"{s1 & _MASK:016x}{s2 & _MASK:016x}"


def wsum64(data: bytes | bytearray | memoryview) -> str:
    """Checksum any buffer of bytes; returns 32 hex digits."""
    raw = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
    tail = raw.size % 8
    if tail:
        raw = np.concatenate([raw, np.zeros(8 - tail, dtype=np.uint8)])
    return wsum64_words(raw.view("<i8"))


def wsum64_words(words: np.ndarray) -> str:
    """Checksum an int64 array of words (the buffer already padded to whole words)."""
    if words.dtype != np.int64 or words.ndim != 1:
        raise TypeError("wsum64_words takes a one-dimensional int64 array")
    with np.errstate(over="ignore"):
        full = (words.size // BLOCK_WORDS) * BLOCK_WORDS
        s1 = 0
        s2 = 0
        if full:
            grid = words[:full].reshape(-1, BLOCK_WORDS)
            rows = np.add.reduce(grid, axis=1, dtype=np.int64)
            cols = np.add.reduce(grid, axis=0, dtype=np.int64)
            # i + 1 = r * B + (j + 1): split the weight into a row part and a column part.
            row_weights = np.arange(rows.size, dtype=np.int64) * BLOCK_WORDS
            col_weights = np.arange(1, BLOCK_WORDS + 1, dtype=np.int64)
            s1 = int(rows.sum(dtype=np.int64))
            s2 = int((rows * row_weights).sum(dtype=np.int64))
            s2 += int((cols * col_weights).sum(dtype=np.int64))
        rest = words[full:]
        if rest.size:
            weights = np.arange(full + 1, full + rest.size + 1, dtype=np.int64)
            s1 += int(rest.sum(dtype=np.int64))
            s2 += int((rest * weights).sum(dtype=np.int64))
    return format_digest(s1, s2)
