"""Triton sampling kernel (temperature / top-k / top-p / min-p) without sorting: one program per row.

Passes over the row, in blocks of ``BLOCK`` tokens, all in fp32 on ``e = exp((l - M) * inv)`` (``l`` the logits,
``M = max l``, ``inv = 1 / T``): 1-2. the row max, its first index and ``Z = sum e`` (online, one pass),
3. top-k: the largest threshold ``t`` with ``count(e >= t) >= k``,
4. top-p: the largest ``t`` with ``sum(e >= t, e >= t_k) >= top_p * mass_k``; both by a 16-pivot search on the
float32 bit pattern of ``t`` (8 passes narrow [0, 1] to one float: exact, no sort; flashinfer's dual-pivot idea with
more pivots per pass), skipped when the filter is off, 5. an inverse-CDF scan in vocabulary order with the row's
uniform. Same contract as ``r4b_fast.ops.sampling.torch_backend._sample_torch``.

Banned tokens (``NBAN`` ids per row, -1 = none; R-4B's strict modes: no ``</think>`` before the minimum thinking
length, no think tag after a closed block): removed before the filters, as a logits processor setting them to
``-inf`` would (``e`` = 0 for them in every pass after the first, ``M_a`` = the max of the allowed tokens, so
``e == 1`` at the allowed max), while ``M`` and ``log Z`` (the returned log-prob, and the forced tokens' log-probs
computed from them) stay those of the unbanned row: the distribution the training forward recomputes. ``NBAN = 0``
compiles the plain kernel.

Why ``(l - M) * inv`` and not ``l * inv - max(l * inv)``: the compiler contracts the latter into one FMA, so the
argmax's ``e`` was not exactly 1 and ``min_p = 1`` kept nothing. A subtraction followed by a product cannot be
contracted: ``e == 1`` exactly at the max, in every pass, and any ``T > 0`` works (no ``l / T`` overflow).

Rows with nothing to sample (no finite logit; NaN logits count as ``-inf``; possible only with
``check_values=False``) return the first index of the row's maximum (0 when every logit is ``-inf``/NaN) and a NaN
log-prob: never an index outside ``[0, V)``. A row whose finite logits are all banned returns its first allowed
token (log-prob ``-inf``): never a banned one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from r4b_fast.backends import device_guard

_ONE_BITS = tl.constexpr(0x3F800000)  # bits of 1.0f (tl.constexpr(...): Triton 3.9 rejects plain and annotated globals)
_FLT_MAX = tl.constexpr(3.4028234663852886e38)  # inv = 1 / T clamped to finite: 0 * inv stays 0
_FLT_MIN = tl.constexpr(1.1754943508222875e-38)  # and nonzero: -inf * inv stays -inf (T = +inf unchecked)
NPIV = 16  # pivots per pass of the threshold search
STEPS = 8  # ceil(30 / log2(NPIV)): probability bit patterns in [0, 1] span < 2^30
MAX_BLOCK = 1024
# The pivot search compares a [SEARCH_BLOCK, NPIV] tile: 1024 x 16 held 64 values per thread at 8 warps, and Triton
# 3.6's ptxas (the GPU machines') capped the kernel at 128 registers and spilled; 256 x 16 does not.
MAX_SEARCH_BLOCK = 256
# ptxas 12.8 (Triton 3.6), given only the block size (.reqntid), picks a register target for occupancy and spills a
# few long-lived scalars (u, log Z, t_k: stored once, loaded once) to meet it: 4-16 bytes at 40-64 registers, and
# lowering the pressure only lowers its target. An explicit .maxnreg turns that trade-off off; no variant needs more
# than ~70 registers, and with one program per row occupancy is not what limits the kernel.
MAXNREG = 128
MODE_BANS = 3  # banned ids per row of sample_with_modes' strict modes: <think>, </think>, eos


@triton.jit
def _load_x(base, idx, V):
    """One block of logits in fp32; NaN (only with check_values=False) and out-of-row lanes read as -inf."""
    x = tl.load(base + idx, mask=idx < V, other=-float("inf")).to(tl.float32)
    return tl.where(x == x, x, -float("inf"))


@triton.jit
def _allowed(ban_row, idx, V, NBAN: tl.constexpr):
    """Lanes of the row that may be sampled: inside the row and not one of its ``NBAN`` banned ids (loaded where
    used, from L1: no registers held across the passes)."""
    ok = idx < V
    for j in tl.static_range(NBAN):
        ok &= idx != tl.load(ban_row + j)
    return ok


@triton.jit
def _row_e(base, idx, V, inv, M, ban_row, NBAN: tl.constexpr):
    """``e = exp((l - M) * inv)`` of one block of the row (0 outside the row and at banned ids): exactly 1 at the
    (allowed) max ``M``."""
    return tl.where(_allowed(ban_row, idx, V, NBAN), tl.exp((_load_x(base, idx, V) - M) * inv), 0.0)


@triton.jit
def _threshold_search(base, V, inv, M, t_floor, need, ban_row, NBAN: tl.constexpr, MASS: tl.constexpr,
                      BLOCK: tl.constexpr, NPIV: tl.constexpr, STEPS: tl.constexpr):  # fmt: skip
    """Largest float32 ``t`` in [0, 1] with ``count(e >= t) >= need`` (MASS=False) or ``sum(e; e >= t, e >= t_floor)
    >= need`` (MASS=True). Multi-pivot bisection on the bit pattern: each pass over the row tests NPIV - 1 pivots
    at once and narrows the bracket NPIV-fold, so STEPS = ceil(30 / log2(NPIV)) passes are exact. ``BLOCK`` here is
    the search's own tile (``SEARCH_BLOCK``): its ``[BLOCK, NPIV]`` comparisons are what the registers hold."""
    lanes = tl.arange(0, BLOCK)
    j = tl.arange(0, NPIV)
    lo = tl.zeros([], tl.int32)
    hi = tl.zeros([], tl.int32) + (_ONE_BITS + 1)
    for _ in range(STEPS):
        # lo + floor((hi - lo) * j / NPIV) in int32 ((hi - lo) * j would not fit): d = NPIV q + r
        d = hi - lo
        piv = lo + (d // NPIV) * j + ((d % NPIV) * j) // NPIV  # piv[0] = lo, known to satisfy the predicate
        tpiv = piv.to(tl.float32, bitcast=True)
        acc = tl.zeros([NPIV], tl.float32)
        for off in range(0, V, BLOCK):
            e = _row_e(base, off + lanes, V, inv, M, ban_row, NBAN)
            hit = (e[:, None] >= tpiv[None, :]) & (e[:, None] > 0)
            if MASS:
                acc += tl.sum(tl.where(hit & (e[:, None] >= t_floor), e[:, None], 0.0), axis=0)
            else:
                acc += tl.sum(tl.where(hit, 1.0, 0.0), axis=0)
        ok = (acc >= need) | (j == 0)
        lo = tl.max(tl.where(ok, piv, lo), axis=0)
        hi = tl.min(tl.where(ok, hi, piv), axis=0)
    return lo.to(tl.float32, bitcast=True)


@triton.jit
def _row_stats(base, ban_row, V, inv, NBAN: tl.constexpr, BLOCK: tl.constexpr):
    """Pass 1: ``(M, logz, Ma, first_max)``: the row max and ``log sum exp((l - M) * inv)`` of the whole row (the
    log-probs), the max of the allowed tokens and its first index (0 when every token is banned). Online, per lane,
    then combined."""
    lanes = tl.arange(0, BLOCK)
    mvec = tl.full([BLOCK], -float("inf"), tl.float32)
    avec = tl.full([BLOCK], -float("inf"), tl.float32)
    ivec = tl.zeros([BLOCK], tl.int32) + V  # int32 indices: V < 2^31
    svec = tl.zeros([BLOCK], tl.float32)
    for off in range(0, V, BLOCK):
        idx = off + lanes
        x = _load_x(base, idx, V)
        ok = _allowed(ban_row, idx, V, NBAN)
        xa = tl.where(ok, x, -float("inf"))
        # strict: the first index of the lane's max; the lane's first allowed index while its max is -inf
        ivec = tl.where((xa > avec) | (ok & (ivec >= V)), idx, ivec)
        avec = tl.maximum(avec, xa)
        m_new = tl.maximum(mvec, x)
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)  # no -inf - -inf: exp(-inf - 0) = 0 instead
        svec = svec * tl.exp((mvec - m_safe) * inv) + tl.exp((x - m_safe) * inv)
        mvec = m_new
    M = tl.max(mvec, axis=0)
    logz = tl.log(tl.sum(svec * tl.exp((mvec - M) * inv), axis=0))
    Ma = tl.max(avec, axis=0)  # == M without bans
    first_max = tl.min(tl.where(avec == Ma, ivec, V), axis=0)
    first_max = tl.where(first_max < V, first_max, 0)  # every token banned (V <= NBAN)
    return M, logz, Ma, first_max


