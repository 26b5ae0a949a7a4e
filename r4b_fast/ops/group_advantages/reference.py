"""Reference group advantages: a plain loop over groups in float64, written for reading (the way verl and TRL write
it); the oracle of the tests and the eager baseline of the benchmark."""

from __future__ import annotations

import math

import torch

from r4b_fast.modes import NUM_MODES
from r4b_fast.ops.group_advantages.common import NUM_STATS, _effective_scale


def group_advantages_ref(
    rewards: torch.Tensor,
    group_index: torch.Tensor,
    num_groups: int,
    modes: torch.Tensor | None = None,
    *,
    estimator: str = "grpo",
    scale: str | None = None,
    unbiased: bool = True,
    eps: float = 1e-6,
    nonfinite: str = "raise",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loop reference of :func:`group_advantages`: returns ``(advantages [N] float64, stats [G, 10] float64)``.

    Expects validated input (see the public function); non-finite rewards are excluded from their group.
    """
    scale = _effective_scale(estimator, scale)
    r = [float(x) for x in rewards.double().tolist()]
    gidx = [int(x) for x in group_index.tolist()]
    mode_list = [int(x) for x in modes.tolist()] if modes is not None else None
    members: list[list[int]] = [[] for _ in range(num_groups)]
    for i, g in enumerate(gidx):
        members[g].append(i)
    finite = [math.isfinite(x) for x in r]

    def mean_std(values: list[float]) -> tuple[float, float]:
        n = len(values)
        if n == 0:
            return 0.0, 0.0
        mean = math.fsum(values) / n  # exactly rounded sums: the oracle should be the most accurate party
        if n == 1:
            return mean, 0.0
        m2 = math.fsum((v - mean) ** 2 for v in values)
        return mean, math.sqrt(m2 / (n - 1 if unbiased else n))

    batch_std = mean_std([x for x, ok in zip(r, finite) if ok])[1]
    adv = [0.0] * len(r)
    stats = torch.zeros(num_groups, NUM_STATS, dtype=torch.float64)
    for g, idx in enumerate(members):
        vals = [r[i] for i in idx if finite[i]]
        n = len(vals)
        mean, std = mean_std(vals)
        signal = n >= 2 and max(vals) > min(vals)
        stats[g, 0:4] = torch.tensor([n, mean, std, 0.0 if signal else 1.0], dtype=torch.float64)
        if mode_list is not None:
            for i in idx:
                if finite[i]:
                    stats[g, 4 + mode_list[i]] += 1
                    stats[g, 4 + NUM_MODES + mode_list[i]] += r[i]
        if not signal:
            continue
        for i in idx:
            if not finite[i]:
                continue
            if estimator == "rloo":
                a = r[i] - (math.fsum(vals) - r[i]) / (n - 1)
            else:
                a = r[i] - mean
            if scale == "group":
                a /= std + eps
            elif scale == "batch":
                a /= batch_std + eps
            adv[i] = a
    return torch.tensor(adv, dtype=torch.float64), stats
