"""The dry run's cost estimate (obim.bench.estimate) on the toy experiment, against counts made here by hand: the
experiment's validation sizes, the tokenizer's count of the same texts (and the tokens the saliency pass itself
reports), the toy tasks' test docs and choices; shared work counted once in the sweep's total."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import compose, run_sweep, sweep_env

TOY = ["toy_alpaca", "toy_mmlu", "toy_gsm8k", "toy_math", "toy_humaneval", "toy_mbpp"]
GEN = [t for t in TOY if t != "toy_mmlu"]  # generate_until, max_gen_toks 64 each (obim/bench/tasks/*.yaml)
SIZES = {"lm": 100, "math": 100, "code": 50}  # conf/experiment/toy_sft.yaml: each model's validation sources


def _plan(*overrides: str):
    from obim.bench.plan import plan_job

    return plan_job(compose(*overrides, "dry_run=true"))


def _test_docs(task: str) -> list[dict]:
    """A toy task's test split, as its dataset hook makes it (obim/bench/tasks/utils.py)."""
    from obim.bench.tasks.utils import toy_dataset

    return list(toy_dataset(task.removeprefix("toy_"))["test"])


def _tokens(path: Path | str, texts: list[str], max_length: int) -> int:
    """The tokens of each text on its own, cut at max_length: no batch, no truncation by the tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    return sum(min(len(tok(t)["input_ids"]), max_length) for t in texts)


# ------------------------------------------------------------------------------------------------ one job


def test_a_toy_job_costs_what_its_plan_says(quick_zoo):
    from obim.bench.estimate import estimate, summary
    from obim.bench.validation import build_texts

    plan = _plan("method=obim", f"experiment.zoo={quick_zoo}", "eval.limit=3")
    c = estimate(plan)
    assert c["read"] is True and c["merges"] == 1 and "not subtracted" in c["basis"]
    sal = c["saliency"]
    assert {m: s["samples"] for m, s in sal.items()} == SIZES
    assert {m: s["batches"] for m, s in sal.items()} == {"lm": 13, "math": 13, "code": 7}  # ceil(n / 8)
    for m, s in sal.items():
        texts = build_texts(plan.validation[m].to_json())
        assert s["why"] is None and s["tokens"] == _tokens(quick_zoo / "sft" / m, texts, 256) > len(texts)
    assert c["saliency_samples"] == 250 and c["saliency_tokens"] == sum(s["tokens"] for s in sal.values())

    # eval.limit=3: 3 docs per task; toy_mmlu's 4 choices are 4 loglikelihood requests per doc
    assert [len(d["choices"]) for d in _test_docs("toy_mmlu")[:3]] == [4, 4, 4]
    ev = c["eval"]
    assert list(ev["models"]) == ["merged", "base", "lm", "math", "code"] and ev["tasks"] == TOY
    per = ev["per_model"]
    assert {t: (per[t]["docs"], per[t]["prompts"], per[t]["max_gen_tokens"]) for t in TOY} == {
        "toy_mmlu": (3, 12, 0),
        **dict.fromkeys(GEN, (3, 3, 3 * 64)),
    }
    assert per["toy_mmlu"]["type"] == "multiple_choice" and per["toy_gsm8k"]["type"] == "generate_until"
    assert per["toy_mmlu"]["column"] == "mmlu"
    assert c["eval_models"] == 5 and c["eval_prompts"] == 5 * (12 + 5 * 3) and c["eval_max_gen_tokens"] == 5 * 5 * 192
    assert summary(c) == (
        f"1 merge, saliency 250 samples/{c['saliency_tokens']:,} tokens, eval 5 models: 135 prompts, "
        "<= 4,800 generated tokens"
    )


def test_saliency_tokens_are_those_the_saliency_pass_reads(quick_zoo):
    """max_length 12 cuts most toy texts: the estimate counts what compute_hdiag runs forward, truncation too."""
    from obim.bench.estimate import saliency_cost
    from obim.bench.validation import build_texts
    from obim.merging.saliency import compute_hdiag

    plan = _plan("method=obim", f"experiment.zoo={quick_zoo}", "validation.max_length=12", "validation.batch_size=4")
    v = plan.validation["code"]
    texts = build_texts(v.to_json())
    _, meta = compute_hdiag(str(quick_zoo / "sft" / "code"), texts, max_length=12, batch_size=4, progress=False)
    s = saliency_cost(plan)["code"]
    assert s["tokens"] == int(meta["tokens"]) and s["samples"] == int(meta["samples"]) == 50
    assert s["batches"] == 13 and s["tokens"] < _tokens(quick_zoo / "sft" / "code", texts, 256)


@pytest.mark.slow  # builds lm-eval's task index
def test_whole_splits_fractions_and_an_unbuilt_zoo(tmp_path):
    """No limit: every test doc (each mmlu doc its choices); a fraction: lm-eval's ceil(n x limit). The toy tasks
    make their own data, so they are counted before the zoo exists; the validation texts are not."""
    from obim.bench.estimate import benchmark_cost, estimate

    docs = {t: _test_docs(t) for t in TOY}
    zoo = f"experiment.zoo={tmp_path / 'zoo'}"
    whole = estimate(_plan("method=obim", zoo, "eval.individual=false"))
    per = whole["eval"]["per_model"]
    assert {t: per[t]["docs"] for t in TOY} == {t: len(d) for t, d in docs.items()}
    assert per["toy_mmlu"]["prompts"] == sum(len(d["choices"]) for d in docs["toy_mmlu"])
    assert {t: per[t]["max_gen_tokens"] for t in GEN} == {t: 64 * len(docs[t]) for t in GEN}
    assert list(whole["eval"]["models"]) == ["merged"] and whole["eval_models"] == 1
    assert {m: (s["samples"], s["tokens"]) for m, s in whole["saliency"].items()} == {
        m: (n, None) for m, n in SIZES.items()
    }
    assert "toy zoo is not built" in whole["saliency"]["lm"]["why"] and whole["saliency_tokens"] is None

    # a group or tag: the sum of the tasks it runs (toy_sft: the six toy tasks)
    tag = benchmark_cost("toy_sft", 3)
    assert (tag["subtasks"], tag["docs"], tag["prompts"], tag["max_gen_tokens"]) == (6, 18, 12 + 5 * 3, 5 * 3 * 64)
    gone = benchmark_cost("no_such_task", 3)
    assert gone["prompts"] is None and gone["why"]

    part = estimate(_plan("method=ta", zoo, "eval.limit=0.1"))["eval"]["per_model"]
    assert {t: part[t]["docs"] for t in TOY} == {t: math.ceil(len(d) * 0.1) for t, d in docs.items()}
    n = math.ceil(len(docs["toy_mmlu"]) * 0.1)
    assert part["toy_mmlu"]["prompts"] == sum(len(d["choices"]) for d in docs["toy_mmlu"][:n])


# No toy task sets repeats or acc_mutual_info: a group that overrides its tasks' configs does (lm-eval's `task:` list
# entries with config keys)
OVERRIDDEN = """
group: obim_test_overridden
task:
  - task: toy_gsm8k
    repeats: 2
  - task: toy_mmlu
    repeats: 3
    metric_list:
      - metric: acc_mutual_info
        aggregation: mean
        higher_is_better: true
