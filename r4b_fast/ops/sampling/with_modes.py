"""One rollout step under R-4B's mode control: :func:`sample_with_modes` samples every row and advances its
:class:`~r4b_fast.ops.sampling.mode_state.ModeState` in place (forced prefixes, thinking budget, strict-mode bans),
with no host sync."""

from __future__ import annotations

from typing import NamedTuple

import torch

from r4b_fast.modes import Mode
from r4b_fast.ops.sampling.dispatch import _sample_impl
from r4b_fast.ops.sampling.mode_state import PHASE_AFTER, PHASE_THINK, ModeState
from r4b_fast.ops.sampling.torch_backend import _sanitise


class ModeStep(NamedTuple):
    """One step of :func:`sample_with_modes`, all ``[B]``.

    tokens: int64 emitted tokens (pad for rows finished before this step); logprobs: float32
    ``log_softmax(logits / T)[token]`` (0 for pad); forced: bool, the token came from a forced sequence;
    active: bool, the row emitted a real token this step (it was not finished before it).
    """

    tokens: torch.Tensor
    logprobs: torch.Tensor
    forced: torch.Tensor
    active: torch.Tensor


def sample_with_modes(
    logits: torch.Tensor,
    state: ModeState,
    *,
    temperature: float | torch.Tensor = 1.0,
    top_k: int | torch.Tensor = 0,
    top_p: float | torch.Tensor = 1.0,
    min_p: float | torch.Tensor = 0.0,
    generator: torch.Generator | None = None,
    backend: str | None = None,
    check_values: bool = False,
    uniforms: torch.Tensor | None = None,
) -> ModeStep:
    """Sample every row, apply the R-4B mode constraints and advance ``state`` in place, with no host sync.

    Per row: a finished row emits ``pad_id``; a row with forced tokens left emits the next one (its mode's prefix,
    or the close sequence); a row inside a think block whose sampled-token count reached its budget starts emitting
    ``think_close_ids``; otherwise the freely sampled token (so AUTO rows are exactly :func:`sample`'s tokens for the
    same generator, unless ``no_reopen`` bans a think tag after their block). The row's phase follows
    ``think_start_id`` / ``think_end_id``; ``eos_id`` finishes it. Strict modes (``ModeState.create``'s
    ``min_think_tokens`` / ``no_reopen``): the banned ids of each row are removed inside the sampling kernel before
    the filters (as a logits processor setting them to ``-inf``); log-probs stay those of the unbanned
    distribution (what the training forward recomputes).
    Sampling arguments as in :func:`sample` (``check_values`` defaults to False here: no sync in the loop).

    Example:
        >>> import torch
        >>> from r4b_fast import Mode
        >>> from r4b_fast.ops.sampling import ModeState, sample_with_modes
        >>> st = ModeState.create([Mode.THINK, Mode.NO_THINK], [7, 1], [7, 2, 8, 2], [1, 8, 2], eos_id=9, pad_id=0)
        >>> logits = torch.zeros(2, 10)
        >>> [sample_with_modes(logits, st).tokens.tolist() for _ in range(2)]
        [[7, 7], [1, 2]]
    """
    if not isinstance(state, ModeState):
        raise TypeError(f"state: expected a ModeState, got {type(state).__name__}")
    if isinstance(logits, torch.Tensor) and logits.dim() == 2 and logits.shape[0] != state.batch_size:
        raise ValueError(f"logits: batch of {logits.shape[0]} rows, but state has {state.batch_size}")
    if isinstance(logits, torch.Tensor) and logits.device != state.mode.device:
        raise ValueError(f"logits: on device {logits.device}, but state is on {state.mode.device}")
    if isinstance(logits, torch.Tensor) and logits.dim() == 2 and state.max_token_id >= logits.shape[1]:
        raise ValueError(f"logits: vocabulary of {logits.shape[1]} tokens, but the state's forced / eos / pad ids "
                         f"go up to {state.max_token_id}")  # fmt: skip
    s = state
    banned = _mode_bans(s) if s.strict else None
    sampled, logprobs, row_max, log_z, temp = _sample_impl(logits, temperature, top_k, top_p, min_p, generator, backend,
                                                check_values, uniforms, banned)  # fmt: skip
    done_before = s.finished
    active = ~done_before
    in_queue = s.queue_pos < s.queue_len
    start_close = active & ~in_queue & (s.close_pos < 0) & (s.phase == PHASE_THINK) & (s.budget >= 0) & (
        s.think_count >= s.budget)  # fmt: skip
    close_pos = torch.where(start_close, 0, s.close_pos)
    closing = active & ~in_queue & (close_pos >= 0)
    q_tok = s.queue.gather(1, s.queue_pos.clamp(max=s.queue.shape[1] - 1)[:, None])[:, 0]
    c_tok = s.close_ids[close_pos.clamp(0, s.close_ids.numel() - 1)]
    forced = active & (in_queue | closing)
    tokens = torch.where(in_queue, q_tok, torch.where(closing, c_tok, sampled))
    tokens = torch.where(active, tokens, s.pad_id)
    # log-probs of forced tokens under the same (temperature-scaled, unfiltered) distribution
    _, inv, _ = _sanitise(temp, temp)
    forced_lp = (logits.gather(1, tokens[:, None])[:, 0].float() - row_max) * inv - log_z
    logprobs = torch.where(forced, forced_lp, logprobs)
    logprobs = torch.where(active, logprobs, 0.0)
    # advance
    s.think_count += (active & ~forced & (s.phase == PHASE_THINK)).to(torch.int64)
    s.queue_pos += (active & in_queue).to(torch.int64)
    nxt = close_pos + 1
    close_done = closing & (nxt >= s.close_ids.numel())  # the close sequence ends the think block
    s.close_pos.copy_(torch.where(closing, torch.where(close_done, -1, nxt), close_pos))
    opens = active & (tokens == s.think_start_id) & ~s.opened
    closes = active & (s.phase == PHASE_THINK) & ((tokens == s.think_end_id) | close_done)
    s.phase.copy_(torch.where(opens, PHASE_THINK, torch.where(closes, PHASE_AFTER, s.phase)))
    s.opened |= opens
    s.closed |= closes
    s.finished |= active & (tokens == s.eos_id)
    return ModeStep(tokens, logprobs, forced, active)


def _mode_bans(s: ModeState) -> torch.Tensor:
    """``[B, 3]`` int64 ids the next sampled token of each row must not be (-1: none), on the device, no sync
    (3 columns: the compiled variant ``kernels.sampling.MODE_BANS``): ``think_start_id`` / ``think_end_id`` after
    a closed block (no_reopen); ``think_end_id`` / ``eos_id`` inside a THINK row's block before ``min_end``
    sampled tokens."""
    short = (s.mode == int(Mode.THINK)) & (s.phase == PHASE_THINK) & (s.think_count < s.min_end)
    reopen = s.closed & s.no_reopen
    none = torch.full_like(s.think_count, -1)
    return torch.stack([torch.where(reopen, s.think_start_id, none), torch.where(reopen | short, s.think_end_id, none),
                        torch.where(short, s.eos_id, none)], 1)  # fmt: skip
