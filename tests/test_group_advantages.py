"""group_advantages: every backend against the plain-loop float64 reference, numerics, bad input, torch.library."""

import math

import pytest
import torch
from conftest import kernel_backends
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from r4b_fast import Mode, group_advantages, group_advantages_ref
from r4b_fast.ops.group_advantages import ESTIMATORS, SCALES

BACKENDS = kernel_backends()


def _check_against_ref(out, rewards, group_index, num_groups, modes, **kw):
    ref_adv, ref_stats = group_advantages_ref(rewards.cpu(), group_index.cpu(), num_groups,
                                              None if modes is None else modes.cpu(), **kw)
    assert not torch.isnan(out.advantages).any()
    assert out.advantages.dtype == (torch.float64 if rewards.dtype == torch.float64 else torch.float32)
    adv = out.advantages.double().cpu()
    torch.testing.assert_close(adv, ref_adv, rtol=1e-5, atol=1e-5)
    # exact zeros (not merely small) where the reference has them: zero-signal groups and excluded rewards
    assert (adv[ref_adv == 0] == 0).all()
    torch.testing.assert_close(out.group_count.cpu(), ref_stats[:, 0].long())
    torch.testing.assert_close(out.group_mean.double().cpu(), ref_stats[:, 1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.group_std.double().cpu(), ref_stats[:, 2], rtol=1e-5, atol=1e-6)
    assert int(out.zero_signal_groups) == int(ref_stats[:, 3].sum())
    if modes is not None:
        counts, sums = ref_stats[:, 4:7], ref_stats[:, 7:10]
        torch.testing.assert_close(out.mode_count.cpu(), counts.long())
        ref_mean = torch.where(counts > 0, sums / counts.clamp_min(1), float("nan"))
        torch.testing.assert_close(out.mode_mean.double().cpu(), ref_mean, rtol=1e-6, atol=1e-6, equal_nan=True)
        tot = counts.sum(0)
        ref_overall = torch.where(tot > 0, sums.sum(0) / tot.clamp_min(1), float("nan"))
        torch.testing.assert_close(out.mode_mean_overall.double().cpu(), ref_overall, rtol=1e-6, atol=1e-6,
                                   equal_nan=True)
    else:
        assert out.mode_count is None and out.mode_mean is None


@st.composite
def batches(draw):
    """A batch: rewards (discrete accuracy-like or continuous), a group layout (fixed, ragged or interleaved),
    modes, and options."""
    layout = draw(st.sampled_from(["fixed", "ragged", "interleaved"]))
    if layout == "fixed":
        group_size = draw(st.integers(1, 9))
        num_groups = draw(st.integers(1, 5))
        n = group_size * num_groups
        group_index = torch.arange(n) // group_size
    else:
        sizes = draw(st.lists(st.integers(1, 9), min_size=1, max_size=5))
        num_groups, n, group_size = len(sizes), sum(sizes), None
        group_index = torch.repeat_interleave(torch.arange(num_groups), torch.tensor(sizes))
        if layout == "interleaved":
            perm = torch.tensor(draw(st.permutations(list(range(n)))))
            group_index = group_index[perm]
    kind = draw(st.sampled_from(["binary", "graded", "continuous"]))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    if kind == "binary":
        rewards = torch.randint(0, 2, (n,), generator=gen).float()
    elif kind == "graded":
        rewards = torch.randint(-4, 5, (n,), generator=gen).float() * 0.25
    else:
        rewards = torch.randn(n, generator=gen) * 3 + 1
    estimator = draw(st.sampled_from(["grpo", "drgrpo", "rloo"]))
    modes = torch.randint(0, 3, (n,), generator=gen) if draw(st.booleans()) else None
    scale = None if estimator == "drgrpo" else draw(st.sampled_from([None, *SCALES]))
    nonfinite = draw(st.sampled_from(["raise", "zero"]))
    if nonfinite == "zero":
        bad = torch.rand(n, generator=gen) < 0.2
        rewards = torch.where(bad, torch.tensor([float("nan"), float("inf"), -float("inf")])[torch.arange(n) % 3],
                              rewards)
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    kw = dict(estimator=estimator, scale=scale, unbiased=draw(st.booleans()), nonfinite=nonfinite,
              eps=draw(st.sampled_from([1e-6, 1e-4, 0.0])))
    return rewards.to(dtype), group_size, group_index, num_groups, modes, kw


@pytest.mark.parametrize("backend_device", BACKENDS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=batches())
def test_matches_loop_reference(backend_device, batch):
    backend, device = backend_device
    rewards, group_size, group_index, num_groups, modes, kw = batch
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731
    if group_size is not None:
        out = group_advantages(dev(rewards), group_size, modes=dev(modes), backend=backend, **kw)
    else:
        out = group_advantages(dev(rewards), group_index=dev(group_index), num_groups=num_groups, modes=dev(modes),
                               backend=backend, **kw)
    _check_against_ref(out, rewards, group_index, num_groups, modes, **kw)


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("n_groups,group_size", [(1, 1), (7, 2), (129, 16), (3, 1365)])
def test_bpo_odd_shapes(backend_device, n_groups, group_size):
    backend, device = backend_device
    gen = torch.Generator().manual_seed(n_groups * 1000 + group_size)
    n = n_groups * group_size
    rewards = torch.randint(0, 2, (n,), generator=gen).float()
    modes = (torch.arange(n) % 2).long()  # thinking and non-thinking interleaved in each group
    if group_size == 1:
        with pytest.raises(ValueError, match="lack one of the two modes"):
            group_advantages(rewards.to(device), group_size, modes=modes.to(device), estimator="bpo", backend=backend)
        return
    out = group_advantages(rewards.to(device), group_size, modes=modes.to(device), estimator="bpo", backend=backend)
    _check_against_ref(out, rewards, torch.arange(n) // group_size, n_groups, modes, estimator="bpo")


def test_bpo_normalises_over_the_mixed_group():
    # g=2 per mode: think rewards [1, 1], no-think [0, 0] -> mean 0.5, unbiased std sqrt(1/3)
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0])
    modes = torch.tensor([Mode.THINK, Mode.THINK, Mode.NO_THINK, Mode.NO_THINK])
    out = group_advantages(rewards, 4, modes=modes, estimator="bpo")
    expected = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    torch.testing.assert_close(out.advantages, torch.tensor([expected, expected, -expected, -expected]))
    torch.testing.assert_close(out.mode_mean_overall, torch.tensor([0.0, 1.0, float("nan")]), equal_nan=True)


