"""Exact top-k masks: the hot spot of every magnitude/saliency method.

A full sort or `torch.topk` costs O(n log n) per tensor; we find the k-th largest value by selection and compare:
on CPU a two-level radix select over 32-bit order keys (two histogram passes of obim.merging.kernels, ~0.3-1
ns/entry each on one thread, chunks split over the pool's threads; numpy's bincount took 1.5-2.9 ns/entry holding
the GIL, its introselect 5-8 ns/entry, torch.topk/kthvalue 25-30 ns), whose `Cut` then applies the exact-k mask in
one more pass. Ties at the threshold are broken by the lowest flat (or in-row) index, so masks are exact-k and
deterministic.
"""

from __future__ import annotations

import numpy as np
import torch

from .threads import parallel_map


def kth_largest(x: torch.Tensor, k: int, *, nonneg: bool = False) -> tuple[float, int]:
    """(the k-th largest entry of 1-D x, how many entries are strictly larger), 1 <= k <= n.

    nonneg: the k largest entries are known to be >= 0 (scores, magnitudes; negative entries, -0.0 among them, only
    mark exclusions), so their int32 bit patterns order like the floats and need no transform."""
    n = x.numel()
    if x.is_cuda:
        kth = torch.kthvalue(x, n - k + 1).values
        return float(kth), int(torch.count_nonzero(x > kth))
    if _radix(x):
        return _radix_select([x], [[k]], _NONNEG if nonneg else _SIGNED)[0][0]
    part = x.numpy().copy()
    if nonneg:  # the order keys of the radix select, so -0.0 is an exclusion here too
        part = part.view(np.int32)
    part.partition(n - k)
    thr = part[n - k]
    above = int(np.count_nonzero(part[n - k :] > thr))  # only the top k can exceed it
    return float(np.array(thr).view(np.float32)) if nonneg else float(thr), above


_RADIX_MIN = 1 << 16  # below this a partition's fixed costs are lower


def _radix(x: torch.Tensor) -> bool:
    """Whether x's selection takes the radix select (a CPU float32 tensor of _RADIX_MIN entries or more)."""
    return not x.is_cuda and x.numel() >= _RADIX_MIN and x.dtype == torch.float32


_CHUNK = 1 << 19  # entries per histogram task: chunks of all tensors share the pool evenly (a 1M-entry one too)
_SLAB = 8  # chunks per task of the high histogram (one histogram each)
_NONNEG, _SIGNED, _ABS = 0, 1, 2  # the key kinds of obim.merging.kernels (not imported here: numba loads on use)


def _key_value(key: int, mode: int) -> float:
    """The float32 value of a 32-bit order key (an inverse of kernels' keys)."""
    if mode != _SIGNED:
        return float(np.array(key, dtype=np.uint32).view(np.float32))
    bits = key ^ 0xFFFFFFFF if key < 0x80000000 else key & 0x7FFFFFFF
    return float(np.array(bits, dtype=np.uint32).view(np.float32))


