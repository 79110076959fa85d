"""Every method against expectations computed by hand (or by an independent implementation) on small tensors."""

from __future__ import annotations

import math

import pytest
import torch

from obim.merging.config import load_config
from obim.merging.context import random_key, uniform
from obim.merging.merge import TensorPlan, merge_tensor

LINEAR = "model.layers.0.mlp.up_proj.weight"


def run(
    method,
    deltas: dict[str, torch.Tensor],
    *,
    base=None,
    params=None,
    per_model=None,
    retention=None,
    order="rotation",
    hdiag=None,
    name=LINEAR,
    seed=0,
    n_blocks=0,
):
    """Merge `deltas` (model name -> task vector) onto `base` with one method, through the driver's per-tensor path."""
    names = list(deltas)
    shape = next(iter(deltas.values())).shape
    base = torch.zeros(shape) if base is None else base
    models = []
    for n in names:
        m = {"name": n, "path": n, "parameters": (per_model or {}).get(n, {})}
        if retention:
            m["retention"] = retention[n]
        if method in ("obim", "ties_obm"):
            m["hdiag"] = "unused.safetensors"
        models.append(m)
    cfg = load_config(
        {
            "method": method,
            "base_model": "base",
            "models": models,
            "parameters": params or {},
            "order": order,
            "seed": seed,
        }
    )
    hd = [{name: hdiag[n]} if hdiag and n in hdiag else {} for n in names]
    plan = TensorPlan(name, torch.float32, tuple(shape), n_blocks=n_blocks)
    return merge_tensor(cfg, plan, [base] + [base + deltas[n] for n in names], hd, torch.device("cpu"))


def u(name, model, shape, seed=0):
    return uniform(random_key(seed, name, model), shape)


def test_ta_sum_and_lambda():
    base = torch.ones(4)
    out = run(
        "ta",
        {"a": torch.tensor([1.0, 2, 0, -1]), "b": torch.tensor([3.0, -1, 0, 1])},
        base=base,
        params={"lambda": 0.5},
    )
    assert out.tolist() == [3.0, 1.5, 1.0, 1.0]


def test_ties_trim_elect_disjoint_mean():
    a = torch.tensor([0.5, -2.0, 1.0, 0.1])
    b = torch.tensor([1.0, 1.0, -3.0, 0.2])  # |1| ties at the threshold: the lower index (0) wins
    out = run("ties", {"a": a, "b": b}, params={"density": 0.5})
    # â = [0, -2, 1, 0], b̂ = [1, 0, -3, 0]; Σ = [1, -2, -2, 0] -> γ = [+, -, -, +]
    assert out.tolist() == [1.0, -2.0, -3.0, 0.0]


def test_ties_sign_tie_elects_plus():
    out = run("ties", {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([-1.0, 4.0])}, params={"density": 1.0})
    assert out.tolist() == [1.0, 3.0]  # Σ = 0 -> +1: only a's +1 agrees; then mean(2, 4)


def test_ties_k0_and_single_model():
    d = torch.tensor([0.5, -2.0, 1.0, 0.1])
    assert run("ties", {"a": d}, params={"density": 0.0}).tolist() == [0.0] * 4
    assert run("ties", {"a": d}, params={"density": 0.5}).tolist() == [0.0, -2.0, 1.0, 0.0]


def test_ties_per_model_density():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    b = torch.tensor([4.0, 3.0, 2.0, 1.0])
    out = run("ties", {"a": a, "b": b}, per_model={"a": {"density": 0.25}, "b": {"density": 0.5}})
    assert out.tolist() == [4.0, 3.0, 0.0, 4.0]


def test_dare_drop_and_rescale():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, generator=g), torch.randn(1000, generator=g)
    out = run("dare", {"a": a, "b": b}, params={"drop_rate": 0.7})
    ua, ub = u(LINEAR, "a", (1000,)), u(LINEAR, "b", (1000,))
    want = torch.where(ua < 0.3, a / 0.3, 0.0) + torch.where(ub < 0.3, b / 0.3, 0.0)
    torch.testing.assert_close(out, want)


