"""Bad input and hostile conditions (issue 11): non-finite numbers, outputs that would destroy inputs, hdiag files
for another model or part of one, merges killed midway, and malformed files and options. Each is refused with one
line naming the culprit, before anything is written, or cleaned up."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
import yaml
from conftest import compose, start_merge, wait_mid_merge
from safetensors.torch import load_file, save_file

from obim import METHODS, load_config, merge
from obim.merging.checkpoint import Checkpoint, open_checkpoint
from obim.merging.cli import merge_main, saliency_main
from obim.merging.errors import ObimError
from obim.merging.saliency import expected_hdiag, load_hdiag

RET = {"lm": 0.4, "math": 0.45, "code": 0.1}


def cfg(zoo, method="ta", **kw):
    models = [
        {"name": n, "path": str(zoo[n]), **({"retention": r} if METHODS[method].retention_param == "retention" else {})}
        for n, r in RET.items()
    ]
    return {"method": method, "base_model": str(zoo["base"]), "models": models, "seed": 0, **kw}


def one_line_refusal(fn, match: str) -> str:
    with pytest.raises(ObimError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and __import__("re").search(match, msg), msg
    return msg


# ---------------------------------------------------------------------------------------- non-finite numbers

NUMERIC = sorted(
    (m.name, p.name)
    for m in METHODS.values()
    for p in m.params
    if p.default is None or (isinstance(p.default, (int, float)) and not isinstance(p.default, bool))
)


def test_every_numeric_parameter_is_listed():
    # the table below covers each method's numbers; a new numeric parameter shows up here
    assert ("ta", "lambda") in NUMERIC and ("dare", "drop_rate") in NUMERIC and ("obim", "retention") in NUMERIC
    assert ("tall_mask", "k") in NUMERIC and ("della", "epsilon") in NUMERIC and len(NUMERIC) >= 22


@pytest.mark.parametrize(("method", "param"), NUMERIC)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_parameters_refused(zoo, method, param, bad):
    c = cfg(zoo, method, parameters={param: bad})
    if METHODS[method].uses_saliency:
        for m in c["models"]:
            m[METHODS[method].statistics] = "unused.safetensors"
    one_line_refusal(
        lambda: load_config(c),
        rf"parameters: parameter `{param}` of method {method} must be a "
        rf"finite number, got -?(nan|inf)",
    )
    p = {q.name: q for q in METHODS[method].params}[param]
    if p.per_model:  # one model's own value, and its `retention` key
        c = cfg(zoo, method, parameters={})
        if METHODS[method].uses_saliency:
            for m in c["models"]:
                m[METHODS[method].statistics] = "unused.safetensors"
        c["models"][1]["parameters"] = {param: bad}
        one_line_refusal(lambda: load_config(c), rf"models\[1\] \(math\).*`{param}`.*finite")


@pytest.mark.parametrize("yaml_value", [".nan", ".inf", "-.inf"])
def test_cli_refuses_non_finite_before_writing(zoo, tmp_path, capsys, yaml_value):
    text = yaml.safe_dump(cfg(zoo, "dare")).replace("seed: 0", f"seed: 0\nparameters: {{drop_rate: {yaml_value}}}")
    (tmp_path / "c.yaml").write_text(text)
    assert merge_main([str(tmp_path / "c.yaml"), str(tmp_path / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "drop_rate" in err and "finite" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("method.parameters.lambda=nan", r"`lambda` of method ta must be a finite number"),
        ("method.parameters.lambda=inf", r"`lambda` of method ta must be a finite number"),
        ("retention=nan", r"retention: must be a finite number"),
    ],
)
def test_sweep_plan_refuses_non_finite(tmp_path, override, message):
    from obim.bench.plan import plan_job

    method = "method=obim" if override.startswith("retention") else "method=ta"
    one_line_refusal(lambda: plan_job(compose(method, override, f"experiment.zoo={tmp_path}")), message)


# ------------------------------------------------------------------------------------ outputs and inputs


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["input", "parent", "inside"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_out_never_destroys_an_input(zoo, tmp_path, capsys, where, overwrite):
    import shutil

    root = tmp_path / "models"
    for n in ("base", "lm", "math", "code"):
        shutil.copytree(zoo[n], root / n)
    local = {n: root / n for n in ("base", "lm", "math", "code")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg(local, "ta")))
    out = {"input": root / "math", "parent": root, "inside": root / "lm" / "merged"}[where]
    before = _snapshot(root)
    args = [str(tmp_path / "c.yaml"), str(out), "--quiet"] + (["--overwrite"] if overwrite else [])
    assert merge_main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    word = {"input": "is model 'math'", "parent": "contains the base model", "inside": "lies inside model 'lm'"}
    assert word[where] in err, err
    assert _snapshot(root) == before and not (root / "lm" / "merged").exists()
    assert not list(root.glob(".*")) and not list(tmp_path.glob(".*"))


def test_out_may_not_hold_the_config_or_hdiag_file(zoo, tmp_path, val_jsonl):
    c = cfg(zoo, "ta")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(c))
    (tmp_path / "obim_merge.yaml").write_text("")  # even a folder obim seems to have written
    one_line_refusal(
        lambda: merge(str(tmp_path / "c.yaml"), tmp_path, overwrite=True, progress=False), "contains the merge config"
    )
    h = tmp_path / "h" / "lm.safetensors"
    h.parent.mkdir()
    assert saliency_main([str(zoo["lm"]), str(h), "--data", str(val_jsonl), "--size", "2", "--quiet"]) == 0
    c = cfg(zoo, "obim")
    c["models"] = [{**c["models"][0], "hdiag": str(h), "retention": 0.5}]
    one_line_refusal(
        lambda: merge(c, tmp_path / "h", overwrite=True, progress=False), "contains the hdiag file of 'lm'"
    )
    assert h.is_file()


# ------------------------------------------------------------------------------------------ hdiag files


@pytest.fixture(scope="module")
def hdiag_lm(zoo, val_jsonl, tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("hd") / "lm.safetensors"
    assert saliency_main([str(zoo["lm"]), str(p), "--data", str(val_jsonl), "--size", "3", "--quiet"]) == 0
    return p


def _obim_lm(zoo, hdiag: Path) -> dict:
    return {
        "method": "obim",
        "base_model": str(zoo["base"]),
        "seed": 0,
        "models": [{"name": "lm", "path": str(zoo["lm"]), "retention": 0.5, "hdiag": str(hdiag)}],
    }


def test_hdiag_records_model_and_texts(zoo, hdiag_lm, val_jsonl):
    import hashlib

    _, meta = load_hdiag(hdiag_lm)
    assert meta["model_fingerprint"] == open_checkpoint(str(zoo["lm"])).fingerprint()
    texts = [json.loads(line)["text"] for line in val_jsonl.read_text().splitlines()[:3]]
    assert meta["texts_sha256"] == hashlib.sha256(json.dumps(texts).encode()).hexdigest()
    # exactly the model's linear weights: q/k/v/o, gate/up/down per layer, and the untied lm_head
    layers = open_checkpoint(str(zoo["lm"])).config["num_hidden_layers"]
    assert len(expected_hdiag(open_checkpoint(str(zoo["lm"])))) == 7 * layers + 1
    assert sorted(load_hdiag(hdiag_lm)[0]) == expected_hdiag(open_checkpoint(str(zoo["lm"])))


def test_fingerprint_tells_models_apart_not_copies(zoo, tmp_path):
    import shutil

    fp = {n: open_checkpoint(str(zoo[n])).fingerprint() for n in ("base", "lm", "math")}
    assert len(set(fp.values())) == 3
    shutil.copytree(zoo["lm"], tmp_path / "copy")
    assert open_checkpoint(str(tmp_path / "copy")).fingerprint() == fp["lm"]
    # resharded and stored as .bin: the same weights, the same fingerprint
    state = load_file(str(zoo["lm"] / "model.safetensors"))
    (tmp_path / "bin").mkdir()
    shutil.copy(zoo["lm"] / "config.json", tmp_path / "bin")
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    assert Checkpoint("bin", tmp_path / "bin").fingerprint() == fp["lm"]
    # one changed entry of one tensor (where a sample falls) changes it
    name = sorted(state)[3]
    state[name].view(-1)[0] += 1e-3
    (tmp_path / "edit").mkdir()
    shutil.copy(zoo["lm"] / "config.json", tmp_path / "edit")
    save_file(state, str(tmp_path / "edit" / "model.safetensors"))
    assert Checkpoint("edit", tmp_path / "edit").fingerprint() != fp["lm"]


@pytest.mark.parametrize("case", ["empty", "partial", "other_model", "no_fingerprint"])
def test_incomplete_or_foreign_hdiag_refused(zoo, hdiag_lm, tmp_path, case):
    stats, meta = load_hdiag(hdiag_lm)
    bad = tmp_path / "bad.safetensors"
    if case == "empty":
        save_file({}, str(bad), metadata=meta)
        match = r"bad.safetensors: hdiag covers 0 linear weights of model .*; missing .* and \d+ more"
    elif case == "partial":
        one = sorted(stats)[0]
        save_file({one: stats[one]}, str(bad), metadata=meta)
        match = r"hdiag covers 1 linear weights"
    elif case == "other_model":
        save_file(
            stats, str(bad), metadata={**meta, "model_fingerprint": open_checkpoint(str(zoo["math"])).fingerprint()}
        )
        match = r"computed for another model"
    else:
        save_file(stats, str(bad), metadata={k: v for k, v in meta.items() if k != "model_fingerprint"})
        match = r"records no model fingerprint"
    one_line_refusal(lambda: merge(_obim_lm(zoo, bad), tmp_path / "out", progress=False), match)
    assert not (tmp_path / "out").exists()
    merge(_obim_lm(zoo, hdiag_lm), tmp_path / "ok", progress=False)  # the complete file is accepted


# --------------------------------------------------------------------------------- merges killed midway


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def test_sigterm_mid_merge_leaves_nothing(zoo, tmp_path):
    out = tmp_path / "out"
    proc = start_merge(cfg(zoo, "ties"), out, tmp_path)
    wait_mid_merge(proc, out)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 143 and "terminated; nothing was written" in err
    assert _leftovers(out) == [] and not out.exists()


def test_kill9_mid_merge_cleaned_by_the_next_run(zoo, tmp_path):
    out = tmp_path / "out"
    proc = start_merge(cfg(zoo, "ties"), out, tmp_path)
    staging = wait_mid_merge(proc, out)
    proc.kill()
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and staging.is_dir() and len(_leftovers(out)) == 2  # dir + lock
    merge(cfg(zoo, "ties"), out, progress=False)
    assert _leftovers(out) == [] and (out / "model.safetensors").is_file()


def test_live_writer_staging_is_not_removed(zoo, tmp_path):
    """Two writers of one OUT: the second must not clean up the first one's staging while it runs."""
    out = tmp_path / "out"
    proc = start_merge(cfg(zoo, "ta"), out, tmp_path)
    staging = wait_mid_merge(proc, out)
    other = tmp_path / "side"
    merge(cfg(zoo, "ta"), other, progress=False)  # a different OUT in the same folder
    from obim.merging.staging import clean_stale_staging

    assert clean_stale_staging(out.parent) == [] and staging.is_dir()
    proc.kill()
    proc.wait(timeout=60)
    assert staging in clean_stale_staging(out.parent) and _leftovers(out) == []


