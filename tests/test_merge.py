"""End to end: tiny Llama models -> obim-merge -> a model transformers loads and generates with; bad inputs fail
with one line naming the culprit, before anything is written."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_llama
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from obim import METHODS, merge
from obim.merging.checkpoint import open_checkpoint
from obim.merging.cli import merge_main
from obim.merging.config import load_config
from obim.merging.errors import ObimError


def cfg(zoo, method="obim", **kw):
    models = []
    cap = METHODS[method].max_models if method in METHODS else None  # slerp: 2
    for name, r in [("lm", 0.4), ("math", 0.45), ("code", 0.1)][:cap]:
        m = {"name": name, "path": str(zoo[name]), "retention": r}
        models.append(m)
    c = {"method": method, "base_model": str(zoo["base"]), "models": models, "seed": 0}
    c.update(kw)
    return c


def with_validation(c, data):
    for m in c["models"]:
        m["validation"] = {"data": str(data), "size": 4, "batch_size": 2}
    return c


def digest(d: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(d.iterdir()):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def load_state(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_cli_merge_loads_and_generates(zoo, val_jsonl, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    c = with_validation(cfg(zoo, order=["math", "lm", "code"]), val_jsonl)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(c))
    out = tmp_path / "merged"
    script = Path(sys.executable).parent / "obim-merge"  # the console script installed beside this Python
    r = subprocess.run([str(script), str(tmp_path / "c.yaml"), str(out), "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "obim_merge.yaml"} <= names
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("2+2", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 4
    resolved = yaml.safe_load((out / "obim_merge.yaml").read_text())
    assert resolved["method"] == "obim" and resolved["order"] == ["math", "lm", "code"]
    assert [m["retention"] for m in resolved["models"]] == [0.4, 0.45, 0.1]
    # the resolved config reproduces the same bytes
    again = tmp_path / "again"
    merge(resolved, again, progress=False)
    assert digest(again) == digest(out)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_is_deterministic_and_changes_weights(method, zoo, val_jsonl, tmp_path):
    c = with_validation(cfg(zoo, method), val_jsonl)
    merge(c, tmp_path / "a", progress=False)
    merge(c, tmp_path / "b", progress=False)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    merged, base = load_state(tmp_path / "a"), load_state(zoo["base"])
    assert merged.keys() == base.keys()
    assert any(not torch.equal(merged[k], base[k]) for k in base)
    c["seed"] = 1
    merge(c, tmp_path / "c", progress=False)
    weights = [(tmp_path / d / "model.safetensors").read_bytes() for d in ("a", "c")]
    changed = weights[0] != weights[1]
    assert changed == (method in ("dare", "della", "obim", "ties_obm"))  # only these draw random numbers


def test_ta_merge_equals_independent_sum(zoo, tmp_path):
    merge(cfg(zoo, "ta", parameters={"lambda": 0.3}), tmp_path / "ta", progress=False)
    merged = load_state(tmp_path / "ta")
    sds = {n: load_state(zoo[n]) for n in ["base", "lm", "math", "code"]}
    for k, b in sds["base"].items():
        want = b.float() + 0.3 * sum(sds[n][k].float() - b.float() for n in ["lm", "math", "code"])
        torch.testing.assert_close(merged[k], want.to(b.dtype))


def test_sharded_output_and_dtype(zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    merge(cfg(zoo, "ties", shard_size=100_000, dtype="bfloat16"), tmp_path / "m", progress=False)
    files = sorted(p.name for p in (tmp_path / "m").glob("*.safetensors"))
    assert len(files) > 1 and (tmp_path / "m" / "model.safetensors.index.json").exists()
    assert all(v.dtype == torch.bfloat16 for v in load_state(tmp_path / "m").values())
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "bfloat16"
    AutoModelForCausalLM.from_pretrained(tmp_path / "m")


def test_sharded_safetensors_input_is_read_through_its_index(zoo, tmp_path):
    """An expert saved in several shards (model.safetensors.index.json) merges to the same bytes as the single
    file it was saved from."""
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "math-sharded"
    AutoModelForCausalLM.from_pretrained(zoo["math"]).save_pretrained(sharded, max_shard_size="100KB")
    assert len(list(sharded.glob("model-*.safetensors"))) > 1 and (sharded / "model.safetensors.index.json").exists()
    ck = open_checkpoint(str(sharded))
    assert set(ck.tensors) == set(load_state(zoo["math"]))
    assert all(torch.equal(ck.get(k), v) for k, v in load_state(zoo["math"]).items())
    merge(cfg(zoo, "ties"), tmp_path / "single", progress=False)
    merge(cfg({**zoo, "math": sharded}, "ties"), tmp_path / "from-shards", progress=False)
    assert (tmp_path / "single" / "model.safetensors").read_bytes() == (
        tmp_path / "from-shards" / "model.safetensors"
    ).read_bytes()


def test_bin_checkpoints_merge_like_safetensors(zoo, tmp_path):
    bins = {}
    for n in ["base", "lm", "math", "code"]:
        d = tmp_path / f"bin-{n}"
        shutil.copytree(zoo[n], d)
        sd = load_file(str(d / "model.safetensors"))
        (d / "model.safetensors").unlink()
        keys = sorted(sd)
        torch.save({k: sd[k] for k in keys[: len(keys) // 2]}, d / "pytorch_model-00001-of-00002.bin")
        torch.save({k: sd[k] for k in keys[len(keys) // 2 :]}, d / "pytorch_model-00002-of-00002.bin")
        bins[n] = d
    merge(cfg(zoo, "ties"), tmp_path / "st", progress=False)
    merge(cfg(bins, "ties"), tmp_path / "bin", progress=False)
    a, b = load_state(tmp_path / "st"), load_state(tmp_path / "bin")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_vocab_rows_differ(zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    big = make_llama(tmp_path / "big", 7, base=zoo["base"], vocab=65, extra_tokens=1)
    c = cfg(zoo, "ta")
    c["models"][2]["path"] = str(big)
    merge(c, tmp_path / "base-vocab", progress=False)
    c["tokenizer_source"] = "code"
    merge(c, tmp_path / "big-vocab", progress=False)
    small, large = load_state(tmp_path / "base-vocab"), load_state(tmp_path / "big-vocab")
    bigsd = load_state(big)
    for k in ["model.embed_tokens.weight", "lm_head.weight"]:
        assert small[k].shape[0] == 64 and large[k].shape[0] == 65
        assert torch.equal(large[k][:64], small[k])  # shared rows merged the same way
        assert torch.equal(large[k][64], bigsd[k][64])  # the extra row comes from the only model that has it
    assert json.loads((tmp_path / "big-vocab" / "config.json").read_text())["vocab_size"] == 65
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "big-vocab")
    assert model.get_input_embeddings().weight.shape[0] == 65


def test_vocab_tensors_are_declared_per_architecture(zoo, tmp_path):
    from obim.merging.architectures import is_vocab_tensor

    # BERT's attention output projection is not a vocabulary matrix, though the fallback pattern matches it
    assert not is_vocab_tensor("bert.encoder.layer.0.attention.output.dense.weight", "bert")
    assert is_vocab_tensor("bert.embeddings.word_embeddings.weight", "bert")
    assert is_vocab_tensor("lm_head.weight", "llama")
    assert not is_vocab_tensor("model.layers.0.mlp.up_proj.weight", "llama")
    assert is_vocab_tensor("transformer.wte.weight", "my_custom_lm")  # undeclared: the name pattern
    # the merge asks the declaration: relabelled as GPT-2 (vocabulary rows in transformer.wte / lm_head), the Llama
    # names that differ in rows are refused; as Llama, the same files merge (test_vocab_rows_differ)
    big = make_llama(tmp_path / "big", 7, base=zoo["base"], vocab=65, extra_tokens=1)
    models = {}
    for name, src in (("base", zoo["base"]), ("lm", zoo["lm"]), ("math", zoo["math"]), ("code", big)):
        models[name] = tmp_path / f"gpt2-{name}"
        shutil.copytree(src, models[name])
        conf = json.loads((models[name] / "config.json").read_text())
        conf["model_type"] = "gpt2"
        (models[name] / "config.json").write_text(json.dumps(conf))
    c = cfg({**zoo, **models}, "ta")
    with pytest.raises(ObimError, match=r"tensor model.embed_tokens.weight: shapes differ"):
        merge(c, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------- bad input


def fails(c, out: Path, match: str, **kw):
    with pytest.raises(ObimError, match=match) as e:
        merge(c, out, progress=False, **kw)
    assert "\n" not in str(e.value)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if "obim-tmp" in p.name]


def test_bad_options(zoo, tmp_path):
    out = tmp_path / "out"
    fails(cfg(zoo, "nope"), out, r"unknown method 'nope'.*obim.*ties")
    fails(cfg(zoo, "ties", parameters={"densty": 0.2}), out, r"densty.*valid: density, lambda")
    fails(cfg(zoo, "ties", parameters={"density": 1.5}), out, r"density.*\[0.0, 1.0\]")
    c = cfg(zoo, "ties")
    c["models"][0]["parameters"] = {"lambda": 2}
    fails(c, out, r"lambda.*method-wide")
    c = cfg(zoo, "obim", order="rotation")
    c["models"][1]["retention"] = 0.6
    fails(c, out, r"sum to at most 1.*1.1")
    c["models"][1]["retention"] = -0.1
    fails(c, out, r"models\[1\] \(math\).*retention")
    fails(cfg(zoo, "obim", order=["math", "lm", "cod"]), out, r"order: unknown model 'cod'")
    fails(cfg(zoo, "obim", order=["math", "lm"]), out, r"order: model 'code' is missing")
    fails(cfg(zoo, "obim", order=["math", "lm", "lm"]), out, r"listed twice")
    fails(cfg(zoo, "della", parameters={"density": 0.95, "epsilon": 0.1}), out, r"density \+ epsilon")
    fails(cfg(zoo, "ta", dtype="int8"), out, r"dtype")
    fails(cfg(zoo, "ta", tokenizer_source="other"), out, r"tokenizer_source")
    fails({**cfg(zoo, "ta"), "extra": 1}, out, r"unknown key\(s\) extra")
    fails(cfg(zoo, "obim"), out, r"needs hdiag statistics")
    if not torch.cuda.is_available():
        fails(cfg(zoo, "ta"), out, r"CUDA is not available", device="cuda")


def test_bad_models(zoo, tmp_path):
    out = tmp_path / "out"
    # missing tensor
    bad = tmp_path / "missing"
    shutil.copytree(zoo["math"], bad)
    sd = load_file(str(bad / "model.safetensors"))
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, str(bad / "model.safetensors"))
    c = cfg(zoo, "ta")
    c["models"][1]["path"] = str(bad)
    fails(c, out, r"tensor model.layers.1.mlp.up_proj.weight is missing in model 'math'")
    # shapes that differ outside the vocabulary rows
    wide = make_llama(tmp_path / "wide", 3, hidden=96)
    c["models"][1]["path"] = str(wide)
    fails(c, out, r"tensor \S+: shapes differ \(base: \[64, 64\], lm: \[64, 64\], math: \[64, 96\]")
    # another architecture
    arch = tmp_path / "arch"
    shutil.copytree(zoo["math"], arch)
    conf = json.loads((arch / "config.json").read_text())
    conf.update(model_type="mistral", architectures=["MistralForCausalLM"])
    (arch / "config.json").write_text(json.dumps(conf))
    c["models"][1]["path"] = str(arch)
    fails(c, out, r"model 'math'.*MistralForCausalLM.*architectures differ")
    # NaN in a task vector: found mid-stream, nothing left behind
    nan = tmp_path / "nan"
    shutil.copytree(zoo["math"], nan)
    sd = load_file(str(nan / "model.safetensors"))
    sd["model.layers.1.self_attn.v_proj.weight"][3, 5] = float("nan")
    save_file(sd, str(nan / "model.safetensors"))
    c["models"][1]["path"] = str(nan)
    fails(c, out, r"tensor model.layers.1.self_attn.v_proj.weight: task vector of model 'math' has NaN")
    # truncated file
    trunc = tmp_path / "trunc"
    shutil.copytree(zoo["math"], trunc)
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    c["models"][1]["path"] = str(trunc)
    fails(c, out, r"trunc/model.safetensors: truncated")
    # not a model / offline hub id
    c["models"][1]["path"] = str(tmp_path / "nowhere")
    fails(c, out, r"nowhere: model directory not found")
    c["models"][1]["path"] = "someone/some-model"
    fails(c, out, r"some-model.*hub is offline")


def test_bad_saliency_inputs(zoo, val_jsonl, tmp_path):
    out = tmp_path / "out"
    h = tmp_path / "h.safetensors"
    c = cfg(zoo, "obim")
    c["models"] = c["models"][:1]
    c["models"][0]["hdiag"] = str(h)
    meta = {"model_fingerprint": open_checkpoint(str(zoo["lm"])).fingerprint()}
    save_file({"model.layers.0.mlp.down_proj.weight": torch.ones(7)}, str(h), metadata=meta)
    fails(c, out, r"h.safetensors: hdiag tensor model.layers.0.mlp.down_proj.weight has length 7")
    save_file({"model.layers.0.mlp.nope.weight": torch.ones(7)}, str(h), metadata=meta)
    fails(c, out, r"hdiag tensor model.layers.0.mlp.nope.weight is not a tensor")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    fails(with_validation(cfg(zoo, "obim"), empty), out, r"empty.jsonl: validation set is empty")


def test_refuses_non_empty_out_unless_overwrite(zoo, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg(zoo, "ta")))
    assert merge_main([str(tmp_path / "c.yaml"), str(out), "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not empty" in err and str(out) in err
    assert (out / "keep").exists()
    # --overwrite replaces only what obim wrote
    assert merge_main([str(tmp_path / "c.yaml"), str(out), "--quiet", "--overwrite"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "replaces only a directory obim wrote" in err
    assert (out / "keep").read_text() == "x"
    (out / "keep").unlink()
    assert merge_main([str(tmp_path / "c.yaml"), str(out), "--quiet"]) == 0
    (out / "stray").write_text("x")
    assert merge_main([str(tmp_path / "c.yaml"), str(out), "--quiet", "--overwrite"]) == 0
    assert not (out / "stray").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "out"]


def test_python_api_is_the_cli_path(zoo, tmp_path):
    c = cfg(zoo, "ties_im")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(c))
    assert merge_main([str(tmp_path / "c.yaml"), str(tmp_path / "cli"), "--quiet"]) == 0
    merge(c, tmp_path / "api", progress=False)
    assert digest(tmp_path / "cli") == digest(tmp_path / "api")
    with safe_open(str(tmp_path / "api" / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert sys.modules["obim.merging.merge"]  # the console script imported the same driver


def test_plans_know_the_models_depth(zoo):
    from obim.merging.checkpoint import open_checkpoint
    from obim.merging.config import load_config
    from obim.merging.merge import block_index, plan_merge

    c = load_config(cfg(zoo, "lines"))
    base = open_checkpoint(str(zoo["base"]))
    plans = plan_merge(c, base, [open_checkpoint(m.path) for m in c.models])
    layers = json.loads((Path(zoo["base"]) / "config.json").read_text())["num_hidden_layers"]
    assert {block_index(p.name) for p in plans} == {None, *range(layers)} and {p.n_blocks for p in plans} == {layers}


def test_every_merged_folder_has_a_hub_model_card(zoo, tmp_path, monkeypatch):
    """README.md in the Hub's model-card form: front matter huggingface_hub parses (library, tags, the merge as the
    relation; only Hub ids as base_model, never a local path), the method and models by name (no local path in the
    card: it is meant for upload), the resolved config; the same card again from obim_merge.yaml."""
    from huggingface_hub import ModelCard

    from obim.merging.card import hub_id

    monkeypatch.chdir(zoo["base"].parent)  # relative paths in the config, as a user writes them
    c = cfg({k: Path(v.name) for k, v in zoo.items()}, "ties")
    merge(c, tmp_path / "m", progress=False)
    text = (tmp_path / "m" / "README.md").read_text()
    card = ModelCard.load(tmp_path / "m" / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["tags"] == ["merge", "obim", "ties"]
    assert "base_model" not in data  # the inputs are local folders
    assert "**TIES** (`ties`, https://arxiv.org/abs/2306.01708)" in card.text
    assert "- base: `local: base`" in card.text and "- math: `local: math` (density=0.2" in card.text
    assert str(zoo["base"].parent) not in text  # no local path anywhere
    fenced = yaml.safe_load(card.text.split("```yaml\n")[1].split("```")[0])
    assert fenced["base_model"] == "local: base" and [m["path"] for m in fenced["models"]] == [
        "local: lm",
        "local: math",
        "local: code",
    ]
    # obim_merge.yaml (absolute paths) merges to the same folder, card included
    merge(str(tmp_path / "m" / "obim_merge.yaml"), tmp_path / "again", progress=False)
    assert digest(tmp_path / "again") == digest(tmp_path / "m")
    # Hub ids are named as they are, and listed as the merge's base models
    assert hub_id("meta-llama/Llama-2-13b-hf") == "meta-llama/Llama-2-13b-hf" and hub_id("gpt2") == "gpt2"
    assert hub_id(str(zoo["base"])) is None and hub_id("not a/hub id") is None


def test_lines_needs_two_blocks_at_least(tmp_path):
    from obim.bench.zoo.tiny import make_llama

    base = make_llama(tmp_path / "base", 0, layers=1)
    expert = make_llama(tmp_path / "x", 1, layers=1, base=base)
    c = {"method": "lines", "base_model": str(base), "models": [{"name": "x", "path": str(expert)}]}
    with pytest.raises(ObimError, match=r"lines scales by depth, but the base .* has 1 decoder block") as e:
        merge(c, tmp_path / "out", progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


def test_a_card_names_hub_models_as_its_base_models():
    from huggingface_hub import ModelCardData

    from obim.merging.card import model_card

    c = load_config(
        {
            "method": "ta",
            "base_model": "meta-llama/Llama-2-13b-hf",
            "models": [{"name": "lm", "path": "WizardLMTeam/WizardLM-13B-V1.2"}, {"name": "x", "path": "gpt2"}],
        }
    )
    text = model_card(c, c.to_dict())
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["base_model"] == ["meta-llama/Llama-2-13b-hf", "WizardLMTeam/WizardLM-13B-V1.2", "gpt2"]
    assert front["base_model_relation"] == "merge" and ModelCardData(**front).to_dict()["base_model"][0].startswith(
        "meta-llama"
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_task_vectors_are_the_torch_ops_bytes_and_find_every_nan_or_inf(dtype, monkeypatch):
    """The task vector's fused pass (widen, subtract the base, look for NaN/Inf; used once numba is loaded) gives
    float32(t) - base bit for bit, and reports one non-finite entry anywhere (in a later chunk too), and an
    overflow of the subtraction."""
    from obim.merging import kernels
    from obim.merging import merge as merge_mod

    kernels.warm(1)
    monkeypatch.setattr(merge_mod, "_kernels_ready", type("Set", (), {"is_set": staticmethod(lambda: True)})())
    g = torch.Generator().manual_seed(0)
    n = 3 * merge_mod._FUSED_CHUNK + 17
    t = (torch.randn(n, generator=g) * 0.02).to(dtype)
    base = (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16).float()
    cpu = torch.device("cpu")
    for sub in (base, None):
        d, finite = merge_mod._float32_minus(t, sub, cpu)
        want = t.float() - sub if sub is not None else t.float()
        assert finite and torch.equal(d.view(torch.int32), want.view(torch.int32))
    for bad in (float("nan"), float("inf"), float("-inf")):
        u = t.clone()
        u[2 * merge_mod._FUSED_CHUNK + 5] = bad  # in the third chunk
        assert not merge_mod._float32_minus(u, base, cpu)[1]
    big = torch.full((n,), 3e38, dtype=torch.float32)  # finite inputs whose difference overflows: an Inf
    assert not merge_mod._float32_minus(big, -big, cpu)[1]