def test_dare_statistics_and_ties_combine():
    d = torch.full((200_000,), 0.01)
    out = run("dare", {"a": d}, params={"drop_rate": 0.9})
    kept = (out != 0).float().mean().item()
    assert abs(kept - 0.1) < 0.005
    assert abs(out.mean().item() - 0.01) < 0.0007  # rescaling keeps the expectation
    a, b = torch.tensor([1.0, -1.0, 2.0]), torch.tensor([-3.0, -1.0, 1.0])
    out = run("dare", {"a": a, "b": b}, params={"drop_rate": 0.0, "combine": "ties"})
    assert out.tolist() == [-3.0, -1.0, 1.5]


def test_della_magprune_probabilities():
    d = torch.tensor([0.1, -0.4, 0.2, 0.3])
    out = run("della", {"a": d}, params={"density": 0.5, "epsilon": 0.1}, name="model.norm.weight")
    p = torch.tensor([0.4, 0.6, 0.4 + 0.2 / 3, 0.4 + 0.4 / 3])  # ranks by |δ| ascending: 1, 4, 2, 3
    keep = u("model.norm.weight", "a", (4,)) < p
    torch.testing.assert_close(out, 1.1 * torch.where(keep, d / p, 0.0))


def test_della_rows_and_statistics():
    d = torch.full((400, 500), 0.02)
    d[:, 250:] = 0.04
    out = run("della", {"a": d}, params={"density": 0.7, "epsilon": 0.2, "lambda": 1.0})
    kept = (out != 0).float()
    assert abs(kept[:, :250].mean().item() - 0.6) < 0.01  # small half: p from 0.5 up to ~0.7
    assert abs(kept[:, 250:].mean().item() - 0.8) < 0.01
    assert abs(out.mean().item() - d.mean().item()) < 0.0005


def test_tall_mask_consensus():
    a, b = torch.tensor([1.0, 0.1, 2.0]), torch.tensor([1.0, 2.0, -2.0])
    # Σ = [2, 2.1, 0]; masks a: [T, F, T], b: [T, T, T]; votes [2, 1, 2] -> keep where >= 2
    assert run("tall_mask", {"a": a, "b": b}).tolist() == [2.0, 0.0, 0.0]
    out = run("tall_mask", {"a": a, "b": b}, params={"k": 1, "lambda": 0.5})
    assert out.tolist() == pytest.approx([1.0, 1.05, 0.0])
    out = run(
        "tall_mask",
        {"a": a, "b": b},
        per_model={"a": {"tall_lambda": 100.0}, "b": {"tall_lambda": 100.0}},
        params={"k": 1},
    )
    assert out.tolist() == [0.0, 0.0, 0.0]


def pcb_reference(deltas: list[torch.Tensor], ratio: float, q: float = 1e-4) -> torch.Tensor:
    """PCB by the formulas, with full sorts (an independent implementation)."""
    T = len(deltas)
    total = sum(deltas)

    def norm(x):
        return torch.zeros_like(x) if x.max() == x.min() else (x - x.min()) / (x.max() - x.min())

    num, den = 0, 0
    for d in deltas:
        n = d.numel()
        s = torch.sort(d.abs().flatten()).values
        a = d.abs().clamp(s[int(n * q)].item(), s[int(n * (1 - q)) - 1].item())
        clipped = torch.sign(d) * a
        bal = torch.exp(T * norm(a) ** 2) * torch.tanh(d * total)
        sb = torch.sort(bal.flatten()).values
        beta = norm(bal.clamp(min=sb[int(n * (1 - ratio))].item()))
        num = num + beta * clipped
        den = den + beta
    return num / den.clamp(min=1e-12)


