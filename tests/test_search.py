"""The search (obim.bench.search, experiments/search.py): its objective on dev data, checked disjoint from the test
benchmarks and the saliency validation samples; the search space declared beside each method's config; a small
study on the quick zoo end to end (study storage, the best trial on the test benchmarks, the tuned table); resume."""

from __future__ import annotations

import os

import pytest
from conftest import compose

from obim.merging.errors import ObimError

# ----------------------------------------------------------------------------------- the objective: dev data


def test_toy_dev_plan_leaves_out_benchmarks_without_dev_data(tmp_path):
    from obim.bench.dev import plan_dev

    d = plan_dev(compose("experiment=toy_sft", f"experiment.zoo={tmp_path}"))
    assert d["benchmarks"] == {
        "toy_mmlu_dev": "mmlu",
        "toy_gsm8k_dev": "gsm8k",
        "toy_math_dev": "math",
        "toy_mbpp_dev": "mbpp",
    }
    assert d["left_out"] == ["alpaca_eval", "humaneval"]  # as in the real setting: no dev data
    assert plan_dev(compose("experiment=toy_pt", f"experiment.zoo={tmp_path}"))["tasks"] == [
        "toy_ceval_dev",
        "toy_mmlu_en_dev",
        "toy_jp_dev",
    ]


def test_dev_refused_when_it_is_the_test_split(tmp_path):
    from obim.bench.dev import plan_dev

    with pytest.raises(
        ObimError,
        match=r"dev_benchmarks.toy_gsm8k_dev: reads split 'test' .*dev and test data "
        r"must be disjoint",
    ):
        plan_dev(compose(f"experiment.zoo={tmp_path}", "experiment.dev_benchmarks.toy_gsm8k_dev.split=test"))
    with pytest.raises(ObimError, match="'toy_gsm8k' is a test benchmark"):
        plan_dev(
            compose(
                f"experiment.zoo={tmp_path}",
                "+experiment.dev_benchmarks.toy_gsm8k={column: gsm8k, source: gsm8k, split: dev}",
            )
        )
    with pytest.raises(ObimError, match=r"split 'validation' .*test benchmark"):  # declared test split
        plan_dev(compose("experiment=qwen2_7b_pt", "experiment.dev_benchmarks.obim_jcqa_dev.split=validation"))


def test_dev_refused_when_it_is_the_saliency_validation_data(tmp_path):
    from obim.bench.dev import plan_dev

    # toy: the saliency sets drawn from the dev split of the same data
    with pytest.raises(
        ObimError,
        match=r"toy_mmlu_dev: reads split 'dev' of 'mmlu', which model 'lm' draws its "
        r"saliency validation samples from .*must be disjoint",
    ):
        plan_dev(compose(f"experiment.zoo={tmp_path}", "validation.split=dev"))
    # Table 4's math model reading mbpp (train) is fine: the dev task reads dev
    plan_dev(compose(f"experiment.zoo={tmp_path}", "validation=code"))
    # real: a train slice past the validation draw, disjoint only while the draw stays within `skip`, same seed
    d = plan_dev(compose("experiment=llama2_13b_sft"))
    assert d["left_out"] == ["alpaca_eval", "humaneval"] and d["eval"]["num_fewshot"] == {"obim_mmlu_dev": 5}
    with pytest.raises(ObimError, match=r"obim_gsm8k_cot_dev: reads split 'train' of 'gsm8k', which model 'math'"):
        plan_dev(compose("experiment=llama2_13b_sft", "experiment.models.math.validation.gsm8k=1001"))
    # the skip the check uses is the one the task draws with (its YAML's dataset_kwargs)
    with pytest.raises(ObimError, match=r"obim_gsm8k_cot_dev.skip: 20, but task .* skip 1000 .*must agree"):
        plan_dev(compose("experiment=llama2_13b_sft", "experiment.dev_benchmarks.obim_gsm8k_cot_dev.skip=20"))
    with pytest.raises(ObimError, match=r"obim_gsm8k_cot_dev: .* seed 1, dev skip 1000"):
        plan_dev(compose("experiment=llama2_13b_sft", "seed=1"))
    # another source key naming the same dataset and split is the same data
    with pytest.raises(ObimError, match="obim_mbpp_dev: reads split 'validation' of 'mbpp', which model 'code'"):
        plan_dev(
            compose(
                "experiment=llama2_13b_sft",
                "+experiment.validation_sources.mbpp_val={builder: mbpp, path: "
                "google-research-datasets/mbpp, name: full, split: validation}",
                "+experiment.models.code.validation.mbpp_val=50",
            )
        )
    # the same data under another name is drawn in another order: a skip proves nothing there
    with pytest.raises(ObimError, match="obim_gsm8k_cot_dev: reads split 'train' of 'gsm8k', which model 'math'"):
        plan_dev(
            compose(
                "experiment=llama2_13b_sft",
                "+experiment.validation_sources.gsm8k_again={builder: gsm8k}",
                "+experiment.models.math.validation.gsm8k_again=10",
            )
        )
    # C-Eval's dev split is the saliency set: declaring it as dev data is refused
    with pytest.raises(ObimError, match="ceval_dev: reads split 'dev' of 'ceval'"):
        plan_dev(
            compose(
                "experiment=qwen2_7b_pt",
                "+experiment.dev_benchmarks.ceval_dev={column: ceval, source: ceval, split: dev}",
            )
        )


