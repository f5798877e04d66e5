"""The torch twin of `streamer.checksum.wmix128`: bucket digests where the bytes already are.

`wmix128_tensor` reads a 1-D uint8 tensor (CPU or CUDA) as little-endian 64-bit words and
returns its two lane sums ``s1 = sum(m_i)`` and ``s2 = sum((i + 1) * m_i)`` (mod 2**64, as an
int64 tensor of shape [2] on the same device), ``m_i`` being word i mixed with its position
(the reference's docstring has the definition and the detection guarantee). Nothing is read
back to the host, so a GPU subscriber checks a bucket on its verify stream while the next
bucket is still in flight, and a publisher digests its packed buffer before the D2H copy.

Two ways to compute the same bits:

    CUDA tensor, `triton` importable  ──> one fused kernel (`gpu._triton_digest`): read each
                                           word once, mix in registers, per-program partial
                                           sums [programs, 2] -> one small torch sum
    anything else (CPU, no triton)    ──> torch ops on chunks of `CHUNK_WORDS` words (bounded
                                           scratch; int64 ops wrap like uint64 ones, and the
                                           logical shift is an arithmetic one masked)

`DigestBatch` keeps the sums of many buffers on the device and compares them with the
manifest's digests there; `failed()` is the only host sync, once per version.

>>> digest_of(wmix128_tensor(torch.zeros(0, dtype=torch.uint8)))
'00000000000000000000000000000000'
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Literal

import torch

from streamer.checksum import C1, C2, GAMMA, SHIFTS, format_digest, parse_digest

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

__all__ = [
    "CHUNK_WORDS",
    "Backend",
    "DigestBatch",
    "digest_of",
    "digest_words",
    "digests_to_tensor",
    "triton_available",
    "wmix128_pieces",
    "wmix128_ranges",
    "wmix128_tensor",
]

Backend = Literal["auto", "triton", "torch"]

CHUNK_WORDS = 1 << 22
"""Words per torch-ops chunk: 32 MiB of input, three scratch tensors of that size at most."""

_WORD_BYTES = 8
_TWO63 = 1 << 63
_TWO64 = 1 << 64
_ZERO_CHUNK_WORDS = 1 << 20


def _signed(value: int) -> int:
    """`value` (mod 2**64) as the int64 with the same bits."""
    value %= _TWO64
    return value - _TWO64 if value >= _TWO63 else value


_GAMMA = _signed(GAMMA)
_C1 = _signed(C1)
_C2 = _signed(C2)
_LOW_MASKS = tuple((1 << (64 - s)) - 1 for s in SHIFTS)


@functools.cache
def _triton_sums() -> Callable[[torch.Tensor, int], torch.Tensor] | None:
    """The Triton kernel's launcher, or None where triton does not import."""
    try:
        from gpu._triton_digest import lane_sums
    except ImportError:
        return None
    return lane_sums


def _triton_ranges() -> Callable[[torch.Tensor, list[int], list[int]], torch.Tensor] | None:
    try:
        from gpu._triton_digest import range_sums
    except ImportError:
        return None
    return range_sums


def triton_available() -> bool:
    """True if CUDA tensors are digested by the fused Triton kernel."""
    return torch.cuda.is_available() and _triton_sums() is not None


