"""The search's tuned Table 1 on hand-made study records: one draw as the search writes it, several draws as one row
per method (means, the mean of the standard errors, the sd across draws, each draw's parameters), bold marks from
the best trials' items."""

from __future__ import annotations

import statistics

import pytest
from test_tables import result, rows

from obim.bench.report.search_report import tuned_table

COLS = ["alpaca_eval", "mmlu", "gsm8k", "math", "humaneval", "mbpp"]
OPTS = {"seed": 0, "trials": 4, "startup_trials": 2}


def record(tmp_path, method: str, draw: int, right: int, n: int = 40) -> dict:
    """A study's best.json: its best trial's test scores (`right` of n items on every benchmark) and result.json."""
    job = f"{method}-{draw}"
    score = 100 * right / n
    its = [[1] * right + [0] * (n - right)] * 6
    result(tmp_path / "search", job, method, [score] * 6, items=its, stderr=[2.0 + draw] * 6)
    return {
        "method": method,
        "experiment": "toy_sft",
        "trials": 4,
        "params": {"lambda": 0.5 + draw / 10},
        "dev_avg": 50.0 + draw,
        "test_scores": dict.fromkeys(COLS, score),
        "test_avg": score,
        "test_stderr": dict.fromkeys(COLS, 2.0 + draw),
        "test_avg_stderr": (2.0 + draw) / 6**0.5,
        "result": str(tmp_path / "search" / job / "result.json"),
        "zoo_seed": draw,
    }


def test_one_draw(tmp_path):
    records = [record(tmp_path, "ta", 0, 10), record(tmp_path, "obim", 0, 30)]
    md, csv_text = tuned_table(records, tmp_path, COLS, ["alpaca_eval"], OPTS)
    t = rows(md)
    assert t["TA"][:3] == ["lambda=0.5", "50.00", "25.00 ± 2.00"] and t["OBIM"][2] == "**75.00 ± 2.00**"
    head = csv_text.splitlines()[0].split(",")
    assert "avg_sd" not in head and "draws" not in head and head[-1] == "avg_top"


def test_draws_make_one_row_per_method(tmp_path):
    ta = {0: 10, 1: 14, 2: 12}
    records = [record(tmp_path, "ta", d, k) for d, k in ta.items()] + [
        record(tmp_path, "obim", d, k) for d, k in {0: 30, 1: 26, 2: 34}.items()
    ]
    md, csv_text = tuned_table(records, tmp_path, COLS, [], OPTS)
    t = rows(md)
    mean = 100 * statistics.mean(ta.values()) / 40
    sd = statistics.stdev(100 * k / 40 for k in ta.values())
    assert t["TA"][:2] == ["per draw (below)", "51.00"]
    assert t["TA"][2] == f"{mean:.2f} ± 3.00 [sd {sd:.2f}]"  # the mean of the draws' errors (2, 3, 4)
    assert t["OBIM"][2].startswith("**") and not t["TA"][2].startswith("**") and t["TA"][-1] == "4 4 4"
    assert "- TA best parameters: draw 0: lambda=0.5; draw 1: lambda=0.6; draw 2: lambda=0.7" in md
    assert "the mean over the zoo draws 0, 1, 2" in md
    head, *lines = csv_text.splitlines()
    cells = dict(zip(head.split(","), lines[0].split(","), strict=True))
    assert cells["draws"] == "0 1 2" and float(cells["alpaca_eval_sd"]) == pytest.approx(sd, abs=1e-4)


def test_tuned_over_draws_reads_each_searchs_records(tmp_path):
    import json

    from obim.bench.report.search_report import tuned_over_draws

    dirs = []
    for d, (ta, obim) in enumerate([(10, 30), (14, 26)]):
        recs = [record(tmp_path, "ta", d, ta), record(tmp_path, "obim", d, obim)]
        for r in recs:
            r |= {"dev_scores": {"mmlu": 1.0, "gsm8k": 1.0}, "sampler_seed": 0, "budget": 4, "startup_trials": 2}
        (tmp_path / f"s{d}").mkdir()
        (tmp_path / f"s{d}" / "search.json").write_text(json.dumps({"records": recs}))
        dirs.append(tmp_path / f"s{d}")
    out = tmp_path / "results"
    out.mkdir()
    (out / "table1.csv").write_text("model,avg\nTA,20.0\nOBIM,60.0\n")
    written = tuned_over_draws(dirs, out)
    assert written == [out / "table1_tuned.md", out / "table1_tuned.csv"]
    md = written[0].read_text()
    t = rows(md)
    assert t["TA"][-2:] == ["20.00", "4 4"] and t["OBIM"][1] == "50.50"  # untuned avg; dev avg over draws 0, 1
    assert "Left out of the objective (no dev data, as in the real setting): alpaca_eval, math, humaneval, mbpp" in md
    assert "4 trials, the first 2 random" in md


def test_tuned_over_draws_reads_the_untuned_column_from_the_table_named(tmp_path):
    """The reference reads the untuned averages of the same draws (table1_plus.csv), not Table 1's."""
    import json

    from obim.bench.report.search_report import tuned_over_draws

    recs = [record(tmp_path, "ta", 0, 10), record(tmp_path, "tsv", 0, 30)]
    for r in recs:
        r |= {"dev_scores": {"mmlu": 1.0}, "sampler_seed": 0, "budget": 4, "startup_trials": 2}
    (tmp_path / "s0").mkdir()
    (tmp_path / "s0" / "search.json").write_text(json.dumps({"records": recs}))
    out = tmp_path / "results"
    out.mkdir()
    (out / "table1.csv").write_text("model,avg\nTA,20.0\n")
    (out / "table1_plus.csv").write_text("model,avg\nTA,21.5\nTSV-M,44.0\n")
    md = tuned_over_draws([tmp_path / "s0"], out, ("table1_plus.csv",))[0].read_text()
    t = rows(md)
    assert t["TA"][-2] == "21.50" and t["TSV-M"][-2] == "44.00"
    assert "default parameters (table1_plus.md)" in md
    assert "default parameters (table1.md / table3.md)" in tuned_over_draws([tmp_path / "s0"], out)[0].read_text()
