"""The torch twin of wsum64 gives the numpy reference's digests, bit for bit (CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from streamer.checksum import BLOCK_WORDS, wsum64
from subscribers.checksum import (
    DigestBatch,
    digest_of,
    digest_words,
    digests_to_tensor,
    wsum64_pieces,
    wsum64_tensor,
)

BLOCK_BYTES = BLOCK_WORDS * 8


def _random_bytes(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def _twin(data: np.ndarray) -> str:
    return digest_of(wsum64_tensor(torch.from_numpy(data.copy())))


@pytest.mark.parametrize(
    "length",
    [0, 1, 7, 8, 9, 255, 256, 4095]
    + [k * BLOCK_BYTES + d for k in (1, 2, 5) for d in (-9, -8, -1, 0, 1, 7, 8, 9)],
)
def test_twin_matches_reference_around_block_boundaries(length: int) -> None:
    data = _random_bytes(length, seed=length)
    assert _twin(data) == wsum64(data.tobytes())


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=3 * BLOCK_BYTES + 100))
def test_twin_matches_reference_on_any_bytes(data: bytes) -> None:
    assert _twin(np.frombuffer(data, dtype=np.uint8)) == wsum64(data)


def test_sums_wrap_modulo_2_64_like_numpy() -> None:
    # Every word at the int64 extremes: both sums overflow many times over.
    words = np.array(
        [np.iinfo(np.int64).max, np.iinfo(np.int64).min] * (3 * BLOCK_WORDS + 5), dtype="<i8"
    )
    data = words.view(np.uint8)
    assert _twin(data) == wsum64(data.tobytes())


@pytest.mark.parametrize("start", [1, 3, 8, 13])
def test_unaligned_views_are_copied_not_misread(start: int) -> None:
    data = _random_bytes(2 * BLOCK_BYTES + 77, seed=start)
    tensor = torch.from_numpy(data.copy())
    assert digest_of(wsum64_tensor(tensor[start:])) == wsum64(data[start:].tobytes())


def test_non_contiguous_input_is_read_in_element_order() -> None:
    data = _random_bytes(4000, seed=5)
    tensor = torch.from_numpy(data.copy())[::2]
    assert digest_of(wsum64_tensor(tensor)) == wsum64(data[::2].tobytes())


def test_a_flipped_bit_changes_the_digest() -> None:
    data = _random_bytes(BLOCK_BYTES + 40, seed=1)
    flipped = data.copy()
    flipped[BLOCK_BYTES // 2] ^= 0x10
    assert _twin(flipped) != _twin(data)


def test_two_swapped_words_change_the_digest() -> None:
    data = _random_bytes(3 * BLOCK_BYTES, seed=2)
    words = data.view("<i8").copy()
    words[[10, BLOCK_WORDS + 3]] = words[[BLOCK_WORDS + 3, 10]]
    swapped = words.view(np.uint8)
    assert _twin(swapped)[:16] == _twin(data)[:16]  # s1 is order-blind
    assert _twin(swapped) != _twin(data)  # s2 is not


def test_result_stays_on_the_input_device_as_two_int64() -> None:
    sums = wsum64_tensor(torch.ones(100, dtype=torch.uint8))
    assert sums.dtype == torch.int64
    assert sums.shape == (2,)
    assert sums.device.type == "cpu"


def test_rejects_other_dtypes_and_shapes() -> None:
    with pytest.raises(TypeError):
        wsum64_tensor(torch.zeros(8, dtype=torch.int64))
    with pytest.raises(TypeError):
        wsum64_tensor(torch.zeros(2, 8, dtype=torch.uint8))


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(min_value=0, max_value=600), min_size=1, max_size=6), st.integers(0, 2**32)
)
def test_pieces_combine_to_the_digest_of_the_zero_padded_whole(sizes: list[int], seed: int) -> None:
    # Pieces at 8-aligned offsets with zero gaps between them, as tensors sit in a bucket.
    whole = np.zeros(sum((s + 15) // 8 * 8 for s in sizes), dtype=np.uint8)
    pieces = []
    offset = 0
    rng = np.random.default_rng(seed)
    for size in sizes:
        whole[offset : offset + size] = rng.integers(0, 256, size, dtype=np.uint8)
        pieces.append((offset, torch.from_numpy(whole[offset : offset + size].copy())))
        offset += (size + 15) // 8 * 8
    assert digest_of(wsum64_pieces(pieces)) == wsum64(whole.tobytes())


def test_pieces_must_be_word_aligned_and_disjoint() -> None:
    piece = torch.zeros(16, dtype=torch.uint8)
    with pytest.raises(ValueError, match="multiple of 8"):
        wsum64_pieces([(4, piece)])
    with pytest.raises(ValueError, match="overlaps"):
        wsum64_pieces([(0, piece), (8, piece)])


def test_digest_words_round_trip_through_the_tensor_form() -> None:
    digests = [wsum64(_random_bytes(n, n).tobytes()) for n in (8, 1000, BLOCK_BYTES + 8)]
    table = digests_to_tensor(digests, "cpu")
    assert [digest_of(row) for row in table] == digests
    assert digest_words("8000000000000000" + "0" * 16) == (-(2**63), 0)
    with pytest.raises(ValueError, match="32 hex digits"):
        digest_words("abc")


def test_batch_reports_mismatched_and_unrecorded_slots() -> None:
    buffers = [torch.from_numpy(_random_bytes(n, n)) for n in (64, 5000, BLOCK_BYTES)]
    digests = [wsum64(b.numpy().tobytes()) for b in buffers]
    batch = DigestBatch([*digests, digests[0]], device="cpu")
    batch.record(0, buffers[0])
    batch.record(1, buffers[2])  # the wrong bytes for slot 1
    batch.record(2, buffers[2])
    assert len(batch) == 4
    assert batch.failed() == [1, 3]  # 3 was never recorded
    assert batch.digests()[0] == digests[0]
