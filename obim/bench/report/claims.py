"""The paper's qualitative claims, judged on our results (claims.md beside the tables).

Each claim is a difference the paper states a sign for, between two rows of one of its tables (OBIM's average minus
the best other method's; TIES+IM's minus TIES's; Math First's minus Math Last's...). Ours is the mean over the zoo
draws of the per-draw difference, with a 95% t interval across the draws (two draws or more: the draw-to-draw
spread on these test items; every draw is scored on the same items, so the item sampling is not in it); from one
draw, the paired bootstrap interval over the items (obim.bench.report.paired), which says nothing about other draws
and is labelled so. The verdict: `agrees` when the
interval lies on the paper's side of 0, `disagrees` when it lies on the other side, `inconclusive` when it holds 0.
Nothing is tuned toward agreement: the claims are fixed here, in the paper's words, whatever comes out."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass

from obim.merging.errors import ObimError

from .paired import paired_difference
from .results import Table

LEVEL = 0.95


@dataclass(frozen=True)
class Claim:
    table: str  # the table's name (table1, ...)
    text: str  # the paper's claim
    # the two rows compared (a - b, the paper says > 0), found in the table by these functions of its labels
    a: Callable[[Table], str | None]
    b: Callable[[Table], str | None]
    column: str = "avg"
    paper: float | None = None  # the paper's own difference, from its table


@dataclass(frozen=True)
class Judged:
    claim: Claim
    a: str | None
    b: str | None
    diff: float | None
    lo: float | None
    hi: float | None
    draws: int
    how: str  # "across draws" / "items of one draw" / why not judged
    verdict: str  # agrees / disagrees / inconclusive / not measured


def _label(name: str) -> Callable[[Table], str | None]:
    return lambda t: name if any(r[0] == name for r in t.rows) else None


def _prefix(prefix: str) -> Callable[[Table], str | None]:
    """The row whose label starts with `prefix` (Table 4's 'Math (100)', Table 6's 'Math First (...)')."""

    def find(t: Table) -> str | None:
        hit = [r[0] for r in t.rows if r[0] == prefix or r[0].startswith(prefix + " (")]
        return hit[-1] if hit else None

    return find


def _sized(source: str, other: str) -> Callable[[Table], str | None]:
    """Table 4's row of `source` at a validation size `other` has too ('Math (100)' beside 'Code (100)'): the
    paper's 100 where there, else the largest such size (Table 5's sizes of Math share the table's jobs)."""

    def sizes(t: Table, name: str) -> set[str]:
        return {r[0][len(name) + 2 : -1] for r in t.rows if r[0].startswith(name + " (") and r[0].endswith(")")}

    def find(t: Table) -> str | None:
        common = sizes(t, source) & sizes(t, other)
        if not common:
            return None
        size = "100" if "100" in common else max(common, key=lambda x: (x.isdigit(), int(x) if x.isdigit() else 0))
        return f"{source} ({size})"

    return find


def _best_other(method: str) -> Callable[[Table], str | None]:
    """The best row by average among the table's compared rows (the methods), `method` left out."""

    def find(t: Table) -> str | None:
        rows = [(r[0], r[1].get("avg")) for r in t.rows if r[0] in t.items and r[0] != method]
        rows = [(label, v) for label, v in rows if v is not None]
        return max(rows, key=lambda x: x[1])[0] if rows else None

    return find


def _count(n: int | None, method: str) -> Callable[[Table], str | None]:
    """Table 11's row of `method` at n models (None: the most models there are)."""

    def find(t: Table) -> str | None:
        counts = sorted({int(r[0].split(",")[0]) for r in t.rows if r[0].endswith(f", {method}")})
        if not counts:
            return None
        want = counts[-1] if n is None else n
        return f"{want}, {method}" if want in counts else None

    return find


def _paper_diff(paper: dict, table: str, a: str, b: str, column: str = "avg") -> float | None:
    spec = paper.get(table) or {}
    cols, rows = spec.get("columns") or [], spec.get("rows") or {}
    if column not in cols or a not in rows or b not in rows:
        return None
    i = cols.index(column)
    return round(rows[a][i] - rows[b][i], 2)


