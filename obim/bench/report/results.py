"""A sweep's results, read back for its report: every `result.json` under a sweep directory as a `JobRecord` (the
job's plan as obim.bench.plan.JobPlan, its scores, timings and costs, typed), the labels of models and methods (the
registry's, obim.merging.methods), the `Table` every report layer shares and the paper's numbers
(obim/bench/paper_tables.yaml). The bottom layer of obim.bench.report: it imports no other. `JobRecord.from_json` is
the one place that reads result.json's keys."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from obim.merging.errors import ObimError
from obim.merging.methods import METHODS

from ..plan import DRAWS, JobPlan, axis_of
from ..stages import RESULT_SCHEMA, Saliency

MODEL_LABELS = {"lm": "LM", "math": "Math", "code": "Code"}
PAPER_TABLES = Path(__file__).resolve().parents[1] / "paper_tables.yaml"  # package data of obim.bench


def method_label(name: str) -> str:
    return METHODS[name].pretty_name if name in METHODS else name


def paper_tables() -> dict[str, Any]:
    return yaml.safe_load(PAPER_TABLES.read_text())


@dataclass
class Table:
    name: str
    title: str
    columns: list[str]  # the paper's column names, `avg` last
    rows: list[tuple[str, dict[str, float | None], list | None]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    lead: str = "model"  # the first column's header
    se: dict[str, dict[str, float | None]] = field(default_factory=dict)  # row label -> column -> standard error
    # row label -> column -> its items (obim.bench.report.paired.Items; None: none kept): the rows compared
    items: dict[str, dict[str, Any]] = field(default_factory=dict)
    # column -> the best row and the rows not distinguishable from it; the rows tested (paired.mark_top)
    top: dict[str, set[str]] = field(default_factory=dict)
    tested: dict[str, set[str]] = field(default_factory=dict)
    # row label -> column -> the standard deviation across zoo draws (rows of two draws or more); the draws' seeds
    sd: dict[str, dict[str, float | None]] = field(default_factory=dict)
    draws: dict[str, list[int]] = field(default_factory=dict)
    # row label -> draw -> column -> that draw's value (what the claims compare across draws)
    per_draw: dict[str, dict[int, dict[str, float | None]]] = field(default_factory=dict)
    zoos: dict[int, str | None] = field(default_factory=dict)  # the toy zoo draws the rows came from: fingerprint

    def add(
        self,
        label: str,
        ours: dict[str, float | None],
        paper: list | None,
        se: dict[str, float | None] | None = None,
        items: dict[str, Any] | None = None,
        sd: dict[str, float | None] | None = None,
        draws: list[int] | None = None,
    ) -> None:
        self.rows.append((label, ours, paper))
        if se is not None:
            self.se[label] = se
        if items is not None:
            self.items[label] = items
        if sd is not None:
            self.sd[label] = sd
        if draws is not None:
            self.draws[label] = list(draws)

    @property
    def multi_draw(self) -> bool:
        return any(len(d) > 1 for d in self.draws.values())

    def _se(self, label: str, column: str) -> float | None:
        return (self.se.get(label) or {}).get(column)

    def markdown(self) -> str:
        errors = any(v is not None for row in self.se.values() for v in row.values())
        seeds = sorted({s for d in self.draws.values() for s in d})
        over = f"the mean over the zoo draws (seeds {', '.join(map(str, seeds))}) of " if self.multi_draw else ""
        out = [
            f"# {self.title}",
            "",
            f"Each cell: {over}ours"
            + (" ± its standard error (over the items evaluated; none for a judged score)" if errors else "")
            + (" [sd: the standard deviation across the draws]" if self.multi_draw else "")
            + " (the paper's, where it reports one)."
            + (f" Bold: {self._top_legend()}." if self.top else ""),
            "",
            f"| {self.lead} | " + " | ".join(self.columns) + " |",
            "|---|" + "---:|" * len(self.columns),
        ]
        for label, ours, paper in self.rows:
            cells = []
            for i, c in enumerate(self.columns):
                v, e = ours.get(c), self._se(label, c)
                s = "—" if v is None else f"{v:.2f}" + (f" ± {e:.2f}" if e is not None else "")
                sd = (self.sd.get(label) or {}).get(c)
                if v is not None and sd is not None:
                    s += f" [sd {sd:.2f}]"
                if v is not None and label in self.top.get(c, ()):
                    s = f"**{s}**"
                p = paper[i] if paper is not None and i < len(paper) else None
                cells.append(s + (f" ({p:.2f})" if p is not None else ""))
            out.append(f"| {label} | " + " | ".join(cells) + " |")
        notes = list(self.notes)
        if self.zoos:
            named = [f"seed {k}: {(fp or 'unrecorded')[:16]}" for k, fp in sorted(self.zoos.items())]
            notes.append(f"toy zoo draw{'s' * (len(named) > 1)} (weights fingerprint): {'; '.join(named)}")
        if self.multi_draw:
            notes += [f"{label}: draws {', '.join(map(str, d))} only" for label, d in self.draws.items() if d != seeds]
        out += [""] + [f"- {n}" for n in notes] + ([""] if notes else [])
        return "\n".join(out)

    def _top_legend(self) -> str:
        from .paired import legend

        return (
            "in each column, the best of the rows compared (those with per-sample records) and every row not "
            f"distinguishable from it: {legend()}"
        )

    def _top_cell(self, label: str, column: str) -> str:
        """CSV: 1 in the column's top group, 0 tested and outside it, empty when not tested."""
        if label not in self.tested.get(column, ()):
            return ""
        return "1" if label in self.top[column] else "0"

    def csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        cols = self.columns
        tops = [c for c in cols if c in self.tested]
        sds = cols if self.multi_draw else []
        w.writerow(
            [
                self.lead,
                *cols,
                *(f"{c}_se" for c in cols),
                *(f"{c}_sd" for c in sds),
                *(f"{c}_top" for c in tops),
                *(f"paper_{c}" for c in cols),
                *(["draws"] if sds else []),
            ]
        )
        for label, ours, paper in self.rows:
            paper = list(paper or [])
            errors = [self._se(label, c) for c in self.columns]
            w.writerow(
                [
                    label,
                    *("" if ours.get(c) is None else f"{ours[c]:.4f}" for c in self.columns),
                    *("" if e is None else f"{e:.4f}" for e in errors),
                    *("" if (v := (self.sd.get(label) or {}).get(c)) is None else f"{v:.4f}" for c in sds),
                    *(self._top_cell(label, c) for c in tops),
                    *("" if i >= len(paper) or paper[i] is None else paper[i] for i in range(len(self.columns))),
                    *([" ".join(map(str, self.draws.get(label, [])))] if sds else []),
                ]
            )
        return buf.getvalue()


