"""r4b_fast: fused kernels and a lean trainer for R-4B (arXiv 2508.21113) bi-mode annealing and BPO.

Public ops (each validates its input, dispatches to the torch / triton / cuda backend and is a torch.library op):
    group_advantages  GRPO / Dr.GRPO / RLOO / BPO advantages with per-mode statistics

Importing r4b_fast needs no GPU, nvcc, flash-attn or xformers; Triton kernels and CUDA libraries load on first use.
"""

from r4b_fast.backends import BACKENDS, BackendUnavailableError, available_backends, not_supported_reasons
from r4b_fast.modes import Mode
from r4b_fast.ops.group_advantages import GroupAdvantages, group_advantages, group_advantages_ref

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "GroupAdvantages",
    "Mode",
    "available_backends",
    "group_advantages",
    "group_advantages_ref",
    "not_supported_reasons",
]