def sft_claims(paper: dict) -> list[Claim]:
    t1 = paper.get("table1", {}).get("rows", {})
    others = [k for k in ("TA", "TIES", "DARE", "DELLA", "TALL-Mask", "PCB", "Breadcrumbs") if k in t1]
    best = max(others, key=lambda k: t1[k][-1]) if others else None
    return [
        Claim(
            "table1",
            "OBIM achieves the highest average (OBIM minus the best other method)",
            _label("OBIM"),
            _best_other("OBIM"),
            paper=_paper_diff(paper, "table1", "OBIM", best) if best else None,
        ),
        Claim(
            "table3",
            "OBM beats magnitude selection: TIES+OBM over TIES",
            _label("TIES+OBM"),
            _label("TIES"),
            paper=_paper_diff(paper, "table3", "TIES+OBM", "TIES"),
        ),
        Claim(
            "table3",
            "OBM beats magnitude selection: OBIM over TIES+IM",
            _label("OBIM"),
            _label("TIES+IM"),
            paper=_paper_diff(paper, "table3", "OBIM", "TIES+IM"),
        ),
        Claim(
            "table3",
            "IM beats the disjoint mean: TIES+IM over TIES",
            _label("TIES+IM"),
            _label("TIES"),
            paper=_paper_diff(paper, "table3", "TIES+IM", "TIES"),
        ),
        Claim(
            "table3",
            "IM beats the disjoint mean: OBIM over TIES+OBM",
            _label("OBIM"),
            _label("TIES+OBM"),
            paper=_paper_diff(paper, "table3", "OBIM", "TIES+OBM"),
        ),
        Claim(
            "table4",
            "validation data of the matching domain helps: the math model's saliency from Math over Code",
            _sized("Math", "Code"),
            _sized("Code", "Math"),
            paper=_paper_diff(paper, "table4", "Math", "Code"),
        ),
        Claim(
            "table5",
            "100 validation samples beat 10 (fewer lead to a decline)",
            _label("100"),
            _label("10"),
            paper=_paper_diff(paper, "table5", "100", "10"),
        ),
        Claim(
            "table5",
            "100 validation samples beat 200 (more lead to a decline: it saturates)",
            _label("100"),
            _label("200"),
            paper=_paper_diff(paper, "table5", "100", "200"),
        ),
        Claim(
            "table6",
            "the earlier a model is merged, the better it is kept: Math First over Math Last",
            _prefix("Math First"),
            _prefix("Math Last"),
            paper=_paper_diff(paper, "table6", "Math First", "Math Last"),
        ),
        Claim(
            "table6",
            "Rotation is slightly worse than Math First",
            _prefix("Math First"),
            _prefix("Rotation"),
            paper=_paper_diff(paper, "table6", "Math First", "Rotation"),
        ),
    ]


def pt_claims(paper: dict) -> list[Claim]:
    t2 = paper.get("table2", {}).get("rows", {})
    others = [k for k in ("TA", "TIES", "DARE", "DELLA", "TALL-Mask", "PCB", "Breadcrumbs") if k in t2]
    best = max(others, key=lambda k: t2[k][-1]) if others else None
    t11 = paper.get("table11", {}).get("rows", {})

    def p11(a: tuple[str, str], b: tuple[str, str]) -> float | None:
        try:
            return round(t11[a[0]][a[1]][-1] - t11[b[0]][b[1]][-1], 2)
        except (KeyError, IndexError):
            return None

    last = str(max((int(k) for k in t11), default=6))
    return [
        Claim(
            "table2",
            "OBIM ranks first on the average (OBIM minus the best other method)",
            _label("OBIM"),
            _best_other("OBIM"),
            paper=_paper_diff(paper, "table2", "OBIM", best) if best else None,
        ),
        Claim(
            "table11",
            "performance declines as more models are merged: OBIM with 2 models over OBIM with the most",
            _count(2, "OBIM"),
            _count(None, "OBIM"),
            paper=p11(("2", "OBIM"), (last, "OBIM")),
        ),
        Claim(
            "table11",
            "OBIM stays above DARE when the most models are merged",
            _count(None, "OBIM"),
            _count(None, "DARE"),
            paper=p11((last, "OBIM"), (last, "DARE")),
        ),
    ]


