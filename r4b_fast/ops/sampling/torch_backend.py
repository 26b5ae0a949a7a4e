"""The torch backend of :func:`r4b_fast.ops.sampling.sample` (the CPU path): no sort of the vocabulary.

``torch.topk`` on a bounded candidate set (``CANDIDATES`` tokens) finds the top-k / top-p thresholds exactly when
the nucleus fits in it (the usual case for LLM logits). Rows whose filtered set does not fit take a full-vocabulary
path: on CPU (host reads are free) exact thresholds from a histogram of ``e`` over the top bits of its float32
pattern (:func:`_hist_rows`); on other devices an exact 31-pass bisection on the float32 bit pattern of the threshold
(:func:`_bisect_rows`, no host sync). Same contract as the Triton and CUDA kernels (see the package docstring).
"""

from __future__ import annotations

import torch

CANDIDATES = 1024  # torch backend: top-k candidates per row in which thresholds are searched first
_BISECT_STEPS = 31  # float32 bit patterns of probabilities in [0, 1] span < 2^30: 31 halvings are exact
_ONE_BITS = 0x3F800000  # bits of 1.0f
_HIST_SHIFT = 18  # CPU fallback histogram: float32 bits >> 18 = exponent + 5 mantissa bits (bins ~3% wide in e)
_HIST_BINS = (_ONE_BITS >> _HIST_SHIFT) + 1  # every e in [0, 1]
_FLT_MAX = 3.4028234663852886e38
_FLT_MIN = 1.1754943508222875e-38
def _bisect_threshold(e: torch.Tensor, pred) -> torch.Tensor:
    """Largest float32 ``t`` in [0, 1] with ``pred(e >= t)`` true, per row, by bisection on the bit pattern (exact).

    ``pred(mask [b, V]) -> [b] bool`` must be monotone (true at t = 0)."""
    lo = torch.zeros(e.shape[0], dtype=torch.int32, device=e.device)
    hi = torch.full_like(lo, _ONE_BITS + 1)
    for _ in range(_BISECT_STEPS):
        mid = lo + (hi - lo) // 2
        ok = pred(e >= mid.view(torch.float32)[:, None])
        lo = torch.where(ok, mid, lo)
        hi = torch.where(ok, hi, mid)
    return lo.view(torch.float32)


def _hist_threshold(e: torch.Tensor, bins: torch.Tensor, weight: torch.Tensor, need: torch.Tensor) -> torch.Tensor:
    """Largest float32 ``t`` with ``sum(weight; e >= t) >= need`` per row (0 if none), exact (ties kept), CPU.

    ``e`` [b, V] in [0, 1]; ``bins`` [b, V] int64 = the top bits of e's float32 pattern (monotone in e); ``weight``
    [b, V] >= 0, 0 exactly where it must not count. A histogram of the weights over the bins locates the bin that
    holds the threshold; only that bin's tokens are sorted (a few hundred on flat logits), never the row.
    """
    b = e.shape[0]
    hist = torch.zeros(b, _HIST_BINS, dtype=weight.dtype).scatter_add_(1, bins, weight)
    tail = hist.flip(1).cumsum(1)  # tail[:, i]: weight in the i + 1 highest bins
    i = torch.searchsorted(tail, need[:, None].to(tail.dtype))[:, 0].clamp(max=_HIST_BINS - 1)
    j = _HIST_BINS - 1 - i  # the bin of the threshold
    above = torch.where(i > 0, tail.gather(1, (i - 1).clamp(min=0)[:, None])[:, 0], 0.0).double()
    r, c = torch.nonzero(bins == j[:, None], as_tuple=True)  # row-major: grouped by row
    n = r.numel()
    if n == 0:
        return torch.zeros(b, dtype=torch.float32)
    v = e[r, c]
    o = v.argsort(descending=True, stable=True)
    o = o[r[o].argsort(stable=True)]  # by row, then e descending
    r, v, w = r[o], v[o], weight[r[o], c[o]].double()
    counts = torch.bincount(r, minlength=b)
    starts = counts.cumsum(0) - counts
    cs = w.cumsum(0)
    has = counts > 0
    base = torch.zeros(b, dtype=torch.float64)
    base[has] = cs[starts[has]] - w[starts[has]]
    reach = cs - base[r] + above[r] >= need.double()[r]
    pos = torch.where(reach, torch.arange(n), n)
    first = torch.full((b,), n, dtype=torch.int64).scatter_reduce_(0, r, pos, "amin")
    # none reaches (sums in another order than the histogram's): the bin's smallest token
    first = torch.where(first < n, first, starts + counts - 1)
    return torch.where(has, v[first.clamp(0, n - 1)], 0.0)


