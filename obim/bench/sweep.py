"""One sweep job (experiments/sweep.py runs one per Hydra job): config -> saliency -> merge -> eval -> log.

`plan_job` turns the composed Hydra config into a plain plan (the merge config, the validation sets, the lm-eval
tasks), checking every option before anything is computed. `run_job` executes it with three content-addressed
caches (obim.bench.cache): saliency statistics per (model, validation texts), merged models per resolved merge config,
evaluations per (model, tasks, backend). A job's `result.json` is written last, atomically: a rerun skips jobs whose
result.json holds the same config hash and redoes any other.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from obim import __version__
from .cache import default_cache_dir, digest, locked, model_fingerprint, read_json, write_json
from obim.merging.checks import device_check, number_in, one_of, optional, require
from obim.merging.errors import ObimError
from .joblog import status

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


# ------------------------------------------------------------------------------------------------- planning


def _plain(node: Any) -> Any:
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
    sources = own if (src == "own" or not applies) else {s: 0 for s in ([src] if isinstance(src, str) else src)}
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


def _benchmarks(exp: dict) -> tuple[dict[str, str], dict[str, int]]:
    """lm-eval task -> the paper's column, and the tasks' shot counts where the experiment sets one."""
    columns, shots = {}, {}
    for task, spec in (exp.get("benchmarks") or {}).items():
        if isinstance(spec, dict):
            unknown = set(spec) - {"column", "num_fewshot"}
            if unknown or "column" not in spec:
                raise ObimError(f"experiment.benchmarks.{task}: expected a column name or "
                                f"{{column, num_fewshot}}, got {spec!r}")
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
    return {"sources": counts, "data": data, "format": fmt, "seed": int(c["seed"]),
            "max_length": require("validation.max_length", c["validation"]["max_length"], POSITIVE),
            "batch_size": require("validation.batch_size", c["validation"]["batch_size"], POSITIVE)}


def _check_jsonl_source(source: str, path: str, exp: dict, model: str) -> None:
    """A JSONL validation file must exist, or be one the toy zoo will write when it is built by the first job."""
    if Path(path).is_file():
        return
    zoo = exp.get("zoo")
    if zoo and not (Path(zoo) / "zoo.json").is_file() and Path(path).is_relative_to(zoo):
        from .zoo import validation_sources

        if source in validation_sources():
            return
        raise ObimError(f"validation.source: '{source}' (model '{model}') is not a toy zoo source; one of "
                        f"{', '.join(validation_sources())}")
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
        require("eval.batch_size", bs, lambda v: POSITIVE(v) and f"expected a positive integer, auto or auto:N, "
                f"got {v!r}")


def _limit(v: Any) -> str | None:
    """lm-eval's --limit: a sample count per task, or a fraction of each task below 1."""
    if POSITIVE(v) is None or number_in(0, 1, lo_open=True, hi_open=True)(v) is None:
        return None
    return f"expected null, a positive integer or a fraction in (0, 1), got {v!r}"


