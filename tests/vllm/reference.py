"""Greedy reference outputs: a fresh vLLM engine per checkpoint, in a child process.

    python -m tests.vllm.reference OUT.json DIR [DIR ...]     -> {"DIR": [[token, ...], ...]}

Each engine runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0, about 3 s to start instead of
about 17 s) and is shut down before the next one starts. Outputs are the greedy tokens of
`PROMPTS` (temperature 0, `MAX_TOKENS` tokens, EOS ignored): what a subscribing engine must
reproduce token for token after it swaps a version in.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["MAX_TOKENS", "engine_kwargs", "greedy", "main"]

MAX_TOKENS = 16


def engine_kwargs(model: Path | str, **overrides: Any) -> dict[str, Any]:
    """The engine settings every vLLM test uses (the reference engines included)."""
    kwargs: dict[str, Any] = {
        "model": str(model),
        "enforce_eager": True,
        "dtype": "float32",
        "max_model_len": 256,
        "seed": 0,
    }
    kwargs.update(overrides)
    return kwargs


def greedy(generate: Any, prompts: tuple[str, ...] | None = None) -> list[list[int]]:
    """Greedy token ids of `prompts` (default: tiny_llama.PROMPTS) through `generate`."""
    from vllm import SamplingParams

    from tests.vllm.tiny_llama import PROMPTS

    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = generate(list(prompts or PROMPTS), params, use_tqdm=False)
    return [list(output.outputs[0].token_ids) for output in outputs]


def main(argv: list[str]) -> int:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM

    out, models = Path(argv[0]), argv[1:]
    results: dict[str, list[list[int]]] = {}
    for model in models:
        llm = LLM(**engine_kwargs(model))
        results[model] = greedy(llm.generate)
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    out.write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
