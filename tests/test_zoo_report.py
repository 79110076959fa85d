"""The zoo's mergeability report: the task-vector statistics against a direct computation, the kept-gain arithmetic
on hand-made scores, the listed merges' configs, and the pieces the SFT recipe relies on (packed pretraining rows,
frozen parameters, raw forms drawn from the train split)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from obim.bench.zoo import data as D
from obim.bench.zoo.report import (
    MERGES,
    OBIM_RETENTION,
    OBIM_VALIDATION,
    ORDER,
    gain_kept,
    merge_configs,
    report_tables,
    task_vector_stats,
)
from obim.bench.zoo.tiny import make_llama

REPO = Path(__file__).resolve().parents[1]


def test_task_vector_stats_match_a_direct_computation(tmp_path):
    from safetensors.torch import load_file

    base = make_llama(tmp_path / "base", 0)
    a = make_llama(tmp_path / "a", 1, base=base, scale=0.01)
    b = make_llama(tmp_path / "b", 2, base=base, scale=0.03)
    sd = {n: load_file(p / "model.safetensors") for n, p in {"base": base, "a": a, "b": b}.items()}
    flat = {n: torch.cat([v.double().flatten() for _, v in sorted(s.items())]) for n, s in sd.items()}
    ta, tb = flat["a"] - flat["base"], flat["b"] - flat["base"]
    got = task_vector_stats(base, {"a": a, "b": b})
    assert got["rel_norm"]["a"] == pytest.approx(float(ta.norm() / flat["base"].norm()), rel=1e-9)
    assert got["rel_norm"]["b"] == pytest.approx(float(tb.norm() / flat["base"].norm()), rel=1e-9)
    assert got["cosine"]["a/b"] == pytest.approx(float(ta @ tb / (ta.norm() * tb.norm())), rel=1e-9, abs=1e-12)
    # noise of scale 0.01 and 0.03 on weights of scale ~0.02 (init) : clearly different sizes
    assert got["rel_norm"]["b"] > 2 * got["rel_norm"]["a"]
    same = task_vector_stats(base, {"a": a, "a2": a})
    assert same["cosine"]["a/a2"] == pytest.approx(1.0)


def test_gain_kept_by_hand():
    base = {"x": 10.0, "y": 20.0}
    expert = {"x": 60.0, "y": 100.0}
    merged = {"x": 35.0, "y": 100.0}  # half of x's gain, all of y's
    assert gain_kept(merged, base, expert, ["x", "y"]) == pytest.approx((0.5 + 1.0) / 2)
    assert gain_kept({"x": 5.0, "y": 20.0}, base, expert, ["x", "y"]) == pytest.approx((-0.1 + 0.0) / 2)
    assert gain_kept({"x": None, "y": 1.0}, base, expert, ["x", "y"]) is None  # not measured
    assert gain_kept(merged, base, {"x": 10.0, "y": 100.0}, ["x", "y"]) is None  # no gain on x to keep


def test_report_tables_show_the_numbers():
    experts = {"lm": ("toy_alpaca", "toy_mmlu"), "math": ("toy_gsm8k", "toy_math")}
    scores = {
        "sft/base": {"toy_alpaca": 0.0, "toy_mmlu": 25.0, "toy_gsm8k": 0.0, "toy_math": 10.0},
        "sft/lm": {"toy_alpaca": 40.0, "toy_mmlu": 75.0},
        "sft/math": {"toy_gsm8k": 50.0, "toy_math": 60.0},
    }
    stats = {"rel_norm": {"lm": 0.0312, "math": 0.0456}, "cosine": {"lm/math": 0.021}}
    merges = {
        "TA lambda 0.5": {
            "scores": {"toy_alpaca": 20.0, "toy_mmlu": 50.0, "toy_gsm8k": 25.0, "toy_math": 35.0},
            "kept": {"lm": 0.5, "math": None},
        }
    }
    text = report_tables(scores, stats, merges, experts)
    assert "| lm | toy_alpaca +40.0, toy_mmlu +50.0 | 0.0312 |" in text
    assert "| math | toy_gsm8k +50.0, toy_math +50.0 | 0.0456 |" in text
    assert "lm/math 0.021" in text
    assert "| TA lambda 0.5 | 0.50 | — | 20.0 | 50.0 | 25.0 | 35.0 |" in text


def test_listed_merges_and_obim_settings_follow_the_experiment(tmp_path):
    exp = yaml.safe_load((REPO / "conf" / "experiment" / "toy_sft.yaml").read_text())
    assert {n: m["retention"] for n, m in exp["models"].items()} == OBIM_RETENTION
    assert {n: m["validation"] for n, m in exp["models"].items()} == OBIM_VALIDATION
    assert exp["order"] == ORDER
    cfgs = dict(merge_configs(tmp_path, tmp_path / "val"))
    assert [lab for lab, _, _ in MERGES] == list(cfgs)
    assert [cfgs[f"TA lambda {x}"]["parameters"] for x in ("0.3", "0.5", "1.0")] == [
        {"lambda": x} for x in (0.3, 0.5, 1.0)
    ]
    assert cfgs["TIES density 0.2"]["method"] == "ties" and cfgs["TIES density 0.2"]["parameters"] == {"density": 0.2}
    obim = cfgs["OBIM"]
    assert [m["retention"] for m in obim["models"]] == [0.4, 0.45, 0.1]
    assert obim["models"][1]["validation"]["data"] == str(tmp_path / "val" / "math.jsonl")
    from obim.merging.config import load_config

    for _, cfg in cfgs.items():  # each is a valid merge-core config
        load_config(cfg)


def test_packed_batches_concatenate_documents_into_full_rows():
    from obim.bench.zoo.train import packed_batches, tokenizer

    tok = tokenizer()
    docs = iter(["ab\n", "c\n", "defg\n"] * 10)
    batch = next(packed_batches(docs, rows=2, length=5))
    ids = (
        [tok.convert_tokens_to_ids(c) for c in "ab\n"]
        + [tok.eos_token_id]
        + [tok.convert_tokens_to_ids(c) for c in "c\n"]
        + [tok.eos_token_id]
        + [tok.convert_tokens_to_ids(c) for c in "def"]
    )
    assert batch["input_ids"].tolist() == [ids[:5], ids[5:10]]
    assert batch["labels"].tolist() == batch["input_ids"].tolist() and bool(batch["attention_mask"].all())
    second = next(packed_batches(iter(["ab\n"] * 10), rows=1, length=3))
    assert second["input_ids"].shape == (1, 3)


def test_frozen_parameters_keep_their_values():
    from obim.bench.zoo.train import ModelShape, new_model, train

    model = new_model(ModelShape(hidden=64, layers=1, heads=1, intermediate=64, max_positions=64), 0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pairs = iter(lambda: [("q: 1+1=", "2\n")] * 4, None)
    train(model, pairs, 3, answer_only=True, lr=1e-2, progress=False, frozen=("embed_tokens", "lm_head", "norm"))
    for n, p in model.named_parameters():
        frozen = any(f in n for f in ("embed_tokens", "lm_head", "norm"))
        assert torch.equal(p, before[n]) == frozen, n


def test_raw_forms_hold_the_same_item_without_its_template():
    import random

    from obim.bench.tasks.utils import last_number

    rng = random.Random(3)
    for name, make in D.SFT_TASKS.items():
        for _ in range(20):
            ex = make(rng)
            assert ex.raw_prompt and ex.raw_answer and not ex.raw.startswith(ex.prompt), name
            if name in ("gsm8k", "math"):  # the same worked chain, another ending (no answer marker)
                assert ex.answer.split(" ####")[0].split(" the answer")[0] in ex.raw_answer
                assert "####" not in ex.raw and "the answer is" not in ex.raw
                assert last_number(ex.answer) == last_number(ex.raw_answer)
            if name in ("humaneval", "mbpp"):
                ns: dict = {}
                exec(ex.raw_answer, ns)  # the raw function passes its own asserts and the task's tests
                exec(ex.test, ns)
                ns["check"](ns[ex.entry_point])
            if ex.raw_choices:
                assert ex.raw_answer in ex.raw_choices


def test_raw_training_text_comes_from_the_train_split_only():
    from obim.bench.zoo import _sources

    src = _sources(0)
    train_raw = {ex.raw for ex in D.examples(D.SFT_TASKS["math"], "train", 2000, 1000)}
    test_raw = {ex.raw for ex in D.examples(D.SFT_TASKS["math"], "test", 2000, 1000)}
    drawn = {src["raw_math"]()[1] for _ in range(300)}
    assert drawn and not drawn & test_raw
    assert math.isclose(len(drawn & train_raw) / len(drawn), 1.0)
