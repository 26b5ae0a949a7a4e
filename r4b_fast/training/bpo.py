"""BPO training (R-4B stage 2): ``python -m r4b_fast.training.bpo``.

Per step: sample prompts; for each, ``g`` rollouts forced into thinking and ``g`` forced into non-thinking
(``--algo grpo``: all ``2g`` in auto mode, the baseline R-4B compares against); rule-based accuracy reward;
advantages normalised over the mixed group (``r4b_fast.group_advantages``); PPO epochs / mini-batches on the clipped
policy loss computed from the LM head's input (``fused_linear_policy_loss``) with the rollout's log-probs as old
log-probs and an optional k3 KL to a frozen reference. Logs reward and response length per mode, KL, clip fraction,
entropy, tokens/s, and every ``--eval-every`` steps the accuracy and think rate of auto-mode rollouts on held-out
easy and hard items.

With no arguments it starts from the annealed tiny R-4B model shipped in the package and trains on the embedded
synthetic task on CPU.

Layout: this file sets the run up and drives the loop (:func:`train_loop`: a step's stages, then
:func:`finish_step`: evaluate / log / save); ``bpo_args`` holds the flags, ``bpo_step`` the stages of a step
(generate, score, advantages, old log-probs, update, record), ``bpo_loss`` the micro-batch loss, ``guards`` the
divergence and preemption guards, ``threads`` the CPU threads and progress lines (docs/training.md).
"""

from __future__ import annotations

import copy
import os
import sys

import torch
from tqdm.auto import tqdm

from r4b_fast.models.chat import ChatFormat
from r4b_fast.modes import Mode
from r4b_fast.training.bpo_args import DEFAULT_MODEL, SETTINGS, parse_args
from r4b_fast.training.bpo_loss import (
    MicroBatch,
    enable_gradient_checkpointing,
    micro_batch_loss,
    policy_forward,
)
from r4b_fast.training.bpo_step import Run, train_step
from r4b_fast.training.common import (
    CheckpointError,
    LossModule,
    MetricsLogger,
    NonFiniteError,
    apply_learning_rates,
    autocast,
    init_distributed,
    load_checkpoint,
    load_model,
    save_checkpoint,
    set_seed,
    shard_model,
    sync_weights,
)
from r4b_fast.training.evaluation import ModeTokens, evaluate, prompt_embeddings
from r4b_fast.training.guards import Preemption, WeightGuard
from r4b_fast.training.mode_decision import DecisionTokens
from r4b_fast.training.task import sample_items
from r4b_fast.training.threads import Progress, set_threads
from r4b_fast.training.vision import ImageEncoder

__all__ = ["DEFAULT_MODEL", "SETTINGS", "MicroBatch", "ModeTokens", "main", "micro_batch_loss", "parse_args",
           "policy_forward", "prompt_embeddings"]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv, __doc__.splitlines()[0])
    try:
        return _train(args)
    except (CheckpointError, NonFiniteError) as err:  # a full disk, a NaN, a divergence: says what and where
        raise SystemExit(f"bpo: {err}") from err


