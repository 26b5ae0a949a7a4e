"""Bi-mode annealing (R-4B stage 1): ``python -m r4b_fast.training.annealing``.

SFT on a mix of thinking targets ``<think>\\nsteps\\n</think>\\n\\nanswer`` and non-thinking targets
``<think>\\n\\n</think>\\n\\nanswer``, chosen by each example's mode label; loss on assistant tokens only (on the
embedded task, forced examples leave their mode prefix unsupervised and auto examples supervise the mode decision:
``task.annealing_mix``); AdamW with separate learning rates for vision tower, projector and language model, linear
warm-up then cosine decay.
With no arguments it trains the tiny R-4B-architecture model on the embedded synthetic task (CPU, minutes) and
reports accuracy per mode.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from r4b_fast import fused_linear_logprobs
from r4b_fast.models.chat import ChatFormat
from r4b_fast.modes import Mode
from r4b_fast.training.annealing_args import SETTINGS, build_parser, check_values
from r4b_fast.training.bpo_loss import enable_gradient_checkpointing
from r4b_fast.training.common import (
    CheckpointError,
    LossModule,
    MetricsLogger,
    NonFiniteError,
    apply_learning_rates,
    autocast,
    check_finite_step,
    check_resume,
    device_from_arguments,
    init_distributed,
    load_checkpoint,
    load_model,
    prepare_output_dir,
    run_settings,
    save_checkpoint,
    set_seed,
    shard_model,
)
from r4b_fast.training.evaluation import (
    ModeTokens,
    evaluate_held_out,
)
from r4b_fast.training.guards import Preemption, WeightGuard
from r4b_fast.training.task import (
    IMAGE_TOKEN,
    Item,
    annealing_mix,
    build_tokenizer,
    sample_items,
)
from r4b_fast.training.threads import Progress, set_threads
from r4b_fast.training.tiny_model import build_tiny_r4b, parameter_groups
from r4b_fast.training.vision import ImageEncoder


def encode_sft_batch(tokenizer, items: list[Item], modes: list[Mode], n_image_tokens: int | list[int],
                     auto: list[bool] | None = None, fmt: ChatFormat | None = None):  # fmt: skip
    """Right-padded input ids ``[B, L]`` int64, attention mask ``[B, L]``, labels ``[B, L]`` (-100 outside the
    assistant turn) and the list of images. ``n_image_tokens``: the placeholders of every image, or per item
    (``ImageEncoder.count``). ``auto``: per item, whether its mode decision is supervised (default: all); a forced
    example (False) leaves its mode prefix (``fmt.mode_prefix[mode]``: what a forced-mode prompt is given) at -100.
    ``fmt``: the prompt format (``ModeTokens.from_tokenizer(tokenizer, model).format``: the chat template's, with
    the model's image placeholder); default: the tokenizer's with ``<image>`` (the project's format without a
    template)."""
    if isinstance(n_image_tokens, int):
        n_image_tokens = [n_image_tokens] * len(items)
    auto = [True] * len(items) if auto is None else auto
    fmt = fmt or ChatFormat.from_tokenizer(tokenizer, IMAGE_TOKEN)
    ids, labels = [], []
    for item, mode, n_img, decides in zip(items, modes, n_image_tokens, auto):
        prompt = fmt.prompt_ids(item, n_img)
        target = fmt.ids(fmt.target(item, mode)) + [tokenizer.eos_token_id]
        ids.append(prompt + target)
        hidden = 0 if decides else len(fmt.ids(fmt.mode_prefix[mode]))
        labels.append([-100] * (len(prompt) + hidden) + target[hidden:])
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids])
    label_ids = torch.tensor([x + [-100] * (width - len(x)) for x in labels])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
    images = [it.image() for it in items]
    return input_ids, mask, label_ids, images


def sft_loss(model, input_ids, attention_mask, labels, images, normaliser=None,
             encoder: ImageEncoder | None = None) -> tuple[torch.Tensor, int]:  # fmt: skip
    """Mean next-token cross-entropy over assistant tokens, and their count, on the project's ops: the padded batch
    is packed into one sequence (``pack_multimodal``: no padding computed), run through the model with varlen
    attention (``packed_forward``), and scored from the LM head's input (``fused_linear_logprobs``: no logits).
    ``normaliser``: divide the summed loss by this (the global token count under data parallelism) instead.
    ``images``: a list of ``[3, H, W]`` tensors (or one ``[N, 3, H, W]`` tensor); ``encoder`` turns them into vision
    features (default: the model's fixed-size path)."""
    encoder = encoder or ImageEncoder(model)
    # the model's family packs and runs it (1-D RoPE for LLaVA-OneVision / R-4B, M-RoPE + DeepStack for Qwen)
    hidden, packed = encoder.family.packed_hidden(model, input_ids, attention_mask,
                                                  encoder.encode(model, list(images)))  # [T, D]
    next_labels = torch.full_like(labels, -100)
    next_labels[:, :-1] = labels[:, 1:]  # position t is scored on token t + 1 of its own sequence
    targets = packed.pack(next_labels)
    n_tokens = int((targets != -100).sum())
    logp = fused_linear_logprobs(hidden, model.lm_head.weight, targets)
    return -logp.sum() / (normaliser if normaliser is not None else max(n_tokens, 1)), n_tokens


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _annealing_data(args, tokenizer, n_img, fmt: ChatFormat | None = None):
    """(items, mode labels, auto flags) for ``steps x batch-size`` positions: the embedded task
    (``annealing_mix``), or the rows of --dataset repeated in order (epochs; every row's turn supervised whole).
    ``n_img(item)``: the placeholders of the item's image; ``fmt``: the prompt format."""
    fmt = fmt or ChatFormat.from_tokenizer(tokenizer, IMAGE_TOKEN)
    if args.dataset is None:
        items = sample_items(args.steps * args.batch_size, args.seed, args.hard_fraction)
        modes, auto = annealing_mix(items, args.seed, think_prob_hard=args.think_prob_hard,
                                    auto_fraction=args.auto_fraction, auto_think_prob_hard=args.auto_think_prob_hard,
                                    think_prob_easy=args.think_prob_easy)
        return items, modes, auto
    from r4b_fast.training.data import annealing_row_problem, load_training_rows

    rows = load_training_rows(args.dataset, max_prompt_tokens=args.max_prompt_tokens, on_bad_row=args.on_bad_row,
                              prompt_tokens=lambda r: len(fmt.prompt_ids(r, n_img(r))),
                              check=annealing_row_problem)  # fmt: skip
    return rows, [r.mode for r in rows], [True] * len(rows)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    check_values(parser, args)
    device, precision = device_from_arguments(parser, args)
    args.precision = precision  # recorded resolved: "auto" means bf16 on a GPU, fp32 on a CPU
    # the run folder and a resume's settings are checked before anything loads
    settings = run_settings(args, SETTINGS)
    manifest = prepare_output_dir(parser, args)
    changes = [] if manifest is None else check_resume(parser, args, manifest, settings)
    try:
        return _train(args, device, precision, settings, changes)
    except (CheckpointError, NonFiniteError) as err:  # a full disk, a NaN, a divergence: says what and where
        raise SystemExit(f"annealing: {err}") from err


@dataclass
class SftRun:
    """What stays fixed over an annealing run (the model FSDP2-sharded inside ``loss_module`` under torchrun)."""

    args: argparse.Namespace
    device: torch.device
    precision: str
    settings: dict
    model: torch.nn.Module
    tokenizer: object
    encoder: ImageEncoder
    fmt: ChatFormat
    loss_module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    data: tuple  # (items, mode labels, auto flags) per data position
    rank: int = 0
    world: int = 1
    guard: WeightGuard | None = None  # armed on the weights the run starts from
    base_lrs: list[float] | None = None  # this run's learning rates (a resume restores the checkpoint's)

    def n_img(self, item) -> int:
        """Every image size is measured on the plain model (``ImageEncoder.count`` needs one)."""
        return self.encoder.count(self.model, item)


@dataclass
class SftBatch:
    """One step's SFT batch on this rank, and the global token normaliser."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    images: list
    n_global: torch.Tensor


@dataclass
class SftResult:
    loss: float  # the global token mean (what one process would log)
    grad_norm: float
    tokens: int


def setup(args, device, precision, settings: dict) -> SftRun:
    """The model (fresh tiny, or --model), the data positions, optimizer and warm-up + cosine schedule."""
    set_seed(args.seed)
    rank, world = init_distributed(device)
    if world > 1 and args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must divide by the world size {world}")
    if args.model is None:
        tokenizer = build_tokenizer()
        model = build_tiny_r4b(tokenizer, hidden_size=args.hidden_size, layers=args.layers, seed=args.seed).to(device)
    else:
        model, tokenizer = load_model(args.model, device)
    set_threads(args.threads, model, device, verbose=rank == 0)
    if args.gradient_checkpointing:
        model.train()
        enable_gradient_checkpointing(model)
    encoder = ImageEncoder.for_model(model, args.model)
    fmt = ModeTokens.from_tokenizer(tokenizer, model).format  # the chat template's prompts, the project's without
    run = SftRun(args, device, precision, settings, model, tokenizer, encoder, fmt, None, None, None, None, rank,
                 world)  # fmt: skip
    run.data = _annealing_data(args, tokenizer, run.n_img, fmt)
    if args.dataset is None:
        run.n_img(run.data[0][0])  # the embedded task: one image size, measured before sharding
    # the loss as a module: FSDP2's root under torchrun (same seeded weights on every rank), a plain wrapper alone
    run.loss_module = shard_model(model, sft_loss, device) if world > 1 else LossModule(model, sft_loss)
    run.optimizer = torch.optim.AdamW(parameter_groups(model, args.lr_vision, args.lr_projector, args.lr_llm))
    run.base_lrs = [group["lr"] for group in run.optimizer.param_groups]  # before the schedule scales them
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(
        run.optimizer, lambda s: cosine_with_warmup(s, args.steps, args.warmup))
    return run


def resume(run: SftRun, changes: list[str]) -> int:
    """Load the checkpoint under --resume (this run's learning rates, not the checkpoint's) and arm the weight
    guard on the weights the run starts from. Returns the first step to run (0-based)."""
    args, start_step = run.args, 0
    if args.resume:
        loaded = load_checkpoint(args.output_dir / "checkpoint", run.loss_module, run.optimizer, run.scheduler)
        start_step = loaded["step"]
        if run.rank == 0:
            print(f"resumed from {loaded['path']} at step {start_step}")
            for change in changes:
                print(f"resume: changed setting {change} (--allow-changed-settings)")
        apply_learning_rates(run.optimizer, run.scheduler, run.base_lrs)
        if start_step >= args.steps and run.rank == 0:
            print(f"the checkpoint is at the last step ({start_step} of --steps {args.steps}): nothing left to train")
    run.guard = WeightGuard(run.model.named_parameters(), "--lr-llm / --lr-projector / --lr-vision", run.world)
    return start_step


def sft_batch(run: SftRun, step: int) -> SftBatch:
    """Data position = step: items (and their images) are a function of (seed, index), so resume is exact; under
    torchrun each rank takes its contiguous share of the step's batch."""
    args, (train_items, train_modes, train_auto) = run.args, run.data
    share = args.batch_size // run.world
    lo = step * args.batch_size + run.rank * share
    picked = [(lo + i) % len(train_items) for i in range(share)]
    items = [train_items[i] for i in picked]
    ids, mask, labels, images = encode_sft_batch(run.tokenizer, items, [train_modes[i] for i in picked],
                                                 [run.n_img(it) for it in items], [train_auto[i] for i in picked],
                                                 run.fmt)  # fmt: skip
    ids, mask, labels = ids.to(run.device), mask.to(run.device), labels.to(run.device)  # images: the encoder moves
    n_global = (labels[:, 1:] != -100).sum()  # the global token normaliser (x world: FSDP averages gradients)
    if run.world > 1:
        torch.distributed.all_reduce(n_global)
    return SftBatch(ids, mask, labels, images, n_global)


def sft_update(run: SftRun, batch: SftBatch, step: int) -> SftResult:
    """Forward, backward, gradient clipping, finite checks, the optimizer step (``step``: 0-based) and the weight
    guard after it."""
    with autocast(run.device, run.precision):
        loss, _ = run.loss_module(batch.input_ids, batch.attention_mask, batch.labels, batch.images,
                                  normaliser=batch.n_global, encoder=run.encoder)  # fmt: skip
    (loss * run.world).backward()
    loss = loss.detach().clone()
    if run.world > 1:
        torch.distributed.all_reduce(loss)  # the global token mean, what one process would log
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), 1.0)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    check_finite_step(step + 1, loss.item(), grad_norm.item())  # the same on every rank: all stop together
    run.guard.optimizer_step(run.optimizer, step + 1)
    run.guard.check(step + 1)
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    return SftResult(loss.item(), grad_norm.item(), int(batch.n_global))


