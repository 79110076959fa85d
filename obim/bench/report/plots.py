"""Plots of the axis tables, drawn from the tables themselves (so a plot shows exactly its table's numbers): Table 4
(validation source), Table 5 (validation size), Table 6 (order), the retention/parameter grid, and Figure 3 (number
of merged models, Table 11). PNG beside each table (obim.bench.report.write logs them to W&B). Built on
obim.bench.report.results only: a Table in, a figure out."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from .results import JobRecord, Table, best_single, by_count, mean_avg, method_label, paper_tables

# table -> the x axis of its plot (Table 11's is Figure 3)
AXES = {
    "table4": "validation source of the math model (samples)",
    "table5": "validation samples of the math model",
    "table6": "iteration order",
    "grid": None,
}
DPI = 110


def _number(s: str) -> float | None:
    try:
        v = float(s)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def plot_data(t: Table) -> dict[str, Any]:
    """What the plot of table `t` shows: {xlabel, numeric, panels: [{title, x, series: {column: [y per x]},
    errors: {column: [standard error per x, None where unknown]}}]}. Ours in one panel (one per method for a grid),
    with error bars; the paper's beside where it reports numbers."""

    def se(label: str, c: str) -> float | None:
        return (t.se.get(label) or {}).get(c)

    if t.name == "grid":
        # rows "OBIM, retention=0.3": a panel per method, x the swept value (numeric when one key is swept)
        groups: dict[str, list] = {}
        for label, ours, _ in t.rows:
            method, _, setting = label.partition(", ")
            groups.setdefault(method, []).append((setting, ours, label))
        keys = {s.partition("=")[0] for rows in groups.values() for s, _, _ in rows}
        values = [_number(s.partition("=")[2]) for rows in groups.values() for s, _, _ in rows]
        numeric = len(keys) == 1 and all(v is not None for v in values)
        panels = [
            {
                "title": method,
                "x": [_number(s.partition("=")[2]) if numeric else s for s, _, _ in rows],
                "series": {c: [o.get(c) for _, o, _ in rows] for c in t.columns},
                "errors": {c: [se(label, c) for _, _, label in rows] for c in t.columns},
            }
            for method, rows in groups.items()
        ]
        return {"xlabel": next(iter(keys)) if numeric else "setting", "numeric": numeric, "panels": panels}
    xs = [_number(label) for label, _, _ in t.rows]
    numeric = all(x is not None for x in xs)
    x = xs if numeric else [label for label, _, _ in t.rows]
    panels = [
        {
            "title": "ours",
            "x": x,
            "series": {c: [o.get(c) for _, o, _ in t.rows] for c in t.columns},
            "errors": {c: [se(label, c) for label, _, _ in t.rows] for c in t.columns},
        }
    ]
    paper = {c: [p[i] if p is not None and i < len(p) else None for _, _, p in t.rows] for i, c in enumerate(t.columns)}
    if any(v is not None for ys in paper.values() for v in ys):
        panels.append({"title": "paper (Llama-2-13B)", "x": x, "series": paper})
    return {"xlabel": AXES.get(t.name) or t.lead, "numeric": numeric, "panels": panels}


def axis_figure(t: Table):
    """The matplotlib figure of an axis table: lines over a numeric axis, grouped bars over named settings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = plot_data(t)
    n = len(d["panels"])
    fig, axes = plt.subplots(1, n, figsize=((4.5 if d["numeric"] else 5.5) * n, 3.8), squeeze=False)
    for ax, p in zip(axes[0], d["panels"], strict=True):
        ys = {c: [math.nan if v is None else v for v in vs] for c, vs in p["series"].items()}
        # error bars of one standard error where known (none for the paper's numbers)
        errs = {c: [0.0 if v is None else v for v in vs] for c, vs in (p.get("errors") or {}).items()}
        if d["numeric"]:
            for c, y in ys.items():  # avg solid and black, the benchmarks dashed
                style = {"color": "black"} if c == "avg" else {}
                ax.errorbar(p["x"], y, yerr=errs.get(c), fmt="o-" if c == "avg" else "o--", label=c, capsize=2, **style)
            ax.set_xticks(sorted(set(p["x"])))
        else:
            width = 0.8 / max(1, len(ys))
            for i, (c, y) in enumerate(ys.items()):
                xs = [j + (i - (len(ys) - 1) / 2) * width for j in range(len(y))]
                ax.bar(xs, y, width, yerr=errs.get(c), capsize=2, label=c)
            ticks = [str(v).replace(" (", "\n(").translate(str.maketrans("", "", "[]'")) for v in p["x"]]
            ax.set_xticks(range(len(p["x"])), ticks, fontsize=7)
        top = max([v for y in ys.values() for v in y if not math.isnan(v)] + [0])
        ax.set_ylim(0, max(5.0, top * 1.1))
        ax.set(title=p["title"], xlabel=d["xlabel"], ylabel="score")
    handles, labels = axes[0][0].get_legend_handles_labels()  # every panel draws the same series
    fig.legend(handles, labels, loc="lower center", ncols=len(labels), fontsize=8, frameon=False)
    fig.suptitle(t.title, fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


def save(fig, path: Path) -> Path:
    """PNG, atomically, with no software/version stamp: the same table gives the same bytes."""
    import matplotlib.pyplot as plt

    from obim.merging.staging import atomic_write_file

    atomic_write_file(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None}))
    plt.close(fig)
    return path


def write_plots(tables: list[Table], out: Path) -> list[Path]:
    """<table>.png beside each axis table's .md."""
    return [save(axis_figure(t), out / f"{t.name}.png") for t in tables if t.name in AXES and t.rows]


