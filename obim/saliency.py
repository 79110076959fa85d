"""OBM saliency: the per-input-feature statistics of every linear layer ("hdiag") and the scores built on them.

hdiag[W][j] = mean over validation tokens (padding excluded) of x_j², x the input of the nn.Linear owning W when the
model runs forward on its own validation set: the diagonal of the layer-wise Hessian 2·E[x xᵀ] up to a constant.
The saliency of entry (i, j) of a task vector δ is δ[i, j]² · hdiag[W][j]; tensors that are not linear weights get
uniform random scores, as the paper prunes them randomly.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .checkpoint import Checkpoint, atomic_write_file
from .context import TensorContext
from .errors import ObimError

Score = Callable[[torch.Tensor, int, TensorContext], torch.Tensor]


def magnitude(delta: torch.Tensor, i: int, ctx: TensorContext) -> torch.Tensor:
    return delta.abs()


def saliency(delta: torch.Tensor, i: int, ctx: TensorContext) -> torch.Tensor:
    h = ctx.hdiag[i]
    if h is None:
        return ctx.rand(i, delta.shape)
    return delta.square() * h.to(delta.device)


# ------------------------------------------------------------------------------------------- the hdiag file


def load_hdiag(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise ObimError(f"{path}: hdiag file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            out = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ObimError(f"{path}: unreadable hdiag safetensors file ({e})") from None
    for k, v in out.items():
        if v.dim() != 1 or not v.is_floating_point():
            raise ObimError(f"{path}: hdiag tensor {k} must be a 1-D float vector, got {list(v.shape)} {v.dtype}")
        if not torch.isfinite(v).all() or (v < 0).any():
            raise ObimError(f"{path}: hdiag tensor {k} has negative, NaN or Inf entries")
    return {k: v.float() for k, v in out.items()}


def check_hdiag(hdiag: dict[str, torch.Tensor], ckpt: Checkpoint, source: str) -> None:
    """Every statistic must name a 2-D weight of the model whose input dimension matches its length."""
    for name, vec in hdiag.items():
        info = ckpt.tensors.get(name)
        if info is None:
            raise ObimError(f"{source}: hdiag tensor {name} is not a tensor of model '{ckpt.spec}'")
        if len(info.shape) != 2 or info.shape[1] != vec.numel():
            raise ObimError(f"{source}: hdiag tensor {name} has length {vec.numel()}, but the model's weight "
                            f"has shape {list(info.shape)} (expected length = its input dimension)")


def save_hdiag(hdiag: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    tensors = {k: v.float().contiguous() for k, v in sorted(hdiag.items())}
    atomic_write_file(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


# ------------------------------------------------------------------------------------------ computing it


def _dtype(name: str | None) -> torch.dtype | str:
    if name in (None, "auto"):
        return "auto"
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype):
        raise ObimError(f"dtype: unknown torch dtype '{name}'")
    return dt


def compute_hdiag(
    model: str,
    texts: Sequence[str],
    *,
    max_length: int = 512,
    batch_size: int = 8,
    device: str = "cpu",
    dtype: str | None = None,
    progress: bool = True,
    source: str = "",
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Run `model` (a directory or hub id) forward over `texts` and return (hdiag, metadata).

    The model is loaded once, in `dtype` (None: its own), on `device`; statistics accumulate in float64.
    """
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .checkpoint import resolve_model_dir

    if not texts:
        raise ObimError(f"validation set {source or '(texts)'} is empty: saliency needs at least one sample")
    if max_length < 1 or batch_size < 1:
        raise ObimError("max_length and batch_size must be positive")
    path = resolve_model_dir(model)
    dev = torch.device(device)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    tok.padding_side = "right"
    if dev.type == "cuda" and dev.index is None and torch.cuda.device_count() > 1:
        # a model larger than one GPU (the paper: 13B on 2 GPUs): layers spread over all of them (accelerate)
        net = AutoModelForCausalLM.from_pretrained(path, dtype=_dtype(dtype), device_map="auto").eval()
        dev = net.get_input_embeddings().weight.device
    else:
        net = AutoModelForCausalLM.from_pretrained(path, dtype=_dtype(dtype)).to(dev).eval()

    shared_inputs = {id(m.weight) for m in net.modules() if isinstance(m, torch.nn.Embedding)}
    sums: dict[str, torch.Tensor] = {}
    state: dict = {"mask": None, "last": (None, None)}

    def hook_for(wname: str):
        def hook(module, args):
            x = args[0]
            last_x, acc = state["last"]
            if x is not last_x:  # q/k/v (gate/up) run back to back on one input: square it once
                sel = x[state["mask"].to(x.device)] if x.dim() == 3 else x.reshape(-1, x.shape[-1])
                acc = sel.double().square().sum(0)
                state["last"] = (x, acc)  # holding x keeps the identity test sound
            sums[wname] = sums[wname] + acc if wname in sums else acc.clone()
        return hook

    handles = []
    for mname, mod in net.named_modules():
        if isinstance(mod, torch.nn.Linear) and id(mod.weight) not in shared_inputs:  # tied lm_head: random, as embeddings
            handles.append(mod.register_forward_pre_hook(hook_for(f"{mname}.weight" if mname else "weight")))

    tokens = 0
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            bar = tqdm(range(0, len(texts), batch_size), desc=f"saliency {Path(str(model)).name}", unit="batch",
                       disable=not progress)
            for start in bar:
                enc = tok(list(texts[start : start + batch_size]), return_tensors="pt", padding=True,
                          truncation=True, max_length=max_length).to(dev)
                mask = enc["attention_mask"].bool()
                state["mask"], state["last"] = mask, (None, None)
                tokens += int(mask.sum())
                net(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    finally:
        state["last"] = (None, None)
        for h in handles:
            h.remove()
    elapsed = time.perf_counter() - t0
    if tokens == 0:
        raise ObimError(f"validation set {source}: no tokens after tokenization")
    hdiag = {k: (v / tokens).float().cpu() for k, v in sums.items()}
    meta = {
        "model": str(model), "data": str(source), "samples": str(len(texts)), "tokens": str(tokens),
        "max_length": str(max_length), "seconds": f"{elapsed:.3f}",
        "seconds_per_sample": f"{elapsed / len(texts):.5f}",
    }
    del net
    return hdiag, meta
