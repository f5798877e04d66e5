"""Checkpoint loading and the synthetic model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from publishers.sources import load_checkpoint, synthetic_llama, synthetic_shapes


def test_checkpoint_directory_loads_every_file_in_order(tmp_path: Path):
    save_file(
        {"model.layers.1.w": torch.ones(2), "lm_head.weight": torch.zeros(3)},
        str(tmp_path / "b.safetensors"),
    )
    save_file({"model.embed.weight": torch.arange(4.0)}, str(tmp_path / "a.safetensors"))
    tensors = load_checkpoint(tmp_path)
    assert list(tensors) == ["model.embed.weight", "lm_head.weight", "model.layers.1.w"]
    assert torch.equal(tensors["model.embed.weight"], torch.arange(4.0))


def test_single_file_checkpoint_loads(tmp_path: Path):
    save_file({"x": torch.ones(1, dtype=torch.bfloat16)}, str(tmp_path / "m.safetensors"))
    assert load_checkpoint(tmp_path / "m.safetensors")["x"].dtype == torch.bfloat16


def test_tensor_in_two_files_is_refused(tmp_path: Path):
    save_file({"x": torch.ones(1)}, str(tmp_path / "a.safetensors"))
    save_file({"x": torch.ones(1)}, str(tmp_path / "b.safetensors"))
    with pytest.raises(ValueError, match="appears in two files"):
        load_checkpoint(tmp_path)


def test_empty_directory_says_what_is_missing(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"no \.safetensors files"):
        load_checkpoint(tmp_path)


def test_synthetic_versions_are_reproducible_and_distinct():
    a1, again, a2 = (synthetic_llama(1 << 20, version=v) for v in (1, 1, 2))
    assert all(torch.equal(a1[n], again[n]) for n in a1)
    assert not any(torch.equal(a1[n], a2[n]) for n in a1 if a1[n].numel() > 16)


@pytest.mark.parametrize("size", [1 << 20, 64 << 20, 1 << 30])
def test_synthetic_shapes_come_close_to_the_budget(size: int):
    shapes = synthetic_shapes(size)
    total = sum(torch.Size(s).numel() for s in shapes.values()) * 2
    assert 0.5 * size <= total <= 1.5 * size or size < (8 << 20)
    assert any(".layers.3." in name for name in shapes), "at least four layers"
