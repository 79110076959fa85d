"""obim-saliency under bad input (issue 21): OUT onto an input or over a file obim did not write, bad --dtype, a
corrupt model, --quiet that prints nothing, MoE experts no validation token reached; zoo.json says whether code
was scored."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_llama, make_tokenizer
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from obim import merge
from obim.merging.checkpoint import open_checkpoint
from obim.merging.cli import saliency_main
from obim.merging.errors import ObimError
from obim.merging.saliency import check_hdiag, compute_hdiag, expected_hdiag, load_hdiag


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A model of this module's own: a test that fails may destroy it without harming the session's zoo."""
    return make_llama(tmp_path_factory.mktemp("sal") / "m", 7)


@pytest.fixture
def data(tmp_path) -> Path:
    p = tmp_path / "val.jsonl"
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["the cat sat.", "2+3=5"]))
    return p


def _refused(argv: list[str], capsys, *words: str) -> str:
    assert saliency_main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("obim-saliency: error:") and "\n" not in err, err
    assert all(w in err for w in words), err
    return err


@pytest.fixture
def no_compute(monkeypatch):
    """Refusals come before the model runs."""

    def fail(*a, **k):
        raise AssertionError("compute_hdiag called")

    monkeypatch.setattr("obim.merging.saliency.compute_hdiag", fail)


# ------------------------------------------------------------------------------------ OUT onto an input (1, 11)


def test_out_onto_its_own_weights_or_data_refused(model, data, capsys, no_compute):
    weights = model / "model.safetensors"
    before = {p: p.read_bytes() for p in (weights, data)}
    _refused([str(model), str(weights), "--data", str(data), "--quiet"], capsys, str(weights), "model")
    _refused([str(model), str(data), "--data", str(data), "--quiet"], capsys, "validation data")
    # a new file in the model directory would join the model's weights (*.safetensors)
    _refused([str(model), str(model / "stats.safetensors"), "--data", str(data), "--quiet"], capsys, "model")
    assert not (model / "stats.safetensors").exists()
    assert all(p.read_bytes() == b for p, b in before.items())


def test_out_onto_a_symlinked_weight_file_refused(model, data, tmp_path, capsys, no_compute):
    # a hub snapshot: the model directory holds symlinks to blobs stored elsewhere
    (tmp_path / "blobs").mkdir()
    snap = tmp_path / "snapshot"
    snap.mkdir()
    for f in model.iterdir():
        shutil.copy(f, tmp_path / "blobs" / f.name)
        (snap / f.name).symlink_to(tmp_path / "blobs" / f.name)
    blob = tmp_path / "blobs" / "model.safetensors"
    before = blob.read_bytes()
    _refused(
        [str(snap), str(blob), "--data", str(data), "--quiet"], capsys, str(blob), "is the model's model.safetensors"
    )
    assert blob.read_bytes() == before and (snap / "model.safetensors").resolve() == blob


def test_out_an_existing_directory_or_foreign_file_refused(model, data, tmp_path, capsys, no_compute):
    (tmp_path / "dir").mkdir()
    _refused([str(model), str(tmp_path / "dir"), "--data", str(data), "--quiet"], capsys, "dir", "directory")
    notes = tmp_path / "notes.safetensors"
    notes.write_text("my notes")
    _refused([str(model), str(notes), "--data", str(data), "--quiet"], capsys, str(notes), "not a statistics file")
    other = tmp_path / "weights.safetensors"  # safetensors, but not statistics obim wrote
    save_file({"w": torch.zeros(2, 2)}, str(other))
    _refused([str(model), str(other), "--data", str(data), "--quiet"], capsys, str(other), "not a statistics file")
    assert notes.read_text() == "my notes" and set(load_hdiag_raw(other)) == {"w"}


def load_hdiag_raw(path: Path) -> list[str]:
    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def test_an_existing_hdiag_file_is_replaced(model, data, tmp_path):
    out = tmp_path / "h.safetensors"
    assert saliency_main([str(model), str(out), "--data", str(data), "--size", "1", "--quiet"]) == 0
    assert load_hdiag(out)[1]["samples"] == "1"
    assert saliency_main([str(model), str(out), "--data", str(data), "--quiet"]) == 0
    assert load_hdiag(out)[1]["samples"] == "2"


# --------------------------------------------------------------------------------- --dtype, corrupt models (11)


def test_bad_dtype_refused_before_loading(model, data, tmp_path, capsys, no_compute):
    _refused(
        [str(model), str(tmp_path / "o.safetensors"), "--data", str(data), "--dtype", "int8"], capsys, "--dtype", "int8"
    )


