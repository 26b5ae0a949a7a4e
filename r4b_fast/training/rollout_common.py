"""What both rollout engines share: the validated request (:class:`RolloutSpec`), the left-padded prefill of a set of
prompts, the per-step noise, the strict-auto decision mask and the KV cache's construction.

Engines: :mod:`r4b_fast.training.rollout_engine` (prefill once per prompt, expand, compact) and
:mod:`r4b_fast.training.rollout_reference` (one row per rollout from the prompt on: the oracle).
"""

from __future__ import annotations

import dataclasses
import inspect

import torch

from r4b_fast.modes import Mode
from r4b_fast.ops.sampling import ModeState


@dataclasses.dataclass
class RolloutSpec:
    """A validated :func:`~r4b_fast.training.rollout.generate_rollouts` request.

    prompts: per prompt its token ids; row_prompt / row_mode: per rollout (row) its prompt and ``r4b_fast.Mode``;
    prompt_embeds / positions / deepstack: as :class:`~r4b_fast.training.rollout.PromptInputs` (or None);
    state_kwargs: :meth:`ModeState.create`'s keyword arguments; sampling: :func:`sample_with_modes`' sampling
    arguments (temperature, top_k, top_p, min_p, backend); decision_ids: ``[2]`` the strict-auto decision tokens
    (None: off) used at step ``decision_step``.
    """

    prompts: list[list[int]]
    row_prompt: list[int]
    row_mode: list[int]
    device: torch.device
    max_new_tokens: int
    pad_id: int
    sampling: dict
    state_kwargs: dict
    generator: torch.Generator | None = None
    noise_rows: tuple[int, int] | None = None
    prompt_embeds: list | None = None
    positions: list | None = None
    deepstack: list | None = None
    decision_ids: torch.Tensor | None = None
    decision_step: int = 0

    @property
    def rows(self) -> int:
        return len(self.row_prompt)

    def new_state(self) -> ModeState:
        """The mode state of every rollout (rows in rollout order)."""
        return ModeState.create(torch.tensor(self.row_mode, device=self.device), **self.state_kwargs)

    def auto_rows(self) -> torch.Tensor:
        """``[R]`` bool: the AUTO rollouts."""
        return torch.tensor(self.row_mode, device=self.device) == int(Mode.AUTO)


def cache_kwarg(model) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def new_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older transformers
        return DynamicCache()


def prefill(model, spec: RolloutSpec, members: list[int], cache):
    """Run the prompts ``members`` (prompt indices, one row each, repeats allowed), left-padded to the longest
    prompt of the request, through ``model`` into ``cache``. Returns ``(logits [n, V] float32 at each row's last
    prompt position, attention mask [n, L] int64, next position [n] or [3, n] int64)``."""
    device, n = spec.device, len(members)
    prompts = spec.prompts
    L = max(len(p) for p in prompts)  # every engine pads to the request's longest prompt: same rows, same numerics
    ids = torch.full((n, L), spec.pad_id, dtype=torch.int64)
    attn = torch.zeros(n, L, dtype=torch.int64)
    for r, p in enumerate(members):
        k = len(prompts[p])
        ids[r, L - k :] = torch.tensor(prompts[p])
        attn[r, L - k :] = 1
    ids, attn = ids.to(device), attn.to(device)
    position = (attn.cumsum(1) - 1).clamp_min(0)
    if spec.positions is not None:  # given per prompt (M-RoPE: [3, L_p]), left-padded like the tokens
        dims = spec.positions[0].shape[:-1]
        position = torch.zeros(*dims, n, L, dtype=torch.int64, device=device)
        for r, p in enumerate(members):
            pos = spec.positions[p]
            if pos.shape != (*dims, len(prompts[p])):
                raise ValueError(f"prompt_embeds.positions: prompt {p} expected shape {(*dims, len(prompts[p]))}"
                                 f", got {tuple(pos.shape)}")  # fmt: skip
            position[..., r, L - pos.shape[-1] :] = pos.to(device)
    first = dict(attention_mask=attn, position_ids=position, use_cache=True, **{cache_kwarg(model): cache})
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        first["logits_to_keep"] = 1  # the prompt's last position only, not [n, L, V] logits
    if spec.prompt_embeds is not None:
        H = spec.prompt_embeds[0].shape[-1]
        emb = torch.zeros(n, L, H, dtype=spec.prompt_embeds[0].dtype, device=device)
        for r, p in enumerate(members):
            e = spec.prompt_embeds[p]
            if e.shape != (len(prompts[p]), H):
                raise ValueError(f"prompt_embeds: prompt {p} expected shape ({len(prompts[p])}, {H}), "
                                 f"got {tuple(e.shape)}")  # fmt: skip
            emb[r, L - e.shape[0] :] = e.to(device)
        if spec.deepstack is not None:  # DeepStack: per layer [n * L, H] over every position (zero at text)
            k = spec.deepstack[0].shape[0]
            deep = torch.zeros(k, n, L, H, dtype=emb.dtype, device=device)
            for r, p in enumerate(members):
                deep[:, r, L - spec.deepstack[p].shape[1] :] = spec.deepstack[p].to(device=device, dtype=emb.dtype)
            first.update(visual_pos_masks=torch.ones(n, L, dtype=torch.bool, device=device),
                         deepstack_visual_embeds=list(deep.flatten(1, 2)))  # fmt: skip
        out = model(inputs_embeds=emb, **first)
    else:
        out = model(input_ids=ids, **first)
    # next position: after the text that ends every prompt (M-RoPE: all three equal)
    return out.logits[:, -1].float(), attn, position[..., -1] + 1


def draw_noise(spec: RolloutSpec) -> torch.Tensor:
    """The ``[R]`` uniforms of one step for every rollout of the request, drawn exactly as :func:`sample` draws
    them from ``generator`` (``torch.rand(R, generator=generator)``; with ``noise_rows``, this rank's slice of the
    global batch's draw): an engine that samples a subset of the rows indexes them, and the stream is unchanged."""
    R, device, g = spec.rows, spec.device, spec.generator
    if spec.noise_rows is not None:
        lo, total = spec.noise_rows
        return torch.rand(total, generator=g, device=g.device)[lo : lo + R].to(device)
    if g is not None and g.device != device and device.type != "cpu":
        return torch.rand(R, generator=g, device=g.device).to(device)
    return torch.rand(R, generator=g, device=device)


def decision_logits(logits: torch.Tensor, spec: RolloutSpec, auto_rows: torch.Tensor) -> torch.Tensor:
    """strict_auto: the AUTO rows' logits with every token but the two decision tokens at ``-inf``."""
    banned = torch.ones(logits.shape[-1], dtype=torch.bool, device=logits.device)
    banned[spec.decision_ids] = False
    return logits.masked_fill(auto_rows[:, None] & banned[None, :], float("-inf"))


def decision_logprobs(step, logits: torch.Tensor, spec: RolloutSpec, auto_rows: torch.Tensor):
    """strict_auto: the AUTO rows' recorded log-prob is the full-vocabulary one (T = 1 when greedy), as the training
    forward sees it."""
    T = spec.sampling["temperature"]
    full = torch.log_softmax(logits / (T if T > 0 else 1.0), -1)
    return step._replace(logprobs=torch.where(auto_rows, full.gather(1, step.tokens[:, None])[:, 0], step.logprobs))
