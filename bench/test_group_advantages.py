"""group_advantages: the verl-style eager loop and TRL's reshape vs r4b_fast's backends, BPO groups of 2g = 16.

On a GPU: N = 262144 rollouts in fixed groups of 16 and in ragged groups of 8-24 (mean 16), torch / triton / cuda
backends on the GPU beside the baselines; the verl loop runs on CPU tensors there, as verl's driver computes
advantages on the CPU (one Python step per rollout on GPU tensors would launch ~10^6 kernels). On CPU: fixed groups,
N = 64 / 4096 / 262144 (64 / 4096 quick)."""

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


def _ragged_sizes(n):
    """Group sizes of 8-24 rollouts (mean 16) summing to ``n``, fixed by ``n``."""
    gen = torch.Generator().manual_seed(n + 1)
    sizes = torch.randint(8, 25, (n // 8,), generator=gen)
    sizes = sizes[: int(torch.searchsorted(torch.cumsum(sizes, 0), n)) + 1]
    sizes[-1] -= int(sizes.sum()) - n
    return sizes[sizes > 0]


def _inputs(n, layout="fixed"):
    """``(rewards, modes, group_ids [N] int64 on the CPU, num_groups)``; modes alternate think / no-think within
    each group (every group holds both, as BPO requires)."""
    gen = torch.Generator().manual_seed(n)
    rewards = torch.randint(0, 2, (n,), generator=gen).float()
    if layout == "fixed":
        group_ids = torch.arange(n) // GROUP
        rank = torch.arange(n) % GROUP
    else:
        sizes = _ragged_sizes(n)
        group_ids = torch.repeat_interleave(torch.arange(sizes.numel()), sizes)
        rank = torch.arange(n) - torch.repeat_interleave(torch.cumsum(sizes, 0) - sizes, sizes)
    modes = rank * 2 // torch.bincount(group_ids)[group_ids]  # first half no-think (0), second half think (1)
    return rewards.to(DEVICE), modes.to(DEVICE), group_ids, int(group_ids[-1]) + 1


if DEVICE == "cuda":  # the GPU shapes of issue #10
    CASES = [(262144, "fixed"), (262144, "ragged")]
else:
    CASES = [(n, "fixed") for n in ([64, 4096] if QUICK else [64, 4096, 262144])]


def _group_name(n, layout):
    return f"group_advantages N={n}" + ("" if layout == "fixed" else f" {layout} 8-24")


@pytest.mark.parametrize("n,layout", CASES)
def test_eager_loop(benchmark, n, layout):
    benchmark.group = _group_name(n, layout)
    rewards, _, group_ids, _ = _inputs(n, layout)
    rewards = rewards.cpu()  # verl's driver computes advantages on CPU tensors
    ids = group_ids.tolist()
    run(benchmark, lambda: verl_style_loop(rewards, ids), impl="eager loop (verl, CPU)" if DEVICE == "cuda"
        else "eager loop (verl)", baseline=True, budget_s=3.0, memory=n <= 4096, n=n)  # fmt: skip


@pytest.mark.parametrize("n,layout", CASES)
def test_trl_reshape(benchmark, n, layout):
    if layout != "fixed":
        pytest.skip("TRL's reshape needs fixed contiguous groups")
    benchmark.group = _group_name(n, layout)
    rewards, _, _, _ = _inputs(n, layout)
    run(benchmark, lambda: trl_reshape(rewards), impl="TRL reshape (no mode stats)", n=n)


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("n,layout", CASES)
def test_r4b_fast(benchmark, n, layout, backend):
    reasons = r4b_fast.not_supported_reasons(backend, DEVICE)
    if reasons:
        pytest.skip("; ".join(reasons))
    if backend == "triton" and DEVICE == "cpu" and n > 64:
        pytest.skip("the Triton interpreter takes seconds to minutes at this size on CPU; its timing means nothing")
    benchmark.group = _group_name(n, layout)
    rewards, modes, group_ids, num_groups = _inputs(n, layout)
    if layout == "fixed":
        def fn():
            return r4b_fast.group_advantages(rewards, GROUP, modes=modes, estimator="bpo", backend=backend)
    else:
        index = group_ids.to(DEVICE)

        def fn():
            return r4b_fast.group_advantages(rewards, group_index=index, num_groups=num_groups, modes=modes,
                                             estimator="bpo", backend=backend)  # fmt: skip
    run(benchmark, fn, impl=backend, n=n)