def _hist_rows(e, Z, top_k, top_p, min_p, u):
    """CPU path of the rows whose filtered set does not fit in the candidates (flat logits, large k, no filter):
    exact thresholds by :func:`_hist_threshold`, then inverse CDF in vocabulary order. ``e`` [b, V] = exp((l - M) /
    T) with finite M; ``Z`` [b] = sum e. Returns tokens [b]."""
    V = e.shape[1]
    bins = None
    topk_on = (top_k > 0) & (top_k < V)
    p_on = top_p < 1
    t_k = torch.zeros_like(Z)
    mass = Z
    e_k = e
    if bool(topk_on.any()):
        bins = (e.view(torch.int32) >> _HIST_SHIFT).long()
        t_k = torch.where(topk_on, _hist_threshold(e, bins, (e > 0).float(), top_k.float()), 0.0)
        e_k = torch.where(e >= t_k[:, None], e, 0)
        mass = e_k.sum(1)
    t_p = torch.zeros_like(Z)
    if bool(p_on.any()):
        bins = (e.view(torch.int32) >> _HIST_SHIFT).long() if bins is None else bins
        t_p = torch.where(p_on, _hist_threshold(e, bins, e_k, top_p * mass), 0.0)
    del bins
    thr = torch.maximum(torch.maximum(t_k, t_p), min_p).clamp(max=1.0)
    w = torch.where(e >= thr[:, None], e, 0) if bool((thr > 0).any()) else e
    cum = w.cumsum(1)
    idx = torch.searchsorted(cum, (u * cum[:, -1])[:, None], right=True)[:, 0]
    over = idx >= V  # rounding: u * total == total; never a zero-mass token: the last kept index
    if bool(over.any()):
        last = V - 1 - torch.flip(w[over] > 0, [1]).to(torch.int8).argmax(1)
        idx[over] = last
    return idx


def _bisect_rows(e, top_k, top_p, min_p, u):
    """Device path (no host sync) of the rows whose filtered set does not fit in the candidates: exact thresholds by
    bisection over the full rows, then inverse CDF in vocabulary order. ``e`` [b, V] = exp((l - M) / T). Tokens [b]."""
    V = e.shape[1]
    topk_on = (top_k > 0) & (top_k < V)
    k = torch.where(topk_on, top_k, V)
    t_k = _bisect_threshold(e, lambda keep: keep.sum(1) >= k)
    t_k = torch.where(topk_on, t_k, 0.0)
    e_k = torch.where(e >= t_k[:, None], e, 0)
    target = top_p * e_k.sum(1)
    t_p = _bisect_threshold(e_k, lambda keep: torch.where(keep, e_k, 0).sum(1) >= target)
    t_p = torch.where(top_p < 1, t_p, 0.0)
    thr = torch.maximum(torch.maximum(t_k, t_p), min_p).clamp(max=1.0)
    w = torch.where(e >= thr[:, None], e, 0)
    cum = w.cumsum(1)
    idx = torch.searchsorted(cum, (u * cum[:, -1])[:, None], right=True)[:, 0]
    # never a zero-mass token: clamp to the last kept index
    last = V - 1 - torch.flip(w > 0, [1]).to(torch.int8).argmax(1)
    return torch.minimum(idx, last)


def _sanitise(temperature, min_p):
    """Per-row ``(greedy, inv, min_p)`` as every backend reads them: ``T > 0`` samples, anything else (0; negative or
    NaN only with check_values=False) is greedy; ``inv = 1 / T`` clamped finite and nonzero; min_p clamped to
    [0, 1] (NaN: 0)."""
    greedy = ~(temperature > 0)
    inv = (1.0 / torch.where(greedy, 1.0, temperature)).clamp(_FLT_MIN, _FLT_MAX)
    mp = torch.where(min_p > 0, min_p.clamp(max=1.0), 0.0)
    return greedy, inv, mp


