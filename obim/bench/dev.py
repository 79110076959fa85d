"""The search's objective (obim.bench.search): an experiment's `dev_benchmarks` planned and checked like a job's
plan (obim.bench.plan), disjoint from the test benchmarks and from every model's saliency validation samples."""

from __future__ import annotations

from typing import Any

from obim.merging.errors import ObimError

from .evaluation import task_dataset_kwargs
from .experiment import benchmarks_of, check_experiment, experiment_models, plain, validation_set

DEV_KEYS = ("column", "source", "split", "test_split", "skip", "seed", "num_fewshot")


def _dev_data(exp: dict, source: str, split: str) -> tuple[str, str, Any]:
    """(builder, dataset, config name) of a source named in dev_benchmarks: a validation source's dataset, or the
    toy data (experiment.validation_data) by its source name."""
    from .validation import BUILDERS

    spec = (exp.get("validation_sources") or {}).get(source)
    if spec is None:
        if not exp.get("validation_data"):
            raise ObimError(
                f"experiment.dev_benchmarks: source '{source}' is not one of "
                f"experiment.validation_sources ({', '.join(exp.get('validation_sources') or {})})"
            )
        return "jsonl", exp["validation_data"].replace("{source}", source), None
    kind = spec.get("builder", source)
    if kind not in BUILDERS:
        raise ObimError(f"experiment.validation_sources.{source}.builder: unknown builder {kind!r}")
    d = {**BUILDERS[kind].defaults, **{k: v for k, v in spec.items() if v is not None}}
    return kind, str(d.get("path")), d.get("name")


def plan_dev(cfg: Any) -> dict[str, Any]:
    """The search's objective (obim.bench.search): the experiment's `dev_benchmarks`, lm-eval tasks on dev data,
    checked before anything runs: each reads a split other than the one its test benchmark evaluates, and no dev
    sample is a saliency validation sample of any model (the same source and split is refused unless the dev task
    skips the first `skip` records of the validation draw's permutation, `skip` >= the samples drawn, same seed).
    Returns {tasks, benchmarks: {task: column}, eval (with the dev tasks' shots), left_out: test columns without
    dev data}."""
    c = plain(cfg)
    exp = c["experiment"]
    check_experiment(exp)
    decl = exp.get("dev_benchmarks")
    if not decl:
        raise ObimError(f"experiment {exp['name']}: no dev_benchmarks: a search needs dev tasks (its objective)")
    columns, _ = benchmarks_of(exp)
    test_columns = set(columns.values())
    dev: dict[str, dict] = {}
    for task, spec in decl.items():
        where = f"experiment.dev_benchmarks.{task}"
        if (
            not isinstance(spec, dict)
            or set(spec) - set(DEV_KEYS)
            or not all(spec.get(k) for k in ("column", "source", "split"))
        ):
            raise ObimError(
                f"{where}: expected {{column, source, split[, test_split, skip, seed, num_fewshot]}}, got {spec!r}"
            )
        if task in columns:
            raise ObimError(f"{where}: '{task}' is a test benchmark of the experiment; dev tasks read dev data")
        if spec["column"] not in test_columns:
            raise ObimError(
                f"{where}.column: '{spec['column']}' is not a column of the experiment's benchmarks "
                f"({', '.join(sorted(test_columns))})"
            )
        test_split = spec.get("test_split") or "test"
        if spec["split"] == test_split:
            raise ObimError(
                f"{where}: reads split '{spec['split']}' of '{spec['source']}', the split its test "
                f"benchmark ({spec['column']}) evaluates: dev and test data must be disjoint"
            )
        declared = task_dataset_kwargs(task) or {}
        for key in ("skip", "seed"):  # the task draws its slice with these: the check below must use the same
            if key in declared and spec.get(key) != declared[key]:
                raise ObimError(
                    f"{where}.{key}: {spec.get(key)!r}, but task {task} draws its data with {key} {declared[key]!r} "
                    "(dataset_kwargs of its YAML): they must agree"
                )
        dev[task] = {**spec, "data": _dev_data(exp, str(spec["source"]), str(spec["split"]))}

    # dev vs the saliency validation samples of every model (whichever method: a search covers them all)
    exp_models = experiment_models(exp)
    for name, m in exp_models.items():
        v = validation_set(c, {**exp, "models": exp_models}, name, m)
        for s, n in v["sources"].items():
            vd = v["data"][s]
            vkey = (
                vd["builder"],
                vd["path"].replace(f"/{vd['split']}.", "/{split}.") if vd["builder"] == "jsonl" else vd["path"],
                vd.get("name"),
            )
            for task, spec in dev.items():
                b, path, dname = spec["data"]
                same = s == spec["source"] or (b != "jsonl" and (b, path, dname) == vkey)
                if not same or vd["split"] != spec["split"]:
                    continue
                skip, seed = spec.get("skip"), spec.get("seed", 0)
                # the dev task starts past every record the validation draw can take: the same permutation (it is
                # keyed by the source's name and the seed), and skip >= the samples drawn
                if (
                    vd["builder"] != "jsonl"
                    and skip is not None
                    and s == spec["source"]
                    and int(skip) >= n
                    and int(seed) == v["seed"]
                ):
                    continue
                raise ObimError(
                    f"experiment.dev_benchmarks.{task}: reads split '{spec['split']}' of "
                    f"'{spec['source']}', which model '{name}' draws its saliency validation samples "
                    f"from ({n} samples{', seed ' + str(v['seed']) if vd['builder'] != 'jsonl' else ''}"
                    f"{', dev skip ' + str(skip) if skip is not None else ''}): dev and validation "
                    "samples must be disjoint"
                )
    ev = c["eval"]
    evp = {k: ev[k] for k in ("backend", "batch_size", "limit", "model_args")}
    shots = {t: int(s["num_fewshot"]) for t, s in dev.items() if s.get("num_fewshot") is not None}
    if shots:
        evp["num_fewshot"] = shots
    dev_columns = {s["column"] for s in dev.values()}
    return {
        "tasks": list(dev),
        "benchmarks": {t: str(s["column"]) for t, s in dev.items()},
        "eval": evp,
        "left_out": [col for col in columns.values() if col not in dev_columns],
    }