def test_known_values_of_each_estimator():
    r = torch.tensor([0.0, 1.0, 2.0, 5.0])
    m, std_u, std_b = 2.0, math.sqrt(14 / 3), math.sqrt(14 / 4)
    cases = {
        ("grpo", True): [(x - m) / (std_u + 1e-6) for x in r.tolist()],
        ("grpo", False): [(x - m) / (std_b + 1e-6) for x in r.tolist()],
        ("drgrpo", True): [x - m for x in r.tolist()],
        ("rloo", True): [x - (8 - x) / 3 for x in r.tolist()],
    }
    for (estimator, unbiased), expected in cases.items():
        out = group_advantages(r, 4, estimator=estimator, unbiased=unbiased)
        torch.testing.assert_close(out.advantages, torch.tensor(expected), msg=f"{estimator} unbiased={unbiased}")
    # batch scaling: group means, batch std (TRL's scale_rewards="batch")
    r2 = torch.tensor([0.0, 1.0, 3.0, 7.0])
    out = group_advantages(r2, 2, scale="batch")
    bstd = r2.std().item()
    torch.testing.assert_close(out.advantages, torch.tensor([-0.5, 0.5, -2.0, 2.0]) / (bstd + 1e-6))


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_large_offset_does_not_cancel(backend_device):
    backend, device = backend_device
    gen = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 64, (64,), generator=gen).float() / 16  # exactly representable at 1e6 in float32
    rewards = (1e6 + noise).float()
    assert torch.equal(rewards.double() - 1e6, noise.double())
    out = group_advantages(rewards.to(device), 16, backend=backend)
    ref, _ = group_advantages_ref(rewards, torch.arange(64) // 16, 4)
    torch.testing.assert_close(out.advantages.double().cpu(), ref, rtol=1e-5, atol=1e-5)
    # the naive E[x^2] - E[x]^2 in float32 is wrong by orders of magnitude here: the test can tell
    g = rewards.view(4, 16)
    naive_var = (g * g).mean(1) - g.mean(1) ** 2
    assert (naive_var.double() - noise.view(4, 16).double().var(1, unbiased=False)).abs().max() > 1.0
    # float64 rewards: 1e8 + 1e-3 noise; the mean's own rounding (ulp(8e8) ~ 1e-7) bounds the accuracy to ~1e-4
    r64 = 1e8 + torch.randn(32, generator=gen, dtype=torch.float64) * 1e-3
    out64 = group_advantages(r64.to(device), 8, backend=backend)
    ref64, _ = group_advantages_ref(r64, torch.arange(32) // 8, 4)
    torch.testing.assert_close(out64.advantages.cpu(), ref64, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_equal_and_singleton_groups_give_exact_zero(backend_device):
    backend, device = backend_device
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7, 0.3, 1.0, -2.0]).to(device)  # 0.1 * 3 / 3 != 0.1
    group_index = torch.tensor([0, 0, 0, 1, 1, 1, 2, 3, 3]).to(device)
    for estimator in ESTIMATORS:
        kw = dict(modes=(torch.arange(9) % 2).to(device)) if estimator == "bpo" else {}
        if estimator == "bpo":
            with pytest.raises(ValueError, match="lack one of the two modes"):
                group_advantages(rewards, group_index=group_index, estimator=estimator, backend=backend, **kw)
            continue
        out = group_advantages(rewards, group_index=group_index, estimator=estimator, backend=backend)
        assert (out.advantages[:7] == 0).all(), estimator
        assert (out.advantages[7:] != 0).all()
        assert int(out.zero_signal_groups) == 3
        assert not torch.isnan(out.advantages).any()


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_singleton_verl_convention(backend_device):
    """singleton="verl": a group of one gets mean 0, std 1 (verl's compute_grpo_outcome_advantage /
    compute_rloo_outcome_advantage); other groups are untouched, on every backend, fixed and ragged groups."""
    backend, device = backend_device
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 2.0, 1.0, -2.0, float("nan"), 3.0, -0.5])
    group_index = torch.tensor([0, 0, 0, 1, 2, 3, 3, 4, 4, 5])  # singletons: 1, 2, 5 and 4 (one finite reward)
    single = torch.tensor([0, 0, 0, 1, 1, 0, 0, 0, 1, 1], dtype=torch.bool)
    finite = torch.isfinite(rewards)
    batch = rewards[finite].double().std()
    for estimator, scale, factor in (("grpo", None, 1 / (1 + 1e-4)), ("drgrpo", None, 1.0), ("rloo", None, 1.0),
                                     ("grpo", "batch", float(1 / (batch + 1e-4)))):
        kw = dict(group_index=group_index.to(device), estimator=estimator, scale=scale, eps=1e-4, nonfinite="zero",
                  backend=backend)
        zero = group_advantages(rewards.to(device), **kw)
        verl = group_advantages(rewards.to(device), singleton="verl", **kw)
        expected = torch.where(single, rewards.nan_to_num(0) * factor, zero.advantages.cpu())
        torch.testing.assert_close(verl.advantages.cpu(), expected.float(), rtol=1e-6, atol=0)
        assert (zero.advantages.cpu()[single] == 0).all()
        assert int(zero.zero_signal_groups) == 5 and int(verl.zero_signal_groups) == 1  # group 0: all equal
        torch.testing.assert_close(verl.group_mean, zero.group_mean, equal_nan=True)
    fixed = group_advantages(torch.tensor([1.0, -3.0, 0.5]).to(device), 1, singleton="verl", backend=backend)
    torch.testing.assert_close(fixed.advantages.cpu(), torch.tensor([1.0, -3.0, 0.5]) / (1 + 1e-6))


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_nonfinite_zero_excludes_rewards(backend_device):
    backend, device = backend_device
    rewards = torch.tensor([1.0, float("nan"), 0.0, float("inf"), 2.0, 2.0, float("nan"), -1.0])
    out = group_advantages(rewards.to(device), 4, nonfinite="zero", backend=backend)
    # group 0 keeps [1, 0]: mean .5, std sqrt(.5); group 1 keeps [2, 2, -1]: mean 1, std sqrt(3)
    s0 = math.sqrt(0.5)
    s1 = math.sqrt(((2 - 1) ** 2 * 2 + 4) / 2)
    expected = [0.5 / (s0 + 1e-6), 0, -0.5 / (s0 + 1e-6), 0, 1 / (s1 + 1e-6), 1 / (s1 + 1e-6), 0, -2 / (s1 + 1e-6)]
    torch.testing.assert_close(out.advantages.cpu(), torch.tensor(expected))
    assert out.group_count.tolist() == [2, 3]


