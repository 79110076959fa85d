"""Per-model statistics a data-aware method merges with, one file per model and kind (obim-saliency --kind):

- `hdiag` (OBM, obim/ties_obm): per linear weight, the mean x_j² of its inputs (saliency.py);
- `gram` (RegMean): per linear weight, its inputs' mean Gram matrix E[x xᵀ] (in x in), a layer sharing its input
  with another (k and v with q, up with gate) recorded as an alias of it rather than stored twice;
- `fisher` (Fisher merging): per parameter, the empirical diagonal Fisher information, the mean over validation
  samples of the squared gradient of the sample's mean token log-likelihood (one backward pass per sample).

Every file records the model's fingerprint and is checked against the model a merge reads it for. Gram and Fisher
files are as large as the model or larger: a merge reads them one tensor at a time (StatsFile), never whole.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .checkpoint import Checkpoint
from .checks import device_check, require
from .errors import ObimError
from .safeio import check_regular
from .saliency import (
    STATS_VERSION,
    _dtype,
    _progress_bars,
    check_hdiag,
    compute_hdiag,
    expected_hdiag,
    load_hdiag,
    open_model,
    run_meta,
    save_hdiag,
    unrouted_weights,
)


@dataclass(frozen=True)
class Kind:
    name: str
    what: str  # what the file holds, for messages and the CLI
    version: int  # bump when its statistics change for the same model and texts: cached files are keyed by it


KINDS = {
    "hdiag": Kind("hdiag", "OBM saliency statistics (mean x² per input feature of every linear layer)", STATS_VERSION),
    "gram": Kind("gram", "RegMean statistics (mean input Gram matrix of every linear layer)", 1),
    "fisher": Kind("fisher", "Fisher merging statistics (empirical diagonal Fisher of every parameter)", 1),
}


def kind_of(meta: dict[str, str]) -> str:
    return meta.get("kind", "hdiag")  # hdiag files predate the key


# ------------------------------------------------------------------------------------------------- reading


class StatsFile:
    """One model's statistics file, read a tensor at a time: `get(name)` is the tensor's statistics (float32,
    checked finite and non-negative where the kind must be) or None where the file has none for it. An hdiag file
    is small and read whole. A Fisher file is read divided by its L2 norm over all parameters (`norm` in its
    metadata), so that models' Fisher weights are on one scale (Matena & Raffel's normalisation)."""

    def __init__(self, path: str | Path, kind: str):
        self.path, self.kind = Path(path), kind
        self.aliases: dict[str, str] = {}
        if kind == "hdiag":
            self._stats, self.meta = load_hdiag(self.path)
            self.names = set(self._stats)
            return
        check_regular(self.path, f"{kind} file")
        try:
            self._f = safe_open(str(self.path), framework="pt")
            self.meta = dict(self._f.metadata() or {})
            self.names = set(self._f.keys())
        except (SafetensorError, OSError) as e:
            raise ObimError(f"{self.path}: unreadable {kind} safetensors file ({e})") from None
        if kind_of(self.meta) != kind:
            raise ObimError(f"{self.path}: holds {kind_of(self.meta)} statistics, not the {kind} statistics asked for")
        try:
            aliases = json.loads(self.meta.get("aliases", "{}"))
        except json.JSONDecodeError:
            aliases = None
        if (
            not isinstance(aliases, dict)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items())
            or any(v not in self.names for v in aliases.values())
        ):
            raise ObimError(f"{self.path}: metadata `aliases` is not a JSON map to the file's own tensors")
        self.aliases = aliases
        self.scale = 1.0
        if kind == "fisher":
            norm = _float(self.meta.get("norm"))
            if norm is None or not math.isfinite(norm) or norm < 0:
                raise ObimError(f"{self.path}: metadata `norm` is not a finite non-negative number")
            self.scale = 1.0 / norm if norm > 0 else 1.0

    def covered(self) -> set[str]:
        return self.names | set(self.aliases)

    def get(self, name: str) -> torch.Tensor | None:
        if self.kind == "hdiag":
            return self._stats.get(name)
        real = self.aliases.get(name, name)
        if real not in self.names:
            return None
        t = self._f.get_tensor(real).float()
        if not torch.isfinite(t).all():
            raise ObimError(f"{self.path}: {self.kind} tensor {real} has NaN or Inf entries")
        bad = (t < 0).any() if self.kind == "fisher" else (t.diagonal() < 0).any()
        if bad:
            what = "entries" if self.kind == "fisher" else "diagonal entries"
            raise ObimError(f"{self.path}: {self.kind} tensor {real} has negative {what}")
        return t.mul_(self.scale) if self.scale != 1.0 else t

    def shape(self, name: str) -> list[int]:
        return list(self._f.get_slice(name).get_shape())


def _float(v) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def open_statistics(path: str | Path, kind: str, ckpt: Checkpoint, source: str | None = None) -> StatsFile:
    """A model's statistics file of `kind`, checked against the model (fingerprint, names, shapes, coverage)."""
    f = StatsFile(path, kind)
    check_statistics(f, ckpt, source or str(path))
    return f


