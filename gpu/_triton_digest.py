"""The fused Triton kernel behind `gpu.digest.wmix128_tensor` on CUDA tensors.

One pass over the words: each program reads `ITERS` tiles of `BLOCK` consecutive words, mixes
each word with its position in registers and keeps two per-lane accumulators; it writes its
two partial sums, and one small torch sum over the programs' partials finishes the digest
(wrapping adds commute, so the result is the reference's, bit for bit):

    words [program 0: ITERS x BLOCK | program 1 | ... | last, partial: masked]
              └─ x = w + (i+1)*GAMMA; mix; acc1 += m; acc2 += (i+1)*m  ─> partials[p] = (s1, s2)

Whole programs run unmasked (`even`); the remainder is one masked launch. Importing this
module imports triton: `gpu.digest` does so lazily and falls back to torch ops without it.
The default shape (BLOCK=512, ITERS=16, 4 warps) was the fastest of a sweep on an H200
(bench/RESULTS_GPU.md). Without a GPU, check a change before spending device time: run the
kernel under ``TRITON_INTERPRET=1`` (tests/gpu/test_digest.py has a test for that), and compile
it for sm_90 with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))``, which
catches what the interpreter does not (Triton rejects annotated runtime arguments, for one).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from streamer.checksum import C1, C2, GAMMA, SHIFTS

__all__ = ["BLOCK", "ITERS", "NUM_WARPS", "lane_sums"]

BLOCK = 512
ITERS = 16
NUM_WARPS = 4
_MASK = (1 << 64) - 1


@triton.jit  # type: ignore[misc]
def _lane_sums_kernel(  # type: ignore[no-untyped-def]
    words_ptr,  # triton reads annotations: the runtime arguments must have none
    n_words,
    first_index,
    out_ptr,
    gamma: tl.constexpr,
    c1: tl.constexpr,
    c2: tl.constexpr,
    r1: tl.constexpr,
    r2: tl.constexpr,
    r3: tl.constexpr,
    step: tl.constexpr,
    block: tl.constexpr,
    iters: tl.constexpr,
    even: tl.constexpr,
) -> None:
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * (block * iters) + tl.arange(0, block).to(tl.int64)
    # i + 1 for each lane (first_index already counts the words before this launch, plus one)
    index = (offs + first_index).to(tl.uint64)
    position = index * gamma
    acc1 = tl.zeros([block], dtype=tl.uint64)
    acc2 = tl.zeros([block], dtype=tl.uint64)
    for _ in range(iters):
        if even:
            w = tl.load(words_ptr + offs)
        else:
            mask = offs < n_words
            w = tl.load(words_ptr + offs, mask=mask, other=0)
        x = w.to(tl.uint64, bitcast=True) + position
        x = (x ^ (x >> r1)) * c1
        x = (x ^ (x >> r2)) * c2
        x = x ^ (x >> r3)
        if not even:
            x = tl.where(mask, x, tl.zeros_like(x))
        acc1 += x
        acc2 += x * index
        offs += block
        index += block
        position += step
    tl.store(out_ptr + pid * 2, tl.sum(acc1, axis=0).to(tl.int64, bitcast=True))
    tl.store(out_ptr + pid * 2 + 1, tl.sum(acc2, axis=0).to(tl.int64, bitcast=True))


def lane_sums(
    words: torch.Tensor,
    start_word: int,
    *,
    block: int = BLOCK,
    iters: int = ITERS,
    num_warps: int = NUM_WARPS,
) -> torch.Tensor:
    """The (s1, s2) lane sums of int64 CUDA `words` (words `start_word ..` of a buffer): [2]."""
    num_words = words.numel()
    per_program = block * iters
    full = num_words // per_program
    partials = torch.empty((full + 1, 2), dtype=torch.int64, device=words.device)
    partials[full].zero_()
    common = {
        "gamma": GAMMA,
        "c1": C1,
        "c2": C2,
        "r1": SHIFTS[0],
        "r2": SHIFTS[1],
        "r3": SHIFTS[2],
        "step": block * GAMMA & _MASK,
        "block": block,
        "iters": iters,
        "num_warps": num_warps,
    }
    if full:
        _lane_sums_kernel[(full,)](words, num_words, start_word + 1, partials, even=True, **common)
    rest = num_words - full * per_program
    if rest:
        tail = words[full * per_program :]
        _lane_sums_kernel[(1,)](
            tail, rest, start_word + full * per_program + 1, partials[full:], even=False, **common
        )
    return partials.sum(dim=0)
