"""Experiment tracking: one Weights & Biases run per sweep job, grouped by sweep, offline unless W&B is set up."""

from __future__ import annotations

import netrc
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


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


def log_job(tracking: dict[str, Any], job_dir: Path, name: str, result: dict[str, Any]) -> str | None:
    """Log one job's resolved config, scores, timings and a results table; returns the run directory."""
    if tracking.get("backend", "none") == "none":
        return None
    if tracking["backend"] != "wandb":
        from obim.merging.errors import ObimError

        raise ObimError(f"tracking.backend: expected wandb or none, got {tracking['backend']!r}")
    import wandb

    plan = result["plan"]
    names = plan["benchmarks"]
    run = wandb.init(
        project=tracking.get("project") or "obim", entity=tracking.get("entity"), group=tracking.get("group"),
        name=name or plan["method"], job_type=plan["method"], tags=list(tracking.get("tags") or []),
        config=result["config"], dir=str(job_dir), mode=wandb_mode(tracking.get("mode")), reinit="create_new",
        settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
    )
    try:
        # a missing score (an unjudged AlpacaEval) is left out of the metrics, never logged as a number
        metrics = {f"score/{names.get(t, t)}": v for t, v in result["scores"].items() if v is not None}
        if result["avg"] is not None:
            metrics["avg"] = result["avg"]
        metrics.update({"saliency_s": result["saliency_s"], "merge_s": result["merge_s"],
                        "eval_s": result["eval_s"], "peak_rss_mb": result["peak_rss_mb"]})
        if result.get("peak_gpu_mb") is not None:
            metrics["peak_gpu_mb"] = result["peak_gpu_mb"]
        cols = ["model", *[names.get(t, t) for t in result["scores"]], "avg"]
        rows = [[f"merged ({plan['method']})", *result["scores"].values(), result["avg"]]]
        for model, r in result.get("individual", {}).items():
            rows.append([model, *[r["scores"].get(t) for t in result["scores"]], r["avg"]])
        metrics["results"] = wandb.Table(columns=cols, data=rows)
        run.log(metrics)
        run.summary.update({k: v for k, v in metrics.items() if k != "results"})
        run_dir = str(Path(run.dir).parent)
    finally:
        run.finish()
    return run_dir


def log_trial(tracking: dict[str, Any], run_dir: Path, name: str, group: str, config: dict[str, Any],
              metrics: dict[str, Any]) -> str | None:
    """One search trial (obim.bench.search) as a W&B run in its study's group: its parameters as config, its dev
    scores and timings as metrics; returns the run directory (None when tracking is off)."""
    if tracking.get("backend", "none") == "none":
        return None
    if tracking["backend"] != "wandb":
        from obim.merging.errors import ObimError

        raise ObimError(f"tracking.backend: expected wandb or none, got {tracking['backend']!r}")
    import wandb

    run_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=tracking.get("project") or "obim", entity=tracking.get("entity"), group=group, name=name,
        job_type="search-trial", tags=list(tracking.get("tags") or []), config=config, dir=str(run_dir),
        mode=wandb_mode(tracking.get("mode")), reinit="create_new",
        settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
    )
    try:
        run.log(metrics)
        run.summary.update(metrics)
        out = str(Path(run.dir).parent)
    finally:
        run.finish()
    return out


@contextmanager
def tables_run(tracking: dict[str, Any], run_dir: Path, name: str) -> Iterator[None]:
    """A W&B run around the sweep's tables (obim.bench.tables.write_tables logs them and their plots to the active run),
    in the sweep's group; nothing when tracking is off."""
    if tracking.get("backend", "none") != "wandb":
        yield
        return
    import wandb

    run_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=tracking.get("project") or "obim", entity=tracking.get("entity"), group=tracking.get("group"),
        name=name, job_type="tables", tags=list(tracking.get("tags") or []), dir=str(run_dir),
        mode=wandb_mode(tracking.get("mode")),  # not create_new: it is wandb.run, where write_tables logs
        settings=wandb.Settings(silent=True, console="off", x_disable_stats=True))
    try:
        yield
    finally:
        run.finish()