def finish_step(run: SftRun, step: int, result: SftResult, logger, elapsed: float, bar) -> bool:
    """Log, print every 50 steps, save when due (every rank: gathers shards). Returns whether it saved."""
    args, done = run.args, step + 1
    if logger is not None:
        logger.log(done, {"loss": result.loss, "grad_norm": result.grad_norm, "tokens": result.tokens,
                          "lr_llm": run.scheduler.get_last_lr()[-1], "elapsed_s": elapsed})
    bar.set_postfix(loss=f"{result.loss:.3f}")
    if done % 50 == 0 and run.rank == 0:
        tqdm.write(f"step {done}/{args.steps}: loss {result.loss:.4f} ({elapsed:.0f} s)")
    saved = done == args.steps or bool(args.save_every and done % args.save_every == 0)
    if saved:
        save_checkpoint(args.output_dir / "checkpoint", run.loss_module, run.optimizer, run.scheduler, done,
                        settings=run.settings)  # fmt: skip
    if args.stop_after is not None and done == args.stop_after:
        os._exit(3)  # no cleanup, no final save: what a kill leaves behind
    return saved


def train_loop(run: SftRun, start_step: int, logger) -> int | None:
    """Steps ``start_step .. --steps``: batch, update, finish. Returns the exit status when a SIGTERM / SIGUSR1
    stopped the run early (a checkpoint of the last finished step saved), else None."""
    args, start = run.args, time.perf_counter()
    bar = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps, desc="annealing",
               disable=None if run.rank == 0 else True)  # fmt: skip
    progress = Progress("annealing", start_step, args.steps, args.progress_every if run.rank == 0 else 0,
                        tqdm.write if run.rank == 0 else (lambda _line: None), estimate_after=5)  # fmt: skip
    with Preemption("annealing") as preemption:
        for step in bar:
            preemption.step = step + 1
            result = sft_update(run, sft_batch(run, step), step)
            saved = finish_step(run, step, result, logger, round(time.perf_counter() - start, 2), bar)
            if step + 1 < args.steps and preemption.requested(run.world, run.device):
                if not saved:
                    save_checkpoint(args.output_dir / "checkpoint", run.loss_module, run.optimizer, run.scheduler,
                                    step + 1, settings=run.settings)  # fmt: skip
                return preemption.stopped(step + 1, args.output_dir / "checkpoint")
            progress.step_done(step + 1)
    return None


