"""The search: every method tuned with the same budget on dev data (experiments/search.py; docs/search.md).

Per method one Optuna study (`<experiment>-<method>`, TPE with the same seed and trial budget for every method) over
the parameters its config declares (`search:` in conf/method/<name>.yaml, checked against the registry's
parameters). A trial proposes overrides: the sweep's config composed with them becomes a job plan whose objective is
the experiment's dev tasks (`dev_benchmarks`, obim.bench.dev.plan_dev: checked disjoint from the test benchmarks and
from the saliency samples), run by the sweep's own pipeline (obim.bench.pipeline, through the caches); its value is
their mean score. When a study has its trials, its best trial's overrides make a sweep job (the sweep's config,
the test benchmarks), run by the same pipeline into <search dir>/<method>/best/ (result.json, as a sweep writes it),
and the tuned table is written beside the untuned Table 1 (<results_dir>/<experiment>/table1_tuned.md|csv) with each
study's optimisation history and parameter importances (PNG).

Studies live in an Optuna journal file in the search directory (multirun/<experiment>/search/study.log): a search
killed or failed midway resumes where it stopped; the trials still to run are the budget less the finished ones
(complete or pruned), so no finished trial is repeated (a trial that failed or was killed mid-run is redone).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from obim.merging.errors import ObimError
from obim.merging.staging import atomic_write_file

from .cache import read_json, write_json
from .dev import plan_dev
from .pipeline import Record, run_job
from .plan import plain, plan_job
from .report.search_report import save_plots, tuned_table

SPACE_KEYS = ("low", "high", "log", "per_model")
SEARCH_KEYS = ("methods", "trials", "startup_trials", "seed", "dir")


# ------------------------------------------------------------------------------------------------ the space


def check_space(method_name: str, space: Any) -> dict[str, dict]:
    """A method's declared search space, checked against its registered parameters: each name a parameter of the
    method, low < high both accepted by the parameter's own check, `per_model` only for a per-model parameter."""
    from obim.merging.methods import get_method

    method = get_method(method_name)
    params = {p.name: p for p in method.params}
    if not space:
        raise ObimError(
            f"method.search: method '{method_name}' declares no search space (`search:` in "
            f"conf/method/{method_name}.yaml)"
        )
    out = {}
    for name, spec in dict(space).items():
        where = f"method.search.{name} ({method_name})"
        if name not in params:
            raise ObimError(f"{where}: not a parameter of method '{method_name}' ({', '.join(params)})")
        if not isinstance(spec, dict) or set(spec) - set(SPACE_KEYS) or not {"low", "high"} <= set(spec):
            raise ObimError(f"{where}: expected {{low, high[, log, per_model]}}, got {spec!r}")
        low, high = spec["low"], spec["high"]
        if (
            not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (low, high))
            or not low < high
        ):
            raise ObimError(f"{where}: expected finite numbers low < high, got {low!r}, {high!r}")
        for v in (low, high):
            err = params[name].check(v)
            if err:
                raise ObimError(f"{where}: {v!r}: {err}")
        if spec.get("log") and low <= 0:
            raise ObimError(f"{where}: a log scale needs low > 0, got {low!r}")
        per_model = bool(spec.get("per_model", False))
        if per_model and not params[name].per_model:
            raise ObimError(f"{where}: '{name}' is not a per-model parameter of '{method_name}'")
        out[name] = {
            "low": float(low),
            "high": float(high),
            "log": bool(spec.get("log", False)),
            "per_model": per_model,
        }
    return out


def shared_settings(space: dict[str, dict], experiment: dict) -> dict[str, dict]:
    """An experiment of `checkpoints` gives them one `checkpoint` setting (the paper's one retention for every
    checkpoint), with no per-model key to set: its per-model retention is searched as one value, `retention=`."""
    if experiment.get("checkpoints") is None or not space.get("retention", {}).get("per_model"):
        return space
    return {**space, "retention": {**space["retention"], "per_model": False}}


