"""The paper's tables from a sweep's results (obim.bench.report.results): Markdown and CSV in the paper's layout,
each of our cells beside the paper's number.

A row comes from the latest result (by file time) of the jobs that match it: Tables 1-3 use each experiment's main
setting (only `method` and evaluation/logging options overridden); Tables 4-6 and 11 the OBIM (and DARE) jobs that
vary one axis: validation source, validation size, order, number of models; the grid table the jobs that vary only
retentions or method parameters. Methods are named by the registry's labels (obim.merging.methods).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

from obim.merging.methods import METHODS

from ..plan import axis_of
from ..stages import avg_stderr, score_avg
from .paired import Items, mark_top, record_items
from .results import (
    MODEL_LABELS,
    JobRecord,
    Table,
    best_single,
    by_count,
    count_job,
    mean_or_none,
    method_label,
    paper_tables,
    varies_only,
)

PT_BASE_LABEL = "Qwen2-7B"  # the paper's name of Table 2's base row
TABLE1_METHODS = ["ta", "ties", "dare", "della", "tall_mask", "pcb", "breadcrumbs", "obim"]
TABLE3_METHODS = ["ties", "ties_obm", "ties_im", "obim"]
# beyond the paper (+paper=table1_plus): Table 1's methods and these, in one table
EXTRA_METHODS = ["tsv", "sce", "lines", "ties_lines", "regmean", "fisher"]
SOURCE_LABELS = {("gsm8k", "math"): "Math", ("mbpp",): "Code", ("gsm8k", "math", "mbpp"): "Math+Code"}


# -------------------------------------------------------------------------------------------------- rows


def _row(
    scores: dict[str, float | None],
    benchmarks: dict[str, str],
    columns: list[str],
    avg: Callable[[dict[str, float | None]], float | None] = score_avg,
) -> dict[str, float | None]:
    """A table row: each paper column's value (benchmarks: lm-eval task -> column), and `avg` of them (the mean of
    scores; for standard errors, stderr_row's)."""
    named = {benchmarks.get(t, t): v for t, v in scores.items()}
    row = {c: named.get(c) for c in columns if c != "avg"}
    row["avg"] = avg(row)
    return row


def _result_row(r: JobRecord, columns: list[str]) -> dict[str, float | None]:
    return _row(r.scores, r.plan.benchmarks, columns)


def _se_row(stderr: dict[str, float | None], benchmarks: dict[str, str], columns: list[str]) -> dict[str, float | None]:
    """Each column's standard error, and the average's: sqrt(sum se^2) / k."""
    return _row(stderr, benchmarks, columns, lambda row: avg_stderr(list(row.values())))


def _result_items(r: JobRecord, columns: list[str], model: str = "merged") -> dict[str, Items | None]:
    """Each column's per-item values of one of the job's models (None where none were kept): what mark_top tests."""
    scores = r.scores if model == "merged" else r.individual[model].scores
    named = {r.plan.benchmarks.get(t, t): t for t in scores}
    return {c: record_items(r, model, named[c]) if c in named else None for c in columns if c != "avg"}


def _by_draw(records: list[JobRecord]) -> list[JobRecord]:
    """The latest of `records` (oldest first) for each zoo draw, in the draws' order."""
    latest = {r.plan.zoo_seed: r for r in records}
    return [latest[k] for k in sorted(latest)]


def _add(
    t: Table, label: str, draws: list[JobRecord], cited: list | None, model: str = "merged", compare: bool = True
) -> None:
    """A row from one job per zoo draw: the mean over the draws, the item noise's standard error of that mean, the
    standard deviation across draws (two draws or more) and, with `compare`, the items mark_top tests (each item's
    value averaged over the draws). Every draw is scored on the same test items, so their item noise is shared, not
    independent: the standard error is the mean of the draws' (the bound for fully shared noise), and the
    bootstrap resamples items, not draws x items."""
    cols = t.columns
    rows, ses, items = [], [], []
    for r in draws:
        s = (r.scores, r.stderr) if model == "merged" else (r.individual[model].scores, r.individual[model].stderr)
        rows.append(_row(s[0], r.plan.benchmarks, cols))
        ses.append(_se_row(s[1], r.plan.benchmarks, cols))
        items.append(_result_items(r, cols, model) if compare else {})
    k = len(draws)

    ours = {c: mean_or_none([row[c] for row in rows]) for c in cols}
    se = {c: mean_or_none([e[c] for e in ses]) for c in cols}
    sd = None
    if k > 1:
        sd = {c: None if ours[c] is None else statistics.stdev([row[c] or 0.0 for row in rows]) for c in cols}
    pooled = {c: _pooled([it.get(c) for it in items]) for c in cols if c != "avg"}
    t.add(label, ours, cited, se, pooled if compare else None, sd=sd, draws=[r.plan.zoo_seed for r in draws])
    t.per_draw[label] = {r.plan.zoo_seed: row for r, row in zip(draws, rows, strict=True)}
    t.zoos.update({r.zoo["seed"]: r.zoo.get("fingerprint") for r in draws if r.zoo})