# ------------------------------------------------------------------------------ malformed files, options


def test_index_without_weight_map(zoo, tmp_path):
    import shutil

    shutil.copytree(zoo["lm"], tmp_path / "m")
    (tmp_path / "m" / "model.safetensors.index.json").write_text('{"metadata": {}}')
    one_line_refusal(
        lambda: open_checkpoint(str(tmp_path / "m")),
        r"model.safetensors.index.json: expected a "
        r"non-empty `weight_map`",
    )
    (tmp_path / "m" / "model.safetensors.index.json").write_text('{"weight_map": {"x": "../../etc/passwd"}}')
    one_line_refusal(lambda: open_checkpoint(str(tmp_path / "m")), r"is not a file name in")


def test_config_json_not_an_object(zoo, tmp_path):
    import shutil

    shutil.copytree(zoo["lm"], tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("[1, 2]")
    one_line_refusal(lambda: open_checkpoint(str(tmp_path / "m")), r"config.json: expected a JSON object, got a list")


def test_parameters_as_a_list(zoo):
    one_line_refusal(lambda: load_config(cfg(zoo, "ta", parameters=[1, 2])), r"^parameters: expected a mapping")
    c = cfg(zoo, "ties")
    c["models"][0]["parameters"] = ["density", 0.2]
    one_line_refusal(lambda: load_config(c), r"models\[0\] \(lm\).parameters: expected a mapping")


def test_bad_device(zoo, tmp_path, val_jsonl, capsys):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg(zoo, "ta")))
    assert merge_main([str(tmp_path / "c.yaml"), str(tmp_path / "out"), "--device", "tpu", "--quiet"]) == 1
    assert "--device: expected cpu, cuda, cuda:N or mps, got 'tpu'" in capsys.readouterr().err
    assert (
        saliency_main(
            [str(zoo["lm"]), str(tmp_path / "h.safetensors"), "--data", str(val_jsonl), "--device", "tpu", "--quiet"]
        )
        == 1
    )
    assert "--device: expected" in capsys.readouterr().err and not (tmp_path / "out").exists()
    if not torch.cuda.is_available():
        assert merge_main([str(tmp_path / "c.yaml"), str(tmp_path / "out"), "--device", "cuda", "--quiet"]) == 1
        assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method=ta", "seed=abc"], r"^seed: must be an integer, got 'abc'"),
        (["method=ta", "seed=-1"], r"^seed: must be in"),
        (["method=ta", "device=tpu"], r"^device: expected cpu, cuda, cuda:N or mps, got 'tpu'"),
        (["method=ta", "eval.device=tpu"], r"^eval.device: expected"),
        (["method=ta", "eval.limit=-1"], r"^eval.limit: expected null, a positive integer or a fraction"),
        (["method=ta", "eval.limit=abc"], r"^eval.limit: expected null"),
        (["method=ta", "eval.limit=1.5"], r"^eval.limit: expected null"),
        (["method=ta", "eval.batch_size=0"], r"^eval.batch_size: expected a positive integer, auto or auto:N"),
        (
            ["method=obim", "validation.source=nosuch", "validation.size=10"],
            r"^validation.source: 'nosuch' \(model 'lm'\) is not a toy zoo source; one of .*gsm8k",
        ),
        (["method=obim", "validation.max_length=0"], r"^validation.max_length: must be in"),
        (["method=obim", "validation.size=true"], r"^validation.size: must be an integer"),
        (["method=tall_mask", "method.parameters.k=4"], r"`k` of tall_mask is 4, more than the 3 models"),
        # experiments are checked as schemas: a key no code reads is an error, not silently ignored
        (["method=ta", "+experiment.tables=[table1]"], r"^experiment toy_sft: unknown key\(s\) tables; valid: name, "),
        (["method=ta", "experiment.setting=rlhf"], r"^experiment.setting: expected one of sft, pt, got 'rlhf'"),
        (["method=ta", "experiment.zoo_recipe=tiny"], r"^experiment.zoo_recipe: expected full or quick, got 'tiny'"),
        (["method=ta", "experiment.base=null"], r"^experiment toy_sft: `base` is required"),
    ],
)
def test_sweep_plan_one_line_errors(tmp_path, overrides, message):
    from obim.bench.plan import plan_job

    one_line_refusal(lambda: plan_job(compose(*overrides, f"experiment.zoo={tmp_path}")), message)