def test_toy_dev_tasks_read_no_test_item():
    from obim.bench.tasks.toy_dev.utils import toy_dev_dataset
    from obim.bench.tasks.utils import toy_dataset
    from obim.bench.zoo import data

    for task in ("mmlu", "gsm8k", "math", "mbpp"):
        dev = {r["prompt"] for r in toy_dev_dataset(task)["dev"]}
        test = {r["prompt"] for r in toy_dataset(task)["test"]}
        assert dev and not dev & test
        assert all(data.split_of(p) == "dev" for p in dev)  # and never train, where the saliency sets come from


# ----------------------------------------------------------------------------------------------- the space


def test_every_method_declares_a_search_space_of_its_own_parameters():
    import yaml
    from conftest import REPO

    from obim.bench.search import check_space
    from obim.merging.methods import METHODS

    for name in METHODS:
        conf = yaml.safe_load((REPO / "conf" / "method" / f"{name}.yaml").read_text())
        space = check_space(name, conf.get("search"))
        assert space and set(space) <= {p.name for p in METHODS[name].params}
    # the list: what each method searches
    wanted = {
        "obim": {"retention"},
        "ties_im": {"retention"},
        "ties": {"density"},
        "ties_obm": {"density"},
        "dare": {"drop_rate"},
        "della": {"density", "epsilon", "lambda"},
        "ta": {"lambda"},
        "pcb": {"ratio"},
        "breadcrumbs": {"density", "gamma"},
        "tall_mask": {"tall_lambda"},
    }
    for name, params in wanted.items():
        conf = yaml.safe_load((REPO / "conf" / "method" / f"{name}.yaml").read_text())
        assert set(conf["search"]) == params, name
    assert yaml.safe_load((REPO / "conf" / "method" / "obim.yaml").read_text())["search"]["retention"]["per_model"]


@pytest.mark.parametrize(
    ("method", "space", "message"),
    [
        ("ties", {"drop_rate": {"low": 0.1, "high": 0.5}}, "not a parameter of method 'ties'"),
        ("ties", {"density": {"low": 0.5, "high": 0.1}}, "low < high"),
        ("ties", {"density": {"low": 0.1, "high": 1.5}}, "1.5"),
        ("ties", {"density": {"low": 0.1}}, "expected {low, high"),
        ("ta", {"lambda": {"low": 0.1, "high": 1.0, "per_model": True}}, "not a per-model parameter"),
        ("dare", {"drop_rate": {"low": 0.5, "high": 1.0}}, "1.0"),  # drop_rate < 1
        ("obim", None, "declares no search space"),
    ],
)
def test_bad_search_spaces_refused(method, space, message):
    from obim.bench.search import check_space

    with pytest.raises(ObimError, match=message):
        check_space(method, space)


def test_im_retentions_drawn_over_one_are_scaled_to_sum_one():
    import optuna

    from obim.bench.search import suggest

    space = {"retention": {"low": 0.5, "high": 0.6, "log": False, "per_model": True}}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    overrides, used = suggest(study.ask(), space, ["lm", "math", "code"], im=True)
    assert 0.99 <= sum(used.values()) <= 1.0 and set(used) == {"retention.lm", "retention.math", "retention.code"}
    assert overrides[0].startswith("experiment.models.lm.retention=")
    ov, used = suggest(
        study.ask(),
        {"retention": {"low": 0.4, "high": 0.5, "log": False, "per_model": False}},
        ["lm", "math", "code"],
        im=True,
    )
    assert used == {"retention": 0.3333} and ov == ["retention=0.3333"]
    ov, _ = suggest(study.ask(), {"density": {"low": 0.1, "high": 0.2, "log": False, "per_model": False}}, [], False)
    assert ov[0].startswith("method.parameters.density=")