"""


@pytest.mark.slow  # builds lm-eval's task index
def test_prompts_are_the_requests_lm_eval_builds(tmp_path, monkeypatch):
    """The estimate's docs and prompts per task are those lm-eval's own task objects make: fresh tasks loaded as
    simple_evaluate loads them, the limit turned into docs by its get_sample_size, build_all_requests' instances
    each run `repeats` times (as the evaluator clones them). Multiple choice and generation, a count, a count past
    the split, a fraction and no limit; repeats and acc_mutual_info through a group's overrides."""
    from lm_eval.evaluator_utils import get_sample_size
    from lm_eval.tasks import TaskManager

    from obim.bench import evaluation
    from obim.bench.estimate import benchmark_cost, leaves

    (tmp_path / "overridden.yaml").write_text(OVERRIDDEN)
    tm = TaskManager(include_path=[evaluation.tasks_dir(), str(tmp_path)])
    monkeypatch.setattr(evaluation, "task_manager", lambda: tm)  # the estimate's tasks: obim's and the group

    def lm_eval(benchmark: str, limit: int | float | None) -> dict[str, tuple]:
        out = {}
        for name, task in tm.load([benchmark])["tasks"].items():
            task.build_all_requests(limit=get_sample_size(task, limit), rank=0, world_size=1)
            got = task.instances
            most = {i.args[1].get("max_gen_toks") for i in got} if task.OUTPUT_TYPE == "generate_until" else {None}
            out[name] = (len({i.doc_id for i in got}), sum(i.repeats for i in got), *most)
        return out

    seen = {}
    for benchmark in ("toy_mmlu", "toy_gsm8k", "obim_test_overridden"):
        for limit in (3, 1000, 0.1, None):
            theirs = lm_eval(benchmark, limit)
            ours = {lf.name: (lf.docs(limit), lf.prompts(limit), lf.max_gen_toks) for lf in leaves(benchmark)}
            assert ours == theirs, (benchmark, limit)
            c = benchmark_cost(benchmark, limit)
            assert (c["docs"], c["prompts"]) == tuple(sum(v[i] for v in theirs.values()) for i in (0, 1))
            seen[benchmark, limit] = theirs
    # the cases bite: 4 choices a doc, twice with acc_mutual_info; repeats; a fraction rounded up; the split's end
    n = len(_test_docs("toy_mmlu"))
    assert seen["toy_mmlu", 3] == {"toy_mmlu": (3, 12, None)} and seen["toy_gsm8k", 3] == {"toy_gsm8k": (3, 3, 64)}
    assert seen["obim_test_overridden", 3] == {"toy_mmlu": (3, 3 * 4 * 2 * 3, None), "toy_gsm8k": (3, 6, 64)}
    assert seen["toy_mmlu", 0.1]["toy_mmlu"][0] == math.ceil(n * 0.1) and seen["toy_mmlu", 1000]["toy_mmlu"][0] == n


