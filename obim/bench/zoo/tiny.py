"""Tiny Llamas with a character-level tokenizer, made locally with transformers (no download): the one builder of
the toy zoo's untrained models (obim.bench.zoo.train.new_model) and of the random checkpoints the tests, the demo
and the benchmarks merge (`make_llama`: a base, or a 'fine-tune' = the base plus seeded Gaussian noise, enough to
exercise every merge path).

The merging library never imports this module (tests/test_layout.py builds its models here, then merges them with
obim.bench blocked). vLLM's CPU attention (vllm 0.32) accepts head_dim 32, 64, 80, 96, 112, 128, ..., not 16: a
model meant for eval=vllm_cpu needs one of those (the zoo's recipe: 4 heads of 32; make_llama's default: 32).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

# make_tokenizer's default characters (the zoo's tokenizer has its own: obim.bench.zoo.data.CHARS)
CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789 .,+-*=?:#\n")
SPECIAL = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}  # ids every tiny tokenizer and model share
PAD_ID, BOS_ID, EOS_ID = SPECIAL["<pad>"], SPECIAL["<s>"], SPECIAL["</s>"]


def make_tokenizer(extra_tokens: int = 0, chars: str | list[str] = CHARS):
    """A character-level Hugging Face tokenizer (tokenizers' WordLevel over single characters), saveable as
    tokenizer.json and loadable offline with AutoTokenizer. Ids: <pad> 0, <s> 1, </s> 2, <unk> 3, then chars, then
    `extra_tokens` <extra_i>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = dict(SPECIAL)
    for c in chars:
        vocab[c] = len(vocab)
    for i in range(extra_tokens):
        vocab[f"<extra_{i}>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


@dataclass(frozen=True)
class ModelShape:
    """A tiny Llama's shape; head_dim is hidden / heads (see the module's note on vLLM's head sizes)."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    max_positions: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def new_llama(shape: ModelShape, seed: int, *, vocab: int, tie: bool = False, rms_norm_eps: float = 1e-6):
    """A randomly initialised LlamaForCausalLM of `shape` (torch's global generator seeded with `seed`, then
    transformers' initialisation); pad/bos/eos are the tiny tokenizers' ids."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        head_dim=shape.head_dim,
        max_position_embeddings=shape.max_positions,
        tie_word_embeddings=tie,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        rms_norm_eps=rms_norm_eps,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def make_llama(
    path: Path,
    seed: int,
    *,
    vocab: int = 64,
    layers: int = 2,
    hidden: int = 64,
    head_dim: int = 32,
    base: Path | None = None,
    scale: float = 0.02,
    extra_tokens: int = 0,
    tie: bool = False,
    safe: bool = True,
) -> Path:
    """A tiny random LlamaForCausalLM (hidden / head_dim heads, intermediate 2 * hidden, 128 positions) saved with
    make_tokenizer(extra_tokens) in `path`; with `base`, its weights are the base's plus seeded N(0, scale²) noise (a
    'fine-tune'; rows the base lacks, e.g. an added token, are noise only)."""
    from transformers import LlamaForCausalLM

    if hidden % head_dim:
        raise ValueError(f"hidden {hidden} is not a multiple of head_dim {head_dim}")
    shape = ModelShape(
        hidden=hidden, layers=layers, heads=hidden // head_dim, intermediate=2 * hidden, max_positions=128
    )
    model = new_llama(shape, seed, vocab=vocab, tie=tie)
    if base is not None:
        ref = LlamaForCausalLM.from_pretrained(base)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            sd = ref.state_dict()
            for name, p in model.named_parameters():
                src = sd[name]
                rows = min(src.shape[0], p.shape[0])
                noise = torch.randn(p.shape, generator=g) * scale
                noise[:rows] += src[:rows]
                p.copy_(noise)
    model.save_pretrained(path, safe_serialization=safe)
    make_tokenizer(extra_tokens).save_pretrained(path)
    return path
