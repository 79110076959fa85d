"""Paired comparisons of two evaluations on the same items, from lm-eval's per-sample records that each job keeps
(samples/<model>/<task>.jsonl, obim.bench.evaluation.write_samples).

A benchmark's score is rebuilt from its items (the mean of the primary metric's per-item values; for a group, the
mean of its subtasks' means or the mean over all their items, whichever lm-eval's score was) and checked against
the score the job recorded: a benchmark whose score the items do not reproduce (a corpus-level metric, a judged
one) is not compared rather than compared wrongly. The test is a paired bootstrap: the items are resampled with
replacement (within each subtask), the same draw for both evaluations, `RESAMPLES` times from a fixed seed, and the
difference is reported with its 95% percentile interval; two evaluations are distinguishable when the interval
excludes 0. An average over benchmarks resamples each benchmark's items independently (they are disjoint)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from obim.merging.errors import ObimError

RESAMPLES = 10_000
SEED = 0
LEVEL = 0.95
_CHUNK = 500  # resamples drawn at once (memory: chunk x items indices)
_TOLERANCE = 1e-6  # percent points between the recorded score and the one rebuilt from its items


@dataclass(frozen=True)
class Items:
    """One benchmark's per-item values of one evaluated model: leaf task -> (doc_id, doc_hash) -> value (0-1),
    and how the leaves make the score ("items": the mean over all items; "leaves": the mean of the leaves' means;
    "either": both gave the recorded score, the other side of a comparison decides)."""

    leaves: dict[str, dict[tuple[Any, str], float]]
    weighting: str

    def score(self) -> float:
        return 100.0 * _combine(
            {k: np.array(list(v.values()), dtype=np.float64) for k, v in self.leaves.items()}, self.weighting
        )

    @property
    def n(self) -> int:
        return sum(len(v) for v in self.leaves.values())


def _combine(values: dict[str, np.ndarray], weighting: str) -> float:
    if weighting in ("items", "either"):
        return float(np.concatenate(list(values.values())).mean())
    return float(np.mean([v.mean() for v in values.values()]))


def _value(rec: dict, metric: str) -> float:
    v = rec[metric]
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)) and np.isfinite(v):
        return float(v)
    raise ValueError(f"{metric}={v!r}")


def read_items(entries: dict[str, dict[str, Any]], base: Path, score: float | None) -> Items | None:
    """A benchmark's items from its samples index entry ({leaf: {file, metric}}; files relative to `base`), or None
    when they cannot stand for `score`: no per-sample metric (judged), files gone, or a score they do not rebuild."""
    if score is None or not entries:
        return None
    leaves: dict[str, dict[tuple[Any, str], float]] = {}
    for leaf, e in entries.items():
        if not e.get("metric"):
            return None
        metric, _, filt = e["metric"].partition(",")
        path = base / e["file"]
        if not path.is_file():
            return None
        vals: dict[tuple[Any, str], float] = {}
        try:
            for line in path.read_text().splitlines():
                rec = json.loads(line)
                if filt and rec.get("filter", "none") != filt:
                    continue
                vals[(rec["doc_id"], rec.get("doc_hash", ""))] = _value(rec, metric)
        except (ValueError, KeyError):  # a metric without a per-item value (corpus-level), or a damaged file
            return None
        if not vals:
            return None
        leaves[leaf] = vals
    fits = [
        w
        for w in (("items", "leaves") if len(leaves) > 1 else ("items",))
        if abs(Items(leaves, w).score() - score) <= _TOLERANCE * max(1.0, abs(score))
    ]
    if not fits:
        return None
    # both fit (0%, 100%, or equal subtask means): either, decided by the other side of a comparison
    return Items(leaves, fits[0] if len(fits) == 1 else "either")


def record_items(record, model: str, task: str) -> Items | None:
    """The items of `task` for one model of a job (obim.bench.report.results.JobRecord): "merged", or an individual's
    name."""
    entries = (record.samples.get(model) or {}).get(task) or {}
    score = record.scores.get(task) if model == "merged" else record.individual[model].scores.get(task)
    return read_items(entries, record.path.parent, score)


@dataclass(frozen=True)
class Difference:
    """a - b in percent points, with its bootstrap interval, over `n` shared items."""

    diff: float
    lo: float
    hi: float
    n: int

    @property
    def distinguishable(self) -> bool:
        return self.lo > 0 or self.hi < 0


def _aligned(a: Items, b: Items) -> dict[str, np.ndarray]:
    """Per leaf, a's values minus b's on the same items; an ObimError when the two were not on the same items."""
    if set(a.leaves) != set(b.leaves) or {a.weighting, b.weighting} - {"either"} not in ({"items"}, {"leaves"}, set()):
        raise ObimError(f"different tasks: {sorted(a.leaves)} vs {sorted(b.leaves)}")
    out = {}
    for leaf in sorted(a.leaves):
        ka, kb = a.leaves[leaf], b.leaves[leaf]
        if ka.keys() != kb.keys():
            raise ObimError(f"{leaf}: evaluated on different items ({len(ka)} vs {len(kb)}, not the same documents)")
        keys = sorted(ka, key=lambda k: (str(k[0]), k[1]))
        out[leaf] = np.array([ka[k] - kb[k] for k in keys], dtype=np.float64)
    return out


def _weighting(a: Items, b: Items) -> str:
    return next((w for w in (a.weighting, b.weighting) if w != "either"), "items")


def paired_difference(
    a: list[Items], b: list[Items], resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL
) -> Difference:
    """The difference of a's and b's score (one benchmark each) or average score (several, the same in both), in
    percent points, with a paired bootstrap's `level` percentile interval."""
    if len(a) != len(b) or not a:
        raise ObimError("compare the same benchmarks on both sides")
    cols = [(_aligned(x, y), _weighting(x, y)) for x, y in zip(a, b, strict=True)]
    point = float(np.mean([_combine(d, w) for d, w in cols]))
    rng = np.random.default_rng(seed)
    boot = np.zeros(resamples, dtype=np.float64)
    for start in range(0, resamples, _CHUNK):
        m = min(_CHUNK, resamples - start)
        total = np.zeros(m)
        for d, weighting in cols:
            means, sizes = [], []
            for v in d.values():  # one leaf's items, resampled with replacement
                idx = rng.integers(0, len(v), size=(m, len(v)))
                means.append(v[idx].mean(axis=1))
                sizes.append(len(v))
            if weighting in ("items", "either"):
                total += np.average(np.stack(means), axis=0, weights=np.array(sizes, dtype=np.float64))
            else:
                total += np.mean(np.stack(means), axis=0)
        boot[start : start + m] = total / len(cols)
    tail = (1.0 - level) / 2
    lo, hi = np.quantile(boot, [tail, 1.0 - tail])
    n = sum(len(v) for d, _ in cols for v in d.values())
    return Difference(100.0 * point, 100.0 * float(lo), 100.0 * float(hi), n)


