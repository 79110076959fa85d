"""Fused CPU kernels (numba) for the passes that dominate a merge: the radix select's histograms and the trims.

Each torch or numpy op reads and writes whole tensors (~0.2-0.4 ns per entry each, memory-bound), and numpy's
bincount holds the GIL and casts to int64 first (~1.5-2.9 ns/entry). A kernel here does one pass per chunk,
releases the GIL (the pool's workers run chunks side by side) and computes exactly what the ops it replaces did:
integer keys and IEEE float32 arithmetic, no fast-math, so the bytes do not depend on the machine.

Keys are the 32-bit order keys of `selection`: `NONNEG` a float32's raw bits (>= 0 entries; a negative one, key
0x80000000 or more, is an exclusion), `SIGNED` an order-preserving transform (-0.0 as 0.0), `ABS` the bits of |x|.
Compiled on first use and cached beside this file (or numba's user cache); importing numba costs ~0.4 s, so
`selection` imports this module only for a tensor large enough to gain.
"""

from __future__ import annotations

import numba as nb
import numpy as np

NONNEG, SIGNED, ABS = 0, 1, 2


def _jit(fn):
    """nopython, GIL released, cached on disk where numba finds a writable place (beside this file, else its user
    cache); where it finds none (a read-only install and HOME) numba refuses to cache, so compile in each process."""
    try:
        return nb.njit(nogil=True, cache=True, boundscheck=False)(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return nb.njit(nogil=True, boundscheck=False)(fn)


@nb.njit(inline="always")
def _key(bits, mode):
    """The unsigned 32-bit order key (as an int64) of a float32's int32 bits; branch-free, so that random signs
    cost no mispredictions. NONNEG: the raw bits (a negative float's key is 0x80000000 or more: every caller treats
    those as exclusions); ABS: |x|'s bits; SIGNED: negative floats' bits flipped, others' sign bit set."""
    u = np.int64(bits) & 0xFFFFFFFF
    if mode == NONNEG:
        return u
    if mode == ABS:
        return u & 0x7FFFFFFF
    u = u * (u != 0x80000000)  # -0.0 orders as 0.0
    neg = u >> 31
    return u ^ (((-neg) & 0x7FFFFFFF) | 0x80000000)


@_jit
def high_histogram(bits, mode, out):
    """out[key >> 16] += 1 for every entry (bits: a float32 chunk's int32 view; out: int64[65536])."""
    if mode == NONNEG:
        for i in range(bits.size):
            out[np.uint64(_key(bits[i], NONNEG) >> 16)] += 1
    elif mode == ABS:
        for i in range(bits.size):
            out[np.uint64(_key(bits[i], ABS) >> 16)] += 1
    else:
        for i in range(bits.size):
            out[np.uint64(_key(bits[i], SIGNED) >> 16)] += 1


@nb.njit(inline="always")
def _low(bits, mode, top, dense, out):
    if dense:  # branch-free: a bin holding many of the entries (the zeros') would mispredict often
        for i in range(bits.size):
            key = _key(bits[i], mode)
            out[np.uint64(key & 0xFFFF)] += key >> 16 == top
    else:
        for i in range(bits.size):
            key = _key(bits[i], mode)
            if key >> 16 == top:
                out[np.uint64(key & 0xFFFF)] += 1


@_jit
def low_histogram(bits, mode, top, dense, out):
    """out[key & 0xFFFF] += 1 for every entry whose key >> 16 is top (out: int32[65536], a chunk's); dense: that
    bin holds a large share of the entries."""
    if mode == NONNEG:
        _low(bits, NONNEG, top, dense, out)
    elif mode == ABS:
        _low(bits, ABS, top, dense, out)
    else:
        _low(bits, SIGNED, top, dense, out)


@_jit
def first_with_key(bits, mode, key, count, out):
    """Indices (in this chunk) of its first `count` entries with this key, into out; how many were found."""
    n = 0
    for i in range(bits.size):
        if n == count:
            break
        if _key(bits[i], mode) == key:
            out[n] = i
            n += 1
    return n


@nb.njit(inline="always")
def _skey(bits, mode):
    """A signed int32 key ordered like `_key` (its top bit flipped): plain int32 compares vectorise. NONNEG: the
    raw bits, so a negative float (an exclusion) is below every selectable key."""
    if mode == NONNEG:
        return bits
    if mode == ABS:
        return bits & np.int32(0x7FFFFFFF)
    b = bits * np.int32(bits != np.int32(-0x80000000))  # -0.0 orders as 0.0
    return b ^ ((b >> np.int32(31)) & np.int32(0x7FFFFFFF))


@nb.njit(inline="always")
def _keep(src, mode, key, ge_until, dst):
    sign = np.int32(-0x80000000)
    k = np.int32(key ^ 0x80000000) if mode == SIGNED else np.int32(key)
    # two loops over views, each from 0 (a loop from a run-time start index does not vectorise: numba cannot
    # prove it non-negative and wraps every index)
    a, b = src[:ge_until], dst[:ge_until]
    for i in range(a.size):
        b[i] &= np.int32(-1) if _skey(a[i], mode) >= k else sign
    a, b = src[ge_until:], dst[ge_until:]
    for i in range(a.size):
        b[i] &= np.int32(-1) if _skey(a[i], mode) > k else sign


@_jit
def keep_above(src, mode, key, ge_until, dst):
    """dst[i] (float32 bits) kept where src's key is above `key`, or equal to it before index ge_until (where the
    chunk's quota of ties ends); elsewhere dst[i] becomes a zero of its own sign (as dst·0 and copysign(0, dst)
    give). src may be dst. Branch-free, vectorised: kept entries are scattered."""
    if mode == NONNEG:
        _keep(src, NONNEG, key, ge_until, dst)
    elif mode == ABS:
        _keep(src, ABS, key, ge_until, dst)
    else:
        _keep(src, SIGNED, key, ge_until, dst)


@_jit
def take(score, key, ge_until, delta, out, penalty):
    """IM's step for one model, in exactly the float32 operations of its torch code: m = 1.0 where the NONNEG
    score (int32 bits) is above `key`, or equal to it before ge_until, else 0.0; out += δ·m; penalty += m·-1e30."""
    one, zero, neg = np.float32(1.0), np.float32(0.0), np.float32(-1e30)
    k = np.int32(key)
    s, d, o, p = score[:ge_until], delta[:ge_until], out[:ge_until], penalty[:ge_until]
    for i in range(s.size):  # (two loops over views from 0, as in _keep)
        m = one if s[i] >= k else zero
        o[i] = o[i] + d[i] * m
        p[i] = p[i] + m * neg
    s, d, o, p = score[ge_until:], delta[ge_until:], out[ge_until:], penalty[ge_until:]
    for i in range(s.size):
        m = one if s[i] > k else zero
        o[i] = o[i] + d[i] * m
        p[i] = p[i] + m * neg


@_jit
def disjoint_mean(deltas, out):
    """TIES's elect-and-average, in exactly the float32 operations of combiners.DisjointMean's torch code (a tuple
    of equal-size float32 arrays in, out written): s = Σ δ in model order; γ = sign(sign(s) + 0.5), so -1 where
    s < 0, else +1; a = clamp(δ·γ, min=0) per model (torch keeps -0.0 there); the mean (Σ a)·γ / clamp(Σ sign(a),
    min=1). Sums start from -0.0, the identity of IEEE addition (signed zeros come out as torch's). Blocks of
    entries, model by model inside each: every inner loop vectorises."""
    block = 1024
    zero, one = np.float32(0.0), np.float32(1.0)
    s = np.empty(block, np.float32)
    g = np.empty(block, np.float32)
    num = np.empty(block, np.float32)
    cnt = np.empty(block, np.float32)
    for start in range(0, out.size, block):
        n = min(block, out.size - start)
        s[:n] = np.float32(-0.0)
        for d in deltas:
            x = d[start : start + n]
            for i in range(n):
                s[i] += x[i]
        for i in range(n):
            g[i] = -one if s[i] < zero else one
        num[:n] = np.float32(-0.0)
        cnt[:n] = zero
        for d in deltas:
            x = d[start : start + n]
            for i in range(n):
                a = x[i] * g[i]
                a = zero if a < zero else a
                num[i] += a
                cnt[i] += one if a > zero else zero
        o = out[start : start + n]
        for i in range(n):
            o[i] = (num[i] * g[i]) / (cnt[i] if cnt[i] > one else one)


@nb.njit(inline="always")
def _minus_checked(o, ob, base, start, n):
    if base.size:
        b = base[start : start + n]
        for i in range(n):
            o[i] = o[i] - b[i]
    nonfinite = np.int32(0)
    for i in range(n):
        nonfinite |= np.int32((ob[i] & np.int32(0x7F800000)) == np.int32(0x7F800000))
    return nonfinite != 0


@_jit
def consensus(deltas, lams, k, out):
    """TALL-Mask's combination, in exactly the float32 operations of combiners.Consensus's torch code: t = Σ δ in
    model order; a vote from each model where |δ| > λ·|t - δ| (λ as float32); t where the votes reach k, else
    0.0. Blocks of entries, model by model inside each (every inner loop vectorises)."""
    block = 1024
    s = np.empty(block, np.float32)
    votes = np.empty(block, np.float32)
    for start in range(0, out.size, block):
        n = min(block, out.size - start)
        s[:n] = np.float32(-0.0)  # the identity of IEEE addition: Σ's signed zeros come out as torch's
        for d in deltas:
            x = d[start : start + n]
            for i in range(n):
                s[i] += x[i]
        votes[:n] = np.float32(0.0)
        for m in range(len(deltas)):
            x = deltas[m][start : start + n]
            lam = lams[m]
            for i in range(n):
                votes[i] += np.float32(1.0) if abs(x[i]) > lam * abs(s[i] - x[i]) else np.float32(0.0)
        o = out[start : start + n]
        for i in range(n):
            o[i] = s[i] if votes[i] >= k else np.float32(0.0)


@_jit
def widen_minus(src, base, out):
    """out = float32(src) - base (base of size 0: no subtraction), src bf16 as its uint16 bits; whether every
    entry of out is finite. Exactly torch's `src.float() - base` (bf16 widens by a shift), in one pass."""
    block = 4096
    bits = out.view(np.int32)
    bad = False
    for start in range(0, out.size, block):
        n = min(block, out.size - start)
        o, ob, x = out[start : start + n], bits[start : start + n], src[start : start + n]
        for i in range(n):
            ob[i] = np.int32(np.uint32(x[i]) << np.uint32(16))
        bad |= _minus_checked(o, ob, base, start, n)
    return not bad


@_jit
def copy_minus(src, base, out):
    """widen_minus for a float32 src."""
    block = 4096
    bits = out.view(np.int32)
    bad = False
    for start in range(0, out.size, block):
        n = min(block, out.size - start)
        o, ob, x = out[start : start + n], bits[start : start + n], src[start : start + n]
        for i in range(n):
            o[i] = x[i]
        bad |= _minus_checked(o, ob, base, start, n)
    return not bad


def warm(n_models: int) -> None:
    """Load (or compile) every kernel for the argument types the merge passes, so that a merge's first tensors
    do not wait for it: run on a thread of its own while the first tensors are read."""
    i32, f32 = np.zeros(8, np.int32), np.zeros(8, np.float32)
    for mode in (NONNEG, SIGNED, ABS):
        high_histogram(i32, mode, np.zeros(1 << 16, np.int64))
        for dense in (False, True):
            low_histogram(i32, mode, 0, dense, np.zeros(1 << 16, np.int32))
        first_with_key(i32, mode, 0, 0, np.zeros(1, np.int64))
        keep_above(i32, mode, 0, 0, i32.copy())
    take(i32, 0, 0, f32, f32.copy(), f32.copy())
    if n_models >= 1:
        disjoint_mean(tuple(f32 for _ in range(n_models)), f32.copy())
        consensus(tuple(f32 for _ in range(n_models)), f32, 1.0, f32.copy())
    for base in (f32, f32[:0]):
        widen_minus(np.zeros(8, np.uint16), base, f32.copy())
        copy_minus(f32, base, f32.copy())
