"""The torch twin of `streamer.checksum.wsum64`: bucket checksums where the bytes already are.

`wsum64_tensor` reads a 1-D uint8 tensor (CPU or CUDA) as little-endian int64 words and returns
the two sums ``s1 = sum(w_i)`` and ``s2 = sum((i + 1) * w_i)`` (mod 2**64) as an int64 tensor of
shape [2] on the same device: nothing is read back to the host, so a GPU subscriber checks a
bucket with a few kernels on its verify stream while the next bucket is still in flight. The
digests are bit-identical to the numpy reference (tests hold the two together): torch's int64
adds and multiplies wrap like numpy's, and any order of summation gives the same residue.

Like the reference, the words are a [rows, BLOCK_WORDS] grid plus a tail, so each sum is one row
reduction and one column reduction (two passes over the bytes, no weight array as large as the
payload)::

    i + 1 = r * B + (j + 1)   =>   s2 = sum_r (r * B) * rows_r + sum_j (j + 1) * cols_j

`DigestBatch` keeps the sums of many buffers on the device and compares them with the manifest's
digests there; `failed()` is the only host sync, once per version.

>>> digest_of(wsum64_tensor(torch.tensor([1, 0, 0, 0, 0, 0, 0, 0], dtype=torch.uint8)))
'00000000000000010000000000000001'
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from streamer.checksum import BLOCK_WORDS, format_digest

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "DigestBatch",
    "digest_of",
    "digest_words",
    "digests_to_tensor",
    "wsum64_pieces",
    "wsum64_tensor",
]

_WORD_BYTES = 8
_TWO63 = 1 << 63
_TWO64 = 1 << 64


def wsum64_tensor(buf: torch.Tensor) -> torch.Tensor:
    """The (s1, s2) sums of `buf` as an int64 tensor of shape [2] on `buf`'s device.

    `buf` is a 1-D uint8 tensor of any length: a length that is not a multiple of 8 is read as
    if zero-padded to the next word, as the reference does. Only kernels on the current stream
    are enqueued; nothing syncs.

    >>> digest_of(wsum64_tensor(torch.zeros(3, dtype=torch.uint8)))
    '00000000000000000000000000000000'
    """
    if buf.dtype != torch.uint8 or buf.dim() != 1:
        raise TypeError(
            f"wsum64_tensor takes a 1-D uint8 tensor, not {buf.dtype} of shape {tuple(buf.shape)}"
        )
    if not buf.is_contiguous():
        buf = buf.contiguous()
    num_words, tail_bytes = divmod(buf.numel(), _WORD_BYTES)
    sums = _word_sums(_as_words(buf[: num_words * _WORD_BYTES]))
    if tail_bytes:
        padded = torch.zeros(_WORD_BYTES, dtype=torch.uint8, device=buf.device)
        padded[:tail_bytes] = buf[num_words * _WORD_BYTES :]
        word = padded.view(torch.int64)
        sums = sums + torch.cat([word, word * (num_words + 1)])
    return sums


def wsum64_pieces(pieces: Sequence[tuple[int, torch.Tensor]]) -> torch.Tensor:
    """The sums of one buffer known only as pieces: ``(byte offset in the buffer, bytes)``.

    Bytes between pieces (and after the last) count as zero, as padding is. Offsets must be
    multiples of 8 and the pieces must not overlap. This is how a bucket is verified when its
    bytes went straight into several parameters instead of one staging range::

        s1 = sum_p s1_p            s2 = sum_p (s2_p + (offset_p / 8) * s1_p)

    >>> data = torch.arange(32, dtype=torch.uint8)
    >>> whole = wsum64_tensor(data)
    >>> bool((wsum64_pieces([(0, data[:16]), (16, data[16:])]) == whole).all())
    True
    """
    end = 0
    total: torch.Tensor | None = None
    for offset, piece in sorted(pieces, key=lambda p: p[0]):
        if offset % _WORD_BYTES:
            raise ValueError(f"piece offset {offset} is not a multiple of {_WORD_BYTES}")
        if offset < end:
            raise ValueError(f"piece at byte {offset} overlaps the previous one (ends at {end})")
        end = offset + piece.numel()
        sums = wsum64_tensor(piece)
        shift = offset // _WORD_BYTES
        if shift:
            sums = sums + torch.stack([torch.zeros_like(sums[0]), sums[0] * shift])
        total = sums if total is None else total + sums
    if total is None:
        raise ValueError("wsum64_pieces needs at least one piece")
    return total


def digest_of(sums: torch.Tensor) -> str:
    """Format the [2] sums like `streamer.checksum.format_digest` (this one reads them back)."""
    if sums.numel() != 2:
        raise ValueError(f"expected the 2 sums of wsum64_tensor, got shape {tuple(sums.shape)}")
    s1, s2 = (int(v) for v in sums.reshape(2).tolist())
    return format_digest(s1, s2)


def digest_words(digest: str) -> tuple[int, int]:
    """The two sums of a 32-hex-digit digest, as signed int64 values.

    >>> digest_words('ffffffffffffffff0000000000000002')
    (-1, 2)
    """
    if len(digest) != 32:
        raise ValueError(f"a wsum64 digest has 32 hex digits, not {len(digest)}: {digest!r}")
    words = int(digest[:16], 16), int(digest[16:], 16)
    return tuple(w - _TWO64 if w >= _TWO63 else w for w in words)  # type: ignore[return-value]


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
    >>> batch = DigestBatch([digest_of(wsum64_tensor(data)), "0" * 32], device="cpu")
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
        """Checksum `buf` (on the batch's device) into slot `index`."""
        self.sums[index].copy_(wsum64_tensor(buf))

    def record_sums(self, index: int, sums: torch.Tensor) -> None:
        """Store sums computed elsewhere (say by `wsum64_pieces`) into slot `index`."""
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


def _as_words(raw: torch.Tensor) -> torch.Tensor:
    """`raw` (a multiple of 8 bytes) as int64 words; copies only if it is not 8-byte aligned."""
    if raw.numel() == 0:
        return torch.zeros(0, dtype=torch.int64, device=raw.device)
    if raw.storage_offset() % _WORD_BYTES or raw.data_ptr() % _WORD_BYTES:
        raw = raw.clone()
    return raw.view(torch.int64)


def _word_sums(words: torch.Tensor) -> torch.Tensor:
    num_words = words.numel()
    full = num_words // BLOCK_WORDS * BLOCK_WORDS
    device = words.device
    if full:
        grid = words[:full].view(-1, BLOCK_WORDS)
        rows = grid.sum(dim=1)
        cols = grid.sum(dim=0)
        row_weights = torch.arange(rows.numel(), dtype=torch.int64, device=device).mul_(BLOCK_WORDS)
        col_weights = torch.arange(1, BLOCK_WORDS + 1, dtype=torch.int64, device=device)
        s1 = rows.sum()
        s2 = (rows * row_weights).sum() + (cols * col_weights).sum()
    else:
        s1 = torch.zeros((), dtype=torch.int64, device=device)
        s2 = torch.zeros((), dtype=torch.int64, device=device)
    if full < num_words:
        rest = words[full:]
        weights = torch.arange(full + 1, num_words + 1, dtype=torch.int64, device=device)
        s1 = s1 + rest.sum()
        s2 = s2 + (rest * weights).sum()
    return torch.stack([s1, s2])