class Cut:
    """Where a radix select's exact-k cut falls in one tensor: entries whose key is above `key`, and the first
    quotas[c] entries equal to it in each chunk c (so exactly k in all). `keep_into` applies the cut to a tensor
    (in place, on the pool), `indices` lists the tied entries kept."""

    def __init__(self, bits: np.ndarray, mode: int, key: int, quotas: list[int], ties_in: list[int]):
        self.bits, self.mode, self.key = bits, mode, key
        self.quotas, self.ties_in = quotas, ties_in  # per chunk: the ties kept, the ties it holds

    def indices(self) -> torch.Tensor:
        from . import kernels

        def work(c):
            s, q = c * _CHUNK, self.quotas[c]
            out = np.empty(q, np.int64)
            found = kernels.first_with_key(self.bits[s : s + _CHUNK], self.mode, self.key, q, out)
            assert found == q  # the chunk's low histogram counted them
            return out + s

        parts = parallel_map(work, [c for c, q in enumerate(self.quotas) if q])
        return torch.from_numpy(np.concatenate(parts) if parts else np.empty(0, np.int64))

    def keep_into(self, dst: torch.Tensor) -> torch.Tensor:
        """dst (float32, this tensor's size, contiguous) kept where the cut keeps, else a zero of its own sign
        (what dst·mask gives, and copysign(0, dst)); dst may be the tensor selected on."""
        from . import kernels

        out = dst.view(-1).numpy().view(np.int32)

        def work(c):
            s = c * _CHUNK
            kernels.keep_above(self.bits[s : s + _CHUNK], self.mode, self.key, self._ge_until(c), out[s : s + _CHUNK])

        parallel_map(work, range(len(self.quotas)))
        return dst

    def take_into(self, delta: torch.Tensor, out: torch.Tensor, penalty: torch.Tensor) -> None:
        """IM's step (a NONNEG cut of this model's scores): out += delta·m, penalty += m·-1e30, m the cut's 0/1
        mask; all float32, contiguous, this tensor's size. Exactly the torch ops' bytes, in one pass."""
        from . import kernels

        assert self.mode == _NONNEG
        d, o, p = (t.view(-1).numpy() for t in (delta, out, penalty))

        def work(c):
            s = c * _CHUNK
            e = s + _CHUNK
            kernels.take(self.bits[s:e], self.key, self._ge_until(c), d[s:e], o[s:e], p[s:e])

        parallel_map(work, range(len(self.quotas)))

    def _ge_until(self, c: int) -> int:
        """Where chunk c's ties stop being kept: the whole chunk where its quota holds them all, else just past
        the last one kept (one chunk per tensor at most: the quotas are taken in index order)."""
        from . import kernels

        s, q = c * _CHUNK, self.quotas[c]
        src = self.bits[s : s + _CHUNK]
        if q and q < self.ties_in[c]:
            at = np.empty(q, np.int64)
            kernels.first_with_key(src, self.mode, self.key, q, at)
            return int(at[-1]) + 1
        return src.size if q else 0


