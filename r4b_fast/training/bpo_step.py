"""One BPO step as named stages, each a function of what it reads and returning what it makes:

``prompts`` -> :class:`Batch` -> ``generate`` -> ``RolloutResult`` -> ``score`` -> :class:`Scores` -> ``advantages``
-> :class:`Signals` -> ``old_logprobs`` -> :class:`LogProbs` -> ``update`` -> :class:`Losses` -> ``step_record``
-> the metrics dict that ``bpo.finish_step`` logs (evaluating and saving when due).

:class:`Run` holds what stays fixed over the run (settings, models, optimizer, tokens). Under torchrun each rank runs
every stage on its share of the prompts; the collectives (weights for generation, the normaliser, the mismatch and
the per-mode sums) are in the stages that need them.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field

import torch

from r4b_fast import group_advantages
from r4b_fast.modes import Mode
from r4b_fast.ops.fused_linear_logprobs import fused_linear_logprobs, logprob_mismatch, rollout_importance_weights
from r4b_fast.training.bpo_loss import MicroBatch, policy_forward, select_rows
from r4b_fast.training.common import autocast, check_finite_step, sync_weights
from r4b_fast.training.evaluation import ModeTokens, completion_texts, prompt_embeddings
from r4b_fast.training.guards import WeightGuard
from r4b_fast.training.mode_decision import DecisionTokens, decision_targets
from r4b_fast.training.rewards import accuracy_reward, compute_rewards, thought
from r4b_fast.training.rollout import bpo_modes, generate_rollouts
from r4b_fast.training.task import sample_items
from r4b_fast.training.vision import ImageEncoder


@dataclass
class Run:
    """What stays fixed over a run. ``rollout_model`` is ``model`` itself in one process, a plain replica re-synced
    every step under torchrun (``model`` is then FSDP2-sharded inside ``loss_module``)."""

    args: argparse.Namespace
    model: torch.nn.Module
    rollout_model: torch.nn.Module
    reference: torch.nn.Module | None  # --beta > 0: the frozen initial model
    loss_module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    tokenizer: object
    tokens: ModeTokens
    decision: DecisionTokens | None  # BPO's mode-decision loss (None: off)
    encoder: ImageEncoder
    guard: WeightGuard | None = None  # armed on the weights the run starts from (bpo.resume)
    rank: int = 0
    world: int = 1
    train_rows: list | None = None  # None: the embedded task, sampled per step
    eval_items: list = field(default_factory=list)

    @property
    def device(self) -> torch.device:
        return self.args.device

    @property
    def group(self) -> int:
        return 2 * self.args.g

    @property
    def local(self) -> int:
        """This rank's prompts: ``[rank * local, (rank + 1) * local)`` of every step's batch."""
        return self.args.prompts // self.world

    @property
    def rollout_modes(self) -> list[int]:
        return bpo_modes(self.args.g) if self.args.algo == "bpo" else [int(Mode.AUTO)] * self.group

    def n_img(self, item) -> int:
        """Placeholders of the item's image, measured on the plain (rollout) copy."""
        return self.encoder.count(self.rollout_model, item)


@dataclass
class Batch:
    """The step's prompts on this rank."""

    step: int  # 0-based
    items: list
    prompt_ids: list[list[int]]


@dataclass
class Scores:
    texts: list[str]
    rewards: torch.Tensor  # [R] float, NaN where the reward failed (--on-reward-error skip)
    modes: torch.Tensor  # [R] Mode each rollout ran in (GRPO: what it did, think or not)


@dataclass
class Signals:
    """What the update trains on: advantages, the trained tokens, the mode-decision loss's targets."""

    advantages: object  # GroupAdvantages
    mask: torch.Tensor  # [R, N] bool: sampled tokens of rollouts with a finite reward
    decision_target: torch.Tensor  # [R] Mode the group's verdict pushes auto's decision to
    decision_weight: torch.Tensor  # [R] float >= 0


@dataclass
class LogProbs:
    """The PPO ratio's old log-probs and what else the loss compares against."""

    old: torch.Tensor  # [R, N]: the rollout's, or with --rollout-is the trainer's
    reference: torch.Tensor | None = None  # [R, N] --beta > 0: the frozen model's
    is_weights: torch.Tensor | None = None  # [R, N] --rollout-is: truncated importance weights
    mismatch: dict[str, torch.Tensor] = field(default_factory=dict)  # on measured steps (--mismatch-every)


@dataclass
class Losses:
    """Per-micro-batch values of the loss and its metrics, in the order they ran."""

    values: dict[str, list[float]]


