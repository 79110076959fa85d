"""The end of a sweep: its report written once into the results folder (each table's .md and .csv, a PNG beside
each axis table, figure3.png, table10.md, jobs.md), then logged, as written, to a W&B run. The top layer of
obim.bench.report; obim.bench.console and experiments/tables.py call it."""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from obim.merging.staging import atomic_write_file

from .costs import jobs_table, table10
from .plots import figure3, write_plots
from .results import JobRecord, Table, load_results
from .tables import build_tables


@dataclass(frozen=True)
class Report:
    """What write_report wrote: the tables it built (the console prints from them), the figures, every file."""

    tables: list[Table]
    figures: list[Path]
    files: list[Path]
    results: list[JobRecord]


def _write(path: Path, text: str) -> Path:
    atomic_write_file(path, lambda tmp: tmp.write_text(text))
    return path


def write_report(runs: str | Path, out: str | Path) -> Report | None:
    """Every result under `runs` into `out`: <table>.md|csv, a PNG plot beside each axis table (<table>.png,
    figure3.png for Table 11), claims.md (the paper's claims judged), table10.md and jobs.md. None, and nothing
    written, when `runs` holds no result.
    Nothing is logged here: log_report does that."""
    results = load_results(runs)
    if not results:
        return None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tables = build_tables(results)
    files = []
    for t in tables:
        files += [_write(out / f"{t.name}.md", t.markdown()), _write(out / f"{t.name}.csv", t.csv())]
    figures = write_plots(tables, out)
    fig = figure3(results, out)
    figures += [fig] if fig else []
    files += figures
    from .claims import build_claims
    from .results import paper_tables

    claims = build_claims(tables, results[-1].plan.setting, paper_tables())
    if claims:
        files.append(_write(out / "claims.md", claims))
    t10 = table10(results)
    if t10:
        files.append(_write(out / "table10.md", t10))
    files.append(_write(out / "jobs.md", jobs_table(results)))
    return Report(tables, figures, files, results)


def log_report(report: Report) -> bool:
    """Log the report's tables and figures to the active W&B run, if there is one (wandb is not imported for
    this); False when there is none."""
    wandb = sys.modules.get("wandb")
    run = getattr(wandb, "run", None)
    if wandb is None or run is None:
        return False
    data: dict[str, Any] = {}
    for t in report.tables:
        rows = list(csv.reader(t.csv().splitlines()))
        data[f"tables/{t.name}"] = wandb.Table(columns=rows[0], data=rows[1:])
    for p in report.figures:
        data[f"figures/{p.stem}"] = wandb.Image(str(p))
    run.log(data)
    return True


def write_tables(runs: str | Path, out: str | Path, reference: bool = False) -> list[Path]:
    """write_report, then log_report to the active W&B run, if any; every file written ([] when no result).
    `reference`: the reference results, whose draws and spread obim/bench/zoo/reference.json records too."""
    report = write_report(runs, out)
    if report is None:
        return []
    log_report(report)
    if reference:
        from .reference import reference_entry, write_reference

        entry = reference_entry(report.tables, report.results)
        return [*report.files, write_reference(report.results[-1].plan.experiment, entry)]
    return report.files
