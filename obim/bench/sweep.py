"""One sweep job (experiments/sweep.py runs one per Hydra job): plan -> saliency -> merge -> evaluate -> record ->
log. The plan (obim.bench.plan) is checked before anything runs; the stages (obim.bench.stages) go through the
caches. A job's `result.json` is written last, atomically: a rerun skips a job whose result.json holds the same plan
hash and input weights (and no score left for a judge now configured), and redoes any other from the caches.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from .cache import read_json, write_json
from .joblog import status
from .plan import auto_device, plain, plan_hash, plan_job
from .stages import (
    RESULT_SCHEMA,
    JobContext,
    JobResult,
    PeakMemory,
    check_tasks,
    cost_report,
    ensure_zoo,
    evaluate_stage,
    fault,
    input_fingerprints,
    input_paths,
    judge_pending,
    merge_stage,
    saliency_stage,
    where_is,
)


def dry_run(plan: dict, h: str, job_dir: Path) -> dict:
    """Write plan.json (the merge config and the tasks, where each model is found) and say what would run."""
    check_tasks(plan["tasks"])
    paths = input_paths(plan)
    where = {n: where_is(p) for n, p in paths.items()}
    write_json(job_dir / "plan.json", {"config_hash": h, **plan, "paths": where})
    summary = f"{plan['method']} of {', '.join(plan['models'])} -> {len(plan['tasks'])} tasks"
    missing = [f"{n} ({paths[n]})" for n, w in where.items() if w == "missing"]
    if missing and not plan.get("zoo"):  # the zoo's models appear on the first real job
        summary += f"; not found yet: {', '.join(missing)}"
    return {"dry_run": True, "summary": summary}


def previous_result(job_dir: Path, h: str, inputs: dict[str, str]) -> dict | None:
    """result.json when it holds this job's result: same schema, plan hash and input weights, nothing to judge."""
    prev = read_json(job_dir / "result.json")
    if prev is None or prev.get("schema") != RESULT_SCHEMA:
        return None  # none, or written by an older obim: redone (from the caches)
    if prev.get("config_hash") == h and prev.get("inputs") == inputs and not judge_pending(prev):
        return prev
    return None


def run_job(cfg: Any, job_dir: str | Path, overrides: list[str] | None = None, job_name: str = "") -> dict:
    """Run one sweep job into job_dir; returns its result (`skipped` set when result.json already held it), or for
    a dry run {dry_run: True, summary}. Its stages are reported to the sweep's console (obim.bench.joblog.status)."""
    job_dir = Path(job_dir)
    plan = plan_job(cfg, overrides)
    h = plan_hash(plan)
    if cfg.dry_run:
        return dry_run(plan, h, job_dir)
    ctx = JobContext(
        cache=Path(str(cfg.cache_dir)),
        device=auto_device(str(cfg.device)),
        eval_device=auto_device(str(cfg.eval.device)),
        progress=bool(cfg.progress),
    )
    if plan.get("zoo") and not (Path(plan["zoo"]) / "zoo.json").is_file():
        status("building the toy zoo (first use)", "zoo")
    ensure_zoo(plan, ctx.progress)  # first: a zoo rebuilt for a new recipe changes the inputs below
    inputs = input_fingerprints(plan)
    prev = previous_result(job_dir, h, inputs)
    if prev is not None:
        return {**prev, "skipped": True}  # the flag is not stored
    (job_dir / "result.json").unlink(missing_ok=True)

    import torch

    if ctx.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with PeakMemory() as mem:
        saliency = saliency_stage(plan, ctx)
        merged = merge_stage(plan, saliency, ctx)
    fault("merge")
    peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if ctx.device.startswith("cuda") else None
    evaluated, individual = evaluate_stage(plan, merged, ctx)
    fault("eval")
    if not cfg.keep_merged:
        shutil.rmtree(merged.dir, ignore_errors=True)

    result = JobResult(
        config_hash=h,
        config=plain(cfg),
        plan=plan,
        inputs=inputs,
        saliency=saliency,
        merged=merged,
        evaluated=evaluated,
        individual=individual,
        cost=cost_report(plan, saliency, ctx.device),
        peak_rss_mb=round(mem.peak / 2**20, 1),
        peak_gpu_mb=peak_gpu,
        device=ctx.device,
        merged_kept=bool(cfg.keep_merged),
        job=job_name,
    ).to_json()
    # log before result.json exists: a job whose logging failed is redone (from the caches) by a rerun
    from .tracking import log_job

    status("logging the result", "log")
    result["wandb_dir"] = log_job(plain(cfg.tracking), job_dir, job_name or job_dir.name, result)
    write_json(job_dir / "result.json", result)
    return result
