"""The mode prefixes BPOTrainer appends to TRL's prompts, the decision token where they part, and the strict-mode
rules over them: a mixin of :class:`~r4b_fast.integrations.trl.BPOTrainer`.

Part of :mod:`r4b_fast.integrations.trl` (import from there).
"""

from __future__ import annotations

from r4b_fast.integrations.trl_config import DEFAULT_NO_THINK_PREFIX, DEFAULT_THINK_PREFIX, THINK_CLOSE, THINK_OPEN
from r4b_fast.integrations.trl_strict import StrictRules
from r4b_fast.modes import Mode, shared_prefix_length
from r4b_fast.training.mode_decision import DecisionTokens

CLOSE_SEQUENCE = f"\n{THINK_CLOSE}\n\n"  # R-4B's documented think close (r4b_fast.models.chat.DOCUMENTED_CLOSE)


class PrefixMixin:
    """Prefix, decision-token and strict-rule set-up of BPOTrainer (needs ``processing_class``, ``_tokenizer``,
    ``args``, ``chat_template_kwargs``, ``_is_vlm``, ``model``, ``eos_token_ids``)."""

    def _render_generation_prompt(self, **template_kwargs) -> str | None:
        """The chat template's rendering of a one-message conversation up to the generation prompt (None: no
        template), with TRL's chat_template_kwargs and ``template_kwargs`` on top."""
        if getattr(self.processing_class, "chat_template", None) is None and self._tokenizer.chat_template is None:
            return None
        content = [{"type": "text", "text": "x"}] if self._is_vlm else "x"
        kwargs = {**self.chat_template_kwargs, **template_kwargs}
        return self.processing_class.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                         add_generation_prompt=True, **kwargs)  # fmt: skip

    def _mode_prefixes(self) -> tuple[dict[Mode, str], dict[Mode, list[int]]]:
        """Each forced mode's text (what follows the assistant turn's start) and its ids appended to the prompt. A
        template whose generation prompt ends with an open ``<think>`` (R-4B's auto mode) keeps it: the ids are
        what follows it (``"\\n"`` / ``"\\n\\n</think>\\n\\n"``), the texts stay whole."""
        base = self._render_generation_prompt()
        opened = base is not None and base.endswith(THINK_OPEN)
        if base is not None and (THINK_CLOSE in base.rsplit("x", 1)[-1] or (base.rstrip().endswith(THINK_OPEN)
                                                                             and not opened)):  # fmt: skip
            raise ValueError("chat_template_kwargs / chat template: the generation prompt already fixes a mode "
                             f"(it ends {base[-40:]!r}); BPO appends each mode's prefix itself, so leave the mode open "
                             "(e.g. no enable_thinking=False)")  # fmt: skip
        no_think = self.args.no_think_prefix
        if no_think is None and base is not None:
            no_think = self._template_no_think(base)
            if no_think is not None and opened:
                no_think = THINK_OPEN + no_think
        texts = {Mode.THINK: self.args.think_prefix or DEFAULT_THINK_PREFIX,
                 Mode.NO_THINK: no_think or DEFAULT_NO_THINK_PREFIX}  # fmt: skip
        ids = {}
        for mode, text in texts.items():
            if opened and not text.startswith(THINK_OPEN):
                raise ValueError(f"BPOConfig.{'think' if mode == Mode.THINK else 'no_think'}_prefix: the chat "
                                 f"template's generation prompt opens {THINK_OPEN!r} itself, so each prefix must "
                                 f"start with it, got {text!r}")  # fmt: skip
            ids[mode] = self._prefix_ids(base if base is not None else "", text[len(THINK_OPEN) :] if opened else text)
        return texts, ids

    def _template_no_think(self, base: str) -> str | None:
        """What the template appends for non-thinking mode (Qwen3's ``enable_thinking=False``, R-4B's
        ``thinking_mode="short"``), None when it has no such switch."""
        for switch in ({"enable_thinking": False}, {"thinking_mode": "short"}):
            try:
                off = self._render_generation_prompt(**switch)
            except Exception:  # a template that rejects the flag has no such switch
                continue
            tail = off[len(base) :] if off.startswith(base) else ""
            if THINK_CLOSE in tail:
                return tail
        return None

    def _prefix_ids(self, context: str, text: str) -> list[int]:
        """``text``'s ids right after ``context`` (the rendered generation prompt): tokenized in context, so BPE
        merges at the boundary are those the model sees."""
        tok = self._tokenizer
        before = tok(context, add_special_tokens=False)["input_ids"]
        after = tok(context + text, add_special_tokens=False)["input_ids"]
        if after[: len(before)] != before or len(after) == len(before):
            raise ValueError(f"prefix {text!r}: its tokens merge with the end of the generation prompt "
                             f"({context[-20:]!r}), so it cannot be appended to the tokenized prompt")  # fmt: skip
        return after[len(before) :]

    def _decision_tokens(self) -> DecisionTokens | None:
        """Where the two prefixes part (the decision token, in prefix positions); None when the loss is off."""
        if not self.args.mode_split or self.args.decision_coef == 0:
            return None
        think, no_think = self.bpo_prefix_ids[Mode.THINK], self.bpo_prefix_ids[Mode.NO_THINK]
        try:
            tokens = DecisionTokens.from_prefixes(think, no_think)
        except ValueError as err:
            raise ValueError(
                f"BPOConfig.decision_coef: the mode-decision loss needs the prefixes to part at one token, but the "
                f"thinking prefix {self.bpo_prefix_text[Mode.THINK]!r} ({think}) and the non-thinking prefix "
                f"{self.bpo_prefix_text[Mode.NO_THINK]!r} ({no_think}) do not (one is a token prefix of the other); "
                "set decision_coef=0 or use a tokenizer that merges '\\n\\n'"
            ) from err
        if self.model.get_output_embeddings().bias is not None:
            raise ValueError("BPOConfig.decision_coef: the model's LM head has a bias, which the mode-decision loss "
                             "does not apply; set decision_coef=0")  # fmt: skip
        return tokens

    def _strict_rules(self) -> StrictRules | None:
        """The strict-mode rules over this tokenizer's prefixes (None: no strict mode on)."""
        from r4b_fast.models.chat import _covering_token

        args = self.args
        if not args.strict:
            return None
        tok = self._tokenizer
        think_text = self.bpo_prefix_text[Mode.THINK]
        if THINK_OPEN not in think_text:
            raise ValueError(f"BPOConfig.think_prefix: strict modes track the think block from its {THINK_OPEN!r} "
                             f"tag, which {think_text!r} does not hold")  # fmt: skip
        start = _covering_token(tok, think_text, think_text.index(THINK_OPEN))
        end = _covering_token(tok, CLOSE_SEQUENCE, CLOSE_SEQUENCE.index(THINK_CLOSE) + 1)
        close_ids = tok(CLOSE_SEQUENCE, add_special_tokens=False)["input_ids"]
        think, no_think = self.bpo_prefix_ids[Mode.THINK], self.bpo_prefix_ids[Mode.NO_THINK]
        common, decision = (), None
        if args.strict_auto:
            try:
                d = DecisionTokens.from_prefixes(think, no_think)
            except ValueError as err:
                raise ValueError(f"BPOConfig.strict_auto: {err}") from err
            common, decision = tuple(think[: shared_prefix_length(think, no_think)]), (d.think, d.no_think)
        return StrictRules(think_start=start, think_end=end, eos_ids=tuple(self.eos_token_ids),
                           think_prefix=tuple(think), no_think_prefix=tuple(no_think),
                           close_offset=close_ids.index(end) if end in close_ids else 0,
                           min_think_tokens=int(args.min_think_tokens), no_reopen=bool(args.no_reopen),
                           strict_auto=bool(args.strict_auto), auto_common=common, decision=decision)  # fmt: skip