def plan_job(cfg: Any, overrides: list[str] | None = None) -> dict[str, Any]:
    """The job's plan from its composed config: everything it will compute, validated, nothing loaded."""
    from obim.merging.config import load_config
    from obim.merging.methods import get_method

    c = _plain(cfg)
    exp = c["experiment"]
    method = get_method(str(c["method"]["name"]))
    _check_options(c)
    exp_models = _models(exp)
    all_names = list(exp_models)
    n = c.get("n_models")
    if n is None:
        n = exp.get("n_models") or len(all_names)
    if not isinstance(n, int) or not 1 <= n <= len(all_names):
        raise ObimError(f"n_models: expected 1..{len(all_names)} (experiment {exp['name']} has "
                        f"{len(all_names)} models), got {n!r}")
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
            raise ObimError(f"experiment.models.{name}: unknown key(s) {', '.join(sorted(unknown))}; "
                            f"valid: {', '.join(MODEL_KEYS)}")
        entry: dict[str, Any] = {"name": name, "path": str(m["path"])}
        retention = c.get("retention") if c.get("retention") is not None else m.get("retention")
        if method.retention_param == "retention":
            entry["retention"] = retention
        if per_model.get(name):
            entry["parameters"] = dict(per_model[name])
        models.append(entry)
        if method.uses_saliency:
            validation[name] = _validation_set(c, {**exp, "models": exp_models}, name, m)
    merge_cfg = {"method": method.name, "base_model": str(exp["base"]), "models": models,
                 "parameters": dict(c["method"].get("parameters") or {}), "order": _order(c, exp, names),
                 "seed": int(c["seed"]), "dtype": None}
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
    from .tables import axis_of

    main = all(axis_of(o) is None for o in (overrides or []))
    return {
        "experiment": exp["name"], "setting": exp.get("setting"), "method": method.name, "models": names,
        "n_models": n, "merge": merge_cfg, "validation": validation, "tasks": list(benchmarks),
        "benchmarks": benchmarks, "eval": evp,
        "individual": bool(ev.get("individual", True)), "main": main, "overrides": sorted(overrides or []),
        "zoo": exp.get("zoo"), "zoo_recipe": exp.get("zoo_recipe", "full"), "seed": int(c["seed"]),
        "allow_code": allow_code,
    }


def plan_hash(plan: dict) -> str:
    """What makes two jobs the same job: everything but how it was asked for."""
    keep = {k: v for k, v in plan.items() if k not in ("overrides", "main", "allow_code")}
    return digest([keep, __version__])


# ------------------------------------------------------------------------------------------------- caches


def cached_saliency(cache: Path, name: str, path: str, v: dict, device: str, progress: bool) -> dict[str, Any]:
    """The model's hdiag file for its validation set: computed once, reused by every job that needs it."""
    from obim.merging.saliency import compute_hdiag, save_hdiag
    from .validation import build_texts

    texts = build_texts(v)
    # hdiag-v2: files record the model's fingerprint (older cached files lack it and would be refused)
    key = digest([model_fingerprint(path), digest(texts), v["max_length"], v["batch_size"], device, __version__,
                  "hdiag-v2"])
    out = cache / "saliency" / f"{name}-{key}.safetensors"
    with locked(out):
        hit = out.is_file()
        if not hit:
            hdiag, meta = compute_hdiag(path, texts, max_length=v["max_length"], batch_size=v["batch_size"],
                                        device=device, progress=progress,
                                        source="+".join(f"{s}:{n}" for s, n in v["sources"].items()))
            save_hdiag(hdiag, out, meta)
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata() or {}
    return {"hdiag": str(out), "cached": hit, "seconds": float(meta.get("seconds", 0)),
            "samples": int(meta.get("samples", len(texts))), "tokens": int(meta.get("tokens", 0)),
            "seconds_per_sample": float(meta.get("seconds_per_sample", 0))}


def cached_merge(cache: Path, merge_cfg: dict, device: str, progress: bool) -> dict[str, Any]:
    from obim.merging.config import load_config
    from obim.merging.merge import merge

    cfg = load_config(merge_cfg)
    ident = cfg.to_dict()
    ident["base_model"] = model_fingerprint(cfg.base_model)
    for m in ident["models"]:
        m["path"] = model_fingerprint(m["path"])
    key = digest([ident, __version__])
    out = cache / "merges" / f"{cfg.method.name}-{key}"
    stamp = out / "obim_merge.json"
    with locked(out):
        info = read_json(stamp)
        if info is None:
            if out.exists():
                shutil.rmtree(out)  # left by a crash between the rename and the stamp
            res = merge(cfg, out, device=device, progress=progress)
            info = {"merge_s": round(res.merge_s, 3), "tensors": res.tensors, "bytes": res.bytes_written}
            write_json(stamp, info)
            return {"dir": str(out), "cached": False, **info}
    return {"dir": str(out), "cached": True, **info}


