"""Fused, sync-free token sampling (temperature / top-k / top-p / min-p) and R-4B mode control for rollouts.

Implementations, by name:
- ``filtered_probs_ref`` / ``sample_ref``: the transformers/vLLM pattern, eager fp32: a full sort of the vocabulary,
  cumulative sums for top-p, ``torch.multinomial``. The oracle of the frequency tests and the benchmark baseline.
  ``ModeProcessorRef`` is the matching host-side Python loop per row per step (forced prefixes, thinking budget).
- ``_sample_torch``: no sort of the vocabulary. ``torch.topk`` on a bounded candidate set (``CANDIDATES`` tokens)
  finds the top-k / top-p thresholds exactly when the nucleus fits in it (the usual case for LLM logits). Rows whose
  filtered set does not fit take a full-vocabulary path. On CPU (host reads are free): rows that surely do not fit
  (flat logits: a nucleus of mass ``top_p * Z > CANDIDATES`` while every ``e <= 1``; or no filter) skip the
  candidates, and those rows get their exact thresholds from a histogram of ``e`` over the top bits of its float32
  pattern (one scatter-add locates the threshold's bin; only that bin's tokens, a few hundred, are sorted): about
  ten passes over the row instead of a sort. On other devices every row computes an exact 31-pass bisection on the
  float32 bit pattern of the threshold (``torch.where``): no host sync. The CPU path.
- triton: ``kernels/sampling.py``, one program per row: an online max / log-sum-exp pass, a 16-pivot search on the
  float32 bit pattern for the top-k count and top-p mass thresholds (8 passes each, exact, no sort), then an
  inverse-CDF scan in vocabulary order.
- cuda: ``csrc/sampling.cu``, one thread block per row, the same passes as the Triton kernel (block reductions,
  a cub block scan for the inverse CDF that stops at the hit). Compiled by CI; numerically tested only where a GPU
  is present.

Semantics (every backend):
- ``x = logits / T`` (rows with ``T == 0`` are greedy: ``argmax(logits)``, first index on ties), ``p = softmax(x)``,
  computed as ``e = exp((logits - max) / T)`` (exactly 1 at the max, so ``min_p = 1`` keeps the argmax; any
  ``T > 0`` works, however small: no ``logits / T`` overflow).
- Filters in transformers' order: top-k keeps ``p >= (k-th largest p)`` (ties at the boundary are kept); top-p keeps,
  among those, the smallest set of most probable tokens whose mass reaches ``top_p`` of the top-k mass (threshold
  semantics: ties kept); min-p keeps ``p >= min_p * max(p)`` (invariant to the order). The token is drawn from the
  kept tokens renormalised, by inverse CDF with one uniform per row drawn from ``generator``
  (``torch.rand(B, generator=generator)``), walking the CDF in vocabulary order: same generator state -> same
  tokens, and the backends agree token for token up to float rounding at a CDF boundary (sums in different orders).
- Returned log-probs are ``log_softmax(logits / T)[token]`` of the temperature-scaled **unfiltered** distribution
  (as TRL and vLLM use for ``old_logprobs``: the training forward recomputes exactly this quantity). Greedy rows
  (``T == 0``) report ``log_softmax(logits)[token]`` (``T = 1``).
- Never a token outside ``[0, V)``. Inputs that ``check_values=True`` rejects, when not checked
  (``check_values=False``, :func:`sample_with_modes`' default), are read so, identically by every backend: NaN
  logits act as ``-inf``; a row with no finite logit (all ``-inf`` / NaN, or a ``+inf``) returns the first index of
  its maximum (0 for all ``-inf`` / NaN) with a **NaN log-prob** (the flag: a loss on it fails loudly); a temperature
  that is not ``> 0`` (negative, NaN) is greedy, ``+inf`` is uniform; ``min_p`` outside [0, 1] is clamped (NaN: 0);
  ``top_p`` >= 1 or NaN and ``top_k`` <= 0 are off.

Mode control (R-4B): :class:`ModeState` holds per-row device tensors (mode, forced-token queue and pointer, thinking
budget and counter, phase, finished flag); :func:`sample_with_modes` samples and advances it with no host sync.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from typing import NamedTuple

import torch

from r4b_fast.backends import device_guard, resolve_backend
from r4b_fast.modes import Mode

OP_BACKENDS = ("torch", "triton", "cuda")
PREFERRED = {"cpu": ("torch",), "cuda": ("triton", "cuda", "torch")}
CANDIDATES = 1024  # torch backend: top-k candidates per row in which thresholds are searched first
_BISECT_STEPS = 31  # float32 bit patterns of probabilities in [0, 1] span < 2^30: 31 halvings are exact
_ONE_BITS = 0x3F800000  # bits of 1.0f
_HIST_SHIFT = 18  # CPU fallback histogram: float32 bits >> 18 = exponent + 5 mantissa bits (bins ~3% wide in e)
_HIST_BINS = (_ONE_BITS >> _HIST_SHIFT) + 1  # every e in [0, 1]
_FLT_MAX = 3.4028234663852886e38
_FLT_MIN = 1.1754943508222875e-38


# ----------------------------------------------------------------------------------------------------------------
# Reference: sort-based filtering + multinomial, and the host-side mode processor (the transformers/vLLM pattern).
# ----------------------------------------------------------------------------------------------------------------
def filtered_probs_ref(logits, temperature, top_k, top_p, min_p, banned=None) -> torch.Tensor:
    """The distribution :func:`sample` draws from, by sorting: ``[B, V]`` float64 probabilities.

    Per-row parameters as ``[B]`` tensors (``top_k`` 0 = off). Greedy rows (``T == 0``) put mass 1 on the argmax.
    ``banned``: optional ``[B, n]`` token ids (-1: none) set to ``-inf`` before everything else (a logits processor,
    as transformers applies them before its warpers), as :func:`sample_with_modes`' strict modes do.
    """
    x = logits.double()
    B, V = x.shape
    if banned is not None:
        x = x.clone()  # logits.double() is logits itself for float64
        for j in range(banned.shape[1]):
            col = banned[:, j]
            rows = torch.nonzero(col >= 0)[:, 0]
            x[rows, col[rows]] = -float("inf")
        logits = x
    t = temperature.double()
    greedy = t == 0
    x = x / torch.where(greedy, 1.0, t)[:, None]
    p = torch.softmax(x, dim=-1)
    sp, si = torch.sort(p, dim=-1, descending=True)
    keep_sorted = torch.ones_like(sp, dtype=torch.bool)
    k = torch.where(top_k > 0, top_k, V).clamp(max=V)
    kth = sp.gather(1, (k - 1)[:, None])
    keep_sorted &= sp >= kth  # top-k, ties kept
    masked = torch.where(keep_sorted, sp, 0)
    cum = masked.cumsum(-1)
    target = top_p.double()[:, None] * masked.sum(-1, keepdim=True)
    # the first sorted position whose inclusive cumulative mass reaches the target gives the threshold value
    first = torch.searchsorted(cum, target * (1 - 1e-12)).clamp(max=V - 1)  # tolerance: float64 sums of float32
    thr_p = sp.gather(1, first)
    keep_sorted &= sp >= thr_p
    keep_sorted &= sp >= min_p.double()[:, None] * sp[:, :1]
    keep = torch.zeros_like(keep_sorted).scatter_(1, si, keep_sorted)
    q = torch.where(keep, p, 0)
    q = q / q.sum(-1, keepdim=True)
    onehot = torch.zeros_like(q).scatter_(1, logits.argmax(-1, keepdim=True), 1.0)
    return torch.where(greedy[:, None], onehot, q)


def sample_ref(logits, temperature, top_k, top_p, min_p, generator=None, banned=None):
    """Sort-based sampling (filtered_probs_ref + ``torch.multinomial``): ``(tokens [B] int64, logprobs [B] fp32)``,
    log-probs of the unbanned distribution."""
    q = filtered_probs_ref(logits, temperature, top_k, top_p, min_p, banned)
    tokens = torch.multinomial(q.float(), 1, generator=generator)[:, 0]
    t = torch.where(temperature == 0, 1.0, temperature.float())
    logprobs = torch.log_softmax(logits.float() / t[:, None], -1).gather(1, tokens[:, None])[:, 0]
    return tokens, logprobs


class ModeProcessorRef:
    """The host-side pattern of engines: a Python loop per row per step over lists (oracle of the mode tests).

    ``banned()`` lists, per row, the token ids the next sampled token must not be (strict modes); ``step(sampled)``
    takes the sampled token of every row (a list) and returns the tokens actually emitted. Same rules as
    :func:`sample_with_modes`.
    """

    def __init__(self, modes, think_open_ids, no_think_ids, think_close_ids, *, budget=None, eos_id, pad_id,
                 auto_ids=(), think_start_id=None, think_end_id=None, min_think_tokens=0, no_reopen=False):  # fmt: skip
        prefix = {Mode.THINK: list(think_open_ids), Mode.NO_THINK: list(no_think_ids), Mode.AUTO: list(auto_ids)}
        self.queue = [list(prefix[Mode(int(m))]) for m in modes]
        self.close = list(think_close_ids)
        n = len(self.queue)
        self.budget = [budget] * n if budget is None or isinstance(budget, int) else [int(b) for b in budget]
        self.start = think_open_ids[0] if think_start_id is None else think_start_id
        self.end = _default_end_id(think_open_ids, think_close_ids) if think_end_id is None else think_end_id
        self.eos, self.pad = eos_id, pad_id
        self.modes = [Mode(int(m)) for m in modes]
        mt = [min_think_tokens] * n if isinstance(min_think_tokens, int) else [int(k) for k in min_think_tokens]
        # </think> needs k sampled tokens before the close sequence, whose tokens before </think> are sampled too
        offset = list(think_close_ids).index(self.end) if self.end in think_close_ids else 0
        self.min_end = [k + offset if k > 0 else 0 for k in mt]
        self.no_reopen = no_reopen
        self.in_think = [False] * n
        self.opened = [False] * n
        self.closed = [False] * n
        self.count = [0] * n
        self.finished = [False] * n
        self.forced = [False] * n
        self.closing = [False] * n

    def banned(self) -> list[list[int]]:
        out = []
        for i in range(len(self.queue)):
            ban = []
            if self.no_reopen and self.closed[i]:
                ban += [self.start, self.end]
            if self.modes[i] == Mode.THINK and self.in_think[i] and self.count[i] < self.min_end[i]:
                ban += [self.end, self.eos]
            out.append(ban)
        return out

    def step(self, sampled: list[int]) -> list[int]:
        out = []
        for i, s in enumerate(sampled):
            self.forced[i] = False
            if self.finished[i]:
                out.append(self.pad)
                continue
            b = self.budget[i]
            if not self.queue[i] and self.in_think[i] and b is not None and b >= 0 and self.count[i] >= b:
                self.queue[i] = list(self.close)
                self.closing[i] = True
            if self.queue[i]:
                tok = self.queue[i].pop(0)
                self.forced[i] = True
                if self.closing[i] and not self.queue[i]:  # the close sequence ends the think block
                    self.closing[i] = self.in_think[i] = False
                    self.closed[i] = True
            else:
                tok = s
                if self.in_think[i]:
                    self.count[i] += 1
            if tok == self.start and not self.opened[i]:
                self.opened[i] = self.in_think[i] = True
            elif tok == self.end and self.in_think[i]:
                self.in_think[i] = False
                self.closed[i] = True
            if tok == self.eos:
                self.finished[i] = True
            out.append(tok)
        return out


def _default_end_id(think_open_ids, think_close_ids) -> int:
    """The token that closes a think block: the first id of the close sequence that is not in the open sequence
    (``"\\n</think>\\n\\n"`` -> ``"</think>"``)."""
    for t in think_close_ids:
        if t not in think_open_ids:
            return int(t)
    return int(think_close_ids[-1])


# ----------------------------------------------------------------------------------------------------------------
# torch backend
# ----------------------------------------------------------------------------------------------------------------
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


def _sample_torch(logits, temperature, top_k, top_p, min_p, u, candidates, banned=None):
    B, V = logits.shape
    cpu = logits.device.type == "cpu"
    greedy, inv, min_p = _sanitise(temperature, min_p)
    xf = logits.float()
    M = xf.amax(1)
    bad_nan = M.isnan()  # NaN logits (unchecked input) act as -inf
    if not cpu or bool(bad_nan.any()):
        xf = torch.where(bad_nan[:, None] & xf.isnan(), -float("inf"), xf)
        M = xf.amax(1)
    finite = M.isfinite()  # else nothing to sample: the first max (0 if all -inf), NaN log-prob
    e, Z = _row_exp(xf, M, finite, inv, cpu)
    log_z, M_lp, finite_lp = Z.log(), M, finite  # the log-probs: of the unbanned row
    first_allowed = None
    if banned is not None:  # sampled from the allowed tokens: banned ids at -inf, as a logits processor would
        del e
        xf = xf.clone()
        for j in range(banned.shape[1]):  # column by column: repeated ids stay banned
            col = banned[:, j : j + 1]
            idx = col.clamp(min=0)
            xf.scatter_(1, idx, torch.where(col >= 0, -float("inf"), xf.gather(1, idx)))
        M = xf.amax(1)
        finite = M.isfinite()
        e, Z = _row_exp(xf, M, finite, inv, cpu)
        # a row whose finite logits are all banned: its first allowed id (among the first n + 1), never a banned one
        c = torch.arange(banned.shape[1] + 1, device=banned.device)
        is_banned = (c[None, :, None] == banned[:, None, :]).any(-1)
        first_allowed = (~is_banned).to(torch.int8).argmax(1).clamp(max=V - 1)
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
    if cpu and K < V and candidates >= CANDIDATES:
        flat = ~greedy & finite & (~topk_on | (top_k > K)) & (min_p == 0) & ((top_p >= 1) | (top_p * Z > K))
        cand_rows = torch.nonzero(~flat)[:, 0]
    else:
        flat = torch.zeros_like(greedy)
        cand_rows = None
    tokens = torch.zeros(B, dtype=torch.int64, device=logits.device)
    fits = torch.zeros_like(greedy)
    if cand_rows is None or cand_rows.numel():
        sub = (lambda t: t) if cand_rows is None or cand_rows.numel() == B else (lambda t: t[cand_rows])
        ce, ci = torch.topk(sub(e), K, dim=1)  # sorted, descending; ce[:, 0] == 1 on finite rows
        k = torch.where(sub(topk_on), sub(top_k), V)
        k_fits = (k <= K) | ~sub(topk_on)
        t_k = torch.where(sub(topk_on), ce.gather(1, (k.clamp(max=K) - 1)[:, None])[:, 0], 0.0)
        ce_k = torch.where(ce >= t_k[:, None], ce, 0)
        # top-k mass: the full-vocabulary sum when top-k is off, else the candidates' (ties at the boundary beyond
        # the candidates are handled by the full-vocabulary path below)
        mass_k = torch.where(sub(topk_on), ce_k.sum(1), sub(Z))
        cum = ce_k.cumsum(1)
        first = torch.searchsorted(cum, (sub(top_p) * mass_k)[:, None])[:, 0]
        p_fits = (first < K) | (sub(top_p) >= 1)
        t_p = torch.where(sub(top_p) < 1, ce.gather(1, first.clamp(max=K - 1)[:, None])[:, 0], 0.0)
        thr = torch.maximum(torch.maximum(t_k, t_p), sub(min_p)).clamp(max=1.0)
        # candidates suffice when the thresholds were found and no token outside them can reach the threshold
        sub_fits = k_fits & p_fits & ((thr > ce[:, -1]) | (K == V))
        # inverse CDF in vocabulary order (as the kernels and the fallback): sort the K candidates by token id
        by_id = ci.argsort(1)
        ci_v, ce_v = ci.gather(1, by_id), ce.gather(1, by_id)
        w = torch.where(ce_v >= thr[:, None], ce_v, 0)
        wc = w.cumsum(1)
        j = torch.searchsorted(wc, (sub(u) * wc[:, -1])[:, None], right=True)[:, 0]
        last = K - 1 - torch.flip(w > 0, [1]).to(torch.int8).argmax(1)
        sub_tokens = ci_v.gather(1, torch.minimum(j, last)[:, None])[:, 0]
        if cand_rows is None:
            tokens, fits = sub_tokens, sub_fits
        else:
            tokens[cand_rows], fits[cand_rows] = sub_tokens, sub_fits
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


def _launch_sample_cuda(logits, temperature, top_k, top_p, min_p, uniforms, banned=None):
    import ctypes

    from r4b_fast import _cuda_build

    codes = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
    if logits.dtype not in codes:
        logits = logits.float()
    logits = logits.contiguous()
    B, V = logits.shape
    outs = [torch.empty(B, dtype=dt, device=logits.device)
            for dt in (torch.int64, torch.float32, torch.float32, torch.float32)]  # tokens, logprobs, max, log_z
    params = [temperature.float().contiguous(), top_k.to(torch.int64).contiguous(), top_p.float().contiguous(),
              min_p.float().contiguous(), uniforms.float().contiguous()]  # fmt: skip
    nban = 0 if banned is None else banned.shape[1]
    ban = outs[0] if nban == 0 else banned.to(torch.int32).contiguous()  # nban = 0: never read
    lib = _cuda_build.load_library("sampling")
    lib.r4b_sample.restype = ctypes.c_int

    def ptr(t):
        return ctypes.c_void_p(t.data_ptr())

    with device_guard(logits):
        stream = torch.cuda.current_stream(logits.device).cuda_stream
        err = lib.r4b_sample(
            ptr(logits), ctypes.c_int(codes[logits.dtype]), ctypes.c_int64(B), ctypes.c_int64(V),
            ctypes.c_int64(logits.stride(0)), *[ptr(p) for p in params], ptr(ban), ctypes.c_int(nban),
            *[ptr(o) for o in outs],
            ctypes.c_void_p(stream),
        )  # fmt: skip
    if err != 0:
        lib.r4b_cuda_error_string.restype = ctypes.c_char_p
        raise RuntimeError(f"sample cuda kernel failed: {lib.r4b_cuda_error_string(err).decode()}")
    return tuple(outs)


# ----------------------------------------------------------------------------------------------------------------
# torch.library op
# ----------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("r4b_fast::sample", mutates_args=())
def _sample_op(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    uniforms: torch.Tensor,
    candidates: int,
    backend: str,
    banned: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(tokens [B] int64, logprobs [B] fp32, row_max [B] fp32 = max of the logits, log_z [B] fp32 =
    log sum exp((logits - row_max) / T))``: ``log_softmax(logits / T)[i] = (logits[i] - row_max) / T - log_z``.
    ``banned``: None or ``[B, n]`` int64 ids in ``[-1, V)`` that cannot be sampled (-1: none); row_max, log_z and
    the log-probs stay those of the unbanned row."""
    if backend == "triton":
        from r4b_fast.kernels.sampling import launch_sample

        return launch_sample(logits.contiguous(), temperature, top_k, top_p, min_p, uniforms, banned)
    if backend == "cuda":
        return _launch_sample_cuda(logits, temperature, top_k, top_p, min_p, uniforms, banned)
    return _sample_torch(logits, temperature, top_k, top_p, min_p, uniforms, candidates, banned)


