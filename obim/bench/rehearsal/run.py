"""`make rehearse` / `python experiments/rehearse.py`: every paper preset of the two real experiments, run on CPU
through the real code path against the rehearsal mirror (obim.bench.rehearsal.mirror), each to finished tables.

Each preset runs as a user would run it (`experiments/sweep.py -m +paper=tableN`), in its own process, with only
the environment of an offline cluster set: HF_HOME=<mirror>, HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1,
OBIM_QWEN_CKPTS=<mirror>/qwen2-7b-pt, and a small eval.limit. Its dry run goes first (what a real run of the preset
costs: obim.bench.estimate), then the run. Everything goes under one folder of its own (the mirror, the caches,
the job directories, the tables), never beside the toy results or the committed tables. A summary
(`<out>/results/rehearsal.md`) gives each preset's exit status, wall time, per-stage seconds and any column
without a score, with its reason.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# every paper preset: Tables 1, 3-6 on llama2_13b_sft, Tables 2 and 11 (and Figure 3's runs) on qwen2_7b_pt
PRESETS = ["table1", "table2", "table3", "table4", "table5", "table6", "table11"]
SEARCH_EXPERIMENTS = ["llama2_13b_sft", "qwen2_7b_pt"]
# AlpacaEval's win rate needs an LLM judge (obim.bench.judge): measured nowhere here, reported as missing
NEEDS_JUDGE = {"obim_alpaca_eval": "AlpacaEval's win rate needs an LLM judge (obim.bench.judge); none configured"}


def default_out() -> Path:
    from obim.bench.cache import default_cache_dir

    return Path(default_cache_dir()) / "rehearsal"


@dataclass
class Step:
    name: str
    argv: list[str]
    sweep_dir: Path  # where its jobs write (shared by the presets of one experiment, as a user's are)
    rc: int | None = None
    seconds: float = 0.0
    log: Path | None = None
    jobs: list[Path] = field(default_factory=list)  # the job directories it ran (Hydra writes .hydra/ for each)
    started: float = 0.0


def experiment_of(preset: str) -> str:
    from omegaconf import OmegaConf

    from obim.bench import conf_dir

    defaults = OmegaConf.to_container(OmegaConf.load(Path(conf_dir()) / "paper" / f"{preset}.yaml").defaults)
    found = [d["override /experiment"] for d in defaults if isinstance(d, dict) and "override /experiment" in d]
    if not found:
        raise ValueError(f"conf/paper/{preset}.yaml: no `override /experiment` in its defaults")
    return found[0]


def environment(mirror: Path, out: Path) -> dict[str, str]:
    """An offline cluster's environment, the mirror standing in for the hub."""
    from .mirror import CHECKPOINTS

    env = dict(os.environ)
    for k in ("HF_HUB_CACHE", "HF_DATASETS_CACHE", "HUGGINGFACE_HUB_CACHE", "OBIM_RESULTS"):
        env.pop(k, None)  # would point past HF_HOME or out of the rehearsal's folder
    env.update(
        HF_HOME=str(mirror),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_ALLOW_CODE_EVAL="1",  # the code benchmarks' opt-in (they run in obim's sandbox)
        WANDB_MODE="offline",
        OBIM_QWEN_CKPTS=str(mirror / CHECKPOINTS),
        OBIM_CACHE=str(out / "cache"),
    )
    return env


def sweep_steps(out: Path, presets: list[str], limit: int, extra: list[str], experiments: Path) -> list[Step]:
    """Each preset as a user runs it, from the rehearsal's folder (its multirun/ and results/ land there): the
    dry run, then the run."""
    steps = []
    for p in presets:
        argv = [sys.executable, str(experiments / "sweep.py"), "-m", f"+paper={p}", "results_dir=results", *extra]
        d = out / "multirun" / experiment_of(p)
        # the dry run without eval.limit: what a real run of the preset costs, counted on the mirror's datasets,
        # whose evaluated splits have the real row counts (obim.bench.rehearsal.data)
        steps.append(Step(f"{p} dry run", [*argv, "dry_run=true"], d))
        steps.append(Step(p, [*argv, f"eval.limit={limit}"], d))
    return steps