@triton.jit
def _inverse_cdf(base, ban_row, V, inv, Ma, thr, u_ptr, greedy, first_max, NBAN: tl.constexpr, BLOCK: tl.constexpr):
    """Passes 5-6: the kept mass (``e >= thr``), then the token whose cumulative kept mass in vocabulary order first
    exceeds the row's uniform (``*u_ptr``) times it (greedy: the first kept token, the max); never an index outside
    ``[0, V)``."""
    lanes = tl.arange(0, BLOCK)
    wvec = tl.zeros([BLOCK], tl.float32)
    for off in range(0, V, BLOCK):
        e = _row_e(base, off + lanes, V, inv, Ma, ban_row, NBAN)
        wvec += tl.where(e >= thr, e, 0.0)
    u = tl.load(u_ptr)
    target = tl.where(greedy, 0.0, u * tl.sum(wvec, axis=0))
    running = tl.zeros([], tl.float32)
    found = tl.zeros([], tl.int32) + V  # V: not found yet
    last = tl.zeros([], tl.int32) - 1
    for off in range(0, V, BLOCK):
        idx = off + lanes
        e = _row_e(base, idx, V, inv, Ma, ban_row, NBAN)
        w = tl.where(e >= thr, e, 0.0)
        c = tl.cumsum(w, axis=0) + running
        hit = (c > target) & (w > 0)
        found = tl.minimum(found, tl.min(tl.where(hit, idx, V), axis=0))
        last = tl.maximum(last, tl.max(tl.where(w > 0, idx, -1), axis=0))
        running += tl.sum(w, axis=0)
    tok = tl.where(found < V, found, last)  # rounding: the target may exceed the last partial sum
    return tl.where(tok >= 0, tok, first_max)  # nothing kept (no finite allowed logit): never an index below 0