@dataclass(frozen=True)
class Scores:
    """One model's evaluation as result.json records it: {lm-eval task: score} (None: unjudged), their average."""

    scores: dict[str, float | None]
    avg: float | None
    eval_s: float
    stderr: dict[str, float | None] = field(default_factory=dict)  # percent points; None: not computed


@dataclass(frozen=True)
class Cost:
    """A job's Table 10 figures beyond its timings (obim.bench.stages.cost_report)."""

    params_b: float
    gpus: int
    gpu_name: str | None
    hessian_s_per_sample: float | None  # None: no saliency statistics


@dataclass(frozen=True)
class Cached:
    """Which stages were served from the caches (saliency None: the method uses none)."""

    saliency: bool | None
    merge: bool
    eval: bool


@dataclass(frozen=True)
class JobRecord:
    """One job's result as read back from its result.json (written by obim.bench.stages.JobResult.to_json)."""

    path: Path
    mtime: int  # ns: the latest of a row's jobs wins
    job: str  # "" for a job run outside a sweep
    config_hash: str
    obim_version: str
    plan: JobPlan  # config: the plain Hydra config it was planned from
    inputs: dict[str, str]  # model name -> weights fingerprint
    scores: dict[str, float | None]  # the merged model's, by lm-eval task in the plan's order
    avg: float | None
    stderr: dict[str, float | None]  # each score's standard error (percent points)
    n: dict[str, int | None]  # the items each score is over
    outputs: dict[str, str] | None
    # lm-eval's per-sample records: model ("merged" or an individual) -> task -> leaf -> {file, metric}; a file's
    # path is relative to the job folder (absolute for a search trial's, in the evaluation cache)
    samples: dict[str, dict[str, dict[str, dict[str, Any]]]]
    individual: dict[str, Scores]  # the base's and each expert's, where the plan evaluates them
    saliency_s: float
    merge_s: float
    eval_s: float
    saliency: dict[str, Saliency]
    cost: Cost
    peak_rss_mb: float
    peak_gpu_mb: float | None
    device: str
    cached: Cached
    merged_dir: str | None
    wandb_dir: str | None  # set by the sweep's tracking
    zoo: dict[str, Any] | None  # the toy zoo's draw: seed, recipe_hash, fingerprint, cpu_kernels
    # the order as asked for (the config's `order` group): the plan keeps only the list it resolves to
    order_kind: str | None
    order_model: str | None

    @property
    def config(self) -> dict[str, Any]:
        return self.plan.config

    @classmethod
    def from_json(cls, d: dict[str, Any], path: Path, mtime: int = 0) -> JobRecord:
        order = d["config"].get("order") or {}
        c = d["cost"]
        return cls(
            path=path,
            mtime=mtime,
            job=d["job"],
            config_hash=d["config_hash"],
            obim_version=d["obim_version"],
            plan=JobPlan.from_json(d["plan"], config=d["config"]),
            inputs=d["inputs"],
            scores=d["scores"],
            avg=d["avg"],
            stderr=d["stderr"],
            n=d["n"],
            outputs=d["outputs"],
            samples=d["samples"],
            individual={
                n: Scores(e["scores"], e["avg"], e["eval_s"], e.get("stderr") or {}) for n, e in d["individual"].items()
            },
            saliency_s=d["saliency_s"],
            merge_s=d["merge_s"],
            eval_s=d["eval_s"],
            saliency={n: Saliency(**s) for n, s in d["saliency"].items()},
            cost=Cost(c["params_b"], c["gpus"], c["gpu_name"], c["hessian_s_per_sample"]),
            peak_rss_mb=d["peak_rss_mb"],
            peak_gpu_mb=d["peak_gpu_mb"],
            device=d["device"],
            cached=Cached(d["cached"]["saliency"], d["cached"]["merge"], d["cached"]["eval"]),
            merged_dir=d["merged_dir"],
            wandb_dir=d.get("wandb_dir"),
            zoo=d["zoo"],
            order_kind=order.get("kind"),
            order_model=order.get("model"),
        )