def search_steps(out: Path, exps: list[str], trials: int, limit: int, experiments: Path) -> list[Step]:
    steps = []
    for e in exps:
        argv = [
            sys.executable,
            str(experiments / "search.py"),
            f"experiment={e}",
            f"search.trials={trials}",
            f"search.startup_trials={trials}",
            f"eval.limit={limit}",
            "results_dir=results",
        ]
        steps.append(Step(f"search {e}", argv, out / "multirun" / e / "search"))
    return steps


def _stamps(d: Path) -> dict[Path, float]:
    """Each job directory under `d` and when Hydra last started a job in it (it rewrites .hydra/ for every job,
    a job the sweep then skips as done included: presets share job directories, Table 3's OBIM is Table 1's)."""
    if not d.is_dir():
        return {}
    if d.name == "search":  # no Hydra job directories: each method's best job writes <method>/best/result.json
        return {f.parent: f.stat().st_mtime for f in d.glob("*/best/result.json")}
    return {f.parent.parent: f.stat().st_mtime for f in d.glob("*/.hydra/overrides.yaml")}


def run_step(step: Step, env: dict[str, str], out: Path, say) -> None:
    (out / "logs").mkdir(parents=True, exist_ok=True)
    step.log = out / "logs" / (step.name.replace(" ", "_") + ".log")
    before = _stamps(step.sweep_dir)
    say(f"rehearsal: {step.name}: {' '.join(step.argv[1:])}")
    step.started = time.time()
    t0 = time.perf_counter()
    with open(step.log, "w") as f:
        proc = subprocess.Popen(
            step.argv, env=env, cwd=out, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert proc.stdout is not None
        for line in proc.stdout:  # the console's own lines, kept in the step's log too
            f.write(line)
            f.flush()
            sys.stdout.write("  " + line)
            sys.stdout.flush()
        step.rc = proc.wait()
    step.seconds = round(time.perf_counter() - t0, 1)
    step.jobs = sorted(d for d, t in _stamps(step.sweep_dir).items() if before.get(d) != t)


def _json(f: Path) -> dict:
    from obim.bench.cache import read_json

    return read_json(f) or {}


def unscored(recs: list[dict]) -> list[str]:
    """The columns without a score in these jobs (merged or individual models), each once with its reason and the
    models it concerns."""
    who: dict[str, list[str]] = {}
    for rec in recs:
        models = [("merged", rec.get("scores") or {})]
        models += [(n, (r or {}).get("scores") or {}) for n, r in (rec.get("individual") or {}).items()]
        for name, scores in models:
            for task, v in scores.items():
                if v is None and name not in who.setdefault(task, []):
                    who[task].append(name)
    return [f"{t} ({', '.join(ms)}): {NEEDS_JUDGE.get(t, 'no score')}" for t, ms in sorted(who.items())]


def stage_seconds(recs: list[dict], individual_seen: set[tuple]) -> tuple[float, float, float]:
    """Seconds these jobs spent computing (a stage a cache answered is not counted: result.json keeps the time it
    took when computed); an individual model's evaluation counts once in the whole rehearsal (every job of an
    experiment carries it)."""
    sal = mer = ev = 0.0
    for r in recs:
        cached = r.get("cached") or {}
        sal += 0 if cached.get("saliency") else r.get("saliency_s") or 0
        mer += 0 if cached.get("merge") else r.get("merge_s") or 0
        ev += 0 if cached.get("eval") else r.get("eval_s") or 0
        exp = (r.get("plan") or {}).get("experiment", {})
        for name, i in (r.get("individual") or {}).items():
            key = (json.dumps(exp, sort_keys=True, default=str), name)
            if key not in individual_seen:
                individual_seen.add(key)
                ev += (i or {}).get("eval_s") or 0
    return sal, mer, ev


def summary(steps: list[Step], limit: int, mirror_info: dict) -> str:
    from obim.bench.estimate import count, sweep_total

    lines = [
        "# Rehearsal of the real presets on CPU stand-ins",
        "",
        f"Made by `make rehearse` (obim.bench.rehearsal); mirror built in {mirror_info.get('build_s')} s. A real run's "
        "cost is the preset's dry run (no eval.limit) on the mirror, whose evaluated splits have the real row counts "
        "(tokens: the stand-ins' tokenizers, so only indicative; `?`: not counted, see the job's plan.json). The "
        f"rehearsal ran with eval.limit={limit}: its scores come from tiny stand-ins and check the path, not the "
        "science. Jobs: run here / reused (a result another preset's job already wrote: same job, skipped).",
        "",
        "| step | exit | wall s | jobs | real run: merges | saliency samples (tokens) | eval prompts | "
        "max generated tokens | rehearsal: saliency s | merge s | eval s | unscored columns |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    individual_seen: set[tuple] = set()
    for s in steps:
        if s.name.endswith("dry run"):
            plans = [_json(d / "plan.json") for d in s.jobs]
            costs = [p["cost"] for p in plans if p.get("cost")]
            c = sweep_total(costs) if costs else {}
            jobs = f"{len(costs)}" + (f" ({len(plans) - len(costs)} failed)" if len(costs) < len(plans) else "")
            lines.append(
                f"| {s.name} | {s.rc} | {s.seconds} | {jobs} | {c.get('merges', 0)} | "
                f"{count(c.get('saliency_samples', 0))} ({count(c.get('saliency_tokens', 0))}) | "
                f"{count(c.get('prompts', 0))} | {count(c.get('max_gen_tokens', 0))} | | | | |"
            )
            continue
        pairs = [(d, r) for d in s.jobs if (r := _json(d / "result.json"))]
        recs = [r for _, r in pairs]
        here = [r for d, r in pairs if (d / "result.json").stat().st_mtime >= s.started]
        sal, mer, ev = stage_seconds(here, individual_seen)
        lines.append(
            f"| {s.name} | {s.rc} | {s.seconds} | {len(here)} / {len(recs) - len(here)} | | | | | {sal:.1f} | "
            f"{mer:.1f} | {ev:.1f} | " + ("; ".join(unscored(recs)) or "none") + " |"
        )
    lines += ["", f"Total: {sum(s.seconds for s in steps):.0f} s.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None, experiments: Path | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rehearse", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="the rehearsal's folder (default: $OBIM_CACHE/rehearsal)")
    ap.add_argument("--presets", default=",".join(PRESETS), help="comma-separated paper presets (default: all)")
    ap.add_argument("--limit", type=int, default=2, help="eval.limit: documents per benchmark (default 2)")
    ap.add_argument("--search-trials", type=int, default=2, help="trials per method of each search (0: no search)")
    ap.add_argument("--search", default=",".join(SEARCH_EXPERIMENTS), help="experiments to search (comma-separated)")
    ap.add_argument(
        "overrides", nargs="*", help="more sweep overrides for every preset, e.g. hydra.sweeper.params.method=ta,obim"
    )
    args = ap.parse_args(argv)
    presets = [p for p in args.presets.split(",") if p]
    unknown = sorted(set(presets) - set(PRESETS))
    if unknown:  # before the mirror's minutes of training
        ap.error(f"--presets: unknown preset(s) {', '.join(unknown)}; one of {', '.join(PRESETS)}")
    if args.limit < 1 or args.search_trials < 0:
        ap.error("--limit must be >= 1 and --search-trials >= 0")
    exps = [e for e in args.search.split(",") if e] if args.search_trials > 0 else []
    if set(exps) - set(SEARCH_EXPERIMENTS):
        ap.error(f"--search: one or more of {', '.join(SEARCH_EXPERIMENTS)}")
    experiments = experiments or Path(__file__).resolve().parents[3] / "experiments"
    out = (args.out or default_out()).resolve()
    from obim.merging.staging import atomic_write_file

    from .mirror import build, mirror_dir

    t0 = time.perf_counter()
    mirror = mirror_dir(out)
    info = build(mirror)
    env = environment(mirror, out)
    steps = sweep_steps(out, presets, args.limit, args.overrides, experiments)
    steps += search_steps(out, exps, args.search_trials, args.limit, experiments)
    for s in steps:
        run_step(s, env, out, print)
    text = summary(steps, args.limit, info)
    (out / "results").mkdir(parents=True, exist_ok=True)
    atomic_write_file(out / "results" / "rehearsal.md", lambda tmp: tmp.write_text(text))
    print(text)
    failed = [s.name for s in steps if s.rc != 0]
    print(
        f"rehearsal: {len(steps)} steps in {time.perf_counter() - t0:.0f} s; results in {out / 'results'}"
        + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0
