"""Group-normalised advantages for GRPO, Dr.GRPO, RLOO and BPO.

Four implementations, by name (one file each):
- ``group_advantages_ref`` (``reference.py``): a plain Python loop over groups in float64 (the way verl and TRL
  write it); the oracle of the tests and the eager baseline of the benchmark.
- ``_group_advantages_torch`` (``torch_backend.py``): vectorised segment reductions (``index_add_`` /
  ``scatter_reduce_``); the CPU path.
- triton: ``r4b_fast/kernels/group_advantages.py``, one program per group, three passes over the group's segment.
- cuda: ``r4b_fast/csrc/group_advantages.cu``, one warp per group, the same three passes. Both launched from
  ``kernel_backends.py``.

Every backend returns ``(advantages [N], stats [G, 10])``; ``stats`` columns are ``STATS_COLUMNS``. The public
``group_advantages`` (``api.py``) validates its input, calls the op ``r4b_fast::group_advantages`` (``op.py``: the
value checks and the dispatch) and unpacks the stats. ``common.py``: the options, the stats layout, the result type.
"""

# ruff: noqa: F401  (re-exports: the public names, and the private ones tests and kernels reach through the package)
from r4b_fast.ops.group_advantages.api import _check_index_tensor, _unpack_stats, _verl_singletons, group_advantages
from r4b_fast.ops.group_advantages.common import (
    COMPUTE_DTYPE,
    ESTIMATORS,
    NONFINITE,
    NUM_STATS,
    OP_BACKENDS,
    PREFERRED,
    SCALES,
    SINGLETONS,
    STATS_COLUMNS,
    GroupAdvantages,
    _effective_scale,
    _output_dtype,
    batch_std,
)
from r4b_fast.ops.group_advantages.kernel_backends import (
    _group_advantages_kernel_backend,
    _launch_group_advantages_cuda,
    _segment_layout,
    _SegmentLayout,
)
from r4b_fast.ops.group_advantages.op import _check_values, _group_advantages_op
from r4b_fast.ops.group_advantages.reference import group_advantages_ref
from r4b_fast.ops.group_advantages.torch_backend import _group_advantages_torch, _Segments

__all__ = [
    "COMPUTE_DTYPE",
    "ESTIMATORS",
    "NONFINITE",
    "NUM_STATS",
    "OP_BACKENDS",
    "PREFERRED",
    "SCALES",
    "SINGLETONS",
    "STATS_COLUMNS",
    "GroupAdvantages",
    "batch_std",
    "group_advantages",
    "group_advantages_ref",
]
