"""RegMean and Fisher merging: their statistics against independent computations, their closed forms against
least squares and hand-computed weights, the files' checks, and the CLI -> merge path."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_saliency import independent_stats

from obim import merge
from obim.merging.cli import saliency_main
from obim.merging.config import load_config
from obim.merging.errors import ObimError
from obim.merging.merge import TensorPlan, merge_tensor
from obim.merging.statistics import compute_statistics, open_statistics
from obim.merging.texts import read_texts

Q = "model.layers.0.self_attn.q_proj.weight"
K = "model.layers.0.self_attn.k_proj.weight"
DOWN = "model.layers.1.mlp.down_proj.weight"


def merge_one(method, deltas, stats, *, base=None, params=None, per_model=None, name=Q):
    """One tensor through the driver's per-tensor path: `stats` model -> its statistics of this tensor (or None)."""
    names = list(deltas)
    shape = next(iter(deltas.values())).shape
    base = torch.zeros(shape) if base is None else base
    kind = {"regmean": "gram", "fisher": "fisher"}[method]
    models = [{"name": n, "path": n, kind: "unused", "parameters": (per_model or {}).get(n, {})} for n in names]
    cfg = load_config({"method": method, "base_model": "base", "models": models, "parameters": params or {}})
    st = [{name: stats[n]} if stats.get(n) is not None else {} for n in names]
    plan = TensorPlan(name, torch.float32, tuple(shape))
    return merge_tensor(cfg, plan, [base] + [base + deltas[n] for n in names], st, torch.device("cpu"))


# ------------------------------------------------------------------------------------------------- RegMean


def test_regmean_is_the_least_squares_merge():
    """a = 1: the merged layer minimises Σ_i |X_i W_iᵀ - X_i Wᵀ|² (numpy's lstsq on the stacked problem)."""
    g = np.random.default_rng(0)
    n, d_in, d_out = 40, 6, 5
    xs = [g.normal(size=(n, d_in)) * g.uniform(0.2, 3, size=d_in) for _ in range(2)]
    base = g.normal(size=(d_out, d_in))
    ws = [base + g.normal(size=(d_out, d_in)) for _ in range(2)]
    x_all = np.vstack(xs)
    y_all = np.vstack([x @ w.T for x, w in zip(xs, ws, strict=True)])
    want = np.linalg.lstsq(x_all, y_all, rcond=None)[0].T  # (d_out, d_in)
    grams = {m: torch.tensor(x.T @ x / n, dtype=torch.float32) for m, x in zip("ab", xs, strict=True)}
    deltas = {m: torch.tensor(w - base, dtype=torch.float32) for m, w in zip("ab", ws, strict=True)}
    out = merge_one("regmean", deltas, grams, base=torch.tensor(base, dtype=torch.float32), params={"alpha": 1.0})
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-4, atol=1e-4)


def test_regmean_alpha_scales_the_off_diagonal():
    g = np.random.default_rng(1)
    grams = [np.cov(g.normal(size=(4, 30))) + np.eye(4) for _ in range(3)]
    deltas = [g.normal(size=(3, 4)) for _ in range(3)]
    a = 0.3
    tilde = [a * G + (1 - a) * np.diag(np.diag(G)) for G in grams]
    want = sum(d @ t for d, t in zip(deltas, tilde, strict=True)) @ np.linalg.inv(sum(tilde))
    out = merge_one(
        "regmean",
        {m: torch.tensor(d, dtype=torch.float32) for m, d in zip("abc", deltas, strict=True)},
        {m: torch.tensor(G, dtype=torch.float32) for m, G in zip("abc", grams, strict=True)},
        params={"alpha": a, "lambda": 1.0},
    )
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-4, atol=1e-5)
    # a = 0: diagonal Gram matrices, each column a weighted mean by the models' x_j² (hdiag)
    out0 = merge_one(
        "regmean",
        {m: torch.tensor(d, dtype=torch.float32) for m, d in zip("abc", deltas, strict=True)},
        {m: torch.tensor(G, dtype=torch.float32) for m, G in zip("abc", grams, strict=True)},
        params={"alpha": 0.0},
    )
    diag = np.array([np.diag(G) for G in grams])  # (models, in)
    want0 = sum(d * h for d, h in zip(deltas, diag, strict=True)) / diag.sum(0)
    np.testing.assert_allclose(out0.numpy(), want0, rtol=1e-5, atol=1e-6)