@pytest.mark.parametrize("ratio", [0.05, 0.1, 0.2])
def test_pcb_matches_reference(ratio):
    g = torch.Generator().manual_seed(3)
    ds = {n: torch.randn(64, 80, generator=g) * 0.01 for n in "abc"}
    out = run("pcb", ds, params={"ratio": ratio})
    torch.testing.assert_close(out, pcb_reference(list(ds.values()), ratio), rtol=1e-5, atol=1e-8)


def test_pcb_keeps_top_ratio_per_model():
    g = torch.Generator().manual_seed(4)
    d = torch.randn(1000, generator=g)
    out = run("pcb", {"a": d}, params={"ratio": 0.1})  # one model: δM = clipped δ where β̂ > 0
    assert 95 <= int((out != 0).sum()) <= 100


def test_breadcrumbs_drops_outliers_and_tail():
    row = torch.tensor([5.0, -4.0, 3.0, 2.0, 1.0, 0.5, 0.2, 0.1, 0.0, 0.0])
    d = torch.stack([row, row.flip(0)])
    out = run("breadcrumbs", {"a": d}, params={"gamma": 0.1, "density": 0.3})
    assert out[0].tolist() == [0.0, -4.0, 3.0, 2.0, 0, 0, 0, 0, 0, 0]
    assert out[1].tolist() == [0, 0, 0, 0, 0, 0, 2.0, 3.0, -4.0, 0.0]
    out2 = run("breadcrumbs", {"a": d, "b": d}, params={"gamma": 0.1, "density": 0.3})
    torch.testing.assert_close(out2, 2 * out)


# --------------------------------------------------------------------------------------- OBM / IM family

LM = torch.tensor([[1.0, 1.0, 1.0], [2.0, 0.5, 2.0]])
MATH = torch.tensor([[-1.0, 3.0, 1.0], [1.0, 1.0, -1.0]])
H = torch.tensor([1.0, 4.0, 0.25])  # saliency = δ² · h: lm [[1,4,.25],[4,1,1]], math [[1,36,.25],[1,4,.25]]


def test_obim_hand_computed_orders():
    hd = {"lm": H, "math": H}
    ret = {"lm": 0.5, "math": 0.5}
    out = run("obim", {"lm": LM, "math": MATH}, retention=ret, hdiag=hd, order=["lm", "math"])
    assert out.tolist() == [[1.0, 1.0, 1.0], [2.0, 1.0, -1.0]]  # lm takes {0, 1, 3}, math the rest
    out = run("obim", {"lm": LM, "math": MATH}, retention=ret, hdiag=hd, order=["math", "lm"])
    assert out.tolist() == [[-1.0, 3.0, 1.0], [2.0, 1.0, 2.0]]  # math takes {0, 1, 4}, lm the rest
    out = run("obim", {"lm": LM, "math": MATH}, retention={"lm": 0.3, "math": 0.3}, hdiag=hd, order=["lm", "math"])
    # k = 1 each: lm's 4 at indices 1 and 3 tie -> 1; math's best free score is the 4 at index 4
    assert out.tolist() == [[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]


def test_obim_rotation_by_block():
    hd = {"lm": H, "math": H}
    ret = {"lm": 0.5, "math": 0.5}
    first_lm = [[1.0, 1.0, 1.0], [2.0, 1.0, -1.0]]
    first_math = [[-1.0, 3.0, 1.0], [2.0, 1.0, 2.0]]
    for name, want in [
        ("model.layers.0.self_attn.q_proj.weight", first_lm),
        ("model.layers.1.self_attn.q_proj.weight", first_math),
        ("model.layers.2.self_attn.q_proj.weight", first_lm),
        ("model.layers.11.mlp.down_proj.weight", first_math),
        ("lm_head.weight", first_lm),
    ]:
        out = run("obim", {"lm": LM, "math": MATH}, retention=ret, hdiag=hd, name=name)
        assert out.tolist() == want, name


def test_im_exclusive_and_exact_counts():
    g = torch.Generator().manual_seed(5)
    names = ["a", "b", "c"]
    # model i's delta is i+1 everywhere: the merged value tells which model owns each position
    ds = {n: torch.full((50, 40), float(i + 1)) for i, n in enumerate(names)}
    hd = {n: torch.rand(40, generator=g) for n in names}
    ret = {"a": 0.3, "b": 0.25, "c": 0.45}  # sums to exactly 1: every position taken once
    out = run("obim", ds, retention=ret, hdiag=hd)
    for i, n in enumerate(names):
        assert int((out == i + 1).sum()) == int(ret[n] * 2000)
    assert int((out == 0).sum()) == 2000 - sum(int(r * 2000) for r in ret.values())


def test_obim_random_scores_outside_linear_layers():
    name = "model.layers.0.input_layernorm.weight"
    d = {"lm": torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])}
    out = run("obim", d, retention={"lm": 0.4}, hdiag={}, name=name)  # no statistics for norms: uniform scores
    score = u(name, "lm", (5,))
    keep = torch.zeros(5, dtype=torch.bool)
    keep[torch.argsort(score, descending=True, stable=True)[:2]] = True
    assert out.tolist() == torch.where(keep, d["lm"], 0.0).tolist()


