"""Prompts and mode prefixes from a tokenizer's chat template (the project's own format when it has none).

R-4B's three modes are chosen by what follows the assistant turn's start: thinking ``<think>\\n``, non-thinking
``<think>\\n\\n</think>\\n\\n``, auto (the model decides). A checkpoint's chat template may have its own switch for
them; :class:`ChatFormat` renders the generation prompt once per mode with that switch and takes the mode prefixes
from what the renders add after their common part:

- R-4B (``thinking_mode`` in the template): ``long`` -> thinking, ``short`` -> non-thinking, ``auto`` -> auto.
- Qwen3 style (``enable_thinking``): ``True`` -> thinking, ``False`` -> non-thinking, not given -> auto.
- no switch (Qwen2.5-VL, Qwen3-VL Instruct, LLaVA-OneVision): every mode renders the same prompt.

Where a render does not open (thinking) or close (non-thinking) a think block itself, the project's documented
strings (``task.MODE_PREFIX``, R-4B's and Qwen3's) complete it; auto without a switch is ``<think>`` (the model then
decides with its next token, as annealing taught it). A template that always opens a think block (Qwen3-VL
Thinking) ends the prompt before it. The think-close sequence is the documented ``\\n</think>\\n\\n``. A tokenizer
without ``<think>`` / ``</think>`` tokens (Qwen2.5-VL's) gets these strings as its BPE splits them (no vocabulary
change); :class:`ModeIds` then takes the tokens that cover the ``<`` of ``<think>`` and the ``/`` of ``</think>`` as
the block's start / end markers for the sampler's phase tracking and strict modes.

Without a chat template (the embedded tiny model) the prompt is ``task.prompt_text``: exactly the project's format.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from r4b_fast.modes import Mode, shared_prefix_length

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# the documented strings (R-4B, Qwen3): the same as r4b_fast.training.task.MODE_PREFIX / THINK_CLOSE_SEQUENCE
DOCUMENTED_PREFIX = {Mode.THINK: f"{THINK_OPEN}\n", Mode.NO_THINK: f"{THINK_OPEN}\n\n{THINK_CLOSE}\n\n",
                     Mode.AUTO: THINK_OPEN}  # fmt: skip
DOCUMENTED_CLOSE = f"\n{THINK_CLOSE}\n\n"
# the template's switch value per mode (None: the argument is not given)
SWITCHES = {
    "thinking_mode": {Mode.THINK: "long", Mode.NO_THINK: "short", Mode.AUTO: "auto"},
    "enable_thinking": {Mode.THINK: True, Mode.NO_THINK: False, Mode.AUTO: None},
}
_PROBE_QUESTION = "What is shown?"
PROJECT_IMAGE_TOKEN = "<image>"
KNOWN_IMAGE_TOKENS = ("<|image_pad|>", PROJECT_IMAGE_TOKEN)  # Qwen-VL first: "<image>" is no substring of it


def _template_source(tokenizer) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: the default one
        template = template.get("default")
    return template or None


def _complete(suffix: str, mode: Mode) -> str:
    """The mode prefix from what the template rendered after the prompt: used when it opens (thinking) / closes
    (non-thinking) a think block itself, else completed with the documented string."""
    if mode == Mode.THINK:
        return suffix if THINK_OPEN in suffix and THINK_CLOSE not in suffix else suffix + DOCUMENTED_PREFIX[mode]
    if THINK_CLOSE in suffix:
        return suffix
    # a render that opens a block it cannot close (an always-thinking template) contributes nothing before it
    cut = suffix.find(THINK_OPEN)
    return (suffix if cut < 0 else suffix[:cut]) + DOCUMENTED_PREFIX[Mode.NO_THINK]


@dataclass
class ChatFormat:
    """How the loops write a prompt and a target for ``tokenizer``.

    ``image_token``: the model's placeholder (``<image>`` for LLaVA-OneVision / R-4B, ``<|image_pad|>`` for the
    Qwen-VL families); a rendered prompt's one placeholder is repeated once per vision feature row.
    ``mode_prefix[mode]`` / ``think_close``: the texts the sampler forces (tokenized once, :class:`ModeIds`).
    ``switch``: the template's thinking argument (``thinking_mode``, ``enable_thinking``) or None.

    Example:
        >>> fmt = ChatFormat.from_tokenizer(tok, "<|image_pad|>")      # a Qwen3-style template
        >>> fmt.switch, fmt.mode_prefix[Mode.NO_THINK]
        ('enable_thinking', '<think>\\n\\n</think>\\n\\n')
        >>> ids = fmt.prompt_ids("What is the first digit?", 4)          # user turn, 4 placeholders, assistant start
    """

    tokenizer: object
    image_token: str
    mode_prefix: dict
    think_close: str = DOCUMENTED_CLOSE
    template: str | None = None
    switch: str | None = None
    auto_tail: str = ""  # what the template renders after the prompt in auto mode (removed from each prompt)

    @classmethod
    def from_tokenizer(cls, tokenizer, image_token: str | None = None) -> ChatFormat:
        """The format of ``tokenizer``: its chat template's when it has one, else the project's.
        ``image_token``: the model's placeholder text (``tokenizer.convert_ids_to_tokens(config.image_token_id)``);
        None: the known placeholder (``<|image_pad|>``, ``<image>``) the template renders for an image, ``<image>``
        without a template. ``R4B_FAST_CHAT_TEMPLATE=0`` forces the project's format (e.g. a model annealed with
        it)."""
        if image_token is not None and (not isinstance(image_token, str) or not image_token):
            raise TypeError(f"image_token: expected the placeholder token's text, got {image_token!r}")
        template = _template_source(tokenizer)
        if template is None or os.environ.get("R4B_FAST_CHAT_TEMPLATE", "1") == "0":
            return cls(tokenizer, image_token or PROJECT_IMAGE_TOKEN, dict(DOCUMENTED_PREFIX))
        switch = next((name for name in SWITCHES if name in template), None)
        fmt = cls(tokenizer, image_token or "", {}, template=template, switch=switch)
        renders = {mode: fmt._render(_PROBE_QUESTION, mode) for mode in Mode}
        if image_token is None:
            found = [t for t in KNOWN_IMAGE_TOKENS if t in renders[Mode.AUTO]]
            if not found:
                raise ValueError(f"chat template: renders none of the known image placeholders {KNOWN_IMAGE_TOKENS} "
                                 "for an image; pass image_token=")  # fmt: skip
            fmt.image_token = found[0]
        base = os.path.commonprefix(list(renders.values()))
        opened = base.rfind(THINK_OPEN)
        if opened >= 0 and THINK_CLOSE not in base[opened:]:
            base = base[:opened]  # the template always opens a think block: the prompt ends before it
        fmt.auto_tail = renders[Mode.AUTO][len(base):]
        fmt.mode_prefix = {Mode.THINK: _complete(renders[Mode.THINK][len(base):], Mode.THINK),
                           Mode.NO_THINK: _complete(renders[Mode.NO_THINK][len(base):], Mode.NO_THINK),
                           Mode.AUTO: fmt.auto_tail if switch is not None else DOCUMENTED_PREFIX[Mode.AUTO]}
        return fmt

    def _render(self, question: str, mode: Mode) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        kwargs = {}
        if self.switch is not None and SWITCHES[self.switch][mode] is not None:
            kwargs[self.switch] = SWITCHES[self.switch][mode]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)

    @property
    def uses_template(self) -> bool:
        return self.template is not None

    def prompt(self, question: str, num_image_tokens: int) -> str:
        """The prompt text up to the assistant turn's start, with ``num_image_tokens`` placeholders (the mode prefix
        is the sampler's, or the target's)."""
        if not self.uses_template:
            from r4b_fast.training.task import prompt_text

            return prompt_text(_Question(question), num_image_tokens)
        text = self._render(question, Mode.AUTO)
        if self.auto_tail:
            if not text.endswith(self.auto_tail):
                raise ValueError(f"chat template: the prompt for {question!r} does not end with {self.auto_tail!r} "
                                 "as the probe's did")  # fmt: skip
            text = text[: len(text) - len(self.auto_tail)]
        if text.count(self.image_token) != 1:
            raise ValueError(f"chat template: expected one {self.image_token} placeholder for the row's image, the "
                             f"template rendered {text.count(self.image_token)}")  # fmt: skip
        return text.replace(self.image_token, self.image_token * num_image_tokens)

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, item, num_image_tokens: int) -> list[int]:
        """Token ids of :meth:`prompt` for ``item`` (anything with ``question``)."""
        return self.ids(self.prompt(item.question, num_image_tokens))

    def target(self, item, mode: Mode) -> str:
        """The assistant turn in ``mode`` (THINK or NO_THINK): the mode prefix, the thought and its close for
        thinking, then the answer (``item.steps``, ``item.answer``)."""
        if mode == Mode.THINK:
            return f"{self.mode_prefix[Mode.THINK]}{item.steps}{self.think_close}{item.answer}"
        if mode == Mode.NO_THINK:
            return f"{self.mode_prefix[Mode.NO_THINK]}{item.answer}"
        raise ValueError(f"mode: a target needs THINK or NO_THINK, got {mode!r}")


@dataclass(frozen=True)
class _Question:
    question: str


def _covering_token(tokenizer, text: str, char: int) -> int:
    """The id of the token of ``tokenizer(text)`` whose span covers character ``char``."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    for tok, (start, end) in zip(enc["input_ids"], enc["offset_mapping"]):
        if start <= char < end:
            return int(tok)
    raise ValueError(f"tokenizer: no token covers character {char} of {text!r}")