def suggest(trial: Any, space: dict[str, dict], models: list[str], im: bool) -> tuple[list[str], dict[str, float]]:
    """The trial's draw as config overrides, and the values merged ({name or name.model: value}, 4 decimals).
    Iterative merging keeps at most all of the positions: per-model retentions drawn summing over 1 are scaled
    down to sum 1 (the trial records both, its params as drawn and `params_used` as merged)."""
    used: dict[str, float] = {}
    for name, s in space.items():
        for m in models if s["per_model"] else [None]:
            key = f"{name}.{m}" if m else name
            used[key] = trial.suggest_float(key, s["low"], s["high"], log=s["log"])
    drawn = dict(used)
    used = {k: round(v, 4) for k, v in drawn.items()}
    rkeys = [k for k in used if k.split(".", 1)[0] == "retention" and "." in k]
    total = sum(drawn[k] for k in rkeys)
    if im and sum(used[k] for k in rkeys) > 1:
        for k in rkeys:
            used[k] = math.floor(drawn[k] / total * 1e4) / 1e4
    if im and "retention" in used and used["retention"] * len(models) > 1:  # one retention for every model
        used["retention"] = math.floor(1e4 / len(models)) / 1e4
    overrides = []
    for key, v in used.items():
        name, _, m = key.partition(".")
        if name == "retention":
            overrides.append(f"experiment.models.{m}.retention={v}" if m else f"retention={v}")
        elif m:
            overrides.append(f"+method.per_model.{m}.{name}={v}")
        else:
            overrides.append(f"method.parameters.{name}={v}")
    return overrides, used


# ------------------------------------------------------------------------------------------------ the driver


def compose(overrides: list[str], primary: str = "search") -> Any:
    """conf/search.yaml (the sweep's config and `search`) composed with these overrides; primary "sweep": the
    sweep's own config, what a sweep job with these overrides is given."""
    from hydra import compose as hcompose
    from hydra import initialize_config_dir

    from . import conf_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return hcompose(primary, overrides=list(overrides))


@dataclass
class Search:
    overrides: list[str]  # the user's overrides (experiment, eval, tracking...), every trial's base
    cfg: Any  # composed with them
    out: Path  # the search directory: study.log, search.log, <method>/
    say: Callable[[str], None] = print

    @property
    def experiment(self) -> str:
        return str(self.cfg.experiment.name)

    @property
    def draw(self) -> int:
        """The toy zoo's draw the studies run on (0 for experiments without a zoo)."""
        return int(self.cfg.experiment.get("zoo_seed") or 0)

    @property
    def opts(self) -> dict:
        return plain(self.cfg.search)

    def storage(self) -> Any:
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        self.out.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(self.out / "study.log")))

    @contextmanager
    def quiet(self) -> Iterator[None]:
        """The libraries' logs and progress bars to the search's log file (verbose=true: on the console)."""
        if self.cfg.get("verbose"):
            yield
            return
        from .joblog import captured

        with captured(self.out / "search.log", None):
            yield


def check_options(opts: dict) -> None:
    from obim.merging.checks import number_in, require
    from obim.merging.methods import METHODS

    unknown = set(opts) - set(SEARCH_KEYS)
    if unknown:
        raise ObimError(f"search: unknown key(s) {', '.join(sorted(unknown))}; valid: {', '.join(SEARCH_KEYS)}")
    require("search.trials", opts["trials"], number_in(1, 10**6, integer=True))
    require("search.startup_trials", opts["startup_trials"], number_in(1, 10**6, integer=True))
    require("search.seed", opts["seed"], number_in(0, 2**32 - 1, integer=True))
    methods = opts["methods"]
    if isinstance(methods, str):
        methods = [methods]
    if not methods or any(m not in METHODS for m in methods):
        raise ObimError(f"search.methods: expected registered methods ({', '.join(METHODS)}), got {methods!r}")


def _trial_line(method: str, n: int, total: int, value: float, used: dict, info: dict) -> str:
    params = " ".join(f"{k}={v:g}" for k, v in used.items())
    cached = " (cached)" if info["cached"] else ""
    return (
        f"[{method} {n}/{total}] dev avg {value:.1f} | {params} | merge {info['merge_s']:.1f} s, "
        f"eval {info['eval_s']:.1f} s{cached}"
    )