def test_sweep_plan_accepts_good_limits_and_sources(tmp_path):
    from obim.bench.plan import plan_job

    zoo = f"experiment.zoo={tmp_path}"
    assert plan_job(compose("method=ta", zoo, "eval.limit=0.5")).eval.limit == 0.5
    assert plan_job(compose("method=ta", zoo, "eval.limit=20", "eval.batch_size=auto:4")).eval.limit == 20
    p = plan_job(compose("method=obim", zoo, "validation.source=gsm8k", "validation.size=10"))
    assert p.validation["lm"].sources == {"gsm8k": 10}
    # once the zoo is built, a source must be a file it holds
    (tmp_path / "zoo.json").write_text("{}")
    one_line_refusal(
        lambda: plan_job(compose("method=obim", zoo, "validation.source=gsm8k", "validation.size=10")),
        r"validation.source: 'gsm8k' \(model 'lm'\): no file .*gsm8k/train.jsonl",
    )


@pytest.mark.slow
def test_dry_run_refuses_unknown_source(tmp_path):
    from conftest import REPO, run_sweep

    env = {**os.environ, "OBIM_ZOO": str(tmp_path / "zoo"), "OBIM_CACHE": str(tmp_path / "cache")}
    proc = run_sweep(
        [
            "method=obim",
            "validation.source=nosuch",
            "validation.size=10",
            "dry_run=true",
            "eval.allow_code=true",
            f"hydra.sweep.dir={tmp_path / 'runs'}",
        ],
        env,
        REPO,
    )
    assert proc.returncode != 0 and "validation.source: 'nosuch'" in proc.stderr
    assert not list((tmp_path / "runs").rglob("plan.json"))
    env.pop("HF_ALLOW_CODE_EVAL", None)
    proc = run_sweep(["method=ta", "dry_run=true", f"hydra.sweep.dir={tmp_path / 'runs'}"], env, REPO)
    assert proc.returncode != 0 and "sweep: error: toy_humaneval, toy_mbpp execute model-generated code" in proc.stderr
    assert not list((tmp_path / "runs").rglob("plan.json"))


