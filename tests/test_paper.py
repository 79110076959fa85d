"""Paper-scale experiments, offline: every preset's dry-run plan, the validation-set builders on local datasets shaped
like the hub's (field names, configs and splits), the custom GSM8K/MATH scorers, AlpacaEval's judge hand-off and
group scores."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
from conftest import run_sweep

from obim.merging.errors import ObimError

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ presets


def dry_run(tmp_path: Path, *overrides: str, mode: str = "plan") -> dict[str, dict]:
    """Run the sweep with dry_run=<mode> as a user would; {job dir name: plan.json}. The real presets' models and
    datasets are not here: `plan` plans without checking that the inputs are readable (tests/test_reach.py)."""
    out = tmp_path / "runs"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "OBIM_ZOO": str(tmp_path / "zoo"),
        "OBIM_CACHE": str(tmp_path / "cache"),
    }
    proc = run_sweep(
        [*overrides, f"dry_run={mode}", "eval.allow_code=true", f"hydra.sweep.dir={out}", "progress=false"], env, ROOT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    plans = {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/plan.json")}
    assert not (tmp_path / "zoo").exists() and not (tmp_path / "cache").exists()  # nothing built or loaded
    return plans


SFT_TASKS = ["obim_alpaca_eval", "mmlu", "obim_gsm8k_cot", "obim_math_cot", "obim_humaneval", "obim_mbpp"]
PT_TASKS = ["ceval-valid", "mmlu", "japanese_leaderboard"]
BASELINES = {"ta", "ties", "dare", "della", "tall_mask", "pcb", "breadcrumbs", "obim"}


@pytest.mark.slow
def test_preset_table1_and_3_real(tmp_path):
    plans = dry_run(tmp_path, "+paper=table1")
    assert {p["method"] for p in plans.values()} == BASELINES and len(plans) == 8
    p = plans["method=obim"]
    assert p["experiment"] == "llama2_13b_sft" and p["main"]
    assert p["merge"]["base_model"] == "meta-llama/Llama-2-13b-hf"
    assert [(m["name"], m["path"], m["retention"]) for m in p["merge"]["models"]] == [
        ("lm", "WizardLMTeam/WizardLM-13B-V1.2", 0.4),
        ("math", "WizardLMTeam/WizardMath-13B-V1.0", 0.45),
        ("code", "layoric/llama-2-13b-code-alpaca", 0.1),
    ]
    assert p["merge"]["order"] == ["lm", "math", "code"]
    assert p["tasks"] == SFT_TASKS and p["eval"]["num_fewshot"] == {"mmlu": 5}
    assert p["benchmarks"]["obim_alpaca_eval"] == "alpaca_eval"
    v = p["validation"]
    assert v["lm"]["sources"] == {"alpaca": 50, "mmlu": 285} and v["lm"]["format"] == "vicuna"
    assert v["lm"]["data"]["mmlu"] == {"builder": "mmlu", "path": "cais/mmlu", "name": "all", "split": "dev"}
    assert v["math"]["sources"] == {"gsm8k": 50, "math": 50} and v["math"]["format"] == "alpaca_cot"
    assert v["math"]["data"]["math"]["name"][0] == "algebra" and len(v["math"]["data"]["math"]["name"]) == 7
    assert v["code"]["sources"] == {"mbpp": 50} and v["code"]["data"]["mbpp"]["split"] == "train"
    assert p["paths"] == {"lm": "hub", "math": "hub", "code": "hub", "base": "hub"}
    assert plans["method=ta"]["validation"] == {}  # no saliency, no validation data
    plans = dry_run(tmp_path / "t3", "+paper=table3")
    assert sorted(plans) == ["method=obim", "method=ties", "method=ties_im", "method=ties_obm"]
    assert plans["method=ties_im"]["validation"] == {} and plans["method=ties_obm"]["validation"]["math"]


@pytest.mark.slow
def test_preset_table4_5_6_real(tmp_path):
    plans = dry_run(tmp_path, "+paper=table4")
    math = {k: p["validation"]["math"]["sources"] for k, p in plans.items()}
    assert math == {
        "method=obim,validation=math": {"gsm8k": 50, "math": 50},
        "method=obim,validation=code": {"mbpp": 100},
        "method=obim,validation=math_code": {"gsm8k": 34, "math": 33, "mbpp": 33},
    }
    for p in plans.values():  # only the math model's set changes
        assert p["validation"]["lm"]["sources"] == {"alpaca": 50, "mmlu": 285} and not p["main"]
        assert p["validation"]["math"]["format"] == "alpaca_cot"
    plans = dry_run(tmp_path / "t5", "+paper=table5")
    sizes = sorted(sum(p["validation"]["math"]["sources"].values()) for p in plans.values())
    assert sizes == [10, 50, 100, 200]
    assert plans["method=obim,validation.size=10,validation=math"]["validation"]["math"]["sources"] == {
        "gsm8k": 5,
        "math": 5,
    }
    plans = dry_run(tmp_path / "t6", "+paper=table6")
    orders = {k: p["merge"]["order"] for k, p in plans.items()}
    assert orders == {
        "method=obim,order=rotation": "rotation",
        "method=obim,order=math_first": ["math", "lm", "code"],
        "method=obim,order=math_last": ["lm", "code", "math"],
        "method=obim,order=lm_first": ["lm", "math", "code"],
    }


@pytest.mark.slow
def test_preset_table2_and_11_real(tmp_path):
    plans = dry_run(tmp_path, "+paper=table2")
    assert {p["method"] for p in plans.values()} == BASELINES
    p = plans["method=obim"]
    assert p["experiment"] == "qwen2_7b_pt" and p["merge"]["base_model"] == "Qwen/Qwen2-7B"
    assert p["models"] == ["ckpt-1", "ckpt-2", "ckpt-3"] and p["merge"]["order"] == "rotation"
    assert all(m["retention"] == 0.15 for m in p["merge"]["models"])
    assert p["tasks"] == PT_TASKS and p["eval"]["num_fewshot"] == {"ceval-valid": 5, "mmlu": 5}
    assert p["validation"]["ckpt-2"]["sources"] == {"mmlu": 285, "ceval": 260, "jp": 218}
    assert p["validation"]["ckpt-2"]["data"]["jp"]["builder"] == "jcommonsenseqa"
    assert len(p["validation"]["ckpt-2"]["data"]["ceval"]["name"]) == 52
    assert p["paths"]["ckpt-1"] == "missing" and p["paths"]["base"] == "hub"  # the user's own checkpoints
    plans = dry_run(tmp_path / "t11", "+paper=table11", "experiment.checkpoints=[a/1,a/2,a/3,a/4,a/5]")
    assert len(plans) == 10  # one directory per job although the override holds paths
    by = {(p["method"], p["n_models"]): p for p in plans.values()}
    assert sorted(by) == sorted((m, n) for m in ("dare", "obim") for n in range(1, 6))
    assert by["dare", 5]["models"] == [f"ckpt-{i}" for i in range(1, 6)] and not by["dare", 5]["main"]
    assert by["obim", 1]["merge"]["models"][0]["path"] == "a/1"
    assert "experiment.checkpoints=[a%2F1,a%2F2,a%2F3,a%2F4,a%2F5],method=obim,n_models=3" in plans


@pytest.mark.slow
def test_a_real_dry_run_fails_naming_every_missing_input(tmp_path):
    out = tmp_path / "runs"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
    ov = ["experiment=llama2_13b_sft", "method=ta", "dry_run=true", "eval.allow_code=true", f"hydra.sweep.dir={out}"]
    proc = run_sweep(ov, env, ROOT)
    assert proc.returncode == 1
    line = next(x for x in proc.stderr.splitlines() if "cannot be read here" in x)
    (plan,) = [json.loads(p.read_text()) for p in out.glob("*/plan.json")]
    assert f"{len(plan['missing'])} inputs of this job cannot be read here: " in line and len(plan["missing"]) > 100
    assert all(m in line for m in plan["missing"])  # every one named, not the first only
    assert plan["missing"][0].startswith("model meta-llama/Llama-2-13b-hf [experiment.base]: not in the offline")


@pytest.mark.slow
def test_presets_toy(tmp_path):
    """The toy version of a table is the same preset on a toy experiment: same jobs, the zoo's models and data."""
    plans = dry_run(tmp_path, "+paper=table5", "experiment=toy_sft", mode="true")  # the zoo builds every input
    p = plans["method=obim,validation.size=200,validation=math"]
    assert p["experiment"] == "toy_sft" and p["validation"]["math"]["sources"] == {"gsm8k": 100, "math": 100}
    assert p["validation"]["math"]["data"]["gsm8k"]["path"] == str(tmp_path / "zoo/data/gsm8k/train.jsonl")
    assert p["tasks"][0] == "toy_alpaca" and "num_fewshot" not in p["eval"]
    plans = dry_run(tmp_path / "t11", "+paper=table11", "experiment=toy_pt")
    assert len(plans) == 10 and plans["method=obim,n_models=5"]["merge"]["models"][4]["path"] == str(
        tmp_path / "t11/zoo/pt/ckpt-5"
    )


