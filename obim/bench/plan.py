"""A sweep job's plan: the composed Hydra config turned, once, into a typed, frozen `JobPlan` holding everything a
job uses (the merge config, the validation sets, the lm-eval tasks, the device, the caches, tracking), every option
checked before anything is computed or loaded. The pipeline (obim.bench.pipeline) and its stages read the plan and
never change it; `JobPlan.to_json()` is its one serialisation (recorded in result.json), and `JobPlan.hash()` names
the job for resume.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from obim.merging.checks import device_check, number_in, one_of, optional, require
from obim.merging.config import MergeConfig
from obim.merging.errors import ObimError

from .cache import default_cache_dir, digest
from .experiment import (
    MODEL_KEYS,
    POSITIVE,
    benchmarks_of,
    check_experiment,
    experiment_models,
    plain,
    validation_set,
)

ORDER_KINDS = ("experiment", "rotation", "first", "last", "fixed")


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

    def zoo_resolver(seed: Any) -> str:
        from .zoo import default_dir

        # a bad seed is named by check_experiment, in one line (an error raised here comes wrapped in OmegaConf's)
        return str(default_dir(seed if isinstance(seed, int) else 0))

    if not OmegaConf.has_resolver("obim_draw"):  # a folder's suffix for a zoo draw other than the default
        OmegaConf.register_new_resolver("obim_draw", lambda seed: f"-seed{seed}" if seed else "")
    if not OmegaConf.has_resolver("obim_zoo"):
        OmegaConf.register_new_resolver("obim_zoo", zoo_resolver)
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
# the toy zoo's draw (experiment.zoo_seed): an axis of replicates, not of settings; tables average over it
DRAWS = "zoo_seed"


def axis_of(override: str) -> str | None:
    """The sweep axis an override changes (None: neutral), e.g. 'order.model=math' -> 'order',
    'experiment.models.math.retention=0.3' -> 'retention', 'method.parameters.density=0.3' -> 'method'."""
    key = override.split("=", 1)[0].lstrip("+~")
    if key in NEUTRAL or key.split(".")[0].split("/")[0] in NEUTRAL_GROUPS:
        return None
    if key.startswith("experiment.models.") and key.endswith(".retention"):
        return "retention"
    if key == "experiment.zoo_seed":
        return DRAWS
    # which models and where the data lives (a local copy of a hub model, your checkpoints) is not an axis
    if (
        key in ("experiment.base", "experiment.checkpoints")
        or key.startswith("experiment.validation_sources.")
        or (key.startswith("experiment.models.") and key.endswith(".path"))
    ):
        return None
    return key if key.startswith("experiment.") else key.split(".")[0]


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


@dataclass(frozen=True)
class ValidationPlan:
    """One model's saliency validation set: {source: samples}, where each source's data is, how samples are drawn."""

    sources: dict[str, int]
    data: dict[str, dict[str, Any]]
    format: str
    seed: int
    max_length: int
    batch_size: int

    def to_json(self) -> dict[str, Any]:
        return {
            "sources": dict(self.sources),
            "data": {k: dict(v) for k, v in self.data.items()},
            "format": self.format,
            "seed": self.seed,
            "max_length": self.max_length,
            "batch_size": self.batch_size,
        }


@dataclass(frozen=True)
class EvalPlan:
    """How lm-eval scores a model: what the evaluation cache is keyed by (with the model's weights and the tasks)."""

    backend: str
    batch_size: int | str
    limit: int | float | None
    model_args: Any
    num_fewshot: dict[str, int] | None = None  # only where the experiment sets shots

    def to_json(self) -> dict[str, Any]:
        d = {"backend": self.backend, "batch_size": self.batch_size, "limit": self.limit, "model_args": self.model_args}
        if self.num_fewshot:  # only when set: the toy experiments' evaluation keys stay as they were
            d["num_fewshot"] = dict(self.num_fewshot)
        return d


@dataclass(frozen=True)
class Runtime:
    """Where and how this process runs the job: not part of what the job computes (never hashed)."""

    cache: Path
    device: str  # saliency and merge
    eval_device: str
    progress: bool
    keep_merged: bool
    tracking: dict[str, Any]
    dry_run: bool | str  # True: plan and check every input is readable; "plan": plan only; "fetch": download first


@dataclass(frozen=True)
class JobPlan:
    """Everything one job uses, checked. `to_json()` is the plan as result.json records it."""

    experiment: str
    setting: str | None
    method: str
    models: tuple[str, ...]
    n_models: int
    merge: dict[str, Any]  # the merge config (obim.merging.config), saliency models' statistics still to compute
    merge_config: MergeConfig = field(repr=False, compare=False)  # the same, parsed and checked once
    validation: dict[str, ValidationPlan] = field(default_factory=dict)  # saliency methods' models only
    tasks: tuple[str, ...] = ()
    benchmarks: dict[str, str] = field(default_factory=dict)  # lm-eval task -> the paper's column
    eval: EvalPlan | None = None
    individual: bool = True  # evaluate the base and each expert too
    main: bool = True  # only neutral overrides: the experiment's main setting (Tables 1-3)
    overrides: tuple[str, ...] = ()
    zoo: str | None = None
    zoo_recipe: str = "full"
    zoo_seed: int = 0  # the zoo's draw
    seed: int = 0
    allow_code: bool = False
    objective: str = "test"  # "dev": the search's objective, the experiment's dev tasks in place of its benchmarks
    runtime: Runtime | None = field(default=None, compare=False)
    config: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)  # the plain Hydra config

    def to_json(self) -> dict[str, Any]:
        assert self.eval is not None  # plan_job always sets it
        d = {
            "experiment": self.experiment,
            "setting": self.setting,
            "method": self.method,
            "models": list(self.models),
            "n_models": self.n_models,
            "merge": self.merge,
            "validation": {n: v.to_json() for n, v in self.validation.items()},
            "tasks": list(self.tasks),
            "benchmarks": dict(self.benchmarks),
            "eval": self.eval.to_json(),
            "individual": self.individual,
            "main": self.main,
            "overrides": list(self.overrides),
            "zoo": self.zoo,
            "zoo_recipe": self.zoo_recipe,
            "zoo_seed": self.zoo_seed,
            "seed": self.seed,
            "allow_code": self.allow_code,
        }
        if self.objective != "test":  # test plans keep the layout result.json always had
            d["objective"] = self.objective
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any], runtime: Runtime | None = None, config: dict | None = None) -> JobPlan:
        """A plan read back (result.json's `plan`, a dry run's plan.json): the same plan, the same hash."""
        from obim.merging.config import load_config
        from obim.merging.methods import get_method

        saliency = d["validation"]
        kind = get_method(d["merge"]["method"]).statistics or "hdiag"
        models = [{**m, kind: "(computed)"} if saliency else m for m in d["merge"]["models"]]
        probe = {**d["merge"], "models": models}
        return cls(
            experiment=d["experiment"],
            setting=d["setting"],
            method=d["method"],
            models=tuple(d["models"]),
            n_models=d["n_models"],
            merge=d["merge"],
            merge_config=load_config(probe),
            validation={n: ValidationPlan(**v) for n, v in saliency.items()},
            tasks=tuple(d["tasks"]),
            benchmarks=dict(d["benchmarks"]),
            eval=EvalPlan(**d["eval"]),
            individual=d["individual"],
            main=d["main"],
            overrides=tuple(d["overrides"]),
            zoo=d["zoo"],
            zoo_recipe=d["zoo_recipe"],
            zoo_seed=d["zoo_seed"],
            seed=d["seed"],
            allow_code=d["allow_code"],
            objective=d.get("objective", "test"),
            runtime=runtime,
            config=config or {},
        )

    def hash(self) -> str:
        """What makes two jobs the same job: everything but how it was asked for, with what its caches are keyed by
        beyond the plan (the declared versions of the method and the stages, obim's task files, lm-eval's
        version), so a rerun redoes exactly the jobs a change touches; never the package's version alone."""
        from importlib.metadata import version

        from .evaluation import tasks_digest

        keep = {k: v for k, v in self.to_json().items() if k not in ("overrides", "main", "allow_code")}
        code = [stage_versions(self.merge_config.method), tasks_digest(list(self.tasks)), version("lm_eval")]
        return digest([keep, *code])

    def with_statistics(self, files: dict[str, str]) -> MergeConfig:
        """The merge config with each saliency model's statistics file: the checked config, not parsed again."""
        cfg = self.merge_config
        kind = cfg.method.statistics or "hdiag"
        return replace(
            cfg,
            models=[
                replace(m, statistics={**m.statistics, kind: files[m.name]}) if m.name in files else m
                for m in cfg.models
            ],
        )