@_sample_op.register_fake
def _(logits, temperature, top_k, top_p, min_p, uniforms, candidates, backend, banned=None):
    B = logits.shape[0]
    return (logits.new_empty((B,), dtype=torch.int64), logits.new_empty((B,), dtype=torch.float32),
            logits.new_empty((B,), dtype=torch.float32), logits.new_empty((B,), dtype=torch.float32))  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------------------
def _per_row(name, value, B, device, dtype, lo, hi, lo_open=False) -> torch.Tensor:
    """A scalar or ``[B]`` tensor parameter as a ``[B]`` tensor; Python scalars are range-checked here (no sync)."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            value = value.reshape(1).expand(B)
        if value.shape != (B,):
            raise ValueError(f"{name}: expected a scalar or a [B] = ({B},) tensor, got shape {tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"{name}: on device {value.device}, but logits are on {device}")
        if dtype == torch.int64 and (value.dtype.is_floating_point or value.dtype == torch.bool):
            raise TypeError(f"{name}: expected an integer tensor, got dtype {value.dtype}")
        return value.to(dtype)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number or a [B] tensor, got {type(value).__name__}")
    if dtype == torch.int64 and not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {value!r}")
    if not math.isfinite(value) or value < lo or value > hi or (lo_open and value == lo):
        interval = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise ValueError(f"{name}: expected a value in {interval}, got {value!r}")
    return torch.full((B,), value, dtype=dtype, device=device)


def _check_tensor_values(logits, params) -> None:
    """Range checks of tensor parameters and logits in one host sync."""
    temperature, top_k, top_p, min_p = params
    checks = torch.stack([
        (torch.isnan(logits) | (logits == float("inf"))).sum(),
        (logits == float("-inf")).all(1).sum(),
        (~torch.isfinite(temperature) | (temperature < 0)).sum(),
        (top_k < 0).sum(),
        (~(top_p > 0) | (top_p > 1)).sum(),
        (~(min_p >= 0) | (min_p > 1)).sum(),
    ]).tolist()  # fmt: skip
    names = [
        "logits: {} NaN or +inf value(s); mask tokens with -inf, never NaN",
        "logits: {} row(s) are entirely -inf: nothing can be sampled",
        "temperature: {} value(s) negative or non-finite (0 means greedy)",
        "top_k: {} value(s) < 0 (0 means off)",
        "top_p: {} value(s) outside (0, 1]",
        "min_p: {} value(s) outside [0, 1]",
    ]
    for n, msg in zip(checks, names):
        if n:
            raise ValueError(msg.format(n))


def _prepare(logits, temperature, top_k, top_p, min_p, check_values):
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits: expected a torch.Tensor, got {type(logits).__name__}")
    if not logits.dtype.is_floating_point:
        raise TypeError(f"logits: expected a floating-point tensor, got dtype {logits.dtype}")
    if logits.dim() != 2 or logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"logits: expected a non-empty [B, V] tensor, got shape {tuple(logits.shape)}")
    B, dev = logits.shape[0], logits.device
    params = (
        _per_row("temperature", temperature, B, dev, torch.float32, 0.0, math.inf),
        _per_row("top_k", top_k, B, dev, torch.int64, 0, 2**62),
        _per_row("top_p", top_p, B, dev, torch.float32, 0.0, 1.0, lo_open=True),
        _per_row("min_p", min_p, B, dev, torch.float32, 0.0, 1.0),
    )
    if check_values:
        _check_tensor_values(logits, params)
    return params


def _uniforms(B, device, generator, uniforms=None) -> torch.Tensor:
    if uniforms is not None:
        if generator is not None:
            raise ValueError("uniforms: give either uniforms or generator, not both")
        if not isinstance(uniforms, torch.Tensor) or not uniforms.dtype.is_floating_point:
            got = uniforms.dtype if isinstance(uniforms, torch.Tensor) else type(uniforms).__name__
            raise TypeError(f"uniforms: expected a float tensor, got {got}")
        if tuple(uniforms.shape) != (B,):
            raise ValueError(f"uniforms: expected shape ({B},), got {tuple(uniforms.shape)}")
        if uniforms.device != torch.device(device):
            raise ValueError(f"uniforms: on device {uniforms.device}, but logits are on {device}")
        return uniforms.float()
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
    if generator is not None and generator.device != torch.device(device) and torch.device(device).type != "cpu":
        u = torch.rand(B, generator=generator, device=generator.device).to(device)
    else:
        u = torch.rand(B, generator=generator, device=device)
    return u


def _sample_impl(logits, temperature, top_k, top_p, min_p, generator, backend, check_values, uniforms=None,
                 banned=None):
    params = _prepare(logits, temperature, top_k, top_p, min_p, check_values)
    chosen = resolve_backend(backend, logits.device, OP_BACKENDS, PREFERRED, "sample")
    u = _uniforms(logits.shape[0], logits.device, generator, uniforms)
    if uniforms is not None and check_values and bool(((u < 0) | (u >= 1) | u.isnan()).any()):
        raise ValueError("uniforms: values must lie in [0, 1)")
    # one top-k for the whole batch: k + 1 candidates hold its filtered set (the extra one detects boundary ties)
    candidates = min(CANDIDATES, top_k + 1) if isinstance(top_k, int) and top_k > 0 else CANDIDATES
    tokens, logprobs, row_max, log_z = _sample_op(logits.detach(), *params, u, candidates, chosen, banned)
    return tokens, logprobs, row_max, log_z, params[0]


def sample(
    logits: torch.Tensor,
    *,
    temperature: float | torch.Tensor = 1.0,
    top_k: int | torch.Tensor = 0,
    top_p: float | torch.Tensor = 1.0,
    min_p: float | torch.Tensor = 0.0,
    generator: torch.Generator | None = None,
    backend: str | None = None,
    check_values: bool = True,
    uniforms: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row with temperature, top-k, top-p and min-p, without sorting the vocabulary.

    Args:
        logits: ``[B, V]`` float32/bfloat16/float16/float64; ``-inf`` masks a token; NaN/+inf are errors.
        temperature: float or ``[B]`` tensor, ``>= 0``; 0 means greedy for that row.
        top_k: int or ``[B]`` integer tensor, ``>= 0``; 0 means off. Ties at the k-th value are kept.
        top_p: float or ``[B]`` tensor in ``(0, 1]``; 1 means off.
        min_p: float or ``[B]`` tensor in ``[0, 1]``; keep ``p >= min_p * max p``; 0 means off.
        generator: the source of the one uniform per row (``torch.rand(B)``); same state -> same tokens.
        backend: ``"torch"``, ``"triton"`` or ``"cuda"``; default ``$R4B_FAST_BACKEND`` or the best for the device.
        check_values: check tensor parameters and logits for bad values (one host sync). Python scalars are
            always checked, without a sync; pass False in a hot loop on GPU.
        uniforms: ``[B]`` float noise in ``[0, 1)``, one per row, used instead of drawing it from ``generator``:
            data-parallel ranks that each sample a slice of one global batch draw the global batch's
            ``torch.rand(B_global, generator=g)`` and pass their slice, and then sample exactly what one process
            sampling the whole batch would.

    Returns:
        ``(tokens [B] int64, logprobs [B] float32)``: ``logprobs = log_softmax(logits / T)[token]`` under the
        temperature-scaled **unfiltered** distribution (greedy rows: ``T = 1``), as TRL/vLLM use for old log-probs.
        With ``check_values=False``, a row with no finite logit returns token 0 (the first maximum) and a NaN
        log-prob (see the module docstring); tokens are always in ``[0, V)``.

    Example:
        >>> import torch
        >>> from r4b_fast.ops.sampling import sample
        >>> logits = torch.tensor([[0.0, 5.0, 1.0], [2.0, 0.0, 0.0]])
        >>> tokens, logprobs = sample(logits, temperature=torch.tensor([0.0, 1.0]), top_k=1)
        >>> tokens.tolist()
        [1, 0]
    """
    tokens, logprobs, *_ = _sample_impl(logits, temperature, top_k, top_p, min_p, generator, backend, check_values,
                                          uniforms)
    return tokens, logprobs