def load_results(root: str | Path) -> list[JobRecord]:
    """Every result.json under root, oldest first (so later ones win). One written by an older obim is refused
    rather than half-read: rerunning its sweep redoes it from the caches."""
    found = []
    for p in Path(root).rglob("result.json"):
        if _in_search(p, Path(root)):
            continue
        try:
            r = json.loads(p.read_text())
        except (json.JSONDecodeError, OSError):
            continue
        if r.get("schema") != RESULT_SCHEMA:
            raise ObimError(
                f"{p}: result.json of layout {r.get('schema', 1)}, this obim reads {RESULT_SCHEMA}; "
                f"rerun its sweep (jobs are redone from the caches) or move it out of {root}"
            )
        try:
            found.append(JobRecord.from_json(r, p, p.stat().st_mtime_ns))
        except (KeyError, TypeError, ObimError) as e:  # same layout, yet not what this obim writes
            msg = f"no {e}" if isinstance(e, KeyError) else str(e).splitlines()[0]
            raise ObimError(f"{p}: unreadable result.json ({msg}); rerun its sweep or move it out of {root}") from e
    found.sort(key=lambda r: (r.mtime, str(r.path)))
    _check_same_inputs(found, root)
    return found


def _in_search(p: Path, root: Path) -> bool:
    """A search's best-trial jobs (<search dir>/<method>/best/, the search dir holding its study.log) are the
    search's record, not the sweep's: a search run inside a sweep directory (its default) stays out of its tables."""
    return any((d / "study.log").is_file() for d in p.parents if d != root and d.is_relative_to(root))


