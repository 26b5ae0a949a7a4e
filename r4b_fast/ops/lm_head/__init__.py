"""The fused LM head: log-probs, entropy and the clipped policy loss without materialising the ``[T, V]`` logits.

One file per job:

- ``reference.py``: ``fused_linear_logprobs_ref``, the eager fp32 oracle (materialises the logits).
- ``driver.py``: the chunked GEMM driver shared by the backends (``_Head``, ``_Grads``, forward / backward loops).
- ``epilogues.py``: the per-chunk epilogues, torch (vectorised, the CPU path) and Triton (kernels in
  ``r4b_fast/kernels/fused_linear_logprobs.py``). No cuda backend: the GEMMs are cuBLAS already and the epilogue is a
  row-wise streaming kernel Triton writes as well as hand CUDA would.
- ``registration.py``: the torch.library custom ops, their fakes and autograd.
- ``logprobs.py``: the public ``fused_linear_logprobs`` and ``logprobs_from_logits``.
- ``checks.py`` / ``policy_checks.py``: argument validation (public boundary, one host sync for values).
- ``settings.py``: ``PolicyLoss``, the loss settings; ``presets.py``: ``PolicyLoss.trl`` / ``PolicyLoss.verl``.
- ``token_loss.py``: the PPO token math; ``policy_loss.py``: the public ``fused_linear_policy_loss``.
- ``importance.py``: ``rollout_importance_weights`` and ``logprob_mismatch``.
"""

from r4b_fast.ops.lm_head.checks import LM_HEAD_DTYPES, LOGPROB_TOLERANCE, MIN_TEMPERATURE
from r4b_fast.ops.lm_head.importance import logprob_mismatch, rollout_importance_weights
from r4b_fast.ops.lm_head.logprobs import OP_BACKENDS, PREFERRED, fused_linear_logprobs, logprobs_from_logits
from r4b_fast.ops.lm_head.policy_loss import fused_linear_policy_loss
from r4b_fast.ops.lm_head.reference import fused_linear_logprobs_ref
from r4b_fast.ops.lm_head.settings import AGGREGATIONS, IMPORTANCE_LEVELS, PolicyLoss

__all__ = [
    "AGGREGATIONS",
    "IMPORTANCE_LEVELS",
    "LM_HEAD_DTYPES",
    "LOGPROB_TOLERANCE",
    "MIN_TEMPERATURE",
    "OP_BACKENDS",
    "PREFERRED",
    "PolicyLoss",
    "fused_linear_logprobs",
    "fused_linear_logprobs_ref",
    "fused_linear_policy_loss",
    "logprob_mismatch",
    "logprobs_from_logits",
    "rollout_importance_weights",
]
