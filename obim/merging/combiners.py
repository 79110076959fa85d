"""Inter-model combiners (the right column of the paper's Table 7): `Sparse` outputs of all models -> δM."""

from __future__ import annotations

import contextlib
import math
from contextlib import contextmanager

import torch

from .checks import optional
from .context import Param, Sparse, TensorContext, no_nan_scores, number_in, one_of
from .errors import ObimError
from .selection import kth_largest_many, topk_mask
from .threads import parallel_map


class Combiner:
    """The deltas of the Sparse outputs passed in belong to the call: a combiner may modify them in place."""

    params: tuple[Param, ...] = ()
    uses_order = False
    uses_base = False  # needs the base's weights themselves (ctx.base), not only the task vectors
    uses_task_sum = False  # needs |Σt δt|₁ of the task vectors as they were read (ctx.task_sum_l1), before sparsifying
    needs_blocks = False  # needs the model's decoder blocks (two at least) in its tensor names
    max_models: int | None = None  # the most models it combines (None: any number)
    uses_kernels = False  # combines or selects through obim.merging.kernels on CPU (numba, loaded at a merge's start)
    version = 1  # bump when the combination changes: cached merges of every method using it are recomputed

    def code_version(self) -> str:
        return f"{type(self).__name__}@{self.version}"

    def __call__(self, sparse: list[Sparse], ctx: TensorContext) -> torch.Tensor:
        raise NotImplementedError

    def validate(self, params: list[dict], models: list[str]) -> str | None:
        return None


def _sum(tensors) -> torch.Tensor:
    """Σ of tensors into a fresh buffer (inputs untouched)."""
    it = iter(tensors)
    out = next(it).clone()
    for t in it:
        out += t
    return out


class Sum(Combiner):
    """Task arithmetic: δM = Σt δ̂t."""

    def __call__(self, sparse, ctx):
        return _sum(s.delta for s in sparse)


class DisjointMean(Combiner):
    """TIES steps 2-3: elect a sign per entry (0 -> +1), average the entries that agree with it."""

    uses_kernels = True

    def __call__(self, sparse, ctx):
        deltas = [s.delta for s in sparse]
        if _fusable(deltas):  # one pass (kernels.disjoint_mean) where the torch ops took ~20; the same bytes
            return _fused("disjoint_mean", deltas)
        return disjoint_mean_torch(deltas)


def disjoint_mean_torch(deltas: list[torch.Tensor]) -> torch.Tensor:
    """DisjointMean in torch ops (consumes the deltas): the definition the fused CPU kernel reproduces bit for bit."""
    sign = _sum(deltas).sign_().add_(0.5).sign_()  # sign(Σ), with 0 -> +1
    # float arithmetic only (bool masks cost 3-5x more here), in place in the (consumed) deltas:
    # δ·γ > 0 exactly where δ agrees with γ
    agree = [d.mul_(sign).clamp_(min=0) for d in deltas]
    num = _sum(agree)
    cnt = _sum(a.sign_() for a in agree)
    return num.mul_(sign).div_(cnt.clamp_(min=1))


_FUSED_CHUNK = 1 << 18  # entries per pool task: the models' chunks and the output's stay in cache


def _fusable(deltas: list[torch.Tensor]) -> bool:
    """Whether a fused CPU kernel can combine these deltas (contiguous float32 CPU tensors)."""
    return all(not d.is_cuda and d.dtype == torch.float32 and d.is_contiguous() for d in deltas)


def _fused(name: str, deltas: list[torch.Tensor], *args) -> torch.Tensor:
    """A new float32 tensor from kernels.<name>(tuple of the deltas' chunks, *args, the output's chunk), chunk by
    chunk on the pool (obim.merging.kernels loads numba, so it is imported here, on use)."""
    from . import kernels

    kernel = getattr(kernels, name)
    arrays = [d.reshape(-1).numpy() for d in deltas]
    out = torch.empty(deltas[0].shape, dtype=torch.float32)
    flat = out.view(-1).numpy()

    def work(s):
        e = s + _FUSED_CHUNK
        kernel(tuple(a[s:e] for a in arrays), *args, flat[s:e])

    parallel_map(work, range(0, flat.size, _FUSED_CHUNK))
    return out