def judge(claim: Claim, tables: dict[str, Table]) -> Judged:
    t = tables.get(claim.table)
    a = claim.a(t) if t is not None else None
    b = claim.b(t) if t is not None else None
    if t is None or a is None or b is None:
        missing = claim.table if t is None else ((a is None and "the first row") or "the second row")
        return Judged(claim, a, b, None, None, None, 0, f"not run ({missing} missing)", "not measured")
    da, db = t.per_draw.get(a, {}), t.per_draw.get(b, {})
    seeds = sorted(set(da) & set(db))
    per = []
    for s in seeds:
        x, y = da[s].get(claim.column), db[s].get(claim.column)
        if x is not None and y is not None:
            per.append(x - y)
    if not per:
        return Judged(claim, a, b, None, None, None, 0, f"no {claim.column} in both rows", "not measured")
    mean = statistics.mean(per)
    if len(per) >= 2:
        from scipy.stats import t as student

        half = float(student.ppf(0.5 + LEVEL / 2, len(per) - 1)) * statistics.stdev(per) / math.sqrt(len(per))
        lo, hi, how = mean - half, mean + half, f"t interval across {len(per)} draws"
    else:
        cols = [c for c in t.columns if c != "avg"] if claim.column == "avg" else [claim.column]
        ia, ib = t.items.get(a) or {}, t.items.get(b) or {}
        xa, xb = [ia.get(c) for c in cols], [ib.get(c) for c in cols]
        if any(x is None for x in [*xa, *xb]):
            return Judged(claim, a, b, mean, None, None, 1, "one draw, no per-sample records", "not measured")
        try:
            d = paired_difference([x for x in xa if x is not None], [x for x in xb if x is not None])
        except ObimError as e:
            return Judged(claim, a, b, mean, None, None, 1, f"one draw; {e}", "not measured")
        lo, hi, how = d.lo, d.hi, "one draw: the items' bootstrap interval, not across draws"
    verdict = "agrees" if lo > 0 else "disagrees" if hi < 0 else "inconclusive"
    return Judged(claim, a, b, mean, lo, hi, len(per), how, verdict)


def claims_markdown(title: str, judged: list[Judged]) -> str:
    def num(v: float | None) -> str:
        return "—" if v is None else f"{v:+.2f}"

    out = [
        f"# {title}",
        "",
        "Each of the paper's claims as a difference it states a sign for (A - B > 0, in points of the column named), "
        f"judged on our results: ours is the mean over the zoo draws of the per-draw difference with its {LEVEL:.0%} "
        "t interval across the draws (the draws' spread on these test items: every draw is scored on the same "
        "items, so the items' own sampling is not in it; from one draw: the paired bootstrap interval over the "
        "items, which says nothing about other draws). **agrees**: the interval lies above 0; **disagrees**: below 0; "
        "**inconclusive**: it holds 0. The claims are fixed in code (obim/bench/report/claims.py), in the paper's "
        "words, before any result: nothing is tuned toward agreement.",
        "",
        "| table | claim | A - B | column | paper | ours | interval | draws | verdict |",
        "|---|---|---|---|---:|---:|---|---:|---|",
    ]
    for j in judged:
        c = j.claim
        rows = f"{j.a or '?'} - {j.b or '?'}"
        interval = "—" if j.lo is None or j.hi is None else f"[{j.lo:+.2f}, {j.hi:+.2f}]"
        out.append(
            f"| {c.table} | {c.text} | {rows} | {c.column} | {num(c.paper)} | {num(j.diff)} | {interval} | "
            f"{j.draws} | **{j.verdict}** |"
        )
    counts = {v: sum(j.verdict == v for j in judged) for v in ("agrees", "disagrees", "inconclusive", "not measured")}
    out += ["", "- " + ", ".join(f"{n} {v}" for v, n in counts.items() if n)]
    hows = sorted({j.how for j in judged if j.verdict != "not measured"})
    out += [f"- intervals: {h}" for h in hows]
    out += [f"- {j.claim.text}: {j.how}" for j in judged if j.verdict == "not measured"]
    return "\n".join(out) + "\n"


def build_claims(tables: list[Table], setting: str | None, paper: dict) -> str | None:
    """claims.md's text for an experiment's tables (None: no claim's table was built)."""
    by_name = {t.name: t for t in tables}
    claims = sft_claims(paper) if setting == "sft" else pt_claims(paper) if setting == "pt" else []
    if not any(c.table in by_name for c in claims):
        return None
    name = "SFT" if setting == "sft" else "post-pretraining"
    return claims_markdown(f"The paper's claims on our results ({name} setting)", [judge(c, by_name) for c in claims])
