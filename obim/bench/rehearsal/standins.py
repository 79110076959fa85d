"""Stand-ins for the real experiments' models: tiny checkpoints of the real classes (LlamaForCausalLM for Llama-2-13B
and its three experts; Qwen2ForCausalLM with grouped-query attention and q/k/v biases for Qwen2-7B and its
continued-pretraining checkpoints). Each config.json keeps the real model's keys, dtype and ratios (head size, MLP
ratio, KV groups, norm eps, RoPE base, context length); only the widths, the depth and the vocabulary shrink. The
tokenizers are real subword tokenizers trained here with the `tokenizers` library on the mirror's own texts, with
the real special tokens. The files are laid out as the hub repos lay them out: the base in sharded safetensors, the
WizardLM/WizardMath/code-alpaca experts in sharded pytorch_model-*.bin (as those repos ship them), the code expert
with one extra [PAD] row (32001 vs 32000 in the real one, as Stanford Alpaca's training code adds it).

The base is pretrained briefly on the mixed corpus; each expert is a short real fine-tune of the base on its own
domain's texts (the Qwen2 checkpoints: one continued-pretraining run, saved every few steps), so that task vectors
carry structure and a merge changes scores. Deterministic for a seed on one machine (CPU training).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

# The real models' config.json values the stand-ins keep (hub configs of meta-llama/Llama-2-13b-hf and
# Qwen/Qwen2-7B); sizes are replaced by STANDIN_SIZES, keeping head size ratios.
LLAMA2_13B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_act": "silu",
    "hidden_size": 5120,
    "intermediate_size": 13824,
    "num_attention_heads": 40,
    "num_key_value_heads": 40,
    "num_hidden_layers": 40,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "initializer_range": 0.02,
    "pretraining_tp": 1,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "vocab_size": 32000,
    "torch_dtype": "float16",
}
QWEN2_7B = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_act": "silu",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "num_hidden_layers": 28,
    "max_position_embeddings": 131072,
    "max_window_layers": 28,
    "sliding_window": 131072,
    "use_sliding_window": False,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "initializer_range": 0.02,
    "attention_dropout": 0.0,
    "tie_word_embeddings": False,
    "vocab_size": 152064,
    "torch_dtype": "bfloat16",
}


@dataclass(frozen=True)
class Size:
    """A stand-in's widths: heads of 32 (vLLM's CPU attention accepts 32, not 16), the real MLP ratio and KV groups."""

    heads: int
    layers: int
    vocab: int  # the tokenizer's trained vocabulary (specials and byte tokens included)


LLAMA_SIZE = Size(heads=4, layers=2, vocab=1024)  # MHA: 4 heads, 4 KV heads
QWEN_SIZE = Size(heads=7, layers=2, vocab=1024)  # 28:4 = 7 query heads per KV head, as Qwen2-7B


def standin_config(real: dict, size: Size, vocab_size: int) -> dict:
    """The real config with the sizes scaled down: head_dim 32, the same heads-per-KV-head, the same MLP ratio."""
    head_dim = real["hidden_size"] // real["num_attention_heads"]
    groups = real["num_attention_heads"] // real["num_key_value_heads"]
    hidden = size.heads * 32
    cfg = dict(real)
    cfg.update(
        hidden_size=hidden,
        intermediate_size=round(real["intermediate_size"] / real["hidden_size"] * hidden),
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads // groups,
        num_hidden_layers=size.layers,
        vocab_size=vocab_size,
    )
    if "max_window_layers" in cfg:
        cfg["max_window_layers"] = size.layers
    if head_dim != 128:  # both real models; ours are 32
        raise ValueError(f"{real['architectures'][0]}: head size {head_dim}, expected 128")
    return cfg


# ----------------------------------------------------------------------------------------------- tokenizers

LLAMA_SPECIALS = ["<unk>", "<s>", "</s>"]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2's chat template (tokenizer_config.json of Qwen/Qwen2-7B), the ChatML form its instruct models use
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def llama_tokenizer(texts: list[str], vocab_size: int):
    """Llama-2's tokenizer shape: SentencePiece-style BPE ('▁' for spaces, a leading '▁' on the first word) with
    byte fallback (<0x00>..<0xFF> at ids 3..258), <unk> 0, <s> 1, </s> 2, BOS added; trained on `texts`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=LLAMA_SPECIALS + byte_tokens, show_progress=False, min_frequency=2
    )
    tok.train_from_iterator(texts, trainer)
    model = json.loads(tok.to_str())["model"]
    return LlamaTokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]], add_bos_token=True)


