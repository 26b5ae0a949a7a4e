"""r4b_fast: fused kernels and a lean trainer for R-4B (arXiv 2508.21113) bi-mode annealing and BPO.

Public ops (each validates its input, dispatches to the torch / triton / cuda backend and is a torch.library op):
    group_advantages  GRPO / Dr.GRPO / RLOO / BPO advantages with per-mode statistics
    fused_linear_logprobs / fused_linear_policy_loss / logprobs_from_logits
                      LM-head log-probs, entropy and the clipped GRPO/BPO loss without materialising the logits
    PolicyLoss        the policy loss's settings, with TRL / verl presets (PolicyLoss.trl, PolicyLoss.verl)
    rollout_importance_weights / logprob_mismatch
                      rollout vs trainer log-probs: truncated importance weights (verl's TIS) and mismatch metrics
    sample / sample_with_modes
                      sort-free, sync-free top-k/top-p/min-p sampling with per-row thinking-mode control
    pack_multimodal   padded multimodal batch -> one packed sequence (embeddings, 1-D / M-RoPE positions, cu_seqlens)

Importing r4b_fast needs no GPU, nvcc, flash-attn or xformers; Triton kernels and CUDA libraries load on first use.
"""

from r4b_fast.backends import BACKENDS, BackendUnavailableError, available_backends, not_supported_reasons
from r4b_fast.modes import Mode
from r4b_fast.ops.fused_linear_logprobs import (
    PolicyLoss,
    fused_linear_logprobs,
    fused_linear_logprobs_ref,
    fused_linear_policy_loss,
    logprob_mismatch,
    logprobs_from_logits,
    rollout_importance_weights,
)
from r4b_fast.ops.group_advantages import GroupAdvantages, group_advantages, group_advantages_ref
from r4b_fast.ops.pack_multimodal import PackedBatch, pack_multimodal, pack_multimodal_ref, unpack
from r4b_fast.ops.sampling import ModeState, ModeStep, sample, sample_with_modes

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "GroupAdvantages",
    "Mode",
    "ModeState",
    "ModeStep",
    "PackedBatch",
    "PolicyLoss",
    "available_backends",
    "fused_linear_logprobs",
    "fused_linear_logprobs_ref",
    "fused_linear_policy_loss",
    "group_advantages",
    "group_advantages_ref",
    "logprob_mismatch",
    "logprobs_from_logits",
    "not_supported_reasons",
    "pack_multimodal",
    "pack_multimodal_ref",
    "rollout_importance_weights",
    "sample",
    "sample_with_modes",
    "unpack",
]
