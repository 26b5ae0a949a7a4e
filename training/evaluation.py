"""Held-out evaluation shared by both loops: completions from the project's rollout engine in a forced or auto
mode (greedy or sampled), scored by accuracy and think rate per difficulty; and the pieces that feed the engine a
LLaVA-OneVision prompt (mode-token ids, prompt embeddings with the image features, decoded completions)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from r4b_fast.modes import Mode
from r4b_fast.training.rewards import accuracy_reward, thought
from r4b_fast.training.rollout import generate_rollouts
from r4b_fast.training.task import IMAGE_TOKEN, MODE_PREFIX, THINK_CLOSE_SEQUENCE, Item, prompt_text
from r4b_fast.training.vision import ImageEncoder


@dataclass
class ModeTokens:
    """Token ids of the mode-control sequences, from the tokenizer (never hard-coded)."""

    think_open: list[int]
    no_think: list[int]
    think_close: list[int]
    auto: list[int]
    eos: int
    pad: int
    image: int

    @classmethod
    def from_tokenizer(cls, tok) -> ModeTokens:
        def ids(text):
            return tok(text, add_special_tokens=False)["input_ids"]

        return cls(ids(MODE_PREFIX[Mode.THINK]), ids(MODE_PREFIX[Mode.NO_THINK]), ids(THINK_CLOSE_SEQUENCE),
                   ids(MODE_PREFIX[Mode.AUTO]), tok.eos_token_id, tok.pad_token_id,
                   tok.convert_tokens_to_ids(IMAGE_TOKEN))


def prompt_embeddings(model, prompt_ids: list[list[int]], items: list[Item], image_id: int,
                      encoder: ImageEncoder | None = None) -> list[torch.Tensor]:  # fmt: skip
    """Per prompt, the token embeddings with the image features written over its ``<image>`` placeholders."""
    device = next(model.parameters()).device
    feats = (encoder or ImageEncoder(model)).features(model, [it.image() for it in items])
    embed = model.get_input_embeddings()
    out = []
    for p, ids in enumerate(prompt_ids):
        ids_t = torch.tensor(ids, device=device)
        e = embed(ids_t).clone()
        e[ids_t == image_id] = feats[p].to(e.dtype)
        out.append(e)
    return out


def completion_texts(tokenizer, rollouts) -> list[str]:
    texts = []
    for row, mask in zip(rollouts.completions.tolist(), rollouts.completion_mask.tolist()):
        ids = [t for t, m in zip(row, mask) if m and t != tokenizer.eos_token_id]
        texts.append(tokenizer.decode(ids))
    return texts


@torch.no_grad()
def mode_completions(model, tokenizer, tokens: ModeTokens, items: list[Item], mode: Mode, encoder: ImageEncoder, *,
                     max_new_tokens: int, temperature: float = 0.0, seed: int = 0) -> list[str]:  # fmt: skip
    """One completion per item in ``mode`` (its forced prefix included in the text): greedy at ``temperature=0``,
    else sampled with a generator seeded by ``seed`` (the same draws at every evaluation)."""
    was_training = model.training
    model.eval()
    prompt_ids = [tokenizer(prompt_text(it, encoder.count(model, it)), add_special_tokens=False)["input_ids"]
                  for it in items]  # fmt: skip
    rollouts = generate_rollouts(
        model, prompt_ids, [[mode]] * len(items), think_open_ids=tokens.think_open, no_think_ids=tokens.no_think,
        think_close_ids=tokens.think_close, auto_ids=tokens.auto, eos_id=tokens.eos, pad_id=tokens.pad,
        max_new_tokens=max_new_tokens, temperature=temperature,
        generator=torch.Generator().manual_seed(seed + 123_457),  # not any training step's generator
        prompt_embeds=prompt_embeddings(model, prompt_ids, items, tokens.image, encoder),
    )  # fmt: skip
    model.train(was_training)
    return completion_texts(tokenizer, rollouts)


def evaluate(model, tokenizer, items: list[Item], encoder: ImageEncoder, *, modes=(Mode.AUTO,),
             max_new_tokens: int = 40, temperature: float = 0.0, seed: int = 0) -> dict[str, float]:  # fmt: skip
    """``eval/acc_{mode}_{easy,hard,all}`` for each mode and ``eval/think_rate_{...}`` of auto mode, over items of
    that difficulty (``all``: items of unknown difficulty)."""
    tokens = ModeTokens.from_tokenizer(tokenizer)
    metrics = {}
    for mode in modes:
        texts = mode_completions(model, tokenizer, tokens, items, Mode(mode), encoder, max_new_tokens=max_new_tokens,
                                 temperature=temperature, seed=seed)  # fmt: skip
        for hard, level in ((False, "easy"), (True, "hard"), (None, "all")):
            rows = [(t, it) for t, it in zip(texts, items) if it.hard is hard]
            if not rows:
                continue
            name = Mode(mode).name.lower()
            metrics[f"eval/acc_{name}_{level}"] = sum(accuracy_reward(t, it.answer) for t, it in rows) / len(rows)
            if mode == Mode.AUTO:
                metrics[f"eval/think_rate_{level}"] = sum(thought(t) for t, _ in rows) / len(rows)
    return metrics
