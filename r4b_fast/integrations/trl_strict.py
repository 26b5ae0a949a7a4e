"""Strict modes in TRL's generation: the rollout sampler's rules as logits processors.

Part of :mod:`r4b_fast.integrations.trl` (import from there). The rules are those of
``r4b_fast.ops.sampling.ModeState`` (``min_think_tokens``, ``no_reopen``) and of the rollout engine's
``strict_auto``, applied to what TRL generates after the prompt (the forced mode prefix is part of the prompt, so
every generated token is sampled):

- ``min_think_tokens = k`` (thinking rows): inside the think block the prefix opened, ``think_end`` and every eos
  id are banned until ``k`` tokens plus the close sequence's tokens before ``think_end`` (the ``"\\n"`` of
  ``"\\n</think>\\n\\n"``) have been sampled;
- ``no_reopen`` (every row): once the row's think block is closed (by the non-thinking prefix or by the model),
  ``think_start`` and ``think_end`` are banned;
- ``strict_auto`` (auto rows, ``mode_split=False``): the first tokens are the two prefixes' common part (e.g.
  ``<think>``), then one of the two decision tokens (``"\\n"`` think, ``"\\n\\n"`` no think), nothing else.

A banned token's logit becomes ``-inf`` before temperature / top-k / top-p (transformers applies custom processors
first): the sampling distribution is the model's renormalised over the allowed tokens. The loss keeps the
unconstrained log-probs (TRL recomputes them with a forward); :class:`StrictModesLogitsProcessor` records, per
constrained token, ``-log`` of the allowed probability mass: the rollout / trainer log-prob mismatch, logged as
``strict/logp_mismatch/{mean,max}`` and ``strict/constrained_frac``.

:class:`StrictModesLogitsProcessor` is a transformers ``LogitsProcessor`` (what ``BPOTrainer`` passes to
``generate``); :func:`vllm_logits_processor_class` builds a class for vLLM's v1 logits-processor interface
(``vllm.v1.sample.logits_processor.LogitsProcessor``: ``validate_params``, ``__init__(vllm_config, device,
is_pin_memory)``, ``is_argmax_invariant``, ``update_state(BatchUpdate)``, ``apply(logits)``), activated per request
by ``SamplingParams.extra_args["r4b_strict"]`` (the rules as a dict), the mode read from the prompt's last tokens.
vLLM is not installed here: that class is tested on plain tensors with a stand-in base class and batch updates.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from r4b_fast.modes import Mode

EXTRA_ARGS_KEY = "r4b_strict"


@dataclass(frozen=True)
class StrictRules:
    """Token ids and switches of the strict modes (all ids from the tokenizer, never hard-coded).

    think_start / think_end: the single tokens that open / close a think block; eos_ids: every id that ends a
    rollout; close_offset: the close sequence's tokens before ``think_end``; think_prefix / no_think_prefix: the
    forced prefixes (a row's mode is read from how its prompt ends); auto_common: the prefixes' common part and
    decision: ``(think, no_think)`` tokens where they part (strict auto).
    """

    think_start: int
    think_end: int
    eos_ids: tuple[int, ...]
    think_prefix: tuple[int, ...]
    no_think_prefix: tuple[int, ...]
    close_offset: int = 0
    min_think_tokens: int = 0
    no_reopen: bool = False
    strict_auto: bool = False
    auto_common: tuple[int, ...] = ()
    decision: tuple[int, int] | None = None

    @property
    def min_end(self) -> int:
        return self.min_think_tokens + self.close_offset if self.min_think_tokens > 0 else 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> StrictRules:
        d = dict(d)
        for k in ("eos_ids", "think_prefix", "no_think_prefix", "auto_common"):
            d[k] = tuple(d.get(k, ()))
        if d.get("decision") is not None:
            d["decision"] = tuple(d["decision"])
        return cls(**d)

    def mode_of(self, prompt: list[int]) -> Mode:
        """A prompt's mode from its last tokens (the forced prefix), AUTO when it ends with neither."""
        for mode, prefix in ((Mode.NO_THINK, self.no_think_prefix), (Mode.THINK, self.think_prefix)):
            if prefix and list(prompt[-len(prefix) :]) == list(prefix):
                return mode
        return Mode.AUTO


@dataclass
class RowState:
    """One row's decoding state, advanced with each sampled token (O(1) per token)."""

    rules: StrictRules
    mode: Mode
    phase: int = 0  # 0 before a think block, 1 inside, 2 after
    opened: bool = False
    count: int = 0  # sampled tokens inside the block
    n: int = 0  # tokens generated
    auto_match: bool = False  # strict auto: the generated tokens so far follow the common part

    def __post_init__(self):
        if self.mode == Mode.THINK:
            self.phase, self.opened = 1, True
        elif self.mode == Mode.NO_THINK:
            self.phase, self.opened = 2, True
        self.auto_match = self.mode == Mode.AUTO and self.rules.strict_auto and self.rules.decision is not None

    def allowed_only(self) -> list[int] | None:
        """The only tokens allowed next (strict auto), or None."""
        if not self.auto_match:
            return None
        common = self.rules.auto_common
        if self.n < len(common):
            return [common[self.n]]
        if self.n == len(common):
            return list(self.rules.decision)
        return None

    def banned(self) -> list[int]:
        r = self.rules
        out = []
        if r.no_reopen and self.phase == 2:
            out += [r.think_start, r.think_end]
        if self.mode == Mode.THINK and self.phase == 1 and self.count < r.min_end:
            out += [r.think_end, *r.eos_ids]
        return out

    def advance(self, token: int) -> None:
        r = self.rules
        if self.phase == 1:
            self.count += 1
        if token == r.think_start and not self.opened:
            self.opened, self.phase = True, 1
        elif token == r.think_end and self.phase == 1:
            self.phase = 2
        if self.auto_match:  # still following the common part; the decision token ends the constraint
            allowed = self.allowed_only()
            self.auto_match = allowed is not None and token in allowed and self.n < len(r.auto_common)
        self.n += 1


def constrain(scores: torch.Tensor, states: list[RowState]) -> tuple[torch.Tensor, torch.Tensor]:
    """``scores [B, V]`` with each row's banned tokens at ``-inf`` (and, under strict auto, all but the allowed
    ones), and ``[B]`` float32 ``-log`` of the allowed mass under ``softmax(scores)`` (0 for an unconstrained row).
    A row whose allowed tokens all had ``-inf`` keeps them at 0 (uniform over the allowed), never an empty row."""
    B, V = scores.shape
    keep = torch.ones(B, V, dtype=torch.bool, device=scores.device)
    touched = False
    for i, st in enumerate(states):
        only = st.allowed_only()
        if only is not None:
            keep[i] = False
            keep[i, torch.tensor(only, device=scores.device)] = True
            touched = True
        ban = [t for t in st.banned() if 0 <= t < V]
        if ban:
            keep[i, torch.tensor(ban, device=scores.device)] = False
            touched = True
    if not touched:
        return scores, torch.zeros(B, device=scores.device)
    logp = torch.log_softmax(scores.float(), -1)
    mass = torch.where(keep, logp, float("-inf")).logsumexp(-1)
    out = scores.masked_fill(~keep, float("-inf"))
    dead = ~torch.isfinite(out).any(-1)
    if bool(dead.any()):
        out[dead] = torch.where(keep[dead], 0.0, float("-inf")).to(out.dtype)
    mismatch = torch.where(torch.isfinite(mass), -mass, torch.zeros_like(mass))
    return out, mismatch


class StrictModesLogitsProcessor:
    """A transformers ``LogitsProcessor`` applying :class:`StrictRules` to ``generate``'s rows.

    :meth:`begin` before each ``generate`` call: ``modes`` per row (None: read from the prompts). The first call
    takes the prompt width from ``input_ids``; every later call advances each row with its last token.
    ``stats()``: ``(constrained tokens, generated tokens, sum and max of the mismatch)`` since :meth:`begin`.

    Example:
        >>> proc = StrictModesLogitsProcessor(rules)                      # doctest: +SKIP
        >>> proc.begin([Mode.THINK, Mode.NO_THINK])                      # doctest: +SKIP
        >>> model.generate(ids, logits_processor=LogitsProcessorList([proc]))  # doctest: +SKIP
    """

    def __init__(self, rules: StrictRules):
        self.rules = rules
        self.begin(None)

    def begin(self, modes: list[Mode] | None) -> None:
        self.modes = modes
        self.states: list[RowState] | None = None
        self.width = None
        self.constrained = self.generated = 0
        self.mismatch_sum = self.mismatch_max = 0.0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.states is None:
            modes = self.modes or [self.rules.mode_of(row) for row in input_ids.tolist()]
            if len(modes) != input_ids.size(0):
                raise RuntimeError(f"StrictModesLogitsProcessor: {len(modes)} modes for {input_ids.size(0)} rows")
            self.states = [RowState(self.rules, Mode(int(m))) for m in modes]
            self.width = input_ids.size(1)
        elif input_ids.size(1) > self.width:
            for st, tok in zip(self.states, input_ids[:, -1].tolist()):
                st.advance(int(tok))
        out, mismatch = constrain(scores, self.states)
        hit = mismatch > 0
        self.generated += len(self.states)
        self.constrained += int(hit.sum())
        if bool(hit.any()):
            self.mismatch_sum += float(mismatch[hit].sum())
            self.mismatch_max = max(self.mismatch_max, float(mismatch.max()))
        return out

    def stats(self) -> dict[str, float]:
        n = max(self.constrained, 1)
        return {"strict/constrained_frac": self.constrained / max(self.generated, 1),
                "strict/logp_mismatch/mean": self.mismatch_sum / n, "strict/logp_mismatch/max": self.mismatch_max}


def violations(rules: StrictRules, modes: list[Mode], completions: list[list[int]]) -> list[str]:
    """Where generated ``completions`` break the rules (empty: none), e.g. to check that a vLLM engine applied
    them: each row replayed through :class:`RowState`."""
    out = []
    for r, (mode, ids) in enumerate(zip(modes, completions)):
        st = RowState(rules, Mode(int(mode)))
        for t, tok in enumerate(ids):
            only = st.allowed_only()
            if tok in st.banned() or (only is not None and tok not in only):
                out.append(f"row {r} ({Mode(int(mode)).name}) token {t}: {tok}")
                break
            st.advance(int(tok))
    return out


def vllm_logits_processor_class(base: type | None = None) -> type:
    """The strict-mode logits processor for vLLM's v1 interface (``base``: vLLM's ``LogitsProcessor``, imported
    when None). Rows whose request carries ``SamplingParams.extra_args["r4b_strict"]`` (``StrictRules.to_dict()``)
    are constrained; their mode is read from the prompt ids, their state from the live output-token list vLLM
    shares with the processor. Load it into vLLM through its ``vllm.logits_processors`` entry point (or
    ``LLM(logits_processors=[...])``); TRL's colocate mode passes ``GRPOConfig.generation_kwargs`` to
    ``SamplingParams``, which is how ``BPOTrainer`` sets ``extra_args``."""
    if base is None:
        from vllm.v1.sample.logits_processor import LogitsProcessor as base  # noqa: N813

    class R4BStrictModesLogitsProcessor(base):
        @classmethod
        def validate_params(cls, sampling_params) -> None:
            extra = getattr(sampling_params, "extra_args", None) or {}
            if EXTRA_ARGS_KEY in extra:
                StrictRules.from_dict(extra[EXTRA_ARGS_KEY])  # raises on a malformed dict

        def __init__(self, vllm_config=None, device=None, is_pin_memory=False):
            self.rows: dict[int, tuple[RowState, list[int]]] = {}  # batch index -> (state, live output ids)

        def is_argmax_invariant(self) -> bool:
            return False  # bans change the argmax

        def update_state(self, batch_update) -> None:
            if batch_update is not None:
                for index in batch_update.removed:
                    self.rows.pop(index, None)
                for index, params, prompt_ids, output_ids in batch_update.added:
                    extra = getattr(params, "extra_args", None) or {}
                    if EXTRA_ARGS_KEY not in extra:
                        self.rows.pop(index, None)
                        continue
                    rules = StrictRules.from_dict(extra[EXTRA_ARGS_KEY])
                    self.rows[index] = (RowState(rules, rules.mode_of(list(prompt_ids or []))), output_ids)
                for a, b, direction in batch_update.moved:
                    ra, rb = self.rows.pop(a, None), self.rows.pop(b, None)
                    if ra is not None:
                        self.rows[b] = ra
                    if rb is not None and str(getattr(direction, "name", direction)).upper().endswith("SWAP"):
                        self.rows[a] = rb
            for state, output_ids in self.rows.values():  # catch up with the tokens sampled since
                while state.n < len(output_ids):
                    state.advance(int(output_ids[state.n]))

        def apply(self, logits: torch.Tensor) -> torch.Tensor:
            if not self.rows:
                return logits
            index = sorted(self.rows)
            sub, _ = constrain(logits[index], [self.rows[i][0] for i in index])
            logits[index] = sub
            return logits

    return R4BStrictModesLogitsProcessor
