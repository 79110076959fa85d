"""The search's report: each study's optimisation history and parameter importances (PNG), and "Table 1, every
method tuned" (obim.bench.search writes them when its studies end)."""

from __future__ import annotations

import csv
import io
import warnings
from pathlib import Path
from typing import Any

from obim.merging.staging import atomic_write_file

from .results import mean_or_none


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


UNTUNED = ("table3.csv", "table1.csv")  # the untuned tables a tuned table reads beside it; the last one's rows win


def _untuned(results: Path, names: tuple[str, ...] = UNTUNED) -> dict[str, float]:
    """Each method's avg in the untuned tables (by default Table 1, Table 3) written beside, by its label."""
    out: dict[str, float] = {}
    for name in names:
        p = results / name
        if p.is_file():
            for row in csv.DictReader(io.StringIO(p.read_text())):
                if row.get("avg"):
                    out[row["model"]] = float(row["avg"])
    return out


def tuned_table(
    records: list[dict],
    results: Path,
    columns: list[str],
    left_out: list[str],
    opts: dict,
    untuned_from: tuple[str, ...] = UNTUNED,
) -> tuple[str, str]:
    """'Table 1, every method tuned' as markdown and CSV: each method's best parameters, its dev avg, its test
    scores and avg, and its avg in the untuned Table 1 beside. Records of several zoo draws (`zoo_seed`; one study
    per method and draw) make one row per method: the means over the draws, ± the mean of their standard errors
    (the draws share their test items), [sd] across the draws, and each draw's parameters listed below."""
    from .results import method_label

    untuned = _untuned(results, untuned_from)
    test_cols = [*columns, "avg"]
    by_method: dict[str, list[dict]] = {}
    for r in records:
        by_method.setdefault(r["method"], []).append(r)
    draws = sorted({int(r.get("zoo_seed") or 0) for r in records})
    multi = len(draws) > 1
    head = ["method", "best parameters", "dev avg", *columns, "avg", "untuned avg", "trials"]
    rows, errors, sds = [], [], []
    for method, recs in by_method.items():
        recs = sorted(recs, key=lambda r: int(r.get("zoo_seed") or 0))
        label = method_label(method)
        params = " ".join(f"{k}={v:g}" for k, v in recs[0]["params"].items()) if not multi else "per draw (below)"
        tests = [[r["test_scores"].get(c) for c in columns] + [r["test_avg"]] for r in recs]
        ses = [[(r.get("test_stderr") or {}).get(c) for c in columns] + [r.get("test_avg_stderr")] for r in recs]
        trials = recs[0]["trials"] if not multi else " ".join(str(r["trials"]) for r in recs)
        rows.append(
            [label, params, mean_or_none([r["dev_avg"] for r in recs]), *_means(tests), untuned.get(label), trials]
        )
        errors.append(_means(ses))
        sds.append(
            [_sd([t[j] for t in tests]) for j in range(len(test_cols))] if len(recs) > 1 else [None] * len(test_cols)
        )
    top = _marks(records, test_cols)
    first = 3  # the first test column

    def cell(v: Any) -> str:
        return "—" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))

    def test_cell(i: int, j: int) -> str:
        v, se, sd = rows[i][first + j], errors[i][j], sds[i][j] if j < len(sds[i]) else None
        text = cell(v) + ("" if v is None or se is None else f" ± {se:.2f}")
        text += "" if v is None or sd is None else f" [sd {sd:.2f}]"
        return f"**{text}**" if v is not None and rows[i][0] in top.get(test_cols[j], ()) else text

    def md_row(i: int) -> str:
        row, n = rows[i], len(test_cols)
        cells = [cell(v) for v in row[:first]] + [test_cell(i, j) for j in range(n)]
        return "| " + " | ".join(cells + [cell(v) for v in row[first + n :]]) + " |"

    untuned_names = " / ".join(n.replace(".csv", ".md") for n in reversed(untuned_from))
    over = f"the mean over the zoo draws {', '.join(map(str, draws))} of " if multi else ""
    md = [
        f"# Table 1, every method tuned ({records[0]['experiment'] if records else ''})",
        "",
        f"Each method tuned by an Optuna study (TPE, sampler seed {opts['seed']}, {opts['trials']} trials, the first "
        f"{min(opts['startup_trials'], opts['trials'])} random) on the dev tasks' average (`dev avg`); its best trial "
        "then scored on the test benchmarks (the test columns and `avg`). `untuned avg`: the method at its "
        f"default parameters ({untuned_names}). Each cell: {over}a test score ± its standard error"
        + (" [sd across the draws], one study per method and draw" if multi else "")
        + (f"; bold: {_legend()}" if top else "")
        + ".",
        "",
        "| " + " | ".join(head) + " |",
        "|---|---|" + "---:|" * (len(head) - 2),
    ]
    md += [md_row(i) for i in range(len(rows))]
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
    if multi:
        for method, recs in by_method.items():
            per = "; ".join(
                f"draw {r.get('zoo_seed') or 0}: " + " ".join(f"{k}={v:g}" for k, v in r["params"].items())
                for r in sorted(recs, key=lambda r: int(r.get("zoo_seed") or 0))
            )
            notes.append(f"{method_label(method)} best parameters: {per}")
    md += [""] + [f"- {n}" for n in notes] + [""]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    sd_cols = test_cols if multi else []
    w.writerow(
        [
            *head,
            *(f"{c}_se" for c in test_cols),
            *(f"{c}_sd" for c in sd_cols),
            *(f"{c}_top" for c in test_cols if c in top),
            *(["draws"] if multi else []),
        ]
    )
    recs_of = list(by_method.values())
    for i, row in enumerate(rows):
        w.writerow(
            [
                *("" if v is None else (f"{v:.4f}" if isinstance(v, float) else v) for v in row),
                *("" if e is None else f"{e:.4f}" for e in errors[i]),
                *("" if v is None else f"{v:.4f}" for v in (sds[i] if multi else [])),
                *(("1" if row[0] in top[c] else "0") for c in test_cols if c in top),
                *([" ".join(str(d) for d in sorted(int(r.get("zoo_seed") or 0) for r in recs_of[i]))] if multi else []),
            ]
        )
    return "\n".join(md), buf.getvalue()


