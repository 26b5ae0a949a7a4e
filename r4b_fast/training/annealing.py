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
from pathlib import Path

import torch
from tqdm.auto import tqdm

from r4b_fast import fused_linear_logprobs
from r4b_fast.models.chat import ChatFormat
from r4b_fast.modes import Mode
from r4b_fast.training.common import (
    CheckpointError,
    LossModule,
    MetricsLogger,
    NonFiniteError,
    add_device_arguments,
    add_run_arguments,
    apply_learning_rates,
    autocast,
    check_finite_step,
    check_range,
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
    add_strict_mode_arguments,
    check_strict_mode_arguments,
    evaluate_held_out,
)
from r4b_fast.training.task import (
    AUTO_FRACTION,
    AUTO_THINK_PROB_HARD,
    HARD_FRACTION,
    IMAGE_TOKEN,
    THINK_LABEL_PROB_HARD,
    THINK_PROB_EASY,
    Item,
    annealing_mix,
    build_tokenizer,
    sample_items,
)
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
    parser = argparse.ArgumentParser(prog="python -m r4b_fast.training.annealing", description=__doc__.splitlines()[0])
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
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=Path("runs/annealing"))
    add_run_arguments(parser)
    add_device_arguments(parser)
    parser.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)  # tests: die like a kill
    args = parser.parse_args(argv)
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
    for flag in ("--lr-llm", "--lr-projector", "--lr-vision"):  # 0 freezes that part; negative is gradient ascent
        check_range(parser, flag, getattr(args, flag[2:].replace("-", "_")), low_inclusive=True)
    if args.dataset is not None and not args.dataset.exists():
        parser.error(f"--dataset: {args.dataset} does not exist")
    device, precision = device_from_arguments(parser, args)
    args.precision = precision  # recorded resolved: "auto" means bf16 on a GPU, fp32 on a CPU
    # the run folder and a resume's settings are checked before anything loads
    settings = run_settings(args, SETTINGS)
    manifest = prepare_output_dir(parser, args)
    changes = [] if manifest is None else check_resume(parser, args, manifest, settings)
    try:
        return _train(args, device, precision, settings, changes)
    except (CheckpointError, NonFiniteError) as err:  # a full disk, a NaN: the message says what and where
        raise SystemExit(f"annealing: {err}") from err


# the settings that alter the math of a step (the cosine schedule spans --steps): a resume with other values is
# refused unless --allow-changed-settings
# (the strict-mode flags only change the final evaluation, not a step)
SETTINGS = ("model", "dataset", "on_bad_row", "max_prompt_tokens", "steps", "batch_size", "lr_llm", "lr_projector",
            "lr_vision", "warmup", "hidden_size", "layers", "seed", "precision", "hard_fraction", "think_prob_hard",
            "auto_fraction", "auto_think_prob_hard", "think_prob_easy")


