"""claims.md on hand-made results: each claim's difference, its interval across zoo draws (or, from one draw, over
the items) and its verdict, against hand computations."""

from __future__ import annotations

import math
import statistics

import pytest
from test_tables import result

from obim.bench.report.write import write_tables


def claim_rows(md: str) -> dict[str, list[str]]:
    out = {}
    for line in md.splitlines():
        if line.startswith("| table | claim") or line.startswith("|---") or not line.startswith("| "):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        out[cells[1]] = cells
    return out


AVGS = {  # each method's score on every benchmark, per zoo draw
    "ta": [30, 31, 29],
    "ties": [20, 20, 20],
    "ties_obm": [25, 15, 20],  # TIES+OBM - TIES: +5, -5, 0
    "ties_im": [10, 11, 12],  # TIES+IM - TIES: -10, -9, -8
    "obim": [40, 42, 44],
}


def test_claims_across_draws(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "tables"
    for method, per in AVGS.items():
        for seed, v in enumerate(per):
            result(runs, f"method={method},s={seed}", method, [float(v)] * 6, overrides=[f"experiment.zoo_seed={seed}"])
    write_tables(runs, out)
    md = (out / "claims.md").read_text() if (out / "claims.md").exists() else next(out.rglob("claims.md")).read_text()
    rows = claim_rows(md)

    def interval(diffs: list[float]) -> tuple[float, float, float]:
        m = statistics.mean(diffs)
        half = 4.302652729749464 * statistics.stdev(diffs) / math.sqrt(3)  # t(0.975, 2 df)
        return m, m - half, m + half

    best = rows["OBIM achieves the highest average (OBIM minus the best other method)"]
    m, lo, hi = interval([10, 11, 15])  # OBIM - TA, the best other method
    assert best[2] == "OBIM - TA" and best[5] == f"{m:+.2f}" and best[6] == f"[{lo:+.2f}, {hi:+.2f}]"
    assert best[4] == "+1.86" and best[7] == "3" and best[8] == "**agrees**"  # the paper: 45.23 - 43.37 (PCB)
    obm = rows["OBM beats magnitude selection: TIES+OBM over TIES"]
    assert obm[5] == "+0.00" and obm[8] == "**inconclusive**"
    im = rows["IM beats the disjoint mean: TIES+IM over TIES"]
    m, lo, hi = interval([-10, -9, -8])
    assert im[6] == f"[{lo:+.2f}, {hi:+.2f}]" and im[8] == "**disagrees**"
    assert rows["IM beats the disjoint mean: OBIM over TIES+OBM"][8] == "**agrees**"
    # the tables not run: said so, never judged
    for text, cells in rows.items():
        if cells[0] in ("table4", "table5", "table6"):
            assert cells[8] == "**not measured**" and cells[5] == "—", text
    assert "3 agrees, 1 disagrees, 1 inconclusive, 5 not measured" in md


def test_one_draw_uses_the_items_interval(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "tables"
    result(runs, "method=ta", "ta", [50.0] * 6, items=[[1] * 15 + [0] * 15] * 6)
    result(runs, "method=obim", "obim", [60.0] * 6, items=[[1] * 18 + [0] * 12] * 6)  # TA's 15 right, and 3 more
    result(runs, "method=ties", "ties", [50.0] * 6, items=[[0] * 15 + [1] * 15] * 6)  # TA's score, other items
    write_tables(runs, out)
    rows = claim_rows(next(out.rglob("claims.md")).read_text())
    best = rows["OBIM achieves the highest average (OBIM minus the best other method)"]
    assert best[5] == "+10.00" and best[7] == "1" and best[8] == "**agrees**"
    lo, hi = (float(x) for x in best[6].strip("[]").split(","))
    assert 0 < lo < 10 < hi < 20  # each benchmark's 3 extra items of 30 resampled: the average's interval
    assert "one draw: the items' bootstrap interval, not across draws" in next(out.rglob("claims.md")).read_text()


def test_pt_claims_name_table11_rows(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "tables"
    for n, (obim, dare) in {1: (70.0, 69.0), 2: (60.0, 50.0)}.items():  # 2 and 3 models, the base counted
        for seed in (0, 1):
            ov = [f"n_models={n}", f"experiment.zoo_seed={seed}"]
            result(runs, f"obim,n={n},s={seed}", "obim", [obim + seed] * 3, setting="pt", overrides=ov)
            result(runs, f"dare,n={n},s={seed}", "dare", [dare + 11 * seed] * 3, setting="pt", overrides=ov)
    write_tables(runs, out)
    rows = claim_rows(next(out.rglob("claims.md")).read_text())
    decline = rows["performance declines as more models are merged: OBIM with 2 models over OBIM with the most"]
    assert decline[2] == "2, OBIM - 3, OBIM" and decline[5] == "+10.00" and decline[6] == "[+10.00, +10.00]"
    assert decline[8] == "**agrees**"
    above = rows["OBIM stays above DARE when the most models are merged"]
    assert above[2] == "3, OBIM - 3, DARE" and above[5] == "+5.00"  # per draw +10, 0
    half = 12.706204736174707 * statistics.stdev([10, 0]) / math.sqrt(2)  # t(0.975, 1 df)
    assert above[6] == f"[{5 - half:+.2f}, {5 + half:+.2f}]" and above[8] == "**inconclusive**"


@pytest.mark.parametrize("setting", ["sft", "pt"])
def test_no_claims_without_their_tables(tmp_path, setting):
    from obim.bench.report.claims import build_claims
    from obim.bench.report.results import Table, paper_tables

    assert build_claims([Table("grid", "grid", ["avg"])], setting, paper_tables()) is None


def test_reference_records_draws_and_spread_and_a_sweep_is_held_against_it(tmp_path, monkeypatch):
    import json

    from obim.bench.report import reference
    from obim.bench.report.results import load_results
    from obim.bench.report.tables import build_tables

    monkeypatch.setattr(reference, "REFERENCE", tmp_path / "reference.json")
    runs, out = tmp_path / "runs", tmp_path / "results"
    for method, per in (("ta", [30, 31, 29]), ("obim", [40, 42, 44])):
        for seed, v in enumerate(per):
            job = f"method={method},s={seed}"
            result(runs, job, method, [float(v)] * 6, overrides=[f"experiment.zoo_seed={seed}"])
            p = runs / job / "result.json"
            r = json.loads(p.read_text())
            r["zoo"] = {"seed": seed, "recipe_hash": "r4", "fingerprint": f"{seed}" * 64, "cpu_kernels": {}}
            p.write_text(json.dumps(r))
    written = write_tables(runs, out, reference=True)
    assert tmp_path / "reference.json" in written
    ref = json.loads((tmp_path / "reference.json").read_text())["toy_sft"]
    assert ref["draws"] == {str(k): {"recipe_hash": "r4", "fingerprint": f"{k}" * 64} for k in range(3)}
    obim = ref["tables"]["table1"]["OBIM"]["avg"]
    assert obim == {"mean": 42.0, "sd": 2.0, "draws": 3}
    md = next(out.rglob("table1.md")).read_text()
    assert "toy zoo draws (weights fingerprint): seed 0: 0000000000000000; seed 1: 1111111111111111" in md

    # a user's sweep: draw 0 with the reference's weights, draw 1 with others; OBIM inside the spread, TA outside
    user = tmp_path / "user"
    for method, v, seed, fp in (("ta", 40.0, 0, "0"), ("obim", 43.0, 0, "0"), ("obim", 43.0, 1, "9")):
        job = f"method={method},s={seed}"
        result(user, job, method, [v] * 6, overrides=[f"experiment.zoo_seed={seed}"])
        p = user / job / "result.json"
        r = json.loads(p.read_text())
        r["zoo"] = {"seed": seed, "recipe_hash": "r4", "fingerprint": fp * 64, "cpu_kernels": {}}
        p.write_text(json.dumps(r))
    results = load_results(user)
    lines = reference.against_reference("toy_sft", build_tables(results), results, reference.load_reference())
    assert lines[0] == "zoo draw 0: 0000000000000000, the reference's own weights"
    assert lines[1].startswith("zoo draw 1: 9999999999999999, not the reference's 1111111111111111 (other CPU kernels")
    assert lines[2] == (
        "table1 averages: 1 of 2 inside the reference's mean ± 2 sd across its draws; outside: TA 40.0 (reference "
        "30.0 ± 1.0)"
    )
    assert reference.against_reference("toy_pt", [], results, reference.load_reference()) == [
        "reference: none recorded for toy_pt; these numbers are this zoo's own draw"
    ]
