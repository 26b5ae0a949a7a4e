"""Held-out evaluation shared by both loops: completions from the project's rollout engine in a forced or auto
mode (greedy or sampled), scored by accuracy and think rate per difficulty; and the pieces that feed the engine a
prompt of any family the loops load (mode-token ids and prompt format from the tokenizer, prompt embeddings with the
image features, decoded completions)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from r4b_fast.models.chat import ChatFormat, ModeIds
from r4b_fast.modes import Mode
from r4b_fast.training.rewards import accuracy_reward, thought
from r4b_fast.training.rollout import PromptInputs, generate_rollouts
from r4b_fast.training.task import IMAGE_TOKEN, Item, sample_items
from r4b_fast.training.vision import ImageEncoder


@dataclass
class ModeTokens:
    """Token ids of the mode-control sequences and the prompt format, from the tokenizer (never hard-coded): the
    chat template's mode prefixes where it has one, the project's strings otherwise
    (:class:`r4b_fast.models.ChatFormat`). ``think_start`` / ``think_end``: the tokens that mark a think block's
    start and end for the sampler. ``format``: the :class:`~r4b_fast.models.ChatFormat` that writes the prompts.

    Example: ``ModeTokens.from_tokenizer(tok, model).no_think`` -> the ids of ``<think>\\n\\n</think>\\n\\n``."""

    think_open: list[int]
    no_think: list[int]
    think_close: list[int]
    auto: list[int]
    eos: int
    pad: int
    image: int
    think_start: int | None = None
    think_end: int | None = None
    format: ChatFormat | None = None

    @classmethod
    def from_tokenizer(cls, tok, model=None) -> ModeTokens:
        """``model``: its config names the image placeholder (default: the project's ``<image>``)."""
        from r4b_fast.models import Family

        image = IMAGE_TOKEN if model is None else tok.convert_ids_to_tokens(Family.image_token_id(model.config))
        fmt = ChatFormat.from_tokenizer(tok, image)
        ids = ModeIds.from_format(fmt)
        if tok.eos_token_id is None:
            raise ValueError("tokenizer: it has no eos token (rollouts end on it)")
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return cls(ids.think_open, ids.no_think, ids.think_close, ids.auto, tok.eos_token_id, pad,
                   tok.convert_tokens_to_ids(image), ids.think_start, ids.think_end, fmt)

    def prompt_ids(self, item, num_image_tokens: int) -> list[int]:
        """The prompt of ``item`` in this tokenizer's format (``format.prompt_ids``)."""
        return self.format.prompt_ids(item, num_image_tokens)


def prompt_embeddings(model, prompt_ids: list[list[int]], items: list[Item], image_id: int,
                      encoder: ImageEncoder | None = None) -> PromptInputs:  # fmt: skip
    """Per prompt, the token embeddings with the image features written over its placeholders (a
    :class:`~r4b_fast.training.rollout.PromptInputs`: for the Qwen families also the M-RoPE positions and
    Qwen3-VL's DeepStack features, which ``generate_rollouts`` reads from it)."""
    encoder = encoder or ImageEncoder(model)
    images = encoder.encode(model, [it.image() for it in items])
    inputs = encoder.family.prompt_inputs(model, prompt_ids, images)
    embeds, positions, deep = zip(*inputs)
    return PromptInputs(embeds, positions=None if positions[0] is None else list(positions),
                        deepstack=None if deep[0] is None else list(deep))  # fmt: skip


def completion_texts(tokenizer, rollouts) -> list[str]:
    texts = []
    for row, mask in zip(rollouts.completions.tolist(), rollouts.completion_mask.tolist()):
        ids = [t for t, m in zip(row, mask) if m and t != tokenizer.eos_token_id]
        texts.append(tokenizer.decode(ids))
    return texts


# what the loops' --min-think-tokens defaults to: a forced-thinking rollout writes at least this many tokens before
# it may close its block (the task's shortest thought, "first cell: 3", is 6 tokens)
DEFAULT_MIN_THINK_TOKENS = 4


def add_strict_mode_arguments(parser: argparse.ArgumentParser) -> None:
    """``--min-think-tokens``, ``--no-reopen / --no-no-reopen`` and ``--strict-auto / --no-strict-auto``, the strict
    modes of the rollout engine (``generate_rollouts``), shared by both loops. Validate with
    :func:`check_strict_mode_arguments`."""
    parser.add_argument("--min-think-tokens", type=int, default=DEFAULT_MIN_THINK_TOKENS,
                        help="forced-thinking rollouts cannot close their think block (nor end) before this many "
                             "sampled tokens (0: off)")  # fmt: skip
    parser.add_argument("--no-reopen", action=argparse.BooleanOptionalAction, default=True,
                        help="after a closed think block, <think> / </think> cannot be sampled")
    parser.add_argument("--strict-auto", action=argparse.BooleanOptionalAction, default=True,
                        help="auto mode's first sampled token is one of the two mode tokens (think / no think)")


def check_strict_mode_arguments(parser: argparse.ArgumentParser, args) -> None:
    """End the run with a usage error unless ``--min-think-tokens`` is an integer >= 0."""
    if args.min_think_tokens < 0:
        parser.error(f"--min-think-tokens: expected an integer >= 0 (0: off), got {args.min_think_tokens}")


@torch.no_grad()
def mode_completions(model, tokenizer, tokens: ModeTokens, items: list[Item], mode: Mode, encoder: ImageEncoder, *,
                     max_new_tokens: int, temperature: float = 0.0, seed: int = 0, min_think_tokens: int = 0,
                     no_reopen: bool = False, strict_auto: bool = False) -> list[str]:  # fmt: skip
    """One completion per item in ``mode`` (its forced prefix included in the text): greedy at ``temperature=0``,
    else sampled with a generator seeded by ``seed`` (the same draws at every evaluation). ``min_think_tokens`` /
    ``no_reopen`` / ``strict_auto``: the rollout engine's strict modes (``generate_rollouts``)."""
    was_training = model.training
    model.eval()
    prompt_ids = [tokens.prompt_ids(it, encoder.count(model, it)) for it in items]
    rollouts = generate_rollouts(
        model, prompt_ids, [[mode]] * len(items), think_open_ids=tokens.think_open, no_think_ids=tokens.no_think,
        think_close_ids=tokens.think_close, auto_ids=tokens.auto, eos_id=tokens.eos, pad_id=tokens.pad,
        think_start_id=tokens.think_start, think_end_id=tokens.think_end,
        max_new_tokens=max_new_tokens, temperature=temperature,
        generator=torch.Generator().manual_seed(seed + 123_457),  # not any training step's generator
        prompt_embeds=prompt_embeddings(model, prompt_ids, items, tokens.image, encoder),
        min_think_tokens=min_think_tokens, no_reopen=no_reopen, strict_auto=strict_auto,
    )  # fmt: skip
    model.train(was_training)
    return completion_texts(tokenizer, rollouts)


def evaluate(model, tokenizer, items: list[Item], encoder: ImageEncoder, *, modes=(Mode.AUTO,),
             max_new_tokens: int = 40, temperature: float = 0.0, seed: int = 0, prefix: str = "eval",
             min_think_tokens: int = 0, no_reopen: bool = False,
             strict_auto: bool = False) -> dict[str, float]:  # fmt: skip
    """``{prefix}/acc_{mode}_{easy,hard,all}`` and ``{prefix}/length_{mode}_{...}`` (mean emitted tokens, forced
    prefix included) for each mode, and ``{prefix}/think_rate_{...}`` of auto mode, over items of that difficulty
    (``all``: items of unknown difficulty). ``min_think_tokens`` / ``no_reopen`` / ``strict_auto``: strict modes
    (forced thinking then always thinks; no think tag after a closed block; auto mode picks one of the two modes).
    With auto and a forced mode both evaluated, also ``{prefix}/acc_{mode}_when_auto_{thinks,skips}_{level}``: the
    forced mode's accuracy on the items where auto mode thought / answered directly (is auto's choice per item the
    right one?), and ``{prefix}/auto_skips_{level}``, the share of items it answered directly.

    Example: ``evaluate(model, tok, items, encoder, modes=(Mode.THINK,))["eval/acc_think_hard"]`` -> 0.9."""
    tokens = ModeTokens.from_tokenizer(tokenizer, model)
    metrics = {}
    # item indices per difficulty (``all``: unknown difficulty), shared by every mode and the per-item split
    levels = {level: [i for i, it in enumerate(items) if it.hard is hard]
              for hard, level in ((False, "easy"), (True, "hard"), (None, "all"))}  # fmt: skip
    levels = {level: at for level, at in levels.items() if at}
    correct: dict[Mode, list[float]] = {}
    auto_thought = None
    for mode in modes:
        mode = Mode(mode)
        texts = mode_completions(model, tokenizer, tokens, items, mode, encoder, max_new_tokens=max_new_tokens,
                                 temperature=temperature, seed=seed, min_think_tokens=min_think_tokens,
                                 no_reopen=no_reopen, strict_auto=strict_auto)  # fmt: skip
        # per item, scored once: the per-difficulty means and the split by auto mode's choice both read these
        correct[mode] = [accuracy_reward(t, it.answer) for t, it in zip(texts, items)]
        lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        if mode == Mode.AUTO:
            auto_thought = [thought(t) for t in texts]
        name = mode.name.lower()
        for level, at in levels.items():
            metrics[f"{prefix}/acc_{name}_{level}"] = sum(correct[mode][i] for i in at) / len(at)
            metrics[f"{prefix}/length_{name}_{level}"] = sum(lengths[i] for i in at) / len(at)
            if mode == Mode.AUTO:
                metrics[f"{prefix}/think_rate_{level}"] = sum(auto_thought[i] for i in at) / len(at)
    if auto_thought is not None:
        for level, at in levels.items():
            metrics[f"{prefix}/auto_skips_{level}"] = sum(not auto_thought[i] for i in at) / len(at)
            for mode in (Mode.THINK, Mode.NO_THINK):
                for choice, chosen in (("thinks", True), ("skips", False)):
                    idx = [i for i in at if auto_thought[i] is chosen]
                    if mode in correct and idx:
                        metrics[f"{prefix}/acc_{mode.name.lower()}_when_auto_{choice}_{level}"] = \
                            sum(correct[mode][i] for i in idx) / len(idx)
    return metrics


def evaluate_held_out(model, tokenizer, encoder: ImageEncoder, n_items: int, *, seed: int = 0,
                      max_new_tokens: int = 48, min_think_tokens: int = 0,
                      no_reopen: bool = False, strict_auto: bool = False) -> dict[str, float]:  # fmt: skip
    """A model on ``n_items`` held-out items of the embedded task (digit tuples training never sees; half easy, half
    hard, drawn with ``seed + 10_000``) in all three modes: greedy (``eval/...``) and sampled at T=1
    (``eval_t1/...``, generator seeded by ``seed``), keys as :func:`evaluate`. Deterministic for a given model,
    arguments, torch version and thread count.

    Example: ``evaluate_held_out(model, tok, ImageEncoder.for_model(model, path), 128)["eval_t1/think_rate_hard"]``.
    """
    items = sample_items(n_items, seed + 10_000, hard_fraction=0.5, split="eval")
    metrics = {}
    for temperature, prefix in ((0.0, "eval"), (1.0, "eval_t1")):
        metrics.update(evaluate(model, tokenizer, items, encoder, modes=(Mode.THINK, Mode.NO_THINK, Mode.AUTO),
                                max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, prefix=prefix,
                                min_think_tokens=min_think_tokens, no_reopen=no_reopen,
                                strict_auto=strict_auto))  # fmt: skip
    return metrics


def main(argv: list[str] | None = None) -> int:
    """``python -m r4b_fast.training.evaluation [MODEL_DIR] [--items N] [--json FILE]``: :func:`evaluate_held_out`
    of a model folder (default: the shipped annealed checkpoint), printed as a table and optionally saved."""
    import json
    import sys
    from pathlib import Path

    from r4b_fast.training.common import load_model

    default = Path(__file__).parent / "assets" / "annealed"
    p = argparse.ArgumentParser(prog="python -m r4b_fast.training.evaluation", description=main.__doc__.split(":")[0])
    p.add_argument("model", type=Path, nargs="?", default=default)
    p.add_argument("--items", type=int, default=256, help="held-out items, half easy, half hard")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--json", type=Path, default=None, help="also write the metrics here")
    add_strict_mode_arguments(p)
    args = p.parse_args(argv)
    check_strict_mode_arguments(p, args)
    if args.items < 2:
        p.error(f"--items: at least 2, got {args.items}")
    if not (args.model / "config.json").exists():
        p.error(f"model: {args.model} has no config.json")
    model, tok = load_model(args.model, "cpu")
    model.eval()
    metrics = evaluate_held_out(model, tok, ImageEncoder.for_model(model, args.model), args.items, seed=args.seed,
                                max_new_tokens=args.max_new_tokens, min_think_tokens=args.min_think_tokens,
                                no_reopen=args.no_reopen, strict_auto=args.strict_auto)  # fmt: skip
    print("| mode | T | acc easy | acc hard | tokens easy | tokens hard | think rate easy | think rate hard |")
    print("|---|---|---|---|---|---|---|---|")
    for prefix, t in (("eval", "0"), ("eval_t1", "1")):
        for mode in ("think", "no_think", "auto"):
            m = {k.removeprefix(f"{prefix}/"): v for k, v in metrics.items() if k.startswith(f"{prefix}/")}
            rates = [f"{m[f'think_rate_{lv}']:.3f}" if mode == "auto" else "" for lv in ("easy", "hard")]
            print(f"| {mode} | {t} | {m[f'acc_{mode}_easy']:.3f} | {m[f'acc_{mode}_hard']:.3f} | "
                  f"{m[f'length_{mode}_easy']:.1f} | {m[f'length_{mode}_hard']:.1f} | {rates[0]} | {rates[1]} |")
    if args.json is not None:
        args.json.write_text(json.dumps({"items": args.items, "seed": args.seed, "min_think_tokens":
                                         args.min_think_tokens, "no_reopen": args.no_reopen,
                                         "strict_auto": args.strict_auto, "metrics": metrics},
                                        indent=1, sort_keys=True))  # fmt: skip
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