class InMemory:
    """Statistics just computed (obim-merge with `validation:`), served as a StatsFile serves a file."""

    def __init__(self, kind: str, stats: dict[str, torch.Tensor], meta: dict[str, str]):
        self.kind, self.meta, self._stats = kind, meta, stats
        self.names = set(stats)
        self.aliases = json.loads(meta.get("aliases", "{}"))
        norm = _float(meta.get("norm")) if kind == "fisher" else None
        self.scale = 1.0 / norm if norm else 1.0

    def covered(self) -> set[str]:
        return self.names | set(self.aliases)

    def get(self, name: str) -> torch.Tensor | None:
        t = self._stats.get(self.aliases.get(name, name))
        return None if t is None else (t.float() * self.scale if self.scale != 1.0 else t.float())

    def shape(self, name: str) -> list[int]:
        return list(self._stats[name].shape)


def check_statistics(f: StatsFile | InMemory, ckpt: Checkpoint, source: str) -> None:
    """The statistics must come from this model and fit it: every stored tensor a tensor of the model in the shape
    its kind has (gram: in x in of a 2-D weight; fisher: the weight's own shape), and every tensor the kind covers
    present (gram: the linear weights but those no token reached; fisher: every float tensor)."""
    if f.kind == "hdiag":
        check_hdiag(f._stats, f.meta, ckpt, source)
        return
    want, have = f.meta.get("model_fingerprint"), ckpt.fingerprint()
    if not want:
        raise ObimError(f"{source}: {f.kind} file records no model fingerprint; recompute it with obim-saliency")
    if want != have:
        raise ObimError(
            f"{source}: {f.kind} statistics were computed for another model ({f.meta.get('model', '?')}, "
            f"fingerprint {want}), not for '{ckpt.spec}' (fingerprint {have})"
        )
    for name in sorted(f.covered()):  # a stored tensor, or an alias of one: each in its own weight's shape
        info = ckpt.tensors.get(name)
        if info is None:
            raise ObimError(f"{source}: {f.kind} tensor {name} is not a tensor of model '{ckpt.spec}'")
        real = f.aliases.get(name, name)
        shape = f.shape(real)
        expect = [info.shape[1], info.shape[1]] if f.kind == "gram" and len(info.shape) == 2 else list(info.shape)
        if (f.kind == "gram" and len(info.shape) != 2) or shape != expect:
            held = f"{f.kind} tensor {name}" + (f" (an alias of {real})" if real != name else "")
            raise ObimError(
                f"{source}: {held} has shape {shape}, but the model's weight has shape {list(info.shape)} "
                f"(expected {expect})"
            )
    if f.kind == "gram":
        need = [n for n in expected_hdiag(ckpt) if n not in set(unrouted_weights(f.meta, ckpt, source))]
    else:  # every float tensor but those no parameter of the loaded model holds (no gradient: the weighted mean)
        skip = set(no_gradient(f.meta, ckpt, source))
        need = [n for n, t in ckpt.tensors.items() if t.dtype.is_floating_point and n not in skip]
    missing = sorted(n for n in need if n not in f.covered())
    if missing:
        raise ObimError(
            f"{source}: {f.kind} statistics cover {len(f.covered())} tensors of model '{ckpt.spec}'; missing "
            f"{missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
        )


def no_gradient(meta: dict[str, str], ckpt: Checkpoint, source: str) -> list[str]:
    """A Fisher file's checkpoint tensors that no parameter of the loaded model holds (metadata `no_gradient`)."""
    try:
        names = json.loads(meta.get("no_gradient", "[]"))
    except json.JSONDecodeError:
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) and n in ckpt.tensors for n in names):
        raise ObimError(f"{source}: metadata `no_gradient` is not a JSON list of the model's tensor names")
    return names


def save_statistics(stats: dict[str, torch.Tensor], path: str | Path, meta: dict[str, str]) -> None:
    save_hdiag(stats, path, meta)  # float32, sorted, written atomically


def is_statistics_file(path: Path) -> bool:
    """A regular safetensors file obim-saliency wrote (a model fingerprint in its header): the only existing file
    obim-saliency replaces."""
    from .checkpoint import read_safetensors_header

    if not path.is_file():
        return False
    try:
        meta, infos = read_safetensors_header(path)
    except ObimError:
        return False
    kind = kind_of(meta)
    dims = {"hdiag": {1}, "gram": {2}, "fisher": {1, 2, 3, 4}}.get(kind, set())
    return "model_fingerprint" in meta and all(len(t.shape) in dims for t in infos.values())


