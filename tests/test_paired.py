"""Paired comparisons from per-sample records (obim.bench.report.paired): known answers on constructed items, the
score check that keeps a wrongly read benchmark out, and the table marks they make."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from obim.bench.report.paired import Items, mark_top, paired_difference, read_items
from obim.bench.report.results import Table
from obim.merging.errors import ObimError


def items(values, leaf: str = "t", weighting: str = "items") -> Items:
    return Items({leaf: {(i, f"h{i}"): float(v) for i, v in enumerate(values)}}, weighting)


def write(tmp_path: Path, name: str, values, metric: str = "acc", filt: str = "none") -> dict:
    recs = [
        {"doc_id": i, "doc_hash": f"h{i}", "filter": filt, "metrics": [metric], metric: v} for i, v in enumerate(values)
    ]
    (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return {"file": f"{name}.jsonl", "metric": f"{metric},{filt}"}


def test_identical_evaluations_are_indistinguishable_and_a_sweep_is_not():
    rng = np.random.default_rng(5)
    a = items(rng.integers(0, 2, 200))
    same = paired_difference([a], [a])
    assert (same.diff, same.lo, same.hi, same.n) == (0.0, 0.0, 0.0, 200) and not same.distinguishable
    win, lose = items([1] * 50), items([0] * 50)  # one wins on every item
    d = paired_difference([win], [lose])
    assert (d.diff, d.lo, d.hi) == (100.0, 100.0, 100.0) and d.distinguishable
    back = paired_difference([lose], [win])
    assert back.diff == -100.0 and back.distinguishable


def test_the_interval_matches_the_normal_approximation_on_many_items():
    # 2000 paired items whose differences are +1 (30%), -1 (20%), 0: mean 10 points, sd of the mean known
    rng = np.random.default_rng(1)
    u = rng.random(2000)
    a = (u < 0.3).astype(float)
    b = ((u >= 0.3) & (u < 0.5)).astype(float)
    d = a - b
    se = 100 * d.std(ddof=1) / math.sqrt(len(d))
    got = paired_difference([items(a)], [items(b)])
    assert got.diff == pytest.approx(100 * d.mean())
    assert got.lo == pytest.approx(got.diff - 1.96 * se, abs=0.3) and got.hi == pytest.approx(
        got.diff + 1.96 * se, abs=0.3
    )
    # seeded: the same interval every time; another seed moves it a little
    assert paired_difference([items(a)], [items(b)]) == got
    assert paired_difference([items(a)], [items(b)], seed=1) != got


def test_the_average_pools_benchmarks_and_needs_the_same_items():
    a1, b1 = items([1, 1, 0, 0]), items([0, 1, 0, 0])  # +25 points
    a2, b2 = items([0, 0, 0, 0]), items([0, 0, 0, 1])  # -25 points
    avg = paired_difference([a1, a2], [b1, b2])
    assert avg.diff == pytest.approx(0.0) and avg.n == 8
    other = Items({"t": {(i + 10, f"h{i}"): 1.0 for i in range(4)}}, "items")  # other documents
    with pytest.raises(ObimError, match="different items"):
        paired_difference([a1], [other])
    with pytest.raises(ObimError, match="same benchmarks"):
        paired_difference([a1, a2], [b1])


def test_read_items_rebuilds_the_recorded_score_or_refuses(tmp_path):
    e = write(tmp_path, "t", [1, 0, 1, 1])
    got = read_items({"t": e}, tmp_path, 75.0)
    assert got is not None and got.score() == 75.0 and got.n == 4
    assert read_items({"t": e}, tmp_path, 50.0) is None  # the items do not make that score: not compared
    assert read_items({"t": {**e, "metric": None}}, tmp_path, 75.0) is None  # judged
    assert read_items({"t": {**e, "file": "gone.jsonl"}}, tmp_path, 75.0) is None
    # the primary metric's filter only: lm-eval logs one record per item and filter
    strict = write(tmp_path, "s", [0, 0, 0, 1], metric="exact_match", filt="strict-match")
    flex = write(tmp_path, "f", [1, 1, 1, 1], metric="exact_match", filt="flexible-extract")
    both = tmp_path / "both.jsonl"
    both.write_text((tmp_path / "s.jsonl").read_text() + (tmp_path / "f.jsonl").read_text())
    entry = {"t": {"file": "both.jsonl", "metric": strict["metric"]}}
    assert read_items(entry, tmp_path, 25.0).score() == 25.0
    assert read_items({"t": {"file": "both.jsonl", "metric": flex["metric"]}}, tmp_path, 100.0).score() == 100.0


def test_a_group_is_weighted_as_its_score_was(tmp_path):
    small, big = write(tmp_path, "a", [1, 1]), write(tmp_path, "b", [0, 0, 0, 0, 0, 0])
    leaves = {"a": small, "b": big}
    by_leaf = read_items(leaves, tmp_path, 50.0)  # the mean of the subtasks' means
    by_item = read_items(leaves, tmp_path, 25.0)  # the mean over all 8 items
    assert by_leaf.weighting == "leaves" and by_item.weighting == "items"
    assert read_items(leaves, tmp_path, 40.0) is None


def test_marks_the_best_and_those_not_distinguishable_from_it():
    t = Table("table1", "T", ["x", "y", "avg"])
    rows = {
        "A": ([1] * 40 + [0] * 10, [1] * 25),  # x 80
        "B": ([1] * 39 + [0] * 11, [1] * 25),  # x 78: one item from A
        "C": ([1] * 10 + [0] * 40, [1] * 25),  # x 20
    }
    for label, (x, y) in rows.items():
        its = {"x": items(x), "y": items(y)}
        t.add(label, {"x": its["x"].score(), "y": 100.0, "avg": (its["x"].score() + 100) / 2}, None, None, its)
    t.add("expert", {"x": 100.0, "y": 100.0, "avg": 100.0}, None)  # no items: neither compared nor marked
    mark_top(t)
    assert t.top["x"] == {"A", "B"} and t.tested["x"] == {"A", "B", "C"}
    assert t.top["y"] == {"A", "B", "C"}  # all equal on every item
    assert t.top["avg"] == {"A", "B"}
    md = t.markdown()
    assert "| A | **80.00** | **100.00** | **90.00** |" in md and "| C | 20.00 | **100.00** | 60.00 |" in md
    assert "| expert | 100.00 | 100.00 | 100.00 |" in md and "paired bootstrap" in md
    head, *lines = t.csv().splitlines()
    assert head.split(",")[7:10] == ["x_top", "y_top", "avg_top"]
    assert [ln.split(",")[7:10] for ln in lines] == [["1", "1", "1"], ["1", "1", "1"], ["0", "1", "0"], ["", "", ""]]


def test_a_score_both_weightings_give_follows_the_other_side(tmp_path):
    # leaves of 2 and 6 items all right: 100 by either weighting; the other model's 50 only by the leaves' means
    full = read_items({"a": write(tmp_path, "a1", [1, 1]), "b": write(tmp_path, "b1", [1] * 6)}, tmp_path, 100.0)
    half = read_items({"a": write(tmp_path, "a2", [1, 1]), "b": write(tmp_path, "b2", [0] * 6)}, tmp_path, 50.0)
    assert full.weighting == "either" and half.weighting == "leaves"
    d = paired_difference([full], [half])
    assert d.diff == pytest.approx(50.0) and d.distinguishable  # the mean of the leaves' differences: (0 + 100) / 2


def test_keep_samples_trims_records_and_skips_lost_files(tmp_path):
    from obim.bench.stages import keep_samples

    src = tmp_path / "cache" / "t.jsonl"
    src.parent.mkdir()
    rec = {"doc_id": 0, "doc": {"q": "x" * 1000}, "arguments": ["p" * 1000], "resps": [["r"]], "filter": "none"}
    rec |= {"doc_hash": "d", "prompt_hash": "p", "target_hash": "t", "target": "4", "filtered_resps": ["4"]}
    rec |= {"metrics": ["acc"], "acc": 1.0}
    src.write_text(json.dumps(rec) + "\n")
    result = {"samples": {"merged": {"t": {"t": {"file": str(src), "metric": "acc,none"}}}}}
    result["samples"]["base"] = {"t": {"t": {"file": str(tmp_path / "gone.jsonl"), "metric": "acc,none"}}}
    keep_samples(result, tmp_path / "job")
    assert result["samples"]["merged"]["t"]["t"]["file"] == "samples/merged/t.jsonl"
    kept = json.loads((tmp_path / "job" / "samples" / "merged" / "t.jsonl").read_text())
    assert kept == {k: v for k, v in rec.items() if k not in ("doc", "arguments", "resps")}
    assert result["samples"]["base"] == {"t": {}}  # its cache file is gone: left out, not a crash
    assert read_items({"t": {"file": "samples/merged/t.jsonl", "metric": "acc,none"}}, tmp_path / "job", 100.0)


def test_compare_takes_the_other_sides_job_and_draw(tmp_path):
    from test_tables import result

    from obim.bench.report.compare import main

    runs = tmp_path / "runs"
    for seed in (0, 1):
        for method, right in (("ta", 10), ("obim", 30)):
            ind = {"math": [100.0 * 5 / 40] * 6} if method == "obim" else None
            items = [[1] * right + [0] * (40 - right)] * 6
            ov = [f"experiment.zoo_seed={seed}"]
            result(
                runs, f"{method},{seed}", method, [100.0 * right / 40] * 6, overrides=ov, items=items, individual=ind
            )
    out = main(runs, "obim@obim,1", "ta")
    lines = out.splitlines()
    assert lines[0] == "A = OBIM (obim,1, zoo draw 1)" and lines[1] == "B = TA (ta,1, zoo draw 1)"
    assert "+50.00" in out  # every benchmark: 30 right against 10 of 40
    with pytest.raises(ObimError, match="not a job, a method"):
        main(runs, "obim", "nothing")
