"""Group-normalised advantages for GRPO, Dr.GRPO, RLOO and BPO.

Four implementations, by name:
- ``group_advantages_ref``: a plain Python loop over groups in float64 (the way verl and TRL write it); the oracle
  of the tests and the eager baseline of the benchmark.
- ``_group_advantages_torch``: vectorised segment reductions (``index_add_``/``scatter_reduce_``); the CPU path.
- triton: ``kernels/group_advantages.py``, one program per group, three passes over the group's segment.
- cuda: ``csrc/group_advantages.cu``, one warp per group, the same three passes.

Every backend returns ``(advantages [N], stats [G, 10])``; ``stats`` columns are ``STATS_COLUMNS``. The public
``group_advantages`` validates its input, registers as ``r4b_fast::group_advantages`` and unpacks the stats.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from r4b_fast.backends import device_guard, resolve_backend
from r4b_fast.modes import NUM_MODES, Mode

ESTIMATORS = ("grpo", "bpo", "drgrpo", "rloo")
SCALES = ("group", "batch", "none")
NONFINITE = ("raise", "zero")
SINGLETONS = ("zero", "verl")
STATS_COLUMNS = ("count", "mean", "std", "zero_signal") + tuple(f"count_{m.name.lower()}" for m in Mode) + tuple(
    f"sum_{m.name.lower()}" for m in Mode
)
NUM_STATS = len(STATS_COLUMNS)
OP_BACKENDS = ("torch", "triton", "cuda")
PREFERRED = {"cpu": ("torch",), "cuda": ("triton", "cuda", "torch")}


class GroupAdvantages(NamedTuple):
    """Result of :func:`group_advantages`. ``G`` is the number of groups, ``M = 3`` the modes (``r4b_fast.Mode``).

    advantages:        [N] float32 (float64 for float64 rewards); 0 for zero-signal groups and excluded rewards.
    group_mean:        [G] mean reward of each group's (finite) rewards.
    group_std:         [G] standard deviation (biased or unbiased as asked); 0 for groups of fewer than 2.
    group_count:       [G] int64, rewards that entered each group's statistics.
    zero_signal_groups: 0-dim int64, groups whose rewards are all equal (or that hold fewer than 2): no signal.
    mode_count:        [G, M] int64 rollouts per group per mode, or None when ``modes`` was not given.
    mode_mean:         [G, M] mean reward per group per mode, NaN where the group has no rollout of that mode.
    mode_mean_overall: [M] mean reward per mode over the batch, NaN where no rollout has that mode.
    """

    advantages: torch.Tensor
    group_mean: torch.Tensor
    group_std: torch.Tensor
    group_count: torch.Tensor
    zero_signal_groups: torch.Tensor
    mode_count: torch.Tensor | None
    mode_mean: torch.Tensor | None
    mode_mean_overall: torch.Tensor | None


# All backends accumulate in float64: the op is memory-bound and tiny next to a training step, and float64 keeps
# rewards like 1e6 + noise (or 1e6 identical rewards summed) from cancelling. Results come back in float32.
COMPUTE_DTYPE = torch.float64


def _output_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _effective_scale(estimator: str, scale: str | None) -> str:
    if scale is None:
        return "none" if estimator in ("drgrpo", "rloo") else "group"
    return scale


# ----------------------------------------------------------------------------------------------------------------
# Reference: a plain loop, float64, written for reading.
# ----------------------------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------------------------
# torch backend: vectorised, no loop over groups.
# ----------------------------------------------------------------------------------------------------------------
def batch_std(rewards: torch.Tensor, valid: torch.Tensor, unbiased: bool) -> torch.Tensor:
    """Two-pass std over the valid entries of ``rewards`` as a 1-element tensor (no host sync)."""
    w = valid.to(rewards.dtype)
    r = torch.where(valid, rewards, 0)
    n = w.sum()
    mean = r.sum() / n.clamp_min(1)
    m2 = (torch.where(valid, r - mean, 0) ** 2).sum()
    denom = (n - 1) if unbiased else n
    return torch.where(n > 1, (m2 / denom.clamp_min(1)).sqrt(), 0).reshape(1)


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


# ----------------------------------------------------------------------------------------------------------------
# Kernel backends: a shared preparation, then triton or cuda.
# ----------------------------------------------------------------------------------------------------------------
class _SegmentLayout(NamedTuple):
    perm: torch.Tensor | None  # rollout ids sorted by group (stable), or None for fixed contiguous groups
    offsets: torch.Tensor | None  # [G+1] int64 segment starts in perm
    max_group_len: int


def _segment_layout(group_index, num_groups, group_size, max_group_len) -> _SegmentLayout:
    if group_index is None:
        return _SegmentLayout(None, None, group_size)
    perm = torch.argsort(group_index, stable=True)
    counts = torch.bincount(group_index, minlength=num_groups)
    offsets = torch.zeros(num_groups + 1, dtype=torch.int64, device=group_index.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return _SegmentLayout(perm, offsets, max_group_len)


def _group_advantages_kernel_backend(
    backend, rewards, group_index, modes, num_groups, group_size, estimator, scale, unbiased, eps, max_group_len
):
    r = rewards.to(COMPUTE_DTYPE).contiguous()
    layout = _segment_layout(group_index, num_groups, group_size, max_group_len)
    modes32 = modes.to(torch.int32).contiguous() if modes is not None else None
    bstd = batch_std(r, torch.isfinite(r), unbiased) if scale == "batch" else None
    adv = torch.empty_like(r)
    stats = torch.zeros(num_groups, NUM_STATS, dtype=COMPUTE_DTYPE, device=r.device)
    args = (r, modes32, layout, num_groups, estimator == "rloo", SCALES.index(scale), unbiased, eps, bstd, adv, stats)
    if backend == "triton":
        from r4b_fast.kernels.group_advantages import launch_group_advantages

        launch_group_advantages(*args)
    else:
        _launch_group_advantages_cuda(*args)
    return adv.to(_output_dtype(rewards.dtype)), stats


def _launch_group_advantages_cuda(r, modes, layout, num_groups, rloo, scale_code, unbiased, eps, bstd, adv, stats):
    import ctypes

    from r4b_fast import _cuda_build

    lib = _cuda_build.load_library("group_advantages")
    fn = lib.r4b_group_advantages_f64 if r.dtype == torch.float64 else lib.r4b_group_advantages_f32
    fn.restype = ctypes.c_int

    def ptr(t):
        return ctypes.c_void_p(t.data_ptr() if t is not None else 0)

    with device_guard(r):  # the kernel launches on the current device: make it r's
        stream = torch.cuda.current_stream(r.device).cuda_stream
        err = fn(
            ptr(r), ptr(modes), ptr(layout.perm), ptr(layout.offsets),
            ctypes.c_int64(num_groups), ctypes.c_int64(layout.max_group_len if layout.perm is None else 0),
            ctypes.c_int(int(rloo)), ctypes.c_int(scale_code), ctypes.c_int(int(unbiased)), ctypes.c_double(eps),
            ptr(bstd), ptr(adv), ptr(stats), ctypes.c_void_p(stream),
        )  # fmt: skip
    if err != 0:
        lib.r4b_cuda_error_string.restype = ctypes.c_char_p
        raise RuntimeError(f"group_advantages cuda kernel failed: {lib.r4b_cuda_error_string(err).decode()}")


# ----------------------------------------------------------------------------------------------------------------
# Value checks (inside the op, so they also run under torch.compile): one host sync for all of them.
# ----------------------------------------------------------------------------------------------------------------
def _check_values(rewards, group_index, modes, num_groups, group_size, estimator, nonfinite) -> int:
    """Raise ValueError for bad values; return the largest group size (needed by the kernels)."""
    checks = {}  # name -> 0-dim integer tensor; read back in one host sync
    if nonfinite == "raise":
        checks["nonfinite"] = (~torch.isfinite(rewards)).sum()
    if group_index is not None:
        checks["gmin"], checks["gmax"] = group_index.min(), group_index.max()
        checks["max_len"] = torch.bincount(group_index.clamp(0, num_groups - 1), minlength=num_groups).max()
    if modes is not None:
        checks["bad_modes"] = ((modes < 0) | (modes >= NUM_MODES)).sum()
    if estimator == "bpo":
        if group_index is None:
            m = modes.view(num_groups, group_size)
            lacking = ~((m == Mode.THINK).any(1) & (m == Mode.NO_THINK).any(1))
        else:
            slot = group_index.clamp(0, num_groups - 1) * NUM_MODES + modes.clamp(0, NUM_MODES - 1)
            per_mode = torch.bincount(slot, minlength=num_groups * NUM_MODES).view(num_groups, NUM_MODES)
            lacking = (per_mode.sum(1) > 0) & ((per_mode[:, Mode.THINK] == 0) | (per_mode[:, Mode.NO_THINK] == 0))
        checks["lacking"] = lacking.sum()
        checks["first_lacking"] = lacking.to(torch.int8).argmax()  # argmax returns the first maximum
    values = dict(zip(checks, torch.stack(list(checks.values())).tolist())) if checks else {}  # the one sync
    n_nonfinite = values.get("nonfinite", 0)
    gmin, gmax = values.get("gmin", 0), values.get("gmax", 0)
    n_bad_modes = values.get("bad_modes", 0)
    max_len = values.get("max_len", group_size)
    if n_nonfinite:
        first = int(torch.nonzero(~torch.isfinite(rewards))[0, 0])
        raise ValueError(
            f"rewards: {n_nonfinite} non-finite value(s), first at index {first} ({rewards[first].item()}); "
            "fix the reward function or pass nonfinite='zero' to exclude them (their advantage is then 0)"
        )
    if group_index is not None and (gmin < 0 or gmax >= num_groups):
        raise ValueError(f"group_index: values must lie in [0, num_groups={num_groups}), got min {gmin}, max {gmax}")
    if n_bad_modes:
        raise ValueError(
            f"modes: {n_bad_modes} value(s) outside the known modes "
            f"{ {m.name: int(m) for m in Mode} }; classify rollouts as one of these"
        )
    if values.get("lacking"):
        raise ValueError(
            f"modes: estimator='bpo' normalises over a mixed group of thinking and non-thinking rollouts, but "
            f"{values['lacking']} group(s) lack one of the two modes (first: group {values['first_lacking']}); "
            "use estimator='grpo' for single-mode groups"
        )
    return max_len


# ----------------------------------------------------------------------------------------------------------------
# torch.library op
# ----------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("r4b_fast::group_advantages", mutates_args=())
def _group_advantages_op(
    rewards: torch.Tensor,
    group_index: torch.Tensor | None,
    modes: torch.Tensor | None,
    num_groups: int,
    group_size: int,
    estimator: str,
    scale: str,
    unbiased: bool,
    eps: float,
    nonfinite: str,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    max_len = _check_values(rewards, group_index, modes, num_groups, group_size, estimator, nonfinite)
    if backend == "torch":
        return _group_advantages_torch(
            rewards, group_index, modes, num_groups, group_size, estimator, scale, unbiased, eps
        )
    return _group_advantages_kernel_backend(
        backend, rewards, group_index, modes, num_groups, group_size, estimator, scale, unbiased, eps, max_len
    )


@_group_advantages_op.register_fake
def _(rewards, group_index, modes, num_groups, group_size, estimator, scale, unbiased, eps, nonfinite, backend):
    out = rewards.new_empty(rewards.shape, dtype=_output_dtype(rewards.dtype))
    return out, rewards.new_empty((num_groups, NUM_STATS), dtype=COMPUTE_DTYPE)


# ----------------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------------
def _check_index_tensor(name: str, t: torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer tensor, got dtype {t.dtype}")
    if t.shape != (n,):
        raise ValueError(f"{name}: expected shape ({n},) to match rewards, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: on device {t.device}, but rewards are on {device}")
    return t.to(torch.int64)


def group_advantages(
    rewards: torch.Tensor,
    group_size: int | None = None,
    *,
    group_index: torch.Tensor | None = None,
    num_groups: int | None = None,
    modes: torch.Tensor | None = None,
    estimator: str = "grpo",
    scale: str | None = None,
    unbiased: bool = True,
    eps: float = 1e-6,
    nonfinite: str = "raise",
    singleton: str = "zero",
    backend: str | None = None,
) -> GroupAdvantages:
    """Per-rollout advantages from scalar rewards, normalised within groups of rollouts of the same prompt.

    Args:
        rewards: ``[N]`` float32/float64/bfloat16/float16, one scalar reward per rollout (not differentiated).
        group_size: rollouts per group when groups are contiguous runs of equal size (``N % group_size == 0``).
        group_index: ``[N]`` integer group id per rollout in ``[0, num_groups)``, for ragged or interleaved groups
            (instead of group_size). Ids are row indices of the per-group outputs: sparse ids (e.g. dataset prompt
            ids) must be relabelled to ``0..G-1`` first (``torch.unique(group_index, return_inverse=True)[1]``).
        num_groups: number of groups with ``group_index``, at most ``N`` (default ``group_index.max() + 1``, one
            host sync; pass it under ``torch.compile``).
        modes: ``[N]`` integer ``r4b_fast.Mode`` per rollout (0 no-think, 1 think, 2 auto); enables per-mode stats.
        estimator: ``"grpo"`` ``(r - mean_g) / (std_g + eps)``; ``"bpo"`` the same over R-4B's mixed group of
            thinking and non-thinking rollouts (every group must hold both); ``"drgrpo"`` ``r - mean_g`` (no std);
            ``"rloo"`` ``r - mean of the other rollouts of the group``.
        scale: ``"group"`` (divide by the group's std), ``"batch"`` (by the std of all rewards, TRL's
            ``scale_rewards="batch"``), ``"none"``. Default: ``"group"`` for grpo/bpo, ``"none"`` for drgrpo/rloo.
        unbiased: std with Bessel's correction (``N-1``, as ``torch.std`` in TRL and verl) or without.
        eps: added to the std before dividing. ``1e-6`` (the default) is verl's (``compute_grpo_outcome_advantage``'s
            ``epsilon``); TRL 1.16's ``GRPOTrainer`` divides by ``std + 1e-4``: pass ``eps=1e-4`` to get its numbers.
        nonfinite: ``"raise"`` on NaN/inf rewards, or ``"zero"``: exclude them from the statistics, advantage 0.
        singleton: a group holding one (finite) reward: ``"zero"`` gives it advantage 0 (it has no baseline);
            ``"verl"`` takes verl's convention, mean 0 and std 1: advantage ``r / (1 + eps)`` with ``scale="group"``,
            ``r / (batch std + eps)`` with ``"batch"``, ``r`` with ``"none"`` (verl's Dr.GRPO and RLOO). Such groups
            then no longer count in ``zero_signal_groups``; ``group_mean`` / ``group_std`` still describe the data
            (``r``, 0). TRL never forms one (``num_generations >= 2``).
        backend: ``"torch"``, ``"triton"`` or ``"cuda"``; default ``$R4B_FAST_BACKEND`` or the best for the device.

    Returns:
        :class:`GroupAdvantages`. A group whose rewards are all equal, or that has fewer than two finite rewards,
        gives advantage exactly 0 (never NaN) and counts in ``zero_signal_groups`` (except singletons under
        ``singleton="verl"``). Variance is two-pass. verl and TRL compute ``r - mean`` in float32: for an all-equal
        group of non-representable rewards (three 0.1s) they give ``rounding / eps``, up to ~1e-2, where this
        gives 0.

    Example:
        >>> import torch, r4b_fast
        >>> rewards = torch.tensor([1.0, 0.0, 1.0, 1.0,   0.0, 0.0, 0.0, 0.0])
        >>> modes = torch.tensor([1, 1, 0, 0,   1, 1, 0, 0])  # per prompt: 2 thinking + 2 non-thinking
        >>> out = r4b_fast.group_advantages(rewards, group_size=4, modes=modes, estimator="bpo")
        >>> out.advantages
        tensor([ 0.5000, -1.5000,  0.5000,  0.5000,  0.0000,  0.0000,  0.0000,  0.0000])
        >>> int(out.zero_signal_groups)
        1
    """
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"rewards: expected a torch.Tensor, got {type(rewards).__name__}")
    if not rewards.dtype.is_floating_point:
        raise TypeError(f"rewards: expected a floating-point tensor, got dtype {rewards.dtype}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards: expected a 1-D tensor [N], got shape {tuple(rewards.shape)}")
    n = rewards.numel()
    if n == 0:
        raise ValueError("rewards: empty (N = 0); there is nothing to normalise")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator: expected one of {ESTIMATORS}, got {estimator!r}")
    if scale is not None and scale not in SCALES:
        raise ValueError(f"scale: expected one of {SCALES} or None, got {scale!r}")
    if estimator == "drgrpo" and scale not in (None, "none"):
        raise ValueError(f"scale: estimator='drgrpo' means no std scaling, got scale={scale!r}")
    if nonfinite not in NONFINITE:
        raise ValueError(f"nonfinite: expected one of {NONFINITE}, got {nonfinite!r}")
    if singleton not in SINGLETONS:
        raise ValueError(f"singleton: expected one of {SINGLETONS} (verl: mean 0, std 1), got {singleton!r}")
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps: expected a finite float >= 0, got {eps!r}")
    if (group_size is None) == (group_index is None):
        raise ValueError(
            "group_size / group_index: give exactly one (fixed-size contiguous groups, or a group id per rollout)"
        )
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size: expected a positive int, got {group_size!r}")
        if n % group_size:
            raise ValueError(f"group_size: N = {n} rollouts do not divide into groups of {group_size}")
        if num_groups is not None and num_groups != n // group_size:
            raise ValueError(f"num_groups: {num_groups} contradicts N / group_size = {n // group_size}")
        num_groups = n // group_size
    else:
        group_index = _check_index_tensor("group_index", group_index, n, rewards.device)
        # Ids index the per-group buffers and outputs: sparse ids (prompt ids up to 1e8, say) would size them by the
        # largest id (20 GB for 8 rollouts), so the number of groups is bounded by the number of rollouts.
        relabel = "relabel the ids to 0..G-1 first, e.g. torch.unique(group_index, return_inverse=True)[1]"
        if num_groups is None:
            gmax = int(group_index.max())
            if gmax >= n:
                raise ValueError(
                    f"group_index: largest id {gmax} for N = {n} rollouts; the per-group outputs have one row per id "
                    f"up to the largest (num_groups = max + 1), so at most N groups are accepted: {relabel}"
                )
            num_groups = gmax + 1
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
            raise ValueError(f"num_groups: expected a positive int, got {num_groups!r}")
        if num_groups > n:
            raise ValueError(
                f"num_groups: {num_groups} groups for N = {n} rollouts (at least {num_groups - n} empty); every "
                f"per-group buffer has num_groups rows, so at most N groups are accepted: {relabel}"
            )
    if modes is not None:
        modes = _check_index_tensor("modes", modes, n, rewards.device)
    elif estimator == "bpo":
        raise ValueError("modes: estimator='bpo' needs the mode (0 no-think / 1 think) of every rollout")
    scale = _effective_scale(estimator, scale)
    chosen = resolve_backend(backend, rewards.device, OP_BACKENDS, PREFERRED, "group_advantages")
    adv, stats = _group_advantages_op(
        rewards.detach(), group_index, modes, num_groups, group_size or 0, estimator, scale, unbiased, float(eps),
        nonfinite, chosen,
    )  # fmt: skip
    if singleton == "verl":
        adv, stats = _verl_singletons(rewards, adv, stats, group_index, group_size, scale, unbiased, float(eps))
    return _unpack_stats(adv, stats, modes is not None)


def _verl_singletons(rewards, adv, stats, group_index, group_size, scale, unbiased, eps):
    """verl's singleton convention after any backend: rows alone in their group get ``(r - 0) / (1 + eps)`` (or the
    batch std, or no scale); their groups leave the zero-signal count. Vectorised, no host sync."""
    r = rewards.detach().to(COMPUTE_DTYPE)
    valid = torch.isfinite(r)
    gid = group_index if group_index is not None else torch.arange(r.numel(), device=r.device) // group_size
    single_group = stats[:, 0] == 1
    single_row = single_group[gid] & valid
    if scale == "group":
        scaled = r / (1 + eps)
    elif scale == "batch":
        scaled = r / (batch_std(r, valid, unbiased) + eps)
    else:
        scaled = r
    adv = torch.where(single_row, scaled.to(adv.dtype), adv)
    stats = stats.clone()
    stats[:, 3] = torch.where(single_group, 0.0, stats[:, 3])
    return adv, stats


def _unpack_stats(adv: torch.Tensor, stats: torch.Tensor, with_modes: bool) -> GroupAdvantages:
    count = stats[:, 0].round().to(torch.int64)
    zero_signal = stats[:, 3].sum().round().to(torch.int64)
    mode_count = mode_mean = mode_overall = None
    if with_modes:
        counts = stats[:, 4 : 4 + NUM_MODES]
        sums = stats[:, 4 + NUM_MODES :]
        nan = torch.full_like(sums, float("nan"))
        mode_count = counts.round().to(torch.int64)
        mode_mean = torch.where(counts > 0, sums / counts.clamp_min(1), nan).to(adv.dtype)
        total = counts.sum(0)
        mode_overall = torch.where(total > 0, sums.sum(0) / total.clamp_min(1), nan[0]).to(adv.dtype)
    mean, std = stats[:, 1].to(adv.dtype), stats[:, 2].to(adv.dtype)
    return GroupAdvantages(adv, mean, std, count, zero_signal, mode_count, mode_mean, mode_overall)