def legend(resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL) -> str:
    return (
        f"a paired bootstrap over the items both evaluated ({resamples:,} resamples, seed {seed}) whose "
        f"{level:.0%} interval of the difference contains 0; no correction for multiple comparisons"
    )


def mark_top(table) -> None:
    """In each column of `table` (obim.bench.report.results.Table), the best row among those with items and every
    row not distinguishable from it: table.top[column] (the average column: over every benchmark's items), and
    table.tested[column] the rows compared."""
    for col in table.columns:
        rows = [(label, ours.get(col)) for label, ours, _ in table.rows if label in table.items]
        cand = []
        for label, value in rows:
            got = _column_items(table.items[label], table.columns, col)
            if value is not None and got is not None:
                cand.append((label, value, got))
        if len(cand) < 2:
            continue
        best_label, _, best = max(cand, key=lambda c: c[1])
        top, tested = {best_label}, {best_label}
        for label, _, got in cand:
            if label == best_label:
                continue
            try:
                d = paired_difference(best, got)
            except ObimError:  # not the same items: left unmarked
                continue
            tested.add(label)
            if not d.distinguishable:
                top.add(label)
        if len(tested) > 1:
            table.top[col], table.tested[col] = top, tested


def _column_items(row: dict[str, Items | None], columns: list[str], col: str) -> list[Items] | None:
    if col != "avg":
        it = row.get(col)
        return None if it is None else [it]
    parts = [row.get(c) for c in columns if c != "avg"]
    return None if any(p is None for p in parts) else [p for p in parts if p is not None]