def _train(args, device, precision, settings: dict, changes: list[str]) -> int:

    set_seed(args.seed)
    rank, world = init_distributed(device)
    if world > 1 and args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must divide by the world size {world}")
    if args.model is None:
        tokenizer = build_tokenizer()
        model = build_tiny_r4b(tokenizer, hidden_size=args.hidden_size, layers=args.layers, seed=args.seed).to(device)
    else:
        model, tokenizer = load_model(args.model, device)
    model_class, model_config = type(model), model.config
    encoder = ImageEncoder.for_model(model, args.model)
    fmt = ModeTokens.from_tokenizer(tokenizer, model).format  # the chat template's prompts, the project's without

    def n_img(item):  # every image size is measured here, before sharding (ImageEncoder.count needs a plain model)
        return encoder.count(model, item)

    train_items, train_modes, train_auto = _annealing_data(args, tokenizer, n_img, fmt)
    if args.dataset is None:
        n_img(train_items[0])  # the embedded task: one image size
    # the loss as a module: FSDP2's root under torchrun (same seeded weights on every rank), a plain wrapper alone
    loss_module = shard_model(model, sft_loss, device) if world > 1 else LossModule(model, sft_loss)
    optimizer = torch.optim.AdamW(parameter_groups(model, args.lr_vision, args.lr_projector, args.lr_llm))
    base_lrs = [group["lr"] for group in optimizer.param_groups]  # this run's: a resume restores the checkpoint's
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(s, args.steps, args.warmup))
    checkpoint_dir = args.output_dir / "checkpoint"
    start_step = 0
    if args.resume:
        loaded = load_checkpoint(checkpoint_dir, loss_module, optimizer, scheduler)
        start_step = loaded["step"]
        if rank == 0:
            print(f"resumed from {loaded['path']} at step {start_step}")
            for change in changes:
                print(f"resume: changed setting {change} (--allow-changed-settings)")
        apply_learning_rates(optimizer, scheduler, base_lrs)
        if start_step >= args.steps and rank == 0:
            print(f"the checkpoint is at the last step ({start_step} of --steps {args.steps}): nothing left to train")
    logger = MetricsLogger(args.output_dir, resume_step=start_step if args.resume else None) if rank == 0 else None
    think_share = sum(m == Mode.THINK for m in train_modes) / len(train_modes)
    auto_share = sum(train_auto) / len(train_auto)
    if rank == 0:
        print(f"annealing: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, {args.steps} steps x "
              f"{args.batch_size}, {think_share:.0%} thinking labels, {auto_share:.0%} auto examples, {world} "
              f"process(es), {device}, {precision}")
    start = time.perf_counter()
    progress = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps, desc="annealing",
                    disable=None if rank == 0 else True)
    share = args.batch_size // world
    for step in progress:
        # data position = step: items (and their images) are a function of (seed, index), so resume is exact;
        # under torchrun each rank takes its contiguous share of the step's batch
        lo = step * args.batch_size + rank * share
        picked = [(lo + i) % len(train_items) for i in range(share)]
        items = [train_items[i] for i in picked]
        batch = encode_sft_batch(tokenizer, items, [train_modes[i] for i in picked], [n_img(it) for it in items],
                                 [train_auto[i] for i in picked], fmt)
        batch = (*(t.to(device) for t in batch[:3]), batch[3])  # images stay on the CPU: the encoder moves them
        # the global token normaliser (x world: FSDP averages gradients over ranks)
        n_global = (batch[2][:, 1:] != -100).sum()
        if world > 1:
            torch.distributed.all_reduce(n_global)
        with autocast(device, precision):
            loss, n_tokens = loss_module(*batch, normaliser=n_global, encoder=encoder)
        (loss * world).backward()
        loss = loss.detach().clone()
        if world > 1:
            torch.distributed.all_reduce(loss)  # the global token mean, what one process would log
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        check_finite_step(step + 1, loss.item(), grad_norm.item())  # the same on every rank: all stop together
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        elapsed = round(time.perf_counter() - start, 2)
        if logger is not None:
            logger.log(step + 1, {"loss": loss.item(), "grad_norm": grad_norm.item(), "tokens": int(n_global),
                                  "lr_llm": scheduler.get_last_lr()[-1], "elapsed_s": elapsed})
        progress.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % 50 == 0 and rank == 0:
            tqdm.write(f"step {step + 1}/{args.steps}: loss {loss.item():.4f} ({elapsed:.0f} s)")
        done = step + 1
        if done == args.steps or (args.save_every and done % args.save_every == 0):
            save_checkpoint(checkpoint_dir, loss_module, optimizer, scheduler, done,
                            settings=settings)  # every rank: gathers shards
        if args.stop_after is not None and done == args.stop_after:
            os._exit(3)  # no cleanup, no final save: what a kill leaves behind
    if world > 1:  # gather the shards; rank 0 goes on with a plain transformers model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(loss_module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        torch.distributed.destroy_process_group()
        if rank != 0:
            return 0
        model = model_class(model_config)
        model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
        model.to(device)
    # the model first: an evaluation that fails never costs the trained weights
    model.save_pretrained(args.output_dir / "model")
    tokenizer.save_pretrained(args.output_dir / "model")
    if encoder.image_processor is not None:  # the folder stays loadable with the same image pipeline
        encoder.image_processor.save_pretrained(args.output_dir / "model")
    print(f"saved {args.output_dir / 'model'}")
    if args.eval_items and args.dataset is not None:
        print("evaluation covers the embedded task only: skipped with --dataset (BPO evaluates held-out rows)")
    if args.eval_items and args.dataset is None:
        with autocast(device, precision):
            metrics = evaluate_held_out(model, tokenizer, encoder, args.eval_items, seed=args.seed,
                                        min_think_tokens=args.min_think_tokens, no_reopen=args.no_reopen,
                                        strict_auto=args.strict_auto)
        logger.log(args.steps, metrics)
        for prefix in ("eval/", "eval_t1/"):
            print(f"{prefix.rstrip('/')}: " + ", ".join(f"{k.removeprefix(prefix)} {v:.2f}"
                                                        for k, v in sorted(metrics.items()) if k.startswith(prefix)))
    logger.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