# ------------------------------------------------------------------------------------------- end to end


def _env(quick_zoo, tmp_path):
    from conftest import sweep_env

    return sweep_env(quick_zoo, tmp_path / "cache")


QUICK = ["experiment.zoo_recipe=quick", "eval.limit=2", "eval.allow_code=true", "search.startup_trials=1"]


def _trials(search_dir, name):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(search_dir / "study.log")))
    return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)


def test_two_trial_search_end_to_end_and_rerun(quick_zoo, tmp_path):
    import json
    import subprocess
    import sys

    from conftest import REPO

    args = [
        *QUICK,
        "search.methods=[ta,obim]",
        "search.trials=2",
        f"search.dir={tmp_path / 'search'}",
        f"results_dir={tmp_path / 'results'}",
    ]

    def run():
        return subprocess.run(
            [sys.executable, str(REPO / "experiments" / "search.py"), *args],
            cwd=tmp_path,
            env=_env(quick_zoo, tmp_path),
            capture_output=True,
            text=True,
            timeout=900,
        )

    first = run()
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("[ta ") == 2 and first.stdout.count("[obim ") == 2
    results = tmp_path / "results" / "toy_sft"
    for method in ("ta", "obim"):
        trials = _trials(tmp_path / "search", f"toy_sft-{method}")
        assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
        assert all(set(t.user_attrs["dev_scores"]) == {"mmlu", "gsm8k", "math", "mbpp"} for t in trials)
        best = json.loads((tmp_path / "search" / method / "best.json").read_text())
        assert best["dev_avg"] == max(t.value for t in trials) and best["trials"] == 2
        assert set(best["test_scores"]) == {"alpaca_eval", "mmlu", "gsm8k", "math", "humaneval", "mbpp"}
        assert (results / "search" / f"{method}_history.png").is_file()
        # a W&B run per trial, grouped by the study
        runs = list((tmp_path / "search" / method).glob("trial-*/wandb/offline-run-*"))
        assert len(runs) == 2
    obim = json.loads((tmp_path / "search" / "obim" / "best.json").read_text())
    assert set(obim["params"]) == {"retention.lm", "retention.math", "retention.code"}
    assert sum(obim["params"].values()) <= 1
    table = (results / "table1_tuned.md").read_text()
    assert "Table 1, every method tuned" in table and "| TA | lambda=" in table and "| OBIM | retention.lm=" in table
    assert "alpaca_eval, humaneval" in table  # left out of the objective, said so
    head = (results / "table1_tuned.csv").read_text().splitlines()[0].split(",")
    cols = ["alpaca_eval", "mmlu", "gsm8k", "math", "humaneval", "mbpp", "avg"]
    assert head[:12] == ["method", "best parameters", "dev avg", *cols, "untuned avg", "trials"]
    # each test score's standard error; the best trials' items compared (every column both methods have)
    assert head[12:19] == [f"{c}_se" for c in cols] and head[19:] == [f"{c}_top" for c in cols]
    assert "paired bootstrap" in table
    for method in ("ta", "obim"):
        best = json.loads((tmp_path / "search" / method / "best.json").read_text())
        se = best["test_avg_stderr"]
        assert f"{best['test_avg']:.2f} ± {se:.2f}" in table

    # the best trial ran as the sweep job of its overrides: the sweep itself, asked for that job, computes the same
    from conftest import run_sweep

    best = json.loads((tmp_path / "search" / "ta" / "best.json").read_text())
    # the sweep writes its merge (keep_merged=true) where the search merged in place: computed again, by the disk path
    sweep_args = [a for a in args if not a.startswith("search.")]
    sweep_args += ["method=ta", "keep_merged=true", *best["overrides"]]
    swept = run_sweep([*sweep_args, f"hydra.sweep.dir={tmp_path / 'runs'}"], _env(quick_zoo, tmp_path), tmp_path)
    assert swept.returncode == 0, swept.stderr[-3000:]
    ((job_result,),) = [list((tmp_path / "runs").glob("*/result.json"))]
    by_sweep = json.loads(job_result.read_text())
    by_search = json.loads((tmp_path / "search" / "ta" / "best" / "result.json").read_text())
    computed = ("schema", "config_hash", "inputs", "scores", "avg", "saliency_s", "cost")
    assert {k: by_sweep[k] for k in computed} == {k: by_search[k] for k in computed}
    # the same plan; its recorded overrides differ by the sweep's keep_merged=true alone (a runtime option)
    plans = [{k: v for k, v in r["plan"].items() if k != "overrides"} for r in (by_sweep, by_search)]
    assert plans[0] == plans[1]
    extra = set(by_sweep["plan"]["overrides"]) ^ set(by_search["plan"]["overrides"])
    assert {o.split("=")[0] for o in extra} <= {"keep_merged"}
    assert by_sweep["individual"] == by_search["individual"]
    # the search kept no merged model (keep_merged: false): the sweep merged and evaluated again, to the same scores
    assert by_sweep["cached"] == {"saliency": None, "merge": False, "eval": False} and by_sweep["merged_dir"]
    # where they ran differs (the search keeps no merged model, logs in its study's group): never what they computed
    runtime = ("keep_merged", "progress", "tracking")
    assert {k: v for k, v in by_sweep["config"].items() if k not in runtime} == {
        k: v for k, v in by_search["config"].items() if k not in runtime
    }
    assert by_search["merged_dir"] is None and by_search["config"]["tracking"]["group"] == "toy_sft-ta"
    # and the sweep's tables leave the search's record out, though it lies under the sweep's directory by default
    from obim.bench.report.results import load_results

    assert [r.path for r in load_results(tmp_path)] == [job_result]
    columns = by_sweep["plan"]["benchmarks"]
    assert best["test_scores"] == {columns[t]: v for t, v in by_sweep["scores"].items()}

    # a rerun repeats no finished trial: the studies are complete, the best trials' scores come from the caches
    again = run()
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[ta] 2/2 trials already finished" in again.stdout and "[ta 1/2]" not in again.stdout
    assert len(_trials(tmp_path / "search", "toy_sft-ta")) == 2
    assert (results / "table1_tuned.md").read_text() == table