def wmix128_tensor(
    buf: torch.Tensor, *, start_word: int = 0, backend: Backend = "auto"
) -> torch.Tensor:
    """The (s1, s2) lane sums of `buf` as an int64 tensor of shape [2] on `buf`'s device.

    `buf` is a 1-D uint8 tensor of any length: a length that is not a multiple of 8 is read as
    if zero-padded to the next word, as the reference does. Its words count as words
    ``start_word ..`` of a larger buffer (`wmix128_pieces` uses that). Only kernels on the
    current stream are enqueued; nothing syncs. `backend="triton"` insists on the fused kernel
    (CUDA only), `"torch"` on torch ops; `"auto"` takes Triton where it can.

    >>> digest_of(wmix128_tensor(torch.tensor([1, 0, 0, 0, 0, 0, 0, 0], dtype=torch.uint8)))
    '910a2dec89025cc1910a2dec89025cc1'
    """
    if buf.dtype != torch.uint8 or buf.dim() != 1:
        raise TypeError(
            f"wmix128_tensor takes a 1-D uint8 tensor, not {buf.dtype} of shape {tuple(buf.shape)}"
        )
    if start_word < 0:
        raise ValueError(f"start_word must be >= 0, not {start_word}")
    if not buf.is_contiguous():
        buf = buf.contiguous()
    sums_of = _backend(buf.device, backend)
    num_words, tail_bytes = divmod(buf.numel(), _WORD_BYTES)
    sums = sums_of(_as_words(buf[: num_words * _WORD_BYTES]), start_word)
    if tail_bytes:
        padded = torch.zeros(_WORD_BYTES, dtype=torch.uint8, device=buf.device)
        padded[:tail_bytes] = buf[num_words * _WORD_BYTES :]
        sums = sums + sums_of(padded.view(torch.int64), start_word + num_words)
    return sums