def qwen2_tokenizer(texts: list[str], vocab_size: int):
    """Qwen2's tokenizer shape: byte-level BPE over the 256 byte symbols, then <|endoftext|> (BOS-less; EOS and
    pad), <|im_start|>, <|im_end|>; trained on `texts`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(QWEN_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        min_frequency=2,
    )
    tok.train_from_iterator(texts, trainer)
    model = json.loads(tok.to_str())["model"]
    t = Qwen2Tokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]])
    t.add_special_tokens({"additional_special_tokens": QWEN_SPECIALS[1:]})
    t.chat_template = QWEN_CHAT_TEMPLATE
    return t


# ------------------------------------------------------------------------------------------------- training


def packed(tok, texts: list[str], rows: int, length: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless packed LM batches over `texts` in a seeded order (documents end with the EOS token)."""
    rng = random.Random(seed)
    order: list[str] = []
    buf: list[int] = []
    while True:
        while len(buf) < rows * length:
            if not order:
                order = list(texts)
                rng.shuffle(order)
            buf += [*tok(order.pop(), add_special_tokens=False).input_ids, tok.eos_token_id]
        x = torch.tensor(buf[: rows * length]).view(rows, length)
        del buf[: rows * length]
        yield {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}


def fit(model, tok, texts: list[str], steps: int, seed: int, lr: float, progress: bool, desc: str) -> float:
    """Train in place on `texts` (the zoo's loop: AdamW, one-cycle); returns the last smoothed loss."""
    from obim.bench.zoo.train import train

    torch.manual_seed(seed)
    out = train(
        model, packed(tok, texts, 8, 64, seed), steps, answer_only=False, lr=lr, seed=seed, desc=desc, progress=progress
    )
    return out["loss"]


# ---------------------------------------------------------------------------------------------------- saving


def _shards(sd: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    names = list(sd)
    per = math.ceil(len(names) / n)
    return [{k: sd[k] for k in names[i : i + per]} for i in range(0, len(names), per)]


def save_checkpoint(model, tok, out: Path, config: dict, fmt: str, shards: int = 2) -> Path:
    """Save as the hub repo ships it: config.json with the real config's keys (`config`: `torch_dtype`, `rope_theta`,
    as the hub's files have them, not transformers 5's renames; the vocabulary as the embedding has it), weights in
    that dtype as `safetensors` (model-0000i-of-0000n.safetensors + index) or `bin` (pytorch_model-0000i-of-0000n.bin
    + index, torch.save'd state dicts) in `shards` files, the tokenizer."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, config["torch_dtype"])
    cfg = {**config, "vocab_size": model.get_input_embeddings().weight.shape[0]}
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    sd = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    parts = _shards(sd, shards)
    weight_map, total = {}, 0
    stem, ext, index = ("model", "safetensors", "model.safetensors.index.json")
    if fmt == "bin":
        stem, ext, index = ("pytorch_model", "bin", "pytorch_model.bin.index.json")
    for i, part in enumerate(parts, 1):
        name = f"{stem}-{i:05d}-of-{len(parts):05d}.{ext}"
        if fmt == "bin":
            torch.save(part, out / name)
        else:
            save_file(part, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
        total += sum(t.numel() * t.element_size() for t in part.values())
    (out / index).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    tok.save_pretrained(out)
    return out


def add_pad_row(model, tok) -> None:
    """Stanford Alpaca's smart_tokenizer_and_embedding_resize: a [PAD] token appended to the vocabulary, its input
    and output embedding rows the mean of the others (how code-alpaca's 32001 rows came to be)."""
    tok.add_special_tokens({"pad_token": "[PAD]"})
    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    with torch.no_grad():
        for w in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            w[old:] = w[:old].mean(0, keepdim=True)


# ---------------------------------------------------------------------------------------------------- the set

LLAMA_BASE = "meta-llama/Llama-2-13b-hf"
LLAMA_EXPERTS = {  # hub id -> (the corpus domain it is fine-tuned on, its file format, extra pad row)
    "WizardLMTeam/WizardLM-13B-V1.2": ("lm", "bin", False),
    # WizardMath-13B-V1.0 also has 32001 rows (an added pad token), as the code expert
    "WizardLMTeam/WizardMath-13B-V1.0": ("math", "bin", True),
    "layoric/llama-2-13b-code-alpaca": ("code", "bin", True),
}
QWEN_BASE = "Qwen/Qwen2-7B"
QWEN_CHECKPOINTS = 6  # ckpt-1 .. ckpt-6, as qwen2_7b_pt names them
STEPS = {"pretrain": 300, "finetune": 120, "checkpoint": 40}  # training steps: sized for CPU minutes, not quality


def _new(cls_name: str, cfg: dict, seed: int):
    import transformers

    config_cls = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))
    c = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "torch_dtype")}
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(config_cls(**c))
    return model.float()


