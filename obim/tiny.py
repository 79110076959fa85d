"""Tiny random Llama checkpoints with a character-level tokenizer: inputs for tests, the demo and examples.

They are made locally (no download) with transformers, and are servable by vLLM's CPU backend (head_dim 32 here;
pass hidden/heads for 64). A "fine-tune" is the base plus seeded Gaussian noise: enough to exercise every merge path.
"""

from __future__ import annotations

from pathlib import Path

import torch

CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789 .,+-*=?:#\n")


def make_tokenizer(extra_tokens: int = 0, chars: str | list[str] = CHARS):
    """A character-level Hugging Face tokenizer (tokenizers' WordLevel over single characters), saveable as
    tokenizer.json and loadable offline with AutoTokenizer. Ids: <pad> 0, <s> 1, </s> 2, <unk> 3, then chars."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
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
    """A tiny LlamaForCausalLM; with `base`, its weights are the base's plus seeded N(0, scale²) noise (a
    'fine-tune'; rows the base lacks, e.g. an added token, are noise only)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // head_dim,
        num_key_value_heads=hidden // head_dim,
        head_dim=head_dim,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
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
