"""The `str <-> torch.dtype` table on the publisher side (schemas stay torch-free)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from schemas.manifest import DType

__all__ = ["TORCH_DTYPES", "dtype_name"]

TORCH_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "float64": torch.float64,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
}
_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> DType:
    try:
        return _NAMES[dtype]  # type: ignore[return-value]
    except KeyError:
        raise TypeError(f"weightstream cannot publish tensors of dtype {dtype}") from None
