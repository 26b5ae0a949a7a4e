"""The annealing loop's command line: its flags (:func:`build_parser`), their checks (:func:`check_values`) and the
settings a resume compares."""

from __future__ import annotations

import argparse
from pathlib import Path

from r4b_fast.training.common import add_device_arguments, add_run_arguments, check_range
from r4b_fast.training.evaluation import add_strict_mode_arguments, check_strict_mode_arguments
from r4b_fast.training.task import (
    AUTO_FRACTION,
    AUTO_THINK_PROB_HARD,
    HARD_FRACTION,
    THINK_LABEL_PROB_HARD,
    THINK_PROB_EASY,
)
from r4b_fast.training.threads import add_thread_arguments, check_thread_arguments

# the settings that alter the math of a step (the cosine schedule spans --steps): a resume with other values is
# refused unless --allow-changed-settings
# (the strict-mode flags only change the final evaluation, not a step)
SETTINGS = ("model", "dataset", "on_bad_row", "max_prompt_tokens", "steps", "batch_size", "lr_llm", "lr_projector",
            "lr_vision", "warmup", "hidden_size", "layers", "seed", "precision", "hard_fraction", "think_prob_hard",
            "auto_fraction", "auto_think_prob_hard", "think_prob_easy")


def build_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m r4b_fast.training.annealing", description=description)
    parser.add_argument("--model", type=Path, default=None,
                        help="start from this model (folder or hub id): LLaVA-OneVision, R-4B, Qwen2.5-VL or "
                             "Qwen3-VL; default: a fresh tiny R-4B-architecture model")  # fmt: skip
    parser.add_argument("--dataset", type=Path, default=None,
                        help="jsonl/parquet rows with image, question, answer, mode (think/no_think) and thought "
                             "(for think rows); default: the embedded task with R-4B-style labels")  # fmt: skip
    parser.add_argument("--on-bad-row", choices=("raise", "skip"), default="raise",
                        help="a row without answer or mode, an undecodable image, a think row without thought, a "
                             "prompt over --max-prompt-tokens")  # fmt: skip
    parser.add_argument("--max-prompt-tokens", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr-llm", type=float, default=2e-3)
    parser.add_argument("--lr-projector", type=float, default=2e-3)
    parser.add_argument("--lr-vision", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--hard-fraction", type=float, default=HARD_FRACTION, help="embedded task: share of hard items")
    parser.add_argument("--think-prob-hard", type=float, default=THINK_LABEL_PROB_HARD,
                        help="embedded task: forced examples, probability that a hard item is labelled thinking")
    parser.add_argument("--auto-fraction", type=float, default=AUTO_FRACTION,
                        help="embedded task: share of auto examples (mode decision after <think> supervised)")
    parser.add_argument("--auto-think-prob-hard", type=float, default=AUTO_THINK_PROB_HARD,
                        help="embedded task: auto examples, probability that a hard item thinks (low: atrophy)")
    parser.add_argument("--think-prob-easy", type=float, default=THINK_PROB_EASY,
                        help="embedded task: forced examples, probability that an easy item is labelled thinking")
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--eval-items", type=int, default=128, help="0 skips the final evaluation")
    add_strict_mode_arguments(parser)
    parser.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (0: only at the end)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute the language model's and the vision tower's layer activations in the "
                             "backward instead of keeping them (less memory; same loss and gradients)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=Path("runs/annealing"))
    add_run_arguments(parser)
    add_device_arguments(parser)
    add_thread_arguments(parser)
    parser.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)  # tests: die like a kill
    return parser


def check_values(parser: argparse.ArgumentParser, args) -> None:
    for name in ("steps", "batch_size", "hidden_size", "layers", "max_prompt_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    for name in ("warmup", "eval_items", "save_every"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not 0 <= args.seed < 2**32:
        parser.error(f"--seed: expected an integer in [0, 2^32), got {args.seed}")
    for flag in ("--hard-fraction", "--think-prob-hard", "--auto-fraction", "--auto-think-prob-hard",
                 "--think-prob-easy"):
        check_range(parser, flag, getattr(args, flag[2:].replace("-", "_")), high=1.0, low_inclusive=True)
    check_strict_mode_arguments(parser, args)
    check_thread_arguments(parser, args)
    for flag in ("--lr-llm", "--lr-projector", "--lr-vision"):  # 0 freezes that part; negative is gradient ascent
        check_range(parser, flag, getattr(args, flag[2:].replace("-", "_")), low_inclusive=True)
    if args.dataset is not None and not args.dataset.exists():
        parser.error(f"--dataset: {args.dataset} does not exist")