# ----------------------------------------------------------------------------------------------------------------
# Mode control
# ----------------------------------------------------------------------------------------------------------------
PHASE_BEFORE, PHASE_THINK, PHASE_AFTER = 0, 1, 2


@dataclasses.dataclass
class ModeState:
    """Per-row decoding state for R-4B modes, all on the logits' device (advanced in place, no host sync).

    mode [B] int64 (``r4b_fast.Mode``); queue [B, Q] int64 forced tokens with queue_len [B] and queue_pos [B];
    close_ids [C] int64 (emitted when a thinking row reaches its budget) with close_pos [B] (-1: not closing);
    budget [B] int64 (-1: unlimited) and think_count [B] (sampled tokens inside the think block); phase [B]
    (0 before a think block, 1 inside, 2 after); opened / closed / finished [B] bool; and the token ids
    think_start_id, think_end_id (tracked for every row, auto included), eos_id, pad_id.
    Strict modes: min_end [B] int64 (a THINK row cannot sample ``think_end_id`` nor ``eos_id`` inside its think
    block while ``think_count < min_end``: ``min_think_tokens`` plus the close sequence's tokens before
    ``think_end_id``; 0: off) and no_reopen (after a closed block, ``think_start_id`` / ``think_end_id`` cannot be
    sampled); strict: either is on for some row (else the plain sampling kernels run).
    """

    mode: torch.Tensor
    queue: torch.Tensor
    queue_len: torch.Tensor
    queue_pos: torch.Tensor
    close_ids: torch.Tensor
    close_pos: torch.Tensor
    budget: torch.Tensor
    think_count: torch.Tensor
    phase: torch.Tensor
    opened: torch.Tensor
    closed: torch.Tensor
    finished: torch.Tensor
    think_start_id: int
    think_end_id: int
    eos_id: int
    pad_id: int
    max_token_id: int = 0  # the largest id the state can emit (checked against V, no sync)
    min_end: torch.Tensor | None = None
    no_reopen: bool = False
    strict: bool = False

    @classmethod
    def create(
        cls,
        modes: torch.Tensor | Sequence[int],
        think_open_ids: Sequence[int],
        no_think_ids: Sequence[int],
        think_close_ids: Sequence[int],
        *,
        budget: int | torch.Tensor | None = None,
        eos_id: int,
        pad_id: int,
        auto_ids: Sequence[int] = (),
        think_start_id: int | None = None,
        think_end_id: int | None = None,
        device: torch.device | str | None = None,
        min_think_tokens: int | torch.Tensor | Sequence[int] = 0,
        no_reopen: bool = False,
    ) -> ModeState:
        """Build the state for ``B`` rows.

        Args:
            modes: ``[B]`` ``r4b_fast.Mode`` per row: THINK rows first emit ``think_open_ids`` (the tokenizer's ids
                of ``"<think>\\n"``), NO_THINK rows ``no_think_ids`` (``"<think>\\n\\n</think>\\n\\n"``), AUTO rows
                ``auto_ids`` (default none: untouched).
            think_close_ids: emitted when a row inside a think block reaches its budget (``"\\n</think>\\n\\n"``).
            budget: max sampled tokens inside a think block (int or ``[B]``, -1 / None = unlimited).
            eos_id / pad_id: a row finishes after emitting ``eos_id``, then emits ``pad_id``.
            think_start_id / think_end_id: the single tokens that open / close a think block (phase tracking);
                default ``think_open_ids[0]`` and the first id of ``think_close_ids`` not in ``think_open_ids``.
            device: default ``modes``' device (CPU for lists).
            min_think_tokens: int or ``[B]`` (tensor or sequence), >= 0, applied to THINK rows only (0: off): inside
                the think block, ``think_end_id`` and ``eos_id`` cannot be sampled before ``k`` tokens have been
                sampled after the forced prefix, not counting the close sequence's tokens before ``think_end_id``
                (the ``"\n"`` of ``"\n</think>\n\n"``): the close sequence can neither start (when it starts with
                ``think_end_id``) nor be completed early, and the rollout cannot end inside the block. At most the
                row's ``budget`` (the budget still forces the close).
            no_reopen: once a row's think block is closed (by the NO_THINK prefix, the model, or the budget),
                ``think_start_id`` and ``think_end_id`` cannot be sampled: no think tag after the block. Every mode.
        """
        if isinstance(modes, torch.Tensor):
            if modes.dtype.is_floating_point or modes.dtype == torch.bool:
                raise TypeError(f"modes: expected an integer tensor, got dtype {modes.dtype}")
            device = modes.device if device is None else torch.device(device)
            mode = modes.to(device=device, dtype=torch.int64)
            mode_list = mode.tolist()  # setup time, not the hot loop
        else:
            if isinstance(modes, (str, bytes)) or not isinstance(modes, Sequence):
                raise ValueError(f"modes: expected a [B] sequence or tensor of modes, got {type(modes).__name__}")
            # exact integers only: int() would read 1.5 as THINK and "0" as NO_THINK
            wrong = [m for m in modes if isinstance(m, bool) or not isinstance(m, numbers.Integral)]
            if wrong:
                raise ValueError(f"modes: expected integer modes in {{NO_THINK: 0, THINK: 1, AUTO: 2}}, got "
                                 f"{len(wrong)} non-integer value(s), e.g. {wrong[0]!r}")  # fmt: skip
            mode_list = [int(m) for m in modes]
            device = torch.device("cpu") if device is None else torch.device(device)
            mode = torch.tensor(mode_list, dtype=torch.int64, device=device)
        if mode.dim() != 1 or mode.numel() == 0:
            raise ValueError(f"modes: expected a non-empty [B] sequence, got shape {tuple(mode.shape)}")
        bad = [m for m in mode_list if m not in tuple(int(x) for x in Mode)]
        if bad:
            raise ValueError(f"modes: {len(bad)} value(s) outside {{NO_THINK: 0, THINK: 1, AUTO: 2}}, e.g. {bad[0]}")
        seqs = {}
        named = (("think_open_ids", think_open_ids, False), ("no_think_ids", no_think_ids, False),
                 ("think_close_ids", think_close_ids, False), ("auto_ids", auto_ids, True))  # fmt: skip
        for name, ids, may_be_empty in named:
            ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
            if not may_be_empty and len(ids) == 0:
                raise ValueError(f"{name}: empty forced sequence; pass the tokenizer's ids of the mode's text")
            if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in ids):
                raise ValueError(f"{name}: expected non-negative int token ids, got {ids}")
            seqs[name] = ids
        for name, v in (("eos_id", eos_id), ("pad_id", pad_id)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}: expected a non-negative int token id, got {v!r}")
        B = len(mode_list)
        prefix = {int(Mode.THINK): seqs["think_open_ids"], int(Mode.NO_THINK): seqs["no_think_ids"],
                  int(Mode.AUTO): seqs["auto_ids"]}  # fmt: skip
        Q = max(1, max(len(prefix[m]) for m in set(mode_list)))
        queue = torch.full((B, Q), pad_id, dtype=torch.int64)
        qlen = torch.zeros(B, dtype=torch.int64)
        for i, m in enumerate(mode_list):
            queue[i, : len(prefix[m])] = torch.tensor(prefix[m], dtype=torch.int64)
            qlen[i] = len(prefix[m])
        if budget is None:
            budget_t = torch.full((B,), -1, dtype=torch.int64, device=device)
        elif isinstance(budget, torch.Tensor):
            if budget.shape not in ((), (B,)):
                raise ValueError(f"budget: expected an int or a [B] = ({B},) tensor, got shape {tuple(budget.shape)}")
            budget_t = budget.to(device=device, dtype=torch.int64).expand(B).clone()
        elif isinstance(budget, int) and not isinstance(budget, bool) and budget >= -1:
            budget_t = torch.full((B,), budget, dtype=torch.int64, device=device)
        else:
            raise ValueError(f"budget: expected an int >= -1 (or None: unlimited), got {budget!r}")
        zeros = torch.zeros(B, dtype=torch.int64, device=device)
        false = torch.zeros(B, dtype=torch.bool, device=device)
        start = seqs["think_open_ids"][0] if think_start_id is None else int(think_start_id)
        end = _default_end_id(seqs["think_open_ids"], seqs["think_close_ids"]) if think_end_id is None else int(
            think_end_id)  # fmt: skip
        if not isinstance(no_reopen, bool):
            raise ValueError(f"no_reopen: expected a bool, got {no_reopen!r}")
        min_think = _min_think_list(min_think_tokens, B)
        is_think = [m == int(Mode.THINK) for m in mode_list]
        budgets = budget_t.tolist()  # setup time
        for i in range(B):
            if is_think[i] and 0 <= budgets[i] < min_think[i]:
                raise ValueError(f"min_think_tokens: {min_think[i]} for row {i}, above its thinking budget "
                                 f"{budgets[i]} (the budget closes the block first)")  # fmt: skip
        # </think> also waits for the close sequence's tokens before it (sampled tokens of the block too)
        offset = seqs["think_close_ids"].index(end) if end in seqs["think_close_ids"] else 0
        min_end = [k + offset if t and k > 0 else 0 for k, t in zip(min_think, is_think)]
        return cls(
            mode=mode, queue=queue.to(device), queue_len=qlen.to(device), queue_pos=zeros.clone(),
            close_ids=torch.tensor(seqs["think_close_ids"], dtype=torch.int64, device=device),
            close_pos=torch.full((B,), -1, dtype=torch.int64, device=device), budget=budget_t,
            think_count=zeros.clone(), phase=zeros.clone(), opened=false.clone(), closed=false.clone(),
            finished=false.clone(), think_start_id=start, think_end_id=end, eos_id=eos_id, pad_id=pad_id,
            max_token_id=max([eos_id, pad_id, start, end] + [t for ids in seqs.values() for t in ids]),
            min_end=torch.tensor(min_end, dtype=torch.int64, device=device), no_reopen=no_reopen,
            strict=no_reopen or any(k > 0 for k in min_end),
        )  # fmt: skip

    @property
    def batch_size(self) -> int:
        return self.mode.shape[0]