def _means(rows: list[list[Any]]) -> list[float | None]:
    return [mean_or_none([r[j] for r in rows]) for j in range(len(rows[0]))]


def _sd(vals: list[Any]) -> float | None:
    import statistics

    return None if len(vals) < 2 or any(v is None for v in vals) else statistics.stdev(vals)


def _legend() -> str:
    from .paired import legend

    return f"the best of a column and every method not distinguishable from it: {legend()}"


def _marks(records: list[dict], columns: list[str]) -> dict[str, set[str]]:
    """Each column's best tuned method and those not distinguishable from it, from the best trials' per-sample
    records (paired.mark_top; several draws' items averaged item by item, as the tables do); a column some method
    lacks them for is left unmarked."""
    import json

    from .paired import mark_top
    from .results import JobRecord, Table, method_label
    from .tables import _pooled, _result_items

    t = Table("tuned", "tuned", columns)
    by_method: dict[str, list[JobRecord]] = {}
    for r in records:
        p = Path(r.get("result") or "")
        if not p.is_file():
            return {}  # a method without its records: no column's best can be named
        by_method.setdefault(r["method"], []).append(JobRecord.from_json(json.loads(p.read_text()), p))
    for method, jobs in by_method.items():
        items = [_result_items(job, columns) for job in jobs]
        pooled = {c: _pooled([it.get(c) for it in items]) for c in columns if c != "avg"}
        scores = {
            c: mean_or_none([{job.plan.benchmarks.get(k, k): v for k, v in job.scores.items()}.get(c) for job in jobs])
            for c in columns
            if c != "avg"
        }
        t.add(method_label(method), {**scores, "avg": mean_or_none([job.avg for job in jobs])}, None, None, pooled)
    mark_top(t)
    return {c: t.top[c] for c in t.top if t.tested.get(c) == set(t.items)}


def tuned_over_draws(search_dirs: list[Path], out: Path, untuned_from: tuple[str, ...] = UNTUNED) -> list[Path]:
    """The tuned Table 1 of several searches (one per zoo draw: each search dir's search.json), written to
    `out`/table1_tuned.md|csv beside the untuned tables there (`untuned_from`'s averages are the untuned column:
    tables of the same draws)."""
    import json

    from obim.merging.staging import atomic_write_file

    from .results import paper_tables

    records = [r for d in search_dirs for r in json.loads((Path(d) / "search.json").read_text())["records"]]
    if not records:
        return []
    named = set(records[0]["test_scores"])
    columns = [c for c in paper_tables()["table1"]["columns"] if c in named] + sorted(
        named - set(paper_tables()["table1"]["columns"])
    )
    left_out = [c for c in columns if c not in records[0]["dev_scores"]]
    r0 = records[0]
    opts = {"seed": r0["sampler_seed"], "trials": r0["budget"], "startup_trials": r0.get("startup_trials", 5)}
    md, csv_text = tuned_table(records, out, columns, left_out, opts, untuned_from)
    written = []
    for name, text in (("table1_tuned.md", md), ("table1_tuned.csv", csv_text)):
        atomic_write_file(out / name, lambda tmp, text=text: tmp.write_text(text))
        written.append(out / name)
    return written
