"""The static-shape rollout engine (``generate_rollouts(..., engine="static")``): gpt-fast's method for GPUs.

The prompts are prefilled once and expanded as in :mod:`r4b_fast.training.rollout_engine`; then every decoding step
has the same shapes and addresses: the KV cache is fixed ``[R, H, L + N, D]`` buffers written in place at a device
position counter, the attention mask is a preallocated ``[R, 1, 1, L + N]`` bool mask (the prompt's padding and the
positions not decoded yet are off), so the step can be captured once (``torch.compile(mode="reduce-overhead")``:
CUDA graphs) and replayed. Rows are not compacted (static batch): finished rows decode padding to the end, as in
the reference engine. ``compile=None`` compiles on CUDA only; on CPU the step runs eagerly (the equality tests run
it so). The noise is drawn as the reference's sampler draws it: the same tokens for the same seed.
"""

from __future__ import annotations

import torch

from r4b_fast.ops.sampling import sample_with_modes
from r4b_fast.training.rollout_common import (
    RolloutSpec,
    cache_kwarg,
    decision_logits,
    decision_logprobs,
    draw_noise,
    prefill,
)
from r4b_fast.training.rollout_engine import growing_cache, select_cache


def _static_layer_class():
    from transformers.cache_utils import DynamicLayer

    class StaticBufferLayer(DynamicLayer):
        """Fixed ``[R, H, cap, D]`` key / value buffers; ``update`` writes the step's position (``pos``, a 0-d
        device tensor advanced in place by the engine) and returns the whole buffers (the 4-D mask hides the rest).
        """

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor):
            super().__init__()
            self.keys, self.values, self.pos = keys, values, pos
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            self.keys.index_copy_(2, self.pos.view(1), key_states)
            self.values.index_copy_(2, self.pos.view(1), value_states)
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.keys.shape[-2]

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.keys.shape[-2], 0

    return StaticBufferLayer


def generate_static(model, spec: RolloutSpec, *, compile: bool | None = None) -> dict:
    """Decode every rollout of ``spec`` with fixed-shape steps; returns the fields of ``RolloutResult``."""
    device, R, N = spec.device, spec.rows, spec.max_new_tokens
    cache = growing_cache(model, headroom=N)
    ckw = cache_kwarg(model)
    members = sorted(set(spec.row_prompt))
    logits, attn, next_pos = prefill(model, spec, members, cache)
    slot = {p: i for i, p in enumerate(members)}
    expand = torch.tensor([slot[p] for p in spec.row_prompt], device=device)
    select_cache(cache, expand)
    logits, attn, next_pos = logits.index_select(0, expand), attn.index_select(0, expand), next_pos[..., expand]
    L = attn.shape[1]
    cap = L + N
    pos = torch.tensor(L, device=device)  # the cache position the next step writes
    _make_static(cache, L, cap, pos)
    mask = torch.zeros(R, 1, 1, cap, dtype=torch.bool, device=device)
    mask[:, 0, 0, :L] = attn.bool()
    position = next_pos.clone()
    step = _decode_step(model, cache, ckw, pos, compile if compile is not None else device.type == "cuda")
    state = spec.new_state()
    auto_rows = spec.auto_rows()
    completions = torch.full((R, N), spec.pad_id, dtype=torch.int64, device=device)
    cmask = torch.zeros(R, N, dtype=torch.bool, device=device)
    fmask = torch.zeros_like(cmask)
    logprobs = torch.zeros(R, N, dtype=torch.float32, device=device)
    steps = 0
    for t in range(N):
        u = draw_noise(spec)
        decide = spec.decision_ids is not None and t == spec.decision_step
        sampled_logits = decision_logits(logits, spec, auto_rows) if decide else logits
        s = sample_with_modes(sampled_logits, state, **spec.sampling, uniforms=u)
        if decide:
            s = decision_logprobs(s, logits, spec, auto_rows)
        completions[:, t], cmask[:, t], fmask[:, t], logprobs[:, t] = s.tokens, s.active, s.forced, s.logprobs
        steps = t + 1
        if t == N - 1 or bool(state.finished.all()):  # the one host sync per step
            break
        mask[:, 0, 0, L + t] = True  # the position this step writes
        logits = step(s.tokens, position, mask)
        pos += 1
        position += 1
    return dict(completions=completions, completion_mask=cmask, forced_mask=fmask, logprobs=logprobs,
                modes=state.mode.clone(), think_opened=state.opened.clone(), think_closed=state.closed.clone(),
                finished=state.finished.clone(), steps=steps)  # fmt: skip


def _make_static(cache, L: int, cap: int, pos: torch.Tensor) -> None:
    """Replace each layer of the prefilled cache by a static layer over buffers of ``cap`` positions."""
    layer_cls = _static_layer_class()
    for i, layer in enumerate(cache.layers):
        if not hasattr(layer, "_kbuf"):
            raise ValueError(f"engine='static': cache layer {i} ({type(layer).__name__}) is not a full-attention "
                             f"layer; use engine='shared'")  # fmt: skip
        k, v = layer._kbuf, layer._vbuf
        if k.shape[-2] < cap:  # the prefill's buffers have room for N positions: always cap here
            k = torch.cat([k, k.new_zeros(*k.shape[:2], cap - k.shape[-2], k.shape[-1])], 2)
            v = torch.cat([v, v.new_zeros(*v.shape[:2], cap - v.shape[-2], v.shape[-1])], 2)
        k, v = k[:, :, :cap], v[:, :, :cap]
        k[:, :, L:].zero_()  # never garbage under the mask: 0 * NaN would still be NaN
        v[:, :, L:].zero_()
        cache.layers[i] = layer_cls(k, v, pos)


def _decode_step(model, cache, ckw: str, pos: torch.Tensor, compile: bool):
    """One fixed-shape decoding step; compiled with CUDA graphs when ``compile``."""

    def step(tokens, position, mask):
        out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=position[..., None], use_cache=True,
                    **{ckw: cache})  # fmt: skip
        return out.logits[:, -1].float()

    if not compile:
        return step
    for layer in cache.layers:  # fixed addresses, mutated in place (as transformers' StaticLayer)
        for buf in (layer.keys, layer.values):
            torch._dynamo.mark_static_address(buf)
    torch._dynamo.mark_static_address(pos)
    return torch.compile(step, mode="reduce-overhead")
