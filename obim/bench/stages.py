"""A job's stages: saliency -> merge -> evaluate, each a function of the plan (obim.bench.plan.JobPlan) and of what
the stage before returned, and the record they make together (`JobResult`, written as result.json). Each stage goes
through a content-addressed cache (obim.bench.cache) keyed by what changes its output: saliency statistics per
(model weights, validation texts, statistics version), merged models per (resolved merge config, the method's and
the driver's declared versions), evaluations per (model weights, tasks and their files, backend, scoring version).
The package's version is in no key: a release changes no cached result by itself. obim.bench.pipeline runs them.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from obim.merging.errors import ObimError

from .cache import digest, locked, model_fingerprint, read_json, write_json
from .evaluation import HF_MODEL_ARGS, InPlace, free_device
from .plan import JobPlan

if TYPE_CHECKING:
    from obim.merging.config import MergeConfig

# result.json's layout (docs/sweep.md "Sweep results"); older files are refused, not half-read. 3: stderr, n,
# avg_stderr; 4: samples (lm-eval's per-sample records, kept in the job folder)
RESULT_SCHEMA = 4


class Reporter(Protocol):
    """Where a job says what it is doing (the sweep's console through its job session; a search trial: its log)."""

    def status(self, text: str, stage: str | None = None) -> None: ...

    def note(self, text: str, warning: bool = False, logger: str = "obim.bench.sweep") -> None: ...


class Quiet:
    """No progress; notes (a set-up line, a warning) to stderr, which a quiet search sends to its log."""

    def status(self, text: str, stage: str | None = None) -> None:
        pass

    def note(self, text: str, warning: bool = False, logger: str = "obim.bench.sweep") -> None:
        print(f"warning: {text}" if warning else text, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Saliency:
    hdiag: str  # the statistics file (of the method's kind: hdiag, gram or fisher; the key predates the others)
    cached: bool
    seconds: float  # as measured when it was computed
    samples: int
    tokens: int
    seconds_per_sample: float


@dataclass(frozen=True)
class Merged:
    dir: str | None  # None: merged in place, into the evaluator's weights (`in_place`), never written
    cached: bool
    merge_s: float
    tensors: int
    bytes: int
    in_place: MergeConfig | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class Evaluated:
    scores: dict[str, float | None]
    avg: float | None
    eval_s: float
    cached: bool
    outputs: dict[str, str] | None = None  # saved generations of judged benchmarks
    load_s: float | None = None  # an in-place merge: the seconds merging it into the evaluator's weights took
    stderr: dict[str, float | None] = field(default_factory=dict)  # percent points; None: lm-eval gave none
    n: dict[str, int | None] = field(default_factory=dict)  # items each score is over
    # lm-eval's per-sample records: task -> leaf task -> {"file": JSONL path, "metric": primary metric key or None}
    samples: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)

    @property
    def avg_stderr(self) -> float | None:
        """The average's standard error: sqrt(sum se_i^2) / k, the benchmarks being on disjoint items."""
        return avg_stderr([self.stderr.get(t) for t in self.scores]) if self.avg is not None else None


def saliency_path(
    cache: Path, name: str, path: str, texts: list[str], v: dict, device: str, kind: str = "hdiag"
) -> Path:
    """Where the model's statistics file of `kind` for these validation texts lives in the cache (whether or not
    it is there)."""
    from obim.merging.determinism import kernel_tag
    from obim.merging.statistics import KINDS

    ident = [model_fingerprint(path), digest(texts), v["max_length"], v["batch_size"], kernel_tag(device)]
    key = digest([*ident, f"{kind}-v{KINDS[kind].version}"])
    return cache / "saliency" / f"{name}-{key if kind == 'hdiag' else kind + '-' + key}.safetensors"


def cached_saliency(
    cache: Path, name: str, path: str, v: dict, device: str, progress: bool, kind: str = "hdiag"
) -> dict[str, Any]:
    """The model's statistics file of `kind` for its validation set: computed once, reused by every job."""
    from obim.merging.statistics import compute_statistics, save_statistics

    from .validation import build_texts

    texts = build_texts(v)
    out = saliency_path(cache, name, path, texts, v, device, kind)
    with locked(out):
        hit = out.is_file()
        if not hit:
            free_device(device)  # an evaluator kept from an earlier job holds the GPU
            stats, meta = compute_statistics(
                kind,
                path,
                texts,
                max_length=v["max_length"],
                batch_size=v["batch_size"],
                device=device,
                progress=progress,
                source="+".join(f"{s}:{n}" for s, n in v["sources"].items()),
            )
            save_statistics(stats, out, meta)
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata() or {}
    return {
        "hdiag": str(out),
        "cached": hit,
        "seconds": float(meta.get("seconds", 0)),
        "samples": int(meta.get("samples", len(texts))),
        "tokens": int(meta.get("tokens", 0)),
        "seconds_per_sample": float(meta.get("seconds_per_sample", 0)),
    }


def merge_key(cfg: MergeConfig) -> str:
    """A merge's cache key: the resolved config with each input's fingerprint, the method's and the driver's
    declared versions."""
    from obim.merging.merge import DRIVER_VERSION

    ident = cfg.to_dict()
    ident["base_model"] = model_fingerprint(cfg.base_model)
    for m in ident["models"]:
        m["path"] = model_fingerprint(m["path"])
    return digest([ident, cfg.method.code_version(), DRIVER_VERSION])


def cached_merge(cache: Path, cfg: MergeConfig, device: str, progress: bool) -> dict[str, Any]:
    """The merged model of this (checked) config: merged once, reused by every job with the same config, inputs and
    declared versions of the method and the driver."""
    from obim.merging.merge import merge

    out = cache / "merges" / f"{cfg.method.name}-{merge_key(cfg)}"
    stamp = out / "obim_merge.json"
    with locked(out):
        info = read_json(stamp)
        if info is None:
            if out.exists():
                shutil.rmtree(out)  # left by a crash between the rename and the stamp
            free_device(device)
            res = merge(cfg, out, device=device, progress=progress)
            info = {"merge_s": round(res.merge_s, 3), "tensors": res.tensors, "bytes": res.bytes_written}
            write_json(stamp, info)
            return {"dir": str(out), "cached": False, **info}
    return {"dir": str(out), "cached": True, **info}


def avg_stderr(errors: list[float | None]) -> float | None:
    """The standard error of a mean of k independent scores: sqrt(sum se_i^2) / k; None when one is unknown."""
    if not errors or any(e is None for e in errors):
        return None
    return math.sqrt(sum(e * e for e in errors if e is not None)) / len(errors)


def score_avg(scores: dict[str, float | None]) -> float | None:
    """The mean over every benchmark; None when one is missing (an unjudged AlpacaEval): never a partial mean
    standing in for the paper's average."""
    vals = list(scores.values())
    return None if not vals or any(v is None for v in vals) else sum(vals) / len(vals)


def cached_eval(
    cache: Path,
    model_dir: str | InPlace,
    tasks: list[str],
    ev: dict,
    device: str,
    allow_code: bool = False,
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """{task: score} of one model through lm-eval, cached by (weights, tasks, backend and its options). A judged
    score left empty is filled from the saved outputs once a judge is configured. An in-place merge (`InPlace`)
    is known by its merge's key (merge_key: its inputs' fingerprints and declared versions; merges are
    deterministic)."""
    import lm_eval

    from obim.merging.determinism import kernel_tag

    from .evaluation import SCORING_VERSION, measure_model, tasks_digest
    from .judge import JUDGED, judge_configured, run_judge

    if isinstance(model_dir, InPlace):
        from obim.merging.config import load_config

        # the merge's device too: its kernels may change the merged bytes (an SVD, a solve)
        ident = "merge:" + merge_key(load_config(model_dir.config)) + ":" + kernel_tag(model_dir.merge_device)
        model = "in place"
    else:
        ident, model = model_fingerprint(model_dir), model_dir
    key = digest(
        [
            ident,
            tasks,
            ev,
            kernel_tag(device),
            tasks_digest(tasks),
            lm_eval.__version__ if hasattr(lm_eval, "__version__") else "",
            SCORING_VERSION,
        ]
    )
    out = cache / "evals" / f"{key}.json"
    outputs = cache / "evals" / key  # judged outputs and lm-eval's per-sample records
    with locked(out):
        hit = read_json(out)
        if hit is not None:
            missing = [t for t, v in hit["scores"].items() if v is None and t in (hit.get("outputs") or {})]
            if missing and judge_configured():
                for t in missing:
                    hit["scores"][t] = run_judge(Path(hit["outputs"][t]))
                hit["avg"] = score_avg(hit["scores"])
                write_json(out, hit)
            return {**hit, "cached": True, "samples": _located(hit.get("samples") or {}, outputs)}
        t0 = time.perf_counter()
        measured = measure_model(
            model_dir,
            tasks,
            backend=ev["backend"],
            batch_size=ev["batch_size"],
            limit=ev["limit"],
            device=device,
            model_args=ev["model_args"],
            num_fewshot=ev.get("num_fewshot"),
            outputs_dir=outputs,
            allow_code=allow_code,
            say=(reporter or Quiet()).note,
        )
        scores = measured["scores"]
        rec = {
            "model": model,
            "scores": scores,
            "avg": score_avg(scores),
            "stderr": measured["stderr"],
            "n": measured["n"],
            "samples": measured.get("samples") or {},  # relative to the outputs folder
            "eval_s": round(time.perf_counter() - t0, 3),
        }
        if "load_s" in measured:
            rec["load_s"] = measured["load_s"]
        judged = {t: str(outputs / "alpaca_eval_outputs.json") for t in tasks if t in JUDGED}
        if judged:
            rec["outputs"] = judged
        write_json(out, rec)
    return {**rec, "cached": False, "samples": _located(rec.get("samples") or {}, outputs)}


def _located(samples: dict, folder: Path) -> dict:
    """A samples index with each file's path made absolute (from `folder`)."""
    return {t: {leaf: {**e, "file": str(folder / e["file"])} for leaf, e in d.items()} for t, d in samples.items()}


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
            with contextlib.suppress(psutil.Error):
                total += ch.memory_info().rss
        return total

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> PeakMemory:
        self.peak = self._rss()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss())


def _zoo_recipe(plan: JobPlan) -> dict:
    from .zoo import RECIPE, quick_recipe, seeded

    return seeded(quick_recipe() if plan.zoo_recipe == "quick" else RECIPE, plan.zoo_seed)


def zoo_record(plan: JobPlan) -> dict[str, Any] | None:
    """The zoo a toy job ran on, as its zoo.json names it (None: no zoo): the tables name their draws by it and
    the console compares it with the reference's."""
    if not plan.zoo:
        return None
    stamp = read_json(Path(plan.zoo) / "zoo.json") or {}
    keep = ("recipe_hash", "fingerprint", "cpu_kernels")
    return {"seed": plan.zoo_seed, **{k: stamp.get(k) for k in keep}}


def zoo_is_current(plan: JobPlan) -> bool:
    """Whether the plan's zoo is built by its recipe (else ensure_zoo builds it)."""
    from .zoo import is_current

    return bool(plan.zoo) and is_current(plan.zoo, _zoo_recipe(plan))


def ensure_zoo(plan: JobPlan, progress: bool, status: Callable[[str], None] | None = None) -> None:
    """The toy zoo the plan's models live in, built on first use (a new recipe rebuilds it); `status` hears its
    stages and steps (the job's console line)."""
    if not plan.zoo:
        return
    from .zoo import build

    recipe = _zoo_recipe(plan)
    with locked(Path(plan.zoo).parent / f".{Path(plan.zoo).name}"):
        build(
            plan.zoo,
            recipe=recipe,
            evaluate=plan.zoo_recipe != "quick",
            progress=progress,
            allow_code=plan.allow_code,
            status=status,
        )


def check_tasks(tasks: list[str]) -> None:
    """Every benchmark is a task or group lm-eval knows (its own, or obim's in obim/bench/tasks): one line otherwise."""
    from .evaluation import task_manager

    known = set(task_manager().all_tasks)
    for t in tasks:
        if t not in known:
            raise ObimError(
                f"experiment.benchmarks: '{t}' is not an lm-eval task or group (lm-eval "
                f"{_lm_eval_version()}, obim tasks in {Path(__file__).parent / 'tasks'})"
            )


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def where_is(path: str) -> str:
    """`local` (a directory here), `hub` (an id resolve_model_dir downloads at run time) or `missing`."""
    from obim.merging.checkpoint import looks_like_hub_id

    if Path(path).expanduser().exists():
        return "local"
    return "hub" if looks_like_hub_id(path) else "missing"


def cost_report(plan: JobPlan, saliency: dict[str, Saliency], device: str) -> dict[str, Any]:
    """This job's figures for the paper's Table 10 beyond its timings: the size of the models, the GPUs, saliency
    time per sample (cached statistics carry the time measured when they were computed)."""
    import torch

    from obim.merging.checkpoint import open_checkpoint

    ck = open_checkpoint(plan.merge["base_model"])
    params = ck.n_params
    ck.release()
    samples = sum(s.samples for s in saliency.values())
    seconds = sum(s.seconds for s in saliency.values())
    return {
        "params_b": round(params / 1e9, 3),
        "gpus": torch.cuda.device_count() if device.startswith("cuda") else 0,
        "gpu_name": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
        # 4 significant digits: 5 decimals left a few ms per sample (the toy's) only ~3 digits
        "hessian_s_per_sample": float(f"{seconds / samples:.4g}") if samples else None,
    }


def judge_pending(result: dict) -> bool:
    """A result with an unjudged AlpacaEval score, now that a judge is configured: redo the job (from the caches;
    cached_eval judges the saved outputs)."""
    from .judge import JUDGED, judge_configured

    recs = [result, *(result.get("individual") or {}).values()]
    missing = any(v is None and t in JUDGED for r in recs for t, v in (r.get("scores") or {}).items())
    return missing and judge_configured()


def input_paths(plan: JobPlan) -> dict[str, str]:
    """Every model the job reads, by name: the base first, then the merged models in order."""
    return {"base": plan.merge["base_model"], **{m["name"]: m["path"] for m in plan.merge["models"]}}


def input_fingerprints(plan: JobPlan) -> dict[str, str]:
    """The fingerprint of every model the job reads (obim.bench.cache.model_fingerprint): a result is reused only
    for the same weights, not only the same paths (a retrained expert, a zoo rebuilt by a new recipe)."""
    return {name: model_fingerprint(path) for name, path in input_paths(plan).items()}


# ------------------------------------------------------------------------------------------------- stages


def saliency_stage(plan: JobPlan, reporter: Reporter) -> dict[str, Saliency]:
    """Each saliency method's model: its statistics on its validation set."""
    rt = plan.runtime
    assert rt is not None  # plan_job sets it
    out = {}
    for name, path, v in _saliency_inputs(plan):
        reporter.status(f"saliency of {name}", "saliency")
        kind = plan.merge_config.method.statistics or "hdiag"
        out[name] = Saliency(**cached_saliency(rt.cache, name, path, v, rt.device, rt.progress, kind))
    return out


def _saliency_inputs(plan: JobPlan) -> list[tuple[str, str, dict]]:
    """(model name, its path, its validation spec) of each model the saliency stage computes statistics for."""
    return [
        (name, next(m["path"] for m in plan.merge["models"] if m["name"] == name), plan.validation[name].to_json())
        for name in plan.models
        if name in plan.validation
    ]


def saliency_paths(plan: JobPlan) -> dict[str, Path]:
    """Where the saliency stage of this plan finds or puts each model's statistics (its zoo built)."""
    from .validation import build_texts

    rt = plan.runtime
    assert rt is not None
    kind = plan.merge_config.method.statistics or "hdiag"
    inputs = _saliency_inputs(plan)
    return {name: saliency_path(rt.cache, name, path, build_texts(v), v, rt.device, kind) for name, path, v in inputs}


def in_place_refusal(cfg: MergeConfig, model_args: Any) -> tuple[str | None, int, int]:
    """(why this merge cannot be evaluated in place, None when it can; its tensor count; its bytes), from the
    inputs' headers: the evaluator is built from the base's directory, so the merged model must have the base's
    shapes, and its dtype unless the evaluator sets its own; vLLM's workers must share the evaluator's process
    (no tensor or pipeline parallelism)."""
    from obim.merging.merge import MergeStream

    with MergeStream(cfg) as stream:
        tensors, size = len(stream.plans), stream.total_bytes
        rows = [p.name for p in stream.plans if p.shared_rows is not None]
    explicit = isinstance(model_args, dict) and model_args.get("dtype") not in (None, "auto")
    if rows:
        return f"its vocabulary rows differ from the base's ({rows[0]})", tensors, size
    for k in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
        if isinstance(model_args, dict) and int(model_args.get(k) or 1) > 1:
            return f"eval.model_args.{k}={model_args[k]} runs vLLM's workers in processes of their own", tensors, size
    if cfg.dtype and not explicit:
        return f"dtype {cfg.dtype} with the evaluator's dtype left to the model's config", tensors, size
    return None, tensors, size


def merge_stage(plan: JobPlan, saliency: dict[str, Saliency], reporter: Reporter) -> Merged:
    """The merged model: written (cached by its key) when the job keeps it or it cannot be evaluated in place;
    otherwise only planned here, and merged into the evaluator's weights by the evaluation (no disk)."""
    rt = plan.runtime
    assert rt is not None and plan.eval is not None
    cfg = plan.with_statistics({n: s.hdiag for n, s in saliency.items()})
    if not rt.keep_merged:
        args = plan.eval.model_args
        if args is None and plan.eval.backend == "hf":
            args = HF_MODEL_ARGS  # what measure_model gives the hf evaluator
        why, tensors, size = in_place_refusal(cfg, args)
        if why is None:
            return Merged(dir=None, cached=False, merge_s=0.0, tensors=tensors, bytes=size, in_place=cfg)
        reporter.note(f"the merged model is written to disk for its evaluation: {why}")
    reporter.status("merge", "merge")
    return Merged(**cached_merge(rt.cache, cfg, rt.device, rt.progress))


def _evaluated(rec: dict) -> Evaluated:
    return Evaluated(
        scores=rec["scores"],
        avg=rec["avg"],
        eval_s=rec["eval_s"],
        load_s=rec.get("load_s"),
        cached=rec["cached"],
        outputs=rec.get("outputs"),
        stderr=rec.get("stderr") or {},
        n=rec.get("n") or {},
        samples=rec.get("samples") or {},
    )


def evaluate_stage(plan: JobPlan, merged: Merged, reporter: Reporter) -> tuple[Evaluated, dict[str, Evaluated]]:
    """The merged model's scores, and (plan `individual`) the base's and each expert's. The individual models come
    first (cached after a sweep's first job): an evaluator kept for in-place merges is then built after them, and
    the next job's merge finds it."""
    rt, ev = plan.runtime, plan.eval
    assert rt is not None and ev is not None
    tasks, evp = list(plan.tasks), ev.to_json()
    individual = {}
    if plan.individual:
        for name, path in input_paths(plan).items():
            reporter.status(f"eval of {name}", "eval")
            individual[name] = _evaluated(
                cached_eval(rt.cache, path, tasks, evp, rt.eval_device, plan.allow_code, reporter)
            )
    if merged.in_place is not None:
        from obim.merging.merge import resolved_config

        cfg = merged.in_place
        model: str | InPlace = InPlace(resolved_config(cfg), cfg.base_model, cfg.tokenizer_path, rt.device)
        reporter.status("merge and eval of the merged model (in place)", "eval")
    else:
        assert merged.dir is not None
        model = merged.dir
        reporter.status("eval of the merged model", "eval")
    merged_ev = _evaluated(cached_eval(rt.cache, model, tasks, evp, rt.eval_device, plan.allow_code, reporter))
    return merged_ev, individual


@dataclass(frozen=True)
class JobResult:
    """What a job computed, in one place each: result.json is `to_json()` (docs/sweep.md "Sweep results")."""

    config_hash: str
    plan: JobPlan
    inputs: dict[str, str]
    saliency: dict[str, Saliency]
    merged: Merged
    evaluated: Evaluated
    individual: dict[str, Evaluated]
    cost: dict[str, Any]
    peak_rss_mb: float
    peak_gpu_mb: float | None
    device: str
    merged_kept: bool
    job: str
    zoo: dict[str, Any] | None = None  # the toy zoo's draw: {seed, recipe_hash, fingerprint, cpu_kernels}

    def to_json(self) -> dict[str, Any]:
        from obim.merging.version import obim_version

        ev = self.evaluated
        return {
            "schema": RESULT_SCHEMA,
            "config_hash": self.config_hash,
            "job": self.job,
            "obim_version": obim_version(),
            "config": self.plan.config,
            "plan": self.plan.to_json(),
            "inputs": self.inputs,
            "scores": {t: ev.scores[t] for t in self.plan.tasks},
            "avg": ev.avg,
            # each score's standard error (percent points; None where lm-eval gave none) and its item count
            "stderr": {t: ev.stderr.get(t) for t in self.plan.tasks},
            "n": {t: ev.n.get(t) for t in self.plan.tasks},
            "avg_stderr": ev.avg_stderr,
            "outputs": ev.outputs,
            # model ("merged", or an individual's name) -> task -> leaf task -> {file, metric}: lm-eval's per-sample
            # records (the evaluation cache's; run_job copies them into the job folder)
            "samples": {"merged": ev.samples, **{n: e.samples for n, e in self.individual.items()}},
            "individual": {
                n: {
                    "scores": e.scores,
                    "avg": e.avg,
                    "eval_s": e.eval_s,
                    "stderr": e.stderr,
                    "n": e.n,
                    "avg_stderr": e.avg_stderr,
                }
                for n, e in self.individual.items()
            },
            "saliency_s": round(sum(s.seconds for s in self.saliency.values()), 3),
            "merge_s": self.merged.merge_s,
            "eval_s": ev.eval_s,
            "saliency": {n: asdict(s) for n, s in self.saliency.items()},
            "cost": self.cost,
            "peak_rss_mb": self.peak_rss_mb,
            "peak_gpu_mb": self.peak_gpu_mb,
            "device": self.device,
            "cached": {
                "saliency": all(s.cached for s in self.saliency.values()) if self.saliency else None,
                "merge": self.merged.cached,
                "eval": ev.cached,
            },
            "merged_dir": self.merged.dir if self.merged_kept else None,
            "zoo": self.zoo,
        }


def keep_samples(result: dict[str, Any], job_dir: Path) -> None:
    """A result's per-sample records into its job folder (samples/<model>/<leaf task>.jsonl; each written whole,
    then renamed), result["samples"] pointing at them, relative to the folder: the job's items stay comparable
    after the caches are cleared. Each record as lm-eval logged it less its document, prompts and raw responses
    (a real MMLU's 5-shot prompts are ~100 MB a model; the evaluation cache keeps them whole): the item's ids and
    hashes, target, filtered answer and metric values. A record file gone from the cache is left out (that job's
    items are then not compared)."""
    for model, tasks in (result.get("samples") or {}).items():
        for entries in tasks.values():
            for leaf in list(entries):
                e = entries[leaf]
                src = Path(e["file"])
                if not src.is_absolute():  # already in a job folder (a record read back)
                    continue
                if not src.is_file():
                    del entries[leaf]
                    continue
                rel = Path("samples") / model / f"{leaf}.jsonl"
                dst = job_dir / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                tmp = dst.with_name(dst.name + ".tmp")
                with src.open() as fin, tmp.open("w") as fout:
                    for line in fin:
                        fout.write(json.dumps(_trimmed(json.loads(line)), ensure_ascii=False) + "\n")
                tmp.replace(dst)
                e["file"] = str(rel)


_KEPT = ("doc_id", "doc_hash", "prompt_hash", "target_hash", "filter", "metrics", "target", "filtered_resps")


def _trimmed(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: rec[k] for k in (*_KEPT, *rec.get("metrics", ())) if k in rec}
