"""An experiment's config (conf/experiment/*.yaml) read and checked: its models, benchmarks and each model's
validation set. Shared by the job's plan (obim.bench.plan) and the search's dev objective (obim.bench.dev)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from obim.merging.checks import number_in, require
from obim.merging.errors import ObimError

POSITIVE = number_in(1, float("inf"), integer=True)


def plain(node: Any) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


def split_evenly(size: int, sources: list[str]) -> dict[str, int]:
    k = len(sources)
    return {s: size // k + (1 if i < size % k else 0) for i, s in enumerate(sources)}


def validation_counts(cfg: dict, exp: dict, name: str) -> dict[str, int]:
    """{source: samples} of model `name`'s validation set."""
    v = cfg["validation"]
    own = dict(exp["models"][name].get("validation") or {})  # exp["models"]: after experiment_models()
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
        return split_evenly(size, list(sources))
    if any(int(n) < 1 for n in sources.values()):
        raise ObimError(f"validation.size: needed when validation.source lists sources ({', '.join(sources)})")
    return {s: int(n) for s, n in sources.items()}


def experiment_models(exp: dict) -> dict[str, dict]:
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
    "zoo_seed",
)
SETTINGS = ("sft", "pt")  # which of the paper's tables the experiment's main jobs fill: 1 and 3-6, or 2 and 11


def check_experiment(exp: Any) -> None:
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
    seed = exp.get("zoo_seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ObimError(f"experiment.zoo_seed: expected a non-negative integer (a zoo draw), got {seed!r}")
    if seed and not exp.get("zoo"):
        raise ObimError(f"experiment.zoo_seed: experiment {exp['name']} has no toy zoo to draw (its models are given)")


def benchmarks_of(exp: dict) -> tuple[dict[str, str], dict[str, int]]:
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


def validation_set(c: dict, exp: dict, name: str, model: dict) -> dict[str, Any]:
    from .validation import check_format, resolve_source

    counts = validation_counts(c, exp, name)
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
            check_jsonl_source(s, data[s]["path"], exp, name)
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


def check_jsonl_source(source: str, path: str, exp: dict, model: str) -> None:
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
