"""One sweep job (experiments/sweep.py runs one per Hydra job): config -> saliency -> merge -> eval -> log.

`plan_job` turns the composed Hydra config into a plain plan (the merge config, the validation sets, the lm-eval
tasks), checking every option before anything is computed. `run_job` executes it with three content-addressed
caches (obim.cache): saliency statistics per (model, validation texts), merged models per resolved merge config,
evaluations per (model, tasks, backend). A job's `result.json` is written last, atomically: a rerun skips jobs whose
result.json holds the same config hash and redoes any other.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from . import __version__
from .cache import default_cache_dir, digest, locked, model_fingerprint, read_json, write_json
from .errors import ObimError

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
    own = dict(exp["models"][name].get("validation") or {})
    applies = v.get("models") is None or name in v["models"]
    src = v.get("source", "own")
    sources = own if (src == "own" or not applies) else {s: 0 for s in ([src] if isinstance(src, str) else src)}
    if not sources:
        raise ObimError(f"experiment.models.{name}.validation: no validation sources for model '{name}'")
    size = v.get("size")
    if applies and size is not None:
        if not isinstance(size, int) or size < 1:
            raise ObimError(f"validation.size: expected a positive integer, got {size!r}")
        if size < len(sources):
            raise ObimError(f"validation.size: {size} samples cannot cover {len(sources)} sources")
        return _split_evenly(size, list(sources))
    if any(int(n) < 1 for n in sources.values()):
        raise ObimError(f"validation.size: needed when validation.source lists sources ({', '.join(sources)})")
    return {s: int(n) for s, n in sources.items()}


def plan_job(cfg: Any, overrides: list[str] | None = None) -> dict[str, Any]:
    """The job's plan from its composed config: everything it will compute, validated, nothing loaded."""
    from .config import load_config
    from .methods import get_method

    c = _plain(cfg)
    exp = c["experiment"]
    method = get_method(str(c["method"]["name"]))
    all_names = list(exp["models"])
    n = c.get("n_models")
    if n is None:
        n = exp.get("n_models") or len(all_names)
    if not isinstance(n, int) or not 1 <= n <= len(all_names):
        raise ObimError(f"n_models: expected 1..{len(all_names)} (experiment {exp['name']}), got {n!r}")
    names = all_names[:n]
    per_model = c["method"].get("per_model") or {}
    bad = [k for k in per_model if k not in names]
    if bad:
        raise ObimError(f"method.per_model: '{bad[0]}' is not one of the merged models ({', '.join(names)})")

    models, validation = [], {}
    for name in names:
        m = exp["models"][name]
        entry: dict[str, Any] = {"name": name, "path": str(m["path"])}
        retention = c.get("retention") if c.get("retention") is not None else m.get("retention")
        if method.retention_param == "retention":
            entry["retention"] = retention
        if per_model.get(name):
            entry["parameters"] = dict(per_model[name])
        models.append(entry)
        if method.uses_saliency:
            counts = _validation(c, exp, name)
            split = c["validation"]["split"]
            if split not in ("train", "dev"):
                raise ObimError(f"validation.split: expected train or dev (never test), got {split!r}")
            validation[name] = {
                "sources": counts, "split": split, "max_length": int(c["validation"]["max_length"]),
                "batch_size": int(c["validation"]["batch_size"]),
                "files": {s: exp["validation_data"].format(source=s, split=split) for s in counts},
            }
    merge_cfg = {"method": method.name, "base_model": str(exp["base"]), "models": models,
                 "parameters": dict(c["method"].get("parameters") or {}), "order": _order(c, exp, names),
                 "seed": int(c["seed"]), "dtype": None}
    # Validate now (unknown parameters, retention sums, orders): saliency methods get placeholder statistics.
    probe = {**merge_cfg, "models": [{**m, "hdiag": "(computed)"} if method.uses_saliency else m for m in models]}
    load_config(probe)

    tasks = list(exp["benchmarks"])
    ev = c["eval"]
    if ev["backend"] not in ("hf", "vllm"):
        raise ObimError(f"eval.backend: expected hf or vllm, got {ev['backend']!r}")
    from .tables import axis_of

    main = all(axis_of(o) is None for o in (overrides or []))
    return {
        "experiment": exp["name"], "setting": exp.get("setting"), "method": method.name, "models": names,
        "n_models": n, "merge": merge_cfg, "validation": validation, "tasks": tasks,
        "benchmarks": dict(exp["benchmarks"]),
        "eval": {k: ev[k] for k in ("backend", "batch_size", "limit", "model_args")},
        "individual": bool(ev.get("individual", True)), "main": main, "overrides": sorted(overrides or []),
        "zoo": exp.get("zoo"), "zoo_recipe": exp.get("zoo_recipe", "full"), "seed": int(c["seed"]),
    }


