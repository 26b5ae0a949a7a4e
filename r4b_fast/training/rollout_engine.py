"""The shared-prefill, compacting rollout engine (``generate_rollouts``' default, ``engine="shared"``): each piece
of work once.

1. Prefill once per prompt: the ``P`` distinct prompts (with their image features, M-RoPE positions, DeepStack
   features) run through the model as ``P`` rows, then the KV cache, the last logits, the attention mask and the
   next positions are expanded to the ``R`` rollouts by one index (``index_select``: copy-on-expand, every row owns
   its cache from there on). BPO's ``2g`` rollouts of a prompt share one prefill instead of ``2g``; their mode
   prefixes (forced tokens) are decoded per row as before.
2. Compaction: finished rows leave the batch. When the live rows drop below ``compact_below`` of the batch, the KV
   cache and every per-row tensor (mode state, attention mask, positions, the strict-auto rows, the row map) are
   indexed down to the live rows in one pass (amortised: one index per ``1 - compact_below`` of the rows), so the
   decoding steps cost what the unfinished rollouts cost.
3. Same samples: every step draws the uniforms of all ``R`` rollouts exactly as the sampler would
   (``torch.rand(R, generator)``; with ``noise_rows`` the global batch's) and hands each live row its own, so
   compaction never changes which uniform a rollout gets: the tokens equal the reference engine's
   (``engine="reference"``) for the same seed, and the log-probs to float rounding (the GEMMs see fewer rows).

Host syncs: one per step (the number of finished rows: stop, or compact), as before.

:func:`growing_cache` (KV cache layers appending in place into buffers with room for the decoded tokens) is the
static engine's (:mod:`r4b_fast.training.rollout_static`) starting point.
"""

from __future__ import annotations

import dataclasses

import torch

from r4b_fast.ops.sampling import ModeState, sample_with_modes
from r4b_fast.training.rollout_common import (
    RolloutSpec,
    cache_kwarg,
    decision_logits,
    decision_logprobs,
    draw_noise,
    new_cache,
    prefill,
)

_NOT_PER_ROW = frozenset({"close_ids"})  # ModeState's tensor fields that are not [B] / [B, ...] per row
_RESULT_FIELDS = ("opened", "closed", "finished")


def select_state(state: ModeState, keep: torch.Tensor) -> ModeState:
    """A new :class:`ModeState` of the rows ``keep`` (every per-row tensor field indexed, shared ones kept)."""
    changes = {}
    for f in dataclasses.fields(state):
        v = getattr(state, f.name)
        if isinstance(v, torch.Tensor) and f.name not in _NOT_PER_ROW:
            changes[f.name] = v.index_select(0, keep)
    return dataclasses.replace(state, **changes)


def select_cache(cache, index: torch.Tensor) -> None:
    """Index the KV cache's batch dimension in place (expand with repeats, or keep the live rows)."""
    cache.batch_select_indices(index)


def _growing_layer_class():
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """A ``DynamicLayer`` whose keys / values are views ``[:, :, :n]`` of buffers with room for ``headroom``
        more positions: appending a decoded token writes it in place, where ``DynamicLayer.update`` concatenates
        (a copy of the whole cache per step and layer). Batch indexing (expand, compact) copies the buffers."""

        headroom = 256

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                self._kbuf = self._vbuf = None
            n, add = self.get_seq_length(), key_states.shape[-2]
            if self._kbuf is None or n + add > self._kbuf.shape[-2]:
                kb = key_states.new_empty(*key_states.shape[:2], n + add + self.headroom, key_states.shape[-1])
                vb = value_states.new_empty(*value_states.shape[:2], n + add + self.headroom, value_states.shape[-1])
                if n:
                    kb[:, :, :n], vb[:, :, :n] = self.keys, self.values
                self._kbuf, self._vbuf = kb, vb
            self._kbuf[:, :, n : n + add] = key_states
            self._vbuf[:, :, n : n + add] = value_states
            self.keys, self.values = self._kbuf[:, :, : n + add], self._vbuf[:, :, : n + add]
            return self.keys, self.values

        def batch_select_indices(self, indices):
            if self.get_seq_length() > 0:
                n = self.get_seq_length()
                self._kbuf, self._vbuf = self._kbuf.index_select(0, indices), self._vbuf.index_select(0, indices)
                self.keys, self.values = self._kbuf[:, :, :n], self._vbuf[:, :, :n]

        def batch_repeat_interleave(self, repeats: int) -> None:
            self.batch_select_indices(torch.arange(self.keys.shape[0], device=self.keys.device)
                                      .repeat_interleave(repeats))  # fmt: skip

        def reorder_cache(self, beam_idx) -> None:
            self.batch_select_indices(beam_idx.to(self.keys.device))

        def crop(self, tokens_to_remove: int) -> None:
            super().crop(tokens_to_remove)
            if self.is_initialized and self.keys is not None:
                n = self.keys.shape[-2]
                self.keys, self.values = self._kbuf[:, :, :n], self._vbuf[:, :, :n]

    return GrowingLayer