# ---------------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(rewards=torch.ones(10), group_size=4), ValueError, "do not divide into groups of 4"),
        (dict(rewards=torch.ones(0), group_size=1), ValueError, "empty"),
        (dict(rewards=torch.ones(4, 2), group_size=2), ValueError, "1-D"),
        (dict(rewards=torch.ones(4, dtype=torch.long), group_size=2), TypeError, "floating-point"),
        (dict(rewards=[1.0, 2.0], group_size=2), TypeError, "torch.Tensor"),
        (dict(rewards=torch.ones(4)), ValueError, "give exactly one"),
        (dict(rewards=torch.ones(4), group_size=2, group_index=torch.zeros(4, dtype=torch.long)), ValueError,
         "give exactly one"),
        (dict(rewards=torch.ones(4), group_size=0), ValueError, "group_size: expected a positive int"),
        (dict(rewards=torch.ones(4), group_index=torch.zeros(3, dtype=torch.long)), ValueError,
         r"group_index: expected shape \(4,\)"),
        (dict(rewards=torch.ones(4), group_index=torch.zeros(4)), TypeError, "group_index: expected an integer"),
        (dict(rewards=torch.ones(4), group_index=torch.tensor([0, 1, 2, 5]), num_groups=3), ValueError,
         r"group_index: values must lie in \[0, num_groups=3\)"),
        (dict(rewards=torch.ones(4), group_index=torch.tensor([0, -1, 0, 1])), ValueError, "group_index: values"),
        (dict(rewards=torch.ones(4), group_size=2, modes=torch.ones(3, dtype=torch.long)), ValueError,
         r"modes: expected shape \(4,\)"),
        (dict(rewards=torch.ones(4), group_size=2, modes=torch.tensor([0, 1, 3, 0])), ValueError,
         "modes: 1 value.s. outside the known modes"),
        (dict(rewards=torch.tensor([1.0, float("nan"), 0, 0]), group_size=2), ValueError,
         r"rewards: 1 non-finite value\(s\), first at index 1"),
        (dict(rewards=torch.tensor([1.0, 0, float("inf"), 0]), group_size=2), ValueError, "nonfinite='zero'"),
        (dict(rewards=torch.ones(4), group_size=2, estimator="ppo"), ValueError, "estimator: expected one of"),
        (dict(rewards=torch.ones(4), group_size=2, scale="token"), ValueError, "scale: expected one of"),
        (dict(rewards=torch.ones(4), group_size=2, estimator="drgrpo", scale="group"), ValueError, "drgrpo"),
        (dict(rewards=torch.ones(4), group_size=2, estimator="bpo"), ValueError, "modes: estimator='bpo' needs"),
        (dict(rewards=torch.ones(4), group_size=2, modes=torch.tensor([1, 1, 0, 1]), estimator="bpo"), ValueError,
         "1 group.s. lack one of the two modes .first: group 0"),
        (dict(rewards=torch.ones(4), group_size=2, nonfinite="ignore"), ValueError, "nonfinite: expected one of"),
        (dict(rewards=torch.ones(4), group_size=2, singleton="trl"), ValueError, "singleton: expected one of"),
        (dict(rewards=torch.ones(4), group_size=2, eps=float("nan")), ValueError, "eps: expected a finite"),
        (dict(rewards=torch.ones(4), group_size=2, num_groups=3), ValueError, "num_groups: 3 contradicts"),
    ],
)
def test_bad_input_is_rejected_with_a_clear_error(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        group_advantages(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# torch.library / torch.compile
# ---------------------------------------------------------------------------------------------------------------
def test_opcheck():
    op = torch.ops.r4b_fast.group_advantages.default
    rewards = torch.randn(12)
    gi = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2])
    modes = torch.arange(12) % 2
    torch.library.opcheck(op, (rewards, None, None, 3, 4, "grpo", "group", True, 1e-6, "raise", "torch"))
    torch.library.opcheck(op, (rewards, gi, modes, 3, 0, "bpo", "group", True, 1e-6, "raise", "torch"))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    def step(rewards, modes):
        out = group_advantages(rewards, 8, modes=modes, estimator="bpo", backend="torch")
        return out.advantages * 2, out.mode_mean_overall, out.zero_signal_groups

    rewards = torch.randint(0, 2, (64,)).float()
    modes = (torch.arange(64) % 2).long()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(rewards, modes), step(rewards, modes)):
        torch.testing.assert_close(got, want, equal_nan=True)