def _pooled(items: list[Items | None]) -> Items | None:
    """Several draws' items of one benchmark as one: each item's value averaged over the draws (their mean score),
    so that a resample of the items moves every draw's value of an item together; None unless every draw has the
    same items."""
    if any(it is None for it in items):
        return None
    got = [it for it in items if it is not None]
    first = got[0]
    if len(got) == 1:
        return first
    if any(it.leaves.keys() != first.leaves.keys() or it.weighting != first.weighting for it in got):
        return None
    if any(it.leaves[leaf].keys() != first.leaves[leaf].keys() for it in got for leaf in first.leaves):
        return None
    return Items(
        {leaf: {k: sum(it.leaves[leaf][k] for it in got) / len(got) for k in v} for leaf, v in first.leaves.items()},
        first.weighting,
    )


def _paper_row(paper: dict, table: str, label: str) -> list | None:
    return (paper.get(table) or {}).get("rows", {}).get(label)


# ------------------------------------------------------------------------------------------------- tables


def _main_table(
    name: str, title: str, results: list[JobRecord], setting: str, methods: list[str], paper: dict, individuals: bool
) -> Table | None:
    cols = paper[name]["columns"]
    main = [r for r in results if r.plan.setting == setting and r.plan.main]
    if not main:
        return None
    t = Table(name, title, cols)
    if individuals:
        refs = _by_draw([r for r in main if r.individual])
        if refs:
            ref = refs[-1]
            for model in [m for m in ["base", *ref.plan.models] if all(m in r.individual for r in refs)]:
                if model == "base" and setting == "sft":
                    continue  # the paper's Table 1 lists the experts only
                label, cited = ("base", PT_BASE_LABEL) if model == "base" else (MODEL_LABELS.get(model, model),) * 2
                _add(t, label, refs, _paper_row(paper, name, cited), model, compare=False)
    for m in methods:
        draws = _by_draw([r for r in main if r.plan.method == m])
        if draws:
            _add(t, method_label(m), draws, _paper_row(paper, name, method_label(m)))
    if not any(r.plan.method in methods for r in main):
        return None
    ex = main[-1].plan
    t.notes.append(f"experiment {ex.experiment}; models {', '.join(ex.models)}; order {ex.merge_config.order}")
    return t


def _plus_table(results: list[JobRecord], paper: dict) -> Table | None:
    """Table 1 with the methods beyond the paper (+paper=table1_plus), when one of them ran: the paper's numbers
    beside its own methods' rows only."""
    main = [r for r in results if r.plan.setting == "sft" and r.plan.main]
    if not any(r.plan.method in EXTRA_METHODS for r in main):
        return None
    spec = {**paper, "table1_plus": paper["table1"]}
    return _main_table(
        "table1_plus",
        "Table 1 and the methods beyond the paper",
        results,
        "sft",
        [*TABLE1_METHODS, *EXTRA_METHODS],
        spec,
        True,
    )


Row = tuple[Any, str, "list | None"]  # (sort key, label, the paper's row)


def _axis_table(
    name: str,
    title: str,
    lead: str,
    results: list[JobRecord],
    paper: dict,
    describe: Callable[[JobRecord], Row | None],
) -> Table:
    """A table over one sweep axis: a row per setting (`describe`'s sort key), the latest result of each draw."""
    seen: dict[Any, tuple[Row, list[JobRecord]]] = {}
    for r in results:
        d = describe(r)
        if d is not None:
            seen[d[0]] = (d, [*seen.get(d[0], (d, []))[1], r])
    t = Table(name, title, paper[name]["columns"], lead=lead)
    for key in sorted(seen):
        (_, label, cited), rs = seen[key]
        _add(t, label, _by_draw(rs), cited)
    return t


def _obim_sft(r: JobRecord, axis: str) -> bool:
    return r.plan.setting == "sft" and r.plan.method == "obim" and varies_only(r, {axis})


def _math_sources(r: JobRecord) -> tuple[tuple[str, ...], int] | None:
    v = r.plan.validation.get("math")
    if v is None:
        return None
    return tuple(sorted(v.sources)), sum(v.sources.values())