def _row_exp(xf, M, finite, inv, cpu):
    """``e = exp((l - M) / T)`` [B, V] (0 on rows without a finite max) and its row sums: exactly 1 at the max
    (min_p = 1 keeps it); any T > 0 works (no l / T overflow)."""
    e = torch.sub(xf, M[:, None]).mul_(inv[:, None]).exp_()
    if not cpu:
        e = torch.where(finite[:, None], e, 0.0)
    elif not bool(finite.all()):
        e[~finite] = 0.0
    return e, e.sum(1)


def _clean_logits(logits: torch.Tensor, cpu: bool):
    """``(xf, M)``: the logits in fp32 with NaN (unchecked input) read as ``-inf``, and their row max. On CPU only
    a batch with a NaN row max is rewritten (host reads are free); elsewhere always (no sync)."""
    xf = logits.float()
    M = xf.amax(1)
    bad_nan = M.isnan()  # NaN logits (unchecked input) act as -inf
    if not cpu or bool(bad_nan.any()):
        xf = torch.where(bad_nan[:, None] & xf.isnan(), -float("inf"), xf)
        M = xf.amax(1)
    return xf, M


def _ban(xf: torch.Tensor, banned: torch.Tensor, inv: torch.Tensor, cpu: bool):
    """The row with its ``banned`` ids (``[B, n]``, -1: none) at ``-inf``, as a logits processor would:
    ``(xf, M, finite, e, Z, first_allowed)``; ``first_allowed`` [B] is the first id (among the first n + 1) that is
    not banned: the token of a row whose finite logits are all banned, never a banned one."""
    xf = xf.clone()
    for j in range(banned.shape[1]):  # column by column: repeated ids stay banned
        col = banned[:, j : j + 1]
        idx = col.clamp(min=0)
        xf.scatter_(1, idx, torch.where(col >= 0, -float("inf"), xf.gather(1, idx)))
    M = xf.amax(1)
    finite = M.isfinite()
    e, Z = _row_exp(xf, M, finite, inv, cpu)
    c = torch.arange(banned.shape[1] + 1, device=banned.device)
    is_banned = (c[None, :, None] == banned[:, None, :]).any(-1)
    first_allowed = (~is_banned).to(torch.int8).argmax(1).clamp(max=xf.shape[1] - 1)
    return xf, M, finite, e, Z, first_allowed


def _candidate_tokens(e, Z, top_k, topk_on, top_p, min_p, u, K: int):
    """Thresholds and inverse CDF within each row's ``K`` largest ``e`` (``torch.topk``): ``(tokens [b], fits [b])``,
    ``fits`` false where the candidates cannot hold the filtered set (the caller takes the full-vocabulary path)."""
    V = e.shape[1]
    ce, ci = torch.topk(e, K, dim=1)  # sorted, descending; ce[:, 0] == 1 on finite rows
    k = torch.where(topk_on, top_k, V)
    k_fits = (k <= K) | ~topk_on
    t_k = torch.where(topk_on, ce.gather(1, (k.clamp(max=K) - 1)[:, None])[:, 0], 0.0)
    ce_k = torch.where(ce >= t_k[:, None], ce, 0)
    # top-k mass: the full-vocabulary sum when top-k is off, else the candidates' (ties at the boundary beyond
    # the candidates are handled by the full-vocabulary path)
    mass_k = torch.where(topk_on, ce_k.sum(1), Z)
    cum = ce_k.cumsum(1)
    first = torch.searchsorted(cum, (top_p * mass_k)[:, None])[:, 0]
    p_fits = (first < K) | (top_p >= 1)
    t_p = torch.where(top_p < 1, ce.gather(1, first.clamp(max=K - 1)[:, None])[:, 0], 0.0)
    thr = torch.maximum(torch.maximum(t_k, t_p), min_p).clamp(max=1.0)
    # candidates suffice when the thresholds were found and no token outside them can reach the threshold
    fits = k_fits & p_fits & ((thr > ce[:, -1]) | (K == V))
    # inverse CDF in vocabulary order (as the kernels and the fallback): sort the K candidates by token id
    by_id = ci.argsort(1)
    ci_v, ce_v = ci.gather(1, by_id), ce.gather(1, by_id)
    w = torch.where(ce_v >= thr[:, None], ce_v, 0)
    wc = w.cumsum(1)
    j = torch.searchsorted(wc, (u * wc[:, -1])[:, None], right=True)[:, 0]
    last = K - 1 - torch.flip(w > 0, [1]).to(torch.int8).argmax(1)
    return ci_v.gather(1, torch.minimum(j, last)[:, None])[:, 0], fits