def trial_plan(s: Search, method: str, overrides: list[str]) -> Any:
    """A trial's job: the search's overrides, the method and the trial's, evaluated on the dev tasks."""
    ov = [*s.overrides, f"method={method}", *overrides]
    return plan_job(compose(ov), ov, objective="dev")


def run_trial(
    s: Search, method: str, trial: Any, space: dict, models: list[str], im: bool, dev: dict
) -> tuple[float, dict]:
    overrides, used = suggest(trial, space, models, im)
    trial.set_user_attr("overrides", overrides)
    trial.set_user_attr("params_used", used)
    t0 = time.perf_counter()
    plan = trial_plan(s, method, overrides)
    with s.quiet():
        res = run_job(plan)
    if res["avg"] is None:
        raise ObimError(f"search: a dev score of {method} is missing ({res['scores']}); dev tasks must score")
    scores = {dev["benchmarks"][t]: v for t, v in res["scores"].items()}
    info = {
        "dev_scores": scores,
        "merge_s": res["merge_s"],
        "eval_s": res["eval_s"],
        "cached": bool(res["cached"]["merge"] and res["cached"]["eval"]),
        "wall_s": round(time.perf_counter() - t0, 2),
    }
    for k, v in info.items():
        trial.set_user_attr(k, v)
    from .tracking import log_trial

    with s.quiet():
        log_trial(
            plain(s.cfg.tracking),
            s.out / method / f"trial-{trial.number}",
            f"{method}-trial-{trial.number}",
            study_name(s.experiment, method, s.draw),
            {
                "method": method,
                "trial": trial.number,
                "params": used,
                "overrides": overrides,
                "experiment": s.experiment,
            },
            {
                "dev_avg": res["avg"],
                **{f"dev/{k}": v for k, v in scores.items()},
                "merge_s": res["merge_s"],
                "eval_s": res["eval_s"],
            },
        )
    return res["avg"], {"used": used, **info}


def study_name(experiment: str, method: str, draw: int = 0) -> str:
    """A study's name: one per experiment, method and zoo draw (a study of another draw is never resumed)."""
    return f"{experiment}-{method}" + (f"-seed{draw}" if draw else "")


def run_study(s: Search, method: str) -> Any:
    """The method's study to its budget: the trials left (budget less the finished ones) run one after the other;
    a trial left running by a killed search is marked failed first (one search per study at a time)."""
    import optuna
    from optuna.trial import TrialState

    opts = s.opts
    cfg0 = compose([*s.overrides, f"method={method}"])
    space = shared_settings(check_space(method, plain(cfg0.method).get("search")), plain(cfg0.experiment))
    plan0 = plan_job(cfg0, [f"method={method}"])
    dev = plan_dev(cfg0)
    from obim.merging.methods import get_method

    im = get_method(method).retention_param == "retention"
    storage = s.storage()
    name = study_name(s.experiment, method, s.draw)
    done = (TrialState.COMPLETE, TrialState.PRUNED)
    finished = 0
    if name in optuna.get_all_study_names(storage):
        finished = len(optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False, states=done))
    # The sampler's seed: search.seed for a study's first run; a resumed study's sampler would replay that random
    # stream from its start (drawing again what the first run drew), so it is seeded by (seed, trials finished).
    seed = int(opts["seed"]) if not finished else int(opts["seed"]) * 1_000_003 + finished
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        direction="maximize",
        load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=int(opts["startup_trials"])),
    )
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
        storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    budget = int(opts["trials"])
    if finished:
        s.say(f"[{method}] {finished}/{budget} trials already finished (study {study.study_name})")
    for n in range(finished + 1, budget + 1):
        trial = study.ask()
        try:
            value, info = run_trial(s, method, trial, space, list(plan0.models), im, dev)
        except BaseException:
            study.tell(trial, state=TrialState.FAIL)
            raise
        study.tell(trial, value)
        s.say(_trial_line(method, n, budget, value, info["used"], info))
    return study