def test_ties_obm_and_ties_im():
    hd = {"lm": H, "math": H}
    out = run("ties_obm", {"lm": LM, "math": MATH}, params={"density": 0.5}, hdiag=hd)
    assert out.tolist() == [[1.0, 2.0, 0.0], [2.0, 1.0, 0.0]]
    out = run("ties_obm", {"lm": LM, "math": MATH}, retention={"lm": 0.5, "math": 0.5}, hdiag=hd)
    assert out.tolist() == [[1.0, 2.0, 0.0], [2.0, 1.0, 0.0]]  # `retention` sets ties_obm's per-model density
    out = run("ties_im", {"lm": LM, "math": MATH}, retention={"lm": 0.5, "math": 0.5}, order=["lm", "math"])
    assert out.tolist() == [[1.0, 3.0, 1.0], [2.0, 1.0, 2.0]]


def test_retention_zero_keeps_base():
    base = torch.arange(6.0).view(2, 3)
    out = run(
        "obim", {"lm": LM, "math": MATH}, base=base, retention={"lm": 0.0, "math": 0.0}, hdiag={"lm": H, "math": H}
    )
    assert torch.equal(out, base)


def test_same_seed_same_result_other_seed_differs():
    g = torch.Generator().manual_seed(6)
    d = {"a": torch.randn(2000, generator=g)}
    assert torch.equal(run("dare", d, seed=1), run("dare", d, seed=1))
    assert not torch.equal(run("dare", d, seed=1), run("dare", d, seed=2))
    assert math.isclose(float((run("dare", d, seed=1) != 0).float().mean()), 0.1, abs_tol=0.03)


def test_uniform_streams_are_deterministic_and_uniform():
    key = random_key(0, "t", "m")
    a = uniform(key, (3_000_000,))  # spans several chunks, filled on two threads
    assert torch.equal(a, uniform(key, (3_000_000,)))
    assert float(a.min()) >= 0.0 and float(a.max()) < 1.0
    assert abs(float(a.mean()) - 0.5) < 1e-3 and abs(float((a < 0.1).float().mean()) - 0.1) < 1e-3
    assert not torch.equal(a[:1000], uniform(key, (1000,), draw=1))
    assert not torch.equal(a[:1000], uniform(random_key(0, "t", "other"), (1000,)))
    assert torch.equal(a[:1000], uniform(key, (1000,)))  # a chunk's numbers do not depend on the total size