def _sample_torch(logits, temperature, top_k, top_p, min_p, u, candidates, banned=None):
    """The torch backend of the ``r4b_fast::sample`` op: ``(tokens, logprobs, row_max, log_z)`` (see ``_sample_op``)."""
    B, V = logits.shape
    cpu = logits.device.type == "cpu"
    greedy, inv, min_p = _sanitise(temperature, min_p)
    xf, M = _clean_logits(logits, cpu)
    finite = M.isfinite()  # else nothing to sample: the first max (0 if all -inf), NaN log-prob
    e, Z = _row_exp(xf, M, finite, inv, cpu)
    log_z, M_lp, finite_lp = Z.log(), M, finite  # the log-probs: of the unbanned row
    first_allowed = None
    if banned is not None:  # sampled from the allowed tokens: banned ids at -inf, as a logits processor would
        del e
        xf, M, finite, e, Z, first_allowed = _ban(xf, banned, inv, cpu)
    # greedy rows and rows with nothing to sample take the first index of the max (argmax: first on ties)
    exact_max = greedy | ~finite
    first_max = xf.argmax(1) if not cpu or bool(exact_max.any()) else None
    if first_max is not None and first_allowed is not None:
        first_max = torch.where(M == -float("inf"), first_allowed, first_max)
    topk_on = (top_k > 0) & (top_k < V)
    K = min(V, candidates)
    # rows whose filtered set surely exceeds K tokens (no top-k <= K, no min_p, and a nucleus of mass > K while
    # every e <= 1; or no filter at all) skip the candidates: flat logits go straight to the histogram path. (Fewer
    # candidates than CANDIDATES: a batch-wide top-k < K bounds every row, none can be flat.)
    cand_rows = None
    if cpu and K < V and candidates >= CANDIDATES:
        flat = ~greedy & finite & (~topk_on | (top_k > K)) & (min_p == 0) & ((top_p >= 1) | (top_p * Z > K))
        cand_rows = torch.nonzero(~flat)[:, 0]
    tokens = torch.zeros(B, dtype=torch.int64, device=logits.device)
    fits = torch.zeros_like(greedy)
    if cand_rows is None or cand_rows.numel() == B:
        tokens, fits = _candidate_tokens(e, Z, top_k, topk_on, top_p, min_p, u, K)
    elif cand_rows.numel():
        r = cand_rows
        tokens[r], fits[r] = _candidate_tokens(e[r], Z[r], top_k[r], topk_on[r], top_p[r], min_p[r], u[r], K)
    if cpu:  # host reads are free on CPU: only the rows that need it take the full-vocabulary path
        rows = torch.nonzero(~fits & ~greedy & finite)[:, 0]
        if rows.numel():
            tokens[rows] = _hist_rows(e[rows], Z[rows], top_k[rows], top_p[rows], min_p[rows], u[rows])
    elif K < V:  # no host sync: compute for every row, select
        tokens = torch.where(fits, tokens, _bisect_rows(e, top_k, top_p, min_p, u))
    if first_max is not None:
        tokens = torch.where(exact_max, first_max, tokens)
    logprobs = (logits.gather(1, tokens[:, None])[:, 0].float() - M_lp) * inv - log_z
    logprobs = torch.where(finite_lp, logprobs, float("nan"))
    return tokens, logprobs, M_lp, log_z
