"""OBM statistics: hooks against an independent computation from hidden states; padding excluded; CLI and the
merge's own `validation:` path give the same file."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open

from obim import compute_hdiag, load_hdiag, merge
from obim.merging.cli import saliency_main
from obim.merging.texts import read_texts


def independent_stats(model_dir, texts):
    """mean x² of the inputs of q_proj (layer 0), down_proj (layer 1) and lm_head, sample by sample (no padding)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    sums = dict.fromkeys(["q", "down", "head"], 0)
    n = 0
    for t in texts:
        ids = tok(t, return_tensors="pt").input_ids
        with torch.no_grad():
            hs = model(ids, output_hidden_states=True).hidden_states
            layer0 = model.model.layers[0]
            x_q = layer0.input_layernorm(hs[0])
            layer1 = model.model.layers[1]
            h = hs[1]
            attn_out = (
                h
                + layer1.self_attn(
                    layer1.input_layernorm(h),
                    position_embeddings=model.model.rotary_emb(h, torch.arange(h.shape[1])[None]),
                    attention_mask=None,
                )[0]
            )
            mlp_in = layer1.post_attention_layernorm(attn_out)
            x_down = layer1.mlp.act_fn(layer1.mlp.gate_proj(mlp_in)) * layer1.mlp.up_proj(mlp_in)
        sums["q"] = sums["q"] + x_q[0].double().square().sum(0)
        sums["down"] = sums["down"] + x_down[0].double().square().sum(0)
        sums["head"] = sums["head"] + hs[-1][0].double().square().sum(0)
        n += ids.shape[1]
    return {k: (v / n).float() for k, v in sums.items()}, n


def test_hdiag_matches_independent_computation(zoo, val_jsonl):
    texts = read_texts(val_jsonl)
    hd, meta = compute_hdiag(str(zoo["math"]), texts, batch_size=3, progress=False, source=str(val_jsonl))
    want, tokens = independent_stats(zoo["math"], texts)
    assert int(meta["tokens"]) == tokens and int(meta["samples"]) == len(texts)
    torch.testing.assert_close(hd["model.layers.0.self_attn.q_proj.weight"], want["q"], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(hd["model.layers.1.mlp.down_proj.weight"], want["down"], rtol=1e-3, atol=1e-7)
    torch.testing.assert_close(hd["lm_head.weight"], want["head"], rtol=1e-4, atol=1e-7)
    # q, k and v share their input
    assert torch.equal(hd["model.layers.0.self_attn.q_proj.weight"], hd["model.layers.0.self_attn.v_proj.weight"])
    linear = set(hd)
    assert len(linear) == 2 * 7 + 1 and all(v.dtype == torch.float32 and (v >= 0).all() for v in hd.values())


def test_padding_excluded_batch_size_does_not_matter(zoo, val_jsonl):
    texts = read_texts(val_jsonl)
    one, _ = compute_hdiag(str(zoo["lm"]), texts, batch_size=1, progress=False)
    many, _ = compute_hdiag(str(zoo["lm"]), texts, batch_size=6, progress=False)
    for k in one:
        torch.testing.assert_close(one[k], many[k], rtol=1e-4, atol=1e-8)


def test_size_and_truncation(zoo, val_jsonl):
    texts = read_texts(val_jsonl, size=2)
    assert len(texts) == 2
    _, meta = compute_hdiag(str(zoo["lm"]), read_texts(val_jsonl), max_length=4, progress=False)
    assert int(meta["tokens"]) == 4 * 5 + 1  # every sample cut to 4 tokens, the one-character sample has 1


def test_cli_writes_hdiag_used_by_merge(zoo, val_jsonl, tmp_path):
    paths = {}
    for name in ["lm", "math", "code"]:
        paths[name] = tmp_path / f"{name}.safetensors"
        assert (
            saliency_main(
                [
                    str(zoo[name]),
                    str(paths[name]),
                    "--data",
                    str(val_jsonl),
                    "--size",
                    "4",
                    "--batch-size",
                    "2",
                    "--quiet",
                ]
            )
            == 0
        )
    with safe_open(str(paths["lm"]), "pt") as f:
        meta = f.metadata()
    assert meta["samples"] == "4" and meta["data"] == str(val_jsonl) and meta["model"] == str(zoo["lm"])
    assert set(load_hdiag(paths["lm"])[0]) == set(compute_hdiag(str(zoo["lm"]), ["x"], progress=False)[0])

    base = {"method": "obim", "base_model": str(zoo["base"]), "order": "rotation"}
    rets = {"lm": 0.4, "math": 0.45, "code": 0.1}
    with_files = {
        **base,
        "models": [{"name": n, "path": str(zoo[n]), "retention": r, "hdiag": str(paths[n])} for n, r in rets.items()],
    }
    with_val = {
        **base,
        "models": [
            {
                "name": n,
                "path": str(zoo[n]),
                "retention": r,
                "validation": {"data": str(val_jsonl), "size": 4, "batch_size": 2},
            }
            for n, r in rets.items()
        ],
    }
    merge(with_files, tmp_path / "a", progress=False)
    res = merge(with_val, tmp_path / "b", progress=False)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert set(res.hdiag_meta) == {"lm", "math", "code"}


def test_cli_errors_are_one_line(zoo, tmp_path, capsys):
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    assert saliency_main([str(zoo["lm"]), str(tmp_path / "o.safetensors"), "--data", str(empty), "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "e.jsonl" in err and "empty" in err
    assert not (tmp_path / "o.safetensors").exists()


def test_linear_weights_are_remembered_per_architecture(zoo, tmp_path, monkeypatch):
    """The meta-device build (transformers' model code imported: seconds per process) runs once per architecture;
    another config is another architecture."""
    import shutil

    from obim.merging import saliency
    from obim.merging.checkpoint import open_checkpoint

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first = saliency.expected_hdiag(open_checkpoint(str(zoo["lm"])))
    assert len(first) == 2 * 7 + 1
    monkeypatch.setattr(saliency, "_linear_or_shape_rule", lambda ck: ["built again"])
    assert saliency.expected_hdiag(open_checkpoint(str(zoo["math"]))) == first  # the same architecture
    other = tmp_path / "other"
    shutil.copytree(zoo["lm"], other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": 1e-5}))
    assert saliency.expected_hdiag(open_checkpoint(str(other))) == ["built again"]