def plan_hash(plan: dict) -> str:
    """What makes two jobs the same job: everything but how it was asked for."""
    keep = {k: v for k, v in plan.items() if k not in ("overrides", "main")}
    return digest([keep, __version__])


# ------------------------------------------------------------------------------------------------- caches


def _texts(files: dict[str, str], counts: dict[str, int]) -> list[str]:
    from .validation import read_texts

    texts: list[str] = []
    for s, n in counts.items():
        got = read_texts(files[s], n)
        if len(got) < n:
            raise ObimError(f"{files[s]}: validation source '{s}' has {len(got)} samples, {n} requested")
        texts += got
    return texts


def cached_saliency(cache: Path, name: str, path: str, v: dict, device: str, progress: bool) -> dict[str, Any]:
    """The model's hdiag file for its validation set: computed once, reused by every job that needs it."""
    from .saliency import compute_hdiag, save_hdiag

    texts = _texts(v["files"], v["sources"])
    key = digest([model_fingerprint(path), digest(texts), v["max_length"], v["batch_size"], device, __version__])
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
    from .config import load_config
    from .merge import merge

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


def _tasks_fingerprint() -> str:
    from .evaluation import tasks_dir

    return digest([[p.name, p.read_text()] for p in sorted(Path(tasks_dir()).iterdir()) if p.is_file()])


def cached_eval(cache: Path, model_dir: str, tasks: list[str], ev: dict, device: str) -> dict[str, Any]:
    """{task: score} of one model through lm-eval, cached by (weights, tasks, backend and its options)."""
    import lm_eval

    from .evaluation import evaluate_model

    key = digest([model_fingerprint(model_dir), tasks, ev, device, _tasks_fingerprint(), lm_eval.__version__
                  if hasattr(lm_eval, "__version__") else "", __version__])
    out = cache / "evals" / f"{key}.json"
    with locked(out):
        hit = read_json(out)
        if hit is not None:
            return {**hit, "cached": True}
        t0 = time.perf_counter()
        scores = evaluate_model(model_dir, tasks, backend=ev["backend"], batch_size=ev["batch_size"],
                                limit=ev["limit"], device=device, model_args=ev["model_args"])
        rec = {"model": model_dir, "scores": scores, "avg": sum(scores.values()) / len(scores),
               "eval_s": round(time.perf_counter() - t0, 3)}
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
        build(plan["zoo"], recipe=recipe, evaluate=plan["zoo_recipe"] != "quick", progress=progress)