def test_torch_compile_fullgraph_verl_singletons():
    torch._dynamo.reset()

    def step(rewards, group_index):
        out = group_advantages(rewards, group_index=group_index, num_groups=3, singleton="verl", backend="torch")
        return out.advantages, out.zero_signal_groups

    rewards, gi = torch.tensor([1.0, 0.0, 2.0, 0.5]), torch.tensor([0, 0, 1, 2])
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(rewards, gi), step(rewards, gi)):
        torch.testing.assert_close(got, want)


def test_rewards_are_constants():
    rewards = torch.randn(8, requires_grad=True)
    out = group_advantages(rewards, 4)
    assert not out.advantages.requires_grad


def test_public_example_in_docstring():
    import doctest

    from r4b_fast.ops import group_advantages as mod

    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner()
    for t in finder.find(mod.group_advantages, "group_advantages", globs={}):
        runner.run(t)
    assert runner.failures == 0 and runner.tries > 0


# ---------------------------------------------------------------------------------------------------------------
# multi-block paths: groups longer than the kernels' block (Triton 1024, a CUDA warp 32) next to many short ones
# ---------------------------------------------------------------------------------------------------------------
OPTIONS = [
    dict(estimator="grpo"),
    dict(estimator="rloo", unbiased=False),
    dict(estimator="drgrpo", nonfinite="zero"),
    dict(estimator="grpo", scale="batch"),
    dict(estimator="bpo"),
]


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("kw", OPTIONS, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_long_fixed_groups(backend_device, kw):
    backend, device = backend_device
    gen = torch.Generator().manual_seed(1)
    n_groups, size = 4, 2500  # 3 Triton blocks per pass, 79 CUDA warp steps
    n = n_groups * size
    rewards = torch.randn(n, generator=gen, dtype=torch.float64) * 2 + 1
    if kw.get("nonfinite") == "zero":
        rewards[torch.randperm(n, generator=gen)[:50]] = float("nan")
    rewards[size : 2 * size] = 0.25  # one zero-signal long group
    modes = (torch.arange(n) % 3).long()
    out = group_advantages(rewards.to(device), size, modes=modes.to(device), backend=backend, **kw)
    _check_against_ref(out, rewards, torch.arange(n) // size, n_groups, modes, **kw)
    assert int(out.zero_signal_groups) == 1


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("kw", OPTIONS, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_long_and_many_ragged_groups(backend_device, kw):
    """100 interleaved groups: 97 of 2-9 rollouts and three of 1025, 2049 and 2100 (over 2 and 3 blocks)."""
    backend, device = backend_device
    gen = torch.Generator().manual_seed(2)
    sizes = torch.randint(2, 10, (100,), generator=gen)
    sizes[[7, 50, 99]] = torch.tensor([1025, 2049, 2100])
    group_index = torch.repeat_interleave(torch.arange(100), sizes)
    group_index = group_index[torch.randperm(group_index.numel(), generator=gen)]
    n = group_index.numel()
    rewards = torch.randint(0, 5, (n,), generator=gen).double() * 0.5
    if kw.get("nonfinite") == "zero":
        rewards[torch.randperm(n, generator=gen)[:40]] = float("inf")
    # each group holds both thinking (1) and non-thinking (0) rollouts: alternate within the group
    rank = torch.zeros(n, dtype=torch.long)
    order = torch.argsort(group_index, stable=True)
    starts = torch.cumsum(sizes, 0) - sizes
    rank[order] = torch.arange(n) - torch.repeat_interleave(starts, sizes)
    modes = rank % 2
    out = group_advantages(rewards.to(device), group_index=group_index.to(device), num_groups=100,
                           modes=modes.to(device), backend=backend, **kw)
    _check_against_ref(out, rewards, group_index, 100, modes, **kw)


try:  # the kernel's own bounds helper, called from a probe kernel (module level: @jit resolves module globals)
    import triton
    import triton.language as tl

    from r4b_fast.kernels.group_advantages import _segment_bounds

    @triton.jit
    def _bounds_probe_kernel(groups_ptr, offsets_ptr, out_ptr, n, group_size, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        g = tl.load(groups_ptr + i, mask=i < n, other=0)  # int32, as a program id is
        start, end = _segment_bounds(g, offsets_ptr, group_size, False)
        tl.store(out_ptr + i, start, mask=i < n)
        tl.store(out_ptr + BLOCK + i, end, mask=i < n)
except ImportError:
    _bounds_probe_kernel = None


@pytest.mark.skipif(not [p for p in BACKENDS if p.id == "triton" and not p.marks], reason="triton cannot run here")
def test_segment_bounds_are_64_bit_past_2_31():
    """Fixed groups of 4096 at group ids past 2^31 / 4096: ``g * group_size`` in int32 would wrap."""
    from conftest import DEVICE

    groups = torch.tensor([0, 3, 524287, 524288, 600000, 2**31 - 1], dtype=torch.int32)
    out = torch.zeros(16, dtype=torch.int64, device=DEVICE)
    _bounds_probe_kernel[(1,)](groups.to(DEVICE), out, out, 6, 4096, BLOCK=8)
    g64 = groups.long()
    assert out[:6].cpu().tolist() == (g64 * 4096).tolist()
    assert out[8:14].cpu().tolist() == (g64 * 4096 + 4096).tolist()


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend_device", [p for p in BACKENDS if p.id != "torch"])
def test_tensors_on_another_gpu(backend_device):
    """A launch must follow the tensors (device guard), not the current device."""
    backend, _ = backend_device
    gen = torch.Generator().manual_seed(3)
    rewards = torch.randn(64 * 16, generator=gen)
    modes = (torch.arange(64 * 16) % 2).long()
    dev = torch.device("cuda", 1)
    assert torch.cuda.current_device() == 0
    out = group_advantages(rewards.to(dev), 16, modes=modes.to(dev), estimator="bpo", backend=backend)
    torch.cuda.synchronize(dev)
    assert out.advantages.device == dev
    _check_against_ref(out, rewards, torch.arange(64 * 16) // 16, 64, modes, estimator="bpo")
