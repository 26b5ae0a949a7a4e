"""The kernel backends of :func:`~r4b_fast.ops.group_advantages.group_advantages`: the shared preparation (rollouts
sorted into per-group segments), then the triton launcher (``r4b_fast/kernels/group_advantages.py``) or the cuda one
(``r4b_fast/csrc/group_advantages.cu``: ``_launch_group_advantages_cuda`` here, ctypes)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from r4b_fast.backends import device_guard
from r4b_fast.ops.group_advantages.common import COMPUTE_DTYPE, NUM_STATS, SCALES, _output_dtype, batch_std


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
