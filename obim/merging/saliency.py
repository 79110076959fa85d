"""OBM saliency: the per-input-feature statistics of every linear layer ("hdiag") and the scores built on them.

hdiag[W][j] = mean over validation tokens (padding excluded) of x_j², x the input of the nn.Linear owning W when the
model runs forward on its own validation set: the diagonal of the layer-wise Hessian 2·E[x xᵀ] up to a constant.
The saliency of entry (i, j) of a task vector δ is δ[i, j]² · hdiag[W][j]; tensors that are not linear weights get
uniform random scores, as the paper prunes them randomly.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .checkpoint import Checkpoint
from .checks import device_check, require
from .context import TensorContext
from .errors import ObimError
from .safeio import check_regular
from .staging import atomic_write_file

Score = Callable[[torch.Tensor, int, TensorContext], torch.Tensor]
# bump when compute_hdiag's statistics change for the same model and texts: cached hdiag files are keyed by it
# (2: files record the model's fingerprint)
STATS_VERSION = 2


def magnitude(delta: torch.Tensor, i: int, ctx: TensorContext) -> torch.Tensor:
    return delta.abs()


def saliency(delta: torch.Tensor, i: int, ctx: TensorContext) -> torch.Tensor:
    h = ctx.stats[i]
    if h is None:
        return ctx.rand(i, delta.shape)
    return delta.square() * h.to(delta.device)


# ------------------------------------------------------------------------------------------- the hdiag file


def load_hdiag(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(statistics, metadata) of an hdiag file, every vector checked 1-D, finite and non-negative."""
    path = Path(path)
    check_regular(path, "hdiag file")
    try:
        with safe_open(str(path), framework="pt") as f:
            out = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (safe_open has keys() but no __iter__)
            meta = dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise ObimError(f"{path}: unreadable hdiag safetensors file ({e})") from None
    for k, v in out.items():
        if v.dim() != 1 or not v.is_floating_point():
            raise ObimError(f"{path}: hdiag tensor {k} must be a 1-D float vector, got {list(v.shape)} {v.dtype}")
        if not torch.isfinite(v).all() or (v < 0).any():
            raise ObimError(f"{path}: hdiag tensor {k} has negative, NaN or Inf entries")
    return {k: v.float() for k, v in out.items()}, meta