def _tasks_fingerprint(tasks: list[str]) -> str:
    """The contents of obim's task folders that define any of `tasks` (the toy tasks, obim/tasks/paper): editing
    a task re-evaluates; tasks lm-eval ships are covered by its version."""
    from .evaluation import tasks_dir

    root = Path(tasks_dir())
    folders = set()
    for y in sorted(root.rglob("*.yaml")):
        head = y.read_text()
        for line in head.splitlines():
            if line.startswith(("task:", "group:")) and line.split(":", 1)[1].strip() in tasks:
                folders.add(y.parent)
    return digest([[str(p.relative_to(root)), p.read_text()] for f in sorted(folders)
                   for p in sorted(f.iterdir()) if p.is_file() and p.suffix != ".pyc"])


def score_avg(scores: dict[str, float | None]) -> float | None:
    """The mean over every benchmark; None when one is missing (an unjudged AlpacaEval): never a partial mean
    standing in for the paper's average."""
    vals = list(scores.values())
    return None if not vals or any(v is None for v in vals) else sum(vals) / len(vals)


def cached_eval(cache: Path, model_dir: str, tasks: list[str], ev: dict, device: str, allow_code: bool = False
                ) -> dict[str, Any]:
    """{task: score} of one model through lm-eval, cached by (weights, tasks, backend and its options). A judged
    score left empty is filled from the saved outputs once a judge is configured."""
    import lm_eval

    from .evaluation import evaluate_model
    from .judge import JUDGED, judge_configured, run_judge

    key = digest([model_fingerprint(model_dir), tasks, ev, device, _tasks_fingerprint(tasks), lm_eval.__version__
                  if hasattr(lm_eval, "__version__") else "", __version__])
    out = cache / "evals" / f"{key}.json"
    with locked(out):
        hit = read_json(out)
        if hit is not None:
            missing = [t for t, v in hit["scores"].items() if v is None and t in (hit.get("outputs") or {})]
            if missing and judge_configured():
                for t in missing:
                    hit["scores"][t] = run_judge(Path(hit["outputs"][t]))
                hit["avg"] = score_avg(hit["scores"])
                write_json(out, hit)
            return {**hit, "cached": True}
        t0 = time.perf_counter()
        outputs = cache / "evals" / key
        scores = evaluate_model(model_dir, tasks, backend=ev["backend"], batch_size=ev["batch_size"],
                                limit=ev["limit"], device=device, model_args=ev["model_args"],
                                num_fewshot=ev.get("num_fewshot"), outputs_dir=outputs, allow_code=allow_code)
        rec = {"model": model_dir, "scores": scores, "avg": score_avg(scores),
               "eval_s": round(time.perf_counter() - t0, 3)}
        judged = {t: str(outputs / "alpaca_eval_outputs.json") for t in tasks if t in JUDGED}
        if judged:
            rec["outputs"] = judged
        write_json(out, rec)
    return {**rec, "cached": False}


# ---------------------------------------------------------------------------------------------------- the job


