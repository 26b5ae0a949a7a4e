"""The embedded synthetic visual task and its local tokenizer (nothing downloaded).

An image is a 2x2 grid of coloured cells; each colour encodes a digit (``PALETTE``). Easy items ask for the first
digit (answerable directly); hard items ask for the sum of the four digits, where written steps help
(``"3+5=8, 8+7=15, 15+2=17"``). Annealing data labels items as R-4B does: hard items are labelled thinking with
probability ``THINK_LABEL_PROB_HARD``, easy items never, so about two thirds of the data is non-thinking and some hard
items are labelled non-thinking, which leaves the annealed model under-thinking in auto mode ("thinking atrophy").
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
HARD_QUESTION = "What is the sum of all digits?"
HARD_FRACTION = 0.5
THINK_LABEL_PROB_HARD = 2 / 3  # -> 1/3 of the data thinking, as R-4B's mix (about two thirds non-thinking)

IMAGE_TOKEN, THINK_OPEN, THINK_CLOSE = "<image>", "<think>", "</think>"
IM_START, IM_END, PAD = "<|im_start|>", "<|im_end|>", "<|pad|>"
SPECIAL_TOKENS = [PAD, IMAGE_TOKEN, THINK_OPEN, THINK_CLOSE, IM_START, IM_END]
CHARSET = sorted(set("0123456789+=, \n?abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_-.:"))
# Whole words of the task's text are single tokens (shorter sequences, faster CPU training); other text falls back
# to characters, numbers are always spelled digit by digit.
WORDS = sorted(set(f"{EASY_QUESTION} {HARD_QUESTION} user assistant first cell".replace("?", " ").split()))


@dataclass(frozen=True)
class Item:
    digits: tuple[int, ...]
    hard: bool

    @property
    def question(self) -> str:
        return HARD_QUESTION if self.hard else EASY_QUESTION

    @property
    def answer(self) -> str:
        return str(sum(self.digits)) if self.hard else str(self.digits[0])

    @property
    def steps(self) -> str:
        """Written reasoning: running sums for hard items, a reading of the first cell for easy ones."""
        if not self.hard:
            return f"first cell: {self.digits[0]}"
        parts, total = [], self.digits[0]
        for d in self.digits[1:]:
            parts.append(f"{total}+{d}={total + d}")
            total += d
        return ", ".join(parts)

    def image(self, noise: float = 0.05, generator: torch.Generator | None = None) -> torch.Tensor:
        """``[3, IMAGE_SIZE, IMAGE_SIZE]`` float32 in [0, 1]: cells in row-major order, plus a little noise."""
        cells = PALETTE[list(self.digits)].view(2, 2, 3)
        img = cells.permute(2, 0, 1).repeat_interleave(CELL, 1).repeat_interleave(CELL, 2)
        if noise:
            img = img + noise * torch.randn(img.shape, generator=generator)
        return img.clamp(0, 1)


def target_text(item: Item, mode: Mode) -> str:
    """The assistant turn for a mode, in R-4B's format."""
    if mode == Mode.THINK:
        return f"{THINK_OPEN}\n{item.steps}\n{THINK_CLOSE}\n\n{item.answer}"
    if mode == Mode.NO_THINK:
        return f"{THINK_OPEN}\n\n{THINK_CLOSE}\n\n{item.answer}"
    raise ValueError(f"mode: a target needs THINK or NO_THINK, got {mode!r}")


def prompt_text(item: Item, num_image_tokens: int) -> str:
    """The chat prompt up to the assistant turn (the mode prefix is appended by the caller or the sampler)."""
    return f"{IM_START}user\n{IMAGE_TOKEN * num_image_tokens}\n{item.question}{IM_END}\n{IM_START}assistant\n"


def sample_items(n: int, seed: int, hard_fraction: float = HARD_FRACTION) -> list[Item]:
    gen = torch.Generator().manual_seed(seed)
    digits = torch.randint(0, 10, (n, NUM_DIGITS), generator=gen).tolist()
    hard = (torch.rand(n, generator=gen) < hard_fraction).tolist()
    return [Item(tuple(d), h) for d, h in zip(digits, hard)]


def annealing_labels(items: list[Item], seed: int) -> list[Mode]:
    """R-4B-style mode labels: hard -> thinking with probability THINK_LABEL_PROB_HARD, easy -> non-thinking."""
    gen = torch.Generator().manual_seed(seed + 1)
    draws = torch.rand(len(items), generator=gen).tolist()
    return [Mode.THINK if it.hard and u < THINK_LABEL_PROB_HARD else Mode.NO_THINK for it, u in zip(items, draws)]


def build_dataset(n: int, seed: int, with_labels: bool = True):
    """A ``datasets.Dataset`` of the task: digits, hard, question, answer, image (nested lists), mode label."""
    import datasets  # training-data code only: `import r4b_fast` and the ops never need it

    items = sample_items(n, seed)
    labels = annealing_labels(items, seed) if with_labels else [None] * n
    gen = torch.Generator().manual_seed(seed + 2)
    return datasets.Dataset.from_dict(
        {
            "digits": [list(it.digits) for it in items],
            "hard": [it.hard for it in items],
            "question": [it.question for it in items],
            "answer": [it.answer for it in items],
            "image": [it.image(generator=gen).tolist() for it in items],
            "mode": [None if m is None else int(m) for m in labels],
        }
    )


def build_tokenizer():
    """A character-level ``PreTrainedTokenizerFast`` with R-4B's special tokens, built locally."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARSET + WORDS + ["<unk>"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words = "|".join(sorted(WORDS, key=len, reverse=True))  # longest first: "digits" before "digit"
    core.pre_tokenizer = pre_tokenizers.Split(Regex(words + r"|[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()  # and no spaces between them when decoding
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token=PAD, eos_token=IM_END)
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN, THINK_OPEN, THINK_CLOSE, IM_START]})
    return tok
