"""Where the tensors to publish come from: a safetensors checkpoint, or a synthetic model.

The synthetic model has the shapes of a Llama-style decoder scaled to a byte budget, and
each version is derived from the one before by a small deterministic step, so that any
process can rebuild the exact tensors of any version from `(seed, version)`; the demo and
the tests use that to check subscribers bit for bit.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

__all__ = ["load_checkpoint", "synthetic_llama", "synthetic_shapes"]

logger = logging.getLogger(__name__)


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint (a file, or a directory of `*.safetensors`).

    Tensors come back in file order then name order, which for sharded Hugging Face
    checkpoints is layer order.
    """
    from safetensors.torch import load_file

    root = Path(path)
    files = [root] if root.is_file() else sorted(root.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {root}")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        for name, tensor in sorted(load_file(str(file)).items()):
            if name in tensors:
                raise ValueError(f"tensor {name!r} appears in two files of {root}")
            tensors[name] = tensor
    return tensors


def synthetic_shapes(
    total_bytes: int, *, dtype: torch.dtype = torch.bfloat16
) -> dict[str, tuple[int, ...]]:
    """Llama-like tensor shapes adding up to about `total_bytes`.

    >>> shapes = synthetic_shapes(8 << 20)
    >>> list(shapes)[:3]
    ['model.embed_tokens.weight', 'model.layers.0.input_layernorm.weight', 'model.layers.0.self_attn.q_proj.weight']
    """
    element = torch.empty((), dtype=dtype).element_size()
    hidden = 64
    # The widest hidden size that still leaves at least four layers.
    while 4 * 58 * hidden * hidden * element <= total_bytes and hidden < 8192:
        hidden *= 2
    intermediate = hidden * 7 // 2 // 64 * 64
    vocab = 8 * hidden
    per_layer = (4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden) * element
    fixed = (2 * vocab * hidden + hidden) * element
    layers = max(1, (total_bytes - fixed) // per_layer)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for layer in range(layers):
        prefix = f"model.layers.{layer}"
        shapes[f"{prefix}.input_layernorm.weight"] = (hidden,)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{prefix}.self_attn.{proj}.weight"] = (hidden, hidden)
        shapes[f"{prefix}.post_attention_layernorm.weight"] = (hidden,)
        shapes[f"{prefix}.mlp.gate_proj.weight"] = (intermediate, hidden)
        shapes[f"{prefix}.mlp.up_proj.weight"] = (intermediate, hidden)
        shapes[f"{prefix}.mlp.down_proj.weight"] = (hidden, intermediate)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def synthetic_llama(
    total_bytes: int, *, version: int, seed: int = 0, dtype: torch.dtype = torch.bfloat16
) -> dict[str, torch.Tensor]:
    """The tensors of `version` of a synthetic Llama-like model, exactly reproducible.

    Each tensor is drawn from a generator seeded by (seed, version, tensor index), so a
    version is independent of the ones before it and any process can rebuild it.
    """
    tensors: dict[str, torch.Tensor] = {}
    generator = torch.Generator()
    for index, (name, shape) in enumerate(synthetic_shapes(total_bytes, dtype=dtype).items()):
        generator.manual_seed((seed * 1_000_003 + version * 10_007 + index) & 0x7FFF_FFFF_FFFF)
        tensor = torch.empty(shape, dtype=torch.float32)
        tensor.uniform_(-0.05, 0.05, generator=generator)
        tensors[name] = tensor.to(dtype)
    return tensors