@triton.jit
def _sample_kernel(
    logits_ptr, temp_ptr, topk_ptr, topp_ptr, minp_ptr, u_ptr, ban_ptr, tok_ptr, lp_ptr, max_ptr, logz_ptr,
    V, stride, NBAN: tl.constexpr, BLOCK: tl.constexpr, SEARCH_BLOCK: tl.constexpr, NPIV: tl.constexpr,
    STEPS: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride  # int64: B * V above 2^31 elements
    ban_row = ban_ptr + row * NBAN
    T = tl.load(temp_ptr + row)
    greedy = ~(T > 0)  # 0 (and, unchecked, negative or NaN): the first maximum
    inv = tl.minimum(tl.maximum(1.0 / tl.where(greedy, 1.0, T), _FLT_MIN), _FLT_MAX)
    lanes = tl.arange(0, BLOCK)
    M, logz, Ma, first_max = _row_stats(base, ban_row, V, inv, NBAN, BLOCK)

    # the per-row parameters are loaded where they are used: fewer values live across the searches
    k = tl.load(topk_ptr + row)
    t_k = tl.zeros([], tl.float32)
    if (k > 0) & (k < V):
        t_k = _threshold_search(base, V, inv, Ma, 0.0, k.to(tl.float32), ban_row, NBAN, False, SEARCH_BLOCK, NPIV,
                                STEPS)
    P = tl.load(topp_ptr + row)
    t_p = tl.zeros([], tl.float32)
    if P < 1.0:
        kvec = tl.zeros([BLOCK], tl.float32)
        for off in range(0, V, BLOCK):
            e = _row_e(base, off + lanes, V, inv, Ma, ban_row, NBAN)
            kvec += tl.where(e >= t_k, e, 0.0)
        t_p = _threshold_search(base, V, inv, Ma, t_k, P * tl.sum(kvec, axis=0), ban_row, NBAN, True, SEARCH_BLOCK,
                                NPIV, STEPS)
    mp = tl.load(minp_ptr + row)
    mp = tl.where(mp > 0, tl.minimum(mp, 1.0), 0.0)  # unchecked NaN: off; > 1: the max only
    # e == 1 exactly at the max: a threshold <= 1 always keeps the argmax; greedy takes its first occurrence
    thr = tl.minimum(tl.maximum(tl.maximum(t_k, t_p), mp), 1.0)
    thr = tl.where(greedy, 1.0, thr)
    tok = _inverse_cdf(base, ban_row, V, inv, Ma, thr, u_ptr + row, greedy, first_max, NBAN, BLOCK)
    x_tok = _load_x(base, tok, V)
    finite = (M > -float("inf")) & (M < float("inf"))
    tl.store(tok_ptr + row, tok.to(tl.int64))
    tl.store(lp_ptr + row, tl.where(finite, (x_tok - M) * inv - logz, float("nan")))
    tl.store(max_ptr + row, M)
    tl.store(logz_ptr + row, logz)


def block_size(V: int) -> int:
    """Tokens per block of the row loops: the row rounded up to a power of two, at most ``MAX_BLOCK``."""
    return triton.next_power_of_2(min(max(V, 16), MAX_BLOCK))


def launch_sample(logits, temperature, top_k, top_p, min_p, uniforms, banned=None):
    """One program per row. ``logits`` [B, V] (unit stride along V) float32/bfloat16/float16/float64; per-row
    temperature / top_p / min_p / uniforms [B] float, top_k [B] int64; ``banned`` None or [B, NBAN] integer token
    ids that cannot be sampled (-1: none). Returns ``(tokens [B] int64, logprobs [B]
    float32, row_max [B] float32 (max of the logits), log_z [B] float32 (log sum exp((l - row_max) / T)))``.
    Works on meta tensors (no host reads): the ahead-of-time compile check calls it so."""
    B, V = logits.shape
    if V > 2**31 - 1 - MAX_BLOCK:  # the kernel's token indices are int32
        raise ValueError(f"logits: vocabulary size {V} does not fit the kernel's int32 token indices")
    dev = logits.device
    tokens = torch.empty(B, dtype=torch.int64, device=dev)
    logprobs = torch.empty(B, dtype=torch.float32, device=dev)
    row_max = torch.empty(B, dtype=torch.float32, device=dev)
    log_z = torch.empty(B, dtype=torch.float32, device=dev)
    block = block_size(V)
    params = [temperature.float().contiguous(), top_k.to(torch.int64).contiguous(), top_p.float().contiguous(),
              min_p.float().contiguous(), uniforms.float().contiguous()]  # fmt: skip
    nban = 0 if banned is None else banned.shape[1]
    ban = tokens if nban == 0 else banned.to(torch.int32).contiguous()  # NBAN = 0: never read
    with device_guard(logits):
        _sample_kernel[(B,)](
            logits, *params, ban, tokens, logprobs, row_max, log_z, V, logits.stride(0), NBAN=nban,
            BLOCK=block, SEARCH_BLOCK=min(block, MAX_SEARCH_BLOCK), NPIV=NPIV, STEPS=STEPS,
            num_warps=4 if block <= 512 else 8, maxnreg=MAXNREG,
        )  # fmt: skip
    return tokens, logprobs, row_max, log_z


def aot_scenarios():
    """Every launch the op can make, at the GPU shapes (B=512, V=151936: Qwen3's vocabulary) and small V (one
    block; V=100: BLOCK 128 and 4 warps), once per logits dtype, on meta tensors; without bans (``sample``) and
    with the strict modes' ``MODE_BANS`` banned ids per row (``sample_with_modes``)."""
    for B, V in ((512, 151936), (512, 1000), (64, 100)):
        for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
            logits = torch.empty(B, V, dtype=dtype, device="meta")
            f32, i64 = (torch.empty(B, dtype=dt, device="meta") for dt in (torch.float32, torch.int64))
            launch_sample(logits, f32, i64, f32, f32, f32)
            launch_sample(logits, f32, i64, f32, f32, f32, torch.empty(B, MODE_BANS, dtype=torch.int64, device="meta"))
