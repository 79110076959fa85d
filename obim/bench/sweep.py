"""One sweep job (experiments/sweep.py runs one per Hydra job): the composed config becomes a plan
(obim.bench.plan.plan_job, every option checked before anything runs), and the pipeline (obim.bench.pipeline) runs
it into the job's directory. A job's `result.json` is written last, atomically: a rerun skips a job whose
result.json holds the same plan hash and input weights (and no score left for a judge now configured), and redoes
any other from the caches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .pipeline import Record
from .pipeline import run_job as run_plan
from .plan import plan_job
from .stages import Reporter


def run_job(
    cfg: Any,
    job_dir: str | Path,
    overrides: list[str] | None = None,
    job_name: str = "",
    reporter: Reporter | None = None,
) -> dict:
    """Run one sweep job into job_dir; returns its result (`skipped` set when result.json already held it), or for
    a dry run {dry_run: True, summary}. Its stages are reported to `reporter` (the job's session: the console)."""
    plan = plan_job(cfg, overrides)
    return run_plan(plan, reporter, Record(Path(job_dir), job_name))