def test_dry_run_plan_reads_nothing(tmp_path, monkeypatch):
    from obim.bench import estimate as est

    def no(*a, **k):
        raise AssertionError("dry_run=plan read something")

    monkeypatch.setattr(est, "leaves", no)
    monkeypatch.setattr(est, "count_tokens", no)
    monkeypatch.setattr("obim.bench.validation.build_texts", no)
    plan = _plan("method=ties_obm", f"experiment.zoo={tmp_path}")
    (tmp_path / "zoo.json").write_text("{}")  # a built zoo (its files gone): not read for that reason either
    c = est.estimate(plan, read=False)
    assert {m: (s["samples"], s["batches"], s["tokens"], s["why"]) for m, s in c["saliency"].items()} == {
        "lm": (100, 13, None, est.NOT_READ),
        "math": (100, 13, None, est.NOT_READ),
        "code": (50, 7, None, est.NOT_READ),
    }
    assert all(b["prompts"] is None and b["why"] == est.NOT_READ for b in c["eval"]["per_model"].values())
    assert c["eval_prompts"] is None and c["eval_models"] == 5
    assert est.summary(c) == "1 merge, saliency 250 samples, eval 5 models"


def test_generation_bound_without_a_task_max():
    """A task without max_gen_toks generates up to the model's: lm-eval's 256, or vllm's model_args."""
    from obim.bench.estimate import MODEL_MAX_GEN_TOKS, Leaf, _model_max_gen_toks

    assert MODEL_MAX_GEN_TOKS == 256
    assert _model_max_gen_toks("hf", {"max_gen_toks": 32}) == 256  # hf's is fixed
    assert _model_max_gen_toks("vllm", {"max_gen_toks": 32}) == 32
    assert _model_max_gen_toks("vllm", "dtype=auto,max_gen_toks=48") == 48
    assert _model_max_gen_toks("vllm", {"dtype": "auto"}) == 256
    leaf = Leaf("t", "generate_until", (1,) * 10, repeats=3, max_gen_toks=None)
    assert (leaf.docs(4), leaf.prompts(4), leaf.docs(0.25), leaf.docs(None), leaf.prompts(None)) == (4, 12, 3, 10, 30)