class PeakMemory:
    """Peak resident memory of this process and its children while the block runs (sampled every 20 ms), and the
    peak CUDA memory when CUDA is used."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()

    def _rss(self) -> int:
        import psutil

        p = psutil.Process()
        total = p.memory_info().rss
        for ch in p.children(recursive=True):
            try:
                total += ch.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> "PeakMemory":
        self.peak = self._rss()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss())


def _fault(stage: str) -> None:
    """Fault injection for the resume tests: OBIM_FAIL_AFTER=<stage> raises after that stage."""
    if os.environ.get("OBIM_FAIL_AFTER") == stage:
        raise RuntimeError(f"OBIM_FAIL_AFTER={stage}: simulated failure after {stage}")


def ensure_zoo(plan: dict, progress: bool) -> None:
    if not plan.get("zoo"):
        return
    from .zoo import RECIPE, build, quick_recipe

    recipe = quick_recipe() if plan["zoo_recipe"] == "quick" else RECIPE
    with locked(Path(plan["zoo"]).parent / f".{Path(plan['zoo']).name}"):
        build(plan["zoo"], recipe=recipe, evaluate=plan["zoo_recipe"] != "quick", progress=progress,
              allow_code=plan["allow_code"])


def check_tasks(tasks: list[str]) -> None:
    """Every benchmark is a task or group lm-eval knows (its own, or obim's in obim/tasks): one line otherwise."""
    from .evaluation import task_manager

    known = set(task_manager().all_tasks)
    for t in tasks:
        if t not in known:
            raise ObimError(f"experiment.benchmarks: '{t}' is not an lm-eval task or group (lm-eval "
                            f"{_lm_eval_version()}, obim tasks in {Path(__file__).parent / 'tasks'})")


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def where_is(path: str) -> str:
    """`local` (a directory here), `hub` (an id resolve_model_dir downloads at run time) or `missing`."""
    from obim.merging.checkpoint import looks_like_hub_id

    if Path(path).expanduser().exists():
        return "local"
    return "hub" if looks_like_hub_id(path) else "missing"


def cost_report(plan: dict, sal: dict, merged: dict, device: str) -> dict[str, Any]:
    """The paper's Table 10 figures for this job: models merged, their size, GPUs, saliency time per sample and in
    all, and merge time (cached statistics and merges carry the times measured when they were computed)."""
    import torch

    from obim.merging.checkpoint import open_checkpoint

    ck = open_checkpoint(plan["merge"]["base_model"])
    params = ck.n_params
    ck.release()
    samples = sum(s["samples"] for s in sal.values())
    seconds = sum(s["seconds"] for s in sal.values())
    return {"models": plan["n_models"], "params_b": round(params / 1e9, 3),
            "gpus": torch.cuda.device_count() if device.startswith("cuda") else 0,
            "gpu_name": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
            "hessian_s_per_sample": round(seconds / samples, 5) if samples else None,
            "saliency_s": round(seconds, 3) if sal else None, "merge_s": merged["merge_s"]}


def _judge_pending(result: dict) -> bool:
    """A result with an unjudged AlpacaEval score, now that a judge is configured: redo the job (from the caches;
    cached_eval judges the saved outputs)."""
    from .judge import JUDGED, judge_configured

    recs = [result, *(result.get("individual") or {}).values()]
    missing = any(v is None and t in JUDGED for r in recs for t, v in (r.get("scores") or {}).items())
    return missing and judge_configured()


def input_fingerprints(plan: dict) -> dict[str, str]:
    """The fingerprint of every model the job reads (obim.bench.cache.model_fingerprint): a result is reused only for
    the same weights, not only the same paths (a retrained expert, a zoo rebuilt by a new recipe)."""
    paths = {"base": plan["merge"]["base_model"], **{m["name"]: m["path"] for m in plan["merge"]["models"]}}
    return {name: model_fingerprint(path) for name, path in paths.items()}


def run_job(cfg: Any, job_dir: str | Path, overrides: list[str] | None = None, job_name: str = "") -> dict:
    """Run one sweep job into job_dir; returns its result (`skipped` set when result.json already held it), or for
    a dry run {dry_run: True, summary}. Its stages are reported to the sweep's console (obim.bench.joblog.status)."""
    job_dir = Path(job_dir)
    plan = plan_job(cfg, overrides)
    h = plan_hash(plan)
    if cfg.dry_run:
        check_tasks(plan["tasks"])
        paths = {"base": plan["merge"]["base_model"], **{m["name"]: m["path"] for m in plan["merge"]["models"]}}
        where = {n: where_is(p) for n, p in paths.items()}
        write_json(job_dir / "plan.json", {"config_hash": h, **plan, "paths": where})
        summary = f"{plan['method']} of {', '.join(plan['models'])} -> {len(plan['tasks'])} tasks"
        missing = [f"{n} ({paths[n]})" for n, w in where.items() if w == "missing"]
        if missing and not plan.get("zoo"):  # the zoo's models appear on the first real job
            summary += f"; not found yet: {', '.join(missing)}"
        return {"dry_run": True, "summary": summary}
    progress = bool(cfg.progress)
    if plan.get("zoo") and not (Path(plan["zoo"]) / "zoo.json").is_file():
        status("building the toy zoo (first use)", "zoo")
    ensure_zoo(plan, progress)  # first: a zoo rebuilt for a new recipe changes the inputs below
    inputs = input_fingerprints(plan)
    prev = read_json(job_dir / "result.json")
    if prev is not None and prev.get("config_hash") == h and prev.get("inputs") == inputs and not _judge_pending(prev):
        return {**prev, "skipped": True}  # result.json holds this config's result (the flag is not stored)
    (job_dir / "result.json").unlink(missing_ok=True)
    cache = Path(str(cfg.cache_dir))
    device = auto_device(str(cfg.device))
    eval_device = auto_device(str(cfg.eval.device))

    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with PeakMemory() as mem:
        sal: dict[str, dict] = {}
        for spec in plan["merge"]["models"]:
            if spec["name"] in plan["validation"]:
                status(f"saliency of {spec['name']}", "saliency")
                sal[spec["name"]] = cached_saliency(cache, spec["name"], spec["path"],
                                                    plan["validation"][spec["name"]], device, progress)
                spec["hdiag"] = sal[spec["name"]]["hdiag"]
        status("merge", "merge")
        merged = cached_merge(cache, plan["merge"], device, progress)
    _fault("merge")
    peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None

    status("eval of the merged model", "eval")
    ev = cached_eval(cache, merged["dir"], plan["tasks"], plan["eval"], eval_device, plan["allow_code"])
    individual = {}
    if plan["individual"]:
        for name, path in [("base", plan["merge"]["base_model"])] + [(m["name"], m["path"])
                                                                      for m in plan["merge"]["models"]]:
            status(f"eval of {name}", "eval")
            r = cached_eval(cache, path, plan["tasks"], plan["eval"], eval_device, plan["allow_code"])
            individual[name] = {"scores": r["scores"], "avg": r["avg"], "eval_s": r["eval_s"]}
    _fault("eval")
    if not cfg.keep_merged:
        shutil.rmtree(merged["dir"], ignore_errors=True)

    cost = cost_report(plan, sal, merged, device)
    result = {
        "config_hash": h, "config": _plain(cfg), "plan": plan, "experiment": plan["experiment"],
        "setting": plan["setting"], "method": plan["method"], "models": plan["models"],
        "n_models": plan["n_models"], "main": plan["main"], "overrides": plan["overrides"],
        "scores": {t: ev["scores"][t] for t in plan["tasks"]}, "avg": ev["avg"], "individual": individual,
        "outputs": ev.get("outputs"),
        "saliency_s": cost["saliency_s"] or 0, "saliency_s_per_sample": cost["hessian_s_per_sample"],
        "merge_s": merged["merge_s"], "eval_s": ev["eval_s"],
        "peak_rss_mb": round(mem.peak / 2**20, 1), "peak_gpu_mb": peak_gpu,
        "device": device, "gpus": cost["gpus"], "cost": cost,
        "cached": {"saliency": all(s["cached"] for s in sal.values()) if sal else None,
                   "merge": merged["cached"], "eval": ev["cached"]},
        "merged_dir": merged["dir"] if cfg.keep_merged else None, "saliency": sal, "inputs": inputs,
        "obim_version": __version__, "job": job_name,
    }
    # log before result.json exists: a job whose logging failed is redone (from the caches) by a rerun
    from .tracking import log_job

    status("logging the result", "log")
    result["wandb_dir"] = log_job(_plain(cfg.tracking), job_dir, job_name or job_dir.name, result)
    write_json(job_dir / "result.json", result)
    return result
