"""A sweep's results, read back for its report: every `result.json` under a sweep directory, what each job's plan
says, the labels of models and methods (the registry's, obim.merging.methods), the `Table` every report layer
shares and the paper's numbers (obim/bench/paper_tables.yaml). The bottom layer of obim.bench.report: it imports
no other."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from obim.merging.errors import ObimError
from obim.merging.methods import METHODS

from ..plan import axis_of
from ..stages import RESULT_SCHEMA

MODEL_LABELS = {"lm": "LM", "math": "Math", "code": "Code"}
PAPER_TABLES = Path(__file__).resolve().parents[1] / "paper_tables.yaml"  # package data of obim.bench


def method_label(name: str) -> str:
    return METHODS[name].pretty_name if name in METHODS else name


def paper_tables() -> dict[str, Any]:
    return yaml.safe_load(PAPER_TABLES.read_text())


@dataclass
class Table:
    name: str
    title: str
    columns: list[str]  # the paper's column names, `avg` last
    rows: list[tuple[str, dict[str, float | None], list | None]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    lead: str = "model"  # the first column's header

    def markdown(self) -> str:
        out = [
            f"# {self.title}",
            "",
            "Each cell: ours (the paper's, where it reports one).",
            "",
            f"| {self.lead} | " + " | ".join(self.columns) + " |",
            "|---|" + "---:|" * len(self.columns),
        ]
        for label, ours, paper in self.rows:
            cells = []
            for i, c in enumerate(self.columns):
                v = ours.get(c)
                s = "—" if v is None else f"{v:.2f}"
                p = paper[i] if paper is not None and i < len(paper) else None
                cells.append(s + (f" ({p:.2f})" if p is not None else ""))
            out.append(f"| {label} | " + " | ".join(cells) + " |")
        out += [""] + [f"- {n}" for n in self.notes] + ([""] if self.notes else [])
        return "\n".join(out)

    def csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow([self.lead, *self.columns, *(f"paper_{c}" for c in self.columns)])
        for label, ours, paper in self.rows:
            paper = list(paper or [])
            w.writerow(
                [
                    label,
                    *("" if ours.get(c) is None else f"{ours[c]:.4f}" for c in self.columns),
                    *("" if i >= len(paper) or paper[i] is None else paper[i] for i in range(len(self.columns))),
                ]
            )
        return buf.getvalue()


def load_results(root: str | Path) -> list[dict[str, Any]]:
    """Every result.json under root, oldest first (so later ones win). One written by an older obim is refused
    rather than half-read: rerunning its sweep redoes it from the caches."""
    found = []
    for p in Path(root).rglob("result.json"):
        try:
            r = json.loads(p.read_text())
        except (json.JSONDecodeError, OSError):
            continue
        if r.get("schema") != RESULT_SCHEMA:
            raise ObimError(
                f"{p}: result.json of layout {r.get('schema', 1)}, this obim reads {RESULT_SCHEMA}; "
                f"rerun its sweep (jobs are redone from the caches) or move it out of {root}"
            )
        r["_path"], r["_mtime"] = str(p), p.stat().st_mtime_ns
        found.append(r)
    return sorted(found, key=lambda r: (r["_mtime"], r["_path"]))


def plan_value(r: dict, key: str) -> Any:
    return r["plan"].get(key)


def varies_only(r: dict, axes: set[str]) -> bool:
    """Whether the job's overrides vary no sweep axis but `axes`."""
    return {a for a in map(axis_of, plan_value(r, "overrides") or []) if a is not None} <= axes


def count_job(r: dict) -> bool:
    """A post-pretraining OBIM or DARE job that varies only the number of models (Table 11, Figure 3)."""
    return (
        plan_value(r, "setting") == "pt"
        and plan_value(r, "method") in ("obim", "dare")
        and varies_only(r, {"n_models"})
    )


def by_count(results: list[dict]) -> dict[tuple[int, str], dict]:
    """The post-pretraining OBIM and DARE jobs that vary only the number of models, by (models merged with the
    base counted, as the paper counts them; method), the latest of each."""
    return {(plan_value(r, "n_models") + 1, plan_value(r, "method")): r for r in results if count_job(r)}


def best_single(r: dict | None) -> tuple[str, float] | None:
    """The job's best individual model by average (an unscored one, e.g. unjudged, is left out)."""
    ind = {k: v["avg"] for k, v in ((r or {}).get("individual") or {}).items() if v.get("avg") is not None}
    if not ind:
        return None
    name = max(ind, key=ind.__getitem__)
    return name, ind[name]
