"""The one orchestrator: `run_job(plan, reporter, record)` runs a job's stages (obim.bench.stages) in order,
saliency -> merge -> evaluate, through the caches, and returns its `JobResult`. The sweep runs one per Hydra job
with a record (its job directory: resume, W&B, result.json); the search runs one per trial without one, and one for
each method's best trial with a record of its own. Neither calls the stages itself.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from obim.merging.errors import ObimError

from .cache import read_json, write_json
from .plan import JobPlan
from .stages import (
    RESULT_SCHEMA,
    JobResult,
    PeakMemory,
    Quiet,
    Reporter,
    check_tasks,
    cost_report,
    ensure_zoo,
    evaluate_stage,
    input_fingerprints,
    input_paths,
    judge_pending,
    keep_samples,
    merge_stage,
    saliency_stage,
    where_is,
    zoo_is_current,
    zoo_record,
)


@dataclass(frozen=True)
class Record:
    """Where a job's result is kept: result.json (written last, atomically; a rerun reuses it) and its W&B run."""

    dir: Path
    name: str


def dry_run(plan: JobPlan, job_dir: Path, check_inputs: bool = True, fetch: bool = False) -> dict[str, Any]:
    """Write plan.json (the plan, where each model is found, and, checked, every input the job reads and which of
    them cannot be read here, and what a real run will cost: obim.bench.estimate) and say what would run. A
    missing input fails the dry run, every one named in its one line, after plan.json is written (without a cost);
    dry_run=plan only plans: its cost counts what the plan says without reading anything (no tokens, no prompts)."""
    from .estimate import estimate, summary

    check_tasks(list(plan.tasks))
    paths = input_paths(plan)
    where = {n: where_is(p) for n, p in paths.items()}
    rec: dict[str, Any] = {"config_hash": plan.hash(), **plan.to_json(), "paths": where}
    missing: list[str] = []
    if check_inputs:
        from .reach import fetch_missing, job_inputs, missing_inputs

        if fetch:  # online, a check answers from the hub: what could not be downloaded is what is missing
            rec["fetched"], missing = fetch_missing(plan)
            rec.update(inputs=[i.describe() for i in job_inputs(plan)], missing=missing)
        else:
            inputs, missing = missing_inputs(plan)
            rec.update(inputs=[i.describe() for i in inputs], missing=missing)
    if not missing:  # a failing job's estimate would only repeat what is missing, slowly
        rec["cost"] = estimate(plan, read=check_inputs)
    write_json(job_dir / "plan.json", rec)
    if missing:
        raise ObimError(
            f"{len(missing)} input{'s' * (len(missing) != 1)} of this job cannot be read here: {'; '.join(missing)} "
            "(dry_run=plan only plans)"
        )
    line = f"{plan.method} of {', '.join(plan.models)} -> {len(plan.tasks)} tasks"
    if fetch:
        line += f"; {len(rec['fetched'])} inputs fetched"
    if check_inputs:
        line += f"; all {len(rec['inputs'])} inputs readable"
    return {"dry_run": True, "summary": f"{line}; {summary(rec['cost'])}"}


def previous_result(job_dir: Path, h: str, inputs: dict[str, str]) -> dict | None:
    """result.json when it holds this job's result: same schema, plan hash and input weights, nothing to judge."""
    prev = read_json(job_dir / "result.json")
    if prev is None or prev.get("schema") != RESULT_SCHEMA:
        return None  # none, or written by an older obim: redone (from the caches)
    if prev.get("config_hash") == h and prev.get("inputs") == inputs and not judge_pending(prev):
        return prev
    return None


def compute(plan: JobPlan, reporter: Reporter, inputs: dict[str, str], job: str = "") -> JobResult:
    """The stages, in order, through the caches; the merged model is removed after unless the plan keeps it."""
    import torch

    rt = plan.runtime
    assert rt is not None  # plan_job sets it
    if rt.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with PeakMemory() as mem:
        saliency = saliency_stage(plan, reporter)
        merged = merge_stage(plan, saliency, reporter)
    peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if rt.device.startswith("cuda") else None
    evaluated, individual = evaluate_stage(plan, merged, reporter)
    if merged.in_place is not None:  # merged by the evaluation (none at all when its scores were cached)
        merged = replace(merged, merge_s=evaluated.load_s or 0.0, cached=evaluated.cached)
    elif not rt.keep_merged and merged.dir is not None:
        shutil.rmtree(merged.dir, ignore_errors=True)
    return JobResult(
        config_hash=plan.hash(),
        plan=plan,
        inputs=inputs,
        saliency=saliency,
        merged=merged,
        evaluated=evaluated,
        individual=individual,
        cost=cost_report(plan, saliency, rt.device),
        peak_rss_mb=round(mem.peak / 2**20, 1),
        peak_gpu_mb=peak_gpu,
        device=rt.device,
        merged_kept=rt.keep_merged,
        job=job,
        zoo=zoo_record(plan),
    )


def run_job(plan: JobPlan, reporter: Reporter | None = None, record: Record | None = None) -> dict[str, Any]:
    """Run one job; returns its result as result.json holds it (`skipped` set when a record already held it), or
    for a dry run {dry_run: True, summary}. With a record: a rerun reuses its result.json when it holds the same
    plan hash and input weights; the result is logged (W&B) before result.json is written, so a job whose logging
    failed is redone (from the caches) by a rerun."""
    reporter = reporter or Quiet()
    rt = plan.runtime
    assert rt is not None
    if rt.dry_run:
        if record is None:
            raise ValueError("a dry run writes plan.json: it needs a record")
        return dry_run(plan, record.dir, check_inputs=rt.dry_run != "plan", fetch=rt.dry_run == "fetch")
    if plan.zoo and not zoo_is_current(plan):
        from .evaluation import announce_code_execution, code_allowed

        if code_allowed(plan.allow_code):  # the zoo's own evaluation runs code first: said here, on the console
            announce_code_execution(list(plan.tasks), reporter.note)
        first = not (Path(plan.zoo) / "zoo.json").is_file()
        reporter.status("building the toy zoo (first use)" if first else "rebuilding the toy zoo (a new recipe)", "zoo")
    # first: a zoo rebuilt for a new recipe changes the inputs below
    ensure_zoo(plan, rt.progress, lambda text: reporter.status(text, "zoo"))
    inputs = input_fingerprints(plan)
    if record is not None:
        prev = previous_result(record.dir, plan.hash(), inputs)
        if prev is not None:
            return {**prev, "skipped": True}  # the flag is not stored
        (record.dir / "result.json").unlink(missing_ok=True)
    result = compute(plan, reporter, inputs, record.name if record else "").to_json()
    if record is None:
        return result
    from .tracking import log_job

    keep_samples(result, record.dir)
    reporter.status("logging the result", "log")
    result["wandb_dir"] = log_job(rt.tracking, record.dir, record.name or record.dir.name, result)
    write_json(record.dir / "result.json", result)
    return result