def _radix_select(xs: list[torch.Tensor], kss: list[list[int]], mode: int, cuts: bool = False) -> list[list[tuple]]:
    """For each 1-D CPU float32 tensor and each of its ks: (the k-th largest key's value, how many entries are
    strictly larger), with `cuts` also its `Cut`. A two-level radix select on 32-bit order keys (kernels' NONNEG,
    SIGNED or ABS: the magnitudes, never materialised): a histogram of every key's high 16 bits finds the bin
    holding each k-th largest, per-chunk histograms of that bin's low 16 bits find the key and how many of its
    ties each chunk holds. Exact, insensitive to duplicates (a partition degrades ~20x where most entries are
    equal, as in bf16 task vectors), and split into chunks that all of the pool's threads share (numba kernels,
    which release the GIL). Memory beyond the inputs: an int32 histogram per chunk and bin searched (256 KB per
    512K entries), an int64 one per slab of chunks."""
    from . import kernels

    bits = [x.contiguous().numpy().view(np.int32) for x in xs]
    tasks = [(i, s) for i, b in enumerate(bits) for s in range(0, b.size, _CHUNK)]
    # nonneg: keys at or above 0x80000000 are negative floats (-0.0 too), below every entry that can be selected
    bins = 1 << (15 if mode == _NONNEG else 16)

    # the high histogram in slabs of _SLAB chunks, each into one histogram: a histogram per chunk held ~1 GB at
    # once for three 13B embeddings (the low ones stay per chunk, int32: they give each chunk's ties)
    slabs = [(i, s) for i, b in enumerate(bits) for s in range(0, b.size, _CHUNK * _SLAB)]

    def histogram(task):
        i, s = task
        out = np.zeros(1 << 16, np.int64)
        for c in range(s, min(s + _CHUNK * _SLAB, bits[i].size), _CHUNK):
            kernels.high_histogram(bits[i][c : c + _CHUNK], mode, out)
        return i, out[:bins]

    hist = [np.zeros(bins, np.int64) for _ in bits]
    for i, h in parallel_map(histogram, slabs):
        hist[i] += h
    picked = [[_top_bin(h, k, 0) for k in ks] for h, ks in zip(hist, kss, strict=True)]
    tops = [np.array(sorted({top for top, _ in p}), np.int64) for p in picked]

    def band(task):  # per picked bin: its entries' low-half histogram, in this chunk
        i, s = task
        out = np.zeros((tops[i].size, 1 << 16), np.int32)  # (a chunk's counts fit)
        for j, top in enumerate(tops[i]):  # (one pass per bin: a loop over bins inside a pass cost 4-8 ns/entry)
            dense = hist[i][top] * 16 > bits[i].size
            kernels.low_histogram(bits[i][s : s + _CHUNK], mode, int(top), dense, out[j])
        return out

    per_chunk = parallel_map(band, tasks)  # in task order: tensor by tensor, chunk by chunk
    result, at = [], 0
    for i, ks in enumerate(kss):
        n_chunks = -(-bits[i].size // _CHUNK)
        chunks = per_chunk[at : at + n_chunks]
        at += n_chunks
        lows = chunks[0].astype(np.int64)
        for h in chunks[1:]:  # (np.sum of the list stacked a copy of every chunk's histograms first)
            lows += h
        res: list[tuple] = []
        for (top, above), k in zip(picked[i], ks, strict=True):
            j = int(np.searchsorted(tops[i], top))
            bottom, above = _top_bin(lows[j], k, above)
            key = (top << 16) | bottom
            found: tuple = (_key_value(key, mode), above)
            if cuts:
                quotas, need = [], k - above
                ties_in = [int(h[j, bottom]) for h in chunks]
                for t in ties_in:
                    quotas.append(min(t, need))
                    need -= quotas[-1]
                found += (Cut(bits[i], mode, key, quotas, ties_in),)
            res.append(found)
        result.append(res)
    return result


def _top_bin(hist: np.ndarray, k: int, above: int) -> tuple[int, int]:
    """The bin holding the k-th largest entry, counting down from the highest bin with `above` entries already
    above them all, and how many entries lie in higher bins (plus `above`)."""
    total = np.cumsum(hist[::-1]) + above
    j = int(np.searchsorted(total, k))  # the first bin, from the top, where the count reaches k
    if j >= hist.size:
        raise ValueError(f"k={k} is more than the {int(total[-1])} entries that can be selected")
    return hist.size - 1 - j, int(total[j - 1]) if j else above


def topk_mask(x: torch.Tensor, k: int, dtype: torch.dtype = torch.bool, kth: tuple | None = None) -> torch.Tensor:
    """Mask (x's shape; bool, or 1.0/0.0 floats) of the k largest entries of x over the whole tensor; ties at the
    threshold go to the lowest indices. `kth`, when known, is `kth_largest(x, k)` or kth_largest_many's entry."""
    flat = x.reshape(-1)
    n = flat.numel()
    k = max(0, min(int(k), n))
    if k == 0 or k == n:
        return (torch.zeros_like if k == 0 else torch.ones_like)(x, dtype=dtype)
    thr, above, *cut = kth if kth is not None else kth_largest(flat, k)
    mask = torch.empty(flat.shape, dtype=dtype, device=flat.device)
    torch.gt(flat, thr, out=mask)  # straight into the mask's dtype: one pass, where .to(dtype) took a second
    if k > above:
        mask[cut[0].indices() if cut else _first_equal(flat, thr, k - above)] = 1
    return mask.view(x.shape)


def kth_largest_many(
    xs: list[torch.Tensor], ks: list[int], *, nonneg: bool = False, absolute: bool = False
) -> list[tuple | None]:
    """kth_largest of several tensors (absolute: of their magnitudes |x|, which the radix select never
    materialises), each with its `Cut` where it came for free (the radix select's, on CPU: their selections share
    the pool's threads); None where k is 0 or n (no threshold needed)."""
    todo = [i for i, (x, k) in enumerate(zip(xs, ks, strict=True)) if 0 < k < x.numel()]
    big = [i for i in todo if _radix(xs[i])]
    out: list[tuple | None] = [None] * len(xs)
    mode = _ABS if absolute else _NONNEG if nonneg else _SIGNED
    found = _radix_select([xs[i].reshape(-1) for i in big], [[ks[i]] for i in big], mode, cuts=True)
    for i, f in zip(big, found, strict=True):
        out[i] = f[0]
    for i in todo:
        if out[i] is None:
            x = xs[i].reshape(-1)
            out[i] = kth_largest(x.abs() if absolute else x, ks[i], nonneg=nonneg or absolute)
    return out


def keep_top_magnitude_(d: torch.Tensor, k: int, kth: tuple | None) -> torch.Tensor:
    """In place: zero all but the k largest-magnitude entries of d (ties: lowest indices), each dropped entry a
    zero of its own sign (as d·0 gives); `kth` is kth_largest_many(..., absolute=True)'s entry for d (None when k
    is 0 or n)."""
    return keep_top_(d, k, kth, None)


def keep_top_(d: torch.Tensor, k: int, kth: tuple | None, score: torch.Tensor | None) -> torch.Tensor:
    """In place: d where its entry is among the k top of `score` (None: of |d|), else a zero of d's sign; exactly
    d·topk_mask(score, k) (ties: lowest indices). `kth`: kth_largest_many's entry for score (None when k is 0 or
    n). One fused pass on the pool where the radix select gave a `Cut`."""
    n = d.numel()
    if k >= n:
        return d
    if k <= 0:  # (as before: zeros for magnitude, a zero of each entry's sign for a score's mask product)
        return d.zero_() if score is None else d.mul_(0)
    assert kth is not None  # None only when k is 0 or n, returned above
    thr, above, *cut = kth
    if cut and d.is_contiguous() and d.dtype == torch.float32 and not d.is_cuda:
        return cut[0].keep_into(d)
    if score is not None:
        return d.mul_(topk_mask(score, k, d.dtype, kth))
    mag = d.abs()
    flat = d.view(-1)
    ties = _first_equal(mag.view(-1), thr, k - above) if k > above and thr > 0 else None  # (ties at 0 keep zeros)
    kept = flat[ties] if ties is not None else None
    # |d| where |d| > thr, else 0, given d's sign (a dropped negative entry is -0.0, as d·0 gives): 2 passes, where
    # multiplying by a 0/1 mask made from |d| took 4
    torch.copysign(torch.nn.functional.threshold(mag, thr, 0.0, inplace=True), d, out=d)
    if kept is not None:  # saved exactly when there are ties
        flat[ties] = kept
    return d


def _first_equal(flat: torch.Tensor, value: float, count: int, chunk: int = 1 << 18) -> torch.Tensor:
    """Indices of the first `count` entries equal to value, scanning in chunks: ties are frequent with quantised
    (bf16) deltas, and scanning only as far as needed halves the cost on average."""
    found = []
    for start in range(0, flat.numel(), chunk):
        part = flat[start : start + chunk]
        idx = (part == value).nonzero().squeeze(1)[:count] + start
        found.append(idx)
        count -= idx.numel()
        if count <= 0:
            break
    return torch.cat(found)


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """View a tensor as rows: 1-D is one row, N-D is [shape[0], rest]."""
    return x.reshape(1, -1) if x.dim() <= 1 else x.reshape(x.shape[0], -1)


def _row_keys(a: np.ndarray, nonneg: bool) -> np.ndarray:
    """int64 keys for float32 rows, unique within each row and ordered like (value, -column): the float's
    order-preserving int32 in the high half (its raw bits when all values are >= 0), m-1-column in the low half.
    Ties between equal values thus go to the lower column, and per-row selections need no tie pass."""
    bits = a.view(np.int32)
    key = (bits if nonneg else bits ^ ((bits >> 31) & np.int32(0x7FFFFFFF))).astype(np.int64)
    key <<= 32
    key |= np.arange(a.shape[1] - 1, -1, -1, dtype=np.int64)
    return key


def _row_blocks(rows: torch.Tensor, fn) -> None:
    """Call fn(slice) over row blocks of ~256K entries, on 2 threads: numpy's row sorts and selections are
    single-threaded, and per-block int64 keys stay in cache (1.7x faster than 1M-entry blocks here)."""
    n_rows, row_len = rows.shape
    step = max(1, (1 << 18) // max(1, row_len))
    parallel_map(fn, [slice(i, min(i + step, n_rows)) for i in range(0, n_rows, step)])


def row_band_mask(x: torch.Tensor, start: int, stop: int, *, nonneg: bool = False) -> torch.Tensor:
    """Boolean mask of the entries ranked start..stop-1 (0 = the largest) in each row (see `as_rows`); ties
    between equal values rank the lower column first. nonneg: x >= 0 (saves a pass)."""
    rows = as_rows(x)
    m = rows.shape[1]
    start, stop = max(0, min(start, m)), max(0, min(stop, m))
    if stop <= start:
        return torch.zeros_like(x, dtype=torch.bool)
    lo, hi = m - stop, m - start  # in ascending order the band is positions lo..hi-1
    cuts = [p for p, needed in ((lo, lo > 0), (hi, hi < m)) if needed]
    if not cuts:
        return torch.ones_like(x, dtype=torch.bool)
    if rows.is_cuda:
        return _row_band_mask_torch(rows, lo, hi).view(x.shape)
    a = rows.contiguous().numpy()
    out = np.empty(a.shape, dtype=bool)

    def work(sl):
        key = _row_keys(a[sl], nonneg)
        part = key.copy()
        kth, done = [], 0
        for c in cuts:  # successive single-kth partitions: numpy's multi-kth one was 5x slower
            rest = part[:, done:]
            rest.partition(c - done, axis=1)
            kth.append(rest[:, c - done : c - done + 1])
            done = c
        band = key >= kth[0] if lo > 0 else np.ones(key.shape, dtype=bool)
        if hi < m:
            band &= key < kth[-1]
        out[sl] = band

    _row_blocks(rows, work)
    return torch.from_numpy(out).view(x.shape)


def row_topk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest entries of each row (ties: the lower column)."""
    return row_band_mask(x, 0, k)


def by_row_rank(x: torch.Tensor, table: torch.Tensor, *, nonneg: bool = False) -> torch.Tensor:
    """For each entry of x's rows, table[r - 1] where r in 1..m is its ascending rank in its row (ties: the lower
    column ranks higher, as in every selection here). With table = 1..m this is the rank itself."""
    rows = as_rows(x)
    m = rows.shape[1]
    if rows.is_cuda:
        return _by_row_rank_torch(rows, table.to(rows.device))
    a = rows.contiguous().numpy()
    out = torch.empty(a.shape, dtype=torch.float32)
    src = table.float().cpu()[None, :]

    def work(sl):
        key = _row_keys(a[sl], nonneg)
        key.sort(axis=1)  # numpy's vectorised int64 sort: 2x its argsort
        key &= 0xFFFFFFFF
        np.subtract(m - 1, key, out=key)  # the columns, in ascending rank order
        out[sl].scatter_(1, torch.from_numpy(key), src.expand(key.shape[0], m))  # 15x numpy's put_along_axis

    _row_blocks(rows, work)
    return out


def row_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ascending ranks of each row's entries, float32 rows (see `by_row_rank`)."""
    m = as_rows(x).shape[1]
    return by_row_rank(x, torch.arange(1, m + 1, dtype=torch.float32))


def _torch_row_keys(rows: torch.Tensor) -> torch.Tensor:
    bits = rows.contiguous().view(torch.int32)
    key = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(torch.int64) * (1 << 32)
    return key + torch.arange(rows.shape[1] - 1, -1, -1, dtype=torch.int64, device=rows.device)


def _row_band_mask_torch(rows: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    key = _torch_row_keys(rows)
    m = rows.shape[1]
    mask = (
        key >= torch.kthvalue(key, lo + 1, dim=1, keepdim=True).values
        if lo > 0
        else torch.ones_like(key, dtype=torch.bool)
    )
    if hi < m:
        mask &= key < torch.kthvalue(key, hi + 1, dim=1, keepdim=True).values
    return mask


def _by_row_rank_torch(rows: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    m = rows.shape[1]
    order = torch.sort(_torch_row_keys(rows), dim=1).values
    out = torch.empty_like(rows, dtype=torch.float32)
    return out.scatter_(1, (m - 1) - (order & 0xFFFFFFFF), table.float().expand_as(rows).contiguous())


def sorted_at(x: torch.Tensor, positions: list[int], *, nonneg: bool = False) -> list[float]:
    """Values of sorted(x.flatten()) (ascending) at the given indices (Python semantics: -1 is the last): each the
    (n - p)-th largest, all from one radix select (whose cost does not grow where most entries share a value, as
    in bf16 task vectors, often 60% zeros). nonneg: x >= 0."""
    flat = x.reshape(-1)
    n = flat.numel()
    ks = [n - p % n for p in positions]
    if _radix(flat):  # one histogram for all positions
        return [found[0] for found in _radix_select([flat], [ks], _NONNEG if nonneg else _SIGNED)[0]]
    return [kth_largest(flat, k, nonneg=nonneg)[0] for k in ks]