# -- stages -----------------------------------------------------------------------------------------------------------
def prompts(run: Run, step: int) -> Batch:
    """Data position = step: the prompts (and the sampling noise) of a step depend on (seed, step) only."""
    args = run.args
    if run.train_rows is None:
        items = sample_items(args.prompts, args.seed * 1_000_003 + step, args.hard_fraction)
    else:
        items = [run.train_rows[(step * args.prompts + i) % len(run.train_rows)] for i in range(args.prompts)]
    items = items[run.rank * run.local : (run.rank + 1) * run.local]
    return Batch(step, items, [run.tokens.prompt_ids(it, run.n_img(it)) for it in items])


def generate(run: Run, batch: Batch):
    """``g`` thinking and ``g`` non-thinking rollouts per prompt (GRPO: ``2g`` auto), a ``RolloutResult``."""
    args, tokens, model = run.args, run.tokens, run.rollout_model
    gen = torch.Generator().manual_seed(args.seed * 7_000_003 + batch.step)
    if run.world > 1:
        sync_weights(model, run.model)
    model.eval()
    with torch.no_grad(), autocast(run.device, args.precision):
        rollouts = generate_rollouts(
            model, batch.prompt_ids, [run.rollout_modes] * len(batch.items), think_open_ids=tokens.think_open,
            no_think_ids=tokens.no_think, think_close_ids=tokens.think_close, auto_ids=tokens.auto,
            eos_id=tokens.eos, pad_id=tokens.pad, think_start_id=tokens.think_start,
            think_end_id=tokens.think_end, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
            generator=gen,
            noise_rows=(run.rank * run.local * run.group, args.prompts * run.group),  # the global noise, this slice
            prompt_embeds=prompt_embeddings(model, batch.prompt_ids, batch.items, tokens.image, run.encoder),
            # strict modes: the thinking half always thinks, no think tag after a closed block, auto mode
            # (GRPO) decides between the two mode tokens
            min_think_tokens=args.min_think_tokens, no_reopen=args.no_reopen, strict_auto=args.strict_auto,
        )  # fmt: skip
    run.model.train()
    return rollouts


def score(run: Run, batch: Batch, rollouts) -> Scores:
    """Rule-based accuracy reward per rollout; a failed reward is reported and excluded (NaN)."""
    texts = completion_texts(run.tokenizer, rollouts)
    answers = [batch.items[p].answer for p in rollouts.prompt_index.tolist()]
    report = compute_rewards(texts, answers, accuracy_reward, on_error=run.args.on_reward_error)
    for row, err in report.failures:
        print(f"step {batch.step + 1}: reward failed for rollout {run.rank * run.local * run.group + row} ({err}); "
              "it is excluded", file=sys.stderr)  # fmt: skip
    modes = rollouts.modes.clone()
    if run.args.algo == "grpo":  # auto rollouts classified by what they did: per-mode statistics mean the same
        modes = torch.tensor([int(Mode.THINK if thought(t) else Mode.NO_THINK) for t in texts], device=run.device)
    return Scores(texts, torch.tensor(report.rewards, device=run.device), modes)


def advantages(run: Run, rollouts, scores: Scores) -> Signals:
    """Advantages normalised over each mixed group of ``2g`` (groups never straddle ranks: local), the trained
    tokens, and the mode-decision targets: BPO's forced halves train auto mode's decision (the token after
    ``<think>``) through the decision loss; the forced prefix itself is never in the policy loss."""
    args, finite = run.args, torch.isfinite(scores.rewards)
    adv = group_advantages(scores.rewards, run.group, modes=scores.modes,
                           estimator="bpo" if args.algo == "bpo" else "grpo", nonfinite="zero")  # fmt: skip
    mask = rollouts.policy_mask & finite[:, None]  # a failed reward: never trained on
    target, weight = decision_targets(adv.advantages, scores.modes, run.group, finite, rewards=scores.rewards,
                                      lengths=rollouts.lengths, tie_weight=args.decision_tie)  # fmt: skip
    return Signals(adv, mask, target, weight)


def _completion_logprobs(run: Run, model, batch: Batch, rollouts, shape) -> torch.Tensor:
    """No-grad training forward (packed, no KV cache) of ``model`` on the rollouts: ``[R, N]`` log-probs."""
    with torch.no_grad(), autocast(run.device, run.args.precision):
        hidden = policy_forward(model, batch.items, batch.prompt_ids, rollouts, run.tokens.image, run.tokens.pad,
                                run.encoder)  # fmt: skip
        return fused_linear_logprobs(hidden.flatten(0, 1), model.lm_head.weight, rollouts.completions.flatten(),
                                     temperature=run.args.temperature).view(shape)  # fmt: skip