class Choice(Combiner):
    """Pick a combiner by a method parameter (DARE's `combine: sum | ties`)."""

    def __init__(self, key: str, default: str, options: dict[str, Combiner]):
        self.key, self.options = key, options
        self.params = (Param(key, default, one_of(*options)),)

    def __call__(self, sparse, ctx):
        return self.options[ctx.param(self.key)](sparse, ctx)

    def code_version(self) -> str:
        return f"Choice@{self.version}[" + ",".join(f"{k}={c.code_version()}" for k, c in self.options.items()) + "]"


class IterativeMerging(Combiner):
    """IM: in the tensor's order, each model takes the top int(retention·n) of its scores among positions not yet
    taken; each position holds at most one model's delta (no averaging, no rescaling)."""

    uses_kernels = True

    uses_order = True
    params = (Param("retention", None, number_in(0.0, 1.0), per_model=True, doc="keep ratio of each model"),)

    def validate(self, params, models):
        missing = [m for p, m in zip(params, models, strict=True) if p["retention"] is None]
        if missing:
            return f"models {', '.join(missing)}: `retention` is required (per model, or in `parameters`)"
        total = sum(p["retention"] for p in params)
        if total > 1 + 1e-9:
            return f"retention ratios must sum to at most 1 for iterative merging, got {total:g} " + str(
                {m: p["retention"] for p, m in zip(params, models, strict=True)}
            )
        return None

    def __call__(self, sparse, ctx):
        shape = sparse[0].delta.shape
        n = sparse[0].delta.numel()
        # scores are >= 0; taken positions get -1e30 added, which puts them below every free one
        penalty = torch.zeros(n, dtype=torch.float32, device=ctx.device)
        out = torch.zeros(n, dtype=torch.float32, device=ctx.device)
        for step, i in enumerate(ctx.order):
            k = int(ctx.params[i]["retention"] * n)
            if k == 0:
                continue
            score = no_nan_scores(sparse[i].score.reshape(-1), ctx, i)
            if step:
                score.add_(penalty)
            kth = kth_largest_many([score], [k], nonneg=True)[0]  # with the radix select's cut, on CPU
            delta = sparse[i].delta.reshape(-1)
            if kth is not None and len(kth) > 2 and delta.is_contiguous():
                kth[2].take_into(delta, out, penalty)  # the three ops below in one pass, the same bytes
                continue
            mask = topk_mask(score, k, torch.float32, kth)
            out.addcmul_(delta, mask)  # positions are exclusive: adding into zeros is exact
            penalty.add_(mask, alpha=-1e30)
        return out.view(shape)


class Consensus(Combiner):
    """TALL-Mask / consensus: keep the summed task vector where at least k models' masks agree it matters."""

    uses_kernels = True

    params = (
        Param("tall_lambda", 0.4, number_in(0.0, float("inf")), per_model=True, doc="mask threshold λt"),
        Param("k", 2, number_in(1, float("inf"), integer=True), doc="models that must agree"),
    )

    def validate(self, params, models):
        k = params[0]["k"]
        if k > len(models):  # no entry could get k votes: the merge would return the base
            return f"parameter `k` of tall_mask is {k}, more than the {len(models)} models merged"
        return None

    def __call__(self, sparse, ctx):
        deltas = [s.delta for s in sparse]
        lams = [float(ctx.params[i]["tall_lambda"]) for i in range(len(deltas))]
        if _fusable(deltas):  # one pass, the torch ops' bytes (torch multiplies by λ as float32 too)
            lam32 = torch.tensor(lams, dtype=torch.float32).numpy()
            return _fused("consensus", deltas, lam32, float(ctx.param("k")))
        return consensus_torch(deltas, lams, ctx.param("k"))


def consensus_torch(deltas: list[torch.Tensor], lams: list[float], k: int) -> torch.Tensor:
    """Consensus in torch ops: the definition the fused CPU kernel reproduces bit for bit."""
    total = _sum(deltas)
    votes = torch.zeros_like(total)
    for d, lam in zip(deltas, lams, strict=True):
        votes += d.abs() > lam * (total - d).abs()
    return torch.where(votes >= k, total, 0.0)


