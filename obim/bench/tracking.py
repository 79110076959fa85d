"""Experiment tracking: one Weights & Biases run per sweep job, grouped by sweep, offline unless W&B is set up."""

from __future__ import annotations

import netrc
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def wandb_mode(requested: str | None) -> str:
    """`requested`, else WANDB_MODE, else online when W&B is configured (an API key or a `wandb login`), else
    offline: a newcomer's sweep never asks for a login and never touches the network."""
    if requested:
        return requested
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        rc = netrc.netrc(os.environ.get("NETRC") or None)
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1]
        if rc.authenticators(host):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        pass
    return "offline"


def _wandb_on(tracking: dict[str, Any]) -> bool:
    """Whether runs go to W&B (`tracking.backend: wandb`); `none` turns tracking off; anything else is an error."""
    backend = tracking.get("backend", "none")
    if backend not in ("wandb", "none"):
        from obim.merging.errors import ObimError

        raise ObimError(f"tracking.backend: expected wandb or none, got {backend!r}")
    return backend == "wandb"


@contextmanager
def _wandb_run(
    tracking: dict[str, Any],
    run_dir: Path,
    *,
    name: str,
    job_type: str,
    group: str | None,
    config: dict[str, Any] | None = None,
    reinit: str | None = "create_new",
) -> Iterator[Any]:
    """A W&B run under run_dir, in tracking's project, quiet, in the mode wandb_mode picks; finished on exit."""
    import wandb

    run_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=tracking.get("project") or "obim",
        entity=tracking.get("entity"),
        group=group,
        name=name,
        job_type=job_type,
        tags=list(tracking.get("tags") or []),
        config=config,
        dir=str(run_dir),
        mode=wandb_mode(tracking.get("mode")),
        reinit=reinit,
        settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
    )
    try:
        yield run
    finally:
        run.finish()


def log_job(tracking: dict[str, Any], job_dir: Path, name: str, result: dict[str, Any]) -> str | None:
    """Log one job's resolved config, scores, timings and a results table; returns the run directory."""
    if not _wandb_on(tracking):
        return None
    import wandb

    plan = result["plan"]
    names = plan["benchmarks"]
    with _wandb_run(
        tracking,
        job_dir,
        name=name or plan["method"],
        job_type=plan["method"],
        group=tracking.get("group"),
        config=result["config"],
    ) as run:
        # a missing score (an unjudged AlpacaEval) is left out of the metrics, never logged as a number
        metrics = {f"score/{names.get(t, t)}": v for t, v in result["scores"].items() if v is not None}
        if result["avg"] is not None:
            metrics["avg"] = result["avg"]
        metrics.update(
            {
                "saliency_s": result["saliency_s"],
                "merge_s": result["merge_s"],
                "eval_s": result["eval_s"],
                "peak_rss_mb": result["peak_rss_mb"],
            }
        )
        if result.get("peak_gpu_mb") is not None:
            metrics["peak_gpu_mb"] = result["peak_gpu_mb"]
        cols = ["model", *[names.get(t, t) for t in result["scores"]], "avg"]
        rows = [[f"merged ({plan['method']})", *result["scores"].values(), result["avg"]]]
        for model, r in result.get("individual", {}).items():
            rows.append([model, *[r["scores"].get(t) for t in result["scores"]], r["avg"]])
        metrics["results"] = wandb.Table(columns=cols, data=rows)
        run.log(metrics)
        run.summary.update({k: v for k, v in metrics.items() if k != "results"})
        return str(Path(run.dir).parent)


def log_trial(
    tracking: dict[str, Any], run_dir: Path, name: str, group: str, config: dict[str, Any], metrics: dict[str, Any]
) -> str | None:
    """One search trial (obim.bench.search) as a W&B run in its study's group: its parameters as config, its dev
    scores and timings as metrics; returns the run directory (None when tracking is off)."""
    if not _wandb_on(tracking):
        return None
    with _wandb_run(tracking, run_dir, name=name, job_type="search-trial", group=group, config=config) as run:
        run.log(metrics)
        run.summary.update(metrics)
        return str(Path(run.dir).parent)


@contextmanager
def tables_run(tracking: dict[str, Any], run_dir: Path, name: str) -> Iterator[None]:
    """A W&B run around the sweep's tables (obim.bench.report.write.log_report logs them and their plots to the active
    run), in the sweep's group; nothing when tracking is off."""
    if tracking.get("backend", "none") != "wandb":
        yield
        return
    # not create_new: it is wandb.run, where write_tables logs
    with _wandb_run(tracking, run_dir, name=name, job_type="tables", group=tracking.get("group"), reinit=None):
        yield
