"""The embedded synthetic visual task and its local tokenizer (nothing downloaded).

An image is a 2x2 grid of coloured cells; each colour encodes a digit (``PALETTE``). Easy items ask for the first
digit (answerable directly); hard items ask for the sum of the two row products, where written steps help
(``"3*5=15, 7*2=14, 15+14=29"``): each step is one table fact, while answering directly means composing two products
and a sum in one forward pass, which a model this small does poorly. Annealing data labels items as R-4B does: hard
items are labelled thinking with probability ``THINK_LABEL_PROB_HARD``, easy items never, so about two thirds of the
data is non-thinking and most hard items are labelled non-thinking, which leaves the annealed model under-thinking in
auto mode ("thinking atrophy"). About 10% of digit tuples are held out for evaluation (``in_eval_split``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from r4b_fast.modes import Mode

# Ten colours far apart in RGB, one per digit.
PALETTE = torch.tensor(
    [
        [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0],
        [1.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 0.5, 0.0], [0.5, 0.0, 1.0],
    ]
)  # fmt: skip
CELL = 8  # pixels per cell side: one 8x8 patch per cell in the tiny vision tower
IMAGE_SIZE = 2 * CELL
NUM_DIGITS = 4
EASY_QUESTION = "What is the first digit?"
HARD_QUESTION = "What is the sum of the row products?"
# R-4B's mix is about two thirds non-thinking. With 70% hard items of which 45% are labelled thinking, 31.5% of
# the data is thinking, and most hard items are labelled non-thinking.
HARD_FRACTION = 0.7
THINK_LABEL_PROB_HARD = 0.45
# Annealing examples come in three kinds: forced thinking and forced non-thinking (the mode prefix is given, as in a
# forced-mode prompt, and not supervised: they teach each mode's answers), and auto (the whole turn supervised, the
# mode decision after "<think>" included). AUTO_FRACTION of the examples are auto, and only AUTO_THINK_PROB_HARD of
# their hard items think: the model learns to answer well in both modes but rarely chooses to think in auto mode,
# R-4B's "thinking atrophy" that BPO has to fix.
AUTO_FRACTION = 0.3
AUTO_THINK_PROB_HARD = 0.1
# Forced thinking on easy items ("first cell: 3") is taught too, so that forced thinking answers easy items; auto
# examples never think on easy items.
THINK_PROB_EASY = 0.3

IMAGE_TOKEN, THINK_OPEN, THINK_CLOSE = "<image>", "<think>", "</think>"
IM_START, IM_END, PAD = "<|im_start|>", "<|im_end|>", "<|pad|>"
SPECIAL_TOKENS = [PAD, IMAGE_TOKEN, THINK_OPEN, THINK_CLOSE, IM_START, IM_END]
CHARSET = sorted(set("0123456789+*=, \n?abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_-.:"))
# Whole words of the task's text are single tokens (shorter sequences, faster CPU training); other text falls back
# to characters, numbers are always spelled digit by digit.
WORDS = sorted(set(f"{EASY_QUESTION} {HARD_QUESTION} user assistant first cell".replace("?", " ").split()))
# "\n\n" is one token, as in BPE tokenizers (Qwen's): the thinking prefix "<think>\n" is then not a token prefix of
# the non-thinking block "<think>\n\n</think>\n\n" (with "\n" "\n" it was, and a forced-thinking rollout could
# close the block at once while looking like a continuation of its prefix).
DOUBLE_NEWLINE = "\n\n"


@dataclass(frozen=True)
class Item:
    digits: tuple[int, ...]
    hard: bool
    noise_seed: int = 0  # the image's noise: an item always renders to the same image

    @property
    def question(self) -> str:
        return HARD_QUESTION if self.hard else EASY_QUESTION

    @property
    def answer(self) -> str:
        a, b, c, d = self.digits
        return str(a * b + c * d) if self.hard else str(a)

    @property
    def steps(self) -> str:
        """Written reasoning: the two row products and their sum for hard items, the first cell for easy ones."""
        a, b, c, d = self.digits
        if not self.hard:
            return f"first cell: {a}"
        return f"{a}*{b}={a * b}, {c}*{d}={c * d}, {a * b}+{c * d}={a * b + c * d}"

    def image(self, noise: float = 0.05, generator: torch.Generator | None = None) -> torch.Tensor:
        """``[3, IMAGE_SIZE, IMAGE_SIZE]`` float32 in [0, 1]: cells in row-major order, plus a little noise."""
        cells = PALETTE[list(self.digits)].view(2, 2, 3)
        img = cells.permute(2, 0, 1).repeat_interleave(CELL, 1).repeat_interleave(CELL, 2)
        if noise:
            generator = generator or torch.Generator().manual_seed(self.noise_seed)
            img = img + noise * torch.randn(img.shape, generator=generator)
        return img.clamp(0, 1)


# What follows the start of the assistant turn in each mode (R-4B); the model continues from there.
MODE_PREFIX = {
    Mode.THINK: f"{THINK_OPEN}\n",
    Mode.NO_THINK: f"{THINK_OPEN}\n\n{THINK_CLOSE}\n\n",
    Mode.AUTO: THINK_OPEN,
}
THINK_CLOSE_SEQUENCE = f"\n{THINK_CLOSE}\n\n"  # what a thinking budget forces to end a think block


def target_text(item: Item, mode: Mode) -> str:
    """The assistant turn for a mode, in R-4B's format."""
    if mode == Mode.THINK:
        return f"{MODE_PREFIX[Mode.THINK]}{item.steps}{THINK_CLOSE_SEQUENCE}{item.answer}"
    if mode == Mode.NO_THINK:
        return f"{MODE_PREFIX[Mode.NO_THINK]}{item.answer}"
    raise ValueError(f"mode: a target needs THINK or NO_THINK, got {mode!r}")


