"""Declared weights per architecture (Hugging Face `model_type`): which tensors have a row per vocabulary entry
(input embeddings, the output head). The merge lets only these differ in row count between models (an expert with
added tokens). mergekit keeps the same knowledge as data per architecture; a name pattern is the fallback for an
architecture not declared here."""

from __future__ import annotations

import re

_DECODER = ("model.embed_tokens.weight", "lm_head.weight")  # Llama and the architectures that copied its names

VOCAB_TENSORS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(
        (
            "llama",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen2_moe",
            "qwen3",
            "qwen3_moe",
            "gemma",
            "gemma2",
            "phi",
            "phi3",
            "olmo",
            "olmo2",
            "starcoder2",
            "cohere",
            "granite",
            "deepseek_v2",
            "deepseek_v3",
            "stablelm",
        ),
        _DECODER,
    ),
    "internlm2": ("model.tok_embeddings.weight", "output.weight"),
    "gpt2": ("transformer.wte.weight", "lm_head.weight"),
    "gpt_neox": ("gpt_neox.embed_in.weight", "embed_out.weight"),
    "falcon": ("transformer.word_embeddings.weight", "lm_head.weight"),
    "opt": ("model.decoder.embed_tokens.weight", "lm_head.weight"),
    "bert": (
        "bert.embeddings.word_embeddings.weight",
        "cls.predictions.decoder.weight",
        "cls.predictions.bias",
        "cls.predictions.decoder.bias",
    ),
    "t5": ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"),
}
# undeclared architectures: names that usually hold vocabulary rows
FALLBACK_RE = re.compile(r"embed|lm_head|wte|word_emb|output")


def is_vocab_tensor(name: str, model_type: str | None) -> bool:
    """Whether tensor `name` of a `model_type` model has one row per vocabulary entry."""
    declared = VOCAB_TENSORS.get(str(model_type))
    if declared is not None:
        return name in declared
    return bool(FALLBACK_RE.search(name))
