"""The paper's tables from sweep results: every `result.json` under a sweep directory, aggregated into Markdown and
CSV in the paper's layout, each of our cells beside the paper's number (obim/bench/paper_tables.yaml), and their
plots (obim/bench/plots.py).

A row comes from the latest result (by file time) of the jobs that match it: Tables 1-3 use each experiment's main
setting (only `method` and evaluation/logging options overridden); Tables 4-6 and 11 the OBIM (and DARE) jobs that
vary one axis: validation source, validation size, order, number of models; the grid table the jobs that vary only
retentions or method parameters. Methods are named by the registry's labels (obim.merging.methods).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from obim.merging.errors import ObimError
from obim.merging.methods import METHODS

from .plan import axis_of
from .stages import RESULT_SCHEMA, score_avg

MODEL_LABELS = {"lm": "LM", "math": "Math", "code": "Code"}
PT_BASE_LABEL = "Qwen2-7B"  # the paper's name of Table 2's base row
TABLE1_METHODS = ["ta", "ties", "dare", "della", "tall_mask", "pcb", "breadcrumbs", "obim"]
TABLE3_METHODS = ["ties", "ties_obm", "ties_im", "obim"]
SOURCE_LABELS = {("gsm8k", "math"): "Math", ("mbpp",): "Code", ("gsm8k", "math", "mbpp"): "Math+Code"}


def method_label(name: str) -> str:
    return METHODS[name].pretty_name if name in METHODS else name


def paper_tables() -> dict[str, Any]:
    return yaml.safe_load((Path(__file__).parent / "paper_tables.yaml").read_text())


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


# ----------------------------------------------------------------------------------------------- results


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


def _plan(r: dict, key: str) -> Any:
    return r["plan"].get(key)


def _varies_only(r: dict, axes: set[str]) -> bool:
    return {a for a in map(axis_of, _plan(r, "overrides") or []) if a is not None} <= axes


def _row(scores: dict[str, float] | None, benchmarks: dict[str, str], columns: list[str]) -> dict[str, float | None]:
    """A table row: each paper column's score (benchmarks: lm-eval task -> column), and their average."""
    if scores is None:
        return {}
    named = {benchmarks.get(t, t): v for t, v in scores.items()}
    row = {c: named.get(c) for c in columns if c != "avg"}
    row["avg"] = score_avg(row)
    return row


def _result_row(r: dict, columns: list[str]) -> dict[str, float | None]:
    return _row(r["scores"], _plan(r, "benchmarks"), columns)


def _latest(results: list[dict], pred: Callable[[dict], bool]) -> dict | None:
    hit = [r for r in results if pred(r)]
    return hit[-1] if hit else None


def _paper_row(paper: dict, table: str, label: str) -> list | None:
    return (paper.get(table) or {}).get("rows", {}).get(label)


# ------------------------------------------------------------------------------------------------- tables


def _main_table(
    name: str, title: str, results: list[dict], setting: str, methods: list[str], paper: dict, individuals: bool
) -> Table | None:
    cols = paper[name]["columns"]
    main = [r for r in results if _plan(r, "setting") == setting and _plan(r, "main")]
    if not main:
        return None
    bench = _plan(main[-1], "benchmarks")
    t = Table(name, title, cols)
    if individuals:
        ref = _latest(main, lambda r: bool(r.get("individual")))
        if ref is not None:
            ind = ref["individual"]
            for model in [m for m in ["base", *_plan(ref, "models")] if m in ind]:  # the base order
                if model == "base" and setting == "sft":
                    continue  # the paper's Table 1 lists the experts only
                label, cited = ("base", PT_BASE_LABEL) if model == "base" else (MODEL_LABELS.get(model, model),) * 2
                t.rows.append((label, _row(ind[model]["scores"], bench, cols), _paper_row(paper, name, cited)))
    for m in methods:
        r = _latest(main, lambda r, m=m: _plan(r, "method") == m)
        if r is not None:
            t.rows.append((method_label(m), _result_row(r, cols), _paper_row(paper, name, method_label(m))))
    if not any(_plan(r, "method") in methods for r in main):
        return None
    ex = main[-1]
    t.notes.append(
        f"experiment {_plan(ex, 'experiment')}; models {', '.join(_plan(ex, 'models'))}; "
        f"order {ex['plan']['merge']['order']}"
    )
    return t


Row = tuple[Any, str, "list | None"]  # (sort key, label, the paper's row)