def test_plan_rejects_bad_sources_and_tasks(tmp_path):
    from hydra import compose, initialize_config_dir

    from obim.bench.plan import plan_job
    from obim.bench.stages import check_tasks

    def plan(*o):
        with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
            return plan_job(
                compose("sweep", overrides=["experiment=llama2_13b_sft", "method=obim", "eval.allow_code=true", *o])
            )

    cases = [
        (["experiment.validation_sources.gsm8k.split=test"], "validation_sources.gsm8k.split: 'test'"),
        (["experiment.validation_sources.mmlu.split=validation"], "validation_sources.mmlu.split"),
        (["experiment.validation_sources.mbpp.builder=nope"], "unknown builder 'nope'"),
        (["experiment.models.lm.prompt_format=chatty"], "experiment.models.lm.prompt_format"),
        (["+experiment.models.lm.tokenizer=x"], "experiment.models.lm: unknown key(s) tokenizer"),
        (["validation=code", "experiment.validation_sources.mbpp=null"], "no source 'mbpp'"),
    ]
    for o, msg in cases:
        with pytest.raises(ObimError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            plan(*o)
    with pytest.raises(ObimError, match="'mmlu_typo' is not an lm-eval task"):
        check_tasks(["mmlu", "mmlu_typo"])


# ----------------------------------------------------------------------------------- validation builders


def hub_dataset(root: Path, configs: dict[str, dict[str, list[dict]]]) -> str:
    """A local dataset repository laid out as the hub's parquet datasets are: one folder per config, one file per
    split, the configs declared in README.md."""
    import datasets

    lines = ["---", "configs:"]
    for name, splits in configs.items():
        lines += [f"- config_name: {name}", "  data_files:"]
        for split, records in splits.items():
            (root / name).mkdir(parents=True, exist_ok=True)
            datasets.Dataset.from_list(records).to_parquet(str(root / name / f"{split}-00000-of-00001.parquet"))
            lines += [f"  - split: {split}", f"    path: {name}/{split}-*"]
    (root / "README.md").write_text("\n".join([*lines, "---", ""]))
    return str(root)


def samples(source, spec, n, seed=0, split="train"):
    from obim.bench.validation import load_samples, resolve_source

    return load_samples(source, resolve_source(source, spec, split, f"src.{source}"), n, seed)


def test_builders_on_hub_shaped_fixtures(tmp_path):
    from obim.bench.validation import build_texts, render, resolve_source

    gsm = hub_dataset(
        tmp_path / "gsm8k",
        {
            "main": {
                "train": [{"question": f"Q{i}?", "answer": f"Half is 4/2=<<4/2=2>>2.\n#### {i},000"} for i in range(8)],
                "test": [{"question": "T?", "answer": "#### 1"}],
            }
        },
    )
    got = samples("gsm8k", {"path": gsm}, 8)
    assert sorted(got) == sorted((f"Q{i}?", f"Half is 4/2=2.\nThe answer is: {i},000") for i in range(8))
    # a fixed permutation: smaller sets are prefixes of larger ones (Table 5), another seed another order
    assert samples("gsm8k", {"path": gsm}, 3) == got[:3]
    assert samples("gsm8k", {"path": gsm}, 8, seed=1) != got and sorted(
        samples("gsm8k", {"path": gsm}, 8, 1)
    ) == sorted(got)
    with pytest.raises(ObimError, match="has 8 samples in split 'train', 9 requested"):
        samples("gsm8k", {"path": gsm}, 9)
    with pytest.raises(ObimError, match=r"split 'test' is a split the benchmarks evaluate|'test' is a split"):
        samples("gsm8k", {"path": gsm, "split": "test"}, 1)

    sol = "We get $x=\\frac{1}{2}$, so the answer is $\\boxed{\\frac{1}{2}}$."
    math = hub_dataset(
        tmp_path / "math",
        {
            s: {
                "train": [{"problem": f"{s} problem", "level": "Level 1", "type": s, "solution": sol}],
                "test": [{"problem": "t", "level": "Level 1", "type": s, "solution": "\\boxed{1}"}],
            }
            for s in ("algebra", "geometry")
        },
    )
    got = samples("math", {"path": math, "name": ["algebra", "geometry"]}, 2)
    assert sorted(got) == [(f"{s} problem", sol + "\nThe answer is: \\frac{1}{2}") for s in ("algebra", "geometry")]

    mbpp = hub_dataset(
        tmp_path / "mbpp",
        {
            "full": {
                s: [
                    {
                        "task_id": 1,
                        "text": "Write add.",
                        "code": "def add(a,b):\n    return a+b",
                        "test_list": ["assert add(1,2)==3", "assert add(0,0)==0"],
                        "test_setup_code": "",
                        "challenge_test_list": [],
                    }
                ]
                for s in ("train", "test", "validation", "prompt")
            }
        },
    )
    assert samples("mbpp", {"path": mbpp}, 1) == [
        (
            "Write add. Your code should pass these tests:\n\nassert add(1,2)==3\nassert add(0,0)==0",
            "def add(a,b):\n    return a+b",
        )
    ]
    assert samples("mbpp", {"path": mbpp, "split": "validation"}, 1)  # dev split: allowed

    mmlu = hub_dataset(
        tmp_path / "mmlu",
        {
            "all": {
                s: [{"question": "2+2?", "subject": "math", "choices": ["3", "4", "5", "6"], "answer": 1}]
                for s in ("dev", "validation", "test")
            }
        },
    )
    assert samples("mmlu", {"path": mmlu}, 1) == [("2+2?\nA. 3\nB. 4\nC. 5\nD. 6", "Answer: B")]
    with pytest.raises(ObimError, match=r"mmlu.split: 'validation'"):
        samples("mmlu", {"path": mmlu, "split": "validation"}, 1)

    ceval = hub_dataset(
        tmp_path / "ceval",
        {
            s: {
                sp: [
                    {
                        "id": 0,
                        "question": f"{s}题",
                        "A": "甲",
                        "B": "乙",
                        "C": "丙",
                        "D": "丁",
                        "answer": "C",
                        "explanation": "",
                    }
                ]
                for sp in ("dev", "val", "test")
            }
            for s in ("law", "logic")
        },
    )
    got = samples("ceval", {"path": ceval, "name": ["law", "logic"]}, 2)
    assert sorted(got) == [(f"{s}题\nA. 甲\nB. 乙\nC. 丙\nD. 丁", "答案：C") for s in ("law", "logic")]
    with pytest.raises(ObimError, match="'val' is a split the benchmarks evaluate"):
        samples("ceval", {"path": ceval, "name": ["law"], "split": "val"}, 1)

    alpaca = hub_dataset(
        tmp_path / "alpaca",
        {
            "default": {
                "train": [
                    {"instruction": "Say hi.", "input": "", "output": "Hi!", "text": "..."},
                    {"instruction": "Translate.", "input": "chat", "output": "cat", "text": "..."},
                ]
            }
        },
    )
    assert sorted(samples("alpaca", {"path": alpaca}, 2)) == [("Say hi.", "Hi!"), ("Translate.\n\nchat", "cat")]

    jp = hub_dataset(
        tmp_path / "jglue",
        {
            "JCommonsenseQA": {
                "train": [{"q_id": 0, "question": "色は?", **{f"choice{i}": f"c{i}" for i in range(5)}, "label": 3}]
            }
        },
    )
    assert samples("jcommonsenseqa", {"path": jp, "name": "JCommonsenseQA"}, 1) == [
        ("色は?\n- c0\n- c1\n- c2\n- c3\n- c4", "c3")
    ]

    # a record without the fields its builder reads: one line naming file, split and fields
    bad = hub_dataset(tmp_path / "bad", {"main": {"train": [{"q": "x", "a": "y"}]}})
    with pytest.raises(ObimError, match="lacks what builder 'gsm8k' reads \\(question, answer\\)"):
        samples("gsm8k", {"path": bad}, 1)
    # a hub id while offline: one line naming the source
    with pytest.raises(ObimError, match="validation source openai/gsm8k-missing \\(main\\) split train:"):
        samples("gsm8k", {"path": "openai/gsm8k-missing"}, 1)

    # local JSONL (offline users): rendered text as it is, or pairs in the model's format
    f = tmp_path / "mine.jsonl"
    f.write_text('{"instruction": "Add 1 and 2.", "response": "3"}\n{"text": "plain text"}\n')
    v = {
        "sources": {"mine": 2},
        "data": {"mine": resolve_source("mine", {"builder": "jsonl", "path": str(f)}, "train", "src")},
        "format": "alpaca_cot",
        "seed": 0,
    }
    assert build_texts(v) == [render("alpaca_cot", ("Add 1 and 2.", "3")), "plain text"]
    assert build_texts(v)[0].endswith("### Instruction:\nAdd 1 and 2.\n\n### Response: Let's think step by step. 3")
    assert render("vicuna", ("Hi", "Hello")).endswith("USER: Hi ASSISTANT: Hello")
    assert render("Q: {instruction}\nA: {response}", ("a", "b")) == "Q: a\nA: b"


# ------------------------------------------------------------------------------------------- task scorers


def paper_utils():
    spec = importlib.util.spec_from_file_location("paper_utils", ROOT / "obim/bench/tasks/paper/utils.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gsm8k_cot_extraction():
    u = paper_utils()
    doc = {"answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 1,072"}
    assert u.process_gsm8k_cot(doc, ["She sold 1000 + 72.\nThe answer is: 1072"])["exact_match"] == 1.0
    assert u.process_gsm8k_cot(doc, ["The answer is: 1,072.00 clips"])["exact_match"] == 1.0
    assert u.process_gsm8k_cot(doc, ["The answer is: $1072"])["exact_match"] == 1.0
    assert u.process_gsm8k_cot(doc, ["the answer is 1072"])["exact_match"] == 1.0  # case, no colon
    assert u.process_gsm8k_cot(doc, ["1072 is the total."])["exact_match"] == 0.0  # no marker: not graded
    assert u.process_gsm8k_cot(doc, ["The answer is: 1071. Or 1072"])["exact_match"] == 0.0  # the first number
    assert u.process_gsm8k_cot(doc, ["The answer is: 5\n...\nThe answer is: 1072"])["exact_match"] == 1.0  # last
    assert u.extract_gsm8k_cot("The answer is: -3.5") == -3.5
    assert u.gsm8k_gold("#### -12") == -12.0


def test_math_cot_extraction():
    u = paper_utils()
    doc = {"solution": "So $\\frac{a}{b} = \\boxed{\\dfrac{3}{4}}$."}
    for out, ok in [
        ("... The answer is: \\frac{3}{4}", 1),
        ("The answer is: $\\dfrac34$.", 1),
        ("The answer is: 3/4", 1),
        ("The answer is: \\boxed{\\frac{3}{4}}", 1),
        ("The answer is: 0.75", 0),
        ("The answer is: \\frac{4}{3}", 0),
        ("\\boxed{\\frac34}", 0),
    ]:
        assert u.process_math_cot(doc, [out])["exact_match"] == ok, out
    assert u.normalize_math("x = 5") == "5"
    assert u.normalize_math("10\\%") == "10"
    assert u.normalize_math("90^\\circ") == "90"
    assert u.normalize_math("5 \\text{ cm}") == "5" and u.normalize_math("5\\text{ cm}^2") == "5"
    # an answer that is text is compared as text, never emptied into a match
    even = {"solution": "It is $\\boxed{\\text{even}}$."}
    assert u.process_math_cot(even, ["The answer is: \\text{odd}"])["exact_match"] == 0.0
    assert u.process_math_cot(even, ["The answer is:"])["exact_match"] == 0.0
    assert u.process_math_cot(even, ["The answer is: \\text{even}"])["exact_match"] == 1.0
    assert u.process_math_cot({"solution": "so $\\boxed 5$."}, ["The answer is: 5"])["exact_match"] == 1.0
    assert u.normalize_math("\\sqrt2") == "\\sqrt{2}"
    assert u.normalize_math("\\left( 1, 2 \\right)") == "(1,2)"
    assert u.normalize_math("0.5") == u.normalize_math("\\frac{1}{2}")
    assert u.last_boxed("\\boxed{a} then \\boxed{\\{1,2\\}}") == "\\{1,2\\}"
    assert u.last_boxed("no box") is None


def test_group_score_without_aggregate():
    """japanese_leaderboard reports no metric of its own: its score is the mean of its subtasks'."""
    from obim.bench.evaluation import task_score

    out = {
        "results": {
            "jp": {"alias": "jp"},
            "jp_a": {"acc,none": 0.5, "acc_stderr,none": 0.1},
            "jp_b": {"exact_match,remove_whitespace": 0.25},
            "mmlu": {"acc,none": 0.6},
        },
        "group_subtasks": {"jp": ["jp_a", "jp_b"], "jp_a": [], "jp_b": []},
    }
    assert task_score(out, "jp") == pytest.approx(37.5)
    # japanese_leaderboard's summarisation task reports ROUGE-2 (0-1) under its filter's name
    assert task_score(
        {"results": {"ja_xlsum": {"alias": "x", "rouge2,whitespaces": 0.2}}}, "ja_xlsum"
    ) == pytest.approx(20.0)
    assert task_score(out, "mmlu") == pytest.approx(60.0)
    with pytest.raises(ObimError, match="lm-eval task jp_c: no score"):
        task_score({"results": {"jp_c": {"bleu,none": 1.0}}, "group_subtasks": {}}, "jp_c")


# ------------------------------------------------------------------------------------------------ AlpacaEval


SAMPLES = [
    {
        "doc_id": 1,
        "doc": {"instruction": "Name a fruit.", "dataset": "koala", "output": "ref"},
        "resps": [["  Apple. "]],
        "filtered_resps": [" Apple. "],
    },
    {
        "doc_id": 0,
        "doc": {"instruction": "Say hi.", "dataset": "helpful_base", "output": "ref"},
        "resps": [["Hi"]],
        "filtered_resps": ["Hi"],
    },
]


def test_alpaca_eval_without_judge_is_missing(tmp_path, monkeypatch):
    from obim.bench.judge import judge
    from obim.bench.stages import score_avg

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OBIM_ALPACA_EVAL_ANNOTATORS", raising=False)
    assert judge("obim_alpaca_eval", SAMPLES, "/m/merged-obim", str(tmp_path)) is None
    out = json.loads((tmp_path / "alpaca_eval_outputs.json").read_text())
    assert out == [
        {"instruction": "Say hi.", "output": "Hi", "generator": "obim-merged-obim", "dataset": "helpful_base"},
        {"instruction": "Name a fruit.", "output": "Apple.", "generator": "obim-merged-obim", "dataset": "koala"},
    ]
    assert score_avg({"a": None, "b": 50.0}) is None and score_avg({"a": 40.0, "b": 50.0}) == 45.0


def test_alpaca_eval_with_judge(tmp_path, monkeypatch):
    """A stand-in `alpaca_eval` command (alpaca_eval's CLI and leaderboard.csv layout) scores the outputs."""
    from obim.bench.judge import judge

    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "alpaca_eval"
    fake.write_text(f"""#!{sys.executable}
import json, sys, pathlib
a = sys.argv[1:]
assert a[0] == "evaluate"
outputs = json.loads(pathlib.Path(a[a.index("--model_outputs") + 1]).read_text())
assert a[a.index("--annotators_config") + 1] == "my_judge"
d = pathlib.Path(a[a.index("--output_path") + 1]) / "my_judge"
d.mkdir(parents=True)
wins = sum(o["output"].startswith("Hi") for o in outputs) / len(outputs) * 100
(d / "leaderboard.csv").write_text(
    ",win_rate,standard_error,length_controlled_winrate\\n"
    f"gpt4,20.0,1.0,30.0\\n{{outputs[0]['generator']}},{{wins}},1.5,44.0\\n")
""")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("OBIM_ALPACA_EVAL_ANNOTATORS", "my_judge")
    assert judge("obim_alpaca_eval", SAMPLES, "/m/merged", str(tmp_path / "o")) == pytest.approx(50.0)
    monkeypatch.setenv("OBIM_ALPACA_EVAL_METRIC", "length_controlled_winrate")
    assert judge("obim_alpaca_eval", SAMPLES, "/m/merged", str(tmp_path / "o2")) == pytest.approx(44.0)


def test_alpaca_eval_judge_failure_keeps_outputs(tmp_path, monkeypatch):
    from obim.bench.judge import judge

    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "alpaca_eval").write_text("#!/bin/sh\necho 'rate limited' >&2\nexit 3\n")
    (bindir / "alpaca_eval").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("OBIM_ALPACA_EVAL_ANNOTATORS", "my_judge")
    assert judge("obim_alpaca_eval", SAMPLES, "/m/x", str(tmp_path / "o")) is None
    assert len(json.loads((tmp_path / "o" / "alpaca_eval_outputs.json").read_text())) == 2


def test_validation_split_reaches_jsonl_sources(tmp_path):
    """validation.split picks the toy zoo's files; a hub source keeps the split it names."""
    from hydra import compose, initialize_config_dir

    from obim.bench.plan import plan_job

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        p = plan_job(
            compose(
                "sweep",
                overrides=["method=obim", f"experiment.zoo={tmp_path}", "validation.split=dev", "eval.allow_code=true"],
            )
        )
        q = plan_job(
            compose(
                "sweep",
                overrides=["method=obim", "experiment=llama2_13b_sft", "validation.split=dev", "eval.allow_code=true"],
            )
        )
    assert p.validation["math"].data["gsm8k"]["path"] == f"{tmp_path}/data/gsm8k/dev.jsonl"
    assert q.validation["lm"].data["alpaca"]["split"] == "train"  # named in the experiment


@pytest.mark.slow
def test_preset_table1_plus_real(tmp_path):
    plans = dry_run(tmp_path, "+paper=table1_plus")
    extra = {"tsv", "sce", "lines", "ties_lines", "regmean", "fisher"}
    assert {p["method"] for p in plans.values()} == BASELINES | extra
    assert {p["experiment"] for p in plans.values()} == {"llama2_13b_sft"} and all(p["main"] for p in plans.values())
