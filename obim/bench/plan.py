"""A sweep job's plan: the composed Hydra config turned into plain data (the merge config, the validation sets,
the lm-eval tasks), every option checked before anything is computed or loaded. The job's stages (obim.bench.stages)
read the plan and never change it; `plan_hash` names the job for resume.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from obim import __version__
from obim.merging.checks import device_check, number_in, one_of, optional, require
from obim.merging.errors import ObimError

from .cache import default_cache_dir, digest

ORDER_KINDS = ("experiment", "rotation", "first", "last", "fixed")
POSITIVE = number_in(1, float("inf"), integer=True)


def _register_resolvers() -> None:
    from omegaconf import OmegaConf

    def obim_resolver(key: str) -> str:
        if key == "cache_dir":
            return str(default_cache_dir())
        if key == "zoo_dir":
            from .zoo import default_dir

            return str(default_dir())
        raise ValueError(f"${{obim:{key}}}: unknown key (cache_dir, zoo_dir)")

    if not OmegaConf.has_resolver("obim"):
        OmegaConf.register_new_resolver("obim", obim_resolver)
    if not OmegaConf.has_resolver("obim_dirname"):
        OmegaConf.register_new_resolver("obim_dirname", job_dirname)


def job_dirname(overrides: str) -> str:
    """A job directory's name from its overrides: one path component (a path in an override, e.g. a checkpoint
    list, would nest directories) and short enough for any filesystem (long names end in a digest)."""
    name = str(overrides).replace("%", "%25").replace("/", "%2F") or "default"
    return name if len(name) <= 160 else f"{name[:140]}-{digest(name)[:16]}"


_register_resolvers()


def auto_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# Overrides that leave what a job computes as the experiment defines it (only which method, how it is evaluated
# or logged): a job with only these is the experiment's main setting, the one Tables 1-3 report.
NEUTRAL = {
    "method",
    "experiment",
    "experiment.zoo",
    "experiment.zoo_recipe",
    "progress",
    "verbose",
    "keep_merged",
    "cache_dir",
    "results_dir",
    "device",
    "dry_run",
    "paper",
}
NEUTRAL_GROUPS = {"eval", "tracking", "hydra"}


def axis_of(override: str) -> str | None:
    """The sweep axis an override changes (None: neutral), e.g. 'order.model=math' -> 'order',
    'experiment.models.math.retention=0.3' -> 'retention', 'method.parameters.density=0.3' -> 'method'."""
    key = override.split("=", 1)[0].lstrip("+~")
    if key in NEUTRAL or key.split(".")[0].split("/")[0] in NEUTRAL_GROUPS:
        return None
    if key.startswith("experiment.models.") and key.endswith(".retention"):
        return "retention"
    # which models and where the data lives (a local copy of a hub model, your checkpoints) is not an axis
    if (
        key in ("experiment.base", "experiment.checkpoints")
        or key.startswith("experiment.validation_sources.")
        or (key.startswith("experiment.models.") and key.endswith(".path"))
    ):
        return None
    return key if key.startswith("experiment.") else key.split(".")[0]


def plain(node: Any) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


def _split_evenly(size: int, sources: list[str]) -> dict[str, int]:
    k = len(sources)
    return {s: size // k + (1 if i < size % k else 0) for i, s in enumerate(sources)}


def _order(cfg: dict, exp: dict, names: list[str]) -> str | list[str]:
    o = cfg["order"]
    kind = o.get("kind")
    if kind not in ORDER_KINDS:
        raise ObimError(f"order.kind: expected one of {', '.join(ORDER_KINDS)}, got {kind!r}")
    if kind == "experiment":
        eo = exp.get("order", "rotation")
        return eo if isinstance(eo, str) else [n for n in eo if n in names]
    if kind == "rotation":
        return "rotation"
    if kind == "fixed":
        return [str(m) for m in o.get("models") or []]  # load_config checks it lists every model once
    m = o.get("model")
    if m not in names:
        raise ObimError(f"order.model: '{m}' is not one of the merged models ({', '.join(names)})")
    rest = [n for n in names if n != m]
    return [m, *rest] if kind == "first" else [*rest, m]


def _validation(cfg: dict, exp: dict, name: str) -> dict[str, int]:
    """{source: samples} of model `name`'s validation set."""
    v = cfg["validation"]
    own = dict(exp["models"][name].get("validation") or {})  # exp["models"]: after _models()
    applies = v.get("models") is None or name in v["models"]
    src = v.get("source", "own")
    sources = own if (src == "own" or not applies) else dict.fromkeys([src] if isinstance(src, str) else src, 0)
    if not sources:
        raise ObimError(f"experiment.models.{name}.validation: no validation sources for model '{name}'")
    size = v.get("size")
    if applies and size is not None:
        require("validation.size", size, POSITIVE)
        if size < len(sources):
            raise ObimError(f"validation.size: {size} samples cannot cover {len(sources)} sources")
        return _split_evenly(size, list(sources))
    if any(int(n) < 1 for n in sources.values()):
        raise ObimError(f"validation.size: needed when validation.source lists sources ({', '.join(sources)})")
    return {s: int(n) for s, n in sources.items()}