def measures_mismatch(args, step: int) -> bool:
    """Whether step ``step`` (0-based) runs the mismatch forward: every step under --rollout-is (its old
    log-probs), else steps 1, 1 + N, ... of --mismatch-every N (0: never)."""
    return args.rollout_is != "off" or (args.mismatch_every > 0 and step % args.mismatch_every == 0)


def _reduce_mismatch(mismatch: dict, mask: torch.Tensor) -> dict:
    """Exact over ranks: token-weighted sums, the largest maximum."""
    n_tok = mask.sum().double()
    sums = torch.stack([mismatch["mismatch/abs_mean"].double() * n_tok, mismatch["mismatch/k3"].double() * n_tok,
                        n_tok])  # fmt: skip
    top = mismatch["mismatch/abs_max"].clone()
    torch.distributed.all_reduce(sums)
    torch.distributed.all_reduce(top, op=torch.distributed.ReduceOp.MAX)
    return {"mismatch/abs_mean": sums[0] / sums[2].clamp_min(1), "mismatch/abs_max": top,
            "mismatch/k3": sums[1] / sums[2].clamp_min(1)}  # fmt: skip


def old_logprobs(run: Run, batch: Batch, rollouts, signals: Signals) -> LogProbs:
    """The reference's log-probs (--beta), and on measured steps the rollout vs trainer mismatch of the same tokens
    before any update of this step (the training forward on the weights that sampled them). --rollout-is: those
    become the PPO ratio's old log-probs and the rollout's give truncated importance weights (verl's decoupled
    ratio x TIS)."""
    args, mask = run.args, signals.mask
    out = LogProbs(old=rollouts.logprobs)
    if run.reference is not None:
        out.reference = _completion_logprobs(run, run.reference, batch, rollouts, mask.shape)
    if not measures_mismatch(args, batch.step):
        return out
    train = _completion_logprobs(run, run.rollout_model, batch, rollouts, mask.shape)
    out.mismatch = logprob_mismatch(train, rollouts.logprobs, mask)
    if run.world > 1:
        out.mismatch = _reduce_mismatch(out.mismatch, mask)
    if args.rollout_is != "off":
        out.is_weights = rollout_importance_weights(train, rollouts.logprobs, mask, cap=args.rollout_is_cap,
                                                    level=args.rollout_is)  # fmt: skip
        out.old = train  # the old log-probs of every micro-batch: the trainer's
    return out


def _micro_batch(run: Run, batch: Batch, rollouts, signals: Signals, logprobs: LogProbs, rows) -> MicroBatch:
    """The rollouts of ``rows`` with their training signals, prompt indices renumbered into the batch's items."""
    sub = select_rows(rollouts, rows)
    kept = sorted(set(sub.prompt_index.tolist()))
    remap = {p: i for i, p in enumerate(kept)}
    sub.prompt_index = torch.tensor([remap[p] for p in sub.prompt_index.tolist()], device=run.device)
    def pick(t):
        return None if t is None else t[rows]

    return MicroBatch([batch.items[p] for p in kept], [batch.prompt_ids[p] for p in kept], sub,
                      signals.advantages.advantages[rows], signals.mask[rows], logprobs.old[rows],
                      pick(logprobs.reference), run.decision, signals.decision_target[rows],
                      signals.decision_weight[rows], rollout_is_weights=pick(logprobs.is_weights))  # fmt: skip


def _normaliser(run: Run, mask: torch.Tensor) -> torch.Tensor:
    """A mini-batch's global normaliser over its micro-batches (and ranks): sequences (seq-mean-*) or tokens."""
    norm = (mask.sum(1) > 0).sum() if run.args.aggregation.startswith("seq-mean") else mask.sum()
    if run.world > 1:
        torch.distributed.all_reduce(norm)
    return norm.clamp_min(1)


