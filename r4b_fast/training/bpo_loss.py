"""The BPO loss of one micro-batch: the policy's hidden states for each completion token (:func:`policy_forward`,
any family the loops load, gradients reaching vision tower, projector and LLM), the clipped policy loss from the LM
head's input and BPO's mode-decision loss (:func:`micro_batch_loss`)."""

from __future__ import annotations

import contextvars
import copy
import types
from dataclasses import dataclass

import torch
import torch.utils.checkpoint

from r4b_fast import unpack
from r4b_fast.ops.fused_linear_logprobs import fused_linear_policy_loss
from r4b_fast.training.evaluation import ModeTokens
from r4b_fast.training.mode_decision import DecisionTokens, mode_decision_loss
from r4b_fast.training.vision import ImageEncoder

__all__ = ["MicroBatch", "enable_gradient_checkpointing", "micro_batch_loss", "policy_forward", "select_rows"]


def policy_forward(model, items, prompt_ids, rollouts, image_id, pad_id, encoder: ImageEncoder | None = None):
    """Hidden states that predict each completion token: ``[R, N, D]`` (gradients reach vision, projector, LLM).
    Any family the loops load: the model's family packs the rows (1-D RoPE, or M-RoPE + DeepStack for Qwen)."""
    R, N = rollouts.completions.shape
    device = next(model.parameters()).device
    lens = [len(prompt_ids[p]) for p in rollouts.prompt_index.tolist()]
    width = max(lens) + N
    ids = torch.full((R, width), pad_id, dtype=torch.int64)
    attn = torch.zeros(R, width, dtype=torch.int64)
    for r, p in enumerate(rollouts.prompt_index.tolist()):
        n = lens[r]
        ids[r, :n] = torch.tensor(prompt_ids[p])
        ids[r, n : n + N] = rollouts.completions[r].cpu()
        attn[r, :n] = 1
        attn[r, n : n + N] = rollouts.completion_mask[r].long().cpu()
    ids, attn = ids.to(device), attn.to(device)
    encoder = encoder or ImageEncoder(model)
    images = encoder.encode(model, [it.image() for it in items])  # per item, with grad
    # Pack prompt + completion of every rollout into one sequence (no padding computed). A sampled placeholder token
    # in a completion is text, not a placeholder: hide it from the placeholder search, keep its embedding.
    in_prompt = torch.arange(width, device=device)[None, :] < torch.tensor(lens, device=device)[:, None]
    placeholders = torch.where((ids == image_id) & ~in_prompt, pad_id, ids)
    rows = images.select(rollouts.prompt_index.tolist())  # each rollout row's image
    flat, packed = encoder.family.packed_hidden(model, placeholders, attn, rows,
                                                text_embeds=model.get_input_embeddings()(ids))  # fmt: skip
    hidden = unpack(flat, packed)  # [R, width, D]
    # position lens - 1 + t (the last prompt token, then the completion) predicts completion token t
    index = torch.tensor(lens, device=device)[:, None] - 1 + torch.arange(N, device=device)[None, :]
    return hidden.gather(1, index[..., None].expand(R, N, hidden.shape[-1]))


@dataclass
class MicroBatch:
    """What one forward/backward of the policy needs: the rollouts of some rows and their training signals."""

    items: list
    prompt_ids: list[list[int]]
    rollouts: object  # RolloutResult restricted to the rows, prompt_index renumbered into ``items``
    advantages: torch.Tensor
    mask: torch.Tensor
    old_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor | None
    decision: DecisionTokens | None = None  # BPO's mode-decision loss (None: off)
    decision_targets: torch.Tensor | None = None  # [R] Mode its group's verdict pushes the decision to
    decision_weights: torch.Tensor | None = None  # [R] float >= 0
    rollout_is_weights: torch.Tensor | None = None  # --rollout-is: truncated pi_train / pi_rollout per token


def micro_batch_loss(model, mb: MicroBatch, tokens: ModeTokens, args, normaliser, encoder: ImageEncoder):
    """The clipped policy loss of one micro-batch (``LossModule``'s function: FSDP2's root under torchrun)."""
    hidden = policy_forward(model, mb.items, mb.prompt_ids, mb.rollouts, tokens.image, tokens.pad, encoder)
    loss, metrics = fused_linear_policy_loss(
        hidden, model.lm_head.weight, mb.rollouts.completions, mb.advantages, mb.mask, old_logprobs=mb.old_logprobs,
        ref_logprobs=mb.ref_logprobs, beta=args.beta, clip_low=args.clip, clip_high=args.clip,
        temperature=args.temperature, aggregation=args.aggregation, normaliser=normaliser,
        rollout_is_weights=mb.rollout_is_weights,
    )  # fmt: skip
    if mb.decision is not None:
        decision, m = mode_decision_loss(hidden, model.lm_head.weight, mb.decision, mb.decision_targets,
                                         mb.decision_weights, temperature=args.temperature, normaliser=normaliser)
        loss = loss + args.decision_coef * decision
        metrics["decision_loss"] = decision.detach()
        hard = torch.tensor([mb.items[p].hard is True for p in mb.rollouts.prompt_index.tolist()], device=hidden.device)
        easy = torch.tensor([mb.items[p].hard is False for p in mb.rollouts.prompt_index.tolist()],
                            device=hidden.device)  # fmt: skip
        for level, rows in (("hard", hard), ("easy", easy)):
            if rows.any():  # p(think) at auto mode's decision: every step, not only at evaluations
                metrics[f"decision/p_think_{level}"] = m["decision_p_think"][rows].mean()
    return loss, metrics


def select_rows(rollouts, rows: torch.Tensor):
    """The rollouts of ``rows`` (a shallow copy with every per-row tensor indexed)."""
    out = copy.copy(rollouts)
    for field in ("completions", "completion_mask", "forced_mask", "logprobs", "modes", "prompt_index", "lengths",
                  "think_opened", "think_closed", "finished"):
        setattr(out, field, getattr(rollouts, field)[rows])
    return out


def _checkpointed_forward(self, *args, **kwargs):
    """A layer's forward under non-reentrant ``torch.utils.checkpoint`` while it trains with grad. The recompute in
    the backward runs in a copy of the forward's context: the packed forward's segments live in a context variable
    (``r4b_fast.packed_forward``), and without them the recomputed attention would span every sequence of the pack
    (transformers' own gradient checkpointing recomputes outside that context)."""
    forward = type(self).forward.__get__(self)
    if not (self.training and torch.is_grad_enabled()):
        return forward(*args, **kwargs)
    ctx = contextvars.copy_context()
    return torch.utils.checkpoint.checkpoint(ctx.run, forward, *args, use_reentrant=False, **kwargs)


def enable_gradient_checkpointing(model) -> int:
    """--gradient-checkpointing: every layer of the language model and of the vision tower (transformers'
    ``GradientCheckpointingLayer`` modules) recomputes its activations in the backward instead of keeping them:
    the same loss and gradients, less memory. Only while training with grad: generation and no-grad forwards run as
    before. Bound per module, so a ``copy.deepcopy`` of the model keeps it for itself. Returns the number of
    checkpointed layers (an error if there is none)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = 0
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module.forward = types.MethodType(_checkpointed_forward, module)
            layers += 1
    if not layers:
        raise ValueError(f"--gradient-checkpointing: {type(model).__name__} has no layer that can checkpoint")
    return layers
