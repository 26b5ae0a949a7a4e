"""The reference rollout engine (``generate_rollouts(..., engine="reference")``): the engine as it was before the
shared-prefill engine, kept as its oracle (as flash-attention keeps ``*_ref``). Every rollout is its own row from
the prompt on: the prompt is prefilled once per rollout (``2g`` times per BPO prompt), every row stays in the batch
until the last one finishes, the sampler draws its own uniforms from ``generator``."""

from __future__ import annotations

import torch

from r4b_fast.ops.sampling import sample_with_modes
from r4b_fast.training.rollout_common import (
    RolloutSpec,
    cache_kwarg,
    decision_logits,
    decision_logprobs,
    new_cache,
    prefill,
)


def generate_reference(model, spec: RolloutSpec) -> dict:
    """Decode every rollout of ``spec`` in one batch of ``R`` rows; returns the fields of ``RolloutResult``."""
    device, R, N = spec.device, spec.rows, spec.max_new_tokens
    state = spec.new_state()
    auto_rows = spec.auto_rows()
    cache = new_cache(model)
    ckw = cache_kwarg(model)
    logits, attn, next_pos = prefill(model, spec, spec.row_prompt, cache)
    completions = torch.full((R, N), spec.pad_id, dtype=torch.int64, device=device)
    cmask = torch.zeros(R, N, dtype=torch.bool, device=device)
    fmask = torch.zeros_like(cmask)
    logprobs = torch.zeros(R, N, dtype=torch.float32, device=device)
    ones = torch.ones(R, 1, dtype=attn.dtype, device=device)
    steps = 0
    for t in range(N):
        if spec.noise_rows is None:
            noise = dict(generator=spec.generator)
        else:  # this rank's slice of the global batch's one uniform per row
            lo, total = spec.noise_rows
            u = torch.rand(total, generator=spec.generator, device=spec.generator.device)[lo : lo + R]
            noise = dict(uniforms=u.to(device))
        decide = spec.decision_ids is not None and t == spec.decision_step
        sampled_logits = decision_logits(logits, spec, auto_rows) if decide else logits
        step = sample_with_modes(sampled_logits, state, **spec.sampling, **noise)
        if decide:
            step = decision_logprobs(step, logits, spec, auto_rows)
        completions[:, t] = step.tokens
        cmask[:, t] = step.active
        fmask[:, t] = step.forced
        logprobs[:, t] = step.logprobs
        steps = t + 1
        if t == N - 1 or bool(state.finished.all()):  # the one host sync per step
            break
        attn = torch.cat([attn, ones], 1)
        out = model(input_ids=step.tokens[:, None], attention_mask=attn, position_ids=next_pos[..., None],
                    use_cache=True, **{ckw: cache})  # fmt: skip
        logits = out.logits[:, -1].float()
        next_pos = next_pos + 1
    return dict(completions=completions, completion_mask=cmask, forced_mask=fmask, logprobs=logprobs,
                modes=state.mode.clone(), think_opened=state.opened.clone(), think_closed=state.closed.clone(),
                finished=state.finished.clone(), steps=steps)  # fmt: skip
