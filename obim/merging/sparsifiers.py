"""Intra-model sparsifiers (the left column of the paper's Table 7). Each maps the task vectors of one tensor,
one per model, to `Sparse` outputs; maths in shared/spec/methods.md."""

from __future__ import annotations

import torch

from .context import Param, Sparse, TensorContext, no_nan_scores, number_in
from .saliency import Score, magnitude
from .selection import (
    as_rows,
    by_row_rank,
    keep_top_,
    keep_top_magnitude_,
    kth_largest_many,
    row_band_mask,
    sorted_at,
    topk_mask,
)

RATIO = number_in(0.0, 1.0)


class Sparsifier:
    """Deltas passed in belong to the call: a sparsifier may modify them in place (saves a pass per model)."""

    params: tuple[Param, ...] = ()
    version = 1  # bump when the selection changes: cached merges of every method using it are recomputed
    uses_kernels = False  # selects through obim.merging.kernels on CPU (numba: loaded while a merge starts)

    def code_version(self) -> str:
        score = getattr(self, "score", None)
        return f"{type(self).__name__}@{self.version}" + (f"({score.__name__})" if score is not None else "")

    def __call__(self, deltas: list[torch.Tensor], ctx: TensorContext) -> list[Sparse]:
        return [self.one(d, i, ctx) for i, d in enumerate(deltas)]

    def one(self, delta: torch.Tensor, i: int, ctx: TensorContext) -> Sparse:
        raise NotImplementedError

    def validate(self, params: list[dict], models: list[str]) -> str | None:
        """Cross-parameter checks (per model); an error text or None."""
        return None


class Keep(Sparsifier):
    """No sparsification (TA, TALL-Mask)."""

    def one(self, delta, i, ctx):
        return Sparse(delta)


class Rank(Sparsifier):
    """No masking here: hand each model's scores to a combiner that selects (IM)."""

    def __init__(self, score: Score):
        self.score = score

    def one(self, delta, i, ctx):
        return Sparse(delta, lambda: self.score(delta, i, ctx))  # computed when IM reaches this model


class TopK(Sparsifier):
    """Keep the top-k entries of each task vector by a score (magnitude: TIES; saliency: OBM), k = int(density·n)."""

    uses_kernels = True

    def __init__(self, score: Score, density: float):
        self.score = score
        self.params = (Param("density", density, RATIO, per_model=True, doc="fraction of entries kept"),)

    def __call__(self, deltas, ctx):
        ks = [int(ctx.params[i]["density"] * d.numel()) for i, d in enumerate(deltas)]
        if self.score is magnitude:  # selected on |δ| without materialising it, each δ trimmed in place
            kths = kth_largest_many(deltas, ks, absolute=True)
            return [Sparse(keep_top_magnitude_(d, k, kth)) for d, k, kth in zip(deltas, ks, kths, strict=True)]
        scores = [no_nan_scores(self.score(d, i, ctx), ctx, i) for i, d in enumerate(deltas)]
        kths = kth_largest_many(scores, ks, nonneg=True)  # the selections of all models run in parallel
        return [Sparse(keep_top_(d, k, t, s)) for d, s, k, t in zip(deltas, scores, ks, kths, strict=True)]


class RandomDrop(Sparsifier):
    """DARE: drop each entry with probability p, rescale the survivors by 1/(1-p)."""

    def __init__(self, drop_rate: float):
        self.params = (Param("drop_rate", drop_rate, number_in(0.0, 1.0, hi_open=True), per_model=True),)

    def one(self, delta, i, ctx):
        q = 1.0 - ctx.params[i]["drop_rate"]
        keep = ctx.rand(i, delta.shape).sub_(q).neg_().clamp_(min=0).sign_()  # 1.0 exactly where u < 1 - p
        return Sparse(delta.mul_(keep).div_(q))


class MagPrune(Sparsifier):
    """DELLA's MAGPRUNE: per row, keep probability rises linearly with the magnitude rank; rescale by 1/p."""

    def __init__(self, density: float, epsilon: float):
        self.params = (
            Param("density", density, number_in(0.0, 1.0, True, True), per_model=True),
            Param("epsilon", epsilon, number_in(0.0, 1.0, hi_open=True), per_model=True),
        )

    def validate(self, params, models):
        for p, name in zip(params, models, strict=True):
            lo, hi = p["density"] - p["epsilon"], p["density"] + p["epsilon"]
            if not (lo > 0 and hi < 1):
                return f"model {name}: della needs 0 < density - epsilon and density + epsilon < 1, got {lo:g}, {hi:g}"
        return None

    def one(self, delta, i, ctx):
        density, eps = ctx.params[i]["density"], ctx.params[i]["epsilon"]
        rows = as_rows(delta)
        m = rows.shape[1]
        if m > 1:  # p_keep by ascending magnitude rank r: (density - ε) + 2ε·(r - 1)/(m - 1)
            table = (density - eps) + 2 * eps * torch.arange(m, dtype=torch.float64) / (m - 1)
            p_keep = by_row_rank(rows.abs(), table.float(), nonneg=True).to(delta.device)
        else:
            p_keep = torch.full_like(rows, density)
        keep = p_keep - ctx.rand(i, rows.shape)  # > 0 exactly where u < p_keep
        keep.clamp_(min=0).sign_()
        return Sparse(rows.mul_(keep).div_(p_keep).view(delta.shape))