def figure3_data(results: list[JobRecord]) -> dict[str, Any] | None:
    """What Figure 3 shows: for each number of merged models (base included), ours (OBIM, DARE and the job's best
    single model) and the paper's (OBIM, DARE); None with fewer than two counts."""
    seen = by_count(results)
    counts = sorted({n for n, _ in seen})
    if len(counts) < 2:
        return None
    ours: dict[str, list] = {}
    for m in ("obim", "dare"):
        xs = [n for n in counts if (n, m) in seen]
        ours[method_label(m)] = [xs, [mean_avg(seen[(n, m)]) for n in xs]]
    best = {n: best_single(seen.get((n, "obim")) or seen.get((n, "dare"))) for n in counts}
    ours["best single model"] = [[n for n in counts if best[n]], [best[n][1] for n in counts if best[n]]]
    paper = paper_tables()["table11"]["rows"]
    pc = sorted(int(k) for k in paper)
    return {
        "counts": counts,
        "experiment": next(iter(seen.values()))[-1].plan.experiment,
        "ours": ours,
        "paper": {m: [pc, [paper[str(n)][m][-1] for n in pc]] for m in ("OBIM", "DARE")},
    }


def figure3(results: list[JobRecord], out: Path) -> Path | None:
    """Average score vs number of merged models: OBIM, DARE and the best single model; the paper's beside."""
    data = figure3_data(results)
    if data is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    ax = axes[0]
    for (label, (xs, ys)), style in zip(data["ours"].items(), ("o-", "s-", "k--"), strict=True):
        ax.plot(xs, ys, style, label=label)
    ax.set(
        title=f"ours ({data['experiment']})",
        xlabel="models merged (base included)",
        ylabel="average score",
        xticks=data["counts"],
    )
    ax.legend()
    ax = axes[1]
    for (label, (xs, ys)), style in zip(data["paper"].items(), ("o-", "s-"), strict=True):
        ax.plot(xs, ys, style, label=label)
    ax.set(
        title="paper (Qwen2-7B checkpoints)", xlabel="models merged (base included)", xticks=data["paper"]["OBIM"][0]
    )
    ax.legend()
    fig.tight_layout()
    return save(fig, out / "figure3.png")


def table_from_csv(path: Path, name: str | None = None, title: str = "") -> Table:
    """A table written by write_tables read back (ours and the paper's numbers): plots without the results."""
    rows = list(csv.reader(Path(path).read_text().splitlines()))
    head = rows[0]
    named = set(head[1:])
    extra = [c for c in head[1:] if any(c.endswith(x) and c[: -len(x)] in named for x in ("_se", "_sd", "_top"))]
    cols = [c for c in head[1:] if not c.startswith("paper_") and c not in [*extra, "draws"]]
    t = Table(name or Path(path).stem, title or Path(path).stem, cols, lead=head[0])
    for r in rows[1:]:
        cell = dict(zip(head, r, strict=True))
        paper = [_number(cell.get(f"paper_{c}", "")) for c in cols]
        se = {c: _number(cell.get(f"{c}_se", "")) for c in cols}
        t.add(r[0], {c: _number(cell[c]) for c in cols}, paper if any(v is not None for v in paper) else None, se)
    return t


def replot(out: Path) -> list[Path]:
    """Redraw the axis plots in `out` from its tables' CSV files (`experiments/tables.py --replot DIR`)."""
    import re

    written = []
    for name in AXES:
        p = out / f"{name}.csv"
        if p.is_file():
            md = out / f"{name}.md"
            title = re.sub(r"^# ", "", md.read_text().splitlines()[0]) if md.is_file() else name
            written += write_plots([table_from_csv(p, name, title)], out)
    return written