def test_ties_obm_many_zero_deltas_large_tensors():
    """Most task-vector entries zero (as with bf16 fine-tunes): the duplicate-robust selection, run for several
    models in parallel (nested parallel work must not deadlock), still keeps exactly k entries per model."""
    g = torch.Generator().manual_seed(8)
    ds = {}
    for n in "abc":
        d = torch.randn(300, 300, generator=g)
        d[torch.rand(300, 300, generator=g) < 0.7] = 0.0
        ds[n] = d
    h = torch.rand(300, generator=g) + 0.1
    out = run("ties_obm", {"a": ds["a"]}, params={"density": 0.2}, hdiag={"a": h})
    assert int((out != 0).sum()) == 18_000
    kept = (ds["a"].square() * h)[out != 0]
    assert kept.min() >= (ds["a"].square() * h)[out == 0].max()
    out3 = run("ties_obm", ds, params={"density": 0.2}, hdiag=dict.fromkeys(ds, h))
    assert out3.shape == (300, 300) and int((out3 != 0).sum()) > 18_000


def slerp_reference(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Shoemake's formula in float64 numpy-free maths: the angle between the flattened directions."""
    a, b = v0.double().reshape(-1), v1.double().reshape(-1)
    cos = float(a @ b / (a.norm() * b.norm()))
    if abs(cos) > 0.9995:
        return ((1 - t) * a + t * b).reshape(v0.shape)
    om = math.acos(cos)
    return ((math.sin((1 - t) * om) * a + math.sin(t * om) * b) / math.sin(om)).reshape(v0.shape)


def test_slerp_base_and_one_model():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    delta = torch.randn(6, 5, generator=g)
    for t in (0.0, 0.3, 0.5, 1.0):
        got = run("slerp", {"m": delta}, base=base, params={"t": t})
        torch.testing.assert_close(got, slerp_reference(t, base, base + delta).float(), rtol=1e-5, atol=1e-5)
    # the endpoints exactly, and lambda scales the step from the base
    torch.testing.assert_close(run("slerp", {"m": delta}, base=base, params={"t": 1.0}), base + delta)
    torch.testing.assert_close(run("slerp", {"m": delta}, base=base, params={"t": 0.0}), base)
    half = run("slerp", {"m": delta}, base=base, params={"t": 0.5, "lambda": 0.5})
    torch.testing.assert_close(half, base + 0.5 * (slerp_reference(0.5, base, base + delta).float() - base))


def test_slerp_angle_cases():
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])  # orthogonal: the quarter circle's arc
    got = run("slerp", {"a": e0, "b": e1}, params={"t": 0.5})
    s = math.sin(math.pi / 4) / math.sin(math.pi / 2)  # sin(Ω/2)/sin Ω at Ω = 90°
    torch.testing.assert_close(got, torch.tensor([s, 2 * s]))
    par = torch.tensor([1.0, 2.0, 3.0])
    got = run("slerp", {"a": par, "b": 3 * par}, params={"t": 0.25})  # parallel: linear
    torch.testing.assert_close(got, 0.75 * par + 0.25 * 3 * par)
    anti = run("slerp", {"a": par, "b": -par}, params={"t": 0.25})  # antiparallel: linear (no defined arc)
    torch.testing.assert_close(anti, 0.5 * par)
    zero = run("slerp", {"a": torch.zeros(3), "b": par}, params={"t": 0.5})  # no direction: orthogonal (mergekit's)
    torch.testing.assert_close(zero, math.sin(math.pi / 4) * par)


def test_slerp_refuses_more_than_two_models():
    from obim.merging.errors import ObimError

    d = torch.ones(2, 2)
    with pytest.raises(ObimError, match=r"slerp interpolates two endpoints .* got 3 models \(a, b, c\)") as e:
        run("slerp", {"a": d, "b": d, "c": d})
    assert "\n" not in str(e.value)