class Breadcrumbs(Sparsifier):
    """Per row: drop the top gamma fraction by magnitude (outliers), keep the next `density`, drop the rest."""

    def __init__(self, density: float, gamma: float):
        self.params = (
            Param("density", density, RATIO, per_model=True),
            Param("gamma", gamma, RATIO, per_model=True),
        )

    def validate(self, params, models):
        for p, name in zip(params, models, strict=True):
            if p["density"] + p["gamma"] > 1:
                return f"model {name}: breadcrumbs needs density + gamma <= 1, got {p['density'] + p['gamma']:g}"
        return None

    def one(self, delta, i, ctx):
        m = as_rows(delta).shape[1]
        top = int(ctx.params[i]["gamma"] * m)
        keep = int(ctx.params[i]["density"] * m)
        return Sparse(delta.mul_(row_band_mask(delta.abs(), top, top + keep, nonneg=True)))


def _norm_(x: torch.Tensor) -> torch.Tensor:
    """In place: (x - min) / (max - min) over the whole tensor; 0 where max = min."""
    lo, hi = torch.aminmax(x)
    if hi == lo:
        return x.zero_()
    return x.sub_(lo).div_(hi - lo)


class PCBBalance(Sparsifier):
    """PCB: clip outliers, intra-balancing exp(T·norm²), inter-balancing tanh(δ ⊙ Σδ), keep the top `ratio` as
    normalised weights (the Sparse score) over the clipped task vectors."""

    uses_kernels = True

    def __init__(self, ratio: float, clip_q: float = 1e-4):
        self.clip_q = clip_q
        self.params = (Param("ratio", ratio, number_in(0.0, 1.0, lo_open=True), per_model=True),)

    def __call__(self, deltas, ctx):
        T = len(deltas)
        total = deltas[0].clone()
        for d in deltas[1:]:
            total += d
        out = []
        for i, d in enumerate(deltas):
            n, q, r = d.numel(), self.clip_q, ctx.params[i]["ratio"]
            a = d.abs()
            lo, hi = sorted_at(a, [int(n * q), int(n * (1 - q)) - 1], nonneg=True)
            a.clamp_(min=lo, max=max(lo, hi))
            bal = _norm_(a.clone()).square_().mul_(T).exp_()  # intra-balancing
            bal.mul_(torch.mul(d, total).tanh_())  # inter-balancing (unclipped δ)
            (floor,) = sorted_at(bal, [min(int(n * (1 - r)), n - 1)])
            weight = _norm_(bal.clamp_(min=floor))
            out.append(Sparse(a.mul_(torch.sign(d)), weight))  # the clipped δ
        return out


class VarianceSelect(Sparsifier):
    """SCE's select and calculate: keep, in every model, the entries where the task vectors vary most across the
    models (the top int(select_topk · m) by variance, m the entries of nonzero variance; ties to the lowest index),
    and weigh each model by its kept entries' mean square, normalised to sum 1 over the models (equal weights when
    every kept entry is 0). The weight is the Sparse score (a 0-d tensor)."""

    params = (Param("select_topk", 1.0, number_in(0.0, 1.0), doc="fraction of the varying entries kept"),)

    def validate(self, params, models):
        if len(models) == 1 and params[0]["select_topk"] < 1:  # one model varies nowhere: nothing would be kept
            return "sce with one model: select_topk below 1 keeps nothing (no entry varies across one model)"
        return None

    def __call__(self, deltas, ctx):
        tau = ctx.param("select_topk")
        if tau < 1:
            mean = deltas[0].clone()
            for d in deltas[1:]:
                mean += d
            mean /= len(deltas)
            var = torch.zeros_like(mean)
            for d in deltas:
                var.add_(torch.sub(d, mean).square_())
            var /= len(deltas)  # population variance, per entry
            k = int(int(torch.count_nonzero(var)) * tau)
            mask = topk_mask(var, k, deltas[0].dtype)
            for d in deltas:
                d.mul_(mask)
        weights = torch.tensor(
            [float(torch.linalg.vector_norm(d, dtype=torch.float64)) ** 2 / max(d.numel(), 1) for d in deltas],
            dtype=torch.float64,
        )
        total = float(weights.sum())
        weights = weights / total if total > 0 else torch.full_like(weights, 1.0 / len(deltas))
        return [Sparse(d, w.to(d.dtype)) for d, w in zip(deltas, weights, strict=True)]
