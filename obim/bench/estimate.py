"""What a real run of a job will cost, from its plan (obim.bench.plan.JobPlan): merges, the saliency forward passes
(samples, batches, tokens of each model's validation set) and, per benchmark, the lm-eval requests of every model the
job evaluates (the merged model, and with eval.individual the base and each expert alone) with an upper bound on the
tokens they generate. The dry run writes it into plan.json under "cost" and its job line (obim.bench.pipeline); the
console sums it over the sweep, counting once what jobs share (obim.bench.console). The counts are the work the plan
implies: what the caches already hold is not subtracted.

`estimate(plan, read=True)` reads what a run would read to count (never weights): each model's validation texts
and its tokenizer, and the evaluated tasks' datasets through lm-eval's own task objects. What cannot be read here is
a null with the reason beside it. `read=False` (dry_run=plan) reads nothing: samples and batches only.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cache import digest
from .plan import JobPlan

BASIS = (
    "the work the plan implies; what the caches ($OBIM_CACHE: statistics, merged models, evaluations) already hold "
    "is not subtracted"
)
# lm-eval's hf model generates at most this many tokens when a task's generation_kwargs set none (its vllm model
# too, unless its model_args set max_gen_toks)
MODEL_MAX_GEN_TOKS = 256
NOT_READ = "not read (dry_run=plan reads nothing; dry_run=true counts)"


def why(e: BaseException) -> str:
    """An exception as one line: its type and its message's first line (200 characters at most)."""
    line = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {line[:200]}" if line else type(e).__name__


def count(v: int | None) -> str:
    """A count as the dry run prints it: thousands separated, `?` when it could not be counted."""
    return "?" if v is None else f"{v:,}"


# ------------------------------------------------------------------------------------------------ saliency