def test_regmean_leaves_the_statistics_it_is_given_unchanged():
    G = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)  # a caller's float64 Gram, shared by both
    before = G.clone()
    merge_one("regmean", {"a": torch.ones(3, 2), "b": torch.zeros(3, 2)}, {"a": G, "b": G}, params={"alpha": 0.3})
    assert torch.equal(G, before)


def test_regmean_averages_tensors_without_gram_and_survives_a_dead_feature():
    a, b = torch.tensor([1.0, 2.0, -3.0]), torch.tensor([3.0, 0.0, 1.0])
    out = merge_one("regmean", {"a": a, "b": b}, {}, name="model.norm.weight")
    assert out.tolist() == [2.0, 1.0, -1.0]  # the paper's simple average
    # input feature 2 never active in either model: Σ G singular; its column keeps the base's weights
    G = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 0.0]])
    da, db = torch.ones(2, 3), -torch.ones(2, 3) * 2
    base = torch.full((2, 3), 7.0)
    out = merge_one("regmean", {"a": da, "b": db}, {"a": G, "b": G}, base=base, params={"alpha": 1.0})
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, 2], base[:, 2])
    torch.testing.assert_close(out[:, :2], base[:, :2] - 0.5)  # equal Grams: the mean of the task vectors


# -------------------------------------------------------------------------------------------------- Fisher


def test_fisher_weights_by_hand():
    da, db = torch.tensor([1.0, 1.0, 4.0]), torch.tensor([3.0, -1.0, 0.0])
    fa, fb = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([1.0, 3.0, 0.0])
    # stats are read already normalised (StatsFile divides by the file's norm): here given as F̂ directly
    out = merge_one("fisher", {"a": da, "b": db}, {"a": fa, "b": fb}, params={"min_fisher": 0.0})
    assert out.tolist() == pytest.approx([2.0, -1.0, 0.0])  # entry 2: no Fisher anywhere -> 0/tiny = 0
    out = merge_one("fisher", {"a": da, "b": db}, {"a": fa, "b": fb}, params={"min_fisher": 1.0})
    # weights F̂ + 1: [2, 1, 1] and [2, 4, 1]
    assert out.tolist() == pytest.approx([(2 + 6) / 4, (1 - 4) / 5, 4 / 2])
    out = merge_one(
        "fisher", {"a": da, "b": db}, {"a": fa, "b": fb}, params={"min_fisher": 0.0}, per_model={"a": {"weight": 3.0}}
    )
    assert out.tolist() == pytest.approx([(3 + 3) / 4, -1.0, 0.0])
    with pytest.raises(ObimError, match="positive weight"):
        merge_one("fisher", {"a": da}, {"a": fa}, per_model={"a": {"weight": 0.0}})


