"""Training tiny Llamas on the toy tasks: a character tokenizer, pretraining (loss on every token) and SFT (loss on
the answer tokens only), AdamW with a one-cycle schedule, deterministic for a seed on one machine."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from .data import CHARS
from .tiny import ModelShape, make_tokenizer, new_llama


def tokenizer():
    return make_tokenizer(chars=CHARS)


def new_model(shape: ModelShape, seed: int):
    """An untrained zoo model: the tiny builder's Llama over the zoo's tokenizer (vocabulary padded to a multiple
    of 8), untied, rms_norm_eps 1e-5."""
    return new_llama(shape, seed, vocab=8 * math.ceil(len(tokenizer()) / 8), rms_norm_eps=1e-5)


def encode_batch(tok, pairs: list[tuple[str, str]], answer_only: bool, max_len: int) -> dict[str, torch.Tensor]:
    """(prompt, answer) pairs -> input_ids/attention_mask/labels; labels are -100 on padding (and on the prompt
    when answer_only). Sequences end with </s>."""
    seqs, starts = [], []
    for prompt, answer in pairs:
        p = tok(prompt, add_special_tokens=False).input_ids
        a = [*tok(answer, add_special_tokens=False).input_ids, tok.eos_token_id]
        ids = (p + a)[:max_len]
        seqs.append(ids)
        starts.append(min(len(p), len(ids)) if answer_only else 0)
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, st) in enumerate(zip(seqs, starts, strict=True)):
        input_ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        labels[i, st : len(s)] = torch.tensor(s[st:])
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def packed_batches(texts: Iterator[str], rows: int, length: int) -> Iterator[dict[str, torch.Tensor]]:
    """Pretraining batches as LLM pretraining packs them: documents (each ending with </s>) concatenated and cut
    into `rows` rows of `length` tokens, no padding (short documents would otherwise waste most of each row)."""
    tok = tokenizer()
    buf: list[int] = []
    while True:
        while len(buf) < rows * length:
            buf += [*tok(next(texts), add_special_tokens=False).input_ids, tok.eos_token_id]
        x = torch.tensor(buf[: rows * length]).view(rows, length)
        del buf[: rows * length]
        yield {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}


def frozen_names(model, frozen: tuple[str, ...]) -> set[str]:
    """Parameters whose name holds one of `frozen` (e.g. 'embed_tokens', 'lm_head', 'norm')."""
    return {n for n, _ in model.named_parameters() if any(f in n for f in frozen)}


def train(
    model,
    batches: Iterator[list[tuple[str, str]] | dict[str, torch.Tensor]],
    steps: int,
    *,
    answer_only: bool,
    lr: float = 3e-3,
    seed: int = 0,
    desc: str = "train",
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
    frozen: tuple[str, ...] = (),
) -> dict[str, float]:
    """Train in place for `steps` batches ((prompt, answer) pairs, or already-encoded tensors); parameters named in
    `frozen` keep their values. Returns {'loss': last smoothed loss, 'seconds': ...}."""
    from tqdm.auto import tqdm

    tok = tokenizer()
    torch.manual_seed(seed)
    skip = frozen_names(model, frozen)
    params = [p for n, p in model.named_parameters() if n not in skip]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    t0 = time.perf_counter()
    smooth = None
    bar = tqdm(range(steps), desc=desc, unit="step", disable=not progress, leave=False)
    for step in bar:
        batch = next(batches)
        if not isinstance(batch, dict):
            batch = encode_batch(tok, batch, answer_only, model.config.max_position_embeddings)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        smooth = loss.item() if smooth is None else 0.95 * smooth + 0.05 * loss.item()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{smooth:.3f}")
        if on_step is not None:
            on_step(step + 1)
    model.eval()
    return {"loss": float(smooth or 0.0), "seconds": time.perf_counter() - t0}


def save(model, path: Path) -> None:
    model.save_pretrained(path, safe_serialization=True)
    tokenizer().save_pretrained(path)