def _train(args, device, precision, settings: dict, changes: list[str]) -> int:
    run = setup(args, device, precision, settings)
    start_step = resume(run, changes)
    logger = MetricsLogger(args.output_dir, resume_step=start_step if args.resume else None) \
        if run.rank == 0 else None
    train_modes, train_auto = run.data[1], run.data[2]
    if run.rank == 0:
        print(f"annealing: {sum(p.numel() for p in run.model.parameters()) / 1e6:.2f}M params, {args.steps} steps x "
              f"{args.batch_size}, {sum(m == Mode.THINK for m in train_modes) / len(train_modes):.0%} thinking "
              f"labels, {sum(train_auto) / len(train_auto):.0%} auto examples, {run.world} process(es), {device}, "
              f"{precision}", flush=True)
    stopped = train_loop(run, start_step, logger)
    if stopped is not None:
        if logger is not None:
            logger.close()
        if run.world > 1:
            torch.distributed.destroy_process_group()
        return stopped
    model = _final_model(run)
    if model is None:  # not rank 0
        return 0
    _save_and_evaluate(run, model, logger)
    return 0


def _final_model(run: SftRun):
    """The trained plain model: under torchrun the shards gathered (rank 0 goes on with it, the others get None)."""
    if run.world == 1:
        return run.model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(run.loss_module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    torch.distributed.destroy_process_group()
    if run.rank != 0:
        return None
    model = type(run.model)(run.model.config)
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    return model.to(run.device)


def _save_and_evaluate(run: SftRun, model, logger) -> None:
    """The model first: an evaluation that fails never costs the trained weights."""
    args, folder = run.args, run.args.output_dir / "model"
    model.save_pretrained(folder)
    run.tokenizer.save_pretrained(folder)
    if run.encoder.image_processor is not None:  # the folder stays loadable with the same image pipeline
        run.encoder.image_processor.save_pretrained(folder)
    print(f"saved {folder}")
    if args.eval_items and args.dataset is not None:
        print("evaluation covers the embedded task only: skipped with --dataset (BPO evaluates held-out rows)")
    if args.eval_items and args.dataset is None:
        print(f"evaluating {args.eval_items} held-out items", flush=True)
        with autocast(run.device, run.precision):
            metrics = evaluate_held_out(model, run.tokenizer, run.encoder, args.eval_items, seed=args.seed,
                                        min_think_tokens=args.min_think_tokens, no_reopen=args.no_reopen,
                                        strict_auto=args.strict_auto)  # fmt: skip
        logger.log(args.steps, metrics)
        for prefix in ("eval/", "eval_t1/"):
            print(f"{prefix.rstrip('/')}: " + ", ".join(f"{k.removeprefix(prefix)} {v:.2f}"
                                                        for k, v in sorted(metrics.items()) if k.startswith(prefix)))
    logger.close()


if __name__ == "__main__":
    sys.exit(main())