# ------------------------------------------------------------------------------------------------ the sweep


def test_the_sweep_total_counts_shared_work_once(quick_zoo):
    """obim and ties_obm compute the same statistics; every job evaluates the same base and experts with the same
    options (those evaluations are cached): once each. Another eval option is another evaluation."""
    from obim.bench.estimate import estimate, sweep_total

    zoo, lim = f"experiment.zoo={quick_zoo}", "eval.limit=3"
    costs = [estimate(_plan(f"method={m}", zoo, lim)) for m in ("ta", "obim", "ties_obm")]
    costs.append(estimate(_plan("method=ta", "n_models=2", zoo, lim)))  # base, lm, math: already counted
    t = sweep_total(costs)
    assert (t["jobs"], t["merges"], t["evaluations"], t["individual_evaluations"]) == (4, 4, 8, 4)
    assert (t["saliency_runs"], t["saliency_samples"], t["saliency_batches"]) == (3, 250, 33)
    assert t["saliency_tokens"] == costs[1]["saliency_tokens"]
    assert list(t["benchmarks"]) == TOY
    mmlu = t["benchmarks"]["toy_mmlu"]
    assert (mmlu["column"], mmlu["evaluations"], mmlu["docs"], mmlu["prompts"], mmlu["max_gen_tokens"]) == (
        "mmlu",
        8,
        8 * 3,
        8 * 12,
        0,
    )
    assert t["benchmarks"]["toy_gsm8k"]["max_gen_tokens"] == 8 * 192
    assert (t["prompts"], t["max_gen_tokens"]) == (8 * (12 + 5 * 3), 8 * 5 * 192)

    costs.append(estimate(_plan("method=ta", zoo, "eval.limit=2")))  # 5 more evaluations of 2 docs
    t = sweep_total(costs)
    assert (t["evaluations"], t["individual_evaluations"]) == (13, 8)
    assert t["benchmarks"]["toy_mmlu"]["prompts"] == 8 * 12 + 5 * 8


def test_a_dry_run_sweep_writes_and_prints_the_cost(quick_zoo, tmp_path):
    out = tmp_path / "runs"
    args = ["method=ta,obim", "eval.limit=3", "dry_run=true", "eval.allow_code=true", f"hydra.sweep.dir={out}"]
    proc = run_sweep(args, sweep_env(quick_zoo, tmp_path / "cache"), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plans = {(p := json.loads(f.read_text()))["method"]: p for f in out.glob("*/plan.json")}
    obim = plans["obim"]["cost"]
    assert plans["ta"]["cost"]["saliency"] == {} and obim["saliency_samples"] == 250
    assert obim["eval_prompts"] == 135 and obim["eval"]["per_model"]["toy_mmlu"]["prompts"] == 12
    tokens = obim["saliency_tokens"]
    lines = proc.stdout.splitlines()
    assert any(
        line.startswith("[")
        and "method=obim: plan obim of lm, math, code -> 6 tasks; all 9 inputs readable; "
        f"1 merge, saliency 250 samples/{tokens:,} tokens, eval 5 models: 135 prompts, <= 4,800 generated tokens"
        in line
        for line in lines
    ), proc.stdout
    start = lines.index("cost of a real run of these 2 jobs (the work planned; what the caches hold not subtracted):")
    table = [line.split() for line in lines[start + 1 : start + 12]]
    assert table[0] == ["merges:", "2"]
    assert (
        " ".join(table[1])
        == f"saliency: 3 models' statistics (each once), 250 samples in 33 forward batches, {tokens:,} tokens"
    )
    assert " ".join(table[2]) == "evaluations: 6 (2 merged models, 4 individual models once each)"
    assert table[3] == ["benchmark", "task", "type", "evaluations", "docs", "prompts", "max", "generated", "tokens"]
    assert table[4] == ["alpaca_eval", "toy_alpaca", "generate_until", "6", "18", "18", "1,152"]
    assert table[5] == ["mmlu", "toy_mmlu", "multiple_choice", "6", "18", "72", "0"]
    assert table[10] == ["total", "6", "162", "5,760"]  # 6 x (12 + 5 x 3) prompts, 6 x 5 x 3 x 64 tokens
