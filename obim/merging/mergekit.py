"""mergekit YAML configs read as obim merge configs: the methods both tools define, each parameter mapped to obim's,
and a one-line refusal for a key, a parameter or a method whose meaning differs or that obim lacks (the line names
the difference). `load_config` calls `from_mergekit` on any config with a `merge_method` key, so `obim-merge` and
`obim.merge` take mergekit configs as they are.

What maps (mergekit 0.1.5's definitions):
- task_arithmetic -> ta: base + lambda * sum_t w_t delta_t (normalize: / sum_t w_t); one weight for every model;
- linear (base_model given) -> ta: sum_t w_t theta_t / sum_t w_t over the listed models (the base among them or not),
  i.e. base + sum over the other models of delta_t / n with equal weights;
- ties -> ties: per-model density, the sign election by the sum, the mean of the agreeing entries (normalize: true);
  one weight for every model (equal weights cancel in that mean);
- slerp -> slerp (`t`; the base and one other model); sce -> sce (`select_topk`).
mergekit's `dtype` is the precision it computes in, `out_dtype` the output's: obim computes in float32 and writes
`out_dtype`, else `dtype`, else the base's dtype.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .errors import ObimError

# refused outright, with what differs
DIFFERS = {
    "dare_ties": "mergekit's DARE rescales the kept entries to the task vector's L1 norm (rescale: true) or not at all "
    "(false); obim's dare rescales by 1/(1 - p), the paper's definition (method: dare in an obim config)",
    "dare_linear": "mergekit's DARE rescales the kept entries to the task vector's L1 norm (rescale: true) or not at "
    "all (false); obim's dare rescales by 1/(1 - p), the paper's definition (method: dare in an obim config)",
    "della": "mergekit's DELLA rescales the kept entries to the task vector's L1 norm; obim's della by 1/p per entry, "
    "the paper's definition (method: della in an obim config)",
    "della_linear": "mergekit's DELLA rescales the kept entries to the task vector's L1 norm; obim's della by 1/p per "
    "entry and always elects signs (method: della in an obim config)",
    "breadcrumbs": "mergekit's breadcrumbs ranks each tensor's entries as a whole; obim's per row, as the paper does "
    "(method: breadcrumbs in an obim config)",
    "breadcrumbs_ties": "mergekit's breadcrumbs ranks each tensor's entries as a whole and elects signs; obim's ranks "
    "per row and sums (method: breadcrumbs in an obim config)",
}
SHARED = ("task_arithmetic", "linear", "ties", "slerp", "sce")
TOP = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source", "name"}
IGNORED_PARAMS = {"int8_mask"}  # memory only: the same numbers


def is_mergekit(raw: dict) -> bool:
    return "merge_method" in raw


def _scalar(where: str, v: Any) -> Any:
    if isinstance(v, (list, dict)):
        raise ObimError(
            f"mergekit config: {where} is {type(v).__name__} (a gradient or a per-tensor filter); obim takes one value "
            "per model and method"
        )
    return v


def _names(paths: list[str]) -> list[str]:
    """A model name per path: its last component, made unique."""
    out: list[str] = []
    for p in paths:
        stem = re.sub(r"[^\w.-]", "_", Path(p.rstrip("/")).name) or "model"
        name, k = stem, 2
        while name in out or name == "base":
            name, k = f"{stem}-{k}", k + 1
        out.append(name)
    return out


def from_mergekit(raw: dict, source: str = "mergekit config") -> dict:
    """The obim merge config of a mergekit config (module docstring); an ObimError naming any key, parameter or
    method that does not map."""
    method = str(raw.get("merge_method"))
    unknown = sorted(set(raw) - TOP)
    if unknown:
        why = {"slices": "slices (layer ranges)", "modules": "modules", "tokenizer": "a tokenizer section"}
        named = ", ".join(why.get(k, k) for k in unknown)
        raise ObimError(f"{source}: {named}: not supported by obim (it merges whole models, tensor by tensor)")
    if method in DIFFERS:
        raise ObimError(f"{source}: merge_method {method}: {DIFFERS[method]}")
    if method not in SHARED:
        raise ObimError(
            f"{source}: merge_method {method}: obim has no such method; it reads mergekit's {', '.join(SHARED)}"
        )
    base = raw.get("base_model")
    if not base:
        raise ObimError(f"{source}: base_model is required (obim merges task vectors against a base)")
    entries = raw.get("models") or []
    if not isinstance(entries, list) or not entries:
        raise ObimError(f"{source}: models: expected a list of {{model, parameters}}")
    paths, params = [], []
    for i, e in enumerate(entries):
        e = {"model": e} if isinstance(e, str) else e
        if not isinstance(e, dict) or not isinstance(e.get("model"), str):
            raise ObimError(f"{source}: models[{i}]: expected {{model: PATH, parameters: {{...}}}}")
        if "+" in e["model"]:
            raise ObimError(f"{source}: models[{i}]: {e['model']}: a model with a LoRA applied is not supported")
        paths.append(e["model"])
        params.append({k: _scalar(f"models[{i}].parameters.{k}", v) for k, v in (e.get("parameters") or {}).items()})
    wide = {k: _scalar(f"parameters.{k}", v) for k, v in (raw.get("parameters") or {}).items()}
    out: dict[str, Any] = {"base_model": str(base)}
    dtype = raw.get("out_dtype") or raw.get("dtype")
    if dtype:
        out["dtype"] = str(dtype)
    others = [(p, q) for p, q in zip(paths, params, strict=True) if p != base]
    names = _names([p for p, _ in others])
    tok = raw.get("tokenizer_source")
    if tok not in (None, "base"):
        if tok == "union" or tok not in [p for p, _ in others]:
            raise ObimError(f"{source}: tokenizer_source {tok}: obim copies the base's or one merged model's tokenizer")
        out["tokenizer_source"] = names[[p for p, _ in others].index(tok)]
    build = {"task_arithmetic": _ta, "linear": _linear, "ties": _ties, "slerp": _slerp, "sce": _sce}[method]
    out.update(build(source, others, names, wide, base, paths, params))
    return out


def _param(name: str, wide: dict, per: list[dict], default: Any = None) -> list[Any]:
    return [p.get(name, wide.get(name, default)) for p in per]


def _check_keys(source: str, method: str, wide: dict, per: list[dict], allowed: set[str]) -> None:
    for where, d in [("parameters", wide), *((f"models[{i}].parameters", p) for i, p in enumerate(per))]:
        bad = sorted(set(d) - allowed - IGNORED_PARAMS)
        if bad:
            raise ObimError(f"{source}: {where}: {', '.join(bad)}: not a parameter obim maps for {method}")


def _one_weight(source: str, method: str, weights: list[Any]) -> float:
    ws = {float(w) for w in weights}
    if len(ws) != 1:
        raise ObimError(
            f"{source}: {method} with per-model weights {sorted(ws)}: obim's methods weigh every model alike "
            "(one lambda); give every model the same weight"
        )
    return ws.pop()


def _models(names: list[str], others: list[tuple[str, dict]], **per_model: list[Any]) -> list[dict]:
    out = []
    for i, (name, (path, _)) in enumerate(zip(names, others, strict=True)):
        m: dict[str, Any] = {"name": name, "path": path}
        extra = {k: v[i] for k, v in per_model.items() if v[i] is not None}
        if extra:
            m["parameters"] = extra
        out.append(m)
    return out


def _ta(source, others, names, wide, base, paths, params):
    per = [q for _, q in others]
    _check_keys(source, "task_arithmetic", wide, per, {"weight", "normalize", "lambda", "rescale"})
    if wide.get("rescale"):
        raise ObimError(f"{source}: rescale: true: task_arithmetic does not sparsify, so obim has nothing to rescale")
    w = _one_weight(source, "task_arithmetic", _param("weight", wide, per, 1.0))
    lam = float(wide.get("lambda", 1.0))
    scale = 1.0 / len(others) if wide.get("normalize", False) else w  # normalize: / sum of the (equal) weights
    return {"method": "ta", "models": _models(names, others), "parameters": {"lambda": lam * scale}}


def _linear(source, others, names, wide, base, paths, params):
    _check_keys(source, "linear", wide, params, {"weight", "normalize"})
    _one_weight(source, "linear", _param("weight", wide, params, 1.0))
    if not wide.get("normalize", True):
        raise ObimError(f"{source}: linear with normalize: false sums the models' weights; obim merges task vectors")
    # sum_t w theta_t / (n w) over the n listed models = base + sum over the others of delta_t / n
    return {"method": "ta", "models": _models(names, others), "parameters": {"lambda": 1.0 / len(paths)}}


def _ties(source, others, names, wide, base, paths, params):
    per = [q for _, q in others]
    _check_keys(source, "ties", wide, per, {"weight", "density", "normalize", "lambda", "rescale"})
    if not wide.get("normalize", True):
        raise ObimError(f"{source}: ties with normalize: false sums the agreeing entries; obim's ties averages them")
    if wide.get("rescale", False):
        raise ObimError(f"{source}: ties with rescale: true rescales to the L1 norm; obim's ties does not rescale")
    _one_weight(source, "ties", _param("weight", wide, per, 1.0))  # equal weights cancel in the mean
    density = [float(d) for d in _param("density", wide, per, 1.0)]
    return {
        "method": "ties",
        "models": _models(names, others, density=density),
        "parameters": {"lambda": float(wide.get("lambda", 1.0))},
    }


def _slerp(source, others, names, wide, base, paths, params):
    _check_keys(source, "slerp", wide, params, {"t"})
    if len(paths) != 2 or base not in paths:
        raise ObimError(f"{source}: slerp takes the base_model and one other model in `models`, got {len(paths)}")
    if "t" not in wide:
        raise ObimError(f"{source}: slerp needs parameters.t")
    return {"method": "slerp", "models": _models(names, others), "parameters": {"t": float(wide["t"])}}


def _sce(source, others, names, wide, base, paths, params):
    _check_keys(source, "sce", wide, params, {"select_topk"})
    return {
        "method": "sce",
        "models": _models(names, others),
        "parameters": {"select_topk": float(wide.get("select_topk", 1.0))},
    }
