"""`wsum64` in numpy against its definition written out in plain Python."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from streamer.checksum import BLOCK_WORDS, format_digest, wsum64, wsum64_words

MASK = (1 << 64) - 1


def reference_wsum64(data: bytes) -> str:
    """The docstring's definition, one word at a time."""
    data += bytes(-len(data) % 8)
    s1 = s2 = 0
    for i in range(len(data) // 8):
        word = int.from_bytes(data[8 * i : 8 * i + 8], "little", signed=True)
        s1 = (s1 + word) & MASK
        s2 = (s2 + (i + 1) * word) & MASK
    return f"{s1:016x}{s2:016x}"


def random_bytes(size: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


# Sizes straddle the block boundary (BLOCK_WORDS words) so both the grid and the tail are used.
BLOCK_BYTES = 8 * BLOCK_WORDS


@settings(max_examples=40, deadline=None)
@given(size=st.integers(0, 3 * BLOCK_BYTES + 100), seed=st.integers(0, 2**32 - 1))
def test_wsum64_matches_the_reference_on_random_buffers(size: int, seed: int) -> None:
    data = random_bytes(size, seed)
    assert wsum64(data) == reference_wsum64(data)


@pytest.mark.parametrize(
    "size", [0, 1, 7, 8, 9, BLOCK_BYTES - 8, BLOCK_BYTES, BLOCK_BYTES + 1, 2 * BLOCK_BYTES + 24]
)
def test_wsum64_matches_the_reference_at_word_and_block_edges(size: int) -> None:
    data = random_bytes(size, size)
    assert wsum64(data) == reference_wsum64(data)


def test_wsum64_wraps_modulo_2_64_like_the_reference() -> None:
    # Words near the int64 limits overflow both sums many times over.
    words = np.array([2**63 - 1, -(2**63), -1, 2**62] * (BLOCK_WORDS + 3), dtype="<i8")
    data = words.tobytes()
    assert wsum64(data) == reference_wsum64(data)


def test_wsum64_reads_every_buffer_type_alike() -> None:
    data = random_bytes(1000, 1)
    expected = reference_wsum64(data)
    as_array = np.frombuffer(data, dtype=np.uint8)
    assert wsum64(bytearray(data)) == expected
    assert wsum64(memoryview(data)) == expected
    assert wsum64(as_array.data) == expected
    assert wsum64(as_array.view(np.uint64).data) == expected


def test_wsum64_words_equals_wsum64_of_the_same_bytes() -> None:
    words = np.frombuffer(random_bytes(8 * (BLOCK_WORDS + 5), 2), dtype=np.int64)
    assert wsum64_words(words) == wsum64(words.tobytes())


@pytest.mark.parametrize("words", [np.zeros(4, dtype=np.uint64), np.zeros((2, 2), dtype=np.int64)])
def test_wsum64_words_rejects_anything_but_one_dimensional_int64(words: np.ndarray) -> None:
    with pytest.raises(TypeError, match="one-dimensional int64"):
        wsum64_words(words)


def test_empty_buffer_has_the_zero_digest() -> None:
    assert wsum64(b"") == format_digest(0, 0) == "0" * 32


@pytest.mark.parametrize("size", [64, BLOCK_BYTES + 64])
def test_a_single_flipped_bit_changes_the_digest(size: int) -> None:
    data = random_bytes(size, 3)
    digest = wsum64(data)
    for bit in range(0, 8 * size, 8 * size // 97 or 1):
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        assert wsum64(flipped) != digest, f"flipping bit {bit} went unnoticed"


@pytest.mark.parametrize(("i", "j"), [(0, 1), (3, 17), (5, BLOCK_WORDS + 2), (0, BLOCK_WORDS + 9)])
def test_two_swapped_words_change_the_digest(i: int, j: int) -> None:
    words = np.frombuffer(random_bytes(8 * (BLOCK_WORDS + 10), 4), dtype="<i8").copy()
    digest = wsum64(words.tobytes())
    words[[i, j]] = words[[j, i]]
    assert wsum64(words.tobytes()) != digest


def test_a_truncated_or_shifted_buffer_changes_the_digest() -> None:
    data = random_bytes(4096, 5)
    digest = wsum64(data)
    assert wsum64(data[:-8]) != digest
    assert wsum64(bytes(8) + data[:-8]) != digest
