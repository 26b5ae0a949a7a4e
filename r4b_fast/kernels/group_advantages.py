"""Triton segmented reduction for group advantages: one program per group, three passes over its segment.

Pass 1: count, sum, min, max and per-mode count/sum of the finite rewards; pass 2: sum of squared deviations
from the group mean (two-pass variance, no cancellation at 1e6 + noise); pass 3: write the advantages.
Ragged groups arrive as a stable permutation sorted by group plus segment offsets; fixed groups as
``group_size`` with no permutation. No atomics, so the result is deterministic. All offsets are int64.

Only the flags that change the loop body are constexpr (ragged layout, modes, block size): the estimator
(RLOO factor), the scaling and Bessel's correction are per-group scalars, so the launcher produces 2 x 2 x 3
kernel variants, not hundreds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# constexpr globals: the compiler rejects plain Python globals inside @triton.jit code (the interpreter accepts
# them), and Triton 3.9 rejects the annotated form ``NAME: tl.constexpr = value`` too: instantiate tl.constexpr
NUM_MODES = tl.constexpr(3)  # r4b_fast.modes.NUM_MODES; the kernel unrolls over the modes
STATS = tl.constexpr(4 + 2 * 3)  # count, mean, std, zero_signal, count per mode, sum per mode

# (largest group length, BLOCK, num_warps): short groups take one warp, long ones a wider block (~4 fp64 per
# thread, so the ten pass-1 accumulators stay in registers)
BLOCK_CLASSES = ((32, 32, 1), (256, 256, 2), (None, 1024, 8))


@triton.jit
def _segment_bounds(g, offsets_ptr, group_size, RAGGED: tl.constexpr):
    """[start, end) of group ``g`` in int64: ``g * group_size`` exceeds 2^31 at N > 2^31 even when each factor
    fits in 32 bits."""
    g64 = g.to(tl.int64)
    if RAGGED:
        start = tl.load(offsets_ptr + g64).to(tl.int64)
        end = tl.load(offsets_ptr + g64 + 1).to(tl.int64)
    else:
        start = g64 * group_size
        end = start + group_size
    return start, end


@triton.jit
def _load_block(rewards_ptr, perm_ptr, pos, end, RAGGED: tl.constexpr):
    """One block of the segment: ``(src, inside, r, valid)``: rollout ids, in-segment lanes, rewards, finite ones."""
    inside = pos < end
    src = tl.load(perm_ptr + pos, mask=inside, other=0) if RAGGED else pos
    r = tl.load(rewards_ptr + src, mask=inside, other=0.0)
    valid = inside & (r - r == 0)  # finite: inf - inf and NaN - NaN are NaN
    return src, inside, r, valid


@triton.jit
def _first_pass(rewards_ptr, modes_ptr, perm_ptr, start, end, zero, RAGGED: tl.constexpr, HAS_MODES: tl.constexpr,
                BLOCK: tl.constexpr):  # fmt: skip
    """Pass 1 over the segment: ``(n, mean, signal, n0, n1, n2, s0, s1, s2)``: count and mean of the finite rewards,
    whether they differ, and the per-lane count / sum per mode (reduced by the caller)."""
    lanes = tl.arange(0, BLOCK).to(tl.int64)
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
        src, inside, r, valid = _load_block(rewards_ptr, perm_ptr, off + lanes, end, RAGGED)
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
    return n, mean, signal, n0, n1, n2, s0, s1, s2


@triton.jit(do_not_specialize=["rloo", "scale", "unbiased"])  # 0/1 flags: no variant per value
def _group_advantages_kernel(
    rewards_ptr, modes_ptr, perm_ptr, offsets_ptr, batch_std_ptr, adv_ptr, stats_ptr,
    group_size, eps, rloo, scale, unbiased,
    RAGGED: tl.constexpr, HAS_MODES: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    g = tl.program_id(0).to(tl.int64)
    start, end = _segment_bounds(g, offsets_ptr, group_size, RAGGED)
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    zero = tl.zeros([BLOCK], dtype=rewards_ptr.dtype.element_ty)  # accumulate in the compute dtype
    n, mean, signal, n0, n1, n2, s0, s1, s2 = _first_pass(rewards_ptr, modes_ptr, perm_ptr, start, end, zero,
                                                          RAGGED, HAS_MODES, BLOCK)  # fmt: skip

    acc_m2 = zero  # pass 2: squared deviations from the mean (two-pass variance)
    for off in range(start, end, BLOCK):
        src, inside, r, valid = _load_block(rewards_ptr, perm_ptr, off + lanes, end, RAGGED)
        d = tl.where(valid, r - mean, 0.0)
        acc_m2 += d * d
    m2 = tl.sum(acc_m2, axis=0)
    var = m2 / tl.maximum(n - unbiased, 1.0)  # unbiased is 0 or 1: Bessel's correction
    std = tl.where(n > 1, tl.sqrt(var), 0.0)

    factor = tl.where(rloo != 0, n / tl.maximum(n - 1, 1.0), 1.0)  # RLOO: r - mean(others) = n/(n-1) (r - mean)
    bstd = tl.load(batch_std_ptr, mask=scale == 1, other=0.0)  # the pointer is a dummy unless scale == 1
    denom = tl.where(scale == 0, std + eps, tl.where(scale == 1, bstd + eps, 1.0))
    for off in range(start, end, BLOCK):  # pass 3: the advantages
        src, inside, r, valid = _load_block(rewards_ptr, perm_ptr, off + lanes, end, RAGGED)
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


def block_config(max_group_len: int) -> tuple[int, int]:
    """``(BLOCK, num_warps)`` for groups of at most ``max_group_len`` rollouts (host int, known before launch)."""
    for limit, block, warps in BLOCK_CLASSES:
        if limit is None or max_group_len <= limit:
            return block, warps
    raise AssertionError("unreachable")


def launch_group_advantages(r, modes, layout, num_groups, rloo, scale_code, unbiased, eps, bstd, adv, stats):
    """Launch one program per group. ``r`` is contiguous float32/float64; ``modes`` int32 or None; ``layout`` has
    ``perm``/``offsets`` (ragged) or None (fixed ``max_group_len``-sized groups) and ``max_group_len`` (a host int);
    ``bstd`` a 1-element tensor for ``scale_code == 1`` (batch). Writes ``adv [N]`` and ``stats [G, 10]``.
    No data-dependent host work: works on meta tensors (the ahead-of-time compile check)."""
    from r4b_fast.backends import device_guard

    block, warps = block_config(int(layout.max_group_len))
    dummy = r  # never read: the constexpr flags (and the masked batch-std load) switch the loads off
    ragged = layout.perm is not None
    with device_guard(r):
        _group_advantages_kernel[(num_groups,)](
            r, modes if modes is not None else dummy, layout.perm if ragged else dummy,
            layout.offsets if ragged else dummy, bstd if bstd is not None else dummy, adv, stats,
            0 if ragged else int(layout.max_group_len), float(eps), int(bool(rloo)), int(scale_code),
            int(bool(unbiased)),
            RAGGED=ragged, HAS_MODES=modes is not None, BLOCK=block, num_warps=warps,
        )  # fmt: skip
    return adv, stats


def aot_scenarios():
    """Every variant the launcher produces at the GPU shapes of issue #10 (N = 262144 rewards in float64, the
    compute dtype; fixed groups of 1, of 16 = BPO's 2g, of 200 and of 4096, ragged groups of up to 16 / 200 / 4096),
    launched on meta tensors for the ahead-of-time compile check."""
    from r4b_fast.ops.group_advantages import NUM_STATS, _SegmentLayout

    n = 262144
    meta = dict(device="meta")
    r = torch.empty(n, dtype=torch.float64, **meta)
    adv = torch.empty_like(r)
    bstd = torch.empty(1, dtype=torch.float64, **meta)
    modes32 = torch.empty(n, dtype=torch.int32, **meta)
    for ragged in (False, True):
        for max_len in (1, 16, 200, 4096):  # one per block class (and group_size == 1, its own specialisation)
            if ragged and max_len == 1:
                continue
            if ragged:
                num_groups = n // max(1, max_len // 2)  # ragged: mean length about half the longest
                layout = _SegmentLayout(torch.empty(n, dtype=torch.int64, **meta),
                                        torch.empty(num_groups + 1, dtype=torch.int64, **meta), max_len)
            else:
                num_groups = n // max_len
                layout = _SegmentLayout(None, None, max_len)
            stats = torch.empty(num_groups, NUM_STATS, dtype=torch.float64, **meta)
            for modes in (None, modes32):
                # runtime scalars, one launch each for the record: grpo/group, rloo/none, drgrpo/batch
                for rloo, scale_code in ((False, 0), (True, 2), (False, 1)):
                    launch_group_advantages(r, modes, layout, num_groups, rloo, scale_code, True, 1e-6,
                                            bstd if scale_code == 1 else None, adv, stats)