def growing_cache(model, headroom: int):
    """``new_cache(model)`` whose full-attention layers append in place (:func:`_growing_layer_class`), with room
    for ``headroom`` decoded positions after the prompt; other layer kinds (sliding windows) are kept as they are."""
    from transformers.cache_utils import DynamicLayer

    cache = new_cache(model)
    cls = _growing_layer_class()
    cls.headroom = max(1, int(headroom))
    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer and not layer.is_initialized:
            cache.layers[i] = cls()
    if getattr(cache, "layer_class_to_replicate", None) is DynamicLayer:
        cache.layer_class_to_replicate = cls
    return cache


def generate_shared(model, spec: RolloutSpec, *, compact_below: float = 0.75) -> dict:
    """Decode every rollout of ``spec``, prefilling each prompt once and dropping finished rows; returns the
    fields of ``RolloutResult`` (rows in rollout order)."""
    device, R, N = spec.device, spec.rows, spec.max_new_tokens
    # transformers' DynamicCache: its per-step concatenation measured no slower on CPU than in-place buffers
    # (growing_cache: -3% to +7% CPU time at B = 32 / 8), which only the static engine needs
    cache = new_cache(model)
    ckw = cache_kwarg(model)
    members = sorted(set(spec.row_prompt))
    logits, attn, next_pos = prefill(model, spec, members, cache)
    # expand: prompt -> its rollouts (copy-on-expand of the cache: the rows diverge from the first token on)
    slot = {p: i for i, p in enumerate(members)}
    expand = torch.tensor([slot[p] for p in spec.row_prompt], device=device)
    if len(members) != R:
        select_cache(cache, expand)
        logits, attn, next_pos = logits.index_select(0, expand), attn.index_select(0, expand), next_pos[..., expand]
    state = spec.new_state()
    auto_rows = spec.auto_rows()
    final = {name: getattr(state, name).clone() for name in _RESULT_FIELDS}
    completions = torch.full((R, N), spec.pad_id, dtype=torch.int64, device=device)
    cmask = torch.zeros(R, N, dtype=torch.bool, device=device)
    fmask = torch.zeros_like(cmask)
    logprobs = torch.zeros(R, N, dtype=torch.float32, device=device)
    live = None  # the rollout of each row once compacted (None: all R rows, in order)
    steps = 0
    for t in range(N):
        u = draw_noise(spec)
        if live is not None:
            u = u.index_select(0, live)
        decide = spec.decision_ids is not None and t == spec.decision_step
        sampled_logits = decision_logits(logits, spec, auto_rows) if decide else logits
        step = sample_with_modes(sampled_logits, state, **spec.sampling, uniforms=u)
        if decide:
            step = decision_logprobs(step, logits, spec, auto_rows)
        at = slice(None) if live is None else live
        completions[at, t], cmask[at, t], fmask[at, t] = step.tokens, step.active, step.forced
        logprobs[at, t] = step.logprobs
        steps = t + 1
        rows = state.batch_size
        done = int(state.finished.sum())  # the one host sync per step
        if t == N - 1 or done == rows:
            break
        tokens = step.tokens
        if done and rows - done < compact_below * rows:  # compaction: the finished rows leave
            keep = torch.nonzero(~state.finished)[:, 0]
            _write_back(final, state, live)
            live = keep if live is None else live.index_select(0, keep)
            state = select_state(state, keep)
            select_cache(cache, keep)
            attn, next_pos, tokens = attn.index_select(0, keep), next_pos[..., keep], tokens.index_select(0, keep)
            auto_rows = auto_rows.index_select(0, keep)
        attn = torch.cat([attn, attn.new_ones(attn.shape[0], 1)], 1)
        out = model(input_ids=tokens[:, None], attention_mask=attn, position_ids=next_pos[..., None],
                    use_cache=True, **{ckw: cache})  # fmt: skip
        logits = out.logits[:, -1].float()
        next_pos = next_pos + 1
    _write_back(final, state, live)
    return dict(completions=completions, completion_mask=cmask, forced_mask=fmask, logprobs=logprobs,
                modes=torch.tensor(spec.row_mode, device=device), think_opened=final["opened"],
                think_closed=final["closed"], finished=final["finished"], steps=steps)  # fmt: skip


def _write_back(final: dict, state: ModeState, live: torch.Tensor | None) -> None:
    """The live rows' result fields (opened / closed / finished) into the full ``[R]`` tensors."""
    for name in _RESULT_FIELDS:
        if live is None:
            final[name].copy_(getattr(state, name))
        else:
            final[name][live] = getattr(state, name)
