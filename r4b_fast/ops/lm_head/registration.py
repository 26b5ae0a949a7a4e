"""The torch.library custom ops of the fused LM head, their fake (meta) implementations and autograd glue, so the
public functions work under ``torch.compile(fullgraph=True)``.

- ``r4b_fast::fused_linear_logprobs`` (+ ``_backward``): per-token log-probs / entropy; the backward recomputes each
  chunk's logits from the saved log-sum-exp (4 GEMMs for forward + backward).
- ``r4b_fast::fused_linear_policy_loss_grads``: the policy loss's gradients formed during the forward (3 GEMMs), its
  per-token constants passed as one ``float[]`` (``_PPO.as_op_list``).
- ``r4b_fast::attach_lm_head_grads``: the loss value, differentiable with those precomputed gradients.

Each op runs its value checks (one host sync, also under compile, where the op body runs eagerly); the same sync tells
whether ignored rows hold a non-finite hidden state, which the driver then zeroes (``_Head.mask_rows``). The forward
op hands that flag to its backward as a CPU tensor: reading it costs no device sync.
"""

from __future__ import annotations

import torch

from r4b_fast.ops.lm_head.checks import _check_values
from r4b_fast.ops.lm_head.driver import _Grads, _Head, _lm_head_backward, _lm_head_forward, nonfinite_ignored_rows
from r4b_fast.ops.lm_head.token_loss import _PPO, _ppo_token_grad


def _head(hidden, weight, bias, targets, temperature, ignore_index, backend) -> _Head:
    """The validated head (one host sync); its ignored rows are masked when any holds a non-finite value."""
    n_masked = _check_values(targets, temperature, weight.shape[0], ignore_index,
                             nonfinite_ignored_rows(hidden, targets, ignore_index))  # fmt: skip
    return _Head(hidden, weight, bias, targets, 1.0 / temperature, ignore_index, backend, mask_rows=n_masked > 0)


def _flag(value: bool) -> torch.Tensor:
    return torch.tensor(bool(value), device="cpu")


