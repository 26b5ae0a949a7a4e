"""Triton segmented reduction for group advantages: one program per group, three passes over its segment.

Pass 1: count, sum, min, max and per-mode count/sum of the finite rewards; pass 2: sum of squared deviations
from the group mean (two-pass variance, no cancellation at 1e6 + noise); pass 3: write the advantages.
Ragged groups arrive as a stable permutation sorted by group plus segment offsets; fixed groups as
``group_size`` with no permutation. No atomics, so the result is deterministic.
"""

from __future__ import annotations

import triton
import triton.language as tl

NUM_MODES = 3  # r4b_fast.modes.NUM_MODES; the kernel unrolls over the modes
STATS = 4 + 2 * NUM_MODES


@triton.jit
def _group_advantages_kernel(
    rewards_ptr, modes_ptr, perm_ptr, offsets_ptr, batch_std_ptr, adv_ptr, stats_ptr,
    group_size, eps,
    RAGGED: tl.constexpr, HAS_MODES: tl.constexpr, RLOO: tl.constexpr, SCALE: tl.constexpr,
    UNBIASED: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    g = tl.program_id(0).to(tl.int64)
    if RAGGED:
        start = tl.load(offsets_ptr + g)
        end = tl.load(offsets_ptr + g + 1)
    else:
        start = g * group_size
        end = start + group_size
    lanes = tl.arange(0, BLOCK)
    zero = tl.zeros([BLOCK], dtype=rewards_ptr.dtype.element_ty)  # accumulate in the compute dtype
    acc_n = zero
    acc_s = zero
    acc_max = zero - float("inf")
    acc_min = zero + float("inf")
    n0 = zero
    n1 = zero
    n2 = zero
    s0 = zero
    s1 = zero
    s2 = zero
    for off in range(start, end, BLOCK):
        pos = off + lanes
        inside = pos < end
        src = tl.load(perm_ptr + pos, mask=inside, other=0) if RAGGED else pos
        r = tl.load(rewards_ptr + src, mask=inside, other=0.0)
        valid = inside & (r - r == 0)  # finite: inf - inf and NaN - NaN are NaN
        rv = tl.where(valid, r, 0.0)
        w = tl.where(valid, 1.0, 0.0)
        acc_n += w
        acc_s += rv
        acc_max = tl.maximum(acc_max, tl.where(valid, r, -float("inf")))
        acc_min = tl.minimum(acc_min, tl.where(valid, r, float("inf")))
        if HAS_MODES:
            m = tl.load(modes_ptr + src, mask=inside, other=-1)
            n0 += tl.where(m == 0, w, 0.0)
            n1 += tl.where(m == 1, w, 0.0)
            n2 += tl.where(m == 2, w, 0.0)
            s0 += tl.where(m == 0, rv, 0.0)
            s1 += tl.where(m == 1, rv, 0.0)
            s2 += tl.where(m == 2, rv, 0.0)
    n = tl.sum(acc_n, axis=0)
    mean = tl.sum(acc_s, axis=0) / tl.maximum(n, 1.0)
    signal = (n >= 2) & (tl.max(acc_max, axis=0) > tl.min(acc_min, axis=0))

    acc_m2 = zero
    for off in range(start, end, BLOCK):
        pos = off + lanes
        inside = pos < end
        src = tl.load(perm_ptr + pos, mask=inside, other=0) if RAGGED else pos
        r = tl.load(rewards_ptr + src, mask=inside, other=0.0)
        valid = inside & (r - r == 0)
        d = tl.where(valid, r - mean, 0.0)
        acc_m2 += d * d
    m2 = tl.sum(acc_m2, axis=0)
    if UNBIASED:
        var = m2 / tl.maximum(n - 1, 1.0)
    else:
        var = m2 / tl.maximum(n, 1.0)
    std = tl.where(n > 1, tl.sqrt(var), 0.0)

    factor = std * 0 + 1.0
    if RLOO:
        factor = n / tl.maximum(n - 1, 1.0)
    if SCALE == 0:  # group
        denom = std + eps
    elif SCALE == 1:  # batch
        denom = tl.load(batch_std_ptr) + eps
    else:
        denom = std * 0 + 1.0
    for off in range(start, end, BLOCK):
        pos = off + lanes
        inside = pos < end
        src = tl.load(perm_ptr + pos, mask=inside, other=0) if RAGGED else pos
        r = tl.load(rewards_ptr + src, mask=inside, other=0.0)
        valid = inside & (r - r == 0)
        a = tl.where(valid, (r - mean) * factor / denom, 0.0)
        a = tl.where(signal, a, 0.0)  # select, not * 0: denom may be 0 for a zero-signal group
        tl.store(adv_ptr + src, a, mask=inside)

    row = stats_ptr + g * STATS
    tl.store(row + 0, n)
    tl.store(row + 1, mean)
    tl.store(row + 2, std)
    tl.store(row + 3, tl.where(signal, 0.0, 1.0))
    if HAS_MODES:
        tl.store(row + 4, tl.sum(n0, axis=0))
        tl.store(row + 5, tl.sum(n1, axis=0))
        tl.store(row + 6, tl.sum(n2, axis=0))
        tl.store(row + 7, tl.sum(s0, axis=0))
        tl.store(row + 8, tl.sum(s1, axis=0))
        tl.store(row + 9, tl.sum(s2, axis=0))


def launch_group_advantages(r, modes, layout, num_groups, rloo, scale_code, unbiased, eps, bstd, adv, stats):
    """Launch one program per group. ``r`` is contiguous float32/float64; ``modes`` int32 or None; ``layout`` has
    ``perm``/``offsets`` (ragged) or None (fixed ``max_group_len``-sized groups); ``bstd`` a 1-element tensor for
    ``scale_code == 1`` (batch). Writes ``adv [N]`` and ``stats [G, 10]``."""
    block = triton.next_power_of_2(max(2, min(int(layout.max_group_len), 1024)))
    dummy = r  # never read: the constexpr flags switch the loads off
    ragged = layout.perm is not None
    _group_advantages_kernel[(num_groups,)](
        r, modes if modes is not None else dummy, layout.perm if ragged else dummy,
        layout.offsets if ragged else dummy, bstd if bstd is not None else dummy, adv, stats,
        0 if ragged else int(layout.max_group_len), float(eps),
        RAGGED=ragged, HAS_MODES=modes is not None, RLOO=bool(rloo), SCALE=int(scale_code),
        UNBIASED=bool(unbiased), BLOCK=block, num_warps=1 if block <= 256 else 4,
    )  # fmt: skip
    return adv, stats