def test_bad_dtype_refused_by_compute_hdiag(model):
    with pytest.raises(ObimError, match=r"dtype.*int8"):
        compute_hdiag(str(model), ["a"], dtype="int8", progress=False)


@pytest.mark.parametrize(
    "case", ["config_garbage", "config_nonsense", "weights_truncated", "weight_missing", "no_tokenizer"]
)
def test_corrupt_model_one_line(model, data, tmp_path, capsys, case):
    bad = tmp_path / "bad"
    shutil.copytree(model, bad)
    if case == "config_garbage":
        (bad / "config.json").write_text("{not json")
    elif case == "config_nonsense":  # valid JSON transformers cannot build a model from
        cfg = json.loads((bad / "config.json").read_text())
        (bad / "config.json").write_text(json.dumps({**cfg, "hidden_size": "wide", "num_hidden_layers": -3}))
    elif case == "weights_truncated":
        w = bad / "model.safetensors"
        w.write_bytes(w.read_bytes()[:-100])
    elif case == "weight_missing":  # transformers would fill it in at random
        w = bad / "model.safetensors"
        sd = load_file(str(w))
        del sd["model.layers.0.mlp.down_proj.weight"]
        save_file(sd, str(w), metadata={"format": "pt"})
    else:
        for f in bad.glob("tokenizer*"):
            f.unlink()
        (bad / "special_tokens_map.json").unlink(missing_ok=True)
    out = tmp_path / "o.safetensors"
    err = _refused([str(bad), str(out), "--data", str(data), "--quiet"], capsys, str(bad))
    assert not out.exists() and (case != "weight_missing" or "lacks model.layers.0.mlp.down_proj.weight" in err)


# --------------------------------------------------------------------------------------------- --quiet (12)


def test_quiet_prints_nothing_on_stderr(model, data, tmp_path, capfd):
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as tlog

    before = (tlog.is_progress_bar_enabled(), are_progress_bars_disabled())
    capfd.readouterr()
    assert saliency_main([str(model), str(tmp_path / "o.safetensors"), "--data", str(data), "--quiet"]) == 0
    out, err = capfd.readouterr()
    assert err == "" and out.count("\n") == 1 and "o.safetensors" in out
    assert (tlog.is_progress_bar_enabled(), are_progress_bars_disabled()) == before  # state restored
    compute_hdiag(str(model), ["a"], progress=False)
    assert capfd.readouterr().err == ""


# ------------------------------------------------------------------------------ MoE experts never routed (13)
# No causal LM of transformers 5 keeps per-expert nn.Linear experts (they are fused 3-D parameters, not scored);
# transformers 4's Mixtral, Qwen2-MoE and OLMoE did. A tiny architecture of that kind, registered with the Auto
# classes, drives the same path: an expert no token chose is never called, so its hook never fires.

# this section's imports stay with it
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel  # noqa: E402
from transformers.modeling_outputs import CausalLMOutput  # noqa: E402  (as above)


class TinyMoeConfig(PretrainedConfig):
    model_type = "obim_test_moe"

    def __init__(self, vocab_size: int = 64, hidden_size: int = 32, num_experts: int = 4, **kw):
        self.vocab_size, self.hidden_size, self.num_experts = vocab_size, hidden_size, num_experts
        super().__init__(**kw)


class TinyMoeForCausalLM(PreTrainedModel):
    config_class = TinyMoeConfig
    base_model_prefix = "moe"

    def __init__(self, config: TinyMoeConfig):
        super().__init__(config)
        h = config.hidden_size
        self.embed = torch.nn.Embedding(config.vocab_size, h)
        self.router = torch.nn.Linear(h, config.num_experts)
        self.experts = torch.nn.ModuleList(torch.nn.Linear(h, h, bias=False) for _ in range(config.num_experts))
        self.lm_head = torch.nn.Linear(h, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, attention_mask=None, **kw):
        x = self.embed(input_ids)
        flat = x.reshape(-1, x.shape[-1])
        choice = self.router(flat).argmax(-1)  # top-1
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            idx = (choice == e).nonzero().squeeze(-1)
            if idx.numel():
                out[idx] = expert(flat[idx])
        return CausalLMOutput(logits=self.lm_head(x + out.reshape(x.shape)))


if "obim_test_moe" not in __import__("transformers").models.auto.configuration_auto.CONFIG_MAPPING:
    AutoConfig.register("obim_test_moe", TinyMoeConfig)
    AutoModelForCausalLM.register(TinyMoeConfig, TinyMoeForCausalLM)