def test_search_resumes_after_a_failed_trial(quick_zoo, tmp_path, monkeypatch):
    from obim.bench.search import run_search

    for k, v in _env(quick_zoo, tmp_path).items():
        monkeypatch.setenv(k, v)
    args = [
        *QUICK,
        "search.methods=[ties]",
        "search.trials=3",
        "tracking=none",
        f"search.dir={tmp_path / 'search'}",
        f"results_dir={tmp_path / 'results'}",
    ]
    lines: list[str] = []
    from obim.bench import search

    run_job, trials_run = search.run_job, []

    def second_trial_fails(plan, reporter=None, record=None):  # after its dev evaluation
        out = run_job(plan, reporter, record)
        if plan.objective == "dev":
            trials_run.append(plan)
        if len(trials_run) == 2:
            raise RuntimeError("simulated failure after trial-1")
        return out

    monkeypatch.setattr(search, "run_job", second_trial_fails)
    with pytest.raises(RuntimeError, match="simulated failure after trial-1"):
        run_search(args, say=lines.append)
    trials = _trials(tmp_path / "search", "toy_sft-ties")
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL"]
    first = trials[0]
    assert not (tmp_path / "results" / "toy_sft" / "table1_tuned.md").exists()

    # and a trial left running by a killed search (as SIGKILL leaves it in the study file)
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.load_study(
        study_name="toy_sft-ties", storage=JournalStorage(JournalFileBackend(str(tmp_path / "search" / "study.log")))
    ).ask()
    monkeypatch.setattr(search, "run_job", run_job)
    lines.clear()
    out = run_search(args, say=lines.append)
    assert "[ties] 1/3 trials already finished (study toy_sft-ties)" in lines
    assert sum(line.startswith("[ties ") for line in lines) == 2  # trials 2 and 3 only
    trials = _trials(tmp_path / "search", "toy_sft-ties")
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "FAIL", "COMPLETE", "COMPLETE"]
    assert trials[0].params == first.params and trials[0].datetime_complete == first.datetime_complete
    assert out["records"][0]["trials"] == 3
    assert (tmp_path / "results" / "toy_sft" / "table1_tuned.csv").is_file()