class WeightedMean(Combiner):
    """PCB: δM = Σt wt ⊙ δt / max(Σt wt, 1e-12), with the weights wt the sparsifier put in `score`."""

    def __call__(self, sparse, ctx):
        num, den = torch.zeros_like(sparse[0].delta), torch.zeros_like(sparse[0].delta)
        for s in sparse:
            num.addcmul_(s.score, s.delta)
            den += s.score
        return num.div_(den.clamp_(min=1e-12))


DOT_THRESHOLD = 0.9995  # |cos| above which two endpoints count as parallel: linear interpolation
_CHUNK = 1 << 20  # entries per float64 chunk of the norms and dot products (no float64 copy of a whole tensor)


def _stats(a0: torch.Tensor, da: torch.Tensor | None, b0: torch.Tensor, db: torch.Tensor | None) -> tuple[float, ...]:
    """(|a|², |b|², a·b) in float64 by chunks, for a = a0 + da and b = b0 + db (None: no delta), never building a
    or b whole."""
    fa, fb = a0.reshape(-1), b0.reshape(-1)
    ga = da.reshape(-1) if da is not None else None
    gb = db.reshape(-1) if db is not None else None
    aa = bb = ab = 0.0
    for i in range(0, fa.numel(), _CHUNK):
        a = fa[i : i + _CHUNK].double()
        if ga is not None:
            a += ga[i : i + _CHUNK]
        b = fb[i : i + _CHUNK].double()
        if gb is not None:
            b += gb[i : i + _CHUNK]
        aa, bb, ab = aa + float(a.dot(a)), bb + float(b.dot(b)), ab + float(a.dot(b))
    return aa, bb, ab