NEVER = ["experts.2.weight", "experts.3.weight"]  # the router's bias rules them out


def make_moe(path: Path, seed: int, base: Path | None = None) -> Path:
    torch.manual_seed(seed)
    m = TinyMoeForCausalLM(TinyMoeConfig())
    with torch.no_grad():
        if base is not None:  # a fine-tune: the base plus noise
            ref = TinyMoeForCausalLM.from_pretrained(base).state_dict()
            for n, p in m.named_parameters():
                p.copy_(ref[n] + 0.02 * torch.randn_like(p))
        m.router.bias.copy_(torch.tensor([0.0, 0.0, -1e4, -1e4]))
    m.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def moe(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe")
    base = make_moe(root / "base", 0)
    return {"base": base, "a": make_moe(root / "a", 1, base), "b": make_moe(root / "b", 2, base)}


def test_unrouted_experts_recorded_warned_and_merged(moe, data, tmp_path, capsys):
    ck = open_checkpoint(str(moe["a"]))
    assert set(NEVER) < set(expected_hdiag(ck))
    files = {}
    for name in ("a", "b"):
        files[name] = tmp_path / f"{name}.safetensors"
        assert saliency_main([str(moe[name]), str(files[name]), "--data", str(data), "--quiet"]) == 0
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "warning" in err and "2 linear weights" in err and NEVER[0] in err, err
    stats, meta = load_hdiag(files["a"])
    assert json.loads(meta["unrouted"]) == NEVER and not set(NEVER) & set(stats)
    assert set(stats) | set(NEVER) == set(expected_hdiag(ck))
    check_hdiag(stats, meta, ck, "a")  # accepted: the gaps are recorded
    cfg = {
        "method": "obim",
        "base_model": str(moe["base"]),
        "seed": 0,
        "models": [{"name": n, "path": str(moe[n]), "retention": 0.5, "hdiag": str(files[n])} for n in files],
    }
    merge(cfg, tmp_path / "merged", progress=False)
    assert open_checkpoint(str(tmp_path / "merged")).tensors.keys() == ck.tensors.keys()
    # the same through the merge's own `validation:` path
    val = {
        **cfg,
        "models": [
            {"name": n, "path": str(moe[n]), "retention": 0.5, "validation": {"data": str(data)}} for n in files
        ],
    }
    merge(val, tmp_path / "merged2", progress=False)


def test_missing_weights_not_recorded_unrouted_still_refused(moe, data, tmp_path):
    stats, meta = compute_hdiag(str(moe["a"]), ["the cat sat."], progress=False)
    ck = open_checkpoint(str(moe["a"]))
    routed = sorted(stats)[0]
    with pytest.raises(ObimError, match=f"missing {routed}"):
        check_hdiag({k: v for k, v in stats.items() if k != routed}, meta, ck, "x")
    with pytest.raises(ObimError, match=r"missing experts.2.weight and 1 more"):
        check_hdiag(stats, {**meta, "unrouted": "[]"}, ck, "x")
    with pytest.raises(ObimError, match="unrouted"):
        check_hdiag(stats, {**meta, "unrouted": "experts.2.weight"}, ck, "x")
    with pytest.raises(ObimError, match=r"unrouted.*nope"):
        check_hdiag(stats, {**meta, "unrouted": json.dumps([*NEVER, "nope"])}, ck, "x")


def test_dense_model_records_nothing_unrouted(model):
    _, meta = compute_hdiag(str(model), ["a"], progress=False)
    assert json.loads(meta["unrouted"]) == []


# ------------------------------------------------------------------------------------ zoo.json: code scored (13)


def test_zoo_records_whether_code_was_scored(quick_zoo, monkeypatch):
    from obim.bench import sandbox
    from obim.bench.zoo import code_note, code_record

    assert json.loads((quick_zoo / "zoo.json").read_text())["code"] == {
        "evaluated": False,
        "executed": False,
        "isolation": None,
    }
    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)
    assert code_record(True, False) == {"evaluated": True, "executed": False, "isolation": None}
    ran = code_record(True, True)
    assert ran == {"evaluated": True, "executed": True, "isolation": sandbox.isolation()}
    assert "rlimits" in ran["isolation"]
    assert "not executed" in code_note(code_record(True, False)) and sandbox.isolation() in code_note(ran)
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")
    assert code_record(True, False)["executed"] is True
    assert code_record(False, True)["executed"] is False