def _axis_table(
    name: str, title: str, lead: str, results: list[dict], paper: dict, describe: Callable[[dict], Row | None]
) -> Table:
    """A table over one sweep axis: a row per setting (`describe`'s sort key), the latest result of each."""
    seen: dict[Any, tuple[Row, dict]] = {}
    for r in results:
        d = describe(r)
        if d is not None:
            seen[d[0]] = (d, r)
    t = Table(name, title, paper[name]["columns"], lead=lead)
    for key in sorted(seen):
        (_, label, cited), r = seen[key]
        t.rows.append((label, _result_row(r, t.columns), cited))
    return t


def _obim_sft(r: dict, axis: str) -> bool:
    return _plan(r, "setting") == "sft" and _plan(r, "method") == "obim" and _varies_only(r, {axis})


def _math_sources(r: dict) -> tuple[tuple[str, ...], int] | None:
    v = (_plan(r, "validation") or {}).get("math")
    if not v:
        return None
    return tuple(sorted(v["sources"])), sum(v["sources"].values())


def table4(results: list[dict], paper: dict) -> Table | None:
    def describe(r: dict) -> Row | None:
        ms = _math_sources(r) if _obim_sft(r, "validation") else None
        if ms is None:
            return None
        sources, size = ms
        label = SOURCE_LABELS.get(sources, "+".join(sources))
        return (size, sources), f"{label} ({size})", _paper_row(paper, "table4", label) if size == 100 else None

    t = _axis_table(
        "table4", "Table 4: validation-set source for the math model's saliency", "source", results, paper, describe
    )
    return t if len(t.rows) > 1 else None


def table5(results: list[dict], paper: dict) -> Table | None:
    def describe(r: dict) -> Row | None:
        ms = _math_sources(r) if _obim_sft(r, "validation") else None
        if ms is None or ms[0] != ("gsm8k", "math"):
            return None
        return ms[1], str(ms[1]), _paper_row(paper, "table5", str(ms[1]))

    t = _axis_table(
        "table5", "Table 5: validation-set size (math model, source Math)", "samples", results, paper, describe
    )
    return t if len(t.rows) > 1 else None


def _order_label(r: dict) -> str:
    order = r["plan"]["merge"]["order"]
    if order == "rotation":
        return "Rotation"
    kind = (r["config"].get("order") or {}).get("kind")
    if kind in ("first", "last"):
        m = r["config"]["order"]["model"]
        return f"{MODEL_LABELS.get(m, m)} {kind.capitalize()}"
    merged = _plan(r, "models")
    if order == merged:  # the base order (the SFT experiments' own): its last model last
        return f"{MODEL_LABELS.get(merged[-1], merged[-1])} Last"
    return " > ".join(order)


def table6(results: list[dict], paper: dict) -> Table | None:
    def describe(r: dict) -> Row | None:
        if not _obim_sft(r, "order"):
            return None
        label, order = _order_label(r), str(r["plan"]["merge"]["order"])
        return (
            (label, order),
            label if order == "rotation" else f"{label} ({order})",
            _paper_row(paper, "table6", label),
        )

    t = _axis_table("table6", "Table 6: iteration order", "order", results, paper, describe)
    return t if len(t.rows) > 1 else None


def _count_job(r: dict) -> bool:
    return _plan(r, "setting") == "pt" and _plan(r, "method") in ("obim", "dare") and _varies_only(r, {"n_models"})


def by_count(results: list[dict]) -> dict[tuple[int, str], dict]:
    """The post-pretraining OBIM and DARE jobs that vary only the number of models, by (models merged with the
    base counted, as the paper counts them; method), the latest of each."""
    return {(_plan(r, "n_models") + 1, _plan(r, "method")): r for r in results if _count_job(r)}


def best_single(r: dict | None) -> tuple[str, float] | None:
    """The job's best individual model by average (an unscored one, e.g. unjudged, is left out)."""
    ind = {k: v["avg"] for k, v in ((r or {}).get("individual") or {}).items() if v.get("avg") is not None}
    if not ind:
        return None
    name = max(ind, key=ind.__getitem__)
    return name, ind[name]


