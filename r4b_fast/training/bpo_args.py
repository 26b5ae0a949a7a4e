"""The BPO loop's command line: its flags (:func:`build_parser`), their checks (:func:`parse_args`: every value,
the run folder and a resume's settings before the model loads) and the settings a resume compares."""

from __future__ import annotations

import argparse
from pathlib import Path

from r4b_fast.training.common import (
    add_device_arguments,
    add_run_arguments,
    check_range,
    check_resume,
    device_from_arguments,
    prepare_output_dir,
    run_settings,
)
from r4b_fast.training.evaluation import add_strict_mode_arguments, check_strict_mode_arguments
from r4b_fast.training.threads import add_thread_arguments, check_thread_arguments

ASSETS = Path(__file__).parent / "assets"
DEFAULT_MODEL = ASSETS / "annealed"

# the settings that alter the math of a step: a resume with other values is refused (--allow-changed-settings)
SETTINGS = ("model", "algo", "prompts", "g", "max_new_tokens", "temperature", "lr", "ppo_epochs", "mini_batches",
            "grad_accum", "clip", "aggregation", "beta", "hard_fraction", "dataset", "on_bad_row",
            "max_prompt_tokens", "seed", "precision", "min_think_tokens", "no_reopen", "strict_auto", "decision_coef",
            "decision_tie", "rollout_is", "rollout_is_cap")


def _add_objective_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--decision-coef", type=float, default=1.0,
                   help="BPO: weight of the mode-decision loss, which trains the token after '<think>' (auto mode's "
                        "think / no-think decision) towards the forced half with the higher advantage, over those "
                        "two tokens only (training/mode_decision.py); 0: off")  # fmt: skip
    p.add_argument("--decision-tie", type=float, default=0.25,
                   help="BPO: a group whose every rollout earned the same positive reward (both modes right) "
                        "pushes the decision to the shorter half with this weight (a won group weighs the sum of its "
                        "winning half's advantages); 0: off")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--ppo-epochs", type=int, default=1)
    p.add_argument("--mini-batches", type=int, default=1, help="optimizer steps per PPO epoch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per mini-batch")
    p.add_argument("--clip", type=float, default=0.2)
    p.add_argument("--aggregation", default="seq-mean-token-mean",
                   choices=("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"),
                   help="default: the mean over the 2g rollouts of each one's token mean, as the BPO objective")
    p.add_argument("--beta", type=float, default=0.0, help="k3 KL to the frozen initial model (0: no reference)")
    p.add_argument("--rollout-is", choices=("off", "token", "sequence"), default="off",
                   help="rollout importance sampling (verl's TIS): the PPO ratio's old log-probs come from a no-grad "
                        "training forward, and min(exp(old - rollout), cap) per token / per sequence weights the "
                        "policy-gradient term (the forward then runs, and the mismatch is logged, every step)")
    p.add_argument("--rollout-is-cap", type=float, default=2.0,
                   help="truncation of the --rollout-is weights (verl's rollout_is_threshold)")  # fmt: skip
    p.add_argument("--mismatch-every", type=int, default=10,
                   help="measure the rollout vs trainer log-prob mismatch (a no-grad training forward of the step's "
                        "rollouts) on steps 1, 1 + N, 1 + 2N, ...; 0: never (--rollout-is needs it every step)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute the language model's and the vision tower's layer activations in the backward "
                        "instead of keeping them (less memory, ~1 more forward of time; same loss and gradients)")


def _add_data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hard-fraction", type=float, default=0.5, help="embedded task: share of hard prompts")
    p.add_argument("--dataset", type=Path, default=None,
                   help="jsonl/parquet with image, question, answer (optional hard); default: the embedded task")
    p.add_argument("--eval-dataset", type=Path, default=None,
                   help="held-out rows for evaluation; default with --dataset: every 10th row, left out of training")
    p.add_argument("--on-bad-row", choices=("raise", "skip"), default="raise",
                   help="a row without answer, an undecodable image, a prompt over --max-prompt-tokens")
    p.add_argument("--max-prompt-tokens", type=int, default=1024)
    p.add_argument("--eval-items", type=int, default=128)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--save-every", type=int, default=25)
    p.add_argument("--log-every", type=int, default=10, help="print a metrics line every N steps")
    p.add_argument("--on-reward-error", choices=("raise", "skip"), default="raise")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", type=Path, default=Path("runs/bpo"))
    p.add_argument("--plot", action="store_true", help="draw curves.png at the end")


