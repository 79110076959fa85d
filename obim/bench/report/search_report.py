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
    rows = []
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

    def cell(v: Any) -> str:
        return "—" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))

    md = [
        f"# Table 1, every method tuned ({records[0]['experiment'] if records else ''})",
        "",
        f"Each method tuned by an Optuna study (TPE, sampler seed {opts['seed']}, {opts['trials']} trials, the first "
        f"{min(opts['startup_trials'], opts['trials'])} random) on the dev tasks' average (`dev avg`); its best trial "
        "then scored on the test benchmarks (the test columns and `avg`). `untuned avg`: the method at its "
        "default parameters (table1.md / table3.md).",
        "",
        "| " + " | ".join(head) + " |",
        "|---|---|" + "---:|" * (len(head) - 2),
    ]
    md += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
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
    w.writerow(head)
    for row in rows:
        w.writerow(["" if v is None else (f"{v:.4f}" if isinstance(v, float) else v) for v in row])
    return "\n".join(md), buf.getvalue()
