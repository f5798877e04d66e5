"""Bucket checksums: `wmix128`, every 64-bit word mixed with its position, summed in two lanes.

A bucket's bytes are read as little-endian unsigned 64-bit words ``w_0 .. w_{m-1}`` (the last
word zero-padded). Each word is offset by its position and put through the splitmix64
finaliser, a bijective multiply-xorshift mixer of two rounds, and the mixed words are summed
in two lanes modulo 2**64::

    x_i = w_i + (i + 1) * GAMMA
    m_i = mix(x_i)      mix(z) = z ^= z >> 30; z *= C1; z ^= z >> 27; z *= C2; z ^= z >> 31
    s1  = sum(m_i)      s2 = sum((i + 1) * m_i)          digest = hex(s1) + hex(s2), 32 digits

(``m_i`` is splitmix64's (i+1)-th output from the state ``w_i``.) Sums commute, so any order
of summation and any split of the words gives the same digest: the GPU twin
(`gpu.digest`, a fused Triton kernel or torch ops) reduces in whatever order suits it, and a
buffer known only as pieces is the sum of its pieces' lane sums. The tests hold numpy, torch
on the CPU, torch on CUDA and Triton to the same digests, bit for bit.

What is always caught (between two buffers of the same length; the manifest fixes a bucket's
length):

* any corruption confined to one 64-bit word (any bits of it, a sign flip, a torn word):
  the mixer and the position offset are bijections, so ``m_i`` changes and ``s1`` with it;
* any change of exactly two words an odd number of words apart (two words swapped neighbours,
  two sign flips in neighbouring words): if ``d_b = -d_a`` leaves ``s1`` unchanged, ``s2``
  changes by ``(b - a) * d_a``, which is not 0 mod 2**64 for odd ``b - a``.

Everything else (a +1/-2/+1 pattern over three words, swaps at even distances, zeroed or
shifted ranges, random damage) is caught unless the mixed deltas happen to cancel: for a mixer
that behaves like a random function, each lane lets a given corruption through with
probability about 2**-64 (and a two-word change at distance 2**t * odd needs both lanes,
about 2**-(128 - t)). The linear `wsum64` this replaces let +1/-2/+1 and two sign flips at
words of equal parity through every time.

Not cryptographic: the function has no key, so anyone may compute a digest for bytes of their
choosing, or corrupt bytes so that the digest still matches. It guards against corruption;
a version's authenticity is what the trainer's signature is for.

The reference works in blocks of `BLOCK_WORDS` words (in-place numpy operations on a few
arrays that stay in the core's cache) and reduces ``s2`` with the row/column split, so no
weight array as large as the payload exists::

    i + 1 = base_r + (j + 1)   =>   s2 = sum_r base_r * rowsum_r + sum_j (j + 1) * colsum_j

>>> bucket_digest(b"")
'00000000000000000000000000000000'
>>> bucket_digest(bytes(8)) == bucket_digest(bytes(5))  # the tail word is zero-padded
True
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Callable


def _c_lane_sums() -> Callable[[Any, int], tuple[int, int]] | None:
    """The same sums in C, one pass (an optional extension: None where it did not build)."""
    try:
        from streamer._wmix import lane_sums
    except ImportError:
        return None
    return lane_sums


_C_LANE_SUMS = _c_lane_sums()

ALGORITHM = "wmix128"
"""The name manifests carry in `checksum_algorithm`; a manifest naming another is refused."""

SUPPORTED_ALGORITHMS = frozenset({ALGORITHM})

GAMMA = 0x9E3779B97F4A7C15
C1 = 0xBF58476D1CE4E5B9
C2 = 0x94D049BB133111EB
SHIFTS = (30, 27, 31)
BLOCK_WORDS = 1 << 16
"""Words per block of the numpy reference: 512 KiB per working array (four of them), a size
that stays in a core's L2/L3 and makes numpy's per-call cost small (fastest here, 2026-12-01)."""

_MASK = (1 << 64) - 1
NATIVE = _C_LANE_SUMS is not None
"""True where the C lane sums (`streamer/_wmix.c`) are built; they and numpy agree bit for bit."""
_WORD_BYTES = 8

__all__ = [
    "ALGORITHM",
    "BLOCK_WORDS",
    "C1",
    "C2",
    "GAMMA",
    "NATIVE",
    "SHIFTS",
    "SUPPORTED_ALGORITHMS",
    "bucket_digest",
    "format_digest",
    "lane_sums",
    "lane_sums_numpy",
    "mix64",
    "parse_digest",
    "wmix128",
    "wmix128_words",
]


def mix64(x: int) -> int:
    """The mixer on one Python int (the definition the arrays must agree with).

    >>> f"{mix64(1):016x}"
    '5692161d100b05e5'
    """
    x &= _MASK
    x = ((x ^ (x >> SHIFTS[0])) * C1) & _MASK
    x = ((x ^ (x >> SHIFTS[1])) * C2) & _MASK
    return x ^ (x >> SHIFTS[2])


def format_digest(s1: int, s2: int) -> str:
    """Render the two lane sums as 32 hex digits (both taken modulo 2**64)."""
    return f"{s1 & _MASK:016x}{s2 & _MASK:016x}"


def parse_digest(digest: str) -> tuple[int, int]:
    """The two lane sums of a 32-hex-digit digest, as unsigned ints.

    >>> parse_digest("ffffffffffffffff0000000000000002")
    (18446744073709551615, 2)
    """
    if len(digest) != 32:
        raise ValueError(f"a {ALGORITHM} digest has 32 hex digits, not {len(digest)}: {digest!r}")
    try:
        return int(digest[:16], 16), int(digest[16:], 16)
    except ValueError:
        raise ValueError(f"a {ALGORITHM} digest is hex digits: {digest!r}") from None


def bucket_digest(data: bytes | bytearray | memoryview) -> str:
    """The digest (under `ALGORITHM`) of any buffer of bytes: 32 hex digits. The stable name."""
    return wmix128(data)


def wmix128(data: bytes | bytearray | memoryview) -> str:
    """`wmix128` of any buffer of bytes; returns 32 hex digits."""
    raw = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
    num_words, tail = divmod(raw.size, _WORD_BYTES)
    s1, s2 = lane_sums(raw[: num_words * _WORD_BYTES].view("<u8"))
    if tail:
        padded = np.zeros(_WORD_BYTES, dtype=np.uint8)
        padded[:tail] = raw[num_words * _WORD_BYTES :]
        t1, t2 = lane_sums(padded.view("<u8"), start=num_words)
        s1, s2 = s1 + t1, s2 + t2
    return format_digest(s1, s2)


def wmix128_words(words: np.ndarray) -> str:
    """`wmix128` of a 1-D array of 64-bit words (int64 or uint64: the same bits)."""
    return format_digest(*lane_sums(words))


def lane_sums(words: np.ndarray, start: int = 0) -> tuple[int, int]:
    """The two lane sums of `words` taken as words ``start .. start + len - 1`` of a buffer.

    Lane sums of consecutive pieces add up to the lane sums of the whole (mod 2**64), which is
    how a buffer is verified piecewise.

    >>> words = np.arange(10, dtype=np.uint64)
    >>> whole = lane_sums(words)
    >>> head, rest = lane_sums(words[:3]), lane_sums(words[3:], start=3)
    >>> tuple((a + b) % 2**64 for a, b in zip(head, rest)) == whole
    True
    """
    if words.ndim != 1 or words.dtype.itemsize != _WORD_BYTES or words.dtype.kind not in "iu":
        raise TypeError(
            f"lane_sums takes a one-dimensional array of 64-bit integers, not {words.dtype} "
            f"of shape {words.shape}"
        )
    if start < 0:
        raise ValueError(f"start must be a word index >= 0, not {start}")
    if _C_LANE_SUMS is not None and start < 2**64:
        return _C_LANE_SUMS(np.ascontiguousarray(words.view(np.uint64)), start)
    return lane_sums_numpy(words, start)


def lane_sums_numpy(words: np.ndarray, start: int = 0) -> tuple[int, int]:
    """`lane_sums` in numpy (the reference, and the fallback where `streamer._wmix` did not
    build): in-place operations on cache-sized blocks."""
    words = words.view(np.uint64)
    size = words.size
    if not size:
        return 0, 0
    block = min(BLOCK_WORDS, size)
    mixed = np.empty(block, dtype=np.uint64)
    scratch = np.empty(block, dtype=np.uint64)
    # (i + 1) * GAMMA for the first block, advanced by block * GAMMA for each next one.
    offsets = np.arange(start + 1, start + 1 + block, dtype=np.uint64)
    np.multiply(offsets, np.uint64(GAMMA), out=offsets)
    step = np.uint64(block * GAMMA & _MASK)
    cols = np.zeros(block, dtype=np.uint64)
    c1, c2 = np.uint64(C1), np.uint64(C2)
    r1, r2, r3 = (np.uint64(s) for s in SHIFTS)
    s1 = 0
    rows = 0
    for low in range(0, size, block):
        count = min(block, size - low)
        x, t = mixed[:count], scratch[:count]
        np.add(words[low : low + count], offsets[:count], out=x)
        np.right_shift(x, r1, out=t)
        np.bitwise_xor(x, t, out=x)
        np.multiply(x, c1, out=x)
        np.right_shift(x, r2, out=t)
        np.bitwise_xor(x, t, out=x)
        np.multiply(x, c2, out=x)
        np.right_shift(x, r3, out=t)
        np.bitwise_xor(x, t, out=x)
        row = int(np.add.reduce(x, dtype=np.uint64))
        s1 += row
        rows += (start + low) * row
        np.add(cols[:count], x, out=cols[:count])
        np.add(offsets, step, out=offsets)
    weights = np.arange(1, block + 1, dtype=np.uint64)
    np.multiply(cols, weights, out=cols)
    s2 = rows + int(np.add.reduce(cols, dtype=np.uint64))
    return s1 & _MASK, s2 & _MASK