@functools.cache
def _tokenizer(path: str) -> Any:
    """One tokenizer per model per process (a sweep's jobs share them); the one compute_hdiag loads."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


_TOKENS: dict[str, int] = {}  # (model, texts, max_length) -> tokens: the jobs of a sweep share validation sets


def count_tokens(path: str, texts: list[str], max_length: int) -> int:
    """The tokens compute_hdiag runs forward on these texts: each text tokenized as it tokenizes it (special
    tokens added, truncated to max_length); padding is masked out there, so it is not counted here."""
    key = digest([path, digest(texts), max_length])
    if key not in _TOKENS:
        enc = _tokenizer(path)(texts, truncation=True, max_length=max_length)
        _TOKENS[key] = sum(len(ids) for ids in enc["input_ids"])
    return _TOKENS[key]


def saliency_cost(plan: JobPlan, read: bool = True) -> dict[str, dict[str, Any]]:
    """Per model that needs statistics (the saliency methods' models): its validation set's samples, the forward
    batches over them, their tokens (null with `why` when the texts or the tokenizer cannot be read here)."""
    from .validation import build_texts

    unbuilt = bool(plan.zoo) and not (Path(str(plan.zoo)) / "zoo.json").is_file()
    paths = {m["name"]: m["path"] for m in plan.merge["models"]}
    out: dict[str, dict[str, Any]] = {}
    for name, v in plan.validation.items():
        samples, tokens, why = sum(v.sources.values()), None, None
        if not read:
            why = NOT_READ
        elif unbuilt:  # its validation files and models are written by the first job
            why = "the toy zoo is not built yet (the first job of a run builds it)"
        else:
            try:
                texts = build_texts(v.to_json())
                samples = len(texts)
                tokens = count_tokens(paths[name], texts, v.max_length)
            except Exception as e:  # a missing file, dataset or tokenizer; too few samples in a source
                why = why(e)
        kind = plan.merge_config.method.statistics or "hdiag"
        out[name] = {
            "path": paths[name],
            "kind": kind,
            "samples": samples,
            # forward passes; Fisher's are one forward and one backward pass per sample
            "batches": samples if kind == "fisher" else math.ceil(samples / v.batch_size),
            "batch_size": v.batch_size,
            "max_length": v.max_length,
            "tokens": tokens,
            "why": why,
            "key": digest([paths[name], v.to_json(), kind]),  # the same statistics: computed once per sweep
        }
    return out


# ------------------------------------------------------------------------------------------------ evaluation


@dataclass(frozen=True)
class Leaf:
    """One lm-eval task a benchmark runs, as its task object has it (every doc of its evaluated split)."""

    name: str
    output_type: str  # multiple_choice, generate_until, loglikelihood, loglikelihood_rolling
    per_doc: tuple[int, ...]  # requests each doc makes: its choices (twice with acc_mutual_info), else 1
    repeats: int
    max_gen_toks: int | None  # the task's generation_kwargs; None: the model's default

    def docs(self, limit: int | float | None) -> int:
        """Docs lm-eval scores under --limit (evaluator_utils.get_sample_size: a count, or a fraction rounded up)."""
        n = len(self.per_doc)
        if limit is None:
            return n
        return min(n, math.ceil(n * limit) if limit < 1 else int(limit))

    def prompts(self, limit: int | float | None) -> int:
        """Requests the model answers: lm-eval clones each `repeats` times."""
        return sum(self.per_doc[: self.docs(limit)]) * self.repeats


@functools.cache
def leaves(benchmark: str) -> tuple[Leaf, ...]:
    """The tasks a benchmark (a task, group or tag) runs, built by lm-eval (reading their datasets): once per
    process, every job of a sweep evaluates the same ones."""
    from lm_eval.models.utils import normalize_gen_kwargs

    from .evaluation import task_manager

    out = []
    for name, task in sorted(task_manager().load([benchmark])["tasks"].items()):
        kind = task.OUTPUT_TYPE
        docs = task.eval_docs
        if kind == "multiple_choice":
            both = 2 if "acc_mutual_info" in getattr(task, "_metric_fn_list", {}) else 1  # unconditional lls too
            per_doc = tuple(both * len(task.doc_to_choice(d)) for d in docs)
        else:
            per_doc = (1,) * len(docs)
        most = None
        if kind == "generate_until":  # lm-eval's reading of its aliases (max_new_tokens...); 0: none set
            most = normalize_gen_kwargs(dict(task.config.generation_kwargs or {}), 0)["max_gen_toks"] or None
        out.append(Leaf(name, kind, per_doc, int(task.config.repeats or 1), most))
    return tuple(out)


def _model_max_gen_toks(backend: str, model_args: Any) -> int:
    """What the model generates at most when a task sets nothing: vllm's model_args max_gen_toks, else lm-eval's
    default (hf's is fixed)."""
    if backend != "vllm":
        return MODEL_MAX_GEN_TOKS
    if isinstance(model_args, dict) and model_args.get("max_gen_toks"):
        return int(model_args["max_gen_toks"])
    if isinstance(model_args, str):
        for kv in model_args.split(","):
            k, _, v = kv.partition("=")
            if k.strip() == "max_gen_toks" and v.strip().isdigit():
                return int(v)
    return MODEL_MAX_GEN_TOKS


def benchmark_cost(
    benchmark: str, limit: int | float | None, backend: str = "hf", model_args: Any = None
) -> dict[str, Any]:
    """One model's evaluation on one benchmark: docs, requests (prompts) and at most how many tokens it generates
    (generation: prompts x max_gen_toks; 0 for loglikelihood tasks)."""
    try:
        found = leaves(benchmark)
    except Exception as e:  # a dataset not readable here, a task whose optional dependencies are missing
        return {"docs": None, "prompts": None, "max_gen_tokens": None, "why": why(e)}
    default = _model_max_gen_toks(backend, model_args)
    return {
        "type": "+".join(sorted({lf.output_type for lf in found})),
        "subtasks": len(found),
        "docs": sum(lf.docs(limit) for lf in found),
        "prompts": sum(lf.prompts(limit) for lf in found),
        "max_gen_tokens": sum(
            lf.prompts(limit) * (lf.max_gen_toks or default) for lf in found if lf.output_type == "generate_until"
        ),
        "why": None,
    }


def eval_cost(plan: JobPlan, read: bool = True) -> dict[str, Any]:
    """Every model the job evaluates, and per benchmark one model's docs, prompts and generated-token bound (each
    model runs the same requests)."""
    from .stages import input_paths

    ev = plan.eval
    assert ev is not None  # plan_job sets it
    models: dict[str, str | None] = {"merged": None}
    if plan.individual:  # cached by their weights, tasks and eval options: shared by the sweep's jobs
        models.update(input_paths(plan))
    per_model = {}
    for task in plan.tasks:
        c = (
            benchmark_cost(task, ev.limit, ev.backend, ev.model_args)
            if read
            else {"docs": None, "prompts": None, "max_gen_tokens": None, "why": NOT_READ}
        )
        per_model[task] = {"column": plan.benchmarks.get(task, task), **c}
        if ev.num_fewshot and task in ev.num_fewshot:  # longer prompts, not more of them
            per_model[task]["num_fewshot"] = ev.num_fewshot[task]
    return {
        "models": models,
        "tasks": list(plan.tasks),  # their order (plan.json's keys are sorted)
        "limit": ev.limit,
        "key": digest([list(plan.tasks), ev.to_json()]),  # an individual model's evaluation: its path and this
        "per_model": per_model,
    }


def _total(values: list[int | None]) -> int | None:
    return None if any(v is None for v in values) else sum(v for v in values if v is not None)


def estimate(plan: JobPlan, read: bool = True) -> dict[str, Any]:
    """The job's cost (plan.json's "cost"): what it runs, counted from its plan; `read` False: nothing read."""
    sal = saliency_cost(plan, read)
    ev = eval_cost(plan, read)
    n = len(ev["models"])
    per = ev["per_model"].values()
    return {
        "basis": BASIS,
        "read": read,
        "merges": 1,
        "saliency": sal,
        "saliency_samples": sum(s["samples"] for s in sal.values()),
        "saliency_batches": sum(s["batches"] for s in sal.values()),
        "saliency_tokens": _total([s["tokens"] for s in sal.values()]) if sal else 0,
        "eval": ev,
        "eval_models": n,
        # every model the job evaluates, the individual ones included (the sweep total counts those once)
        "eval_prompts": None if (p := _total([c["prompts"] for c in per])) is None else n * p,
        "eval_max_gen_tokens": None if (g := _total([c["max_gen_tokens"] for c in per])) is None else n * g,
    }


def summary(cost: dict[str, Any]) -> str:
    """The job line's short form, e.g. `1 merge, saliency 250 samples/14,098 tokens, eval 5 models: 135 prompts,
    <= 4,800 generated tokens`."""

    read = cost["read"]  # dry_run=plan: the counts that need reading are left out, not shown as unknown
    parts = [f"{cost['merges']} merge{'s' * (cost['merges'] != 1)}"]
    if cost["saliency"]:
        tokens = f"/{count(cost['saliency_tokens'])} tokens" if read else ""
        parts.append(f"saliency {count(cost['saliency_samples'])} samples{tokens}")
    models = f"eval {cost['eval_models']} model{'s' * (cost['eval_models'] != 1)}"
    if read:
        models += f": {count(cost['eval_prompts'])} prompts, <= {count(cost['eval_max_gen_tokens'])} generated tokens"
    parts.append(models)
    return ", ".join(parts)


# ------------------------------------------------------------------------------------------------ sweep


def sweep_total(costs: list[dict[str, Any]]) -> dict[str, Any]:
    """The sweep's cost from its jobs' plan.json "cost": what jobs share (the same model's statistics on the same
    validation set, an individual model's evaluation on the same tasks and options) counted once, as the caches
    compute it once."""
    saliency: dict[str, dict] = {}
    evals: list[tuple[list[str], dict[str, dict]]] = []  # one per model evaluated: (tasks, {task: its cost})
    individual: set[tuple[str, str]] = set()
    for c in costs:
        for s in c["saliency"].values():
            saliency.setdefault(s["key"], s)
        ev = c["eval"]
        for path in ev["models"].values():
            if path is not None:
                if (path, ev["key"]) in individual:
                    continue
                individual.add((path, ev["key"]))
            evals.append((ev["tasks"], ev["per_model"]))
    benchmarks: dict[str, dict[str, Any]] = {}
    for tasks, per_model in evals:
        for task in tasks:
            b = per_model[task]
            t = benchmarks.setdefault(
                task, {"column": b["column"], "type": b.get("type"), "evaluations": 0, "why": b.get("why")}
            )
            t["evaluations"] += 1
            t["why"] = t["why"] or b.get("why")
            t.setdefault("all", []).append(b)
    for t in benchmarks.values():
        runs = t.pop("all")
        t["type"] = t["type"] or next((b["type"] for b in runs if b.get("type")), None)
        t["docs"] = _total([b["docs"] for b in runs])
        t["prompts"] = _total([b["prompts"] for b in runs])
        t["max_gen_tokens"] = _total([b["max_gen_tokens"] for b in runs])
    sal = list(saliency.values())
    return {
        "jobs": len(costs),
        "merges": sum(c["merges"] for c in costs),
        "saliency_runs": len(sal),
        "saliency_samples": sum(s["samples"] for s in sal),
        "saliency_batches": sum(s["batches"] for s in sal),
        "saliency_tokens": _total([s["tokens"] for s in sal]) if sal else 0,
        "saliency_why": next((s["why"] for s in sal if s["why"]), None),
        "evaluations": len(evals),
        "individual_evaluations": len(individual),
        "benchmarks": benchmarks,
        "prompts": _total([t["prompts"] for t in benchmarks.values()]),
        "max_gen_tokens": _total([t["max_gen_tokens"] for t in benchmarks.values()]),
    }
