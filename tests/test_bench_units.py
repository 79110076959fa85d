"""Units of the harness that decide whether work is redone or how it is reported: a model's fingerprint, the task
folders' fingerprint, a score waiting for a judge, the W&B mode, and the merge config's size option."""

from __future__ import annotations

import os
import shutil

import pytest

from obim.bench import evaluation
from obim.bench.cache import model_fingerprint
from obim.bench.stages import judge_pending
from obim.bench.tracking import wandb_mode
from obim.merging.config import parse_size
from obim.merging.errors import ObimError


def test_model_fingerprint_follows_config_index_and_weight_files(tmp_path):
    m = tmp_path / "m"
    m.mkdir()
    (m / "config.json").write_text('{"model_type": "llama"}')
    (m / "model.safetensors").write_bytes(b"x" * 10)
    (m / "README.md").write_text("a model")
    fp = model_fingerprint(str(m))
    assert model_fingerprint(str(m)) == fp
    (m / "README.md").write_text("another card")  # not part of the weights
    assert model_fingerprint(str(m)) == fp
    st = (m / "model.safetensors").stat()
    os.utime(m / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # rewritten in place
    assert model_fingerprint(str(m)) != fp
    fp = model_fingerprint(str(m))
    (m / "config.json").write_text('{"model_type": "llama", "vocab_size": 65}')
    assert model_fingerprint(str(m)) != fp
    fp = model_fingerprint(str(m))
    (m / "model-00002-of-00002.safetensors").write_bytes(b"y")  # a new shard
    assert model_fingerprint(str(m)) != fp
    fp = model_fingerprint(str(m))
    (m / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    assert model_fingerprint(str(m)) != fp
    copy = tmp_path / "copy"
    shutil.copytree(m, copy, copy_function=shutil.copy2)  # same files, another place
    assert model_fingerprint(str(copy)) != model_fingerprint(str(m))
    assert model_fingerprint("meta-llama/Llama-2-13b-hf") == "hub:meta-llama/Llama-2-13b-hf"


def test_a_task_edit_invalidates_that_task_only(tmp_path, monkeypatch):
    """The evaluation cache is keyed by each task's own files: its YAML, its includes, the modules its hooks load."""
    root = tmp_path / "tasks"
    shutil.copytree(evaluation.tasks_dir(), root, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(evaluation, "tasks_dir", lambda: str(root))
    tasks = ["toy_gsm8k", "toy_mmlu", "toy_math", "obim_math_cot", "obim_gsm8k_cot", "obim_gsm8k_cot_dev", "gsm8k"]

    def digests() -> dict[str, str]:
        return {t: evaluation.tasks_digest([t]) for t in tasks}

    def edit(rel: str) -> set[str]:
        before = digests()
        with open(root / rel, "a") as f:
            f.write("\n# edited\n")
        after = digests()
        return {t for t in tasks if after[t] != before[t]}

    assert edit("toy_gsm8k.yaml") == {"toy_gsm8k"}
    assert edit("_toy_choice_template") == {"toy_mmlu"}  # toy_gsm8k and toy_math generate
    assert edit("utils.py") == {"toy_gsm8k", "toy_mmlu", "toy_math"}  # their scorers and datasets
    assert edit("paper/obim_math_cot_algebra.yaml") == {"obim_math_cot"}  # a group member
    # a hook module's obim imports: the dev task re-exports the paper task's scorer
    assert edit("paper/utils.py") == {"obim_math_cot", "obim_gsm8k_cot", "obim_gsm8k_cot_dev"}
    assert "-" not in evaluation._task_files(root.resolve())  # a group's member list is no task of its own
    assert evaluation.tasks_digest(["gsm8k"]) == evaluation.tasks_digest([])  # lm-eval's own: its version keys it


def test_a_result_waits_for_a_judge_only_when_one_is_configured(monkeypatch):
    from obim.bench import judge

    scored = {
        "scores": {"obim_alpaca_eval": 80.0, "toy_mmlu": 50.0},
        "individual": {"base": {"scores": {"obim_alpaca_eval": 10.0}}},
    }
    unjudged = {**scored, "scores": {"obim_alpaca_eval": None, "toy_mmlu": 50.0}}
    base_unjudged = {**scored, "individual": {"base": {"scores": {"obim_alpaca_eval": None}}}}
    missing_other = {**scored, "scores": {"obim_alpaca_eval": 80.0, "toy_mmlu": None}}  # not a judged task
    monkeypatch.setattr(judge, "judge_configured", lambda: True)
    assert [judge_pending(r) for r in (scored, unjudged, base_unjudged, missing_other)] == [False, True, True, False]
    monkeypatch.setattr(judge, "judge_configured", lambda: False)
    assert not judge_pending(unjudged) and not judge_pending(base_unjudged)


def test_wandb_mode(tmp_path, monkeypatch):
    for k in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(k, raising=False)
    netrc = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc))
    assert wandb_mode(None) == "offline"  # no key, no login: never the network
    netrc.write_text("machine example.org login u password p\n")
    assert wandb_mode(None) == "offline"
    netrc.write_text("machine api.wandb.ai login user password key\n")
    netrc.chmod(0o600)
    assert wandb_mode(None) == "online"  # `wandb login`
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert wandb_mode(None) == "offline"  # logged in elsewhere
    monkeypatch.setenv("WANDB_API_KEY", "k")
    assert wandb_mode(None) == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode(None) == "disabled"
    assert wandb_mode("offline") == "offline"  # tracking.mode wins


def test_parse_size():
    assert parse_size(5_000_000_000, "shard_size") == 5_000_000_000
    assert parse_size("5GB", "shard_size") == 5 * 10**9 and parse_size("5 gb", "shard_size") == 5 * 10**9
    assert parse_size("1.5MB", "shard_size") == 1_500_000 and parse_size("100", "shard_size") == 100
    assert parse_size("2GiB", "shard_size") == 2 * 2**30 and parse_size("512KiB", "shard_size") == 512 * 2**10
    for bad in ("", "abc", "0", "0.1", "-5GB", "5XB", True, 0, -1, None):
        with pytest.raises(ObimError, match=r"^shard_size: "):
            parse_size(bad, "shard_size")


def test_a_task_edit_redoes_the_jobs_that_evaluate_it(tmp_path, monkeypatch):
    """A job's plan hash (what resume compares) follows its tasks' files: a rerun redoes a job whose task changed."""
    from conftest import compose

    from obim.bench.plan import plan_job

    root = tmp_path / "tasks"
    shutil.copytree(evaluation.tasks_dir(), root, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(evaluation, "tasks_dir", lambda: str(root))
    sft, pt = (plan_job(compose("method=ta", f"experiment.zoo={tmp_path}", *o)) for o in ([], ["experiment=toy_pt"]))
    before = sft.hash(), pt.hash()
    with open(root / "toy_gsm8k.yaml", "a") as f:
        f.write("\n# edited\n")
    assert sft.hash() != before[0] and pt.hash() == before[1]  # toy_pt does not evaluate toy_gsm8k


# ------------------------------------------------------------------------------------------------ standard errors


def test_a_scores_standard_error_is_lm_evals_own_in_points():
    from obim.bench.evaluation import task_items, task_score, task_stderr

    out = {
        "results": {"t": {"alias": "t", "acc,none": 0.75, "acc_stderr,none": 0.0625, "acc_norm,none": 0.5}},
        "n-samples": {"t": {"original": 40, "effective": 16}},
    }
    assert task_score(out, "t") == 75.0
    assert task_stderr(out, "t") == pytest.approx(6.25)  # the chosen metric's stderr, not another's
    assert task_items(out, "t") == 16  # after eval.limit
    out["results"]["t"]["acc_stderr,none"] = "N/A"  # lm-eval's mark where it computed none
    assert task_stderr(out, "t") is None


def test_a_group_scored_as_its_subtasks_mean_combines_their_errors():
    from obim.bench.evaluation import task_items, task_score, task_stderr

    out = {
        "results": {
            "a": {"acc,none": 0.5, "acc_stderr,none": 0.03},
            "b": {"acc,none": 0.7, "acc_stderr,none": 0.04},
            "g": {"alias": "g"},  # a group that aggregates no metric itself
        },
        "group_subtasks": {"g": ["a", "b"]},
        "n-samples": {"a": {"effective": 10}, "b": {"effective": 30}},
    }
    assert task_score(out, "g") == pytest.approx(60.0)
    assert task_stderr(out, "g") == pytest.approx(100 * (0.03**2 + 0.04**2) ** 0.5 / 2)  # 2.5 points
    assert task_items(out, "g") == 40


def test_the_averages_error_is_the_root_sum_of_squares_over_k():
    from obim.bench.stages import Evaluated, avg_stderr

    assert avg_stderr([3.0, 4.0]) == pytest.approx(2.5)  # sqrt(9 + 16) / 2
    assert avg_stderr([3.0, None]) is None and avg_stderr([]) is None
    ev = Evaluated({"a": 50.0, "b": 70.0}, 60.0, 1.0, False, stderr={"a": 3.0, "b": 4.0}, n={"a": 10, "b": 10})
    assert ev.avg_stderr == pytest.approx(2.5)
    assert Evaluated({"a": None}, None, 1.0, False, stderr={"a": None}).avg_stderr is None
