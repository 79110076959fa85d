"""Two evaluations of a sweep compared item by item (`python experiments/compare.py RUNS A B`): per benchmark and
for the average, each side's score, the difference and its paired-bootstrap interval (obim.bench.report.paired).

A side is named by a method (the latest job of the experiment's main setting that ran it: `obim`, `ties` or the
registry's label `TIES`), a job (its folder, or its name under the sweep: `3`), or a model the jobs evaluated on
their own (`base`, an expert's name: `math`), optionally from a given job (`math@3`). The second side follows the
first: the same zoo draw, and a model evaluated on its own from the first side's job."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from obim.merging.errors import ObimError
from obim.merging.methods import METHODS

from .paired import LEVEL, RESAMPLES, SEED, Difference, Items, paired_difference, record_items
from .results import JobRecord, load_results, mean_or_none, method_label


@dataclass(frozen=True)
class Side:
    """One side of a comparison: a job and which of its models ("merged" or an individual's name)."""

    name: str
    record: JobRecord
    model: str

    def score(self, task: str) -> float | None:
        r = self.record
        return r.scores.get(task) if self.model == "merged" else r.individual[self.model].scores.get(task)

    def items(self, task: str) -> Items | None:
        return record_items(self.record, self.model, task)

    def where(self, root: Path) -> str:
        d = self.record.path.parent
        where = str(d.relative_to(root)) if d.is_relative_to(root) else str(d)
        where += "" if self.model == "merged" else f", model {self.model}"
        return where + (f", zoo draw {self.record.plan.zoo_seed}" if self.record.plan.zoo else "")


def _method(spec: str) -> str | None:
    by_label = {m.pretty_name.lower(): k for k, m in METHODS.items()}
    return spec if spec in METHODS else by_label.get(spec.lower())


def resolve(results: list[JobRecord], spec: str, root: Path, like: Side | None = None) -> Side:
    """The job (and model) a command-line name stands for (module docstring); an ObimError naming what exists.
    `like`: the other side, already resolved: a model evaluated on its own is taken from that side's job when it
    has it, and a method from the same zoo draw, so that both sides are on the same items and the same draw."""
    model, _, job = spec.partition("@")
    pool = results
    if job:
        pool = [r for r in results if _job_matches(r, job, root)]
        if not pool:
            raise ObimError(f"{spec}: no job {job!r} under {root}")
    else:
        by_job = [r for r in results if _job_matches(r, spec, root)]
        if by_job:
            return Side(spec, by_job[-1], "merged")
    method = _method(model)
    if method is not None:
        hit = _prefer([r for r in pool if r.plan.method == method and (job or r.plan.main)], like)
        if hit:
            return Side(method_label(method), hit[-1], "merged")
    if like is not None and not job and model in like.record.individual:
        return Side(model, like.record, model)
    hit = _prefer([r for r in pool if model in r.individual and (job or r.plan.main)], like)
    if hit:
        return Side(model, hit[-1], model)
    methods = sorted({r.plan.method for r in results if r.plan.main})
    models = sorted({m for r in results for m in r.individual})
    raise ObimError(
        f"{spec}: not a job, a method of the main setting ({', '.join(methods) or 'none'}) or an evaluated model "
        f"({', '.join(models) or 'none'}) under {root}"
    )


def _prefer(records: list[JobRecord], like: Side | None) -> list[JobRecord]:
    """Those of the other side's zoo draw when there are some (else the default draw's, else all)."""
    draw = like.record.plan.zoo_seed if like is not None else 0
    same = [r for r in records if r.plan.zoo_seed == draw]
    return same or records


def _resolve_pair(results: list[JobRecord], a: str, b: str, root: Path) -> tuple[Side, Side]:
    """Both sides: a job named outright first, so that the other side follows its draw and job."""
    first_is_job = any(_job_matches(r, a.partition("@")[0], root) for r in results) or "@" in a
    if not first_is_job and (any(_job_matches(r, b.partition("@")[0], root) for r in results) or "@" in b):
        sb = resolve(results, b, root)
        return resolve(results, a, root, sb), sb
    sa = resolve(results, a, root)
    return sa, resolve(results, b, root, sa)


def _job_matches(r: JobRecord, name: str, root: Path) -> bool:
    d = r.path.parent
    if r.job == name or d.name == name:
        return True
    p = Path(name)
    return (p if p.is_absolute() else root / p).resolve() == d.resolve() or (Path.cwd() / p).resolve() == d.resolve()


@dataclass(frozen=True)
class Line:
    benchmark: str
    a: float | None
    b: float | None
    diff: Difference | None
    why: str = ""  # why no difference was computed


def compare(a: Side, b: Side, resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL) -> list[Line]:
    """Per benchmark both sides evaluated, then the average over those benchmarks."""
    tasks = [t for t in a.record.plan.tasks if t in b.record.plan.tasks]
    if not tasks:
        raise ObimError(f"{a.name} and {b.name} share no benchmark")
    lines, pairs = [], []
    for t in tasks:
        ia, ib = a.items(t), b.items(t)
        why, diff = "", None
        if ia is None or ib is None:
            side = a.name if ia is None else b.name
            why = f"no per-sample records of {side} (judged, or a job from before obim kept them)"
        else:
            try:
                diff = paired_difference([ia], [ib], resamples, seed, level)
                pairs.append((ia, ib))
            except ObimError as e:
                why = str(e)
        lines.append(Line(t, a.score(t), b.score(t), diff, why))
    avg_a, avg_b = mean_or_none([ln.a for ln in lines]), mean_or_none([ln.b for ln in lines])
    if len(pairs) == len(tasks):
        d = paired_difference([p[0] for p in pairs], [p[1] for p in pairs], resamples, seed, level)
        lines.append(Line("avg", avg_a, avg_b, d))
    else:
        lines.append(Line("avg", avg_a, avg_b, None, "a benchmark above was not compared"))
    return lines


def render(a: Side, b: Side, lines: list[Line], root: Path, resamples: int, seed: int, level: float) -> str:
    def num(v: float | None) -> str:
        return "—" if v is None else f"{v:.2f}"

    out = [
        f"A = {a.name} ({a.where(root)})",
        f"B = {b.name} ({b.where(root)})",
        f"A - B in points, paired bootstrap over the shared items ({resamples:,} resamples, seed {seed}, "
        f"{level:.0%} interval); * : the interval excludes 0",
        "",
        f"{'lm-eval task':<16} {'A':>8} {'B':>8} {'A - B':>8}  {'interval':<20} {'items':>6}",
    ]
    for ln in lines:
        if ln.diff is None:
            out.append(f"{ln.benchmark:<16} {num(ln.a):>8} {num(ln.b):>8} {'—':>8}  {ln.why}")
            continue
        d = ln.diff
        ci = f"[{d.lo:+.2f}, {d.hi:+.2f}]" + (" *" if d.distinguishable else "")
        out.append(f"{ln.benchmark:<16} {num(ln.a):>8} {num(ln.b):>8} {d.diff:>+8.2f}  {ci:<20} {d.n:>6}")
    return "\n".join(out)


def main(runs: str | Path, a: str, b: str, resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL) -> str:
    root = Path(runs)
    results = load_results(root)
    if not results:
        raise ObimError(f"{root}: no result.json found")
    sa, sb = _resolve_pair(results, a, b, root)
    return render(sa, sb, compare(sa, sb, resamples, seed, level), root, resamples, seed, level)