def test_best(s: Search, method: str, study: Any) -> dict:
    """The study's best trial on the test benchmarks: the sweep job of its overrides (the sweep's config, pipeline
    and caches) run into <search dir>/<method>/best/, and the record of the study in <search dir>/<method>/best.json."""
    best = study.best_trial
    mine = [o for o in s.overrides if o.split("=", 1)[0].lstrip("+~").split(".")[0] != "search"]  # not the sweep's
    ov = [*mine, f"method={method}", *best.user_attrs["overrides"]]
    keys = {o.split("=", 1)[0].lstrip("+~") for o in mine}
    # where it runs, not what it computes (the plan hash leaves these out): the search's own settings, and its W&B
    # run in the study's group rather than among the sweep's jobs
    run = [f"{k}={v}" for k, v in (("keep_merged", bool(s.cfg.keep_merged)), ("progress", bool(s.cfg.progress)))]
    run += [f"++tracking.group={study_name(s.experiment, method, s.draw)}"]
    run = [o for o in run if o.split("=", 1)[0].lstrip("+") not in keys]
    plan = plan_job(compose([*ov, *run], primary="sweep"), ov)
    with s.quiet():
        res = run_job(plan, record=Record(s.out / method / "best", f"{method}-best"))
    from optuna.trial import TrialState

    rec = {
        "method": method,
        "study": study.study_name,
        "experiment": s.experiment,
        "trials": len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))),
        "best_trial": best.number,
        "params": best.user_attrs["params_used"],
        "overrides": best.user_attrs["overrides"],
        "dev_scores": best.user_attrs["dev_scores"],
        "dev_avg": best.value,
        "test_scores": {plan.benchmarks[t]: v for t, v in res["scores"].items()},
        "test_avg": res["avg"],
        "test_stderr": {plan.benchmarks[t]: v for t, v in res["stderr"].items()},
        "test_avg_stderr": res["avg_stderr"],
        "result": str((s.out / method / "best" / "result.json").resolve()),  # its per-sample records: the marks
        "zoo_seed": s.draw,
        "sampler_seed": int(s.opts["seed"]),
        "budget": int(s.opts["trials"]),
        "startup_trials": int(s.opts["startup_trials"]),
    }
    write_json(s.out / method / "best.json", rec)
    return rec


# ------------------------------------------------------------------------------------------------ entry


def check_search_inputs(cfgs: list[Any], say: Callable[[str], None], fetch: bool = False) -> None:
    """The search's dry run: every input its trials and best jobs read (each method's models and validation sets,
    the test and the dev benchmarks' datasets, the dev tasks' own slices) readable here, each missing one named;
    with fetch, downloaded first (as the sweep's dry_run=fetch)."""
    import datasets

    from .reach import Input, dev_inputs, fetch_all, job_inputs, unreadable

    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity_error()  # its offline notices, once per dataset, would bury the answer
    try:
        found = [i for c in cfgs for objective in ("test", "dev") for i in job_inputs(plan_job(c, objective=objective))]
        inputs: dict[str, Input] = {}
        for inp in [*found, *dev_inputs(plain(cfgs[0].experiment))]:
            inputs.setdefault(inp.describe().split(" [")[0], inp)  # one line per input, whichever reads it first
        if fetch:  # online, a check answers from the hub: what could not be downloaded is what is missing
            fetched, missing = fetch_all(list(inputs.values()))
            say(f"search (dry run): {len(fetched)} inputs fetched")
        else:
            missing = [f"{i.describe()}: {why}" for i in inputs.values() if (why := unreadable(i)) is not None]
    finally:
        datasets.logging.set_verbosity(level)
    if missing:
        raise ObimError(
            f"{len(missing)} input{'s' * (len(missing) != 1)} of this search cannot be read here: {'; '.join(missing)}"
        )
    say(f"search (dry run): all {len(inputs)} inputs readable")