def wmix128_ranges(
    buf: torch.Tensor, ranges: Sequence[tuple[int, int]], *, backend: Backend = "auto"
) -> torch.Tensor:
    """The lane sums of many ``(byte offset, nbytes)`` ranges of `buf`, each digested as a
    buffer of its own (a version's buckets in its staging): an int64 [n, 2] tensor.

    Offsets must be multiples of 8. On CUDA with triton it is one kernel launch for all the
    ranges (plus one for each range whose length is not a multiple of 8, for its padded last
    word); elsewhere `wmix128_tensor` per range. Nothing syncs.

    >>> data = torch.arange(48, dtype=torch.uint8)
    >>> sums = wmix128_ranges(data, [(0, 16), (16, 30)])
    >>> [digest_of(s) for s in sums] == [digest_of(wmix128_tensor(data[:16])),
    ...                                  digest_of(wmix128_tensor(data[16:46]))]
    True
    """
    if buf.dtype != torch.uint8 or buf.dim() != 1:
        raise TypeError(
            f"wmix128_ranges takes a 1-D uint8 tensor, not {buf.dtype} of shape {tuple(buf.shape)}"
        )
    for offset, nbytes in ranges:
        if offset % _WORD_BYTES or offset < 0 or nbytes < 0 or offset + nbytes > buf.numel():
            raise ValueError(
                f"range {offset}+{nbytes} must start on a multiple of {_WORD_BYTES} and lie "
                f"within the buffer ({buf.numel()} bytes)"
            )
    fused = _triton_ranges() if buf.device.type == "cuda" and backend != "torch" else None
    if fused is None:
        if backend == "triton":
            raise RuntimeError("the fused range digest needs a CUDA tensor and triton")
        if not ranges:
            return torch.zeros((0, 2), dtype=torch.int64, device=buf.device)
        return torch.stack([wmix128_tensor(buf[o : o + n], backend=backend) for o, n in ranges])
    if not buf.is_contiguous():
        buf = buf.contiguous()
    whole = buf.numel() // _WORD_BYTES * _WORD_BYTES
    words = _as_words(buf[:whole])
    starts = [offset // _WORD_BYTES for offset, _ in ranges]
    counts = [nbytes // _WORD_BYTES for _, nbytes in ranges]
    sums = fused(words, starts, counts)
    for index, (offset, nbytes) in enumerate(ranges):
        if nbytes % _WORD_BYTES:  # the padded last word, at its position in the range
            tail = buf[offset + counts[index] * _WORD_BYTES : offset + nbytes]
            sums[index] += wmix128_tensor(tail, start_word=counts[index])
    return sums


def wmix128_pieces(
    pieces: Sequence[tuple[int, torch.Tensor]],
    nbytes: int,
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The lane sums of an `nbytes` buffer known only as pieces: ``(byte offset, bytes)``.

    Bytes no piece covers (between pieces, after the last) count as zero, as the publisher's
    padding is; unlike a plain sum, a zero word still contributes its mixed position, so those
    words are digested too (they are few: alignment padding). Offsets must be multiples of 8
    and the pieces must not overlap nor pass `nbytes`. This is how a bucket is verified when
    its bytes went straight into several parameters instead of one staging range. `device` is
    needed when there are no pieces.

    >>> data = torch.arange(40, dtype=torch.uint8)
    >>> whole = wmix128_tensor(torch.cat([data[:16], torch.zeros(8, dtype=torch.uint8), data[24:]]))
    >>> bool((wmix128_pieces([(0, data[:16]), (24, data[24:])], 40) == whole).all())
    True
    """
    if device is None:
        if not pieces:
            raise ValueError("wmix128_pieces needs a device when there are no pieces")
        device = pieces[0][1].device
    target = torch.device(device)
    total = torch.zeros(2, dtype=torch.int64, device=target)
    num_words = -(-nbytes // _WORD_BYTES)
    cursor = 0  # words covered so far
    end = 0  # bytes
    for offset, piece in sorted(pieces, key=lambda p: p[0]):
        if offset % _WORD_BYTES:
            raise ValueError(f"piece offset {offset} is not a multiple of {_WORD_BYTES}")
        if offset < end:
            raise ValueError(f"piece at byte {offset} overlaps the previous one (ends at {end})")
        end = offset + piece.numel()
        if end > nbytes:
            raise ValueError(f"piece at byte {offset} ends at {end}, past the buffer's {nbytes}")
        first = offset // _WORD_BYTES
        if first > cursor:
            total = total + _zero_sums(cursor, first - cursor, target)
        total = total + wmix128_tensor(piece, start_word=first)
        cursor = first + -(-piece.numel() // _WORD_BYTES)
    if num_words > cursor:
        total = total + _zero_sums(cursor, num_words - cursor, target)
    return total


def digest_of(sums: torch.Tensor) -> str:
    """Format the [2] sums like `streamer.checksum.format_digest` (this one reads them back)."""
    if sums.numel() != 2:
        raise ValueError(f"expected the 2 sums of wmix128_tensor, got shape {tuple(sums.shape)}")
    s1, s2 = (int(v) for v in sums.reshape(2).tolist())
    return format_digest(s1, s2)


def digest_words(digest: str) -> tuple[int, int]:
    """The two lane sums of a 32-hex-digit digest, as signed int64 values.

    >>> digest_words('ffffffffffffffff0000000000000002')
    (-1, 2)
    """
    s1, s2 = parse_digest(digest)
    return _signed(s1), _signed(s2)


def digests_to_tensor(digests: Sequence[str], device: torch.device | str) -> torch.Tensor:
    """The digests as an int64 [n, 2] tensor on `device`, copied without a stream sync."""
    host = torch.tensor([digest_words(d) for d in digests], dtype=torch.int64).reshape(-1, 2)
    target = torch.device(device)
    if target.type == "cuda":
        # Pinned, so the copy is truly asynchronous on the current stream; torch's host
        # allocator keeps the pinned block alive until the copy is done.
        return host.pin_memory().to(target, non_blocking=True)
    return host.to(target)


class DigestBatch:
    """The sums of many buffers, compared with their expected digests on the device.

    Every call enqueues work on the current stream (make it the verify stream); `failed()` is
    the single sync. A slot never recorded counts as failed.

    >>> data = torch.arange(64, dtype=torch.uint8)
    >>> batch = DigestBatch([digest_of(wmix128_tensor(data)), "0" * 32], device="cpu")
    >>> batch.record(0, data)
    >>> batch.record(1, data)
    >>> batch.failed()
    [1]
    """

    def __init__(self, digests: Sequence[str], device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.expected = digests_to_tensor(digests, self.device)
        self.sums = torch.bitwise_not(self.expected)  # poisoned: an unrecorded slot never matches

    def __len__(self) -> int:
        return int(self.expected.shape[0])

    def record(self, index: int, buf: torch.Tensor) -> None:
        """Digest `buf` (on the batch's device) into slot `index`."""
        self.sums[index].copy_(wmix128_tensor(buf))

    def record_ranges(self, buf: torch.Tensor, ranges: Sequence[tuple[int, int]]) -> None:
        """Digest every slot at once: slot k is the ``ranges[k]`` (offset, nbytes) of `buf`,
        all of them in one launch (`wmix128_ranges`); no host sync."""
        if len(ranges) != len(self):
            raise ValueError(f"{len(ranges)} ranges for a batch of {len(self)}")
        self.sums.copy_(wmix128_ranges(buf, ranges))

    def record_sums(self, index: int, sums: torch.Tensor) -> None:
        """Store sums computed elsewhere (say by `wmix128_pieces`) into slot `index`."""
        self.sums[index].copy_(sums)

    def mismatches(self) -> torch.Tensor:
        """A bool [n] tensor on the device: True where the sums differ from the digest."""
        return (self.sums != self.expected).any(dim=1)

    def failed(self) -> list[int]:
        """Indices whose sums do not match; syncs the current stream once."""
        return [int(i) for i in torch.nonzero(self.mismatches()).flatten().tolist()]

    def digests(self) -> list[str]:
        """The recorded digests (a sync; for logs and tests)."""
        return [format_digest(int(a), int(b)) for a, b in self.sums.tolist()]


def _backend(device: torch.device, backend: Backend) -> Callable[[torch.Tensor, int], torch.Tensor]:
    if backend == "torch":
        return _torch_sums
    fused = _triton_sums() if device.type == "cuda" else None
    if fused is not None:
        return fused
    if backend == "triton":
        raise RuntimeError(
            "the fused digest needs a CUDA tensor and an importable triton; "
            f"got a tensor on {device} (triton importable: {_triton_sums() is not None})"
        )
    return _torch_sums


def _as_words(raw: torch.Tensor) -> torch.Tensor:
    """`raw` (a multiple of 8 bytes) as int64 words; copies only if it is not 8-byte aligned."""
    if raw.numel() == 0:
        return torch.zeros(0, dtype=torch.int64, device=raw.device)
    if raw.data_ptr() % _WORD_BYTES:
        raw = raw.clone()
    return raw.view(torch.int64)


def _zero_sums(start_word: int, num_words: int, device: torch.device) -> torch.Tensor:
    """The lane sums of `num_words` zero words at `start_word ..`, in bounded chunks."""
    zeros = torch.zeros(min(num_words, _ZERO_CHUNK_WORDS) * _WORD_BYTES, dtype=torch.uint8)
    zeros = zeros.to(device)
    total = torch.zeros(2, dtype=torch.int64, device=device)
    for low in range(0, num_words, _ZERO_CHUNK_WORDS):
        count = min(_ZERO_CHUNK_WORDS, num_words - low)
        total = total + wmix128_tensor(zeros[: count * _WORD_BYTES], start_word=start_word + low)
    return total


def _torch_sums(words: torch.Tensor, start_word: int) -> torch.Tensor:
    """The lane sums of int64 `words` (words `start_word ..` of a buffer) with torch ops."""
    device = words.device
    s1 = torch.zeros((), dtype=torch.int64, device=device)
    s2 = torch.zeros((), dtype=torch.int64, device=device)
    for low in range(0, words.numel(), CHUNK_WORDS):
        chunk = words[low : low + CHUNK_WORDS]
        first = start_word + low + 1
        position = torch.arange(first, first + chunk.numel(), dtype=torch.int64, device=device)
        x = position * _GAMMA
        x += chunk
        scratch = torch.empty_like(x)
        _xorshift(x, scratch, 0)
        x *= _C1
        _xorshift(x, scratch, 1)
        x *= _C2
        _xorshift(x, scratch, 2)
        s1 = s1 + x.sum()
        x *= position
        s2 = s2 + x.sum()
    return torch.stack([s1, s2])


def _xorshift(x: torch.Tensor, scratch: torch.Tensor, which: int) -> None:
    """``x ^= x >> SHIFTS[which]`` with a logical shift (torch's int64 `>>` is arithmetic)."""
    torch.bitwise_right_shift(x, SHIFTS[which], out=scratch)
    scratch &= _LOW_MASKS[which]
    x ^= scratch