def table11(results: list[dict], paper: dict) -> Table | None:
    seen = by_count(results)
    if len({n for n, _ in seen}) < 2:
        return None
    prow = paper["table11"]["rows"]

    def describe(r: dict) -> Row | None:
        if not _count_job(r):
            return None
        key = (_plan(r, "n_models") + 1, _plan(r, "method"))
        label = method_label(key[1])
        return key, f"{key[0]}, {label}", (prow.get(str(key[0])) or {}).get(label)

    t = _axis_table(
        "table11", "Table 11: number of merged models (the base included)", "models, method", results, paper, describe
    )
    for n in sorted({n for n, _ in seen}):
        best = best_single(seen.get((n, "obim")) or seen.get((n, "dare")))
        if best:
            t.notes.append(f"{n} models: best single model {best[0]} (avg {best[1]:.2f})")
    return t


GRID_PREFIXES = ("method.parameters.", "method.per_model.", "experiment.models.")


def grid_table(results: list[dict]) -> Table | None:
    """Retention and parameter grids: jobs that vary only retentions or the method's parameters, a row per
    (method, setting), latest result each; the paper reports no such table."""
    seen: dict[tuple[str, str], dict] = {}
    for r in results:
        grid = [o.lstrip("+~") for o in _plan(r, "overrides") or [] if axis_of(o) in ("retention", "method")]
        if grid and _varies_only(r, {"retention", "method"}):
            setting = " ".join(sorted(next((o[len(p) :] for p in GRID_PREFIXES if o.startswith(p)), o) for o in grid))
            seen[(_plan(r, "method"), setting)] = r
    if not seen:
        return None
    order = list(METHODS)

    def key(k: tuple[str, str]) -> tuple:  # the methods in the registry's order, then numeric settings by value
        v = k[1].partition("=")[2]
        num = v.replace(".", "", 1).isdigit()
        return (order.index(k[0]) if k[0] in order else len(order), k[0], not num, float(v) if num else 0.0, k[1])

    last = list(seen.values())[-1]
    named = list(dict.fromkeys(_plan(last, "benchmarks").values()))
    main = (paper_tables().get({"sft": "table1", "pt": "table2"}.get(_plan(last, "setting"), "")) or {}).get("columns")
    cols = main if main and set(named) <= set(main) else [*named, "avg"]  # the paper's column order
    t = Table("grid", "Retention and parameter grid", cols, lead="method, setting")
    for m, setting in sorted(seen, key=key):
        t.rows.append((f"{method_label(m)}, {setting}", _result_row(seen[(m, setting)], cols), None))
    return t


def build_tables(results: list[dict]) -> list[Table]:
    paper = paper_tables()
    found = [
        _main_table("table1", "Table 1: merging the SFT experts", results, "sft", TABLE1_METHODS, paper, True),
        _main_table(
            "table3", "Table 3: ablation (intra-model x inter-model)", results, "sft", TABLE3_METHODS, paper, False
        ),
        table4(results, paper),
        table5(results, paper),
        table6(results, paper),
        _main_table(
            "table2", "Table 2: merging post-pretrained checkpoints", results, "pt", TABLE1_METHODS, paper, True
        ),
        table11(results, paper),
        grid_table(results),
    ]
    return [t for t in found if t is not None]


def write_tables(runs: str | Path, out: str | Path) -> list[Path]:
    """Aggregate every result under `runs` into `out`/<table>.md|csv, a PNG plot beside each axis table
    (<table>.png, figure3.png for Table 11), table10.md and jobs.md; tables and plots also go to the active W&B
    run, if any."""
    from obim.merging.staging import atomic_write_file

    from .costs import jobs_table, table10
    from .plots import figure3, log_to_wandb, write_plots

    results = load_results(runs)
    out = Path(out)
    if not results:
        return []
    out.mkdir(parents=True, exist_ok=True)
    written = []
    tables = build_tables(results)
    for t in tables:
        for suffix, text in ((".md", t.markdown()), (".csv", t.csv())):
            p = out / f"{t.name}{suffix}"
            atomic_write_file(p, lambda tmp, text=text: tmp.write_text(text))
            written.append(p)
    figures = write_plots(tables, out)
    fig = figure3(results, out)
    figures += [fig] if fig else []
    written += figures
    log_to_wandb(tables, figures)
    t10 = table10(results)
    if t10:
        p = out / "table10.md"
        atomic_write_file(p, lambda tmp: tmp.write_text(t10))
        written.append(p)
    p = out / "jobs.md"
    jobs = jobs_table(results)
    atomic_write_file(p, lambda tmp: tmp.write_text(jobs))
    written.append(p)
    return written