# ----------------------------------------------------------------------------------------------- computing


def compute_statistics(kind: str, model: str, texts: Sequence[str], **kw) -> tuple[dict[str, torch.Tensor], dict]:
    """(statistics, metadata) of `kind` for `model` on `texts`; keywords as compute_hdiag's."""
    if kind == "hdiag":
        return compute_hdiag(model, texts, **kw)
    if kind == "gram":
        return compute_hdiag(model, texts, gram=True, **kw)
    if kind == "fisher":
        return compute_fisher(model, texts, **kw)
    raise ObimError(f"statistics kind: expected one of {', '.join(KINDS)}, got {kind!r}")


def compute_fisher(
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
    """The empirical diagonal Fisher of `model` on `texts`: F = (1/N) Σ_n (∇θ l_n)², l_n the mean log-likelihood of
    sample n's tokens given their prefixes; one forward and backward pass per sample (`batch_size` is unused: a
    batch's summed gradient would square cross terms). Sums in float32; a parameter no gradient reached gets
    zeros. Tied parameters (a tied lm_head) are stored once, the others named as aliases."""
    from tqdm.auto import tqdm

    from .checkpoint import open_checkpoint, resolve_model_dir

    require("device", device, device_check)
    if not texts:
        raise ObimError(f"validation set {source or '(texts)'} is empty: Fisher merging needs at least one sample")
    if max_length < 2:
        raise ObimError("max_length must be at least 2 (a sample needs one token to predict)")
    load_dtype = _dtype(dtype)
    path = resolve_model_dir(model)
    ckpt = open_checkpoint(str(path))
    fingerprint = ckpt.fingerprint()
    with _progress_bars(progress):
        net, tok, dev = open_model(path, device, load_dtype)
    # one entry per parameter, named as the checkpoint names it: a tied lm_head the checkpoint omits is not
    # recorded, one it holds is an alias of the embedding (or the other way round)
    names_of: dict[int, list[str]] = {}
    by_id: dict[int, torch.nn.Parameter] = {}
    for n, p in net.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(n)
        by_id[id(p)] = p
    params: dict[str, torch.nn.Parameter] = {}
    aliases: dict[str, str] = {}
    for pid, names in names_of.items():
        held = [n for n in names if n in ckpt.tensors]
        if held:
            params[held[0]] = by_id[pid]
            aliases.update(dict.fromkeys(held[1:], held[0]))
        else:  # the merge's coverage check names the checkpoint tensors left without statistics
            params[names[0]] = by_id[pid]
        by_id[pid].requires_grad_(True)
    sums = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}
    used = tokens = 0
    t0 = time.perf_counter()
    for text in tqdm(texts, desc=f"fisher {Path(str(model)).name}", unit="sample", disable=not progress):
        ids = tok(text, return_tensors="pt", truncation=True, max_length=max_length)["input_ids"].to(dev)
        if ids.shape[1] < 2:  # nothing to predict
            continue
        net.zero_grad(set_to_none=True)
        loss = net(input_ids=ids, labels=ids).loss  # the mean token NLL: -l_n (the sign squares away)
        loss.backward()
        for n, p in params.items():
            if p.grad is not None:
                sums[n].add_(p.grad.float().square())
        used, tokens = used + 1, tokens + int(ids.shape[1])
    net.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - t0
    if used == 0:
        raise ObimError(f"validation set {source}: no sample has two tokens or more after tokenization")
    fisher = {n: (s / used).cpu() for n, s in sums.items() if n in ckpt.tensors}
    norm = torch.sqrt(sum((f.double().square().sum() for f in fisher.values()), torch.zeros((), dtype=torch.float64)))
    if not torch.isfinite(norm):
        raise ObimError(f"model {model}: its Fisher statistics on {source} are not finite (a loss overflowed?)")
    meta = {
        "kind": "fisher",
        **run_meta(model, source, used, tokens, max_length, elapsed, fingerprint, texts),
        "norm": repr(float(norm)),
        "aliases": json.dumps(dict(sorted(aliases.items()))),
        # float tensors of the checkpoint that are no parameter of the loaded model (a saved buffer such as an old
        # rotary inv_freq, a key transformers ignores or renames): no gradient, merged by the weighted mean
        "no_gradient": json.dumps(
            sorted(
                n
                for n, t in ckpt.tensors.items()
                if t.dtype.is_floating_point and not any(n in names for names in names_of.values())
            )
        ),
    }
    del net
    return fisher, meta