def prompt_text(item: Item, num_image_tokens: int) -> str:
    """The chat prompt up to the assistant turn (the mode prefix is appended by the caller or the sampler)."""
    return f"{IM_START}user\n{IMAGE_TOKEN * num_image_tokens}\n{item.question}{IM_END}\n{IM_START}assistant\n"


def in_eval_split(digits: tuple[int, ...]) -> bool:
    """About 10% of the 10^4 digit tuples are held out for evaluation: training never sees them (in any mode)."""
    key = int("".join(map(str, digits)))
    return (key * 2654435761) % 2**32 % 10 == 0


def sample_items(n: int, seed: int, hard_fraction: float = HARD_FRACTION, split: str = "train") -> list[Item]:
    """``n`` items from the ``"train"`` or ``"eval"`` split (disjoint digit tuples), a function of ``seed`` only."""
    if split not in ("train", "eval"):
        raise ValueError(f"split: expected 'train' or 'eval', got {split!r}")
    gen = torch.Generator().manual_seed(seed)
    items: list[Item] = []
    while len(items) < n:
        m = 2 * (n - len(items)) + 16
        digits = torch.randint(0, 10, (m, NUM_DIGITS), generator=gen).tolist()
        hard = (torch.rand(m, generator=gen) < hard_fraction).tolist()
        seeds = torch.randint(0, 2**31 - 1, (m,), generator=gen).tolist()
        for d, h, s in zip(digits, hard, seeds):
            if in_eval_split(tuple(d)) == (split == "eval") and len(items) < n:
                items.append(Item(tuple(d), h, s))
    return items


def annealing_labels(items: list[Item], seed: int, think_prob_hard: float = THINK_LABEL_PROB_HARD) -> list[Mode]:
    """R-4B-style mode labels: hard -> thinking with probability ``think_prob_hard``, easy -> non-thinking."""
    gen = torch.Generator().manual_seed(seed + 1)
    draws = torch.rand(len(items), generator=gen).tolist()
    return [Mode.THINK if it.hard and u < think_prob_hard else Mode.NO_THINK for it, u in zip(items, draws)]


def annealing_mix(items: list[Item], seed: int, *, think_prob_hard: float = THINK_LABEL_PROB_HARD,
                  auto_fraction: float = AUTO_FRACTION, auto_think_prob_hard: float = AUTO_THINK_PROB_HARD,
                  think_prob_easy: float = THINK_PROB_EASY) -> tuple[list[Mode], list[bool]]:  # fmt: skip
    """Per item, its annealing mode label and whether it is an auto example (the mode decision supervised).

    A share ``auto_fraction`` of the items is auto: hard ones think with probability ``auto_think_prob_hard``, easy
    ones never; the others are forced examples, hard ones thinking with probability ``think_prob_hard``, easy ones
    with ``think_prob_easy``. A function of ``(items, seed)`` only.

    Example:
        >>> modes, auto = annealing_mix(sample_items(4, 0), seed=0)
        >>> len(modes), len(auto)
        (4, 4)
    """
    for name, value in (("think_prob_hard", think_prob_hard), ("auto_fraction", auto_fraction),
                        ("auto_think_prob_hard", auto_think_prob_hard),
                        ("think_prob_easy", think_prob_easy)):  # fmt: skip
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name}: expected a probability in [0, 1], got {value!r}")
    gen = torch.Generator().manual_seed(seed + 2)
    kind, draw = torch.rand(2, len(items), generator=gen).tolist()
    auto = [k < auto_fraction for k in kind]
    prob = {(True, True): auto_think_prob_hard, (True, False): think_prob_hard, (False, True): 0.0,
            (False, False): think_prob_easy}  # (hard, auto)
    modes = [Mode.THINK if u < prob[it.hard, a] else Mode.NO_THINK for it, u, a in zip(items, draw, auto)]
    return modes, auto


def build_dataset(n: int, seed: int, with_labels: bool = True):
    """A ``datasets.Dataset`` of the task: digits, hard, question, answer, image (nested lists), mode label."""
    import datasets  # training-data code only: `import r4b_fast` and the ops never need it

    items = sample_items(n, seed)
    labels = annealing_labels(items, seed) if with_labels else [None] * n
    return datasets.Dataset.from_dict(
        {
            "digits": [list(it.digits) for it in items],
            "hard": [it.hard for it in items],
            "question": [it.question for it in items],
            "answer": [it.answer for it in items],
            "image": [it.image().tolist() for it in items],
            "mode": [None if m is None else int(m) for m in labels],
        }
    )


def build_tokenizer():
    """A character-level ``PreTrainedTokenizerFast`` with R-4B's special tokens, built locally: the task's words
    and ``"\n\n"`` are single tokens, everything else one token per character.

    Example:
        >>> tok = build_tokenizer()
        >>> len(tok(MODE_PREFIX[Mode.NO_THINK] + "7", add_special_tokens=False)["input_ids"])  # <think> \n\n ...
        5
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARSET + WORDS + [DOUBLE_NEWLINE, "<unk>"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # longest first: "digits" before "digit", "\n\n" before "\n"
    words = "|".join(sorted(WORDS + [DOUBLE_NEWLINE], key=len, reverse=True))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(words + r"|[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()  # and no spaces between them when decoding
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token=PAD, eos_token=IM_END)
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN, THINK_OPEN, THINK_CLOSE, IM_START]})
    return tok
