"""Shared fixtures: tiny Llama models made with transformers, with a character-level tokenizer."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789 .,+-*=?:#\n")


def make_tokenizer(extra_tokens: int = 0):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for c in CHARS:
        vocab[c] = len(vocab)
    for i in range(extra_tokens):
        vocab[f"<extra_{i}>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def make_llama(path: Path, seed: int, *, vocab: int = 64, layers: int = 2, hidden: int = 64, base: Path | None = None,
               scale: float = 0.02, extra_tokens: int = 0, tie: bool = False, safe: bool = True) -> Path:
    """A tiny LlamaForCausalLM; with `base`, its weights are the base's plus seeded noise (a 'fine-tune')."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=hidden // 32, num_key_value_heads=hidden // 32, head_dim=32,
                      max_position_embeddings=128, tie_word_embeddings=tie, pad_token_id=0, bos_token_id=1,
                      eos_token_id=2)
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
                p.copy_(torch.randn(p.shape, generator=g) * scale + p.detach() * 0)
                p[:rows] += src[:rows]
    model.save_pretrained(path, safe_serialization=safe)
    make_tokenizer(extra_tokens).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> dict[str, Path]:
    """A base and three 'fine-tunes' of it, as safetensors model directories."""
    root = tmp_path_factory.mktemp("zoo")
    base = make_llama(root / "base", 0)
    out = {"base": base}
    for i, name in enumerate(["lm", "math", "code"], 1):
        out[name] = make_llama(root / name, i, base=base)
    return out


@pytest.fixture(scope="session")
def val_jsonl(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("val") / "val.jsonl"
    lines = ["what is 2+3? 5", "the cat sat on the mat.", "a", "def f(x): return x*2", "12*3=36 #### 36",
             "hello world, this is a longer sample to check padding"]
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    return p