def tsv_reference(deltas: list[torch.Tensor]) -> torch.Tensor:
    """TSV-M in float64 numpy: each task's top r/T singular triplets, U and V concatenated and replaced by their
    polar factors (the nearest orthonormal matrices), recombined with the singular values."""
    import numpy as np

    ds = [d.double().numpy() for d in deltas]
    k = min(ds[0].shape) // len(ds)
    svds = [np.linalg.svd(d, full_matrices=False) for d in ds]
    u = np.concatenate([s[0][:, :k] for s in svds], axis=1)
    sv = np.concatenate([s[1][:k] for s in svds])
    v = np.concatenate([s[2][:k] for s in svds], axis=0)

    def polar(a):
        p, _, q = np.linalg.svd(a, full_matrices=False)
        return p @ q

    return torch.from_numpy(polar(u) @ np.diag(sv) @ polar(v)).float()


def test_tsv_matches_an_independent_computation():
    g = torch.Generator().manual_seed(3)
    deltas = {n: torch.randn(8, 6, generator=g) for n in ("a", "b", "c")}
    got = run("tsv", deltas)
    torch.testing.assert_close(got, tsv_reference(list(deltas.values())), rtol=1e-4, atol=1e-5)
    # lambda scales it; a vector (not a matrix) is the mean
    torch.testing.assert_close(run("tsv", deltas, params={"lambda": 0.5}), 0.5 * got)
    vecs = {n: torch.randn(5, generator=g) for n in ("a", "b")}
    torch.testing.assert_close(run("tsv", vecs, name="model.norm.weight"), (vecs["a"] + vecs["b"]) / 2)


def test_tsv_hand_cases():
    g = torch.Generator().manual_seed(4)
    one = torch.randn(5, 4, generator=g)
    torch.testing.assert_close(run("tsv", {"a": one}), one, rtol=1e-4, atol=1e-5)  # one task: itself
    # two rank-1 tasks on orthogonal rows and columns, one triplet kept each (rank 2 / 2 tasks): already
    # orthonormal together, so their sum
    a = torch.zeros(4, 2)
    a[0, 0] = 3.0
    b = torch.zeros(4, 2)
    b[2, 1] = -2.0
    torch.testing.assert_close(run("tsv", {"a": a, "b": b}), a + b, rtol=1e-5, atol=1e-6)
    # more models than singular directions: nothing kept for each
    tiny = {n: torch.randn(2, 9, generator=g) for n in ("a", "b", "c")}
    assert torch.equal(run("tsv", tiny), torch.zeros(2, 9))


def sce_reference(deltas: list[torch.Tensor], tau: float) -> torch.Tensor:
    """SCE in float64 numpy from the FuseChat definition (select by variance, weights by mean square, erase)."""
    import numpy as np

    d = np.stack([x.double().numpy().reshape(-1) for x in deltas])
    if tau < 1:
        var = d.var(axis=0)
        k = int(np.count_nonzero(var) * tau)
        order = sorted(range(var.size), key=lambda j: (-var[j], j))  # ties to the lowest index
        mask = np.zeros(var.size)
        mask[order[:k]] = 1
        d = d * mask
    w = (d**2).mean(axis=1)
    w = w / w.sum() if w.sum() > 0 else np.full(len(d), 1 / len(d))
    sign = np.where(d.sum(axis=0) >= 0, 1.0, -1.0)
    keep = (np.sign(d) == sign).astype(float)
    den = (w[:, None] * keep).sum(axis=0)
    num = (w[:, None] * keep * d).sum(axis=0)
    out = np.where(den > 0, num / np.where(den > 0, den, 1), 0.0)
    return torch.from_numpy(out.reshape(deltas[0].shape)).float()


def test_sce_hand_computed():
    a, b = torch.tensor([1.0, 2.0, -1.0]), torch.tensor([3.0, -2.0, -1.0])
    # weights 2 / (2 + 14/3) = 0.3 and 0.7; signs +, + (a tie: 0 -> +), -; b's -2 erased in entry 1
    torch.testing.assert_close(run("sce", {"a": a, "b": b}), torch.tensor([2.4, 2.0, -1.0]))
    # select_topk: only the entry of largest variance kept (entry 1: 2 vs -2), in both models
    got = run("sce", {"a": a, "b": b}, params={"select_topk": 0.5})  # 2 varying entries x 0.5 = 1
    torch.testing.assert_close(got, torch.tensor([0.0, 2.0, 0.0]))