def _linear_weights(net: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The layers OBM scores: every nn.Linear by its weight's name, except one sharing its weight with an
    embedding (a tied lm_head), which is scored randomly as the embeddings are."""
    shared = {id(m.weight) for m in net.modules() if isinstance(m, torch.nn.Embedding)}
    return {
        f"{n}.weight" if n else "weight": m
        for n, m in net.named_modules()
        if isinstance(m, torch.nn.Linear) and id(m.weight) not in shared
    }


def _architecture_cache(ckpt: Checkpoint) -> Path | None:
    """Where the linear weights of this architecture are remembered: keyed by config.json's bytes, the tensor names
    and transformers' version (building a model on the meta device first imports transformers' model code, ~4 s
    per process, more than a 271M-parameter merge's own I/O)."""
    import os
    from importlib.metadata import PackageNotFoundError, version

    try:
        config = (ckpt.dir / "config.json").read_bytes()
        tv = version("transformers")
    except (OSError, PackageNotFoundError):
        return None
    key = hashlib.sha256(json.dumps([config.hex(), sorted(ckpt.tensors), tv]).encode()).hexdigest()[:32]
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "obim" / "architectures"
    return root / f"{key}.json"


def expected_hdiag(ckpt: Checkpoint) -> list[str]:
    """The tensors an hdiag file of this model must cover: its linear weights, read from the architecture built
    on the meta device (no memory, no weights), and remembered per architecture (_architecture_cache). Where
    transformers cannot build it, or names its weights otherwise than the checkpoint, every 2-D float weight that
    is not an embedding / vocabulary matrix."""
    cache = _architecture_cache(ckpt)
    if cache is not None and cache.is_file():
        try:
            names = json.loads(cache.read_text())
        except (OSError, ValueError):
            names = None
        if isinstance(names, list) and all(isinstance(n, str) and n in ckpt.tensors for n in names):
            return names
    names = _linear_or_shape_rule(ckpt)
    if cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_file(cache, lambda tmp: tmp.write_text(json.dumps(names)))
        except OSError:  # a read-only home: only slower
            pass
    return names


def _linear_or_shape_rule(ckpt: Checkpoint) -> list[str]:
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(ckpt.dir)
        with torch.device("meta"):
            names = sorted(_linear_weights(AutoModelForCausalLM.from_config(config)))
        if all(n in ckpt.tensors for n in names):  # empty for Conv1D models (GPT-2): nothing is hooked either
            return names
    except Exception:  # custom code, unknown architecture: the shape rule below
        pass
    vocab = ckpt.config.get("vocab_size")
    return sorted(
        n
        for n, t in ckpt.tensors.items()
        if len(t.shape) == 2
        and t.dtype.is_floating_point
        and n.endswith("weight")
        and t.shape[0] != vocab
        and not re.search(r"embed|wte|wpe|word_emb", n)
    )


def check_hdiag(hdiag: dict[str, torch.Tensor], meta: dict[str, str], ckpt: Checkpoint, source: str) -> None:
    """The statistics must come from this model (its fingerprint) and cover exactly its linear weights, each
    vector as long as the weight's input dimension: anything else would silently score some layers at random."""
    want = meta.get("model_fingerprint")
    if not want:
        raise ObimError(
            f"{source}: hdiag file records no model fingerprint (written by an older obim or another "
            f"tool); recompute it with obim-saliency for model '{ckpt.spec}'"
        )
    have = ckpt.fingerprint()
    if want != have:
        raise ObimError(
            f"{source}: hdiag statistics were computed for another model ({meta.get('model', '?')}, "
            f"fingerprint {want}), not for '{ckpt.spec}' (fingerprint {have})"
        )
    for name, vec in hdiag.items():
        info = ckpt.tensors.get(name)
        if info is None:
            raise ObimError(f"{source}: hdiag tensor {name} is not a tensor of model '{ckpt.spec}'")
        if len(info.shape) != 2 or info.shape[1] != vec.numel():
            raise ObimError(
                f"{source}: hdiag tensor {name} has length {vec.numel()}, but the model's weight "
                f"has shape {list(info.shape)} (expected length = its input dimension)"
            )
    unrouted = set(unrouted_weights(meta, ckpt, source))
    missing = [n for n in expected_hdiag(ckpt) if n not in hdiag and n not in unrouted]
    if missing:
        raise ObimError(
            f"{source}: hdiag covers {len(hdiag)} linear weights of model '{ckpt.spec}'; missing "
            f"{missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
        )


def unrouted_weights(meta: dict[str, str], ckpt: Checkpoint, source: str) -> list[str]:
    """The linear weights the file records as reached by no validation token (MoE experts the router never chose):
    absent from the file by design, scored at random by a merge. Each must be a 2-D tensor of the model."""
    try:
        names = json.loads(meta.get("unrouted", "[]"))
    except json.JSONDecodeError:
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ObimError(f"{source}: hdiag metadata `unrouted` is not a JSON list of tensor names")
    bad = [n for n in names if n not in ckpt.tensors or len(ckpt.tensors[n].shape) != 2]
    if bad:
        raise ObimError(
            f"{source}: hdiag metadata `unrouted` names {bad[0]}, not a linear weight of model '{ckpt.spec}'"
        )
    return names


def describe_unrouted(names: Sequence[str], first: int = 3) -> str:
    """'N linear weights got no validation tokens (a, b, c and K more)': the console's one-line warning."""
    shown = ", ".join(names[:first]) + (f" and {len(names) - first} more" if len(names) > first else "")
    return (
        f"{len(names)} linear weights got no validation tokens (never called, e.g. MoE experts the router never "
        f"chose): {shown}; a merge scores them at random, as tensors without statistics"
    )


def save_hdiag(hdiag: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    tensors = {k: v.float().contiguous() for k, v in sorted(hdiag.items())}
    atomic_write_file(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


# ------------------------------------------------------------------------------------------ computing it


LOAD_DTYPES = ("auto", "float32", "float16", "bfloat16")


def _dtype(name: str | None) -> torch.dtype | str:
    if name in (None, "auto"):
        return "auto"
    if name not in LOAD_DTYPES:  # an integer or float8 load runs the model on garbage, or not at all
        raise ObimError(f"dtype: expected one of {', '.join(LOAD_DTYPES)} to load the model in, got {name!r}")
    return getattr(torch, name)


@contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """With `enabled` False, transformers' and huggingface_hub's own bars ("Loading weights") are off for the block,
    and as they were afterwards."""
    if enabled:
        yield
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as tlog

    was = tlog.is_progress_bar_enabled(), are_progress_bars_disabled()
    tlog.disable_progress_bar()  # the hub's too
    try:
        yield
    finally:
        (tlog.enable_progress_bar if was[0] else tlog.disable_progress_bar)()
        (disable_progress_bars if was[1] else enable_progress_bars)()


def _load(what: str, path: Path, load):
    """transformers' loaders raise anything (ValueError, OSError, KeyError, TypeError...) on a corrupt model:
    one line naming the directory instead."""
    try:
        return load()
    except ObimError:
        raise
    except Exception as e:
        why = " ".join(str(e).split())
        why = why if len(why) <= 300 else why[:297] + "..."
        raise ObimError(f"{path}: cannot load the {what} with transformers ({type(e).__name__}: {why})") from None


def run_meta(
    model: str, source: str, samples: int, tokens: int, max_length: int, elapsed: float, fingerprint: str, texts
) -> dict[str, str]:
    """What every statistics file records of the run that made it (hdiag, gram, fisher)."""
    return {
        "model": str(model),
        "data": str(source),
        "samples": str(samples),
        "tokens": str(tokens),
        "max_length": str(max_length),
        "seconds": f"{elapsed:.3f}",
        "seconds_per_sample": f"{elapsed / samples:.5f}",
        "model_fingerprint": fingerprint,
        "texts_sha256": hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest(),
    }


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
    gram: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Run `model` (a directory or hub id) forward over `texts` and return (hdiag, metadata); with `gram`, each
    linear layer's full mean input Gram matrix E[x xᵀ] instead of its diagonal (RegMean's statistics).

    The model is loaded once, in `dtype` (None: its own), on `device`; statistics accumulate in float64.
    Linear weights no token reached (MoE experts never routed) have no statistics and are listed in
    metadata["unrouted"]. With `progress` False nothing is printed, transformers' own bars included.
    """
    from .checkpoint import open_checkpoint, resolve_model_dir

    require("device", device, device_check)
    if not texts:
        raise ObimError(f"validation set {source or '(texts)'} is empty: saliency needs at least one sample")
    if max_length < 1 or batch_size < 1:
        raise ObimError("max_length and batch_size must be positive")
    load_dtype = _dtype(dtype)
    path = resolve_model_dir(model)
    fingerprint = open_checkpoint(str(path)).fingerprint()  # config.json and every weight header checked first
    with _progress_bars(progress):
        return _compute(
            path,
            model,
            texts,
            fingerprint,
            max_length=max_length,
            batch_size=batch_size,
            device=device,
            load_dtype=load_dtype,
            progress=progress,
            source=source,
            gram=gram,
        )


def open_model(path: Path, device: str, load_dtype: torch.dtype | str):
    """(model in eval mode, tokenizer padding on the right, the device its inputs go to) of a checked directory:
    one line naming it on anything transformers raises, and a refusal where the checkpoint lacks a weight of its
    architecture (transformers would initialise it at random)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dev = torch.device(device)
    config = _load("model's config", path, lambda: AutoConfig.from_pretrained(path))
    tok = _load("tokenizer", path, lambda: AutoTokenizer.from_pretrained(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    tok.padding_side = "right"

    def load(**kw):
        net, info = _load(
            "model",
            path,
            lambda: AutoModelForCausalLM.from_pretrained(
                path, config=config, dtype=load_dtype, output_loading_info=True, **kw
            ),
        )
        missing = sorted(info.get("missing_keys") or ())
        if missing:  # transformers initializes them at random: statistics of a model that is not this one
            raise ObimError(
                f"{path}: the checkpoint lacks {missing[0]}"
                + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
                + f" of its {type(net).__name__} architecture"
            )
        return net.eval()

    if dev.type == "cuda" and dev.index is None and torch.cuda.device_count() > 1:
        # a model larger than one GPU (the paper: 13B on 2 GPUs): layers spread over all of them (accelerate)
        net = load(device_map="auto")
        dev = net.get_input_embeddings().weight.device
    else:
        net = load().to(dev)
    return net, tok, dev


def _compute(
    path: Path,
    model: str,
    texts: Sequence[str],
    fingerprint: str,
    *,
    max_length: int,
    batch_size: int,
    device: str,
    load_dtype: torch.dtype | str,
    progress: bool,
    source: str,
    gram: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from tqdm.auto import tqdm

    net, tok, dev = open_model(path, device, load_dtype)

    sums: dict[str, torch.Tensor] = {}
    shares: dict[str, str] = {}  # gram: a layer whose input has always been another's (k, v: q's) is stored once
    state: dict = {"mask": None, "last": (None, None, 0, None)}

    def hook_for(wname: str):
        def hook(module, args):
            x = args[0]
            last_x, acc, n, first = state["last"]
            if x is not last_x:  # q/k/v (gate/up) run back to back on one input: square it once
                sel = x[state["mask"].to(x.device)] if x.dim() == 3 else x.reshape(-1, x.shape[-1])
                if gram:  # float32 sums: a 13B model's float64 Gram matrices would need twice the memory
                    xs = sel.float()
                    acc = xs.T @ xs
                else:
                    acc = sel.double().square().sum(0)
                n, first = sel.shape[0], wname
                state["last"] = (x, acc, n, first)  # holding x keeps the identity test sound
            if not n:  # an expert called with no tokens (some MoE code does) is as unreached as one never called
                return
            if gram:
                if wname not in sums and shares.get(wname, first) == first and first != wname:
                    shares[wname] = first  # the same input as `first` in every call so far
                    return
                if wname in shares:  # once another input than its partner's: its own sums from the start
                    raise ObimError(
                        f"layer {wname}: its input is not always {shares[wname]}'s, which obim's Gram pass assumes"
                    )
            sums[wname] = sums[wname] + acc if wname in sums else acc.clone()

        return hook

    linear = _linear_weights(net)
    handles = [mod.register_forward_pre_hook(hook_for(wname)) for wname, mod in linear.items()]

    tokens = 0
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            bar = tqdm(
                range(0, len(texts), batch_size),
                desc=f"saliency {Path(str(model)).name}",
                unit="batch",
                disable=not progress,
            )
            for start in bar:
                enc = tok(
                    list(texts[start : start + batch_size]),
                    return_tensors="pt",
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                ).to(dev)
                mask = enc["attention_mask"].bool()
                state["mask"], state["last"] = mask, (None, None, 0, None)
                tokens += int(mask.sum())
                net(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    finally:
        state["last"] = (None, None, 0, None)
        for h in handles:
            h.remove()
    elapsed = time.perf_counter() - t0
    if tokens == 0:
        raise ObimError(f"validation set {source}: no tokens after tokenization")
    hdiag = {k: (v / tokens).float().cpu() for k, v in sums.items()}
    reached = set(sums) | set(shares)
    meta = {
        **run_meta(model, source, len(texts), tokens, max_length, elapsed, fingerprint, texts),
        # weights no token reached (MoE experts never routed): no statistics, and check_hdiag knows why
        "unrouted": json.dumps(sorted(w for w in linear if w not in reached)),
    }
    if gram:
        meta.update(kind="gram", aliases=json.dumps(dict(sorted(shares.items()))))
    del net
    return hdiag, meta
