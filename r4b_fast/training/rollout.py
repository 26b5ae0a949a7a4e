"""Bi-mode rollout engine: batched generation on a transformers causal LM with its KV cache, every row constrained by
its R-4B mode through :func:`r4b_fast.ops.sampling.sample_with_modes` (forced ``<think>`` prefixes, thinking budget,
padding after eos), all on the device.

For BPO, every prompt gets ``g`` rollouts forced into thinking and ``g`` forced into non-thinking in one batch
(``bpo_modes(g)``); evaluation uses AUTO rows and a thinking budget. Prompts are left-padded; ``attention_mask`` and
``position_ids`` follow the padding, so a row's tokens do not depend on the other rows of the batch.

Host syncs: one per step (the count of finished rows: stop early, or compact); none inside sampling or mode control.
Text-only, or with precomputed prompt embeddings (``prompt_embeds``: e.g. text embeddings with image features
merged in, LLaVA style) passed through as ``inputs_embeds`` on the first forward; the engine runs no vision encoder.
A :class:`PromptInputs` may also carry per-prompt M-RoPE positions and DeepStack features; a Qwen-VL model runs as
its language model + LM head (``r4b_fast.models.LanguageModelWithHead``), so that they reach the text model.

Engines (``engine=``): ``"shared"`` (default, :mod:`r4b_fast.training.rollout_engine`): each prompt prefilled once
and its KV cache expanded to its rollouts, finished rows compacted out of the batch, the same per-rollout noise;
``"reference"`` (:mod:`r4b_fast.training.rollout_reference`): one row per rollout from the prompt on, every row to
the end (the oracle the tests compare with). docs/rollout-engine.md describes both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from r4b_fast.modes import Mode
from r4b_fast.training.rollout_common import RolloutSpec
from r4b_fast.training.rollout_common import cache_kwarg as _cache_kwarg  # noqa: F401  (imported by bench/tests)
from r4b_fast.training.rollout_common import new_cache as _new_cache  # noqa: F401

ENGINES = ("shared", "reference", "static")


@dataclasses.dataclass
class RolloutResult:
    """Rollouts in prompt order (all rollouts of prompt 0 first, in the order of its modes). ``R`` rollouts,
    ``N = max_new_tokens``.

    completions:     [R, N] int64 generated tokens (forced ones included), ``pad_id`` after a row finished.
    completion_mask: [R, N] bool, the row emitted a real token at that step (eos included, padding excluded).
    forced_mask:     [R, N] bool, the token was forced (mode prefix or budget close sequence), not sampled.
    logprobs:        [R, N] float32 ``log_softmax(logits / T)[token]`` (temperature-scaled, unfiltered; T = 1 for
                     greedy), 0 where ``completion_mask`` is False. Train on ``completion_mask & ~forced_mask``.
    modes:           [R] int64 ``r4b_fast.Mode`` of each rollout.
    prompt_index:    [R] int64 index of each rollout's prompt.
    lengths:         [R] int64 emitted tokens (``completion_mask.sum(1)``).
    think_opened:    [R] bool, the rollout opened a think block (forced or by itself).
    think_closed:    [R] bool, the think block was closed (by the model, or by the budget's close sequence).
    finished:        [R] bool, the rollout emitted eos (False: cut at ``max_new_tokens``).
    steps:           decoding steps run (<= N; the rest of the columns is padding).
    """

    completions: torch.Tensor
    completion_mask: torch.Tensor
    forced_mask: torch.Tensor
    logprobs: torch.Tensor
    modes: torch.Tensor
    prompt_index: torch.Tensor
    lengths: torch.Tensor
    think_opened: torch.Tensor
    think_closed: torch.Tensor
    finished: torch.Tensor
    steps: int

    @property
    def policy_mask(self) -> torch.Tensor:
        """[R, N] bool: the sampled (trainable) tokens, ``completion_mask & ~forced_mask``."""
        return self.completion_mask & ~self.forced_mask


class PromptInputs(list):
    """Per prompt its ``[L_p, H]`` embeddings (a list, usable wherever ``prompt_embeds`` is), plus optionally
    ``positions`` (per prompt ``[L_p]`` or ``[3, L_p]`` M-RoPE positions; decoding continues from the last one + 1)
    and ``deepstack`` (per prompt ``[K, L_p, H]``: added to the hidden states after decoder layer ``k < K`` at every
    prompt position, zero at text positions: Qwen3-VL's DeepStack)."""

    def __init__(self, embeds, positions=None, deepstack=None):
        super().__init__(embeds)
        self.positions = positions
        self.deepstack = deepstack


def _think_end_default(open_ids: list[int], no_think_ids: list[int], close_ids: list[int]) -> int | None:
    """The token that ends a think block when the caller names none: the first token of the close sequence that is
    not in the open sequence and is in the non-thinking block (both contain ``</think>``); with a BPE tokenizer
    without a ``</think>`` token this skips the close sequence's leading ``"\n"``. None: the sampler's default."""
    for t in close_ids:
        if t not in open_ids and t in no_think_ids:
            return int(t)
    return None


def _generation_model(model):
    """The Qwen-VL families run as language model + LM head (explicit M-RoPE positions and DeepStack features go
    to the text model); any other model as it is."""
    from r4b_fast.models.families import FAMILIES, LanguageModelWithHead

    name = type(model).__name__
    if any(name in f.architectures and f.rope == "mrope" for f in FAMILIES):
        return LanguageModelWithHead(model)
    return model


def bpo_modes(g: int) -> list[int]:
    """The modes of one BPO group: ``g`` thinking then ``g`` non-thinking rollouts."""
    if isinstance(g, bool) or not isinstance(g, int) or g < 1:
        raise ValueError(f"g: expected a positive int, got {g!r}")
    return [int(Mode.THINK)] * g + [int(Mode.NO_THINK)] * g


@torch.no_grad()  # not inference_mode: the results feed the training step (old log-probs, ids) as plain tensors
def generate_rollouts(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    modes: Sequence[Sequence[int]],
    *,
    think_open_ids: Sequence[int],
    no_think_ids: Sequence[int],
    think_close_ids: Sequence[int],
    eos_id: int,
    pad_id: int,
    max_new_tokens: int,
    budget: int | None = None,
    auto_ids: Sequence[int] = (),
    think_start_id: int | None = None,
    think_end_id: int | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    generator: torch.Generator | None = None,
    backend: str | None = None,
    prompt_embeds: Sequence[torch.Tensor] | None = None,
    noise_rows: tuple[int, int] | None = None,
    min_think_tokens: int = 0,
    no_reopen: bool = False,
    strict_auto: bool = False,
    engine: str = "shared",
    compact_below: float = 0.75,
    num_threads: int | None = 1,
) -> RolloutResult:
    """Generate ``sum(len(m) for m in modes)`` rollouts: prompt ``p`` once per entry of ``modes[p]``.

    Args:
        model: a transformers causal LM (``model(input_ids | inputs_embeds, attention_mask, position_ids, cache,
            use_cache=True)``), run under ``torch.no_grad`` on its own device and dtype (set ``model.eval()``).
        prompts: token ids per prompt (the chat template up to and including the assistant turn's start).
        modes: per prompt, the ``r4b_fast.Mode`` of each of its rollouts (``bpo_modes(g)`` for BPO).
        think_open_ids / no_think_ids / think_close_ids / auto_ids / think_start_id / think_end_id / eos_id /
            pad_id / budget: as :meth:`ModeState.create` (the tokenizer's ids, never hard-coded).
        max_new_tokens: decoding steps at most (forced tokens count).
        temperature / top_k / top_p / min_p / generator / backend: as :func:`r4b_fast.ops.sampling.sample`.
        prompt_embeds: optional, per prompt a ``[L_p, H]`` tensor replacing the token embeddings of its prompt
            (e.g. with image features merged in); ``prompts`` still give the lengths. A :class:`PromptInputs`
            adds M-RoPE positions and DeepStack features.
        noise_rows: ``(offset, total)``: these rollouts are rows ``[offset, offset + R)`` of a global batch of
            ``total``; each step draws the global batch's noise from ``generator`` and uses this slice, so that
            data-parallel ranks together sample exactly what one process generating the whole batch would.
        min_think_tokens: strict thinking for THINK rollouts (0: off): ``</think>`` and eos cannot be sampled before
            this many tokens were sampled in the think block (the close sequence's tokens before ``</think>`` not
            counted), so a model that would close the block at once still thinks. At most ``budget``.
        no_reopen: once a rollout's think block is closed (NO_THINK's forced empty block, or a closed thinking
            block, AUTO included), ``<think>`` / ``</think>`` (``think_start_id`` / ``think_end_id``) cannot be
            sampled: no think tag after the block. Both as :meth:`ModeState.create`.
        strict_auto: AUTO rollouts' first sampled token (right after ``auto_ids``) is one of the two tokens where
            the thinking and non-thinking prefixes part (``"\\n"`` / ``"\\n\\n"`` after ``<think>``): the
            think / no-think decision, nothing else (a model drifting to ``<think>:`` cannot write a third mode).
            Its log-prob stays the full-vocabulary one, what the training forward computes.
        engine: ``"shared"`` (default): each prompt is prefilled once and its KV cache expanded to its rollouts;
            finished rows leave the batch; ``"reference"``: one row per rollout from the prompt on, every row to the
            end (the oracle); ``"static"``: prefilled once, then fixed-shape decoding steps (static KV buffers and
            mask, no compaction) captured with ``torch.compile(mode="reduce-overhead")`` on CUDA (eager on CPU).
            Same tokens for the same seed (every engine hands every rollout the uniform the reference's sampler
            draws for it), log-probs equal to float rounding.
        compact_below: shared engine: the finished rows are compacted out of the batch (KV cache and per-row state
            indexed down) when the live rows fall below this fraction of the batch (1: at every finished row; 0:
            never).
        num_threads: CPU models: torch's intra-op threads while generating (restored after); None: leave torch's
            setting. Default 1: a decoding step's small GEMMs gain nothing from more threads in CPU time, and on a
            shared machine OpenMP's spin-waiting barriers cost up to 10x the CPU time of the work (measured:
            docs/rollout-engine.md, the in-loop 4x). No effect on other devices.

    Returns:
        :class:`RolloutResult`.

    Example:
        >>> import torch
        >>> from transformers import Qwen3Config, Qwen3ForCausalLM
        >>> from r4b_fast.training.rollout import bpo_modes, generate_rollouts
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <...>
        >>> cfg = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                   num_attention_heads=4, num_key_value_heads=2, head_dim=8)
        >>> out = generate_rollouts(Qwen3ForCausalLM(cfg).eval(), [[1, 2, 3], [4, 5]], [bpo_modes(1)] * 2,
        ...     think_open_ids=[60, 61], no_think_ids=[60, 62, 63, 62], think_close_ids=[61, 63, 62],
        ...     eos_id=59, pad_id=0, max_new_tokens=6, temperature=0.0)
        >>> out.completions.shape, out.completions[1, :4].tolist()
        (torch.Size([4, 6]), [60, 62, 63, 62])
    """
    _check_options(engine, compact_below, num_threads, max_new_tokens, noise_rows, generator)
    prompt_lists = _prompt_lists(prompts, modes, prompt_embeds)
    model = _generation_model(model)
    if think_end_id is None:
        think_end_id = _think_end_default(list(think_open_ids), list(no_think_ids), list(think_close_ids))
    device = next(model.parameters()).device
    row_prompt, row_mode = _rows(modes, noise_rows)
    spec = RolloutSpec(
        prompts=prompt_lists, row_prompt=row_prompt, row_mode=row_mode, device=device, max_new_tokens=max_new_tokens,
        pad_id=pad_id, generator=generator, noise_rows=None if noise_rows is None else tuple(noise_rows),
        sampling=dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, backend=backend),
        state_kwargs=dict(think_open_ids=think_open_ids, no_think_ids=no_think_ids, think_close_ids=think_close_ids,
                          budget=budget, eos_id=eos_id, pad_id=pad_id, auto_ids=auto_ids,
                          think_start_id=think_start_id, think_end_id=think_end_id,
                          min_think_tokens=min_think_tokens, no_reopen=no_reopen),
        prompt_embeds=None if prompt_embeds is None else list(prompt_embeds),
        positions=getattr(prompt_embeds, "positions", None), deepstack=getattr(prompt_embeds, "deepstack", None),
        decision_step=len(auto_ids),
    )  # fmt: skip
    spec.new_state()  # validates the mode arguments before any forward
    if strict_auto and Mode.AUTO in row_mode:
        spec.decision_ids = _decision_ids(think_open_ids, no_think_ids, auto_ids, device)
    fields = _run_engine(model, spec, engine, float(compact_below), num_threads)
    return RolloutResult(prompt_index=torch.tensor(row_prompt, device=device),
                         lengths=fields["completion_mask"].sum(1), **fields)  # fmt: skip


def _check_options(engine, compact_below, num_threads, max_new_tokens, noise_rows, generator) -> None:
    if engine not in ENGINES:
        raise ValueError(f"engine: expected one of {ENGINES}, got {engine!r}")
    if isinstance(compact_below, bool) or not isinstance(compact_below, (int, float)) or not 0 <= compact_below <= 1:
        raise ValueError(f"compact_below: expected a fraction in [0, 1], got {compact_below!r}")
    bad_threads = isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1
    if num_threads is not None and bad_threads:
        raise ValueError(f"num_threads: expected a positive int or None, got {num_threads!r}")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected a positive int, got {max_new_tokens!r}")
    if noise_rows is not None and (generator is None or len(noise_rows) != 2):
        raise ValueError("noise_rows: expected (offset, total) together with a generator")


def _prompt_lists(prompts, modes, prompt_embeds) -> list[list[int]]:
    if len(prompts) == 0:
        raise ValueError("prompts: empty")
    if len(modes) != len(prompts):
        raise ValueError(f"modes: {len(modes)} entries for {len(prompts)} prompts; give a list of modes per prompt")
    prompt_lists = []
    for i, p in enumerate(prompts):
        ids = p.tolist() if isinstance(p, torch.Tensor) else list(p)
        if len(ids) == 0:
            raise ValueError(f"prompts: prompt {i} is empty")
        prompt_lists.append([int(t) for t in ids])
    if prompt_embeds is not None and len(prompt_embeds) != len(prompts):
        raise ValueError(f"prompt_embeds: {len(prompt_embeds)} entries for {len(prompts)} prompts")
    return prompt_lists


def _rows(modes, noise_rows) -> tuple[list[int], list[int]]:
    """Each rollout's prompt and mode, in order."""
    row_prompt, row_mode = [], []
    for p, ms in enumerate(modes):
        ms = list(ms)
        if not ms:
            raise ValueError(f"modes: prompt {p} has no rollouts")
        row_prompt += [p] * len(ms)
        row_mode += [int(m) for m in ms]
    R = len(row_prompt)
    if noise_rows is not None and not (0 <= noise_rows[0] and noise_rows[0] + R <= noise_rows[1]):
        raise ValueError(f"noise_rows: rows [{noise_rows[0]}, {noise_rows[0] + R}) do not fit a batch of "
                         f"{noise_rows[1]}")  # fmt: skip
    return row_prompt, row_mode


def _decision_ids(think_open_ids, no_think_ids, auto_ids, device) -> torch.Tensor:
    """strict_auto: the two tokens where the thinking and non-thinking prefixes part."""
    from r4b_fast.training.mode_decision import DecisionTokens

    d = DecisionTokens.from_prefixes(list(think_open_ids), list(no_think_ids))
    if list(auto_ids) != list(think_open_ids[: d.position]):
        raise ValueError(f"strict_auto: auto_ids {list(auto_ids)} must be the prefixes' common part "
                         f"{list(think_open_ids[: d.position])}")  # fmt: skip
    return torch.tensor([d.think, d.no_think], device=device)


def _run_engine(model, spec: RolloutSpec, engine: str, compact_below: float, num_threads: int | None) -> dict:
    """The chosen engine under ``num_threads`` CPU threads (torch's setting restored after)."""
    threads = torch.get_num_threads()
    if num_threads is not None and spec.device.type == "cpu":
        torch.set_num_threads(num_threads)
    try:
        if engine == "reference":
            from r4b_fast.training.rollout_reference import generate_reference

            return generate_reference(model, spec)
        if engine == "static":
            from r4b_fast.training.rollout_static import generate_static

            return generate_static(model, spec)
        from r4b_fast.training.rollout_engine import generate_shared

        return generate_shared(model, spec, compact_below=compact_below)
    finally:
        torch.set_num_threads(threads)