def slerp_coefficients(t: float, aa: float, bb: float, ab: float, eps: float = 1e-8) -> tuple[float, float]:
    """(c0, c1) of slerp = c0·a + c1·b for |a|² = aa, |b|² = bb, a·b = ab (Shoemake 1985): Ω the angle between
    the directions, c0 = sin((1-t)Ω)/sin Ω, c1 = sin(tΩ)/sin Ω; linear, (1-t, t), where the directions are
    (anti)parallel (|cos Ω| > DOT_THRESHOLD). A zero vector (norm <= eps) has no direction: cos Ω = 0, as in
    mergekit."""
    na, nb = math.sqrt(aa), math.sqrt(bb)
    cos = max(-1.0, min(1.0, ab / (na * nb))) if na > eps and nb > eps else 0.0
    if abs(cos) > DOT_THRESHOLD:
        return 1.0 - t, t
    omega = math.acos(cos)
    return math.sin((1.0 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Spherical linear interpolation of two tensors taken as single vectors (slerp_coefficients)."""
    c0, c1 = slerp_coefficients(t, *_stats(v0, None, v1, None))
    return (v0 * c0).add_(v1, alpha=c1)


class Slerp(Combiner):
    """SLERP between two endpoints: the base and one model (mergekit's), or two models. δM = slerp(t, θa, θb) - θ0,
    so that θ0 + λ·δM is the interpolation at λ = 1; computed as (c0 + c1 - 1)·θ0 + c0·δa + c1·δb, never building
    the endpoints."""

    uses_base = True
    max_models = 2
    params = (
        Param("t", 0.5, number_in(0.0, 1.0), doc="0: the first endpoint (the base, or the first model); 1: the second"),
    )

    def validate(self, params, models):
        if len(models) > 2:
            return (
                f"slerp interpolates two endpoints (the base and one model, or two models), got {len(models)} "
                f"models ({', '.join(models)})"
            )
        return None

    def __call__(self, sparse, ctx):
        base = ctx.base
        if base is None:
            raise ObimError(f"tensor {ctx.name}: slerp needs the base's weights (a combiner with uses_base)")
        da = None if len(sparse) == 1 else sparse[0].delta
        db = sparse[-1].delta
        c0, c1 = slerp_coefficients(ctx.param("t"), *_stats(base, da, base, db))
        out = base * (c0 + c1 - 1.0)
        if da is not None:
            out.add_(da, alpha=c0)
        return out.add_(db, alpha=c1)


@contextmanager
def _one_thread():
    """LAPACK's SVD reduces in an order that depends on its thread count: one thread, so the same inputs give the
    same bytes on any machine (on CPU; the thread count as it was afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class TaskSingularVectors(Combiner):
    """TSV-M (task singular vectors): per matrix, each task vector's top 1/T singular triplets (those of its
    numerical rank only: a direction of singular value ~0 is arbitrary, and would rotate the other tasks'),
    their left and right singular vectors made orthonormal together (the nearest orthonormal matrices, from an SVD
    of each concatenation), recombined with their singular values; a tensor that is not a matrix: the mean. The
    SVDs run on one CPU thread (deterministic bytes)."""

    def __call__(self, sparse, ctx):
        deltas = [s.delta for s in sparse]
        if deltas[0].dim() != 2:
            return _sum(deltas).div_(len(deltas))
        k = min(deltas[0].shape) // len(deltas)
        if k == 0:  # fewer singular directions than models: nothing can be kept for each
            return torch.zeros_like(deltas[0])
        tol = max(deltas[0].shape) * torch.finfo(torch.float32).eps
        cpu = deltas[0].device.type == "cpu"

        def top(d):
            with _one_thread() if cpu else contextlib.nullcontext():
                u, s, vh = torch.linalg.svd(d, full_matrices=False)
            kt = min(k, int((s > tol * s[0]).sum())) if s[0] > 0 else 0
            return u[:, :kt].clone(), s[:kt].clone(), vh[:kt].clone()

        def nearest_orthonormal(m):  # U⊥ = P Qᵀ
            with _one_thread() if cpu else contextlib.nullcontext():
                p, _, qh = torch.linalg.svd(m, full_matrices=False)
                return p @ qh

        # each SVD on one thread (deterministic bytes), the models' (then U's and V's) side by side on the pool
        run = parallel_map if cpu else lambda f, xs: [f(x) for x in xs]
        us, ss, vs = zip(*run(top, deltas), strict=True)
        if not sum(x.numel() for x in ss):
            return torch.zeros_like(deltas[0])
        s_cat = torch.cat(ss)
        u_orth, v_orth = run(nearest_orthonormal, [torch.cat(us, dim=1), torch.cat(vs, dim=0)])
        del us, vs
        return (u_orth * s_cat) @ v_orth


class SignWeightedMean(Combiner):
    """SCE's erase and merge: elect a sign per entry (sign of Σt δt, 0 -> +1), erase the entries of other signs
    (and zeros), then δM = Σt wt·δt / Σt wt over the entries kept, wt the model weights in `score`; 0 where no
    model keeps the entry."""

    def __call__(self, sparse, ctx):
        sign = _sum(s.delta for s in sparse).sign_().add_(0.5).sign_()  # sign(Σ), with 0 -> +1
        num, den = torch.zeros_like(sign), torch.zeros_like(sign)
        for s in sparse:
            keep = s.delta.mul(sign).clamp_(min=0).sign_()  # 1.0 where δ agrees with the elected sign
            num.addcmul_(s.delta, keep, value=float(s.score))
            den.add_(keep, alpha=float(s.score))
        return torch.where(den > 0, num / den.clamp(min=torch.finfo(den.dtype).tiny), 0.0)


class LayerScaled(Combiner):
    """LiNeS: another combiner's δM scaled by depth, alpha + beta * l / (B - 1) in decoder block l of B (0-based),
    alpha outside the blocks. alpha by default |Σt δt|₁ / (T |δM|₁), the task vectors as read (before any
    sparsifier), in float64: the authors' rule (1/T under a sum), with the tensor's norms where they take the whole
    model's."""

    uses_task_sum = True
    needs_blocks = True

    def __init__(self, inner: Combiner):
        self.inner = inner
        self.uses_order, self.uses_base, self.max_models = inner.uses_order, inner.uses_base, inner.max_models
        self.params = (
            *inner.params,
            Param("alpha", None, optional(number_in(-1e9, 1e9)), doc="the shallowest scale (null: the paper's rule)"),
            Param("beta", 0.5, number_in(-1e9, 1e9), doc="the deepest block's scale minus alpha"),
        )

    def code_version(self) -> str:
        return f"LayerScaled@{self.version}[{self.inner.code_version()}]"

    def validate(self, params, models):
        return self.inner.validate(params, models)

    def __call__(self, sparse, ctx):
        alpha = ctx.param("alpha")
        n = len(sparse)
        merged = self.inner(sparse, ctx)
        if alpha is None:
            norm = float(torch.linalg.vector_norm(merged, ord=1, dtype=torch.float64))
            alpha = ctx.task_sum_l1 / (n * norm) if norm > 0 else 1.0 / n
        depth = 0.0 if ctx.block is None or ctx.n_blocks < 2 else ctx.block / (ctx.n_blocks - 1)
        return merged.mul_(alpha if ctx.block is None else alpha + ctx.param("beta") * depth)


def _mean(sparse: list[Sparse]) -> torch.Tensor:
    return _sum(s.delta for s in sparse).div_(len(sparse))


class RegressionMean(Combiner):
    """RegMean (Jin et al., 2212.09849), per linear weight W (out x in, y = W x): the W minimising
    Σi ‖Xi W_iᵀ - Xi Wᵀ‖², W = (Σi W_i G̃_i)(Σi G̃_i)⁻¹ with G̃ = a·G + (1 - a)·diag(G), G_i model i's mean input
    Gram matrix. In task vectors (the base's W0 drops out, Σ G̃_i (Σ G̃_i)⁻¹ = I): δM = (Σi δ_i G̃_i)(Σi G̃_i)⁻¹.
    Tensors without Gram matrices (norms, embeddings) take the simple average, as the paper does. Solved in float64;
    a singular Σ G̃ (an input feature no model ever saw) takes the pseudo-inverse."""

    params = (Param("alpha", 0.6, number_in(0.0, 1.0), doc="scale of the off-diagonal Gram entries"),)

    def __call__(self, sparse, ctx):
        grams = ctx.stats
        if any(g is None for g in grams):  # not a linear weight (or a weight some model's tokens never reached)
            return _mean(sparse)
        a = float(ctx.param("alpha"))
        lhs: torch.Tensor | None = None
        rhs: torch.Tensor | None = None
        for s, g in zip(sparse, grams, strict=True):
            g = g.to(ctx.device, torch.float64, copy=True)  # scaled in place below: never the caller's
            if a != 1.0:
                d = g.diagonal().clone()
                g.mul_(a).diagonal().copy_(d)
            lhs = g if lhs is None else lhs.add_(g)
            term = s.delta.to(torch.float64) @ g
            rhs = term if rhs is None else rhs.add_(term)
            s.delta = None  # each task vector freed once used
        assert lhs is not None and rhs is not None
        sol, info = torch.linalg.solve_ex(lhs, rhs.T)  # lhs symmetric: (rhs lhs⁻¹)ᵀ = lhs⁻¹ rhsᵀ
        if int(info) != 0:
            sol = torch.linalg.pinv(lhs, hermitian=True) @ rhs.T
        return sol.T.to(torch.float32).contiguous()


class FisherMean(Combiner):
    """Fisher merging (Matena & Raffel, 2111.09832) of the task vectors: δM = Σi wi·F̂i·δi / Σi wi·F̂i entry by
    entry, F̂i = Fi/‖Fi‖₂ + ε (each model's Fisher over all its parameters normalised to one scale, ε keeping an
    entry no model's Fisher reaches at the weighted mean of its task vectors), wi the model's weight."""

    params = (
        Param("weight", 1.0, number_in(0.0, 1e9), per_model=True, doc="the model's scaling λi"),
        Param("min_fisher", 1e-6, number_in(0.0, 1.0), doc="ε added to each normalised Fisher entry"),
    )

    def validate(self, params, models):
        if not any(p["weight"] > 0 for p in params):
            return "parameter `weight` of method fisher: at least one model needs a positive weight"
        return None

    def __call__(self, sparse, ctx):
        eps = float(ctx.param("min_fisher"))
        num: torch.Tensor | None = None
        den: torch.Tensor | None = None
        for i, s in enumerate(sparse):
            f = ctx.stats[i]
            w = (f.to(ctx.device, torch.float32) + eps) if f is not None else torch.ones_like(s.delta)
            w.mul_(float(ctx.params[i]["weight"]))
            num = s.delta.mul_(w) if num is None else num.add_(s.delta.mul_(w))
            den = w if den is None else den.add_(w)
        assert num is not None and den is not None
        return num.div_(den.clamp_(min=torch.finfo(torch.float32).tiny))