def _min_think_list(value, B: int) -> list[int]:
    """``min_think_tokens`` as B non-negative Python ints (setup time)."""
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dtype == torch.bool:
            raise ValueError(f"min_think_tokens: expected an integer tensor, got dtype {value.dtype}")
        if value.shape not in ((), (B,)):
            raise ValueError(f"min_think_tokens: expected an int or [B] = ({B},) values, got shape "
                             f"{tuple(value.shape)}")  # fmt: skip
        vals = value.reshape(-1).tolist() * (B if value.dim() == 0 else 1)
    elif isinstance(value, int) and not isinstance(value, bool):
        vals = [value] * B
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        vals = list(value)
        if len(vals) != B:
            raise ValueError(f"min_think_tokens: {len(vals)} values for {B} rows")
        if any(isinstance(v, bool) or not isinstance(v, int) for v in vals):
            raise ValueError(f"min_think_tokens: expected ints, got {vals}")
    else:
        raise ValueError(f"min_think_tokens: expected an int >= 0 or [B] ints, got {value!r}")
    if any(v < 0 for v in vals):
        raise ValueError(f"min_think_tokens: expected values >= 0, got {min(vals)}")
    return [int(v) for v in vals]


class ModeStep(NamedTuple):
    """One step of :func:`sample_with_modes`, all ``[B]``.

    tokens: int64 emitted tokens (pad for rows finished before this step); logprobs: float32
    ``log_softmax(logits / T)[token]`` (0 for pad); forced: bool, the token came from a forced sequence;
    active: bool, the row emitted a real token this step (it was not finished before it).
    """

    tokens: torch.Tensor
    logprobs: torch.Tensor
    forced: torch.Tensor
    active: torch.Tensor