@pytest.mark.slow  # indexes lm-eval's bundled tasks (TaskManager, ~9 s)
@pytest.mark.parametrize(
    ("experiment", "tasks"), [("toy_sft", "toy_humaneval, toy_mbpp"), ("llama2_13b_sft", "obim_humaneval, obim_mbpp")]
)
def test_code_benchmarks_need_an_opt_in_at_planning(tmp_path, monkeypatch, experiment, tasks):
    from obim.bench.plan import plan_job

    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)
    over = [
        "method=ta",
        f"experiment={experiment}",
        f"experiment.zoo={tmp_path}" if experiment == "toy_sft" else "seed=0",
    ]
    one_line_refusal(
        lambda: plan_job(compose(*over, allow_code=False)),
        rf"^{tasks} execute model-generated code: opt in with eval.allow_code=true",
    )
    assert plan_job(compose(*over)).allow_code is True
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")
    assert plan_job(compose(*over, allow_code=False)).allow_code is False  # the environment's opt-in
    # toy_pt has no code benchmark: no opt-in needed
    monkeypatch.delenv("HF_ALLOW_CODE_EVAL")
    plan_job(compose("method=ta", "experiment=toy_pt", f"experiment.zoo={tmp_path}", allow_code=False))


def test_tall_mask_k_checked(zoo):
    one_line_refusal(lambda: load_config(cfg(zoo, "tall_mask", parameters={"k": 4})), "more than the 3 models")
    one_line_refusal(lambda: load_config(cfg(zoo, "tall_mask", parameters={"k": 0})), r"`k`.*must be in \[1")
    one_line_refusal(lambda: load_config(cfg(zoo, "tall_mask", parameters={"k": 1.5})), r"`k`.*must be an integer")
    assert load_config(cfg(zoo, "tall_mask", parameters={"k": 3})).parameters["k"] == 3


def test_nan_in_the_base_blamed_on_the_base(zoo, tmp_path):
    import shutil

    shutil.copytree(zoo["base"], tmp_path / "base")
    state = load_file(str(tmp_path / "base" / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"
    state[name][0, 0] = float("nan")
    save_file(state, str(tmp_path / "base" / "model.safetensors"))
    c = cfg({**zoo, "base": tmp_path / "base"}, "ta")
    one_line_refusal(
        lambda: merge(c, tmp_path / "out", progress=False), rf"tensor {name}: the base model has NaN or Inf entries"
    )
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path / "out") == []


def test_zoo_build_never_replaces_a_foreign_folder(tmp_path):
    from obim.bench.zoo import build, quick_recipe

    (tmp_path / "zoo").mkdir()
    (tmp_path / "zoo" / "thesis.tex").write_text("years of work")
    one_line_refusal(
        lambda: build(tmp_path / "zoo", recipe=quick_recipe(), evaluate=False, progress=False, log=lambda s: None),
        r"replaces only a directory obim wrote \(it has no zoo.json\)",
    )
    assert (tmp_path / "zoo" / "thesis.tex").read_text() == "years of work"