def update(run: Run, batch: Batch, rollouts, signals: Signals, logprobs: LogProbs) -> Losses:
    """PPO epochs x mini-batches of optimizer steps, each over --grad-accum micro-batches; the loss and gradient
    norm checked finite before each optimizer step, the weights checked after the step's last
    (:class:`~r4b_fast.training.guards.WeightGuard`)."""
    args, step = run.args, batch.step + 1
    rows = torch.arange(signals.mask.shape[0], device=run.device)
    values: dict[str, list[float]] = {}
    for _epoch in range(args.ppo_epochs):
        for mb in rows.chunk(args.mini_batches):
            run.optimizer.zero_grad(set_to_none=True)
            norm = _normaliser(run, signals.mask[mb])
            for micro in mb.chunk(args.grad_accum):
                micro_batch = _micro_batch(run, batch, rollouts, signals, logprobs, micro)
                with autocast(run.device, args.precision):
                    loss, m = run.loss_module(micro_batch, run.tokens, args, norm, run.encoder)
                (loss * run.world).backward()  # x world: FSDP averages gradients over ranks
                for k, v in {"loss": loss, **m}.items():
                    values.setdefault(k, []).append(float(v.detach()))
            grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), 1.0)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            # the global gradient norm: every rank stops together; the loss is this rank's share
            check_finite_step(step, sum(values["loss"][-args.grad_accum:]), float(grad_norm))
            run.guard.optimizer_step(run.optimizer, step)
            run.scheduler.step()
    run.guard.check(step)  # every rank: the max over ranks, one host sync
    return Losses(values)


def _mode_totals(run: Run, batch: Batch, rollouts, scores: Scores) -> dict[str, tuple]:
    """(sum, count) per metric, so that per-mode means are exact over ranks too."""
    rewards, modes, lengths = scores.rewards, scores.modes, rollouts.lengths.float()
    finite = torch.isfinite(rewards)
    totals = {"reward/all": (rewards[finite].sum(), finite.sum())}
    row_hard = [batch.items[p].hard for p in rollouts.prompt_index.tolist()]
    levels = {level: torch.tensor([h is hard for h in row_hard], device=run.device)  # rows of known difficulty only
              for hard, level in ((True, "hard"), (False, "easy"))}  # fmt: skip
    for mode in (Mode.THINK, Mode.NO_THINK):
        sel = modes == int(mode)
        name = mode.name.lower()
        totals[f"reward/{name}"] = (rewards[sel & finite].sum(), (sel & finite).sum())
        totals[f"length/{name}"] = (lengths[sel].sum(), sel.sum())
        for level, on in levels.items():
            totals[f"reward/{name}_{level}"] = (rewards[sel & on & finite].sum(), (sel & on & finite).sum())
    return totals


def step_record(run: Run, batch: Batch, rollouts, scores: Scores, signals: Signals, logprobs: LogProbs,
                losses: Losses, rollout_s: float, step_s: float) -> dict[str, float]:  # fmt: skip
    """The step's metrics: the loss's (means over micro-batches), the mismatch, reward and length per mode and
    difficulty, throughput; under torchrun reduced over the ranks."""
    args, values = run.args, losses.values
    record = {k: sum(v) / len(v) for k, v in values.items()}
    record.update({k: float(v) for k, v in logprobs.mismatch.items()})  # rollout vs trainer, before the updates
    # each micro-batch's loss is its share of its mini-batch's loss: summed, then averaged over mini-batches
    record["loss"] = sum(values["loss"]) / args.ppo_epochs / args.mini_batches
    totals = _mode_totals(run, batch, rollouts, scores)
    sums = torch.stack([torch.stack([a.double(), b.double()]) for a, b in totals.values()])
    record["zero_signal_groups"] = int(signals.advantages.zero_signal_groups)
    record["tokens_per_s"] = float(rollouts.lengths.sum()) / step_s
    record["rollout_s"], record["step_s"] = rollout_s, step_s
    if run.world > 1:
        torch.distributed.all_reduce(sums)
        record = reduce_record(record, run.world, run.device)  # NCCL reduces device tensors only
    for key, (total, count) in zip(totals, sums.tolist()):
        if count:
            record[key] = total / count
    return record


def reduce_record(record: dict, world: int, device: torch.device) -> dict:
    """Per-step metrics over all ranks: ``loss`` summed (each rank's share of the global normaliser), counts
    summed, the rest averaged (equal rollouts per rank). Every rank must call it with the same keys."""
    keys = sorted(record)
    values = torch.tensor([float(record[k]) for k in keys], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(values)
    summed = {"loss", "zero_signal_groups", "tokens_per_s"}
    return {k: (v if k in summed else v / world) for k, v in zip(keys, values.tolist())}


def train_step(run: Run, step: int) -> dict[str, float]:
    """The stages of step ``step`` (0-based) in order; returns its metrics record."""
    t0 = time.perf_counter()
    batch = prompts(run, step)
    rollouts = generate(run, batch)
    rollout_s = time.perf_counter() - t0
    scores = score(run, batch, rollouts)
    signals = advantages(run, rollouts, scores)
    logprobs = old_logprobs(run, batch, rollouts, signals)
    losses = update(run, batch, rollouts, signals, logprobs)
    step_s = time.perf_counter() - t0
    return step_record(run, batch, rollouts, scores, signals, logprobs, losses, rollout_s, step_s)