def sample_with_modes(
    logits: torch.Tensor,
    state: ModeState,
    *,
    temperature: float | torch.Tensor = 1.0,
    top_k: int | torch.Tensor = 0,
    top_p: float | torch.Tensor = 1.0,
    min_p: float | torch.Tensor = 0.0,
    generator: torch.Generator | None = None,
    backend: str | None = None,
    check_values: bool = False,
    uniforms: torch.Tensor | None = None,
) -> ModeStep:
    """Sample every row, apply the R-4B mode constraints and advance ``state`` in place, with no host sync.

    Per row: a finished row emits ``pad_id``; a row with forced tokens left emits the next one (its mode's prefix,
    or the close sequence); a row inside a think block whose sampled-token count reached its budget starts emitting
    ``think_close_ids``; otherwise the freely sampled token (so AUTO rows are exactly :func:`sample`'s tokens for the
    same generator, unless ``no_reopen`` bans a think tag after their block). The row's phase follows
    ``think_start_id`` / ``think_end_id``; ``eos_id`` finishes it. Strict modes (``ModeState.create``'s
    ``min_think_tokens`` / ``no_reopen``): the banned ids of each row are removed inside the sampling kernel before
    the filters (as a logits processor setting them to ``-inf``); log-probs stay those of the unbanned
    distribution (what the training forward recomputes).
    Sampling arguments as in :func:`sample` (``check_values`` defaults to False here: no sync in the loop).

    Example:
        >>> import torch
        >>> from r4b_fast import Mode
        >>> from r4b_fast.ops.sampling import ModeState, sample_with_modes
        >>> st = ModeState.create([Mode.THINK, Mode.NO_THINK], [7, 1], [7, 2, 8, 2], [1, 8, 2], eos_id=9, pad_id=0)
        >>> logits = torch.zeros(2, 10)
        >>> [sample_with_modes(logits, st).tokens.tolist() for _ in range(2)]
        [[7, 7], [1, 2]]
    """
    if not isinstance(state, ModeState):
        raise TypeError(f"state: expected a ModeState, got {type(state).__name__}")
    if isinstance(logits, torch.Tensor) and logits.dim() == 2 and logits.shape[0] != state.batch_size:
        raise ValueError(f"logits: batch of {logits.shape[0]} rows, but state has {state.batch_size}")
    if isinstance(logits, torch.Tensor) and logits.device != state.mode.device:
        raise ValueError(f"logits: on device {logits.device}, but state is on {state.mode.device}")
    if isinstance(logits, torch.Tensor) and logits.dim() == 2 and state.max_token_id >= logits.shape[1]:
        raise ValueError(f"logits: vocabulary of {logits.shape[1]} tokens, but the state's forced / eos / pad ids "
                         f"go up to {state.max_token_id}")  # fmt: skip
    s = state
    banned = _mode_bans(s) if s.strict else None
    sampled, logprobs, row_max, log_z, temp = _sample_impl(logits, temperature, top_k, top_p, min_p, generator, backend,
                                                check_values, uniforms, banned)  # fmt: skip
    done_before = s.finished
    active = ~done_before
    in_queue = s.queue_pos < s.queue_len
    start_close = active & ~in_queue & (s.close_pos < 0) & (s.phase == PHASE_THINK) & (s.budget >= 0) & (
        s.think_count >= s.budget)  # fmt: skip
    close_pos = torch.where(start_close, 0, s.close_pos)
    closing = active & ~in_queue & (close_pos >= 0)
    q_tok = s.queue.gather(1, s.queue_pos.clamp(max=s.queue.shape[1] - 1)[:, None])[:, 0]
    c_tok = s.close_ids[close_pos.clamp(0, s.close_ids.numel() - 1)]
    forced = active & (in_queue | closing)
    tokens = torch.where(in_queue, q_tok, torch.where(closing, c_tok, sampled))
    tokens = torch.where(active, tokens, s.pad_id)
    # log-probs of forced tokens under the same (temperature-scaled, unfiltered) distribution
    _, inv, _ = _sanitise(temp, temp)
    forced_lp = (logits.gather(1, tokens[:, None])[:, 0].float() - row_max) * inv - log_z
    logprobs = torch.where(forced, forced_lp, logprobs)
    logprobs = torch.where(active, logprobs, 0.0)
    # advance
    s.think_count += (active & ~forced & (s.phase == PHASE_THINK)).to(torch.int64)
    s.queue_pos += (active & in_queue).to(torch.int64)
    nxt = close_pos + 1
    close_done = closing & (nxt >= s.close_ids.numel())  # the close sequence ends the think block
    s.close_pos.copy_(torch.where(closing, torch.where(close_done, -1, nxt), close_pos))
    opens = active & (tokens == s.think_start_id) & ~s.opened
    closes = active & (s.phase == PHASE_THINK) & ((tokens == s.think_end_id) | close_done)
    s.phase.copy_(torch.where(opens, PHASE_THINK, torch.where(closes, PHASE_AFTER, s.phase)))
    s.opened |= opens
    s.closed |= closes
    s.finished |= active & (tokens == s.eos_id)
    return ModeStep(tokens, logprobs, forced, active)


def _mode_bans(s: ModeState) -> torch.Tensor:
    """``[B, 3]`` int64 ids the next sampled token of each row must not be (-1: none), on the device, no sync
    (3 columns: the compiled variant ``kernels.sampling.MODE_BANS``): ``think_start_id`` / ``think_end_id`` after
    a closed block (no_reopen); ``think_end_id`` / ``eos_id`` inside a THINK row's block before ``min_end``
    sampled tokens."""
    short = (s.mode == int(Mode.THINK)) & (s.phase == PHASE_THINK) & (s.think_count < s.min_end)
    reopen = s.closed & s.no_reopen
    none = torch.full_like(s.think_count, -1)
    return torch.stack([torch.where(reopen, s.think_start_id, none), torch.where(reopen | short, s.think_end_id, none),
                        torch.where(short, s.eos_id, none)], 1)  # fmt: skip