@pytest.mark.parametrize("tau", [1.0, 0.3])
def test_sce_matches_an_independent_computation(tau):
    g = torch.Generator().manual_seed(5)
    deltas = {n: torch.randn(7, 9, generator=g) for n in ("a", "b", "c")}
    deltas["c"][0, :3] = 0.0  # zeros never vote or count
    got = run("sce", deltas, params={"select_topk": tau})
    torch.testing.assert_close(got, sce_reference(list(deltas.values()), tau), rtol=1e-5, atol=1e-6)


def test_lines_scales_the_sum_by_depth():
    g = torch.Generator().manual_seed(6)
    deltas = {n: torch.randn(4, 3, generator=g) for n in ("a", "b")}
    total = deltas["a"] + deltas["b"]
    for block, want in ((0, 0.5), (2, 0.5 + 0.9 * 2 / 3), (3, 0.5 + 0.9)):  # alpha = 1/T = 0.5 under a sum
        name = f"model.layers.{block}.mlp.up_proj.weight"
        got = run("lines", deltas, name=name, n_blocks=4, params={"beta": 0.9})
        torch.testing.assert_close(got, want * total)
    outside = run("lines", deltas, name="model.norm.weight", n_blocks=4, params={"beta": 0.9})
    torch.testing.assert_close(outside, 0.5 * total)  # alpha outside the blocks
    fixed = run("lines", deltas, name="model.layers.3.self_attn.q_proj.weight", n_blocks=4, params={"alpha": 0.2})
    torch.testing.assert_close(fixed, (0.2 + 0.5) * total)  # beta's default 0.5


def test_ties_lines_alpha_is_the_authors_norm_ratio():
    g = torch.Generator().manual_seed(7)
    deltas = {n: torch.randn(6, 5, generator=g) for n in ("a", "b", "c")}
    ties = run("ties", {k: v.clone() for k, v in deltas.items()}, params={"density": 0.5})
    # |Σ δt|₁ of the task vectors as read (untrimmed) over T |δM|₁, as LiNeS's code computes it
    alpha = sum(deltas.values()).abs().sum().item() / (3 * ties.abs().sum().item())
    got = run("ties_lines", deltas, name="model.layers.1.mlp.down_proj.weight", n_blocks=3, params={"density": 0.5})
    torch.testing.assert_close(got, (alpha + 0.5 * 0.5) * ties)


def test_tsv_keeps_only_each_tasks_numerical_rank():
    g = torch.Generator().manual_seed(8)
    a = torch.randn(12, 3, generator=g) @ torch.randn(3, 10, generator=g)  # rank 3, k = 10 // 2 = 5
    zero = torch.zeros(12, 10)
    # a task vector of zeros (a tensor the fine-tune left alone) adds nothing, and the other is kept whole
    torch.testing.assert_close(run("tsv", {"a": a, "z": zero}), a, rtol=1e-4, atol=1e-4)
    # low-rank tasks: rounding-level noise in the inputs moves the output by rounding-level amounts, not by the
    # arbitrary singular vectors of zero singular values
    b = torch.randn(12, 2, generator=g) @ torch.randn(2, 10, generator=g)
    got = run("tsv", {"a": a, "b": b})
    noisy = run("tsv", {"a": a + 1e-7 * torch.randn(12, 10, generator=g), "b": b})
    assert (noisy - got).norm() / got.norm() < 1e-4


def test_tsv_bytes_do_not_depend_on_the_thread_count():
    g = torch.Generator().manual_seed(9)
    deltas = {n: torch.randn(300, 200, generator=g) for n in ("a", "b", "c")}
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run("tsv", {k: v.clone() for k, v in deltas.items()})
        torch.set_num_threads(2)
        two = run("tsv", {k: v.clone() for k, v in deltas.items()})
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two) and torch.get_num_threads() == before
