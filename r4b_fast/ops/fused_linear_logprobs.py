"""Fused LM-head log-probs, entropy and the GRPO / DAPO / Dr.GRPO / GSPO / BPO policy loss, never materialising the
``[T, V]`` logits. The implementation lives in :mod:`r4b_fast.ops.lm_head` (one file per job); this module re-exports
it so that ``from r4b_fast.ops.fused_linear_logprobs import ...`` keeps working, private names included.

Design (the one known to reach GEMM speed on GPUs): per chunk of tokens, the ``[rows, V]`` logits by one GEMM, one
epilogue over the chunk (online log-sum-exp, target gather, entropy and, when gradients are needed, ``d loss / d
logits`` in place), then dHidden and dWeight by two more GEMMs. ``fused_linear_policy_loss`` forms its gradients in
the forward (3 GEMMs); ``fused_linear_logprobs`` recomputes the logits in its backward (4 GEMMs).

Tuning knobs live where they are read: ``r4b_fast.ops.lm_head.driver.CHUNK_ELEMENTS`` and
``r4b_fast.ops.lm_head.epilogues.EPILOGUE_ELEMENTS`` (setting them here has no effect).
"""

from r4b_fast.ops.lm_head.checks import (  # noqa: F401
    LM_HEAD_DTYPES,
    LOGPROB_TOLERANCE,
    MIN_TEMPERATURE,
    _check_float,
    _check_targets,
    _check_temperature_float,
    _check_values,
    _temperature_tensor,
    _validate_linear,
)
from r4b_fast.ops.lm_head.driver import (  # noqa: F401
    CHUNK_ELEMENTS,
    _Grads,
    _Head,
    _lm_head_backward,
    _lm_head_forward,
)
from r4b_fast.ops.lm_head.epilogues import (  # noqa: F401
    EPILOGUE_ELEMENTS,
    _epilogue_torch,
    _epilogue_triton,
    _grad_coefficients,
    _grad_epilogue_torch,
    _grad_epilogue_triton,
)
from r4b_fast.ops.lm_head.importance import (  # noqa: F401
    IS_LEVELS,
    IS_LOG_RATIO_BOUND,
    _check_logprob_pair,
    logprob_mismatch,
    rollout_importance_weights,
)
from r4b_fast.ops.lm_head.logprobs import (  # noqa: F401
    OP_BACKENDS,
    PREFERRED,
    _autocast_inputs,
    _prepare_head,
    fused_linear_logprobs,
    logprobs_from_logits,
)
from r4b_fast.ops.lm_head.policy_loss import fused_linear_policy_loss  # noqa: F401
from r4b_fast.ops.lm_head.reference import fused_linear_logprobs_ref  # noqa: F401
from r4b_fast.ops.lm_head.registration import (  # noqa: F401
    _attach_grads_op,
    _flp_backward_op,
    _flp_op,
    _policy_grads_op,
)
from r4b_fast.ops.lm_head.settings import AGGREGATIONS, IMPORTANCE_LEVELS, PolicyLoss  # noqa: F401
from r4b_fast.ops.lm_head.token_loss import (  # noqa: F401
    _PPO,
    _inside,
    _k3,
    _log_ratio_bounds,
    _masked_mean,
    _ppo_token_grad,
    _ppo_token_loss,
    _token_weights,
)
