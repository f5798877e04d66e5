"""`wmix128` in numpy against its definition in plain Python, and the corruption it must catch.

The detection cases are the ones the linear `wsum64` let through (a +1/-2/+1 run over three
words, two sign flips at words of equal parity), plus the guarantees the module states (any
one-word change, any two words at an odd distance) and generated structured damage.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

import streamer.checksum as checksum
from streamer.checksum import (
    ALGORITHM,
    NATIVE,
    bucket_digest,
    format_digest,
    lane_sums,
    lane_sums_numpy,
    parse_digest,
    wmix128,
    wmix128_words,
)

MASK = (1 << 64) - 1
SIGN = 1 << 63


def reference_mix(z: int) -> int:
    """splitmix64's finaliser, written out again here (not imported)."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def reference_wmix128(data: bytes) -> str:
    """The docstring's definition, one word at a time."""
    data += bytes(-len(data) % 8)
    s1 = s2 = 0
    for i in range(len(data) // 8):
        word = int.from_bytes(data[8 * i : 8 * i + 8], "little")
        mixed = reference_mix((word + (i + 1) * 0x9E3779B97F4A7C15) & MASK)
        s1 = (s1 + mixed) & MASK
        s2 = (s2 + (i + 1) * mixed) & MASK
    return f"{s1:016x}{s2:016x}"


def random_bytes(size: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def random_words(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2**64, count, dtype=np.uint64)


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> int:
    """Blocks of 64 words, so buffers of a few hundred words cross many block edges."""
    monkeypatch.setattr(checksum, "BLOCK_WORDS", 64)
    return 64


# --- the definition -----------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(size=st.integers(0, 5 * 64 * 8 + 20), seed=st.integers(0, 2**32 - 1))
def test_wmix128_matches_the_reference_on_random_buffers(size: int, seed: int) -> None:
    data = random_bytes(size, seed)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checksum, "BLOCK_WORDS", 64)
        assert wmix128(data) == reference_wmix128(data)


@pytest.mark.parametrize("size", [1, 7, 8, 9, 511, 512, 513, 1024 - 8, 1024 + 8, 3 * 512 + 3])
def test_wmix128_matches_the_reference_at_word_and_block_edges(
    size: int, small_blocks: int
) -> None:
    data = random_bytes(size, size)
    assert wmix128(data) == reference_wmix128(data)


def test_the_default_block_size_gives_the_same_digests() -> None:
    data = random_bytes(3 * 8 * checksum.BLOCK_WORDS + 13, seed=3)
    assert wmix128(data) == reference_wmix128(data)


def test_wmix128_wraps_modulo_2_64_like_the_reference(small_blocks: int) -> None:
    words = np.array([np.iinfo(np.int64).max, np.iinfo(np.int64).min, -1] * 200, dtype="<i8")
    data = words.tobytes()
    assert wmix128(data) == reference_wmix128(data)


def test_wmix128_reads_every_buffer_type_alike() -> None:
    data = random_bytes(1000, seed=7)
    expected = reference_wmix128(data)
    as_array = np.frombuffer(data, dtype=np.uint8)
    assert wmix128(bytearray(data)) == expected
    assert wmix128(memoryview(data)) == expected
    assert wmix128(as_array.data) == expected
    assert wmix128(as_array.view(np.uint64).data) == expected
    assert bucket_digest(data) == expected


def test_words_of_either_signedness_give_the_digest_of_their_bytes(small_blocks: int) -> None:
    words = random_words(300, seed=1)
    assert wmix128_words(words) == wmix128(words.tobytes())
    assert wmix128_words(words.view(np.int64)) == wmix128(words.tobytes())


@pytest.mark.parametrize(
    "words",
    [np.zeros((2, 2), dtype=np.int64), np.zeros(4, dtype=np.int32), np.zeros(4, dtype=np.float64)],
)
def test_lane_sums_reject_anything_but_one_dimensional_64_bit_integers(words: np.ndarray) -> None:
    with pytest.raises(TypeError, match="64-bit integers"):
        lane_sums(words)


def test_empty_buffer_has_the_zero_digest() -> None:
    assert wmix128(b"") == format_digest(0, 0) == "0" * 32


def test_a_short_tail_is_read_as_a_zero_padded_word() -> None:
    assert wmix128(b"\x01\x02\x03") == wmix128(b"\x01\x02\x03" + bytes(5))
    assert wmix128(b"\x01\x02\x03") != wmix128(b"\x01\x02\x04")


@settings(max_examples=40, deadline=None)
@given(cuts=st.lists(st.integers(0, 400), max_size=5), seed=st.integers(0, 2**32 - 1))
def test_lane_sums_of_consecutive_pieces_add_up_to_the_whole(cuts: list[int], seed: int) -> None:
    words = random_words(400, seed)
    bounds = [0, *sorted(cuts), 400]
    s1 = s2 = 0
    for low, high in itertools.pairwise(bounds):
        p1, p2 = lane_sums(words[low:high], start=low)
        s1, s2 = s1 + p1, s2 + p2
    assert format_digest(s1, s2) == wmix128_words(words)


def test_digests_parse_back_into_their_lane_sums() -> None:
    digest = wmix128(random_bytes(100, seed=2))
    assert format_digest(*parse_digest(digest)) == digest
    with pytest.raises(ValueError, match="32 hex digits"):
        parse_digest("abc")
    with pytest.raises(ValueError, match="hex digits"):
        parse_digest("z" * 32)


def test_the_algorithm_name_is_what_manifests_carry() -> None:
    assert ALGORITHM == "wmix128"
    assert frozenset({"wmix128"}) == checksum.SUPPORTED_ALGORITHMS


# --- what it catches ----------------------------------------------------------------------------


def corrupted(words: np.ndarray, changes: dict[int, int]) -> np.ndarray:
    """A copy of `words` with word i replaced by (word + delta) mod 2**64 for each change."""
    out = words.copy()
    for index, delta in changes.items():
        out[index] = (int(out[index]) + delta) & MASK
    return out


@pytest.mark.parametrize("start", [0, 1, 2, 63, 64, 200, 509])
def test_plus_one_minus_two_plus_one_over_three_words_is_caught(start: int) -> None:
    # sum(d_i) = 0 and sum((i + 1) * d_i) = 0: invisible to any position-weighted linear sum.
    words = random_words(512, seed=start)
    damaged = corrupted(words, {start: 1, start + 1: -2, start + 2: 1})
    assert wmix128_words(damaged) != wmix128_words(words)


@pytest.mark.parametrize(("a", "b"), [(0, 2), (1, 3), (10, 30), (5, 501), (0, 510), (7, 8)])
def test_two_sign_flips_are_caught(a: int, b: int) -> None:
    # Flipping bit 63 of two words at an even distance wraps both linear sums back to zero.
    words = random_words(512, seed=a + b)
    damaged = words.copy()
    damaged[[a, b]] ^= np.uint64(SIGN)
    assert wmix128_words(damaged) != wmix128_words(words)


def test_two_bf16_sign_flips_in_words_of_equal_parity_are_caught() -> None:
    # bf16 weights: the top half-word's sign is bit 63 of its word.
    values = np.random.default_rng(4).standard_normal(2048).astype(np.float32)
    words = values.view(np.uint16)[1::2].copy().view(np.uint64)  # bf16 = the float32's top half
    for a, b in [(0, 2), (3, 9), (100, 300)]:
        damaged = words.copy()
        damaged[[a, b]] ^= np.uint64(SIGN)
        assert wmix128_words(damaged) != wmix128_words(words), (a, b)


@settings(max_examples=200, deadline=None)
@given(index=st.integers(0, 255), new=st.integers(0, MASK), seed=st.integers(0, 2**32 - 1))
def test_any_change_confined_to_one_word_is_caught(index: int, new: int, seed: int) -> None:
    words = random_words(256, seed)
    assume(int(words[index]) != new)
    damaged = words.copy()
    damaged[index] = np.uint64(new)
    assert wmix128_words(damaged) != wmix128_words(words)


@pytest.mark.parametrize("bit", range(64))
def test_every_single_bit_flip_is_caught(bit: int) -> None:
    words = random_words(64, seed=bit)
    damaged = words.copy()
    damaged[bit % 64] ^= np.uint64(1 << bit)
    assert wmix128_words(damaged) != wmix128_words(words)


@settings(max_examples=150, deadline=None)
@given(i=st.integers(0, 511), j=st.integers(0, 511), seed=st.integers(0, 2**32 - 1))
def test_two_swapped_words_are_caught(i: int, j: int, seed: int) -> None:
    words = random_words(512, seed)
    assume(words[i] != words[j])
    swapped = words.copy()
    swapped[[i, j]] = swapped[[j, i]]
    assert wmix128_words(swapped) != wmix128_words(words)


def test_swapped_words_of_equal_value_are_the_same_bytes() -> None:
    words = np.full(16, 5, dtype=np.uint64)
    swapped = words.copy()
    swapped[[2, 9]] = swapped[[9, 2]]
    assert wmix128_words(swapped) == wmix128_words(words)


def test_a_truncated_or_shifted_buffer_changes_the_digest() -> None:
    data = random_bytes(4096, seed=9)
    digest = wmix128(data)
    assert wmix128(data[:-8]) != digest
    assert wmix128(bytes(8) + data[:-8]) != digest


@st.composite
def structured_damage(draw: st.DrawFn, size: int) -> dict[int, int] | tuple[str, int, int]:
    """Small deltas on a few (often neighbouring) words, sign flips, a swap, or a zeroed range."""
    kind = draw(st.sampled_from(["deltas", "sign_flips", "swap", "zeroed"]))
    if kind == "deltas":
        start = draw(st.integers(0, size - 8))
        spread = draw(st.sampled_from([1, 2, 4, 64, size // 8]))
        count = draw(st.integers(1, 6))
        offsets = draw(st.lists(st.integers(0, 7), min_size=count, max_size=count, unique=True))
        deltas = draw(
            st.lists(
                st.integers(-4, 4).filter(bool) | st.sampled_from([SIGN, 1 << 32, 1 << 16]),
                min_size=count,
                max_size=count,
            )
        )
        return {min(start + o * spread, size - 1): d for o, d in zip(offsets, deltas, strict=True)}
    if kind == "sign_flips":
        count = draw(st.integers(1, 8))
        bit = draw(st.sampled_from([63, 31, 15]))
        indices = draw(
            st.lists(st.integers(0, size - 1), min_size=count, max_size=count, unique=True)
        )
        return ("flip", bit, sum(1 << i for i in indices))
    if kind == "swap":
        i = draw(st.integers(0, size - 1))
        j = draw(st.integers(0, size - 1).filter(lambda j: j != i))
        return ("swap", i, j)
    start = draw(st.integers(0, size - 1))
    return ("zero", start, draw(st.integers(start + 1, size)))


def apply_damage(words: np.ndarray, damage: dict[int, int] | tuple[str, int, int]) -> np.ndarray:
    if isinstance(damage, dict):
        return corrupted(words, damage)
    kind, a, b = damage
    out = words.copy()
    if kind == "flip":
        for index in range(out.size):
            if b >> index & 1:
                out[index] ^= np.uint64(1 << a)
    elif kind == "swap":
        out[[a, b]] = out[[b, a]]
    else:
        out[a:b] = 0
    return out


@settings(max_examples=400, deadline=None)
@given(damage=structured_damage(512), seed=st.integers(0, 2**32 - 1))
def test_structured_damage_is_caught(
    damage: dict[int, int] | tuple[str, int, int], seed: int
) -> None:
    words = random_words(512, seed)
    damaged = apply_damage(words, damage)
    assume(not np.array_equal(damaged, words))
    assert wmix128_words(damaged) != wmix128_words(words)


def test_the_manifest_validator_knows_every_algorithm_we_compute():
    from schemas.validate import CHECKSUM_DIGEST_CHARS
    from streamer.checksum import SUPPORTED_ALGORITHMS

    assert set(SUPPORTED_ALGORITHMS) == set(CHECKSUM_DIGEST_CHARS)


@pytest.mark.skipif(not NATIVE, reason="streamer._wmix (the C lane sums) is not built here")
@settings(max_examples=300, deadline=None)
@given(
    words=st.lists(st.integers(0, 2**64 - 1), max_size=70),
    start=st.one_of(st.integers(0, 10**6), st.integers(0, 2**63)),
)
def test_the_c_lane_sums_equal_numpys_bit_for_bit(words, start):
    array = np.array(words, dtype=np.uint64)
    assert lane_sums(array, start) == lane_sums_numpy(array, start)


@pytest.mark.skipif(not NATIVE, reason="streamer._wmix (the C lane sums) is not built here")
def test_the_c_lane_sums_take_strided_and_signed_arrays_and_whole_words_only():
    words = np.random.default_rng(5).integers(0, 2**63, 1_000_003, dtype=np.int64)
    assert lane_sums(words[::3], 7) == lane_sums_numpy(words[::3], 7)  # copied contiguous
    from streamer import _wmix

    with pytest.raises(ValueError, match="whole 64-bit words"):
        _wmix.lane_sums(b"\x00" * 12, 0)