def build_llama(out: dict[str, Path], corpora: dict[str, list[str]], seed: int, progress: bool) -> dict[str, float]:
    """Llama-2-13B's stand-in base, pretrained on every domain's texts, and its three experts, each fine-tuned from
    it on its domain (lm: instructions, math: GSM8K/MATH, code: MBPP/CodeAlpaca). Returns each model's last loss."""
    import copy

    every = [t for texts in corpora.values() for t in texts]
    tok = llama_tokenizer(every, LLAMA_SIZE.vocab)
    cfg = standin_config(LLAMA2_13B, LLAMA_SIZE, len(tok))
    base = _new("LlamaForCausalLM", cfg, seed)
    losses = {LLAMA_BASE: fit(base, tok, every, STEPS["pretrain"], seed, 3e-3, progress, "llama base")}
    save_checkpoint(base, tok, out[LLAMA_BASE], cfg, "safetensors")
    for i, (repo, (domain, fmt, pad)) in enumerate(LLAMA_EXPERTS.items(), 1):
        model, t = copy.deepcopy(base), copy.deepcopy(tok)
        if pad:
            add_pad_row(model, t)
        losses[repo] = fit(model, t, corpora[domain], STEPS["finetune"], seed + i, 1e-3, progress, domain)
        save_checkpoint(model, t, out[repo], cfg, fmt)
    return losses


def build_qwen(
    base_dir: Path, ckpt_dirs: list[Path], corpora: dict[str, list[str]], seed: int, progress: bool
) -> dict[str, float]:
    """Qwen2-7B's stand-in, pretrained on the English domains, and its continued pretraining on English, Chinese
    and Japanese text saved every STEPS['checkpoint'] steps (the paper's checkpoints are not public: ours stand in
    for a user's own)."""
    import copy

    every = [t for texts in corpora.values() for t in texts]
    tok = qwen2_tokenizer(every, QWEN_SIZE.vocab)
    # Qwen2-7B pads its embedding past the tokenizer (152064 rows for 151646 tokens): a multiple of 64 here
    cfg = standin_config(QWEN2_7B, QWEN_SIZE, 64 * math.ceil(len(tok) / 64))
    cfg.update(bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=tok.eos_token_id)
    base = _new("Qwen2ForCausalLM", cfg, seed)
    english = [t for d, texts in corpora.items() if d not in ("zh", "ja") for t in texts]
    losses = {QWEN_BASE: fit(base, tok, english, STEPS["pretrain"], seed, 3e-3, progress, "qwen2 base")}
    save_checkpoint(base, tok, base_dir, cfg, "safetensors")
    model = copy.deepcopy(base)
    for i, d in enumerate(ckpt_dirs, 1):
        losses[d.name] = fit(model, tok, every, STEPS["checkpoint"], seed + i, 1e-3, progress, d.name)
        save_checkpoint(model, tok, d, cfg, "safetensors")
    return losses
