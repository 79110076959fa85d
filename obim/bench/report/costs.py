"""Compute cost from sweep results: every job's timings (jobs.md) and the paper's Table 10 beside ours."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from .results import JobRecord, paper_tables


def jobs_table(results: list[JobRecord]) -> str:
    """Every job: what it varied, its average and its costs (the paper's Table 10 figures)."""
    lines = [
        "# Jobs",
        "",
        "| job | method | avg | saliency s | s/sample | merge s | eval s | peak RSS MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(results, key=lambda r: r.job or str(r.path)):  # unnamed jobs by their path
        sps = r.cost.hessian_s_per_sample
        avg = "—" if r.avg is None else f"{r.avg:.2f}"
        lines.append(
            f"| {r.job or r.path.parent.name} | {r.plan.method} | {avg} | "
            f"{r.saliency_s:.1f} | {'' if sps is None else f'{sps:.4f}'} | {r.merge_s:.1f} | "
            f"{r.eval_s:.1f} | {r.peak_rss_mb:.0f} |"
        )
    return "\n".join(lines) + "\n"


def cost_row(r: JobRecord) -> dict[str, Any]:
    """A job's Table 10 figures (cost_table's keys; experiments/bench_cost.py builds the same row)."""
    return {"models": r.plan.n_models, **asdict(r.cost), "saliency_s": r.saliency_s, "merge_s": r.merge_s}


def table10(results: list[JobRecord]) -> str | None:
    """The paper's Table 10 (compute cost) beside ours: each experiment's latest main OBIM job. Cached statistics
    and merges carry the times measured when they were computed."""
    ours = {}
    for r in results:
        if r.plan.method == "obim" and r.plan.main and r.cost.hessian_s_per_sample is not None:
            ours[r.plan.experiment] = r
    if not ours:
        return None
    return "# Table 10: compute cost of OBIM\n\n" + cost_table(
        [(f"ours: {name}", cost_row(r)) for name, r in sorted(ours.items())]
    )


def cost_table(ours: list[tuple[str, dict]]) -> str:
    """The paper's Table 10 rows, then ours (label, cost_row's keys)."""
    lines = [
        "| source | models | model size | GPUs | Hessian s/sample | saliency s | merge s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for p in paper_tables()["table10"]:
        lines.append(
            f"| paper (A800 80G) | {p['model_count']} | {p['model_size']} | {p['gpus']} | "
            f"{p['hessian_s_per_sample']:.2f} | {p['saliency_s']} | {p['merge_s']} |"
        )
    for label, c in ours:
        where = c.get("gpu_name") or "CPU"
        size = f"{c['params_b']:.3g}B" if c["params_b"] >= 1 else f"{c['params_b'] * 1000:.3g}M"
        lines.append(
            f"| {label} ({where}) | {c['models']} | {size} | {c['gpus']} | "
            f"{c['hessian_s_per_sample']:.4f} | {c['saliency_s']:.1f} | {c['merge_s']:.1f} |"
        )
    lines += [
        "",
        "- Hessian s/sample: the forward passes that collect the layer inputs' second moments, per "
        "validation sample; saliency s: all of them for every model; merge s: OBIM's merge, I/O included.",
    ]
    return "\n".join(lines) + "\n"