def _models(exp: dict) -> dict[str, dict]:
    """The experiment's models by name, in the base order: `models`, or `checkpoints` (a list of paths, the
    post-pretraining setting) named ckpt-1, ckpt-2, ... with the shared settings of `checkpoint`."""
    if exp.get("checkpoints") is not None:
        if exp.get("models"):
            raise ObimError(f"experiment {exp['name']}: give `models` or `checkpoints`, not both")
        paths = exp["checkpoints"]
        if not isinstance(paths, list) or not paths:
            raise ObimError(f"experiment.checkpoints: expected a non-empty list of paths, got {paths!r}")
        return {f"ckpt-{i}": {**(exp.get("checkpoint") or {}), "path": str(p)} for i, p in enumerate(paths, 1)}
    if not exp.get("models"):
        raise ObimError(f"experiment {exp['name']}: no models (give `models` or `checkpoints`)")
    return exp["models"]


MODEL_KEYS = ("path", "retention", "validation", "prompt_format")
# an experiment (conf/experiment/*.yaml): what plan_job reads; any other key is an error, not silently ignored
EXPERIMENT_KEYS = (
    "name",
    "setting",
    "base",
    "models",
    "checkpoints",
    "checkpoint",
    "n_models",
    "order",
    "validation_sources",
    "validation_data",
    "benchmarks",
    "dev_benchmarks",
    "zoo",
    "zoo_recipe",
)
SETTINGS = ("sft", "pt")  # which of the paper's tables the experiment's main jobs fill: 1 and 3-6, or 2 and 11


def _check_experiment(exp: Any) -> None:
    if not isinstance(exp, dict) or not exp.get("name"):
        raise ObimError(f"experiment: expected a mapping with a `name`, got {exp!r}")
    unknown = sorted(set(exp) - set(EXPERIMENT_KEYS))
    if unknown:
        raise ObimError(
            f"experiment {exp['name']}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(EXPERIMENT_KEYS)}"
        )
    for key in ("base", "benchmarks"):
        if exp.get(key) is None:
            raise ObimError(f"experiment {exp['name']}: `{key}` is required")
    if exp.get("setting") is not None and exp["setting"] not in SETTINGS:
        raise ObimError(f"experiment.setting: expected one of {', '.join(SETTINGS)}, got {exp['setting']!r}")
    if exp.get("zoo_recipe", "full") not in ("full", "quick"):
        raise ObimError(f"experiment.zoo_recipe: expected full or quick, got {exp['zoo_recipe']!r}")


def _benchmarks(exp: dict) -> tuple[dict[str, str], dict[str, int]]:
    """lm-eval task -> the paper's column, and the tasks' shot counts where the experiment sets one."""
    columns, shots = {}, {}
    for task, spec in (exp.get("benchmarks") or {}).items():
        if isinstance(spec, dict):
            unknown = set(spec) - {"column", "num_fewshot"}
            if unknown or "column" not in spec:
                raise ObimError(
                    f"experiment.benchmarks.{task}: expected a column name or {{column, num_fewshot}}, got {spec!r}"
                )
            if spec.get("num_fewshot") is not None:
                shots[task] = int(spec["num_fewshot"])
            spec = spec["column"]
        columns[task] = str(spec)
    if not columns:
        raise ObimError(f"experiment {exp['name']}: no benchmarks")
    return columns, shots


def _validation_set(c: dict, exp: dict, name: str, model: dict) -> dict[str, Any]:
    from .validation import check_format, resolve_source

    counts = _validation(c, exp, name)
    split = c["validation"]["split"]
    if split not in ("train", "dev"):
        raise ObimError(f"validation.split: expected train or dev (never test), got {split!r}")
    data = {}
    for s in counts:
        spec = (exp.get("validation_sources") or {}).get(s)
        if spec is None:
            if not exp.get("validation_data"):
                raise ObimError(f"experiment.validation_sources: no source '{s}' (model '{name}')")
            spec = {"builder": "jsonl", "path": exp["validation_data"].replace("{source}", s)}
        data[s] = resolve_source(s, spec, split, f"experiment.validation_sources.{s}")
        if data[s]["builder"] == "jsonl":
            _check_jsonl_source(s, data[s]["path"], exp, name)
    fmt = str(model.get("prompt_format") or "plain")
    check_format(fmt, f"experiment.models.{name}.prompt_format")
    return {
        "sources": counts,
        "data": data,
        "format": fmt,
        "seed": int(c["seed"]),
        "max_length": require("validation.max_length", c["validation"]["max_length"], POSITIVE),
        "batch_size": require("validation.batch_size", c["validation"]["batch_size"], POSITIVE),
    }


def _check_jsonl_source(source: str, path: str, exp: dict, model: str) -> None:
    """A JSONL validation file must exist, or be one the toy zoo will write when it is built by the first job."""
    if Path(path).is_file():
        return
    zoo = exp.get("zoo")
    if zoo and not (Path(zoo) / "zoo.json").is_file() and Path(path).is_relative_to(zoo):
        from .zoo import validation_sources

        if source in validation_sources():
            return
        raise ObimError(
            f"validation.source: '{source}' (model '{model}') is not a toy zoo source; one of "
            f"{', '.join(validation_sources())}"
        )
    raise ObimError(f"validation.source: '{source}' (model '{model}'): no file {path}")