# ----------------------------------------------------------------------------------------------------------------
# fused_linear_logprobs: forward, recomputing backward
# ----------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("r4b_fast::fused_linear_logprobs", mutates_args=())
def _flp_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    temperature: torch.Tensor,
    ignore_index: int,
    with_entropy: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logp, entropy, lse)`` fp32 ``[T]`` and a 0-dim bool CPU tensor: were ignored rows masked."""
    head = _head(hidden, weight, bias, targets, temperature, ignore_index, backend)
    return (*_lm_head_forward(head, with_entropy), _flag(head.mask_rows))


@_flp_op.register_fake
def _(hidden, weight, bias, targets, temperature, ignore_index, with_entropy, backend):
    T = hidden.shape[0]
    return (*(hidden.new_empty(T, dtype=torch.float32) for _ in range(3)),
            torch.empty((), dtype=torch.bool, device="cpu"))  # fmt: skip


@torch.library.custom_op("r4b_fast::fused_linear_logprobs_backward", mutates_args=())
def _flp_backward_op(
    grad_logp: torch.Tensor,
    grad_ent: torch.Tensor | None,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    temperature: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    masked: torch.Tensor,
    ignore_index: int,
    need_dh: bool,
    need_dw: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    head = _Head(hidden, weight, bias, targets, 1.0 / temperature, ignore_index, backend, mask_rows=bool(masked))
    valid = targets != ignore_index
    gl = torch.where(valid, grad_logp.float(), 0.0)
    gh = torch.where(valid, grad_ent.float(), 0.0) if grad_ent is not None else None
    grads = _Grads.empty(head, need_dh, need_dw, bias is not None)
    _lm_head_backward(head, lse, entropy, gl, gh, grads)
    return grads.outputs(head)


def _grads_fake(hidden, weight, bias, need_dh, need_dw):
    return (hidden.new_empty(hidden.shape if need_dh else 0), weight.new_empty(weight.shape if need_dw else 0),
            bias.new_empty(bias.shape) if bias is not None else hidden.new_empty(0))  # fmt: skip


@_flp_backward_op.register_fake
def _(grad_logp, grad_ent, hidden, weight, bias, targets, temperature, lse, entropy, masked, ignore_index, need_dh,
      need_dw, backend):  # fmt: skip
    return _grads_fake(hidden, weight, bias, need_dh, need_dw)


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, temperature, ignore_index, with_entropy, backend = inputs
    _, entropy, lse, masked = output
    ctx.save_for_backward(hidden, weight, bias, targets, temperature, lse, entropy, masked)
    ctx.ignore_index, ctx.with_entropy, ctx.backend = ignore_index, with_entropy, backend
    ctx.has_bias = bias is not None
    ctx.set_materialize_grads(False)  # an unused entropy output gives grad None: no entropy term in the backward


def _backward(ctx, grad_logp, grad_ent, grad_lse, grad_masked):
    hidden, weight, bias, targets, temperature, lse, entropy, masked = ctx.saved_tensors
    if grad_logp is None:
        grad_logp = torch.zeros_like(lse)
    if not ctx.with_entropy:
        grad_ent = None
    need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dh, dw, db = _flp_backward_op(
        grad_logp, grad_ent, hidden, weight, bias if ctx.has_bias else None, targets, temperature, lse, entropy,
        masked, ctx.ignore_index, need_dh, need_dw, ctx.backend,
    )  # fmt: skip
    return (dh if need_dh else None, dw if need_dw else None, db if ctx.has_bias else None,
            None, None, None, None, None)  # fmt: skip


_flp_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# fused_linear_policy_loss: gradients formed in the forward, attached to the loss value
# ----------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("r4b_fast::fused_linear_policy_loss_grads", mutates_args=())
def _policy_grads_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    temperature: torch.Tensor,
    ignore_index: int,
    advantages: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    token_weights: torch.Tensor,
    entropy_weights: torch.Tensor | None,
    is_weights: torch.Tensor | None,
    constants: list[float],
    need_dh: bool,
    need_dw: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logp, entropy, dh, dw, db)`` of ``loss = sum_t token_weights[t] * loss_tok[t] - entropy_coef *
    sum_t entropy_weights[t] * entropy[t]`` (token-level importance; ``entropy_weights`` None: ``token_weights``):
    each chunk's ``d loss / d logp`` (``_ppo_token_grad``) and ``d loss / d entropy`` weight the chunk's logit
    gradient, and its two GEMMs follow at once. ``constants``: ``_PPO.as_op_list()``."""
    head = _head(hidden, weight, bias, targets, temperature, ignore_index, backend)
    ppo = _PPO.from_op_list(constants)
    ent_w = token_weights if entropy_weights is None else entropy_weights
    gh_const = None if ppo.entropy_coef == 0 else -ppo.entropy_coef * ent_w

    def grad_fn(t0, t1, logp, entropy):
        log_ratio = logp - old_logprobs[t0:t1] if old_logprobs is not None else torch.zeros_like(logp)
        ref = ref_logprobs[t0:t1] if ref_logprobs is not None else None
        w = is_weights[t0:t1] if is_weights is not None else None
        gl = _ppo_token_grad(log_ratio, logp, advantages[t0:t1], ref, ppo, w) * token_weights[t0:t1]
        return gl, (gh_const[t0:t1] if gh_const is not None else None)

    grads = _Grads.empty(head, need_dh, need_dw, bias is not None)
    logp, entropy, _ = _lm_head_forward(head, True, grad_fn, grads)
    return (logp, entropy, *grads.outputs(head))


@_policy_grads_op.register_fake
def _(hidden, weight, bias, targets, temperature, ignore_index, advantages, old_logprobs, ref_logprobs, token_weights,
      entropy_weights, is_weights, constants, need_dh, need_dw, backend):  # fmt: skip
    T = hidden.shape[0]
    rows = (hidden.new_empty(T, dtype=torch.float32), hidden.new_empty(T, dtype=torch.float32))
    return (*rows, *_grads_fake(hidden, weight, bias, need_dh, need_dw))


@torch.library.custom_op("r4b_fast::attach_lm_head_grads", mutates_args=())
def _attach_grads_op(
    loss: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    dh: torch.Tensor,
    dw: torch.Tensor,
    db: torch.Tensor,
) -> torch.Tensor:
    """The loss value, differentiable in ``hidden`` / ``weight`` / ``bias`` with the gradients formed in the forward
    (``dh`` etc. for a unit upstream gradient; empty where not computed)."""
    return loss.clone()


@_attach_grads_op.register_fake
def _(loss, hidden, weight, bias, dh, dw, db):
    return loss.new_empty(loss.shape)


def _attach_setup_context(ctx, inputs, output):
    _, _, _, bias, dh, dw, db = inputs
    ctx.save_for_backward(dh, dw, db)
    ctx.has_bias = bias is not None


def _attach_backward(ctx, grad):
    dh, dw, db = ctx.saved_tensors
    need = ctx.needs_input_grad

    def scaled(g):  # the upstream gradient of the loss is a scalar
        return g * grad.to(g.dtype) if g.numel() else None

    return (None, scaled(dh) if need[1] else None, scaled(dw) if need[2] else None,
            scaled(db) if ctx.has_bias and need[3] else None, None, None, None)  # fmt: skip


_attach_grads_op.register_autograd(_attach_backward, setup_context=_attach_setup_context)