def setup(args) -> Run:
    """The run's fixed parts: the policy (FSDP2-sharded under torchrun, with a plain replica for generation), the
    frozen reference (--beta), optimizer, tokens, data. The weight guard is added by :func:`resume`."""
    device = args.device
    set_seed(args.seed)
    rank, world = init_distributed(device)
    if world > 1 and args.prompts % world:
        raise SystemExit(f"--prompts {args.prompts} must divide by the world size {world}")
    if (args.prompts // world) * 2 * args.g % (args.mini_batches * args.grad_accum):
        raise SystemExit(f"--mini-batches x --grad-accum must divide each rank's rollouts ({args.prompts // world} "
                         f"prompts x 2g = {args.prompts // world * 2 * args.g})")  # fmt: skip
    model, tokenizer = load_model(args.model, device)
    set_threads(args.threads, model, device, verbose=rank == 0)
    model.train()
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    tokens = ModeTokens.from_tokenizer(tokenizer, model)  # prompts and mode prefixes: the chat template's, if any
    # BPO's forced halves train auto mode's decision token (fails here, before training, if the prefixes share it)
    decision = DecisionTokens.from_prefixes(tokens.think_open, tokens.no_think) \
        if args.algo == "bpo" and args.decision_coef > 0 else None
    encoder = ImageEncoder.for_model(model, args.model)
    reference = copy.deepcopy(model).eval().requires_grad_(False) if args.beta > 0 else None
    if world > 1:  # FSDP2 for training; a plain replica, re-synced every step, for generation and evaluation
        rollout_model = copy.deepcopy(model).eval().requires_grad_(False)
        loss_module = shard_model(model, micro_batch_loss, device)
    else:
        rollout_model, loss_module = model, LossModule(model, micro_batch_loss)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    run = Run(args, model, rollout_model, reference, loss_module, optimizer, scheduler, tokenizer, tokens, decision,
              encoder, guard=None, rank=rank, world=world)  # fmt: skip
    run.train_rows, run.eval_items = _data(args, tokenizer, run.n_img)
    return run


def resume(run: Run) -> int:
    """Load the checkpoint under --resume (the run's --lr, not the checkpoint's); arm the weight guard on the
    weights the run starts from. Returns the first step to run (0-based)."""
    args, start_step = run.args, 0
    if args.resume:
        loaded = load_checkpoint(args.output_dir / "checkpoint", run.loss_module, run.optimizer, run.scheduler)
        start_step = loaded["step"]
        if run.rank == 0:
            print(f"resumed from {loaded['path']} at step {start_step}")
            for change in args.changed_settings:
                print(f"resume: changed setting {change} (--allow-changed-settings)")
        apply_learning_rates(run.optimizer, run.scheduler, [args.lr])
        if start_step >= args.steps and run.rank == 0:
            print(f"the checkpoint is at the last step ({start_step} of --steps {args.steps}): nothing left to train")
    run.guard = WeightGuard(run.model.named_parameters(), "--lr", run.world)
    return start_step


def evaluate_policy(run: Run, all_modes: bool = False) -> dict[str, float]:
    """Auto mode (first and last: the forced modes too) on the held-out items, sampled at the training temperature
    with the same seed each time: the think rate measures how likely the policy is to think, not only which way its
    most likely token goes; forced modes as strict as the rollouts. Every rank syncs the replica (a collective);
    rank 0 evaluates."""
    args = run.args
    if run.world > 1:
        sync_weights(run.rollout_model, run.model)
    if run.rank != 0:
        return {}
    modes = (Mode.AUTO, Mode.THINK, Mode.NO_THINK) if all_modes else (Mode.AUTO,)
    with autocast(run.device, args.precision):
        return evaluate(run.rollout_model, run.tokenizer, run.eval_items, run.encoder, modes=modes,
                        max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                        min_think_tokens=args.min_think_tokens, no_reopen=args.no_reopen,
                        strict_auto=args.strict_auto)  # fmt: skip


def save(run: Run, done: int):
    """A checkpoint after step ``done`` (every rank: the shards are gathered)."""
    return save_checkpoint(run.args.output_dir / "checkpoint", run.loss_module, run.optimizer, run.scheduler, done,
                           settings=run.args.settings)  # fmt: skip


def finish_step(run: Run, step: int, record: dict, logger) -> bool:
    """After step ``step``'s update: evaluate when due, log, print, save when due. Returns whether it saved."""
    args, done = run.args, step + 1
    if run.eval_items and (done % args.eval_every == 0 or done == args.steps):
        record.update(evaluate_policy(run, all_modes=done == args.steps))
    if logger is not None:
        logger.log(done, record)
    if run.rank == 0 and (done % args.log_every == 0 or done == args.steps):
        shown = {k: v for k, v in record.items() if k.startswith(("reward/", "eval/", "length/")) or k == "kl"}
        tqdm.write(f"step {done}: " + ", ".join(f"{k} {v:.3g}" for k, v in shown.items())
                   + f" ({record['step_s']:.1f} s/step)")
    saved = done % args.save_every == 0 or done == args.steps
    if saved:
        save(run, done)
    if args.stop_after is not None and done == args.stop_after:
        os._exit(3)  # no cleanup: what a kill leaves behind
    return saved


def train_loop(run: Run, start_step: int, logger) -> tuple[dict, int | None]:
    """Steps ``start_step .. --steps``: the stages (``bpo_step.train_step``), then :func:`finish_step`. Returns
    the last record and, when a SIGTERM / SIGUSR1 stopped the run early, its exit status."""
    args, record = run.args, {}
    bar = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps, desc=args.algo,
               disable=None if run.rank == 0 else True)  # fmt: skip
    progress = Progress(args.algo, start_step, args.steps, args.progress_every if run.rank == 0 else 0,
                        tqdm.write if run.rank == 0 else (lambda _line: None))  # fmt: skip
    with Preemption(args.algo) as preemption:
        for step in bar:
            preemption.step = step + 1
            record = train_step(run, step)
            saved = finish_step(run, step, record, logger)
            if step + 1 < args.steps and preemption.requested(run.world, run.device):
                path = None if saved else save(run, step + 1)
                return record, preemption.stopped(step + 1, path or args.output_dir / "checkpoint")
            progress.step_done(step + 1)
    return record, None