def _check_same_inputs(results: list[JobRecord], root: str | Path) -> None:
    """One table compares jobs on the same models: results whose inputs differ under one name (a run with other
    checkpoints or a retrained expert at the same job directories, beside jobs of the earlier run) are refused
    rather than mixed."""
    seen: dict[tuple[str, int, str], tuple[str, JobRecord]] = {}
    for r in results:
        for name, fp in r.inputs.items():
            key = (r.plan.experiment, r.plan.zoo_seed, name)  # each zoo draw has its own models
            if key in seen and seen[key][0] != fp:
                (was, other), path = seen[key], _path(r, name)
                raise ObimError(
                    f"{root}: jobs of different inputs: model '{name}' of {r.plan.experiment} ({path}) is {fp} in "
                    f"{_rel(r.path.parent, root)} but {was} in {_rel(other.path.parent, root)}; rerun every job with "
                    "the same models or move one run's job directories out"
                )
            seen.setdefault(key, (fp, r))


def _rel(d: Path, root: str | Path) -> str:
    return str(d.relative_to(root)) if d.is_relative_to(root) else str(d)


def _path(r: JobRecord, name: str) -> str:
    cfg = r.plan.merge_config
    return cfg.base_model if name == "base" else next((m.path for m in cfg.models if m.name == name), "?")


def varies_only(r: JobRecord, axes: set[str]) -> bool:
    """Whether the job's overrides vary no sweep axis but `axes` (and the zoo's draw, whose jobs are replicates)."""
    return {a for a in map(axis_of, r.plan.overrides) if a is not None} <= axes | {DRAWS}


def count_job(r: JobRecord) -> bool:
    """A post-pretraining OBIM or DARE job that varies only the number of models (Table 11, Figure 3)."""
    return r.plan.setting == "pt" and r.plan.method in ("obim", "dare") and varies_only(r, {"n_models"})


def by_count(results: list[JobRecord]) -> dict[tuple[int, str], list[JobRecord]]:
    """The post-pretraining OBIM and DARE jobs that vary only the number of models, by (models merged with the
    base counted, as the paper counts them; method): the latest of each zoo draw, in the draws' order."""
    latest: dict[tuple[int, str], dict[int, JobRecord]] = {}
    for r in results:
        if count_job(r):
            latest.setdefault((r.plan.n_models + 1, r.plan.method), {})[r.plan.zoo_seed] = r
    return {k: [v[d] for d in sorted(v)] for k, v in latest.items()}


def mean_or_none(vals: list[Any]) -> float | None:
    """The mean of `vals`; None when there is none or one is missing (never a partial mean)."""
    return None if not vals or any(v is None for v in vals) else float(sum(vals) / len(vals))


def mean_avg(records: list[JobRecord]) -> float | None:
    """The mean over the draws of the jobs' averages (None when one is missing)."""
    return mean_or_none([r.avg for r in records])


def best_single(records: list[JobRecord] | None) -> tuple[str, float] | None:
    """The best individual model by average, over the draws' jobs (the mean of each model's averages; an unscored
    one, e.g. unjudged, is left out)."""
    records = records or []
    names = set.intersection(*(set(r.individual) for r in records)) if records else set()
    ind = {}
    for k in names:
        vals = [r.individual[k].avg for r in records]
        if all(v is not None for v in vals):
            ind[k] = sum(v for v in vals if v is not None) / len(vals)
    if not ind:
        return None
    name = max(ind, key=ind.__getitem__)
    return name, ind[name]