def independent_fisher(model_dir, texts, names):
    """Per sample: the gradient of its mean next-token log-likelihood from the logits (log_softmax by hand), squared."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    params = dict(model.named_parameters())
    acc = {n: torch.zeros_like(params[n]) for n in names}
    used = 0
    for t in texts:
        ids = tok(t, return_tensors="pt").input_ids
        if ids.shape[1] < 2:
            continue
        logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
        ll = logp.gather(1, ids[0, 1:, None]).mean()
        grads = torch.autograd.grad(ll, [params[n] for n in names])
        for n, gr in zip(names, grads, strict=True):
            acc[n] += gr.float().square()
        used += 1
    return {n: a / used for n, a in acc.items()}, used


def test_fisher_matches_independent_computation(zoo, val_jsonl):
    texts = read_texts(val_jsonl)
    fisher, meta = compute_statistics("fisher", str(zoo["math"]), texts, progress=False, source="v")
    names = [Q, DOWN, "model.embed_tokens.weight", "model.norm.weight"]
    want, used = independent_fisher(zoo["math"], texts, names)
    assert int(meta["samples"]) == used == len(texts) - 1  # the one-character sample predicts nothing
    for n in names:
        torch.testing.assert_close(fisher[n], want[n], rtol=2e-3, atol=1e-9)
    norm = float(np.sqrt(sum(float(f.double().square().sum()) for f in fisher.values())))
    assert float(meta["norm"]) == pytest.approx(norm, rel=1e-9)
    assert all((f >= 0).all() for f in fisher.values())


# --------------------------------------------------------------------------------------------------- Gram


def test_gram_matches_independent_computation_and_shares_inputs(zoo, val_jsonl):
    texts = read_texts(val_jsonl)
    gram, meta = compute_statistics("gram", str(zoo["math"]), texts, batch_size=4, progress=False, source="v")
    hdiag_want, tokens = independent_stats(zoo["math"], texts)
    assert int(meta["tokens"]) == tokens
    torch.testing.assert_close(gram[Q].diagonal(), hdiag_want["q"], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(gram[DOWN].diagonal(), hdiag_want["down"], rtol=1e-3, atol=1e-7)
    torch.testing.assert_close(gram[Q], gram[Q].T)
    aliases = json.loads(meta["aliases"])
    assert aliases[K] == Q and K not in gram  # k and v read q's input: stored once
    assert aliases["model.layers.0.mlp.up_proj.weight"] == "model.layers.0.mlp.gate_proj.weight"
    assert len(gram) + len(aliases) == 2 * 7 + 1
    # the off-diagonal from the independent inputs: x_q of layer 0 is input_layernorm(embeddings)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(zoo["math"]), AutoModelForCausalLM.from_pretrained(zoo["math"])
    acc = 0
    with torch.no_grad():
        for t in texts:
            ids = tok(t, return_tensors="pt").input_ids
            x = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))[0].double()
            acc = acc + x.T @ x
    torch.testing.assert_close(gram[Q], (acc / tokens).float(), rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------- files, CLI and merge


def test_cli_files_merge_regmean_and_fisher(zoo, val_jsonl, tmp_path):
    files = {}
    for kind in ("gram", "fisher"):
        for name in ("lm", "math"):
            files[kind, name] = tmp_path / f"{name}.{kind}.safetensors"
            args = [str(zoo[name]), str(files[kind, name]), "--kind", kind, "--data", str(val_jsonl), "--quiet"]
            assert saliency_main(args) == 0
    for method, kind in (("regmean", "gram"), ("fisher", "fisher")):
        cfg = {
            "method": method,
            "base_model": str(zoo["base"]),
            "models": [{"name": n, "path": str(zoo[n]), kind: str(files[kind, n])} for n in ("lm", "math")],
        }
        merge(cfg, tmp_path / method, progress=False)
        val = {
            **cfg,
            "models": [
                {"name": n, "path": str(zoo[n]), "validation": {"data": str(val_jsonl)}} for n in ("lm", "math")
            ],
        }
        merge(val, tmp_path / f"{method}-val", progress=False)  # computed in memory: the same bytes
        a = (tmp_path / method / "model.safetensors").read_bytes()
        assert a == (tmp_path / f"{method}-val" / "model.safetensors").read_bytes()
    # one tensor checked against the closed form from the files themselves
    ws = {}
    for n in ("base", "lm", "math"):
        with safe_open(str(zoo[n] / "model.safetensors"), "pt") as f:
            ws[n] = f.get_tensor(K).double()
    with safe_open(str(tmp_path / "regmean" / "model.safetensors"), "pt") as f:
        got = f.get_tensor(K).double()
    grams = {}
    for n in ("lm", "math"):
        with safe_open(str(files["gram", n]), "pt") as f:
            G = f.get_tensor(Q).double()  # k's statistics are q's
        grams[n] = 0.6 * G + 0.4 * torch.diag(G.diagonal())
    d = sum((ws[n] - ws["base"]) @ grams[n] for n in ("lm", "math"))
    want = ws["base"] + d @ torch.linalg.inv(sum(grams.values()))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # a norm: the simple average
    with safe_open(str(tmp_path / "regmean" / "model.safetensors"), "pt") as f:
        got = f.get_tensor("model.norm.weight")
    ns = {}
    for n in ("lm", "math"):
        with safe_open(str(zoo[n] / "model.safetensors"), "pt") as f:
            ns[n] = f.get_tensor("model.norm.weight")
    torch.testing.assert_close(got, (ns["lm"] + ns["math"]) / 2)


def test_statistics_files_are_checked(zoo, val_jsonl, tmp_path):
    from obim.merging.checkpoint import open_checkpoint

    texts = read_texts(val_jsonl, size=3)
    fisher, meta = compute_statistics("fisher", str(zoo["lm"]), texts, progress=False)
    p = tmp_path / "f.safetensors"
    save_file(fisher, str(p), metadata=meta)
    lm, math = open_checkpoint(str(zoo["lm"])), open_checkpoint(str(zoo["math"]))
    f = open_statistics(p, "fisher", lm)
    torch.testing.assert_close(f.get(Q), fisher[Q] / float(meta["norm"]))  # read on one scale: F / |F|
    with pytest.raises(ObimError, match="computed for another model"):
        open_statistics(p, "fisher", math)
    with pytest.raises(ObimError, match="holds fisher statistics, not the gram"):
        open_statistics(p, "gram", lm)
    short = dict(fisher)
    del short[DOWN]
    save_file(short, str(tmp_path / "s.safetensors"), metadata=meta)
    with pytest.raises(ObimError, match=f"missing {DOWN}"):
        open_statistics(tmp_path / "s.safetensors", "fisher", lm)
    bad = dict(fisher)
    bad[Q] = -bad[Q] - 1
    save_file(bad, str(tmp_path / "n.safetensors"), metadata=meta)
    with pytest.raises(ObimError, match=f"tensor {Q} has negative"):
        open_statistics(tmp_path / "n.safetensors", "fisher", lm).get(Q)
    wrong = dict(fisher)
    wrong[Q] = wrong[Q][:, :3].contiguous()
    save_file(wrong, str(tmp_path / "w.safetensors"), metadata=meta)
    with pytest.raises(ObimError, match=f"fisher tensor {Q} has shape"):
        open_statistics(tmp_path / "w.safetensors", "fisher", lm)


def test_config_names_the_statistics_a_method_reads(zoo):
    m = {"name": "lm", "path": str(zoo["lm"])}
    with pytest.raises(ObimError, match=r"needs gram statistics: give `gram: FILE"):
        load_config({"method": "regmean", "base_model": str(zoo["base"]), "models": [m]})
    with pytest.raises(ObimError, match="`gram` holds another kind of statistics than method obim"):
        load_config({"method": "obim", "base_model": str(zoo["base"]), "models": [{**m, "gram": "g.safetensors"}]})
    with pytest.raises(ObimError, match="alpha"):
        load_config(
            {"method": "regmean", "base_model": "b", "models": [{**m, "gram": "g"}], "parameters": {"alpha": 1.5}}
        )


def test_fisher_of_a_vocabulary_tensor_with_more_rows():
    """A model with extra vocabulary rows: its Fisher rows past the shared ones are not merged (the driver's rule for
    extra rows: the mean of the models that have them)."""
    base = torch.zeros(3, 2)
    a, b = torch.ones(4, 2), torch.full((3, 2), 3.0)
    fa, fb = torch.ones(4, 2), torch.full((3, 2), 3.0)
    cfg = load_config(
        {
            "method": "fisher",
            "base_model": "base",
            "models": [{"name": "a", "path": "a", "fisher": "x"}, {"name": "b", "path": "b", "fisher": "y"}],
            "parameters": {"min_fisher": 0.0},
            "tokenizer_source": "a",
        }
    )
    plan = TensorPlan("model.embed_tokens.weight", torch.float32, (4, 2), shared_rows=3)
    name = plan.name
    out = merge_tensor(cfg, plan, [base, a, b], [{name: fa}, {name: fb}], torch.device("cpu"))
    torch.testing.assert_close(out[:3], torch.full((3, 2), (1 + 9) / 4))
    torch.testing.assert_close(out[3], a[3])


def test_fisher_of_tied_embeddings_and_a_stray_buffer(tmp_path, val_jsonl):
    """A tied lm_head the checkpoint omits (save_pretrained's way) is no tensor to cover; a float tensor no parameter
    holds (an old rotary inv_freq) is listed as no_gradient and merged by the weighted mean."""
    import shutil

    from conftest import make_llama
    from safetensors.torch import load_file

    base = make_llama(tmp_path / "base", 0, tie=True)
    a, b = make_llama(tmp_path / "a", 1, base=base, tie=True), make_llama(tmp_path / "b", 2, base=base, tie=True)
    stray = "model.layers.0.self_attn.rotary_emb.inv_freq"
    for d in (base, a, b):
        with safe_open(str(d / "model.safetensors"), "pt") as f:
            meta = f.metadata()
        t = load_file(str(d / "model.safetensors"))
        assert "lm_head.weight" not in t
        t[stray] = torch.rand(8) if d != base else torch.zeros(8)
        save_file(t, str(d / "model.safetensors"), metadata=meta)
    files = {}
    for n, d in (("a", a), ("b", b)):
        files[n] = tmp_path / f"{n}.fisher.safetensors"
        assert saliency_main([str(d), str(files[n]), "--kind", "fisher", "--data", str(val_jsonl), "--quiet"]) == 0
        with safe_open(str(files[n]), "pt") as f:
            meta = f.metadata()
            assert json.loads(meta["no_gradient"]) == [stray] and "lm_head.weight" not in f.keys()  # noqa: SIM118
    cfg = {
        "method": "fisher",
        "base_model": str(base),
        "models": [{"name": n, "path": str(d), "fisher": str(files[n])} for n, d in (("a", a), ("b", b))],
    }
    merge(cfg, tmp_path / "out", progress=False)
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        got = f.get_tensor(stray)
    want = (load_file(str(a / "model.safetensors"))[stray] + load_file(str(b / "model.safetensors"))[stray]) / 2
    torch.testing.assert_close(got, want)
    shutil.rmtree(tmp_path / "out")


def test_bad_aliases_and_norms_are_one_line_refusals(zoo, val_jsonl, tmp_path):
    from obim.merging.checkpoint import open_checkpoint

    texts = read_texts(val_jsonl, size=3)
    lm = open_checkpoint(str(zoo["lm"]))
    gram, gmeta = compute_statistics("gram", str(zoo["lm"]), texts, progress=False)
    fisher, fmeta = compute_statistics("fisher", str(zoo["lm"]), texts, progress=False)
    bad = {
        "a list as alias": ("gram", gram, {**gmeta, "aliases": json.dumps({K: [Q]})}, "`aliases` is not a JSON map"),
        "down_proj reading q's Gram": (
            "gram",
            gram,
            {**gmeta, "aliases": json.dumps({**json.loads(gmeta["aliases"]), DOWN: Q})},
            rf"{DOWN} \(an alias of {Q}\) has shape",
        ),
        "a norm reading a Gram": (
            "gram",
            gram,
            {**gmeta, "aliases": json.dumps({"model.norm.weight": Q})},
            r"model.norm.weight \(an alias of",
        ),
        "a Fisher alias of another shape": (
            "fisher",
            fisher,
            {**fmeta, "aliases": json.dumps({"lm_head.weight": "model.norm.weight"})},
            r"lm_head.weight \(an alias of model.norm.weight\) has shape",
        ),
        "a NaN norm": ("fisher", fisher, {**fmeta, "norm": "nan"}, "`norm` is not a finite"),
        "an infinite norm": ("fisher", fisher, {**fmeta, "norm": "inf"}, "`norm` is not a finite"),
    }
    for what, (kind, stats, meta, match) in bad.items():
        p = tmp_path / f"{what}.safetensors"
        if kind == "gram" and what == "down_proj reading q's Gram":
            stats = {k: v for k, v in stats.items() if k != DOWN}
        save_file(stats, str(p), metadata=meta)
        with pytest.raises(ObimError, match=match) as e:
            open_statistics(p, kind, lm)
        assert "\n" not in str(e.value), what