def _train(args) -> int:
    run = setup(args)
    start_step = resume(run)
    logger = MetricsLogger(args.output_dir, resume_step=start_step if args.resume else None) \
        if run.rank == 0 else None
    if run.rank == 0:
        print(f"{args.algo}: {args.steps} steps x {args.prompts} prompts x {run.group} rollouts, model {args.model}, "
              f"{run.world} process(es), {args.device}, {args.precision}", flush=True)
    if start_step == 0 and run.eval_items:
        if run.rank == 0:
            print(f"evaluating {len(run.eval_items)} held-out items in 3 modes before training", flush=True)
        before = evaluate_policy(run, all_modes=True)
        if run.rank == 0:
            logger.log(0, before)
            print("before: " + _summary(before), flush=True)
    record, stopped = train_loop(run, start_step, logger)
    if stopped is not None:
        if logger is not None:
            logger.close()
        if run.world > 1:
            torch.distributed.destroy_process_group()
        return stopped
    return _finish(run, record, logger)


def _finish(run: Run, record: dict, logger) -> int:
    """The final model (world 1: the policy itself) and curves; under torchrun rank 0 writes."""
    args = run.args
    if run.world > 1:
        sync_weights(run.rollout_model, run.model)
        torch.distributed.destroy_process_group()
        if run.rank != 0:
            return 0
    logger.close()
    final = {k: v for k, v in record.items() if k.startswith("eval/")}
    if final:
        print("after:  " + _summary(final))
    folder = args.output_dir / "model"
    run.rollout_model.save_pretrained(folder)
    run.tokenizer.save_pretrained(folder)
    if run.encoder.image_processor is not None:  # the folder stays loadable with the same image pipeline
        run.encoder.image_processor.save_pretrained(folder)
    if args.plot:
        from r4b_fast.training.plot import plot_run

        print(f"curves: {plot_run(args.output_dir)}")
    return 0


def _summary(metrics: dict) -> str:
    """The evaluation line printed before and after training: accuracy, length and think rate per mode (the per-item
    splits by auto mode's choice stay in metrics.jsonl)."""
    return ", ".join(f"{k.split('/')[-1]} {v:.2f}" for k, v in sorted(metrics.items())
                     if "when_auto" not in k and "auto_skips" not in k)


def _data(args, tokenizer, n_img):
    """Training rows (None: the embedded task, sampled per step) and evaluation items; ``n_img(item)``: the
    placeholders of the item's image."""
    if args.dataset is None:
        return None, sample_items(args.eval_items, args.seed + 10_000, args.hard_fraction, split="eval")
    from r4b_fast.training.data import load_training_rows

    fmt = ChatFormat.from_tokenizer(tokenizer)  # the placeholder the template renders (the model's)

    def checked(path):
        return load_training_rows(path, max_prompt_tokens=args.max_prompt_tokens, on_bad_row=args.on_bad_row,
                                  prompt_tokens=lambda row: len(fmt.prompt_ids(row, n_img(row))))

    rows = checked(args.dataset)
    if args.eval_dataset is not None:
        return rows, checked(args.eval_dataset)[: args.eval_items]
    if len(rows) < 10:
        if args.eval_items:
            print(f"evaluation: off: --dataset has {len(rows)} usable rows, too few to hold out every 10th "
                  "(give --eval-dataset to evaluate)", file=sys.stderr)  # fmt: skip
        return rows, []
    return [r for i, r in enumerate(rows) if i % 10], [r for i, r in enumerate(rows) if i % 10 == 0][: args.eval_items]


if __name__ == "__main__":
    sys.exit(main())
