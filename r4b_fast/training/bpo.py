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
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from r4b_fast import group_advantages, unpack
from r4b_fast.models.chat import ChatFormat
from r4b_fast.modes import Mode
from r4b_fast.ops.fused_linear_logprobs import (
    fused_linear_logprobs,
    fused_linear_policy_loss,
    logprob_mismatch,
    rollout_importance_weights,
)
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
    sync_weights,
)
from r4b_fast.training.evaluation import (
    ModeTokens,
    add_strict_mode_arguments,
    check_strict_mode_arguments,
    completion_texts,
    evaluate,
    prompt_embeddings,
)
from r4b_fast.training.mode_decision import DecisionTokens, decision_targets, mode_decision_loss
from r4b_fast.training.rewards import accuracy_reward, compute_rewards, thought
from r4b_fast.training.rollout import bpo_modes, generate_rollouts
from r4b_fast.training.task import sample_items
from r4b_fast.training.vision import ImageEncoder

__all__ = ["ModeTokens", "main", "micro_batch_loss", "policy_forward", "prompt_embeddings"]

ASSETS = Path(__file__).parent / "assets"
DEFAULT_MODEL = ASSETS / "annealed"


def policy_forward(model, items, prompt_ids, rollouts, image_id, pad_id, encoder: ImageEncoder | None = None):
    """Hidden states that predict each completion token: ``[R, N, D]`` (gradients reach vision, projector, LLM).
    Any family the loops load: the model's family packs the rows (1-D RoPE, or M-RoPE + DeepStack for Qwen)."""
    R, N = rollouts.completions.shape
    device = next(model.parameters()).device
    lens = [len(prompt_ids[p]) for p in rollouts.prompt_index.tolist()]
    width = max(lens) + N
    ids = torch.full((R, width), pad_id, dtype=torch.int64)
    attn = torch.zeros(R, width, dtype=torch.int64)
    for r, p in enumerate(rollouts.prompt_index.tolist()):
        n = lens[r]
        ids[r, :n] = torch.tensor(prompt_ids[p])
        ids[r, n : n + N] = rollouts.completions[r].cpu()
        attn[r, :n] = 1
        attn[r, n : n + N] = rollouts.completion_mask[r].long().cpu()
    ids, attn = ids.to(device), attn.to(device)
    encoder = encoder or ImageEncoder(model)
    images = encoder.encode(model, [it.image() for it in items])  # per item, with grad
    # Pack prompt + completion of every rollout into one sequence (no padding computed). A sampled placeholder token
    # in a completion is text, not a placeholder: hide it from the placeholder search, keep its embedding.
    in_prompt = torch.arange(width, device=device)[None, :] < torch.tensor(lens, device=device)[:, None]
    placeholders = torch.where((ids == image_id) & ~in_prompt, pad_id, ids)
    rows = images.select(rollouts.prompt_index.tolist())  # each rollout row's image
    flat, packed = encoder.family.packed_hidden(model, placeholders, attn, rows,
                                                text_embeds=model.get_input_embeddings()(ids))  # fmt: skip
    hidden = unpack(flat, packed)  # [R, width, D]
    # position lens - 1 + t (the last prompt token, then the completion) predicts completion token t
    index = torch.tensor(lens, device=device)[:, None] - 1 + torch.arange(N, device=device)[None, :]
    return hidden.gather(1, index[..., None].expand(R, N, hidden.shape[-1]))


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m r4b_fast.training.bpo", description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="annealed model folder (default: shipped tiny)")
    p.add_argument("--algo", choices=("bpo", "grpo"), default="bpo")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--g", type=int, default=4, help="rollouts per mode per prompt (2g per group)")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--temperature", type=float, default=1.0)
    add_strict_mode_arguments(p)
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
                        "policy-gradient term (the rollout vs trainer mismatch is logged every step either way)")
    p.add_argument("--rollout-is-cap", type=float, default=2.0,
                   help="truncation of the --rollout-is weights (verl's rollout_is_threshold)")  # fmt: skip
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
    add_run_arguments(p)
    add_device_arguments(p)
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)  # tests: die like a kill
    args = p.parse_args(argv)
    for name in ("steps", "prompts", "g", "max_new_tokens", "ppo_epochs", "mini_batches", "grad_accum", "log_every",
                 "save_every", "eval_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.eval_items < 0:
        p.error(f"--eval-items must be >= 0 (0: no evaluation), got {args.eval_items}")
    if args.max_prompt_tokens < 1:
        p.error(f"--max-prompt-tokens must be positive, got {args.max_prompt_tokens}")
    if not 0 <= args.seed < 2**32:
        p.error(f"--seed: expected an integer in [0, 2^32), got {args.seed}")
    check_range(p, "--lr", args.lr)
    check_strict_mode_arguments(p, args)
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
    args.device, args.precision = device_from_arguments(p, args)
    # every setting is checked before the model loads: the run folder, and a resume against its checkpoint
    args.settings = run_settings(args, SETTINGS)
    args.checkpoint_manifest = prepare_output_dir(p, args)
    args.changed_settings = [] if args.checkpoint_manifest is None else \
        check_resume(p, args, args.checkpoint_manifest, args.settings)
    return args


# the settings that alter the math of a step: a resume with other values is refused (--allow-changed-settings)
SETTINGS = ("model", "algo", "prompts", "g", "max_new_tokens", "temperature", "lr", "ppo_epochs", "mini_batches",
            "grad_accum", "clip", "aggregation", "beta", "hard_fraction", "dataset", "on_bad_row",
            "max_prompt_tokens", "seed", "precision", "min_think_tokens", "no_reopen", "strict_auto", "decision_coef",
            "decision_tie", "rollout_is", "rollout_is_cap")


@dataclass
class MicroBatch:
    """What one forward/backward of the policy needs: the rollouts of some rows and their training signals."""

    items: list
    prompt_ids: list[list[int]]
    rollouts: object  # RolloutResult restricted to the rows, prompt_index renumbered into ``items``
    advantages: torch.Tensor
    mask: torch.Tensor
    old_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor | None
    decision: DecisionTokens | None = None  # BPO's mode-decision loss (None: off)
    decision_targets: torch.Tensor | None = None  # [R] Mode its group's verdict pushes the decision to
    decision_weights: torch.Tensor | None = None  # [R] float >= 0
    rollout_is_weights: torch.Tensor | None = None  # --rollout-is: truncated pi_train / pi_rollout per token


def micro_batch_loss(model, mb: MicroBatch, tokens: ModeTokens, args, normaliser, encoder: ImageEncoder):
    """The clipped policy loss of one micro-batch (``LossModule``'s function: FSDP2's root under torchrun)."""
    hidden = policy_forward(model, mb.items, mb.prompt_ids, mb.rollouts, tokens.image, tokens.pad, encoder)
    loss, metrics = fused_linear_policy_loss(
        hidden, model.lm_head.weight, mb.rollouts.completions, mb.advantages, mb.mask, old_logprobs=mb.old_logprobs,
        ref_logprobs=mb.ref_logprobs, beta=args.beta, clip_low=args.clip, clip_high=args.clip,
        temperature=args.temperature, aggregation=args.aggregation, normaliser=normaliser,
        rollout_is_weights=mb.rollout_is_weights,
    )  # fmt: skip
    if mb.decision is not None:
        decision, m = mode_decision_loss(hidden, model.lm_head.weight, mb.decision, mb.decision_targets,
                                         mb.decision_weights, temperature=args.temperature, normaliser=normaliser)
        loss = loss + args.decision_coef * decision
        metrics["decision_loss"] = decision.detach()
        hard = torch.tensor([mb.items[p].hard is True for p in mb.rollouts.prompt_index.tolist()], device=hidden.device)
        easy = torch.tensor([mb.items[p].hard is False for p in mb.rollouts.prompt_index.tolist()],
                            device=hidden.device)  # fmt: skip
        for level, rows in (("hard", hard), ("easy", easy)):
            if rows.any():  # p(think) at auto mode's decision: every step, not only at evaluations
                metrics[f"decision/p_think_{level}"] = m["decision_p_think"][rows].mean()
    return loss, metrics


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return _train(args)
    except (CheckpointError, NonFiniteError) as err:  # a full disk, a NaN: the message says what and where
        raise SystemExit(f"bpo: {err}") from err


def _train(args) -> int:
    device, precision = args.device, args.precision
    set_seed(args.seed)
    rank, world = init_distributed(device)
    if world > 1 and args.prompts % world:
        raise SystemExit(f"--prompts {args.prompts} must divide by the world size {world}")
    if (args.prompts // world) * 2 * args.g % (args.mini_batches * args.grad_accum):
        raise SystemExit(f"--mini-batches x --grad-accum must divide each rank's rollouts ({args.prompts // world} "
                         f"prompts x 2g = {args.prompts // world * 2 * args.g})")  # fmt: skip
    model, tokenizer = load_model(args.model, device)
    model.train()
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

    def n_img(item):  # placeholders of the item's image, measured on the plain (rollout) copy
        return encoder.count(rollout_model, item)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    start_step = 0
    checkpoint_dir = args.output_dir / "checkpoint"
    train_rows, eval_items = _data(args, tokenizer, n_img)
    if args.resume:
        loaded = load_checkpoint(checkpoint_dir, loss_module, optimizer, scheduler)
        start_step = loaded["step"]
        if rank == 0:
            print(f"resumed from {loaded['path']} at step {start_step}")
            for change in args.changed_settings:
                print(f"resume: changed setting {change} (--allow-changed-settings)")
        apply_learning_rates(optimizer, scheduler, [args.lr])  # the run's --lr, not the one the checkpoint had
        if start_step >= args.steps and rank == 0:
            print(f"the checkpoint is at the last step ({start_step} of --steps {args.steps}): nothing left to train")
    logger = MetricsLogger(args.output_dir, resume_step=start_step if args.resume else None) if rank == 0 else None
    group = 2 * args.g
    rollout_modes = bpo_modes(args.g) if args.algo == "bpo" else [int(Mode.AUTO)] * group
    local = args.prompts // world  # this rank's prompts: [rank * local, (rank + 1) * local) of every step's batch
    if rank == 0:
        print(f"{args.algo}: {args.steps} steps x {args.prompts} prompts x {group} rollouts, model {args.model}, "
              f"{world} process(es), {device}, {precision}")

    def evaluate_policy(all_modes: bool = False):  # every rank syncs the replica (a collective); rank 0 evaluates
        if world > 1:
            sync_weights(rollout_model, model)
        if rank != 0:
            return {}
        # auto mode (first and last: the forced modes too), sampled at the training temperature with the same seed
        # each time: the think rate measures how likely the policy is to think, not only which way its most likely
        # token goes; forced modes as strict as the rollouts
        modes = (Mode.AUTO, Mode.THINK, Mode.NO_THINK) if all_modes else (Mode.AUTO,)
        with autocast(device, precision):
            return evaluate(rollout_model, tokenizer, eval_items, encoder, modes=modes,
                            max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                            min_think_tokens=args.min_think_tokens, no_reopen=args.no_reopen,
                            strict_auto=args.strict_auto)  # fmt: skip

    if start_step == 0 and eval_items:
        before = evaluate_policy(all_modes=True)
        if rank == 0:
            logger.log(0, before)
            print("before: " + _summary(before))
    record = {}
    progress = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps, desc=args.algo,
                    disable=None if rank == 0 else True)  # fmt: skip
    for step in progress:
        t0 = time.perf_counter()
        # data position = step: the prompts and the sampling noise of a step depend on (seed, step) only
        if train_rows is None:
            items = sample_items(args.prompts, args.seed * 1_000_003 + step, args.hard_fraction)
        else:
            items = [train_rows[(step * args.prompts + i) % len(train_rows)] for i in range(args.prompts)]
        items = items[rank * local : (rank + 1) * local]
        gen = torch.Generator().manual_seed(args.seed * 7_000_003 + step)
        prompt_ids = [tokens.prompt_ids(it, n_img(it)) for it in items]
        if world > 1:
            sync_weights(rollout_model, model)
        rollout_model.eval()
        with torch.no_grad(), autocast(device, precision):
            rollouts = generate_rollouts(
                rollout_model, prompt_ids, [rollout_modes] * len(items), think_open_ids=tokens.think_open,
                no_think_ids=tokens.no_think, think_close_ids=tokens.think_close, auto_ids=tokens.auto,
                eos_id=tokens.eos, pad_id=tokens.pad, think_start_id=tokens.think_start,
                think_end_id=tokens.think_end, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                generator=gen,
                noise_rows=(rank * local * group, args.prompts * group),  # the global batch's noise, this slice
                prompt_embeds=prompt_embeddings(rollout_model, prompt_ids, items, tokens.image, encoder),
                # strict modes: the thinking half always thinks, no think tag after a closed block, auto mode
                # (GRPO) decides between the two mode tokens
                min_think_tokens=args.min_think_tokens, no_reopen=args.no_reopen, strict_auto=args.strict_auto,
            )  # fmt: skip
        model.train()
        t_rollout = time.perf_counter() - t0
        texts = completion_texts(tokenizer, rollouts)
        answers = [items[p].answer for p in rollouts.prompt_index.tolist()]
        report = compute_rewards(texts, answers, accuracy_reward, on_error=args.on_reward_error)
        for row, err in report.failures:
            print(f"step {step + 1}: reward failed for rollout {rank * local * group + row} ({err}); it is excluded",
                  file=sys.stderr)  # fmt: skip
        rewards = torch.tensor(report.rewards, device=device)
        # classify auto rollouts by what they did, so that per-mode statistics mean the same in both algorithms
        modes = rollouts.modes.clone()
        if args.algo == "grpo":
            modes = torch.tensor([int(Mode.THINK if thought(t) else Mode.NO_THINK) for t in texts], device=device)
        # groups never straddle ranks (a rank holds whole prompts): the advantages are local
        adv = group_advantages(rewards, group, modes=modes, estimator="bpo" if args.algo == "bpo" else "grpo",
                               nonfinite="zero")
        # BPO's forced halves also train auto mode's decision (the token after "<think>") through the decision
        # loss in micro_batch_loss: the forced prefix itself is never in the policy loss
        trained = rollouts.policy_mask
        mask = trained & torch.isfinite(rewards)[:, None]  # a failed reward: never trained on
        decision_target, decision_weight = decision_targets(adv.advantages, modes, group, torch.isfinite(rewards),
                                                            rewards=rewards, lengths=rollouts.lengths,
                                                            tie_weight=args.decision_tie)
        ref_logprobs = None
        if reference is not None:
            with torch.no_grad(), autocast(device, precision):
                ref_hidden = policy_forward(reference, items, prompt_ids, rollouts, tokens.image, tokens.pad, encoder)
                ref_logprobs = fused_linear_logprobs(ref_hidden.flatten(0, 1), reference.lm_head.weight,
                                                     rollouts.completions.flatten(),
                                                     temperature=args.temperature).view(mask.shape)
        # Rollout vs trainer log-probs of the same tokens, before any update of this step: the training forward
        # (packed, no KV cache) on the weights that sampled them. --rollout-is: those become the PPO ratio's old
        # log-probs and the rollout's give truncated importance weights (verl's decoupled ratio x TIS).
        with torch.no_grad(), autocast(device, precision):
            train_hidden = policy_forward(rollout_model, items, prompt_ids, rollouts, tokens.image, tokens.pad, encoder)
            train_logprobs = fused_linear_logprobs(train_hidden.flatten(0, 1), rollout_model.lm_head.weight,
                                                   rollouts.completions.flatten(),
                                                   temperature=args.temperature).view(mask.shape)  # fmt: skip
        mismatch = logprob_mismatch(train_logprobs, rollouts.logprobs, mask)
        if world > 1:  # exact over ranks: token-weighted sums, the largest maximum
            n_tok = mask.sum().double()
            sums = torch.stack([mismatch["mismatch/abs_mean"].double() * n_tok,
                                mismatch["mismatch/k3"].double() * n_tok, n_tok])  # fmt: skip
            top = mismatch["mismatch/abs_max"].clone()
            torch.distributed.all_reduce(sums)
            torch.distributed.all_reduce(top, op=torch.distributed.ReduceOp.MAX)
            mismatch = {"mismatch/abs_mean": sums[0] / sums[2].clamp_min(1), "mismatch/abs_max": top,
                        "mismatch/k3": sums[1] / sums[2].clamp_min(1)}  # fmt: skip
        is_weights = None
        if args.rollout_is != "off":
            is_weights = rollout_importance_weights(train_logprobs, rollouts.logprobs, mask, cap=args.rollout_is_cap,
                                                    level=args.rollout_is)  # fmt: skip
            rollouts.logprobs = train_logprobs  # the old log-probs of every micro-batch below: the trainer's
        rows = torch.arange(mask.shape[0], device=device)
        metrics_acc: dict[str, list[float]] = {}
        for _epoch in range(args.ppo_epochs):
            for mb in rows.chunk(args.mini_batches):
                optimizer.zero_grad(set_to_none=True)
                # global normaliser over the micro-batches (and ranks): sequences (seq-mean-*) or tokens
                if args.aggregation.startswith("seq-mean"):
                    mb_norm = (mask[mb].sum(1) > 0).sum()
                else:
                    mb_norm = mask[mb].sum()
                if world > 1:
                    torch.distributed.all_reduce(mb_norm)
                mb_norm = mb_norm.clamp_min(1)
                for micro in mb.chunk(args.grad_accum):
                    sub = _select(rollouts, micro)
                    sub_items_idx = sorted(set(sub.prompt_index.tolist()))
                    remap = {p: i for i, p in enumerate(sub_items_idx)}
                    sub.prompt_index = torch.tensor([remap[p] for p in sub.prompt_index.tolist()], device=device)
                    batch = MicroBatch([items[p] for p in sub_items_idx], [prompt_ids[p] for p in sub_items_idx],
                                       sub, adv.advantages[micro], mask[micro], rollouts.logprobs[micro],
                                       None if ref_logprobs is None else ref_logprobs[micro],
                                       decision, decision_target[micro], decision_weight[micro],
                                       rollout_is_weights=None if is_weights is None else
                                       is_weights[micro])  # fmt: skip
                    with autocast(device, precision):
                        loss, m = loss_module(batch, tokens, args, mb_norm, encoder)
                    (loss * world).backward()  # x world: FSDP averages gradients over ranks
                    for k, v in {"loss": loss, **m}.items():
                        metrics_acc.setdefault(k, []).append(float(v.detach()))
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
                # the global gradient norm: every rank stops together; the loss is this rank's share
                check_finite_step(step + 1, sum(metrics_acc["loss"][-args.grad_accum:]), float(grad_norm))
                optimizer.step()
                scheduler.step()
        elapsed = time.perf_counter() - t0
        lengths = rollouts.lengths.float()
        record = {k: sum(v) / len(v) for k, v in metrics_acc.items()}
        record.update({k: float(v) for k, v in mismatch.items()})  # rollout vs trainer, before this step's updates
        # each micro-batch's loss is its share of its mini-batch's loss: summed, then averaged over mini-batches
        record["loss"] = sum(metrics_acc["loss"]) / args.ppo_epochs / args.mini_batches
        # per-mode means from sums and counts, so that they are exact over ranks too
        finite = torch.isfinite(rewards)
        totals = {"reward/all": (rewards[finite].sum(), finite.sum())}
        row_hard = [items[p].hard for p in rollouts.prompt_index.tolist()]
        levels = {level: torch.tensor([h is hard for h in row_hard], device=device)  # rows of known difficulty only
                  for hard, level in ((True, "hard"), (False, "easy"))}  # fmt: skip
        for mode in (Mode.THINK, Mode.NO_THINK):
            sel = modes == int(mode)
            name = mode.name.lower()
            totals[f"reward/{name}"] = (rewards[sel & finite].sum(), (sel & finite).sum())
            totals[f"length/{name}"] = (lengths[sel].sum(), sel.sum())
            for level, on in levels.items():
                totals[f"reward/{name}_{level}"] = (rewards[sel & on & finite].sum(), (sel & on & finite).sum())
        sums = torch.stack([torch.stack([a.double(), b.double()]) for a, b in totals.values()])
        record["zero_signal_groups"] = int(adv.zero_signal_groups)
        record["tokens_per_s"] = float(rollouts.lengths.sum()) / elapsed
        record["rollout_s"], record["step_s"] = t_rollout, elapsed
        if world > 1:
            torch.distributed.all_reduce(sums)
            record = _reduce_record(record, world, device)  # NCCL reduces device tensors only
        for key, (total, count) in zip(totals, sums.tolist()):
            if count:
                record[key] = total / count
        if eval_items and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
            record.update(evaluate_policy(all_modes=step + 1 == args.steps))
        if logger is not None:
            logger.log(step + 1, record)
        if rank == 0 and ((step + 1) % args.log_every == 0 or step + 1 == args.steps):
            shown = {k: v for k, v in record.items() if k.startswith(("reward/", "eval/", "length/")) or k == "kl"}
            tqdm.write(f"step {step + 1}: " + ", ".join(f"{k} {v:.3g}" for k, v in shown.items())
                       + f" ({elapsed:.1f} s/step)")
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            save_checkpoint(checkpoint_dir, loss_module, optimizer, scheduler, step + 1,
                            settings=args.settings)  # every rank: gathers
        if args.stop_after is not None and step + 1 == args.stop_after:
            os._exit(3)  # no cleanup: what a kill leaves behind
    if world > 1:
        sync_weights(rollout_model, model)
        torch.distributed.destroy_process_group()
        if rank != 0:
            return 0
    logger.close()
    final = {k: v for k, v in record.items() if k.startswith("eval/")}
    if final:
        print("after:  " + _summary(final))
    rollout_model.save_pretrained(args.output_dir / "model")  # the plain model (world 1: the policy itself)
    tokenizer.save_pretrained(args.output_dir / "model")
    if encoder.image_processor is not None:  # the folder stays loadable with the same image pipeline
        encoder.image_processor.save_pretrained(args.output_dir / "model")
    if args.plot:
        from r4b_fast.training.plot import plot_run

        print(f"curves: {plot_run(args.output_dir)}")
    return 0


def _summary(metrics: dict) -> str:
    """The evaluation line printed before and after training: accuracy, length and think rate per mode (the per-item
    splits by auto mode's choice stay in metrics.jsonl)."""
    return ", ".join(f"{k.split('/')[-1]} {v:.2f}" for k, v in sorted(metrics.items())
                     if "when_auto" not in k and "auto_skips" not in k)


def _reduce_record(record: dict, world: int, device: torch.device) -> dict:
    """Per-step metrics over all ranks: ``loss`` summed (each rank's share of the global normaliser), counts
    summed, the rest averaged (equal rollouts per rank). Every rank must call it with the same keys."""
    keys = sorted(record)
    values = torch.tensor([float(record[k]) for k in keys], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(values)
    summed = {"loss", "zero_signal_groups", "tokens_per_s"}
    return {k: (v if k in summed else v / world) for k, v in zip(keys, values.tolist())}


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


def _select(rollouts, rows: torch.Tensor):
    """The rollouts of ``rows`` (a shallow copy with every per-row tensor indexed)."""
    out = copy.copy(rollouts)
    for field in ("completions", "completion_mask", "forced_mask", "logprobs", "modes", "prompt_index", "lengths",
                  "think_opened", "think_closed", "finished"):
        setattr(out, field, getattr(rollouts, field)[rows])
    return out


if __name__ == "__main__":
    sys.exit(main())
