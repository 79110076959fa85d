"""The paper's tables from sweep results: every `result.json` under a sweep directory, aggregated into Markdown and
CSV in the paper's layout, each of our cells beside the paper's number (obim/bench/paper_tables.yaml), and their plots
(obim/plots.py).

A row comes from the latest result (by file time) of the jobs that match it: Tables 1-3 use each experiment's main
setting (only `method` and evaluation/logging options overridden); Tables 4-6 and 11 the OBIM (and DARE) jobs that
vary one axis: validation source, validation size, order, number of models; the grid table the jobs that vary only
retentions or method parameters.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

METHOD_LABELS = {"ta": "TA", "ties": "TIES", "dare": "DARE", "della": "DELLA", "tall_mask": "TALL-Mask",
                 "pcb": "PCB", "breadcrumbs": "Breadcrumbs", "obim": "OBIM", "ties_obm": "TIES+OBM",
                 "ties_im": "TIES+IM"}
MODEL_LABELS = {"lm": "LM", "math": "Math", "code": "Code"}
BASE_LABELS = {"sft": "Base", "pt": "Qwen2-7B"}  # the paper's name of the pt base row
TABLE1_METHODS = ["ta", "ties", "dare", "della", "tall_mask", "pcb", "breadcrumbs", "obim"]
TABLE3_METHODS = ["ties", "ties_obm", "ties_im", "obim"]
SOURCE_LABELS = {("gsm8k", "math"): "Math", ("mbpp",): "Code", ("gsm8k", "math", "mbpp"): "Math+Code"}
# Overrides that leave what a job computes as the experiment defines it (only which method, how it is evaluated
# or logged): a job with only these is the experiment's main setting, the one Tables 1-3 report.
NEUTRAL = {"method", "experiment", "experiment.zoo", "experiment.zoo_recipe", "progress", "verbose", "keep_merged",
           "cache_dir", "results_dir", "device", "dry_run", "paper"}
NEUTRAL_GROUPS = {"eval", "tracking", "hydra"}


def axis_of(override: str) -> str | None:
    """The sweep axis an override changes (None: neutral), e.g. 'order.model=math' -> 'order',
    'experiment.models.math.retention=0.3' -> 'retention', 'method.parameters.density=0.3' -> 'method'."""
    key = override.split("=", 1)[0].lstrip("+~")
    if key in NEUTRAL or key.split(".")[0].split("/")[0] in NEUTRAL_GROUPS:
        return None
    if key.startswith("experiment.models.") and key.endswith(".retention"):
        return "retention"
    # which models and where the data lives (a local copy of a hub model, your checkpoints) is not an axis
    if key in ("experiment.base", "experiment.checkpoints") or key.startswith("experiment.validation_sources.") or (
            key.startswith("experiment.models.") and key.endswith(".path")):
        return None
    return key if key.startswith("experiment.") else key.split(".")[0]


def paper_tables() -> dict[str, Any]:
    return yaml.safe_load((Path(__file__).parent / "paper_tables.yaml").read_text())


@dataclass
class Table:
    name: str
    title: str
    columns: list[str]                      # the paper's column names, `avg` last
    rows: list[tuple[str, dict[str, float | None], list | None]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    lead: str = "model"                     # the first column's header

    def markdown(self) -> str:
        out = [f"# {self.title}", "", "Each cell: ours (the paper's, where it reports one).", "",
               f"| {self.lead} | " + " | ".join(self.columns) + " |", "|---|" + "---:|" * len(self.columns)]
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
            w.writerow([label, *("" if ours.get(c) is None else f"{ours[c]:.4f}" for c in self.columns),
                        *("" if i >= len(paper) or paper[i] is None else paper[i] for i in range(len(self.columns)))])
        return buf.getvalue()


# ----------------------------------------------------------------------------------------------- results


def load_results(root: str | Path) -> list[dict[str, Any]]:
    """Every result.json under root, oldest first (so later ones win)."""
    found = []
    for p in Path(root).rglob("result.json"):
        try:
            r = json.loads(p.read_text())
        except (json.JSONDecodeError, OSError):
            continue
        r["_path"], r["_mtime"] = str(p), p.stat().st_mtime_ns
        found.append(r)
    return sorted(found, key=lambda r: (r["_mtime"], r["_path"]))


def _varies_only(r: dict, axes: set[str]) -> bool:
    return {a for a in map(axis_of, r.get("overrides", [])) if a is not None} <= axes


def _named(scores: dict[str, float], benchmarks: dict[str, str]) -> dict[str, float]:
    return {benchmarks.get(t, t): v for t, v in scores.items()}


def _row(scores: dict[str, float] | None, benchmarks: dict[str, str], columns: list[str]) -> dict[str, float | None]:
    if scores is None:
        return {}
    named = _named(scores, benchmarks)
    row = {c: named.get(c) for c in columns if c != "avg"}
    vals = [v for v in row.values() if v is not None]
    row["avg"] = sum(vals) / len(vals) if vals and len(vals) == len(row) else None
    return row


def _latest(results: list[dict], pred: Callable[[dict], bool]) -> dict | None:
    hit = [r for r in results if pred(r)]
    return hit[-1] if hit else None


def _paper_row(paper: dict, table: str, label: str) -> list | None:
    return (paper.get(table) or {}).get("rows", {}).get(label)


# ------------------------------------------------------------------------------------------------- tables


def _main_table(name: str, title: str, results: list[dict], setting: str, methods: list[str], paper: dict,
                individuals: bool) -> Table | None:
    cols = paper[name]["columns"]
    main = [r for r in results if r.get("setting") == setting and r.get("main")]
    if not main:
        return None
    bench = main[-1]["plan"]["benchmarks"]
    t = Table(name, title, cols)
    if individuals:
        ref = _latest(main, lambda r: bool(r.get("individual")))
        if ref is not None:
            ind = ref["individual"]
            for model in [m for m in ["base", *ref["models"]] if m in ind]:  # the base order, not the file's
                rec = ind[model]
                if setting == "sft" and model == "base":
                    continue  # the paper's Table 1 lists the experts only
                label = BASE_LABELS[setting] if model == "base" else MODEL_LABELS.get(model, model)
                t.rows.append((label if setting == "sft" or model != "base" else "base",
                               _row(rec["scores"], bench, cols), _paper_row(paper, name, label)))
    for m in methods:
        r = _latest(main, lambda r, m=m: r["method"] == m)
        if r is not None:
            t.rows.append((METHOD_LABELS[m], _row(r["scores"], bench, cols),
                           _paper_row(paper, name, METHOD_LABELS[m])))
    if not any(lbl in METHOD_LABELS.values() for lbl, _, _ in t.rows):
        return None
    ex = main[-1]
    t.notes.append(f"experiment {ex['experiment']}; models {', '.join(ex['models'])}; "
                   f"order {ex['plan']['merge']['order']}")
    return t


def _math_sources(r: dict) -> tuple[tuple[str, ...], int] | None:
    v = r["plan"].get("validation", {}).get("math")
    if not v:
        return None
    return tuple(sorted(v["sources"])), sum(v["sources"].values())


def table4(results: list[dict], paper: dict) -> Table | None:
    rs = [r for r in results if r.get("setting") == "sft" and r["method"] == "obim"
          and _varies_only(r, {"validation"}) and _math_sources(r)]
    t = Table("table4", "Table 4: validation-set source for the math model's saliency", paper["table4"]["columns"],
              lead="source")
    seen = {}
    for r in rs:
        seen[_math_sources(r)] = r
    for (sources, size), r in sorted(seen.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        label = SOURCE_LABELS.get(sources, "+".join(sources))
        paper_row = _paper_row(paper, "table4", label) if size == 100 else None
        t.rows.append((f"{label} ({size})", _row(r["scores"], r["plan"]["benchmarks"], t.columns), paper_row))
    return t if len(t.rows) > 1 else None


def table5(results: list[dict], paper: dict) -> Table | None:
    rs = [r for r in results if r.get("setting") == "sft" and r["method"] == "obim"
          and _varies_only(r, {"validation"}) and _math_sources(r) and _math_sources(r)[0] == ("gsm8k", "math")]
    t = Table("table5", "Table 5: validation-set size (math model, source Math)", paper["table5"]["columns"],
              lead="samples")
    seen = {_math_sources(r)[1]: r for r in rs}
    for size in sorted(seen):
        r = seen[size]
        t.rows.append((str(size), _row(r["scores"], r["plan"]["benchmarks"], t.columns),
                       _paper_row(paper, "table5", str(size))))
    return t if len(t.rows) > 1 else None


def _order_label(r: dict) -> str:
    order = r["plan"]["merge"]["order"]
    if order == "rotation":
        return "Rotation"
    base = r["models"]
    kind = (r["config"].get("order") or {}).get("kind")
    if kind in ("first", "last"):
        m = r["config"]["order"]["model"]
        return f"{MODEL_LABELS.get(m, m)} {kind.capitalize()}"
    if order == base[: len(order)]:
        return f"{MODEL_LABELS.get(base[-1], base[-1])} Last"
    return " > ".join(order)


def table6(results: list[dict], paper: dict) -> Table | None:
    rs = [r for r in results if r.get("setting") == "sft" and r["method"] == "obim" and _varies_only(r, {"order"})]
    t = Table("table6", "Table 6: iteration order", paper["table6"]["columns"], lead="order")
    seen = {}
    for r in rs:
        seen[(_order_label(r), str(r["plan"]["merge"]["order"]))] = r
    for (label, order), r in sorted(seen.items()):
        t.rows.append((f"{label} ({order})" if order != "rotation" else label,
                       _row(r["scores"], r["plan"]["benchmarks"], t.columns), _paper_row(paper, "table6", label)))
    return t if len(t.rows) > 1 else None


def _by_count(results: list[dict]) -> dict[tuple[int, str], dict]:
    out = {}
    for r in results:
        if r.get("setting") == "pt" and r["method"] in ("obim", "dare") and _varies_only(r, {"n_models"}):
            out[(r["n_models"] + 1, r["method"])] = r  # the paper counts the base among the merged models
    return out


def _best_single(r: dict) -> tuple[str, float] | None:
    ind = r.get("individual") or {}
    if not ind:
        return None
    name = max(ind, key=lambda k: ind[k]["avg"])
    return name, ind[name]["avg"]


def table11(results: list[dict], paper: dict) -> Table | None:
    seen = _by_count(results)
    if len({n for n, _ in seen}) < 2:
        return None
    t = Table("table11", "Table 11: number of merged models (the base included)", paper["table11"]["columns"],
              lead="models, method")
    prow = paper["table11"]["rows"]
    for (n, m), r in sorted(seen.items()):
        label = METHOD_LABELS[m]
        t.rows.append((f"{n}, {label}", _row(r["scores"], r["plan"]["benchmarks"], t.columns),
                       (prow.get(str(n)) or {}).get(label)))
    for n in sorted({n for n, _ in seen}):
        best = _best_single(seen.get((n, "obim")) or seen.get((n, "dare")))
        if best:
            t.notes.append(f"{n} models: best single model {best[0]} (avg {best[1]:.2f})")
    return t


def jobs_table(results: list[dict]) -> str:
    """Every job: what it varied, its average and its costs (the paper's Table 10 figures)."""
    lines = ["# Jobs", "", "| job | method | avg | saliency s | s/sample | merge s | eval s | peak RSS MB |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(results, key=lambda r: r.get("job") or r["_path"]):
        sps = r.get("saliency_s_per_sample")
        avg = "—" if r["avg"] is None else f"{r['avg']:.2f}"
        lines.append(f"| {r.get('job') or Path(r['_path']).parent.name} | {r['method']} | {avg} | "
                     f"{r['saliency_s']:.1f} | {'' if sps is None else f'{sps:.4f}'} | {r['merge_s']:.1f} | "
                     f"{r['eval_s']:.1f} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def table10(results: list[dict]) -> str | None:
    """The paper's Table 10 (compute cost) beside ours: each experiment's latest main OBIM job. Cached statistics
    and merges carry the times measured when they were computed."""
    ours = {}
    for r in results:
        c = r.get("cost")
        if r["method"] == "obim" and r.get("main") and c and c.get("hessian_s_per_sample") is not None:
            ours[r["experiment"]] = r
    if not ours:
        return None
    return "# Table 10: compute cost of OBIM\n\n" + cost_table(
        [(f"ours: {name}", r["cost"]) for name, r in sorted(ours.items())])


def cost_table(ours: list[tuple[str, dict]]) -> str:
    """The paper's Table 10 rows, then ours (label, a job's `cost` record: obim.bench.sweep.cost_report's keys)."""
    lines = ["| source | models | model size | GPUs | Hessian s/sample | saliency s | merge s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for p in paper_tables()["table10"]:
        lines.append(f"| paper (A800 80G) | {p['model_count']} | {p['model_size']} | {p['gpus']} | "
                     f"{p['hessian_s_per_sample']:.2f} | {p['saliency_s']} | {p['merge_s']} |")
    for label, c in ours:
        where = c.get("gpu_name") or "CPU"
        size = f"{c['params_b']:.3g}B" if c["params_b"] >= 1 else f"{c['params_b'] * 1000:.3g}M"
        lines.append(f"| {label} ({where}) | {c['models']} | {size} | {c['gpus']} | "
                     f"{c['hessian_s_per_sample']:.4f} | {c['saliency_s']:.1f} | {c['merge_s']:.1f} |")
    lines += ["", "- Hessian s/sample: the forward passes that collect the layer inputs' second moments, per "
              "validation sample; saliency s: all of them for every model; merge s: OBIM's merge, I/O included."]
    return "\n".join(lines) + "\n"


GRID_PREFIXES = ("method.parameters.", "method.per_model.", "experiment.models.")


def grid_table(results: list[dict]) -> Table | None:
    """Retention and parameter grids: jobs that vary only retentions or the method's parameters, a row per
    (method, setting), latest result each; the paper reports no such table."""
    seen: dict[tuple[str, str], dict] = {}
    for r in results:
        grid = [o.lstrip("+~") for o in r.get("overrides", []) if axis_of(o) in ("retention", "method")]
        if grid and _varies_only(r, {"retention", "method"}):
            setting = " ".join(sorted(next((o[len(p):] for p in GRID_PREFIXES if o.startswith(p)), o) for o in grid))
            seen[(r["method"], setting)] = r
    if not seen:
        return None
    order = list(METHOD_LABELS)

    def key(k: tuple[str, str]) -> tuple:  # the methods in the paper's order, then numeric settings by value
        v = k[1].partition("=")[2]
        num = v.replace(".", "", 1).isdigit()
        return (order.index(k[0]) if k[0] in order else len(order), k[0], not num, float(v) if num else 0.0, k[1])

    last = list(seen.values())[-1]
    named = list(dict.fromkeys(last["plan"]["benchmarks"].values()))
    main = (paper_tables().get({"sft": "table1", "pt": "table2"}.get(last.get("setting"), "")) or {}).get("columns")
    cols = main if main and set(named) <= set(main) else [*named, "avg"]  # the paper's column order
    t = Table("grid", "Retention and parameter grid", cols, lead="method, setting")
    for m, setting in sorted(seen, key=key):
        r = seen[(m, setting)]
        t.rows.append((f"{METHOD_LABELS.get(m, m)}, {setting}", _row(r["scores"], r["plan"]["benchmarks"], cols), None))
    return t


def build_tables(results: list[dict]) -> list[Table]:
    paper = paper_tables()
    found = [
        _main_table("table1", "Table 1: merging the SFT experts", results, "sft", TABLE1_METHODS, paper, True),
        _main_table("table3", "Table 3: ablation (intra-model x inter-model)", results, "sft", TABLE3_METHODS,
                    paper, False),
        table4(results, paper), table5(results, paper), table6(results, paper),
        _main_table("table2", "Table 2: merging post-pretrained checkpoints", results, "pt", TABLE1_METHODS,
                    paper, True),
        table11(results, paper), grid_table(results),
    ]
    return [t for t in found if t is not None]


def write_tables(runs: str | Path, out: str | Path) -> list[Path]:
    """Aggregate every result under `runs` into `out`/<table>.md|csv, a PNG plot beside each axis table
    (<table>.png, figure3.png for Table 11), table10.md and jobs.md; tables and plots also go to the active W&B
    run, if any."""
    from obim.merging.staging import atomic_write_file
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
