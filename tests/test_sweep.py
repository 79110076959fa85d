"""The sweep end to end on the reduced toy zoo (Hydra multirun in a subprocess, as a user runs it), resume after a
failure, job planning from composed configs, and every method config against the registry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import compose, run_sweep, sweep_env

from obim.merging.errors import ObimError

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
TASKS = ["toy_alpaca", "toy_mmlu", "toy_gsm8k", "toy_math", "toy_humaneval", "toy_mbpp"]
# result.json's keys (docs/sweep.md "Sweep results")
RESULT_KEYS = {
    "schema",
    "config_hash",
    "job",
    "obim_version",
    "config",
    "plan",
    "inputs",
    "scores",
    "avg",
    "stderr",
    "n",
    "avg_stderr",
    "samples",
    "zoo",
    "outputs",
    "individual",
    "saliency_s",
    "merge_s",
    "eval_s",
    "saliency",
    "cost",
    "peak_rss_mb",
    "peak_gpu_mb",
    "device",
    "cached",
    "merged_dir",
    "wandb_dir",
}


# ------------------------------------------------------------------------------------------------ planning


def test_every_method_config_is_valid_for_its_registered_method(tmp_path):
    import yaml

    from obim.bench.plan import plan_job
    from obim.merging.methods import METHODS

    assert {p.stem for p in (CONF / "method").glob("*.yaml")} == set(METHODS)
    for name, method in METHODS.items():
        conf = yaml.safe_load((CONF / "method" / f"{name}.yaml").read_text())
        # the registry's defaults, retention excepted (it comes from the experiment), and DARE paired with the
        # disjoint mean as in the paper's Table 7
        expected = {p.name: p.default for p in method.params if p.name != "retention"}
        if name == "dare":
            expected["combine"] = "ties"
        assert conf["name"] == name and conf["parameters"] == expected
        ov = [f"method={name}"] + ([f"n_models={method.max_models}"] if method.max_models else [])  # slerp: 2
        plan = plan_job(compose(*ov, f"experiment.zoo={tmp_path}"), ov)
        assert plan.method == name and plan.main == (not method.max_models) and plan.merge["parameters"] == expected


def test_plan_orders_validation_and_model_count(tmp_path):
    from obim.bench.plan import plan_job

    zoo = f"experiment.zoo={tmp_path}"
    p = plan_job(compose("method=obim", zoo))
    assert p.merge["order"] == ["lm", "math", "code"]  # the experiment's: code last
    assert [m["retention"] for m in p.merge["models"]] == [0.4, 0.45, 0.1]
    assert p.validation["lm"].sources == {"alpaca": 50, "mmlu": 50}
    assert p.validation["math"].data["gsm8k"] == {
        "builder": "jsonl",
        "path": f"{tmp_path}/data/gsm8k/train.jsonl",
        "split": "train",
    }

    assert plan_job(compose("method=obim", zoo, "order=first", "order.model=math")).merge["order"] == [
        "math",
        "lm",
        "code",
    ]
    assert plan_job(compose("method=obim", zoo, "order=last", "order.model=math")).merge["order"] == [
        "lm",
        "code",
        "math",
    ]
    assert plan_job(compose("method=obim", zoo, "order=rotation")).merge["order"] == "rotation"

    # Table 4/5: the math model's source and size change, split evenly; the others keep their own
    p = plan_job(compose("method=obim", zoo, "validation=math_code", "validation.size=101"))
    assert p.validation["math"].sources == {"gsm8k": 34, "math": 34, "mbpp": 33}
    assert p.validation["lm"].sources == {"alpaca": 50, "mmlu": 50}
    assert plan_job(compose("method=obim", zoo, "validation.size=10")).validation["code"].sources == {"mbpp": 10}

    # one retention for all; the first N models; methods without saliency need no validation sets
    p = plan_job(compose("method=ties_im", zoo, "retention=0.3", "n_models=2"), ["method=ties_im", "n_models=2"])
    assert list(p.models) == ["lm", "math"] and [m["retention"] for m in p.merge["models"]] == [0.3, 0.3]
    assert not p.main
    assert plan_job(compose("method=ties", zoo)).validation == {}
    pt = plan_job(compose("experiment=toy_pt", "method=dare", f"experiment.zoo={tmp_path}"))
    assert list(pt.models) == ["ckpt-1", "ckpt-2", "ckpt-3"] and pt.merge["order"] == "rotation"


def test_a_zoo_seed_is_another_zoo_and_another_job(tmp_path, monkeypatch):
    from obim.bench.plan import axis_of, plan_job
    from obim.bench.stages import _zoo_recipe
    from obim.bench.zoo import recipe_hash

    monkeypatch.setenv("OBIM_ZOO", str(tmp_path / "zoo"))
    first = plan_job(compose("method=obim"))
    other = plan_job(compose("method=obim", "experiment.zoo_seed=2"), ["method=obim", "experiment.zoo_seed=2"])
    assert (first.zoo, first.zoo_seed) == (str(tmp_path / "zoo"), 0)
    assert (other.zoo, other.zoo_seed) == (str(tmp_path / "zoo-seed2"), 2)
    assert other.merge["base_model"] == str(tmp_path / "zoo-seed2" / "sft" / "base")
    assert other.hash() != first.hash() and other.main  # a draw is a replicate of the main setting
    r0, r2 = _zoo_recipe(first), _zoo_recipe(other)
    assert (r0["seed"], r2["seed"]) == (0, 2) and recipe_hash(r0) != recipe_hash(r2)
    assert {k: v for k, v in r0.items() if k != "seed"} == {k: v for k, v in r2.items() if k != "seed"}
    assert axis_of("experiment.zoo_seed=2") == "zoo_seed"
    with pytest.raises(ObimError, match=r"experiment\.zoo_seed") as e:
        plan_job(compose("method=ta", "experiment.zoo_seed=-1"))
    assert "\n" not in str(e.value)


def test_zoo_draws_have_their_own_streams():
    from obim.bench.zoo import _seed

    stages = ["sft/base", "sft/anneal", "sft/lm", "sft/math", "sft/code", "pt/base", "pt/continued"]
    seeds = [_seed(k, s) for k in range(4) for s in stages]
    assert len(set(seeds)) == len(seeds)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method=obim", "retention=0.5"], "sum"),
        (["method=obim", "order=last", "order.model=vision"], "order.model"),
        (["method=obim", "n_models=7"], "n_models"),
        (["method=obim", "validation.split=test"], "validation.split"),
        (["method=ties", "+method.parameters.densty=0.3"], "densty"),
        (["method=ties", "+method.per_model.vision.density=0.1"], "method.per_model"),
    ],
)
def test_bad_options_are_one_line_errors(tmp_path, overrides, message):
    from obim.bench.plan import plan_job

    with pytest.raises(ObimError) as e:
        plan_job(compose(*overrides, f"experiment.zoo={tmp_path}"))
    assert message in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------ end to end


def test_sweep_writes_results_wandb_runs_and_tables_and_resumes(quick_zoo, tmp_path):
    env = sweep_env(quick_zoo, tmp_path / "cache")
    args = [
        "method=ta,obim",
        "experiment.zoo_recipe=quick",
        "eval.limit=2",
        "progress=false",
        "eval.allow_code=true",
        f"hydra.sweep.dir={tmp_path / 'runs'}",
        f"results_dir={tmp_path / 'results'}",
    ]
    first = run_sweep(args, env, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    results = {}
    for method in ("ta", "obim"):
        (job,) = (tmp_path / "runs").glob(f"*method={method}")  # the job's overrides name its directory
        r = json.loads((job / "result.json").read_text())
        results[method] = r
        assert set(r["scores"]) == set(TASKS) and all(0 <= v <= 100 for v in r["scores"].values())
        assert r["avg"] == pytest.approx(sum(r["scores"].values()) / len(TASKS))

        # each score with its standard error: every toy item scores 0 or 1, so lm-eval's mean_stderr is the
        # binomial sqrt(p (1 - p) / (n - 1)) over the items evaluated (eval.limit of them)
        def binomial_stderr(score: float, n: int) -> float:
            p = score / 100
            return 100 * (p * (1 - p) / (n - 1)) ** 0.5

        assert set(r["stderr"]) == set(r["n"]) == set(TASKS) and set(r["n"].values()) == {2}
        for t in TASKS:
            assert r["stderr"][t] == pytest.approx(binomial_stderr(r["scores"][t], 2), abs=1e-6), t
        se = [r["stderr"][t] for t in TASKS]
        assert r["avg_stderr"] == pytest.approx(sum(x * x for x in se) ** 0.5 / len(TASKS))
        assert set(r["individual"]["math"]["stderr"]) == set(TASKS)
        assert set(r["individual"]) == {"base", "lm", "math", "code"}
        # lm-eval's per-sample records, copied into the job folder: the score is their metric's mean
        assert set(r["samples"]) == {"merged", "base", "lm", "math", "code"}
        for model, by_task in r["samples"].items():
            assert set(by_task) == set(TASKS)
            for t, leaves in by_task.items():
                ((leaf, e),) = leaves.items()
                assert leaf == t and e["file"] == f"samples/{model}/{t}.jsonl"
                recs = [json.loads(x) for x in (job / e["file"]).read_text().splitlines()]
                name = e["metric"].split(",")[0]
                assert [x["doc_id"] for x in recs] == [0, 1]
                score = r["scores"][t] if model == "merged" else r["individual"][model]["scores"][t]
                assert 100 * sum(x[name] for x in recs) / 2 == pytest.approx(score)
        # each figure in one place, and what the stages measured: a first run computes everything
        assert r["schema"] == 4 and r["plan"]["method"] == method and r["config"]["method"]["name"] == method
        assert set(r) == RESULT_KEYS
        assert r["cached"] == {"saliency": False if method == "obim" else None, "merge": False, "eval": False}
        assert r["merge_s"] > 0 and r["eval_s"] > 0 and r["peak_rss_mb"] > 100  # torch alone holds more
        assert r["saliency_s"] == pytest.approx(sum(s["seconds"] for s in r["saliency"].values()), abs=1e-3)
        samples = sum(s["samples"] for s in r["saliency"].values())
        assert samples == sum(sum(v["sources"].values()) for v in r["plan"]["validation"].values())
        if samples:
            assert r["cost"]["hessian_s_per_sample"] == pytest.approx(r["saliency_s"] / samples, rel=1e-3)
        assert r["inputs"].keys() == {"base", "lm", "math", "code"}
        runs = list((job / "wandb").glob("offline-run-*"))
        assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert results["obim"]["saliency_s"] > 0 and results["ta"]["saliency_s"] == 0
    # merged in place: streamed into the evaluator's weights, never written (keep_merged=false)
    assert not (tmp_path / "cache" / "merges").exists() and results["ta"]["merged_dir"] is None
    table = (tmp_path / "results" / "toy_sft" / "table1.md").read_text()
    assert "| TA |" in table and "| OBIM |" in table and "(45.23)" in table  # the paper's OBIM avg beside ours
    assert "Bold: in each column, the best" in table  # the rows were compared item by item
    cmp = subprocess.run(
        [sys.executable, str(REPO / "experiments" / "compare.py"), str(tmp_path / "runs"), "obim", "ta"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert cmp.returncode == 0, cmp.stderr
    assert "A = OBIM" in cmp.stdout and "B = TA" in cmp.stdout
    assert sum(line.split()[:1] in [[t] for t in [*TASKS, "avg"]] for line in cmp.stdout.splitlines()) == len(TASKS) + 1

    # a result.json of an older layout is redone (from the caches), never half-read
    (obim_job,) = (tmp_path / "runs").glob("*method=obim")
    old = {**results["obim"], "schema": 1}
    (obim_job / "result.json").write_text(json.dumps(old))
    again = run_sweep(args, env, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("; cached result") == 1  # ta from its result.json; obim redone
    redone = json.loads((obim_job / "result.json").read_text())
    assert redone["schema"] == 4 and redone["cached"] == {"saliency": True, "merge": True, "eval": True}
    assert redone["scores"] == results["obim"]["scores"]

    # new weights at the same path (a retrained expert, a zoo rebuilt by a new recipe): no job reuses its result
    w = quick_zoo / "sft" / "math" / "model.safetensors"
    st = w.stat()
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        changed = run_sweep(args, env, tmp_path)
    finally:
        os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert changed.returncode == 0, changed.stderr[-3000:]
    assert changed.stdout.count("; cached result") == 0
    inputs = json.loads(next((tmp_path / "runs").glob("*method=ta")).joinpath("result.json").read_text())["inputs"]
    assert set(inputs) == {"base", "lm", "math", "code"} and inputs["math"] != results["ta"]["inputs"]["math"]

    # a job that fails after its merge leaves no result.json; the rerun redoes it (reusing the cached merge: a kept
    # merge is written, the others are merged in place by their evaluation)
    args3 = [a if not a.startswith("method=") else "method=ties" for a in args] + ["keep_merged=true"]
    failed = run_sweep(args3, env, tmp_path, fail_after_merge=True)
    assert failed.returncode != 0 and "simulated failure" in failed.stderr
    (ties_dir,) = (tmp_path / "runs").glob("*method=ties")
    assert not (ties_dir / "result.json").exists()
    redo = run_sweep(args3, env, tmp_path)
    r = json.loads((ties_dir / "result.json").read_text())
    assert r["cached"]["merge"] is True and set(r["scores"]) == set(TASKS)
    # ties ran on the restored math model, ta and obim on the "retrained" one: the tables refuse to mix them
    assert redo.returncode == 1
    assert "jobs of different inputs: model 'math' of toy_sft" in redo.stderr and "method=ties" in redo.stderr
    same = run_sweep(args, env, tmp_path)  # ta and obim again on the restored model: from the caches
    assert same.returncode == 0, same.stderr[-3000:]
    assert same.stdout.count("; cached result") == 0
    assert "| TIES |" in (tmp_path / "results" / "toy_sft" / "table1.md").read_text()


@pytest.mark.slow
def test_dry_run_plans_without_loading(tmp_path):
    env = {
        **os.environ,
        "OBIM_ZOO": str(tmp_path / "no-zoo"),
        "OBIM_CACHE": str(tmp_path / "cache"),
        "PYTHONPATH": str(REPO),
    }
    out = run_sweep(["dry_run=true", "eval.allow_code=true", f"hydra.sweep.dir={tmp_path / 'runs'}"], env, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    plans = sorted((tmp_path / "runs").glob("*/plan.json"))
    methods = {json.loads(p.read_text())["method"] for p in plans}
    assert methods == {"ta", "ties", "dare", "della", "tall_mask", "pcb", "obim", "ties_obm", "ties_im"}
    assert not (tmp_path / "no-zoo").exists() and not (tmp_path / "cache").exists()


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["submitit_local", "local_parallel"])
def test_launchers_run_jobs_in_their_own_processes(tmp_path, launcher):
    """The cluster path (hydra/launcher=slurm uses the same submitit plugin, tried with submitit_local) and the
    parallel local one (joblib)."""
    env = {
        **os.environ,
        "OBIM_ZOO": str(tmp_path / "no-zoo"),
        "OBIM_CACHE": str(tmp_path / "cache"),
        "PYTHONPATH": str(REPO),
    }
    extra = ["hydra.launcher.timeout_min=5"] if launcher == "submitit_local" else []
    out = run_sweep(
        [
            "dry_run=true",
            "eval.allow_code=true",
            "method=ta,obim",
            f"hydra/launcher={launcher}",
            *extra,
            f"hydra.sweep.dir={tmp_path / 'runs'}",
        ],
        env,
        tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    plans = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*/plan.json")}
    assert set(plans) == {"method=ta", "method=obim"}
    assert plans["method=obim"]["validation"]["math"]["sources"] == {"gsm8k": 50, "math": 50}
    if launcher == "submitit_local":
        assert list((tmp_path / "runs" / ".submitit").rglob("*_log.out"))  # submitit ran each job as a process


# ------------------------------------------------------------------------------------------------ cache keys


def test_a_method_version_invalidates_that_method_only(tmp_path, monkeypatch):
    """Bumping the version TIES's sparsifier declares changes the plan hash (a rerun redoes the job) and the merge
    cache key of every method built on it, and of nothing else."""
    from obim.bench.plan import plan_job
    from obim.bench.stages import merge_key
    from obim.merging.sparsifiers import TopK

    zoo = f"experiment.zoo={tmp_path}"
    methods = ("ta", "ties", "dare", "ties_obm", "obim")

    def keys() -> dict[str, tuple[str, str]]:
        out = {}
        for m in methods:
            p = plan_job(compose(f"method={m}", zoo))
            out[m] = (p.hash(), merge_key(p.with_statistics({n: f"{n}.hdiag" for n in p.validation})))
        return out

    before = keys()
    monkeypatch.setattr(TopK, "version", TopK.version + 1)
    after = keys()
    changed = {m for m in methods if after[m][0] != before[m][0]}
    assert changed == {m for m in methods if after[m][1] != before[m][1]}
    assert changed == {"ties", "ties_obm"}  # the two methods that select with TopK
    monkeypatch.setattr(TopK, "version", TopK.version - 1)
    assert keys() == before


@pytest.mark.parametrize("method", ["obim", "ties", "dare"])
def test_a_plan_round_trips_through_its_serialisation(tmp_path, method):
    """JobPlan.to_json is its one serialisation (result.json's `plan`): read back, the same plan and the same hash."""
    import json

    from obim.bench.plan import JobPlan, plan_job

    ov = [f"method={method}", "validation.size=20", "order=rotation"]
    p = plan_job(compose(*ov, f"experiment.zoo={tmp_path}"), ov)
    q = JobPlan.from_json(json.loads(json.dumps(p.to_json())))
    assert q == p and q.hash() == p.hash() and q.to_json() == p.to_json()
    assert q.merge_config.to_dict() == p.merge_config.to_dict()
    ov[1] = "validation.size=21"
    other = plan_job(compose(*ov, f"experiment.zoo={tmp_path}"), ov)
    assert (other.hash() != p.hash()) == (method == "obim")  # only a saliency method's job reads validation data
