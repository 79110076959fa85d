"""The search's report: each study's optimisation history and parameter importances (PNG), and "Table 1, every
method tuned" (obim.bench.search writes them when its studies end)."""

from __future__ import annotations

import csv
import io
import warnings
from pathlib import Path
from typing import Any

from obim.merging.staging import atomic_write_file


def save_plots(study: Any, out: Path, method: str) -> list[Path]:
    """The study's optimisation history and parameter importances as PNGs; importances need two finished trials
    whose parameters differ (otherwise left out, said in the table's notes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for kind, draw in (("history", ovm.plot_optimization_history), ("importances", ovm.plot_param_importances)):
        path = out / f"{method}_{kind}.png"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # the plots' API
                warnings.simplefilter("ignore", UserWarning)  # importances of too few trials
                ax = draw(study)
            loc = "left" if ax.get_title(loc="left") else "center"
            ax.set_title(f"{study.study_name}: {ax.get_title(loc=loc)}", loc=loc)
            if kind == "history":
                ax.set_ylabel("dev avg (the objective)")
            ax.figure.tight_layout()
            atomic_write_file(path, lambda tmp, fig=ax.figure: fig.savefig(tmp, format="png", dpi=100))
            written.append(path)
        except (ValueError, RuntimeError, ZeroDivisionError, optuna.exceptions.OptunaError):
            path.unlink(missing_ok=True)
        finally:
            plt.close("all")
    return written


# ------------------------------------------------------------------------------------------------ the table


def _untuned(results: Path) -> dict[str, float]:
    """Each method's avg in the untuned tables (Table 1, Table 3) written beside, by its label."""
    out: dict[str, float] = {}
    for name in ("table3.csv", "table1.csv"):  # Table 1's rows win
        p = results / name
        if p.is_file():
            for row in csv.DictReader(io.StringIO(p.read_text())):
                if row.get("avg"):
                    out[row["model"]] = float(row["avg"])
    return out


def tuned_table(
    records: list[dict], results: Path, columns: list[str], left_out: list[str], opts: dict
) -> tuple[str, str]:
    """'Table 1, every method tuned' as markdown and CSV: each method's best parameters, its dev avg, its test
    scores and avg, and its avg in the untuned Table 1 beside."""
    from .results import method_label

    untuned = _untuned(results)
    head = ["method", "best parameters", "dev avg", *columns, "avg", "untuned avg", "trials"]
    rows, errors = [], []
    for r in records:
        label = method_label(r["method"])
        params = " ".join(f"{k}={v:g}" for k, v in r["params"].items())
        rows.append(
            [
                label,
                params,
                r["dev_avg"],
                *[r["test_scores"].get(c) for c in columns],
                r["test_avg"],
                untuned.get(label),
                r["trials"],
            ]
        )
        se = r.get("test_stderr") or {}
        errors.append([se.get(c) for c in columns] + [r.get("test_avg_stderr")])
    top = _marks(records, [*columns, "avg"])
    first = 3  # the first test column

    def cell(v: Any) -> str:
        return "—" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))

    def test_cell(row: list, i: int, j: int) -> str:
        v, se = row[first + j], errors[i][j]
        text = cell(v) + ("" if v is None or se is None else f" ± {se:.2f}")
        col = [*columns, "avg"][j]
        return f"**{text}**" if v is not None and row[0] in top.get(col, ()) else text

    def md_row(i: int, row: list) -> str:
        n = len(columns) + 1
        cells = [cell(v) for v in row[:first]] + [test_cell(row, i, j) for j in range(n)]
        return "| " + " | ".join(cells + [cell(v) for v in row[first + n :]]) + " |"

    md = [
        f"# Table 1, every method tuned ({records[0]['experiment'] if records else ''})",
        "",
        f"Each method tuned by an Optuna study (TPE, sampler seed {opts['seed']}, {opts['trials']} trials, the first "
        f"{min(opts['startup_trials'], opts['trials'])} random) on the dev tasks' average (`dev avg`); its best trial "
        "then scored on the test benchmarks (the test columns and `avg`). `untuned avg`: the method at its "
        "default parameters (table1.md / table3.md). A test score ± its standard error"
        + (f"; bold: {_legend()}" if top else "")
        + ".",
        "",
        "| " + " | ".join(head) + " |",
        "|---|---|" + "---:|" * (len(head) - 2),
    ]
    md += [md_row(i, row) for i, row in enumerate(rows)]
    notes = (
        [
            f"Left out of the objective (no dev data, as in the real setting): {', '.join(left_out)}; their test "
            "columns are reported, never tuned on."
        ]
        if left_out
        else []
    )
    notes.append(
        "IM retentions (obim, ties_im) drawn summing over 1 are scaled down to sum 1: the parameters shown "
        "are those merged."
    )
    md += [""] + [f"- {n}" for n in notes] + [""]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    test_cols = [*columns, "avg"]
    w.writerow([*head, *(f"{c}_se" for c in test_cols), *(f"{c}_top" for c in test_cols if c in top)])
    for i, row in enumerate(rows):
        w.writerow(
            [
                *("" if v is None else (f"{v:.4f}" if isinstance(v, float) else v) for v in row),
                *("" if e is None else f"{e:.4f}" for e in errors[i]),
                *(("1" if row[0] in top[c] else "0") for c in test_cols if c in top),
            ]
        )
    return "\n".join(md), buf.getvalue()


def _legend() -> str:
    from .paired import legend

    return f"the best of a column and every method not distinguishable from it: {legend()}"


def _marks(records: list[dict], columns: list[str]) -> dict[str, set[str]]:
    """Each column's best tuned method and those not distinguishable from it, from the best trials' per-sample
    records (paired.mark_top); a column some method lacks them for is left unmarked."""
    import json

    from .paired import mark_top
    from .results import JobRecord, Table, method_label
    from .tables import _result_items

    t = Table("tuned", "tuned", columns)
    for r in records:
        p = Path(r.get("result") or "")
        if not p.is_file():
            continue
        job = JobRecord.from_json(json.loads(p.read_text()), p)
        label = method_label(r["method"])
        named = {job.plan.benchmarks.get(k, k): v for k, v in job.scores.items()}
        t.add(label, {**named, "avg": job.avg}, None, None, _result_items(job, columns))
    if len(t.items) < len(records):  # a method without its records: no column's best can be named
        return {}
    mark_top(t)
    return {c: t.top[c] for c in t.top if t.tested.get(c) == set(t.items)}