def run_job(cfg: Any, job_dir: str | Path, overrides: list[str] | None = None, job_name: str = "") -> dict | None:
    """Run one sweep job into job_dir; returns its result (None for a dry run)."""
    job_dir = Path(job_dir)
    plan = plan_job(cfg, overrides)
    h = plan_hash(plan)
    if cfg.dry_run:
        write_json(job_dir / "plan.json", {"config_hash": h, **plan})
        print(f"[plan] {job_name or job_dir.name}: {plan['method']} of {', '.join(plan['models'])} -> "
              f"{len(plan['tasks'])} tasks")
        return None
    prev = read_json(job_dir / "result.json")
    if prev is not None and prev.get("config_hash") == h:
        print(f"[skip] {job_name or job_dir.name}: result.json exists for this config")
        return prev
    (job_dir / "result.json").unlink(missing_ok=True)
    progress = bool(cfg.progress)
    cache = Path(str(cfg.cache_dir))
    device = auto_device(str(cfg.device))
    eval_device = auto_device(str(cfg.eval.device))
    ensure_zoo(plan, progress)

    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with PeakMemory() as mem:
        sal: dict[str, dict] = {}
        for spec in plan["merge"]["models"]:
            if spec["name"] in plan["validation"]:
                sal[spec["name"]] = cached_saliency(cache, spec["name"], spec["path"],
                                                    plan["validation"][spec["name"]], device, progress)
                spec["hdiag"] = sal[spec["name"]]["hdiag"]
        merged = cached_merge(cache, plan["merge"], device, progress)
    _fault("merge")
    peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None

    ev = cached_eval(cache, merged["dir"], plan["tasks"], plan["eval"], eval_device)
    individual = {}
    if plan["individual"]:
        for name, path in [("base", plan["merge"]["base_model"])] + [(m["name"], m["path"])
                                                                      for m in plan["merge"]["models"]]:
            r = cached_eval(cache, path, plan["tasks"], plan["eval"], eval_device)
            individual[name] = {"scores": r["scores"], "avg": r["avg"], "eval_s": r["eval_s"]}
    _fault("eval")
    if not cfg.keep_merged:
        shutil.rmtree(merged["dir"], ignore_errors=True)

    result = {
        "config_hash": h, "config": _plain(cfg), "plan": plan, "experiment": plan["experiment"],
        "setting": plan["setting"], "method": plan["method"], "models": plan["models"],
        "n_models": plan["n_models"], "main": plan["main"], "overrides": plan["overrides"],
        "scores": ev["scores"], "avg": ev["avg"], "individual": individual,
        "saliency_s": round(sum(s["seconds"] for s in sal.values()), 3),
        "saliency_s_per_sample": (round(sum(s["seconds"] for s in sal.values())
                                        / sum(s["samples"] for s in sal.values()), 5) if sal else None),
        "merge_s": merged["merge_s"], "eval_s": ev["eval_s"],
        "peak_rss_mb": round(mem.peak / 2**20, 1), "peak_gpu_mb": peak_gpu,
        "device": device, "gpus": torch.cuda.device_count() if device.startswith("cuda") else 0,
        "cached": {"saliency": all(s["cached"] for s in sal.values()) if sal else None,
                   "merge": merged["cached"], "eval": ev["cached"]},
        "merged_dir": merged["dir"] if cfg.keep_merged else None, "saliency": sal,
        "obim_version": __version__, "job": job_name,
    }
    # log before result.json exists: a job whose logging failed is redone (from the caches) by a rerun
    from .tracking import log_job

    result["wandb_dir"] = log_job(_plain(cfg.tracking), job_dir, job_name or job_dir.name, result)
    write_json(job_dir / "result.json", result)
    avg = f"{result['avg']:.1f}"
    print(f"[done] {job_name or job_dir.name}: avg {avg} "
          + " ".join(f"{plan['benchmarks'][t]}={v:.1f}" for t, v in result["scores"].items()))
    return result


from hydra.experimental.callback import Callback  # noqa: E402


class TablesCallback(Callback):
    """Hydra callback: when a multirun ends, aggregate its results into the paper's tables."""

    def on_multirun_end(self, config: Any, **_: Any) -> None:
        from .tables import write_tables

        if config.get("dry_run"):
            return
        sweep_dir = Path(str(config.hydra.sweep.dir))
        out = Path(str(config.results_dir)) / str(config.experiment.name)
        for p in write_tables(sweep_dir, out):
            print(f"[tables] {p}")
