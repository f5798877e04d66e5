"""The fused Triton kernel behind `gpu.digest.wmix128_tensor` on CUDA tensors.

One pass over the words: each program reads `ITERS` tiles of `BLOCK` consecutive words, mixes
each word with its position in registers and keeps two per-lane accumulators; it writes its
two partial sums, and one small torch sum over the programs' partials finishes the digest
(wrapping adds commute, so the result is the reference's, bit for bit):

    words [program 0: ITERS x BLOCK | program 1 | ... | last, partial: masked]
              └─ x = w + (i+1)*GAMMA; mix; acc1 += m; acc2 += (i+1)*m  ─> partials[p] = (s1, s2)

Whole programs run unmasked (`even`); the remainder is one masked launch. `range_sums` digests
many ranges of one buffer (a version's buckets) in ONE masked launch, each program inside one
range: a launch per 64 MiB bucket costs more host time (Python launch overhead) than the GPU
takes to read it, so per-bucket launches leave a 16 GB verify CPU-bound at ~0.2 TB/s. Importing this
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

__all__ = ["BLOCK", "ITERS", "NUM_WARPS", "lane_sums", "range_sums"]

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


@triton.jit  # type: ignore[misc]
def _range_sums_kernel(  # type: ignore[no-untyped-def]
    words_ptr,
    prog_word_ptr,
    prog_index_ptr,
    prog_end_ptr,
    out_ptr,
    gamma: tl.constexpr,
    c1: tl.constexpr,
    c2: tl.constexpr,
    r1: tl.constexpr,
    r2: tl.constexpr,
    r3: tl.constexpr,
    block: tl.constexpr,
    iters: tl.constexpr,
) -> None:
    pid = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, block).to(tl.int64)
    offs = tl.load(prog_word_ptr + pid) + lanes
    index = (tl.load(prog_index_ptr + pid) + lanes).to(tl.uint64)
    end = tl.load(prog_end_ptr + pid)
    acc1 = tl.zeros([block], dtype=tl.uint64)
    acc2 = tl.zeros([block], dtype=tl.uint64)
    for _ in range(iters):
        mask = offs < end
        w = tl.load(words_ptr + offs, mask=mask, other=0)
        x = w.to(tl.uint64, bitcast=True) + index * gamma
        x = (x ^ (x >> r1)) * c1
        x = (x ^ (x >> r2)) * c2
        x = x ^ (x >> r3)
        x = tl.where(mask, x, tl.zeros_like(x))
        acc1 += x
        acc2 += x * index
        offs += block
        index += block
    tl.store(out_ptr + pid * 2, tl.sum(acc1, axis=0).to(tl.int64, bitcast=True))
    tl.store(out_ptr + pid * 2 + 1, tl.sum(acc2, axis=0).to(tl.int64, bitcast=True))


def range_sums(
    words: torch.Tensor,
    starts: list[int],
    counts: list[int],
    *,
    block: int = BLOCK,
    iters: int = ITERS,
    num_warps: int = NUM_WARPS,
) -> torch.Tensor:
    """The lane sums of many word ranges of one int64 CUDA buffer, in one launch: [n, 2].

    Range k is words ``starts[k] .. starts[k] + counts[k]`` of `words`, digested as a buffer
    of its own (its first word is word 0). Each program reads at most ``block x iters`` words
    of one range; a segment sum (wrapping int64 adds) gathers the programs of each range.
    """
    device = words.device
    per_program = block * iters
    programs = [-(-count // per_program) for count in counts]
    total = sum(programs)
    sums = torch.zeros((len(counts), 2), dtype=torch.int64, device=device)
    if total == 0:
        return sums
    # No host sync on the way: the table goes up from pinned memory, and the programs' count
    # is known here (repeat_interleave would otherwise read it back from the device).
    table = torch.tensor([starts, counts, programs], dtype=torch.int64).pin_memory()
    table = table.to(device, non_blocking=True)
    start_of, count_of, programs_of = table[0], table[1], table[2]
    owner = torch.repeat_interleave(
        torch.arange(len(counts), device=device), programs_of, output_size=total
    )
    first = torch.cumsum(programs_of, 0) - programs_of
    local = (torch.arange(total, device=device) - first[owner]) * per_program
    prog_word = start_of[owner] + local
    prog_index = local + 1  # i + 1 of each program's first word, counted within its range
    prog_end = start_of[owner] + count_of[owner]
    partials = torch.empty((total, 2), dtype=torch.int64, device=device)
    _range_sums_kernel[(total,)](
        words,
        prog_word,
        prog_index,
        prog_end,
        partials,
        gamma=GAMMA,
        c1=C1,
        c2=C2,
        r1=SHIFTS[0],
        r2=SHIFTS[1],
        r3=SHIFTS[2],
        block=block,
        iters=iters,
        num_warps=num_warps,
    )
    return sums.index_add_(0, owner, partials)