def test_search_dry_run_on_the_real_experiments():
    from obim.bench.search import run_search

    lines: list[str] = []
    # dry_run=plan: the checks of the plan only (dry_run=true also checks the inputs are readable here: they are not)
    out = run_search(["experiment=llama2_13b_sft", "dry_run=plan", "eval.allow_code=true"], say=lines.append)
    assert out["dev"]["tasks"] == ["obim_mmlu_dev", "obim_gsm8k_cot_dev", "obim_math_cot_dev", "obim_mbpp_dev"]
    assert "left out (no dev data): alpaca_eval, humaneval" in lines[0]
    assert "  obim: retention in [0.05, 0.6] per model" in lines
    lines.clear()
    out = run_search(["experiment=qwen2_7b_pt", "dry_run=plan", "search.methods=[obim,ties]"], say=lines.append)
    assert out["dev"]["left_out"] == ["ceval"]
    assert "  obim: retention in [0.05, 0.6]" in lines  # one for every checkpoint, as the study draws it
    with pytest.raises(ObimError, match="obim_mbpp_dev executes model-generated code"):  # the dev tasks' opt-in too
        run_search(
            [
                "experiment=llama2_13b_sft",
                "dry_run=plan",
                "~experiment.benchmarks.obim_humaneval",
                "~experiment.benchmarks.obim_mbpp",
                "+experiment.benchmarks.no_code_here=mbpp",
            ],
            say=lines.append,
        )
    with pytest.raises(ObimError, match=r"search\.methods"):
        run_search(["dry_run=plan", "search.methods=[nope]"], say=lines.append)


def test_checkpoint_experiments_search_one_retention():
    """qwen2_7b_pt names `checkpoints` with one shared `checkpoint` setting: no experiment.models.<name>.retention
    exists to set (the rehearsal's search of it failed on that override). Its retention is searched as one value,
    capped for IM at 1/n, and the trial's overrides compose; an experiment of `models` keeps one per model."""
    import optuna

    from obim.bench.plan import plain
    from obim.bench.search import check_space, compose, shared_settings, suggest

    cfg = compose(["experiment=qwen2_7b_pt", "method=obim"])
    space = shared_settings(check_space("obim", plain(cfg.method)["search"]), plain(cfg.experiment))
    assert space["retention"]["per_model"] is False
    ov, used = suggest(optuna.trial.FixedTrial({"retention": 0.5}), space, ["ckpt-1", "ckpt-2", "ckpt-3"], im=True)
    assert ov == ["retention=0.3333"] and used == {"retention": 0.3333}
    assert compose(["experiment=qwen2_7b_pt", "method=obim", *ov]).retention == 0.3333
    sft = compose(["experiment=llama2_13b_sft", "method=obim"])
    kept = shared_settings(check_space("obim", plain(sft.method)["search"]), plain(sft.experiment))
    assert kept["retention"]["per_model"] is True


@pytest.mark.slow
def test_search_dry_run_checks_every_methods_inputs_and_the_dev_slices(tmp_path):
    """The search's dry run names what its trials read and cannot be read here: OBIM's validation sets (TA, the
    first method, has none), the dev tasks' datasets, the test benchmarks' datasets, each once; non-zero exit.
    Run offline against an empty HF_HOME (the developer's own cache must not answer)."""
    import subprocess
    import sys

    from conftest import REPO

    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.update(HF_ALLOW_CODE_EVAL="1", WANDB_MODE="offline")
    for k in ("HF_HUB_CACHE", "HF_DATASETS_CACHE"):
        env.pop(k, None)
    argv = ["experiment=llama2_13b_sft", "search.methods=[ta,obim]", "dry_run=true", f"search.dir={tmp_path}/s"]
    proc = subprocess.run(
        [sys.executable, str(REPO / "experiments" / "search.py"), *argv],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    err = proc.stderr + proc.stdout
    assert "inputs of this search cannot be read here" in err
    lines = err.split("; ")
    for expected in (
        "dataset openai/gsm8k (main) split train [validation source gsm8k of math]",  # OBIM's saliency set
        "dataset cais/mmlu (all) split validation [task obim_mmlu_dev]",  # a dev task's split
        "dataset openai/gsm8k (main) split test [task obim_gsm8k_cot]",  # a test benchmark's
        "model layoric/llama-2-13b-code-alpaca [model code]",
    ):
        assert sum(line.split(": ", 1)[-1].startswith(expected) or line.startswith(expected) for line in lines) == 1