def _check_options(c: dict) -> None:
    """The job's own options, before anything runs: each a one-line error naming it."""
    require("seed", c["seed"], number_in(0, 2**63 - 1, integer=True))
    for key, v in (("device", c.get("device")), ("eval.device", c["eval"].get("device"))):
        if v != "auto":
            require(key, v, lambda d: device_check(d, present=not c.get("dry_run")))
    require("retention", c.get("retention"), optional(number_in(0.0, 1.0)))
    ev = c["eval"]
    require("eval.backend", ev.get("backend"), one_of("hf", "vllm"))
    require("eval.limit", ev.get("limit"), optional(_limit))
    bs = ev.get("batch_size")
    if not (isinstance(bs, str) and re.fullmatch(r"auto(:\d+)?", bs)):
        require(
            "eval.batch_size", bs, lambda v: POSITIVE(v) and f"expected a positive integer, auto or auto:N, got {v!r}"
        )


def _limit(v: Any) -> str | None:
    """lm-eval's --limit: a sample count per task, or a fraction of each task below 1."""
    if POSITIVE(v) is None or number_in(0, 1, lo_open=True, hi_open=True)(v) is None:
        return None
    return f"expected null, a positive integer or a fraction in (0, 1), got {v!r}"


def plan_job(cfg: Any, overrides: list[str] | None = None) -> dict[str, Any]:
    """The job's plan from its composed config: everything it will compute, validated, nothing loaded."""
    from obim.merging.config import load_config
    from obim.merging.methods import get_method

    c = plain(cfg)
    exp = c["experiment"]
    _check_experiment(exp)
    method = get_method(str(c["method"]["name"]))
    _check_options(c)
    exp_models = _models(exp)
    all_names = list(exp_models)
    n = c.get("n_models")
    if n is None:
        n = exp.get("n_models") or len(all_names)
    if not isinstance(n, int) or not 1 <= n <= len(all_names):
        raise ObimError(
            f"n_models: expected 1..{len(all_names)} (experiment {exp['name']} has {len(all_names)} models), got {n!r}"
        )
    names = all_names[:n]
    per_model = c["method"].get("per_model") or {}
    bad = [k for k in per_model if k not in names]
    if bad:
        raise ObimError(f"method.per_model: '{bad[0]}' is not one of the merged models ({', '.join(names)})")

    models, validation = [], {}
    for name in names:
        m = exp_models[name]
        unknown = set(m) - set(MODEL_KEYS)
        if unknown:
            raise ObimError(
                f"experiment.models.{name}: unknown key(s) {', '.join(sorted(unknown))}; valid: {', '.join(MODEL_KEYS)}"
            )
        entry: dict[str, Any] = {"name": name, "path": str(m["path"])}
        retention = c.get("retention") if c.get("retention") is not None else m.get("retention")
        if method.retention_param == "retention":
            entry["retention"] = retention
        if per_model.get(name):
            entry["parameters"] = dict(per_model[name])
        models.append(entry)
        if method.uses_saliency:
            validation[name] = _validation_set(c, {**exp, "models": exp_models}, name, m)
    merge_cfg = {
        "method": method.name,
        "base_model": str(exp["base"]),
        "models": models,
        "parameters": dict(c["method"].get("parameters") or {}),
        "order": _order(c, exp, names),
        "seed": int(c["seed"]),
        "dtype": None,
    }
    # Validate now (unknown parameters, retention sums, orders): saliency methods get placeholder statistics.
    probe = {**merge_cfg, "models": [{**m, "hdiag": "(computed)"} if method.uses_saliency else m for m in models]}
    load_config(probe)

    benchmarks, shots = _benchmarks(exp)
    ev = c["eval"]
    evp = {k: ev[k] for k in ("backend", "batch_size", "limit", "model_args")}
    if shots:  # only when set: the toy experiments' evaluation keys stay as they were
        evp["num_fewshot"] = shots
    from .evaluation import check_code_opt_in

    allow_code = bool(ev.get("allow_code"))
    check_code_opt_in(list(benchmarks), allow_code)
    main = all(axis_of(o) is None for o in (overrides or []))
    return {
        "experiment": exp["name"],
        "setting": exp.get("setting"),
        "method": method.name,
        "models": names,
        "n_models": n,
        "merge": merge_cfg,
        "validation": validation,
        "tasks": list(benchmarks),
        "benchmarks": benchmarks,
        "eval": evp,
        "individual": bool(ev.get("individual", True)),
        "main": main,
        "overrides": sorted(overrides or []),
        "zoo": exp.get("zoo"),
        "zoo_recipe": exp.get("zoo_recipe", "full"),
        "seed": int(c["seed"]),
        "allow_code": allow_code,
    }


def plan_hash(plan: dict) -> str:
    """What makes two jobs the same job: everything but how it was asked for."""
    keep = {k: v for k, v in plan.items() if k not in ("overrides", "main", "allow_code")}
    return digest([keep, __version__])
