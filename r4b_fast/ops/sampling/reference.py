"""Reference sampling: sort-based filtering + ``torch.multinomial``, and the host-side mode processor.

The transformers/vLLM pattern, eager fp32/fp64: the oracle of the frequency tests and the benchmark baseline.
``ModeProcessorRef`` is the matching host-side Python loop per row per step (forced prefixes, thinking budget, strict
modes), the oracle of :func:`r4b_fast.ops.sampling.sample_with_modes`.
"""

from __future__ import annotations

import torch

from r4b_fast.modes import Mode
from r4b_fast.ops.sampling.mode_state import _default_end_id


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


