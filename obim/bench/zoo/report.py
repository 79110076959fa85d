"""What makes the toy SFT experts like real ones, measured: each expert's gain over the base, its task vector's size
relative to the base and the task vectors' pairwise cosines, and the mergeability table (how much of each
expert's gain merging all three keeps, under TA, TIES and OBIM through the merge core and lm-eval)."""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

# the listed merges of issue 10: TA at three lambdas, TIES at two densities, OBIM at the toy_sft experiment's
# retentions (conf/experiment/toy_sft.yaml; a test keeps the two equal)
OBIM_RETENTION = {"lm": 0.4, "math": 0.45, "code": 0.1}
OBIM_VALIDATION = {"lm": {"alpaca": 50, "mmlu": 50}, "math": {"gsm8k": 50, "math": 50}, "code": {"mbpp": 50}}
ORDER = ["lm", "math", "code"]
MERGES: list[tuple[str, str, dict[str, Any]]] = [
    ("TA lambda 0.3", "ta", {"lambda": 0.3}),
    ("TA lambda 0.5", "ta", {"lambda": 0.5}),
    ("TA lambda 1.0", "ta", {"lambda": 1.0}),
    ("TIES density 0.2", "ties", {"density": 0.2}),
    ("TIES density 0.5", "ties", {"density": 0.5}),
    ("OBIM", "obim", {}),
]


def task_vector_stats(base: str | Path, experts: dict[str, str | Path]) -> dict[str, Any]:
    """{'rel_norm': {name: |tau| / |theta_base|}, 'cosine': {'a/b': cos(tau_a, tau_b)}} over every tensor the base
    and the experts share with one shape, one tensor name at a time (float64 sums)."""
    import torch

    from obim.merging.checkpoint import open_checkpoint

    b = open_checkpoint(base)
    cks = {n: open_checkpoint(p) for n, p in experts.items()}
    names = list(cks)
    base_sq, sq = 0.0, dict.fromkeys(names, 0.0)
    dot = {(x, y): 0.0 for i, x in enumerate(names) for y in names[i + 1 :]}
    for t, info in b.tensors.items():
        if any(t not in c.tensors or c.tensors[t].shape != info.shape for c in cks.values()):
            continue
        w = b.get(t).double()
        taus = {n: (c.get(t).double() - w).flatten() for n, c in cks.items()}
        base_sq += float(w.pow(2).sum())
        for n, v in taus.items():
            sq[n] += float(v.pow(2).sum())
        for x, y in dot:
            dot[(x, y)] += float(torch.dot(taus[x], taus[y]))
    rel = {n: math.sqrt(sq[n] / base_sq) if base_sq else float("nan") for n in names}
    cos = {f"{x}/{y}": dot[(x, y)] / math.sqrt(sq[x] * sq[y]) if sq[x] and sq[y] else float("nan") for x, y in dot}
    return {"rel_norm": rel, "cosine": cos}


def gain_kept(
    merged: dict[str, float | None],
    base: dict[str, float | None],
    expert: dict[str, float | None],
    benchmarks: list[str],
) -> float | None:
    """Mean over the benchmarks of (merged - base) / (expert - base); None when a score is missing or the expert
    does not beat the base on a benchmark (no gain to keep)."""
    shares = []
    for b in benchmarks:
        m, s0, e = merged.get(b), base.get(b), expert.get(b)
        if m is None or s0 is None or e is None or e <= s0:
            return None
        shares.append((m - s0) / (e - s0))
    return sum(shares) / len(shares) if shares else None


def merge_configs(root: Path, validation_dir: Path) -> list[tuple[str, dict]]:
    """The merge core's configs of the listed merges, over root/sft/{base,lm,math,code}."""
    out = []
    for label, method, params in MERGES:
        models = []
        for n in ORDER:
            m: dict[str, Any] = {"name": n, "path": str(root / "sft" / n)}
            if method == "obim":
                m["retention"] = OBIM_RETENTION[n]
                m["validation"] = {"data": str(validation_dir / f"{n}.jsonl"), "max_length": 256, "batch_size": 8}
            models.append(m)
        cfg = {
            "method": method,
            "base_model": str(root / "sft" / "base"),
            "models": models,
            "parameters": params,
            "order": ORDER,
            "seed": 0,
        }
        out.append((label, cfg))
    return out


def _write_validation(root: Path, into: Path) -> None:
    """Each expert's saliency validation set as the toy_sft experiment draws it (the first n of each source's
    train split), one JSONL per expert for the merge core."""
    for n, sources in OBIM_VALIDATION.items():
        lines = []
        for src, k in sources.items():
            lines += (root / "data" / src / "train.jsonl").read_text().splitlines()[:k]
        (into / f"{n}.jsonl").write_text("".join(line + "\n" for line in lines))


def mergeability(
    root: Path,
    experts: dict[str, tuple[str, ...]],
    scores: dict[str, dict[str, float | None]],
    evaluate: Callable[[Path], dict[str, float | None]],
    progress: bool = False,
) -> dict[str, dict[str, Any]]:
    """{merge label: {'scores': ..., 'kept': {expert: share}}} for every listed merge of the three experts."""
    from obim.merging.merge import merge

    out = {}
    with tempfile.TemporaryDirectory(prefix="obim-zoo-merges-") as tmp:
        t = Path(tmp)
        _write_validation(root, t)
        for label, cfg in merge_configs(root, t):
            dest = t / label.replace(" ", "_")
            merge(cfg, dest, progress=progress)
            got = evaluate(dest)
            kept = {n: gain_kept(got, scores["sft/base"], scores[f"sft/{n}"], list(b)) for n, b in experts.items()}
            out[label] = {"scores": got, "kept": kept}
    return out


def report_tables(
    scores: dict[str, dict[str, float | None]],
    stats: dict[str, Any],
    merges: dict[str, dict[str, Any]],
    experts: dict[str, tuple[str, ...]],
) -> str:
    """Markdown: the experts' gains and task vectors, then the mergeability table."""

    def f(v: float | None, fmt: str = "{:+.1f}") -> str:
        return "—" if v is None else fmt.format(v)

    lines = ["| expert | gain over base (its two benchmarks) | task vector norm / base norm |", "|---|---|---:|"]
    for n, benches in experts.items():
        gains = []
        for b in benches:
            e, s0 = scores[f"sft/{n}"].get(b), scores["sft/base"].get(b)
            gains.append(f"{b} {f(None if e is None or s0 is None else e - s0)}")
        lines.append(f"| {n} | {', '.join(gains)} | {stats['rel_norm'][n]:.4f} |")
    lines += [
        "",
        "Pairwise cosine of the task vectors: " + ", ".join(f"{k} {v:.3f}" for k, v in stats["cosine"].items()),
        "",
    ]
    names = list(experts)
    lines += [
        "Share of each expert's gain kept by merging all three (mean over its two benchmarks of "
        "(merged - base) / (expert - base)):",
        "",
        "| merge | " + " | ".join(names) + " | " + " | ".join(b for n in names for b in experts[n]) + " |",
        "|---|" + "---:|" * (len(names) + sum(len(experts[n]) for n in names)),
    ]
    for label, r in merges.items():
        cells = [f(r["kept"].get(n), "{:.2f}") for n in names]
        cells += [f(r["scores"].get(b), "{:.1f}") for n in names for b in experts[n]]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def save_report(root: Path, stats: dict[str, Any], merges: dict[str, dict[str, Any]]) -> None:
    (root / "report.json").write_text(
        json.dumps({"task_vectors": stats, "mergeability": merges}, indent=2, sort_keys=True) + "\n"
    )
