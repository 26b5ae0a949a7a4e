"""BPO's credit for auto mode's think / no-think decision.

With a tokenizer that merges ``"\\n\\n"`` (as BPE tokenizers do), the three mode prefixes share their first tokens
(``<think>``) and part at one token: thinking continues with ``"\\n"``, non-thinking with ``"\\n\\n"``. Auto mode
samples exactly that token, so it is the think / no-think decision, and BPO's two forced halves say which side of it
was worth more on this prompt. The forced prefix is not sampled, so the clipped policy loss never sees it; this loss
trains it, per group (prompt) ``i``:

    S_i = sum of the thinking half's advantages   (= -(the non-thinking half's): a group's advantages sum to 0)
    L   = -1/n * sum_i |S_i| * log p2(better_i | prompt_i, "<think>")

``better_i`` the half with the higher advantage (thinking when ``S_i > 0``), ``p2`` the softmax over the two decision
tokens only. Its gradient on the decision's logit gap is ``|S_i| * (1 - p2(better_i))``: a push towards the half
that did better, zero when both did equally (easy items answered right either way), and fading once the decision
is made. Two choices, both measured on the embedded task (README "What the demo shows"):

- the two-way softmax: a full-vocabulary log-prob of the losing token pushed down spreads its probability over
  every other token (auto mode then wrote ``<think>:`` on easy items);
- the fading weight: ``-sum_k A_k log p2(mode_k)`` (each rollout's own advantage on its own mode's token) pushes the
  gap by ``S_i`` whatever ``p2`` is already; the gap kept growing on hard items after the decision was made, and the
  push carried over to easy items (their think rate went 0 -> 0.98 in 10 steps, accuracy 1.00 -> 0.80).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from r4b_fast.modes import Mode, shared_prefix_length


@dataclass(frozen=True)
class DecisionTokens:
    """Where auto mode decides and between which tokens: completion position ``position`` (the length of the
    prefixes' common part), token ``think`` (thinking) or ``no_think`` (non-thinking)."""

    position: int
    think: int
    no_think: int

    @classmethod
    def from_prefixes(cls, think_open: list[int], no_think: list[int]) -> DecisionTokens:
        """From the token ids of the thinking and non-thinking prefixes.

        Example: ``DecisionTokens.from_prefixes([5, 9], [5, 11, 6, 11])`` -> position 1, think 9, no_think 11.
        """
        k = shared_prefix_length(think_open, no_think)
        if k == len(think_open) or k == len(no_think):
            raise ValueError(
                f"mode prefixes: the thinking prefix {think_open} and the non-thinking prefix {no_think} do not part "
                "at a token (one is a token prefix of the other): auto mode has no decision token to train; use a "
                "tokenizer that merges '\\n\\n' or turn --decision-loss off"
            )
        return cls(k, think_open[k], no_think[k])


def decision_targets(advantages: torch.Tensor, modes: torch.Tensor, group_size: int,
                     rows: torch.Tensor | None = None, *, rewards: torch.Tensor | None = None,
                     lengths: torch.Tensor | None = None,
                     tie_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per rollout, the decision its group's verdict trains: ``(target [R] int64 Mode, weight [R] float32 >= 0)``,
    ``weight = |S_i| / (rows of group i)`` so that a group weighs ``|S_i|`` whatever its size, 0 for rows not in
    ``rows`` and for groups without both modes. A tie (every rollout of both halves earned the same positive
    reward: both modes right, e.g. an easy item) goes to the half with fewer mean ``lengths`` (the non-thinking
    one without lengths) with group weight ``tie_weight``: nothing else pulls an easy item's decision back when
    what hard items teach carries over to it. A chance tie of mixed results (2 of 4 right in each half) is no
    verdict: it trains nothing.

    Args:
        advantages: ``[R]`` float, the mixed-group advantages (``R = G * group_size``, groups consecutive).
        modes: ``[R]`` int ``Mode`` (``THINK`` / ``NO_THINK``).
        group_size: rollouts per group (``2g``).
        rows: ``[R]`` bool, the rows that count (default all).
        rewards: ``[R]`` float, the rollouts' rewards (needed for ties).
        lengths: ``[R]`` tokens of each rollout (for ties).
        tie_weight: a tied group's weight (0: ties train nothing).

    Example: ``decision_targets(torch.tensor([1., 1., -1., -1.]), torch.tensor([1, 1, 0, 0]), 4)`` ->
    ``(tensor([1, 1, 1, 1]), tensor([0.5, 0.5, 0.5, 0.5]))``.
    """
    if advantages.dim() != 1 or advantages.shape != modes.shape or advantages.numel() % group_size:
        raise ValueError(f"advantages / modes: expected equal [G * {group_size}] shapes, got "
                         f"{tuple(advantages.shape)} / {tuple(modes.shape)}")  # fmt: skip
    if not tie_weight >= 0:
        raise ValueError(f"tie_weight: expected a number >= 0, got {tie_weight}")
    rows = torch.ones_like(modes, dtype=torch.bool) if rows is None else rows
    adv = torch.where(rows, advantages.detach().float(), 0.0).view(-1, group_size)
    think = (modes == int(Mode.THINK)).view(-1, group_size) & rows.view(-1, group_size)
    no_think = (modes == int(Mode.NO_THINK)).view(-1, group_size) & rows.view(-1, group_size)
    s = (adv * think).sum(1)  # [G]
    both = think.any(1) & no_think.any(1)
    n = (think | no_think).sum(1).clamp_min(1)
    if tie_weight > 0 and rewards is None:
        raise ValueError("rewards: needed to find ties (tie_weight > 0)")
    tie = torch.zeros_like(both)
    if rewards is not None:
        r = rewards.detach().float().view(-1, group_size)
        inf = torch.tensor(float("inf"), device=r.device)
        low = torch.where(rows.view(-1, group_size), r, inf).amin(1)
        high = torch.where(rows.view(-1, group_size), r, -inf).amax(1)
        tie = (low == high) & (low > 0)
    think_wins = s > 0
    if lengths is not None:
        length = lengths.detach().float().view(-1, group_size)
        mean_think = (length * think).sum(1) / think.sum(1).clamp_min(1)
        mean_no = (length * no_think).sum(1) / no_think.sum(1).clamp_min(1)
        think_wins = torch.where(tie, mean_think < mean_no, think_wins)
    else:
        think_wins = think_wins & ~tie
    group_weight = torch.where(tie, torch.full_like(s, float(tie_weight)), s.abs())
    weight = torch.where(both, group_weight / n, 0.0)[:, None].expand(-1, group_size)
    target = torch.where(think_wins, int(Mode.THINK), int(Mode.NO_THINK))[:, None].expand(-1, group_size)
    weight = torch.where(think | no_think, weight, 0.0)
    return target.reshape(-1).to(torch.int64), weight.reshape(-1)


def mode_decision_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: DecisionTokens,
    targets: torch.Tensor,
    row_weights: torch.Tensor,
    *,
    temperature: float = 1.0,
    normaliser: float | torch.Tensor = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The decision loss of some rollouts: ``sum_r row_weights[r] * -log p2(targets[r]) / normaliser``.

    Args:
        hidden: ``[R, N, D]`` hidden states predicting each completion token (``hidden[:, t]`` predicts token t).
        weight: ``[V, D]`` LM-head weight.
        tokens: the decision position and tokens.
        targets: ``[R]`` int ``Mode`` to push each row's decision to (``THINK`` or ``NO_THINK``).
        row_weights: ``[R]`` float >= 0 (a constant of the loss), from :func:`decision_targets`.
        temperature: the sampling temperature (the decision is sampled from ``softmax(z / T)``).
        normaliser: divides the sum over rows (the loop's sequence count, as the policy loss).

    Returns:
        ``(loss, metrics)``: 0-dim loss; ``decision_p_think``: ``[R]`` detached ``p2(think)`` per row.

    Example::

        tokens = DecisionTokens.from_prefixes(ids("<think>\\n"), ids("<think>\\n\\n</think>\\n\\n"))
        target, w = decision_targets(adv, rollouts.modes, 2 * g, rewards.isfinite())
        loss, m = mode_decision_loss(hidden, model.lm_head.weight, tokens, target, w)
    """
    if hidden.dim() != 3 or hidden.shape[1] <= tokens.position:
        raise ValueError(f"hidden: expected [R, N > {tokens.position}, D], got {tuple(hidden.shape)}")
    two = weight[[tokens.think, tokens.no_think]]  # [2, D]
    z = (hidden[:, tokens.position].float() @ two.float().t()) / temperature  # [R, 2]
    gap = z[:, 0] - z[:, 1]
    # log p2(mode) = logsigmoid(+-gap): the two-way softmax
    think = targets == int(Mode.THINK)
    logp = torch.where(think, torch.nn.functional.logsigmoid(gap), torch.nn.functional.logsigmoid(-gap))
    loss = -(row_weights.detach().float() * logp).sum() / normaliser
    return loss, {"decision_p_think": torch.sigmoid(gap).detach()}