@dataclass
class ModeIds:
    """Token ids of the mode-control sequences of a :class:`ChatFormat`, tokenized once (never hard-coded).

    ``think_start`` / ``think_end``: the single tokens that mark a think block's start and end for the sampler
    (``<think>`` / ``</think>`` when the tokenizer has them, else the BPE token covering ``<`` / ``/``).

    Example: ``ModeIds.from_format(fmt).no_think`` -> ``[151667, 271, 151668, 271]`` on a Qwen3 tokenizer.
    """

    think_open: list[int]
    no_think: list[int]
    think_close: list[int]
    auto: list[int]
    think_start: int
    think_end: int

    @classmethod
    def from_format(cls, fmt: ChatFormat) -> ModeIds:
        close = fmt.think_close
        start_text, no_think_text, auto_text = (fmt.mode_prefix[m] for m in (Mode.THINK, Mode.NO_THINK, Mode.AUTO))
        think_open, no_think, auto = fmt.ids(start_text), fmt.ids(no_think_text), fmt.ids(auto_text)
        common = think_open[: shared_prefix_length(think_open, no_think)]
        # Auto mode must stop where the two forced prefixes part, so that its next token is the think / no-think
        # decision the forced halves train (and strict auto mode restricts). A byte-level BPE without a <think>
        # token spells "<think>" alone as "<", "think", ">" but "<think>\n" as "<", "think", ">\n": forcing ">"
        # would put auto mode where annealing never went; it stops at the common "<", "think" instead.
        if (common and auto != common and start_text.startswith(auto_text) and no_think_text.startswith(auto_text)
                and len(common) < len(think_open) and len(common) < len(no_think)):
            auto = common
        return cls(think_open, no_think, fmt.ids(close), auto,
                   _covering_token(fmt.tokenizer, start_text, start_text.index(THINK_OPEN)),
                   _covering_token(fmt.tokenizer, close, close.index(THINK_CLOSE) + 1))  # fmt: skip