def table4(results: list[JobRecord], paper: dict) -> Table | None:
    def describe(r: JobRecord) -> Row | None:
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


def table5(results: list[JobRecord], paper: dict) -> Table | None:
    def describe(r: JobRecord) -> Row | None:
        ms = _math_sources(r) if _obim_sft(r, "validation") else None
        if ms is None or ms[0] != ("gsm8k", "math"):
            return None
        return ms[1], str(ms[1]), _paper_row(paper, "table5", str(ms[1]))

    t = _axis_table(
        "table5", "Table 5: validation-set size (math model, source Math)", "samples", results, paper, describe
    )
    return t if len(t.rows) > 1 else None


def _order_label(r: JobRecord) -> str:
    order = r.plan.merge_config.order
    if order == "rotation":
        return "Rotation"
    kind, m = r.order_kind, r.order_model
    if kind in ("first", "last") and m is not None:
        return f"{MODEL_LABELS.get(m, m)} {kind.capitalize()}"
    merged = list(r.plan.models)  # a list, as the resolved order is
    if order == merged:  # the base order (the SFT experiments' own): its last model last
        return f"{MODEL_LABELS.get(merged[-1], merged[-1])} Last"
    return " > ".join(order)


def table6(results: list[JobRecord], paper: dict) -> Table | None:
    def describe(r: JobRecord) -> Row | None:
        if not _obim_sft(r, "order"):
            return None
        label, order = _order_label(r), str(r.plan.merge_config.order)
        return (
            (label, order),
            label if order == "rotation" else f"{label} ({order})",
            _paper_row(paper, "table6", label),
        )

    t = _axis_table("table6", "Table 6: iteration order", "order", results, paper, describe)
    return t if len(t.rows) > 1 else None


def table11(results: list[JobRecord], paper: dict) -> Table | None:
    seen = by_count(results)
    if len({n for n, _ in seen}) < 2:
        return None
    prow = paper["table11"]["rows"]

    def describe(r: JobRecord) -> Row | None:
        if not count_job(r):
            return None
        key = (r.plan.n_models + 1, r.plan.method)
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


def grid_table(results: list[JobRecord]) -> Table | None:
    """Retention and parameter grids: jobs that vary only retentions or the method's parameters, a row per
    (method, setting), latest result each; the paper reports no such table."""
    seen: dict[tuple[str, str], list[JobRecord]] = {}
    for r in results:
        grid = [o.lstrip("+~") for o in r.plan.overrides if axis_of(o) in ("retention", "method")]
        if grid and varies_only(r, {"retention", "method"}):
            setting = " ".join(sorted(next((o[len(p) :] for p in GRID_PREFIXES if o.startswith(p)), o) for o in grid))
            seen.setdefault((r.plan.method, setting), []).append(r)
    if not seen:
        return None
    order = list(METHODS)

    def key(k: tuple[str, str]) -> tuple:  # the methods in the registry's order, then numeric settings by value
        v = k[1].partition("=")[2]
        num = v.replace(".", "", 1).isdigit()
        return (order.index(k[0]) if k[0] in order else len(order), k[0], not num, float(v) if num else 0.0, k[1])

    last = list(seen.values())[-1][-1].plan
    named = list(dict.fromkeys(last.benchmarks.values()))
    setting_table = {"sft": "table1", "pt": "table2"}.get(last.setting or "", "")
    main = (paper_tables().get(setting_table) or {}).get("columns")
    cols = main if main and set(named) <= set(main) else [*named, "avg"]  # the paper's column order
    t = Table("grid", "Retention and parameter grid", cols, lead="method, setting")
    for m, setting in sorted(seen, key=key):
        _add(t, f"{method_label(m)}, {setting}", _by_draw(seen[(m, setting)]), None)
    return t


def build_tables(results: list[JobRecord]) -> list[Table]:
    """Every table the results fill, in the paper's order."""
    paper = paper_tables()
    found = [
        _main_table("table1", "Table 1: merging the SFT experts", results, "sft", TABLE1_METHODS, paper, True),
        _main_table(
            "table3", "Table 3: ablation (intra-model x inter-model)", results, "sft", TABLE3_METHODS, paper, False
        ),
        _plus_table(results, paper),
        table4(results, paper),
        table5(results, paper),
        table6(results, paper),
        _main_table(
            "table2", "Table 2: merging post-pretrained checkpoints", results, "pt", TABLE1_METHODS, paper, True
        ),
        table11(results, paper),
        grid_table(results),
    ]
    tables = [t for t in found if t is not None]
    for t in tables:
        mark_top(t)
    return tables