def stage_versions(method: Any) -> dict[str, Any]:
    """The declared versions of the code a job's result depends on (its plan hash includes them)."""
    from obim.merging.merge import DRIVER_VERSION
    from obim.merging.saliency import STATS_VERSION
    from obim.merging.statistics import KINDS

    from .evaluation import SCORING_VERSION

    return {
        "method": method.code_version(),
        "driver": DRIVER_VERSION,
        # hdiag's version alone where a method reads hdiag or nothing (the hashes of its jobs stay as they were)
        "stats": STATS_VERSION
        if method.statistics in (None, "hdiag")
        else f"{method.statistics}-v{KINDS[method.statistics].version}",
        "scoring": SCORING_VERSION,
    }


def canonical_overrides(overrides: list[str]) -> tuple[str, ...]:
    """The overrides as a Hydra multirun writes a job's (`eval.allow_code=True` for `=true`), sorted: the same job
    asked for by the sweep or by the search records the same plan."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out = []
    for o in OverridesParser.create().parse_overrides(list(overrides)):
        out.append(
            o.get_key_element()
            if o.is_delete() and o.value() is None
            else f"{o.get_key_element()}={o.get_value_element_as_str()}"
        )
    return tuple(sorted(out))


def _dry_run(v: Any) -> bool | str:
    if v in (None, False, True, "plan", "fetch"):
        return v if v in ("plan", "fetch") else bool(v)
    raise ObimError(
        f"dry_run: expected false, true (plan and check the inputs), plan (plan only) or fetch (download the "
        f"missing inputs into the HF caches, then check), got {v!r}"
    )


def runtime_of(c: dict) -> Runtime:
    return Runtime(
        cache=Path(str(c["cache_dir"])),
        device=auto_device(str(c["device"])),
        eval_device=auto_device(str(c["eval"]["device"])),
        progress=bool(c.get("progress")),
        keep_merged=bool(c.get("keep_merged")),
        tracking=dict(c.get("tracking") or {}),
        dry_run=_dry_run(c.get("dry_run")),
    )


def plan_job(cfg: Any, overrides: list[str] | None = None, objective: str = "test") -> JobPlan:
    """The job's plan from its composed config: everything it will compute, validated, nothing loaded. objective
    "dev" (the search's trials) evaluates the experiment's dev tasks (obim.bench.dev.plan_dev) and no individual
    model."""
    from obim.merging.config import load_config
    from obim.merging.methods import get_method

    c = plain(cfg)
    exp = c["experiment"]
    check_experiment(exp)
    method = get_method(str(c["method"]["name"]))
    _check_options(c)
    exp_models = experiment_models(exp)
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
            validation[name] = ValidationPlan(**validation_set(c, {**exp, "models": exp_models}, name, m))
    merge_cfg = {
        "method": method.name,
        "base_model": str(exp["base"]),
        "models": models,
        "parameters": dict(c["method"].get("parameters") or {}),
        "order": _order(c, exp, names),
        "seed": int(c["seed"]),
        "dtype": None,
    }
    # Checked now, once (unknown parameters, retention sums, orders); saliency models' statistics are computed by
    # the job and put in place by JobPlan.with_statistics
    kind = method.statistics
    probe = {**merge_cfg, "models": [{**m, kind: "(computed)"} if kind else m for m in models]}
    merge_config = load_config(probe)

    ev = c["eval"]
    allow_code = bool(ev.get("allow_code"))
    if objective == "dev":
        from .dev import plan_dev

        dev = plan_dev(cfg)
        benchmarks, evp, individual = dev["benchmarks"], dev["eval"], False
    elif objective == "test":
        benchmarks, shots = benchmarks_of(exp)
        evp = {k: ev[k] for k in ("backend", "batch_size", "limit", "model_args")}
        if shots:
            evp["num_fewshot"] = shots
        individual = bool(ev.get("individual", True))
    else:
        raise ValueError(f"objective: test or dev, got {objective!r}")
    from .evaluation import check_code_opt_in

    check_code_opt_in(list(benchmarks), allow_code)
    return JobPlan(
        experiment=exp["name"],
        setting=exp.get("setting"),
        method=method.name,
        models=tuple(names),
        n_models=n,
        merge=merge_cfg,
        merge_config=merge_config,
        validation=validation,
        tasks=tuple(benchmarks),
        benchmarks=dict(benchmarks),
        eval=EvalPlan(**evp),
        individual=individual,
        main=all(axis_of(o) in (None, DRAWS) for o in (overrides or [])),
        overrides=canonical_overrides(overrides or []),
        zoo=exp.get("zoo"),
        zoo_recipe=exp.get("zoo_recipe", "full"),
        zoo_seed=int(exp.get("zoo_seed") or 0) if exp.get("zoo") else 0,
        seed=int(c["seed"]),
        allow_code=allow_code,
        objective=objective,
        runtime=runtime_of(c),
        config=c,
    )
