"""The fused BPO loss inside the model's forward, and its arguments from TRL's settings.

Part of :mod:`r4b_fast.integrations.trl` (import from there).
"""

from __future__ import annotations

import dataclasses
import functools
import types

import torch

from r4b_fast import PolicyLoss
from r4b_fast.ops.fused_linear_logprobs import fused_linear_policy_loss
from r4b_fast.training.mode_decision import mode_decision_loss


def install_loss_forward(model) -> None:
    """Let ``model(..., r4b_policy_loss=spec)`` return ``fused_linear_policy_loss``'s ``(loss, metrics)`` computed from
    the backbone's last hidden states: the loss runs inside the (possibly wrapped) model's forward, like TRL's fused
    LM head, so data-parallel wrappers see every parameter used in one forward. Other calls go to the previous
    forward unchanged (generation, TRL's ``fused_lm_head=True`` scoring).

    ``spec["decision"]`` (optional: ``tokens``, ``positions`` ``[B]`` int64 indices into the input of the states
    that predict each row's decision token, ``targets``, ``weights``, ``coef``) adds ``coef *`` the mode-decision
    loss with the policy loss's ``normaliser`` and ``temperature``, and its ``decision_loss`` / ``decision_p_think``
    metrics."""
    previous = model.forward

    # the class's signature stays visible (generate validates its model kwargs, e.g. pixel_values, against it)
    @functools.wraps(type(model).forward)
    def forward(self, *args, r4b_policy_loss=None, **kwargs):
        if r4b_policy_loss is None:
            return previous(*args, **kwargs)
        spec = dict(r4b_policy_loss)
        keep = spec.pop("logits_to_keep")
        cast_fp32 = spec.pop("cast_lm_head_to_fp32")
        decision = spec.pop("decision", None)
        kwargs["use_cache"] = False
        states = self.base_model(*args, **kwargs).last_hidden_state
        hidden = states[:, -keep - 1 : -1]  # states before each target
        head = self.get_output_embeddings()
        weight, bias = head.weight, head.bias
        if hasattr(weight, "full_tensor"):  # FSDP2 shards the head as a DTensor; the op takes a plain tensor
            weight = weight.full_tensor()
            bias = bias.full_tensor() if bias is not None else None
        hidden = hidden.to(weight.device)
        if cast_fp32:
            with torch.autocast(hidden.device.type, enabled=False):
                loss, metrics = fused_linear_policy_loss(hidden.float(), weight.float(),
                                                         bias=None if bias is None else bias.float(), **spec)
        else:
            loss, metrics = fused_linear_policy_loss(hidden, weight, bias=bias, **spec)
        if decision is None:
            return loss, metrics
        # the decision token is prompt (the forced prefix), so its predicting state sits at a prompt position, one
        # per row: hand mode_decision_loss those states as a one-position "completion"
        rows = torch.arange(states.size(0), device=states.device)
        at = states[rows, decision["positions"].to(states.device)].unsqueeze(1).to(weight.device)  # [B, 1, D]
        with torch.autocast(at.device.type, enabled=False):  # two logits per row: fp32 whatever the autocast
            term, m = mode_decision_loss(at.float(), weight, dataclasses.replace(decision["tokens"], position=0),
                                         decision["targets"], decision["weights"], temperature=spec["temperature"],
                                         normaliser=_normaliser(spec["loss"], spec["mask"]))  # fmt: skip
        metrics = {**metrics, "decision_loss": term.detach(), "decision_p_think": m["decision_p_think"].mean()}
        return loss + decision["coef"] * term, metrics

    model.forward = types.MethodType(forward, model)


def _normaliser(settings, mask):
    """The policy loss's denominator for this micro-batch (the preset's, else the call's own count)."""
    if settings.normaliser is not None:
        return settings.normaliser
    if settings.aggregation == "token-mean":
        return mask.sum().clamp(min=1).float()
    return float(mask.size(0))


def policy_loss_spec(self, inputs, mask) -> dict:
    """``fused_linear_policy_loss``'s arguments for TRL's settings (``self``: the trainer) and this micro-batch: the
    loss settings are ``PolicyLoss.trl`` of the ``GRPOConfig`` (the preset checked against TRL's own loss), with
    this micro-batch's counts."""
    train = self.model.training
    accum = self.current_gradient_accumulation_steps if train else 1  # no accumulation in eval
    settings = PolicyLoss.trl(
        self.loss_type, epsilon=float(self.epsilon_low), epsilon_high=float(self.epsilon_high), beta=float(self.beta),
        importance_sampling_level=self.importance_sampling_level, max_completion_length=self.max_completion_length,
        entropy_coef=float(self.entropy_coef or 0.0), gradient_accumulation_steps=accum,
        num_sequences=inputs["completion_ids"].size(0), num_tokens=mask.sum(),
        num_items_in_batch=inputs["num_items_in_batch"], num_processes=self.accelerator.num_processes,
        steps_per_generation=self.args.steps_per_generation if train else 1,
    )  # fmt: skip
    spec = dict(
        targets=inputs["completion_ids"], advantages=inputs["advantages"], mask=mask,
        old_logprobs=inputs.get("old_per_token_logps"),
        ref_logprobs=inputs.get("ref_per_token_logps") if self.beta != 0.0 else None,
        temperature=float(self.temperature), loss=settings,
        logits_to_keep=inputs["completion_ids"].size(1), cast_lm_head_to_fp32=bool(self.args.cast_lm_head_to_fp32),
    )  # fmt: skip
    if self.use_vllm and self.vllm_importance_sampling_correction:  # TRL's ratio: [B, T] per token, [B, 1] per seq
        weights = inputs["importance_sampling_ratio"]  # any vllm_importance_sampling_mode, as TRL computed it
        spec["rollout_is_weights"] = weights.squeeze(-1) if weights.size(-1) == 1 else weights
    if self.bpo_decision is not None and "bpo_decision_target" in inputs:
        spec["decision"] = dict(tokens=self.bpo_decision, positions=decision_positions(self, inputs),
                                targets=inputs["bpo_decision_target"], weights=inputs["bpo_decision_weight"],
                                coef=float(self.args.decision_coef))  # fmt: skip
    return spec


def decision_positions(self, inputs) -> torch.Tensor:
    """``[B]`` int64: per row, the index in ``cat(prompt, completion)`` of the hidden state that predicts the
    decision token. The prompt ends with the row's prefix (left padding, or any padding: the last real prompt
    token is found from the mask); the decision token is the prefix's token ``position``, so its state is one
    before it."""
    mask = inputs["prompt_mask"]
    index = torch.arange(mask.size(1), device=mask.device)
    last = torch.where(mask.bool(), index, -1).amax(1)  # the last real prompt token
    start = last + 1 - inputs["bpo_prefix_length"].to(mask.device)  # where the forced prefix begins
    return start + self.bpo_decision.position - 1
