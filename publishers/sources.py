"""Where the tensors to publish come from: a safetensors checkpoint, or a synthetic model.

The synthetic model has the shapes of a Llama-style decoder scaled to a byte budget, and
each version is derived from the one before by a small deterministic step, so that any
process can rebuild the exact tensors of any version from `(seed, version)`; the demo and
the tests use that to check subscribers bit for bit.
"""

from __future__ import annotations

import json
import logging
import mmap
import struct
from pathlib import Path

import torch

__all__ = ["INDEX_FILE", "load_checkpoint", "synthetic_llama", "synthetic_shapes"]

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
"""A sharded Hugging Face checkpoint's map of tensor name -> file: it decides what is published."""

_HEADER_LIMIT = 100 << 20  # safetensors' own limit on the JSON header
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def _map_file(file: Path, names: set[str] | None) -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file as views of a private memory map of it.

    Nothing is read up front: packing then reads each tensor once, tensor by tensor, from the
    page cache, instead of holding a loaded copy of the whole checkpoint next to the packed one.
    """
    with file.open("rb") as handle:
        try:
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        except (OSError, ValueError) as exc:  # an empty file, or one that cannot be mapped
            raise ValueError(f"{file} is not a safetensors file: {exc}") from exc
    (length,) = struct.unpack_from("<Q", mapped, 0) if len(mapped) >= 8 else (0,)
    if not 0 < length <= min(_HEADER_LIMIT, len(mapped) - 8):
        raise ValueError(f"{file} is not a safetensors file (header length {length})")
    try:
        header = json.loads(bytes(mapped[8 : 8 + length]))
    except ValueError as exc:
        raise ValueError(f"{file} is not a safetensors file ({exc})") from exc
    if not isinstance(header, dict):
        raise ValueError(f"{file} is not a safetensors file (its header is not an object)")  # noqa: TRY004 - a bad file, not a bad argument
    header.pop("__metadata__", None)
    base = 8 + length
    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(header):
        if names is not None and name not in names:
            continue
        info = header[name]
        dtype = _DTYPES.get(info.get("dtype"))
        begin, stop = info.get("data_offsets", (0, -1))
        if dtype is None or not 0 <= begin <= stop <= len(mapped) - base:
            raise ValueError(
                f"{file}: tensor {name!r} has a dtype or range this loader does not read"
            )
        if stop == begin:  # frombuffer refuses an empty range
            tensors[name] = torch.empty(info["shape"], dtype=dtype)
            continue
        flat = torch.frombuffer(mapped, dtype=torch.uint8, count=stop - begin, offset=base + begin)
        tensors[name] = flat.view(dtype).reshape(info["shape"])
    return tensors


def _checkpoint_files(root: Path) -> list[tuple[Path, set[str] | None]]:
    """(file, the tensor names to take from it, or None for all) in publishing order."""
    if root.is_file():
        return [(root, None)]
    index = root / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no weight_map")
        by_file: dict[str, set[str]] = {}
        for name, file in weight_map.items():
            by_file.setdefault(str(file), set()).add(str(name))
        missing = [f for f in by_file if not (root / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names files that are not there: {missing[:3]}")
        stray = sorted({p.name for p in root.glob("*.safetensors")} - set(by_file))
        if stray:
            logger.info("not published (not in %s): %s", INDEX_FILE, ", ".join(stray[:5]))
        return [(root / f, names) for f, names in sorted(by_file.items())]
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {root}")
    return [(file, None) for file in files]


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint: a file, or a directory.

    In a directory with a `model.safetensors.index.json`, the index decides: exactly the tensors
    of its `weight_map`, from the files it names (other `.safetensors` files are left out);
    without one, every `*.safetensors` file. Tensors come back in file order then name order,
    which for sharded Hugging Face checkpoints is layer order. The tensors map the files
    (read-only use; copy-on-write if written), so loading costs no memory up front.
    """
    root = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    for file, names in _checkpoint_files(root):
        mapped = _map_file(file, names)
        if names is not None and len(mapped) != len(names):
            absent = sorted(names - set(mapped))
            raise ValueError(f"{file} lacks tensors its index lists, e.g. {absent[:3]}")
        for name, tensor in mapped.items():
            if name in tensors:
                raise ValueError(f"tensor {name!r} appears in two files of {root}")
            tensors[name] = tensor
    return tensors


def _layer_bytes(hidden: int, intermediate: int, element: int) -> int:
    return (4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden) * element


def synthetic_shapes(
    total_bytes: int, *, dtype: torch.dtype = torch.bfloat16
) -> dict[str, tuple[int, ...]]:
    """Llama-like tensor shapes adding up to `total_bytes` (within a fraction of a percent
    above a few MB; the vocabulary absorbs what whole layers leave over).

    >>> shapes = synthetic_shapes(8 << 20)
    >>> list(shapes)[:3]
    ['model.embed_tokens.weight', 'model.layers.0.input_layernorm.weight', 'model.layers.0.self_attn.q_proj.weight']
    """
    element = torch.empty((), dtype=dtype).element_size()
    hidden = 8192 * 2
    layers = 0
    while layers < 4 and hidden > 64:  # the widest hidden size that leaves at least four layers
        hidden //= 2
        intermediate = hidden * 7 // 2 // 64 * 64
        per_layer = _layer_bytes(hidden, intermediate, element)
        fixed = (2 * 8 * hidden * hidden + hidden) * element  # embeddings, head: vocab 8 x hidden
        layers = max(1, (total_bytes - fixed) // per_layer)
    # Embeddings and head take the rest, in whole rows of 8 tokens.
    rest = total_bytes - layers * per_layer - hidden * element
    vocab = max(8, rest // (2 * hidden * element) // 8 * 8)
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
