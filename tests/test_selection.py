"""Top-k selection against a brute-force reference: stable sort by (-value, index)."""

from types import SimpleNamespace

import pytest
import torch

from obim.merging.selection import (
    kth_largest,
    kth_largest_many,
    row_band_mask,
    row_ranks,
    row_topk_mask,
    sorted_at,
    topk_mask,
)


def reference_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    flat = x.reshape(-1)
    order = sorted(range(flat.numel()), key=lambda i: (-float(flat[i]), i))
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask.view(x.shape)


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
@pytest.mark.parametrize("seed", range(4))
def test_topk_mask_matches_reference_with_many_ties(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 5, (7, 9), generator=g).float()  # 5 distinct values in 63 entries: ties everywhere
    for k in [0, 1, 5, 17, 31, 62, 63]:
        got = topk_mask(x, k, dtype)
        assert got.dtype == dtype
        assert torch.equal(got.bool(), reference_topk(x, k)), k


def test_topk_mask_large_tensor_and_negative_scores():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(300_000, generator=g) * 100).round()  # ties, negatives
    x[::7] = float("-inf")
    for k in [1, 1000, 150_000, 299_999]:
        m = topk_mask(x, k, torch.float32)
        assert int(m.sum()) == k
        kept, dropped = x[m.bool()], x[~m.bool()]
        assert kept.min() >= dropped.max()
        thr = kept.min()
        # among entries equal to the threshold, the kept ones have lower indices than the dropped ones
        eq = (x == thr).nonzero().squeeze(1)
        kept_eq = eq[m.bool()[eq]]
        drop_eq = eq[~m.bool()[eq]]
        if kept_eq.numel() and drop_eq.numel():
            assert kept_eq.max() < drop_eq.min()


def test_kth_largest_counts_strictly_larger():
    x = torch.tensor([3.0, 1.0, 3.0, 2.0, 3.0, 0.0])
    assert kth_largest(x, 1) == (3.0, 0)
    assert kth_largest(x, 4) == (2.0, 3)
    assert kth_largest_many([x, x], [2, 6]) == [(3.0, 0), None]


def test_row_topk_mask_matches_reference():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 4, (6, 11), generator=g).float()
    for k in [0, 1, 3, 10, 11]:
        got = row_topk_mask(x, k)
        want = torch.stack([reference_topk(r, k) for r in x])
        assert torch.equal(got, want), k
    v = torch.tensor([1.0, 3.0, 3.0, 2.0])  # 1-D: one row
    assert row_topk_mask(v, 2).tolist() == [False, True, True, False]


def test_row_ranks_ascending_ties_lower_column_higher():
    x = torch.tensor([[0.3, 0.1, 0.3, 0.2], [1.0, 1.0, 1.0, 0.0]])
    assert row_ranks(x).tolist() == [[4.0, 1.0, 3.0, 2.0], [4.0, 3.0, 2.0, 1.0]]
    g = torch.Generator().manual_seed(2)
    big = torch.randint(0, 50, (300, 5000), generator=g).float()  # several row blocks, many ties
    ranks = row_ranks(big)
    order = sorted(range(5000), key=lambda j: (float(big[7, j]), -j))
    want = torch.empty(5000)
    want[order] = torch.arange(1, 5001).float()
    assert torch.equal(ranks[7], want)
    assert torch.equal(ranks.sort(1).values, torch.arange(1, 5001).float().expand(300, -1))


def test_row_band_mask():
    x = torch.tensor([[5.0, -1.0, 3.0, 3.0, 0.0, 2.0]])
    assert row_band_mask(x, 1, 3).int().tolist() == [[0, 0, 1, 1, 0, 0]]
    assert row_band_mask(x, 0, 2).int().tolist() == [[1, 0, 1, 0, 0, 0]]
    assert row_band_mask(x, 4, 6).int().tolist() == [[0, 1, 0, 0, 1, 0]]
    assert row_band_mask(x, 0, 6).all() and not row_band_mask(x, 2, 2).any()


