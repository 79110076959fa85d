"""A plot beside each axis table (obim/bench/report/plots.py), from job results: written as PNG, drawing exactly the
table's numbers (ours and the paper's), the same bytes from the same table, redrawn from the CSV alone, logged to an
active W&B run."""

from __future__ import annotations

import csv
import math
import sys
import types
from pathlib import Path

import pytest
from test_tables import result

from obim.bench.report.plots import axis_figure, plot_data, replot
from obim.bench.report.results import load_results
from obim.bench.report.tables import build_tables
from obim.bench.report.write import write_tables

AXIS_TABLES = {"table4", "table5", "table6", "grid"}


def sweep_results(runs: Path) -> None:
    """Tables 4, 5, 6 and 11 and a retention/density grid, every score distinct (the validation-source jobs with
    standard errors)."""
    s = iter(range(1, 1000))
    sc = lambda: [float(next(s)) for _ in range(6)]  # noqa: E731  (a one-line local helper)
    for k, src in enumerate(("math", "code", "math_code")):
        se = [0.5 + k, 1.0, 1.5, 2.0, 2.5, 3.0]
        result(runs, f"src-{src}", "obim", sc(), overrides=[f"validation={src}"], stderr=se)
    for size in (10, 50, 200):
        result(runs, f"size-{size}", "obim", sc(), overrides=["validation=math", f"validation.size={size}"])
    result(runs, "rotation", "obim", sc(), overrides=["order=rotation"])
    result(runs, "math-first", "obim", sc(), overrides=["order=first", "order.model=math"])
    for m in ("obim", "ties_im"):
        for r in (0.1, 0.2, 0.3):  # every model: at most 1/3 each for IM
            result(runs, f"{m}-r{r}", m, sc(), overrides=[f"retention={r}"])
    for n in (1, 2, 3):
        for m in ("obim", "dare"):
            result(runs, f"{m}-n{n}", m, [float(next(s)) for _ in range(3)], setting="pt", overrides=[f"n_models={n}"])


def plotted(fig) -> list[dict]:
    """What each panel of a figure draws: {title, x labels or values, {series: [y]}}."""
    from matplotlib.container import BarContainer, ErrorbarContainer

    out = []
    for ax in fig.axes:
        drawn = [c for c in ax.containers if isinstance(c, ErrorbarContainer) and c.get_label() != "_nolegend_"]
        # (a bar's error bars are a container of their own, unlabelled)
        series = {c.get_label(): list(c.lines[0].get_ydata()) for c in drawn}
        bars = [c for c in ax.containers if isinstance(c, BarContainer)]
        series.update({c.get_label(): [p.get_height() for p in c] for c in bars})
        xs = [list(c.lines[0].get_xdata()) for c in drawn]
        out.append(
            {
                "title": ax.get_title(),
                "series": series,
                "x": xs[0] if xs else [t.get_text() for t in ax.get_xticklabels()],
            }
        )
    return out


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        (x is None and math.isnan(y)) or (x is not None and y == pytest.approx(x)) for x, y in zip(a, b, strict=True)
    )


def test_a_plot_beside_each_axis_table_draws_the_tables_numbers(tmp_path):
    runs = tmp_path / "runs"
    sweep_results(runs)
    out = tmp_path / "out"
    written = {p.name for p in write_tables(runs, out)}
    tables = {t.name: t for t in build_tables(load_results(runs))}
    assert AXIS_TABLES | {"table11"} <= set(tables)
    for name in AXIS_TABLES:
        assert {f"{name}.md", f"{name}.csv", f"{name}.png"} <= written, name
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "figure3.png" in written  # Table 11's plot
    assert not {"table1.png", "table3.png", "table10.png"} & written  # plots only where an axis is swept

    for name in AXIS_TABLES:
        t = tables[name]
        with open(out / f"{name}.csv") as f:
            rows = list(csv.DictReader(f))
        panels = plotted(axis_figure(t))
        if name == "grid":
            # a panel per method, x the retention, a line per benchmark and avg
            assert [p["title"] for p in panels] == ["OBIM", "TIES+IM"]
            for p in panels:
                mine = [r for r in rows if r[t.lead].startswith(p["title"] + ",")]
                assert p["x"] == [float(r[t.lead].split("=")[1]) for r in mine] == [0.1, 0.2, 0.3]
                for c in t.columns:
                    assert same([float(r[c]) for r in mine], p["series"][c]), (name, c)
            continue
        ours, paper = panels[0], panels[1]
        assert ours["title"] == "ours" and paper["title"].startswith("paper")
        labels = [r[t.lead] for r in rows]
        if name == "table5":
            assert ours["x"] == [float(v) for v in labels]
        else:  # the row labels, on two lines and without the list's brackets and quotes
            assert [x.replace("\n(", " (") for x in ours["x"]] == [
                v.translate(str.maketrans("", "", "[]'")) for v in labels
            ]
        for c in t.columns:  # the CSV's numbers, ours and the paper's, are the plotted ones
            assert same([float(r[c]) for r in rows], ours["series"][c]), (name, c)
            assert same([float(r[f"paper_{c}"]) if r[f"paper_{c}"] else None for r in rows], paper["series"][c])
            # and ours carry their standard errors as error bars
            errors = plot_data(t)["panels"][0]["errors"][c]
            assert errors == [float(r[f"{c}_se"]) if r[f"{c}_se"] else None for r in rows], (name, c)
    # the validation-source jobs carry errors (2.0 on math), the others none
    errors = plot_data(tables["table4"])["panels"][0]["errors"]["math"]
    assert {e for e in errors if e is not None} == {2.0} and None in errors

    # the same table gives the same bytes; the CSV alone redraws them
    again = tmp_path / "again"
    write_tables(runs, again)
    for name in AXIS_TABLES:
        assert (again / f"{name}.png").read_bytes() == (out / f"{name}.png").read_bytes()
        (again / f"{name}.png").unlink()
    assert {p.name for p in replot(again)} == {f"{n}.png" for n in AXIS_TABLES}
    for name in AXIS_TABLES:
        assert (again / f"{name}.png").read_bytes() == (out / f"{name}.png").read_bytes(), name


def test_tables_and_plots_go_to_the_active_wandb_run(tmp_path, monkeypatch):
    logged = []
    run = types.SimpleNamespace(log=logged.append)
    stub = types.SimpleNamespace(
        run=run, Table=lambda columns, data: ("table", columns, data), Image=lambda path: ("image", path)
    )
    runs = tmp_path / "runs"
    sweep_results(runs)
    monkeypatch.setitem(sys.modules, "wandb", stub)
    written = write_tables(runs, tmp_path / "out")
    (data,) = logged
    assert {k for k in data if k.startswith("figures/")} == {f"figures/{p.stem}" for p in written if p.suffix == ".png"}
    assert data["figures/table5"] == ("image", str(tmp_path / "out" / "table5.png"))
    kind, columns, rows = data["tables/table5"]
    se = ["gsm8k_se", "math_se", "avg_se"]
    assert columns == ["samples", "gsm8k", "math", "avg", *se, "paper_gsm8k", "paper_math", "paper_avg"]
    assert kind == "table" and [r[0] for r in rows] == ["10", "50", "100", "200"]
    stub.run = None  # no active run: nothing logged
    write_tables(runs, tmp_path / "out2")
    assert len(logged) == 1