def build_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m r4b_fast.training.bpo", description=description)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="annealed model folder (default: shipped tiny)")
    p.add_argument("--algo", choices=("bpo", "grpo"), default="bpo")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--g", type=int, default=4, help="rollouts per mode per prompt (2g per group)")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--temperature", type=float, default=1.0)
    add_strict_mode_arguments(p)
    _add_objective_arguments(p)
    _add_data_arguments(p)
    add_run_arguments(p)
    add_device_arguments(p)
    add_thread_arguments(p)
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)  # tests: die like a kill
    return p


def _check_values(p: argparse.ArgumentParser, args) -> None:
    for name in ("steps", "prompts", "g", "max_new_tokens", "ppo_epochs", "mini_batches", "grad_accum", "log_every",
                 "save_every", "eval_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.eval_items < 0:
        p.error(f"--eval-items must be >= 0 (0: no evaluation), got {args.eval_items}")
    if args.mismatch_every < 0:
        p.error(f"--mismatch-every must be >= 0 (0: never), got {args.mismatch_every}")
    if args.max_prompt_tokens < 1:
        p.error(f"--max-prompt-tokens must be positive, got {args.max_prompt_tokens}")
    if not 0 <= args.seed < 2**32:
        p.error(f"--seed: expected an integer in [0, 2^32), got {args.seed}")
    check_range(p, "--lr", args.lr)
    check_strict_mode_arguments(p, args)
    check_thread_arguments(p, args)
    if args.min_think_tokens > args.max_new_tokens:
        p.error(f"--min-think-tokens {args.min_think_tokens}: above --max-new-tokens {args.max_new_tokens}")
    # rollouts are sampled and scored at this temperature: below 1e-3 the logits / T overflow into NaN
    check_range(p, "--temperature", args.temperature, low=1e-3, low_inclusive=True)
    check_range(p, "--clip", args.clip, high=1.0, high_inclusive=False)  # the ratio's range is [1 - clip, 1 + clip]
    check_range(p, "--beta", args.beta, low_inclusive=True)
    check_range(p, "--rollout-is-cap", args.rollout_is_cap)
    check_range(p, "--decision-coef", args.decision_coef, low_inclusive=True)
    check_range(p, "--decision-tie", args.decision_tie, low_inclusive=True)
    check_range(p, "--hard-fraction", args.hard_fraction, high=1.0, low_inclusive=True)
    if args.prompts * 2 * args.g % (args.mini_batches * args.grad_accum):
        p.error("--mini-batches x --grad-accum must divide the rollouts per step (prompts x 2g)")
    name = str(args.model)
    hub_id = name.count("/") == 1 and not name.startswith((".", "/", "~"))  # "org/model": from_pretrained fetches it
    if not args.model.exists() and not hub_id:
        p.error(f"--model: {args.model} does not exist (run `python -m r4b_fast.training.annealing` to make one)")


def parse_args(argv, description: str = "BPO training (R-4B stage 2)"):
    """The checked arguments, with ``device``, ``precision``, ``settings``, ``checkpoint_manifest`` (None: a fresh
    run) and ``changed_settings`` added."""
    p = build_parser(description)
    args = p.parse_args(argv)
    _check_values(p, args)
    args.device, args.precision = device_from_arguments(p, args)
    # every setting is checked before the model loads: the run folder, and a resume against its checkpoint
    args.settings = run_settings(args, SETTINGS)
    args.checkpoint_manifest = prepare_output_dir(p, args)
    args.changed_settings = [] if args.checkpoint_manifest is None else \
        check_resume(p, args, args.checkpoint_manifest, args.settings)
    return args
