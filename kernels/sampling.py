"""Triton sampling kernel (temperature / top-k / top-p / min-p) without sorting: one program per row.

Passes over the row, in blocks of ``BLOCK`` tokens, all in fp32 on ``e = exp(x - max x)`` (``x = logits / T``):
1-2. the row max and ``Z = sum e`` (online, one pass), 3. top-k: the largest threshold ``t`` with
``count(e >= t) >= k``,
4. top-p: the largest ``t`` with ``sum(e >= t, e >= t_k) >= top_p * mass_k``; both by a 16-pivot search on the
float32 bit pattern of ``t`` (8 passes narrow [0, 1] to one float: exact, no sort; flashinfer's dual-pivot idea with
more pivots per pass), skipped when the filter is off, 5. an inverse-CDF scan in vocabulary order with the row's
uniform. Same contract as ``r4b_fast.ops.sampling._sample_torch``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_ONE_BITS = tl.constexpr(0x3F800000)  # bits of 1.0f
NPIV = 16  # pivots per pass of the threshold search
STEPS = 8  # ceil(30 / log2(NPIV)): probability bit patterns in [0, 1] span < 2^30


@triton.jit
def _row_e(base, idx, V, inv, m):
    """``e = exp(x - m)`` of one block of the row (0 outside the row)."""
    x = tl.load(base + idx, mask=idx < V, other=-float("inf")).to(tl.float32) * inv
    return tl.where(idx < V, tl.exp(x - m), 0.0)


@triton.jit
def _threshold_search(base, V, inv, m, t_floor, need, MASS: tl.constexpr, BLOCK: tl.constexpr,
                      NPIV: tl.constexpr, STEPS: tl.constexpr):  # fmt: skip
    """Largest float32 ``t`` in [0, 1] with ``count(e >= t) >= need`` (MASS=False) or ``sum(e; e >= t, e >= t_floor)
    >= need`` (MASS=True). Multi-pivot bisection on the bit pattern: each pass over the row tests NPIV - 1 pivots
    at once and narrows the bracket NPIV-fold, so STEPS = ceil(30 / log2(NPIV)) passes are exact."""
    lanes = tl.arange(0, BLOCK)
    j = tl.arange(0, NPIV).to(tl.int64)
    lo = tl.zeros([], tl.int64)
    hi = tl.zeros([], tl.int64) + (_ONE_BITS + 1)
    for _ in range(STEPS):
        piv = lo + ((hi - lo) * j) // NPIV  # piv[0] = lo, known to satisfy the predicate
        tpiv = piv.to(tl.int32).to(tl.float32, bitcast=True)
        acc = tl.zeros([NPIV], tl.float32)
        for off in range(0, V, BLOCK):
            e = _row_e(base, off + lanes, V, inv, m)
            hit = (e[:, None] >= tpiv[None, :]) & (e[:, None] > 0)
            if MASS:
                acc += tl.sum(tl.where(hit & (e[:, None] >= t_floor), e[:, None], 0.0), axis=0)
            else:
                acc += tl.sum(tl.where(hit, 1.0, 0.0), axis=0)
        ok = (acc >= need) | (j == 0)
        lo = tl.max(tl.where(ok, piv, lo), axis=0)
        hi = tl.min(tl.where(ok, hi, piv), axis=0)
    return lo.to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _sample_kernel(
    logits_ptr, temp_ptr, topk_ptr, topp_ptr, minp_ptr, u_ptr, tok_ptr, lp_ptr, lse_ptr,
    V, stride, BLOCK: tl.constexpr, NPIV: tl.constexpr, STEPS: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    T = tl.load(temp_ptr + row)
    greedy = T == 0
    inv = 1.0 / tl.where(greedy, 1.0, T)
    k = tl.load(topk_ptr + row)
    P = tl.load(topp_ptr + row)
    mp = tl.load(minp_ptr + row)
    u = tl.load(u_ptr + row)
    lanes = tl.arange(0, BLOCK)

    # pass 1: online max and sum of exp, per lane, then combined
    mvec = tl.full([BLOCK], -float("inf"), tl.float32)
    svec = tl.zeros([BLOCK], tl.float32)
    for off in range(0, V, BLOCK):
        idx = off + lanes
        x = tl.load(base + idx, mask=idx < V, other=-float("inf")).to(tl.float32) * inv
        m_new = tl.maximum(mvec, x)
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)  # no -inf - -inf: exp(-inf - 0) = 0 instead
        svec = svec * tl.exp(mvec - m_safe) + tl.exp(x - m_safe)
        mvec = m_new
    m = tl.max(mvec, axis=0)
    Z = tl.sum(svec * tl.exp(mvec - m), axis=0)
    lse = m + tl.log(Z)

    t_k = tl.zeros([], tl.float32)
    if (k > 0) & (k < V):
        t_k = _threshold_search(base, V, inv, m, 0.0, k.to(tl.float32), False, BLOCK, NPIV, STEPS)
    t_p = tl.zeros([], tl.float32)
    if P < 1.0:
        kvec = tl.zeros([BLOCK], tl.float32)
        for off in range(0, V, BLOCK):
            e = _row_e(base, off + lanes, V, inv, m)
            kvec += tl.where(e >= t_k, e, 0.0)
        t_p = _threshold_search(base, V, inv, m, t_k, P * tl.sum(kvec, axis=0), True, BLOCK, NPIV, STEPS)
    thr = tl.maximum(tl.maximum(t_k, t_p), mp)
    thr = tl.where(greedy, 1.0, thr)  # e == 1 exactly at the max: greedy takes the first maximum

    wvec = tl.zeros([BLOCK], tl.float32)
    for off in range(0, V, BLOCK):
        e = _row_e(base, off + lanes, V, inv, m)
        wvec += tl.where(e >= thr, e, 0.0)
    target = tl.where(greedy, 0.0, u * tl.sum(wvec, axis=0))
    running = tl.zeros([], tl.float32)
    found = tl.zeros([], tl.int64) + V  # V: not found yet
    last = tl.zeros([], tl.int64) - 1
    for off in range(0, V, BLOCK):
        idx = off + lanes
        e = _row_e(base, idx, V, inv, m)
        w = tl.where(e >= thr, e, 0.0)
        c = tl.cumsum(w, axis=0) + running
        hit = (c > target) & (w > 0)
        found = tl.minimum(found, tl.min(tl.where(hit, idx.to(tl.int64), V), axis=0))
        last = tl.maximum(last, tl.max(tl.where(w > 0, idx.to(tl.int64), -1), axis=0))
        running += tl.sum(w, axis=0)
    tok = tl.where(found < V, found, last)  # rounding: the target may exceed the last partial sum
    x_tok = tl.load(base + tok).to(tl.float32) * inv
    tl.store(tok_ptr + row, tok)
    tl.store(lp_ptr + row, x_tok - lse)
    tl.store(lse_ptr + row, lse)


def launch_sample(logits, temperature, top_k, top_p, min_p, uniforms):
    """One program per row. ``logits`` [B, V] contiguous; per-row parameters [B] (float32 / int64); returns
    ``(tokens [B] int64, logprobs [B] float32, lse [B] float32)``."""
    B, V = logits.shape
    tokens = torch.empty(B, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(B, dtype=torch.float32, device=logits.device)
    lse = torch.empty(B, dtype=torch.float32, device=logits.device)
    block = triton.next_power_of_2(min(max(V, 16), 1024))
    _sample_kernel[(B,)](
        logits, temperature.float().contiguous(), top_k.contiguous(), top_p.float().contiguous(),
        min_p.float().contiguous(), uniforms.float().contiguous(), tokens, logprobs, lse, V, logits.stride(0),
        BLOCK=block, NPIV=NPIV, STEPS=STEPS, num_warps=4 if block <= 512 else 8,
    )  # fmt: skip
    return tokens, logprobs, lse