@pytest.mark.parametrize("nonneg", [False, True])
def test_sorted_at_with_mostly_equal_entries_matches_a_sort(nonneg):
    """bf16 task vectors: most entries 0 (the bracketed selection's case), the rest a few hundred values."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(300_000, generator=g) * 0.01).to(torch.bfloat16).float()
    x[torch.rand(300_000, generator=g) < 0.6] = 0
    if nonneg:
        x = x.abs()
    want = torch.sort(x).values
    pos = [0, 30, 150_000, 299_000, 299_969, -1]
    assert sorted_at(x, pos, nonneg=nonneg) == [float(want[p]) for p in pos]


def test_sorted_at_python_indexing():
    x = torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0])
    assert sorted_at(x, [0, 2, -1, 4]) == [1.0, 3.0, 5.0, 5.0]


@pytest.mark.parametrize("fill", [0.0, -1e30, 3.0])
def test_kth_largest_with_heavy_duplicates_matches_partition(fill):
    """The bracketed path (most entries equal) against a plain sort."""
    g = torch.Generator().manual_seed(7)
    n = 150_000
    x = torch.randint(0, 50, (n,), generator=g).float() / 7
    x[torch.rand(n, generator=g) < 0.7] = fill
    for k in [1, 77, 20_000, 44_000, 45_000, 46_000, 100_000, 104_000, 149_999]:
        if fill < 0 and k > int((x >= 0).sum()):
            continue  # nonneg contract: the k largest must be >= 0
        s = torch.sort(x, descending=True).values
        thr = float(s[k - 1])
        assert kth_largest(x, k, nonneg=True) == (thr, int((x > thr).sum())), k
        m = topk_mask(x, k, torch.float32)
        assert int(m.sum()) == k and x[m.bool()].min() >= x[~m.bool()].max()


@pytest.mark.parametrize("nonneg", [False, True])
def test_radix_selection_over_several_chunks_matches_a_sort(nonneg):
    """Tensors of several histogram chunks, selected together (kth_largest_many): every (k-th largest, count
    strictly larger) equals a sort's; signed values with -0.0 beside 0.0 (equal, as floats compare), infinities,
    denormals; nonneg: negative entries are exclusions, below every selectable entry."""
    from obim.merging.selection import _CHUNK

    g = torch.Generator().manual_seed(3)
    n = 2 * _CHUNK + 12_345
    xs = [(torch.randn(n, generator=g) * 0.01).to(torch.bfloat16).float() for _ in range(3)]  # bf16 ties
    xs[1][::5] = -0.0
    xs[1][1::5] = 0.0  # 0.6 n: the k-th largest among the -0.0s
    xs[2][:100] = torch.tensor([float("inf"), float("-inf"), 1e-42, -1e-42] * 25)
    if nonneg:
        xs = [x.abs() for x in xs]
        xs[0][::3] = -1e30  # exclusions
    ks = [1, int(0.6 * n), n - 7 if not nonneg else int((xs[2] >= 0).sum()) - 1]
    got = kth_largest_many(xs, ks, nonneg=nonneg)
    for x, k, (thr, above, cut) in zip(xs, ks, got, strict=True):
        s = torch.sort(x, descending=True).values
        assert thr == float(s[k - 1]) and above == int((x > s[k - 1]).sum()), k
        assert torch.equal(cut.indices(), (x == thr).nonzero().squeeze(1)[: k - above])  # the first, in order
        assert kth_largest(x, k, nonneg=nonneg) == (thr, above)
        mask = topk_mask(x, k, torch.float32, kth=(thr, above, cut))
        assert torch.equal(mask, topk_mask(x, k, torch.float32, kth=(thr, above)))  # ties found by a scan
        # the cut applied in place: exactly d·mask, a zero of its own sign where dropped
        d = torch.randn(n, generator=g)
        d[::4] = -d[::4].abs()
        assert torch.equal(cut.keep_into(d.clone()).view(torch.int32), (d * mask).view(torch.int32))


def test_a_strided_tensor_is_selected_as_its_values():
    """A strided 1-D view (reshape(-1) does not copy it) gives what its contiguous copy gives."""
    g = torch.Generator().manual_seed(5)
    x = torch.rand(1 << 18, generator=g)[::2]
    assert not x.is_contiguous()
    for nonneg in (False, True):
        assert kth_largest(x, 1000, nonneg=nonneg) == kth_largest(x.contiguous(), 1000, nonneg=nonneg)
        assert sorted_at(x, [5, -5], nonneg=nonneg) == sorted_at(x.contiguous(), [5, -5], nonneg=nonneg)
    (got,) = kth_largest_many([x], [1000], nonneg=True)
    assert got[:2] == kth_largest(x.contiguous(), 1000)


def test_tied_indices_from_sparse_chunks_past_the_first():
    """Ties at the k-th value in the second and third chunks only, few in their radix bin (the positions kept by
    the band pass): the first k - above of them, in index order."""
    from obim.merging.selection import _CHUNK

    g = torch.Generator().manual_seed(6)
    x = torch.rand(3 * _CHUNK, generator=g)
    x[x == 0.5] = 0.25
    at = torch.cat([torch.arange(_CHUNK + 7, _CHUNK + 7 + 60 * 97, 97), torch.arange(2 * _CHUNK + 3, 2 * _CHUNK + 90)])
    x[at] = 0.5
    k = int((x > 0.5).sum()) + 70
    (thr, above, cut) = kth_largest_many([x], [k], nonneg=True)[0]
    assert (thr, above) == (0.5, k - 70)
    assert torch.equal(cut.indices(), at[:70])
    assert cut.quotas[:3] == [0, 60, 10]  # how many ties each chunk keeps, in index order


@pytest.mark.parametrize("large", [False, True])
def test_top_magnitudes_kept_in_place_match_a_sort(large):
    """keep_top_magnitude_ (the radix select on |d| never materialised, the trim fused, on the pool; a partition
    for small tensors): exactly the k largest |d| kept (ties: lowest indices), every other entry a zero of its own
    sign, as d·mask gives; bf16 values tie often, -0.0 and 0.0 included."""
    from obim.merging.selection import _CHUNK, keep_top_magnitude_

    g = torch.Generator().manual_seed(8)
    n = 2 * _CHUNK + 999 if large else 5_000
    d = (torch.randn(n, generator=g) * 0.01).to(torch.bfloat16).float()
    d[::7] = -0.0
    d[3::7] = 0.0
    order = sorted(range(n), key=lambda i: (-abs(float(d[i])), i)) if not large else None
    for k in [1, n // 3, int(0.9 * n), n - 1]:
        (kth,) = kth_largest_many([d], [k], absolute=True)
        got = keep_top_magnitude_(d.clone(), k, kth)
        if order is not None:
            mask = torch.zeros(n)
            mask[order[:k]] = 1
        else:
            mag = d.abs()
            thr = float(torch.sort(mag, descending=True).values[k - 1])
            mask = (mag > thr).float()
            ties = (mag == thr).nonzero().squeeze(1)
            mask[ties[: k - int(mask.sum())]] = 1
        assert kth[:2] == kth_largest(d.abs(), k, nonneg=True), k
        assert torch.equal(got.view(torch.int32), (d * mask).view(torch.int32)), k


def test_exclusions_are_never_kept_by_a_cut():
    """nonneg scores: negative entries (-0.0 among them) are exclusions, below every selectable one, in the cut
    applied to another tensor too (their bit patterns are the largest unsigned keys)."""
    from obim.merging.selection import _CHUNK, keep_top_

    g = torch.Generator().manual_seed(9)
    n = _CHUNK + 77
    score = torch.rand(n, generator=g)
    score[::2] = -1e30
    score[1::10] = -0.0
    k = int((score > 0).sum()) - 5
    kth = kth_largest_many([score], [k], nonneg=True)[0]
    d = torch.randn(n, generator=g)
    got = keep_top_(d.clone(), k, kth, score)
    assert torch.equal(got, d * topk_mask(score, k, torch.float32))
    assert int((got != 0).sum()) == k and not got[::2].any()


def test_disjoint_mean_kernel_matches_the_torch_ops_bit_for_bit():
    """The fused TIES combination against combiners.DisjointMean's torch code, on deltas full of exact
    cancellations, -0.0 and 0.0: every output bit, signed zeros included."""
    import numpy as np

    from obim.merging import kernels
    from obim.merging.combiners import DisjointMean, disjoint_mean_torch
    from obim.merging.context import Sparse

    g = torch.Generator().manual_seed(10)
    for m in (2, 3, 5):
        n = 100_003
        ds = []
        for _ in range(m):
            x = torch.randint(-3, 4, (n,), generator=g).float() * 0.5
            x[torch.rand(n, generator=g) < 0.3] = -0.0
            x[torch.rand(n, generator=g) < 0.1] = 0.0
            ds.append(x + (torch.rand(n, generator=g) < 0.2) * torch.randn(n, generator=g) * 1e-3)
        want = disjoint_mean_torch([d.clone() for d in ds])
        out = np.empty(n, np.float32)
        kernels.disjoint_mean(tuple(d.numpy() for d in ds), out)
        assert np.array_equal(out.view(np.int32), want.numpy().view(np.int32)), m
        got = DisjointMean()([Sparse(d.clone()) for d in ds], None)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), m


def test_iterative_merging_fused_step_matches_the_torch_ops_bit_for_bit():
    """IM's step through the radix select's cut (one kernel: out += δ·m, penalty += m·-1e30) against its torch
    ops with the mask from topk_mask; tensors of several chunks, bf16-tied scores (ties at the cut), -0.0 deltas,
    a model with nothing to take."""
    from obim.merging.combiners import IterativeMerging
    from obim.merging.context import Sparse
    from obim.merging.selection import _CHUNK

    g = torch.Generator().manual_seed(11)
    n = 2 * _CHUNK + 4321
    deltas = [torch.randn(n, generator=g) for _ in range(3)]
    for d in deltas:
        d[::9] = -0.0
    scores = [(torch.rand(n, generator=g) * 0.01).to(torch.bfloat16).float() for _ in range(3)]
    retention = [0.3, 0.0, 0.45]

    ctx = SimpleNamespace(order=[2, 0, 1], params=[{"retention": r} for r in retention], device=torch.device("cpu"))
    got = IterativeMerging()([Sparse(d.clone(), s.clone()) for d, s in zip(deltas, scores, strict=True)], ctx)
    penalty, want = torch.zeros(n), torch.zeros(n)
    for step, i in enumerate(ctx.order):
        k = int(retention[i] * n)
        if k == 0:
            continue
        score = scores[i].clone()
        if step:
            score.add_(penalty)
        mask = topk_mask(score, k, torch.float32, kth_largest(score, k, nonneg=True))  # ties by a scan
        want.addcmul_(deltas[i], mask)
        penalty.add_(mask, alpha=-1e30)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    assert int((got != 0).sum()) <= int(0.75 * n)


def test_consensus_kernel_matches_the_torch_ops_bit_for_bit():
    """TALL-Mask's fused combination against combiners.Consensus's torch code: exact cancellations, ±0, votes at
    the λ boundary, per-model λ (0.4 is not a float32: both round it so), k of 1..3."""
    import numpy as np

    from obim.merging import kernels
    from obim.merging.combiners import consensus_torch

    g = torch.Generator().manual_seed(12)
    n = 100_003
    ds = []
    for _ in range(3):
        x = torch.randint(-4, 5, (n,), generator=g).float() * 0.25
        x[torch.rand(n, generator=g) < 0.2] = -0.0
        ds.append(x + (torch.rand(n, generator=g) < 0.3) * torch.randn(n, generator=g) * 1e-2)
    lams = [0.4, 0.5, 1.0 / 3]
    for k in (1, 2, 3):
        want = consensus_torch([d.clone() for d in ds], lams, k)
        out = np.empty(n, np.float32)
        kernels.consensus(tuple(d.numpy() for d in ds), np.array(lams, np.float32), float(k), out)
        assert np.array_equal(out.view(np.int32), want.numpy().view(np.int32)), k


@pytest.mark.parametrize("slab", [1, 2])
def test_high_histogram_slabs_of_chunks_count_every_entry(slab, monkeypatch):
    """The high histogram runs over slabs of chunks (the last one partial): every split gives a sort's answer."""
    from obim.merging import selection

    monkeypatch.setattr(selection, "_SLAB", slab)
    g = torch.Generator().manual_seed(13)
    n = 3 * selection._CHUNK + 5
    x = (torch.randn(n, generator=g) * 0.01).to(torch.bfloat16).float()
    s = torch.sort(x, descending=True).values
    for k in (1, n // 2, n - 1):
        thr = float(s[k - 1])
        assert kth_largest(x, k) == (thr, int((x > thr).sum())), k


def test_nan_scores_are_a_one_line_error_before_any_selection():
    """A NaN score (a saliency δ²·h where |δ|² overflows and h is 0) has no place in an order: TopK by a score
    and IM name the tensor and the model instead of keeping or dropping it by its bit pattern."""
    from obim.merging.combiners import IterativeMerging
    from obim.merging.context import Sparse
    from obim.merging.errors import ObimError
    from obim.merging.sparsifiers import TopK

    n = 1 << 17
    scores = [torch.rand(n), torch.rand(n)]
    scores[1][n - 3] = float("nan")
    ctx = SimpleNamespace(
        name="w", models=["a", "b"], order=[0, 1], params=[{"retention": 0.3, "density": 0.3}] * 2, device="cpu"
    )
    with pytest.raises(ObimError, match=r"^tensor w: the scores of model 'b' have NaN entries$"):
        IterativeMerging()([Sparse(torch.randn(n), s.clone()) for s in scores], ctx)
    with pytest.raises(ObimError, match=r"^tensor w: the scores of model 'b' have NaN entries$"):
        TopK(lambda d, i, c: scores[i].clone(), 0.3)([torch.randn(n), torch.randn(n)], ctx)


def test_a_cut_applied_to_a_float64_tensor_is_its_mask_product():
    """keep_top_ with a tensor the fused pass cannot take (float64) falls back to d·mask, not to a byte view."""
    from obim.merging.selection import _CHUNK, keep_top_

    g = torch.Generator().manual_seed(14)
    n = 2 * _CHUNK
    score = torch.rand(n, generator=g)
    d = torch.randn(n, generator=g, dtype=torch.float64)
    k = n // 2
    got = keep_top_(d.clone(), k, kth_largest_many([score], [k], nonneg=True)[0], score)
    assert torch.equal(got, d * topk_mask(score, k, torch.float64))


def test_kernels_compile_uncached_where_numba_can_cache_nowhere(monkeypatch):
    """numba refuses cache=True where no cache directory is writable (a read-only install and HOME): the kernels
    then compile in each process instead of failing to import."""
    import numba

    from obim.merging import kernels

    real = numba.njit

    def no_cache(*args, **kw):
        if kw.get("cache"):
            raise RuntimeError("cannot cache function 'f': no locator available for file 'kernels.py'")
        return real(*args, **kw)

    monkeypatch.setattr(kernels.nb, "njit", no_cache)

    def add_one(x):
        x += 1

    f = kernels._jit(add_one)
    a = torch.zeros(4, dtype=torch.int64).numpy()
    f(a)
    from numba.core.caching import NullCache

    assert a.tolist() == [1, 1, 1, 1] and isinstance(f._cache, NullCache)  # an uncached dispatcher, which runs
