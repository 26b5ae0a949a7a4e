"""group_advantages: the verl-style eager loop and TRL's reshape vs r4b_fast's backends, BPO groups of 2g = 16."""

from collections import defaultdict

import pytest
import torch
from harness import DEVICE, QUICK, run

import r4b_fast

GROUP = 16  # g = 8 thinking + 8 non-thinking rollouts per prompt


def verl_style_loop(rewards, group_ids, eps=1e-6):
    """compute_grpo_outcome_advantage as verl writes it: a dict of lists, a Python loop per rollout and group."""
    id2score = defaultdict(list)
    id2mean, id2std = {}, {}
    scores = rewards.clone()
    for i in range(scores.shape[0]):
        id2score[group_ids[i]].append(scores[i])
    for idx in id2score:
        if len(id2score[idx]) == 1:
            id2mean[idx], id2std[idx] = torch.tensor(0.0), torch.tensor(1.0)
        else:
            stacked = torch.stack(id2score[idx])
            id2mean[idx], id2std[idx] = torch.mean(stacked), torch.std(stacked)
    for i in range(scores.shape[0]):
        scores[i] = (scores[i] - id2mean[group_ids[i]]) / (id2std[group_ids[i]] + eps)
    return scores


def trl_reshape(rewards, eps=1e-4):
    """TRL's GRPOTrainer: view as [groups, g], mean/std per row, repeat_interleave (fixed contiguous groups only)."""
    grouped = rewards.view(-1, GROUP)
    mean = grouped.mean(1).repeat_interleave(GROUP)
    std = grouped.std(1).repeat_interleave(GROUP)
    return (rewards - mean) / (std + eps)


def _inputs(n):
    gen = torch.Generator().manual_seed(n)
    rewards = torch.randint(0, 2, (n,), generator=gen).float().to(DEVICE)
    modes = (torch.arange(n) // (GROUP // 2) % 2).to(DEVICE)
    return rewards, modes


SIZES = [64, 4096] if QUICK else [64, 4096, 262144]


@pytest.mark.parametrize("n", SIZES)
def test_eager_loop(benchmark, n):
    benchmark.group = f"group_advantages N={n}"
    rewards, _ = _inputs(n)
    group_ids = (torch.arange(n) // GROUP).tolist()
    run(benchmark, lambda: verl_style_loop(rewards, group_ids), impl="eager loop (verl)", baseline=True,
        budget_s=3.0, memory=n <= 4096 or DEVICE == "cuda", n=n)


@pytest.mark.parametrize("n", SIZES)
def test_trl_reshape(benchmark, n):
    benchmark.group = f"group_advantages N={n}"
    rewards, _ = _inputs(n)
    run(benchmark, lambda: trl_reshape(rewards), impl="TRL reshape (no mode stats)", n=n)


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("n", SIZES)
def test_r4b_fast(benchmark, n, backend):
    reasons = r4b_fast.not_supported_reasons(backend, DEVICE)
    if reasons:
        pytest.skip("; ".join(reasons))
    if backend == "triton" and DEVICE == "cpu" and n > 64:
        pytest.skip("the Triton interpreter takes seconds to minutes at this size on CPU; its timing means nothing")
    benchmark.group = f"group_advantages N={n}"
    rewards, modes = _inputs(n)
    fn = lambda: r4b_fast.group_advantages(rewards, GROUP, modes=modes, estimator="bpo", backend=backend)  # noqa: E731
    run(benchmark, fn, impl=backend, n=n)