def run_search(overrides: list[str], say: Callable[[str], None] = print) -> dict[str, Any]:
    """The search of experiments/search.py: each method's study to its budget, its best trial on the test
    benchmarks, then the tuned table and the plots. Returns {records, table, files}."""
    import optuna

    from .stages import ensure_zoo

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cfg = compose(overrides)
    opts = plain(cfg.search)
    check_options(opts)
    methods = [opts["methods"]] if isinstance(opts["methods"], str) else list(opts["methods"])
    dev = plan_dev(cfg)  # the objective's checks, before anything runs
    from .evaluation import announce_code_execution, check_code_opt_in, code_allowed

    check_code_opt_in(dev["tasks"], bool(cfg.eval.get("allow_code")))
    spaces, cfgs = {}, []
    for m in methods:  # every method's space and job, before anything runs
        cm = compose([*overrides, f"method={m}"])
        spaces[m] = shared_settings(check_space(m, plain(cm.method).get("search")), plain(cm.experiment))
        plan_job(cm, [f"method={m}"])
        cfgs.append(cm)
    if cfg.dry_run:  # the checks only: what the search would tune on what, nothing loaded
        if cfg.dry_run != "plan":
            check_search_inputs(cfgs, say, fetch=cfg.dry_run == "fetch")
        say(
            f"search (dry run): {cfg.experiment.name}, {len(methods)} methods x {opts['trials']} trials; objective: "
            f"{', '.join(f'{t} ({c})' for t, c in dev['benchmarks'].items())}; left out (no dev data): "
            f"{', '.join(dev['left_out']) or 'none'}"
        )
        for m, sp in spaces.items():
            say(
                f"  {m}: "
                + ", ".join(
                    f"{k} in [{v['low']:g}, {v['high']:g}]{' per model' if v['per_model'] else ''}"
                    for k, v in sp.items()
                )
            )
        return {"dry_run": True, "dev": dev, "spaces": spaces}
    s = Search(overrides=list(overrides), cfg=cfg, out=Path(str(opts["dir"])), say=say)
    plan = plan_job(compose([*overrides, f"method={methods[0]}"]))
    if code_allowed(bool(cfg.eval.get("allow_code"))):  # now, on the console: the evaluations write to search.log
        announce_code_execution([*dev["tasks"], *plan.tasks])
    with s.quiet() if plan.zoo else nullcontext():
        ensure_zoo(plan, bool(cfg.progress))
    say(
        f"search: {len(methods)} methods x {opts['trials']} trials on {', '.join(dev['tasks'])} "
        f"(study file {s.out / 'study.log'})"
    )
    t0 = time.perf_counter()
    records, files = [], []
    results = Path(str(cfg.results_dir)) / s.experiment
    for m in methods:
        study = run_study(s, m)
        rec = test_best(s, m, study)
        records.append(rec)
        say(
            f"[{m}] best trial {rec['best_trial']}: dev avg {rec['dev_avg']:.1f}, test avg "
            f"{'—' if rec['test_avg'] is None else format(rec['test_avg'], '.1f')} | "
            + " ".join(f"{k}={v:g}" for k, v in rec["params"].items())
        )
        files += save_plots(study, results / "search", m)
    columns = list(dict.fromkeys(plan.benchmarks.values()))
    md, csv_text = tuned_table(records, results, columns, dev["left_out"], opts)
    for name, text in (("table1_tuned.md", md), ("table1_tuned.csv", csv_text)):
        atomic_write_file(results / name, lambda tmp, text=text: tmp.write_text(text))
    files = [results / "table1_tuned.md", results / "table1_tuned.csv", *files]
    wall = time.perf_counter() - t0
    write_json(
        s.out / "search.json",
        {"records": records, "wall_s": round(wall, 1), "overrides": list(overrides), "files": [str(f) for f in files]},
    )
    say(md)
    say("written:\n" + "\n".join(f"  {f}" for f in files))
    say(f"search: {len(methods)} studies in {int(wall // 60)}:{int(wall % 60):02d}")
    return {"records": records, "table": md, "files": files, "wall_s": wall}


def load_best(out: Path, method: str) -> dict | None:
    return read_json(Path(out) / method / "best.json")
