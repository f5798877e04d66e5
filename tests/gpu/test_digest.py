"""The torch twin of wmix128 gives the numpy reference's digests, bit for bit.

torch ops on the CPU here; on a CUDA device (the `gpu` marks) torch ops and the fused Triton
kernel, each against numpy.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import gpu.digest as digest_module
from gpu.digest import (
    Backend,
    DigestBatch,
    digest_of,
    digest_words,
    digests_to_tensor,
    triton_available,
    wmix128_pieces,
    wmix128_ranges,
    wmix128_tensor,
)
from streamer.checksum import format_digest, lane_sums, wmix128

# The twin's own unit of work: the tests shrink it so small buffers cross many chunk edges.
BLOCK_WORDS = 64
BLOCK_BYTES = BLOCK_WORDS * 8
HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(digest_module, "CHUNK_WORDS", BLOCK_WORDS)


def _random_bytes(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def _twin(data: np.ndarray) -> str:
    return digest_of(wmix128_tensor(torch.from_numpy(data.copy())))


@pytest.mark.parametrize(
    "length",
    [0, 1, 7, 8, 9, 255, 256, 4095]
    + [k * BLOCK_BYTES + d for k in (1, 2, 5) for d in (-9, -8, -1, 0, 1, 7, 8, 9)],
)
def test_twin_matches_reference_around_block_boundaries(length: int) -> None:
    data = _random_bytes(length, seed=length)
    assert _twin(data) == wmix128(data.tobytes())


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=3 * BLOCK_BYTES + 100))
def test_twin_matches_reference_on_any_bytes(data: bytes) -> None:
    assert _twin(np.frombuffer(data, dtype=np.uint8)) == wmix128(data)


def test_sums_wrap_modulo_2_64_like_numpy() -> None:
    # Every word at the int64 extremes: both sums overflow many times over.
    words = np.array(
        [np.iinfo(np.int64).max, np.iinfo(np.int64).min] * (3 * BLOCK_WORDS + 5), dtype="<i8"
    )
    data = words.view(np.uint8)
    assert _twin(data) == wmix128(data.tobytes())


@pytest.mark.parametrize("start", [1, 3, 8, 13])
def test_unaligned_views_are_copied_not_misread(start: int) -> None:
    data = _random_bytes(2 * BLOCK_BYTES + 77, seed=start)
    tensor = torch.from_numpy(data.copy())
    assert digest_of(wmix128_tensor(tensor[start:])) == wmix128(data[start:].tobytes())


def test_non_contiguous_input_is_read_in_element_order() -> None:
    data = _random_bytes(4000, seed=5)
    tensor = torch.from_numpy(data.copy())[::2]
    assert digest_of(wmix128_tensor(tensor)) == wmix128(data[::2].tobytes())


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
    assert _twin(swapped)[:16] != _twin(data)[:16]  # each word is mixed with its position
    assert _twin(swapped)[16:] != _twin(data)[16:]


def test_plus_one_minus_two_plus_one_changes_the_digest() -> None:
    data = _random_bytes(2 * BLOCK_BYTES, seed=3)
    words = data.view("<u8").copy()
    for index, delta in ((70, 1), (71, -2), (72, 1)):
        words[index] = np.uint64((int(words[index]) + delta) % 2**64)
    assert _twin(words.view(np.uint8)) != _twin(data)


@pytest.mark.parametrize("start_word", [0, 1, 63, 64, 1000])
def test_start_word_places_the_words_inside_a_larger_buffer(start_word: int) -> None:
    data = _random_bytes(3 * BLOCK_BYTES + 24, seed=start_word)
    sums = wmix128_tensor(torch.from_numpy(data.copy()), start_word=start_word)
    assert digest_of(sums) == format_digest(*lane_sums(data.view("<u8"), start=start_word))


def test_result_stays_on_the_input_device_as_two_int64() -> None:
    sums = wmix128_tensor(torch.ones(100, dtype=torch.uint8))
    assert sums.dtype == torch.int64
    assert sums.shape == (2,)
    assert sums.device.type == "cpu"


def test_rejects_other_dtypes_and_shapes() -> None:
    with pytest.raises(TypeError):
        wmix128_tensor(torch.zeros(8, dtype=torch.int64))
    with pytest.raises(TypeError):
        wmix128_tensor(torch.zeros(2, 8, dtype=torch.uint8))


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
    assert digest_of(wmix128_pieces(pieces, whole.size)) == wmix128(whole.tobytes())


def test_gaps_and_the_tail_after_the_last_piece_count_as_zero_words() -> None:
    # Unlike a plain sum, a zero word contributes its mixed position: the gaps must be counted.
    data = _random_bytes(40, seed=4)
    whole = np.zeros(8 * 300, dtype=np.uint8)
    whole[16:56] = data
    pieces = [(16, torch.from_numpy(data.copy()))]
    assert digest_of(wmix128_pieces(pieces, whole.size)) == wmix128(whole.tobytes())
    assert digest_of(wmix128_pieces(pieces, whole.size)) != digest_of(wmix128_pieces(pieces, 56))
    assert digest_of(wmix128_pieces([], 200, device="cpu")) == wmix128(bytes(200))


def test_pieces_must_be_word_aligned_disjoint_and_inside_the_buffer() -> None:
    piece = torch.zeros(16, dtype=torch.uint8)
    with pytest.raises(ValueError, match="multiple of 8"):
        wmix128_pieces([(4, piece)], 64)
    with pytest.raises(ValueError, match="overlaps"):
        wmix128_pieces([(0, piece), (8, piece)], 64)
    with pytest.raises(ValueError, match="past the buffer"):
        wmix128_pieces([(56, piece)], 64)
    with pytest.raises(ValueError, match="needs a device"):
        wmix128_pieces([], 64)


def test_digest_words_round_trip_through_the_tensor_form() -> None:
    digests = [wmix128(_random_bytes(n, n).tobytes()) for n in (8, 1000, BLOCK_BYTES + 8)]
    table = digests_to_tensor(digests, "cpu")
    assert [digest_of(row) for row in table] == digests
    assert digest_words("8000000000000000" + "0" * 16) == (-(2**63), 0)
    with pytest.raises(ValueError, match="32 hex digits"):
        digest_words("abc")


def test_batch_reports_mismatched_and_unrecorded_slots() -> None:
    buffers = [torch.from_numpy(_random_bytes(n, n)) for n in (64, 5000, BLOCK_BYTES)]
    digests = [wmix128(b.numpy().tobytes()) for b in buffers]
    batch = DigestBatch([*digests, digests[0]], device="cpu")
    batch.record(0, buffers[0])
    batch.record(1, buffers[2])  # the wrong bytes for slot 1
    batch.record(2, buffers[2])
    assert len(batch) == 4
    assert batch.failed() == [1, 3]  # 3 was never recorded
    assert batch.digests()[0] == digests[0]


def test_the_fused_kernel_is_refused_without_cuda_rather_than_faked() -> None:
    if HAS_CUDA:
        pytest.skip("this machine has CUDA")
    assert not triton_available()
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        wmix128_tensor(torch.zeros(8, dtype=torch.uint8), backend="triton")


# --- CUDA: torch ops and the fused Triton kernel against numpy -------------------------------

CUDA_LENGTHS = [1, 7, 8, 9, 8 * 1024 * 16 - 8, 8 * 1024 * 16, 8 * 1024 * 16 * 3 + 24, 5_000_003]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("length", CUDA_LENGTHS)
def test_cuda_backends_match_the_numpy_reference(length: int, backend: Backend) -> None:
    if backend == "triton" and not triton_available():
        pytest.skip("triton does not import here")
    data = _random_bytes(length, seed=length)
    on_gpu = torch.from_numpy(data.copy()).cuda()
    sums = wmix128_tensor(on_gpu, backend=backend)
    assert sums.device == on_gpu.device
    assert digest_of(sums) == wmix128(data.tobytes())
    # the same buffer as two pieces: word 0, then the rest placed at start_word=1
    head = wmix128_tensor(on_gpu[:8], backend=backend)
    rest = wmix128_tensor(on_gpu[8:], start_word=1, backend=backend)
    assert digest_of(head + rest) == wmix128(data.tobytes())


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_pieces_and_batches_use_the_same_digest() -> None:
    data = _random_bytes(3000, seed=11)
    whole = np.zeros(4096, dtype=np.uint8)
    whole[256 : 256 + 3000] = data
    pieces = [(256, torch.from_numpy(data.copy()).cuda())]
    assert digest_of(wmix128_pieces(pieces, 4096)) == wmix128(whole.tobytes())
    batch = DigestBatch([wmix128(whole.tobytes()), "0" * 32], "cuda")
    batch.record(0, torch.from_numpy(whole).cuda())
    batch.record_sums(1, wmix128_pieces(pieces, 4096))
    assert batch.failed() == [1]


# Ranges like a version's buckets: empty, one word, a tail that is not a multiple of 8, one
# across the kernel's program boundary (8192 words), several programs long, back to back.
RANGE_SIZES = [0, 8, 13, 8 * 8192 - 8, 8 * 8192 + 8, 8 * 8192 * 3 + 5, 1 << 20]


def _ranges_of(sizes: list[int], gap: int = 256) -> tuple[np.ndarray, list[tuple[int, int]]]:
    ranges, cursor = [], 0
    for size in sizes:
        ranges.append((cursor, size))
        cursor += -(-(size + gap) // 256) * 256
    return _random_bytes(cursor, seed=len(sizes)), ranges


def test_ranges_digest_each_range_as_a_buffer_of_its_own() -> None:
    data, ranges = _ranges_of(RANGE_SIZES)
    sums = wmix128_ranges(torch.from_numpy(data.copy()), ranges)
    expected = [wmix128(data[o : o + n].tobytes()) for o, n in ranges]
    assert [digest_of(s) for s in sums] == expected
    with pytest.raises(ValueError, match="multiple of 8"):
        wmix128_ranges(torch.from_numpy(data.copy()), [(4, 8)])
    with pytest.raises(ValueError, match="within the buffer"):
        wmix128_ranges(torch.from_numpy(data.copy()), [(0, data.size + 8)])


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_cuda_ranges_match_the_numpy_reference(backend: Backend) -> None:
    data, ranges = _ranges_of(RANGE_SIZES * 3)
    sums = wmix128_ranges(torch.from_numpy(data.copy()).cuda(), ranges, backend=backend)
    expected = [wmix128(data[o : o + n].tobytes()) for o, n in ranges]
    assert [digest_of(s) for s in sums] == expected
    batch = DigestBatch(expected, "cuda")
    corrupt = data.copy()
    corrupt[ranges[4][0] + 3] ^= 0x10
    batch.record_ranges(torch.from_numpy(corrupt).cuda(), ranges)
    assert batch.failed() == [4]


@pytest.mark.skipif(
    not os.environ.get("TRITON_INTERPRET") or importlib.util.find_spec("triton") is None,
    reason="runs the Triton kernel on the CPU only under TRITON_INTERPRET=1 with triton installed",
)
@pytest.mark.parametrize("length_words", [1, 255, 256, 1024, 1025, 3000])
def test_the_triton_kernel_in_the_interpreter_matches_numpy(length_words: int) -> None:
    from gpu._triton_digest import lane_sums as triton_lane_sums

    words = np.random.default_rng(length_words).integers(0, 2**64, length_words, dtype=np.uint64)
    for start in (0, 5):
        got = triton_lane_sums(
            torch.from_numpy(words.view(np.int64).copy()), start, block=256, iters=4
        )
        assert digest_of(got) == format_digest(*lane_sums(words, start=start))
