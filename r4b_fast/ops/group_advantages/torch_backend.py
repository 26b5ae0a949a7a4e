"""The torch backend of :func:`~r4b_fast.ops.group_advantages.group_advantages` (the CPU path): vectorised segment
reductions (a ``[G, S]`` view for fixed contiguous groups, ``index_add_`` / ``scatter_reduce_`` for ragged ones), no
loop over groups."""

from __future__ import annotations

import torch

from r4b_fast.modes import NUM_MODES
from r4b_fast.ops.group_advantages.common import COMPUTE_DTYPE, _output_dtype, batch_std


class _Segments:
    """Per-group reductions: a [G, S] view for fixed contiguous groups (cheapest), index ops for ragged ones."""

    def __init__(self, group_index: torch.Tensor | None, num_groups: int, group_size: int, device: torch.device):
        self.index, self.G, self.S, self.device = group_index, num_groups, group_size, device

    def sum(self, x: torch.Tensor) -> torch.Tensor:  # [N, ...] -> [G, ...]
        if self.index is None:
            return x.view(self.G, self.S, *x.shape[1:]).sum(1)
        return x.new_zeros(self.G, *x.shape[1:]).index_add_(0, self.index, x)

    def reduce(self, x: torch.Tensor, how: str, init: float) -> torch.Tensor:  # "amax" / "amin"
        if self.index is None:
            return x.view(self.G, self.S).amax(1) if how == "amax" else x.view(self.G, self.S).amin(1)
        return x.new_full((self.G,), init).scatter_reduce_(0, self.index, x, how)

    def group_ids(self) -> torch.Tensor:  # [N] int64
        if self.index is None:
            return torch.arange(self.G * self.S, device=self.device) // self.S
        return self.index

    def expand(self, per_group: torch.Tensor) -> torch.Tensor:  # [G] -> [N]
        if self.index is None:
            return per_group.repeat_interleave(self.S)
        return per_group[self.index]


def _group_advantages_torch(
    rewards, group_index, modes, num_groups, group_size, estimator, scale, unbiased, eps
) -> tuple[torch.Tensor, torch.Tensor]:
    seg = _Segments(group_index, num_groups, group_size, rewards.device)
    r = rewards.to(COMPUTE_DTYPE)
    valid = torch.isfinite(r)
    w = valid.to(COMPUTE_DTYPE)
    rv = torch.where(valid, r, 0)
    count = seg.sum(w)
    mean = seg.sum(rv) / count.clamp_min(1)
    dev = torch.where(valid, rv - seg.expand(mean), 0)  # second pass: no E[x^2] - E[x]^2 cancellation
    m2 = seg.sum(dev * dev)
    std = torch.where(count > 1, (m2 / (count - 1 if unbiased else count).clamp_min(1)).sqrt(), 0)
    inf = float("inf")
    signal = (count >= 2) & (
        seg.reduce(torch.where(valid, r, -inf), "amax", -inf) > seg.reduce(torch.where(valid, r, inf), "amin", inf)
    )
    factor = count / (count - 1).clamp_min(1) if estimator == "rloo" else torch.ones_like(count)
    # r_i - mean(others) = n/(n-1) (r_i - mean): RLOO without the (sum - r_i) cancellation
    if scale == "group":
        factor = factor / (std + eps)
    elif scale == "batch":
        factor = factor / (batch_std(r, valid, unbiased) + eps)
    factor = torch.where(signal, factor, 0)  # select, not multiply: std + eps may be 0 in a zero-signal group
    adv = dev * seg.expand(factor)
    columns = [torch.stack([count, mean, std, (~signal).to(COMPUTE_DTYPE)], 1)]
    if modes is not None:  # per (group, mode) slot: a weighted bincount, no [N, modes] one-hot
        slot = seg.group_ids() * NUM_MODES + modes
        size = num_groups * NUM_MODES
        columns += [torch.bincount(slot, weights, size).view(-1, NUM_MODES) for weights in (w, rv)]
    else:
        columns.append(r.new_zeros(num_groups, 2 * NUM_MODES))
    return adv.to(_output_dtype(rewards.dtype)), torch.cat(columns, 1)
