"""``BPOConfig`` (TRL's ``GRPOConfig`` plus BPO's settings), the reward adapter :func:`trl_reward` and :func:`thinks`.

Part of :mod:`r4b_fast.integrations.trl` (import from there); needs ``trl``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from trl import GRPOConfig

from r4b_fast.modes import Mode

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
DEFAULT_THINK_PREFIX = f"{THINK_OPEN}\n"
DEFAULT_NO_THINK_PREFIX = f"{THINK_OPEN}\n\n{THINK_CLOSE}\n\n"
MODE_NAMES = {Mode.THINK: "think", Mode.NO_THINK: "no_think", Mode.AUTO: "auto"}

# TRL loss_type -> our aggregation (the normaliser that makes it TRL's is chosen per micro-batch in the loss spec)
LOSS_TYPES = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dr_grpo": "seq-mean-token-sum-norm",
              "dapo": "token-mean"}  # fmt: skip
_THINK_BLOCK = re.compile(re.escape(THINK_OPEN) + r"(.*?)(?:" + re.escape(THINK_CLOSE) + r"|$)", re.S)


@dataclass
class BPOConfig(GRPOConfig):
    """``trl.GRPOConfig`` plus BPO's settings. ``num_generations`` is ``2g``: ``g`` thinking + ``g`` non-thinking.

    Args (besides every ``GRPOConfig`` field):
        mode_split: True (BPO): half of each group forced into each mode, ``estimator="bpo"``. False: plain GRPO
            (no prefix, ``estimator="grpo"``, mode auto) with this class's fused loss: TRL's GRPO numbers.
        think_prefix: text forced after the generation prompt in thinking mode (default ``"<think>\\n"``).
        no_think_prefix: text forced in non-thinking mode (default: from the chat template's ``enable_thinking=False``,
            else ``"<think>\\n\\n</think>\\n\\n"``).
        decision_coef: weight of BPO's mode-decision loss (``r4b_fast.training.mode_decision``), which trains auto
            mode's think / no-think token (where the two prefixes part) towards the forced half that did better;
            0: off. Only with ``mode_split``.
        decision_tie: the weight of a tied group (every rollout earned the same positive reward), whose decision
            goes to the half with the shorter mean completion (``decision_targets``' ``tie_weight``).
        min_think_tokens / no_reopen / strict_auto: strict modes in TRL's generation (the rules of
            ``r4b_fast.ops.sampling.ModeState`` and the rollout engine's ``strict_auto``), applied by a logits
            processor (:mod:`r4b_fast.integrations.trl_strict`); the loss keeps the unconstrained log-probs and
            ``strict/*`` metrics log the mismatch. ``strict_auto`` needs ``mode_split=False`` (the only auto rows).

    TRL options the fused loss does not implement are refused here with the field's name: ``loss_type`` other than
    grpo / bnpo / dr_grpo / dapo, ``delta``, ``top_entropy_quantile < 1``, ``off_policy_mask_threshold``,
    ``use_adaptive_entropy``, ``use_bias_correction_kl`` with ``beta != 0`` (default False here,
    True in TRL), ``multi_objective_aggregation`` other
    than ``"sum_then_normalize"``, and an odd ``num_generations`` (or ``num_generations_eval``) with the split.

    Example:
        >>> BPOConfig(output_dir="out", num_generations=4, loss_type="grpo").mode_split  # doctest: +SKIP
        True
    """

    mode_split: bool = field(default=True, metadata={"help": "BPO: g thinking + g non-thinking rollouts per prompt."})
    think_prefix: str | None = field(default=None, metadata={"help": "Forced thinking prefix (default '<think>\\n')."})
    no_think_prefix: str | None = field(default=None, metadata={"help": "Forced non-thinking prefix."})
    # TRL defaults to True (the KL term times the ratio); BPO's objective is the plain k3 KL, which the loss computes
    use_bias_correction_kl: bool = field(default=False, metadata={"help": "Not supported with beta != 0."})
    decision_coef: float = field(default=1.0, metadata={"help": "BPO: weight of the mode-decision loss (0: off)."})
    decision_tie: float = field(default=0.25, metadata={"help": "BPO: a tied group's decision-loss weight."})
    min_think_tokens: int = field(default=0, metadata={"help": "Strict: tokens a thinking rollout writes before it "
                                                               "may close its think block or end (0: off)."})
    no_reopen: bool = field(default=False, metadata={"help": "Strict: no think tag after a closed think block."})
    strict_auto: bool = field(default=False, metadata={"help": "Strict: auto rollouts (mode_split=False) write the "
                                                               "prefixes' common part, then one of the two decision "
                                                               "tokens."})

    def __post_init__(self):
        super().__post_init__()
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"BPOConfig.loss_type: expected one of {sorted(LOSS_TYPES)}, got {self.loss_type!r}")
        refused = {
            "delta": self.delta is not None,
            "top_entropy_quantile": self.top_entropy_quantile < 1.0,
            "off_policy_mask_threshold": self.off_policy_mask_threshold is not None,
            "use_adaptive_entropy": self.use_adaptive_entropy,
            "use_bias_correction_kl": self.use_bias_correction_kl and self.beta != 0.0,
            "multi_objective_aggregation": self.multi_objective_aggregation != "sum_then_normalize",
        }
        for name, bad in refused.items():
            if bad:
                raise ValueError(f"BPOConfig.{name}: {getattr(self, name)!r} is not supported by the fused BPO loss "
                                 "(leave it at its default)")  # fmt: skip
        if self.importance_sampling_level not in ("token", "sequence"):
            raise ValueError(f"BPOConfig.importance_sampling_level: expected 'token' or 'sequence', "
                             f"got {self.importance_sampling_level!r}")  # fmt: skip
        if self.mode_split and self.use_vllm and self.vllm_mode == "server":
            # TRL's server mode sends each group's first prompt once with n = num_generations: every rollout would
            # follow the thinking prefix, and the non-thinking half would be trained as if it followed its own
            raise ValueError("BPOConfig.vllm_mode: 'server' generates a whole group from its first prompt, which "
                             "would put both halves after the thinking prefix; use vllm_mode='colocate' (or "
                             "transformers generation) with mode_split=True")  # fmt: skip
        if self.mode_split:
            for name in ("num_generations", "num_generations_eval"):
                n = getattr(self, name)
                if n is not None and n % 2:
                    raise ValueError(f"BPOConfig.{name}: BPO splits each group into two equal halves (g thinking + "
                                     f"g non-thinking), so it must be even, got {n}")  # fmt: skip
        for name in ("think_prefix", "no_think_prefix"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"BPOConfig.{name}: expected a non-empty string or None, got {value!r}")
        self._check_strict()
        for name in ("decision_coef", "decision_tie"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"BPOConfig.{name}: expected a finite number >= 0, got {value!r}")

    def _check_strict(self) -> None:
        k = self.min_think_tokens
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"BPOConfig.min_think_tokens: expected an int >= 0, got {k!r}")
        for name in ("no_reopen", "strict_auto"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"BPOConfig.{name}: expected a bool, got {getattr(self, name)!r}")
        if self.strict_auto and self.mode_split:
            raise ValueError("BPOConfig.strict_auto: auto mode's decision only exists without the split (every "
                             "rollout of mode_split=True is forced); set mode_split=False or strict_auto=False")
        if self.min_think_tokens and not self.mode_split:
            raise ValueError("BPOConfig.min_think_tokens: applies to forced thinking rollouts, which only "
                             "mode_split=True has; set it to 0")  # fmt: skip
        strict = bool(self.min_think_tokens or self.no_reopen or self.strict_auto)
        if strict and self.use_vllm and self.vllm_mode != "colocate":
            raise ValueError("BPOConfig.vllm_mode: strict modes (min_think_tokens / no_reopen / strict_auto) run as a "
                             "vLLM logits processor in this process, i.e. vllm_mode='colocate' only")  # fmt: skip
        if strict and self.use_transformers_continuous_batching:
            raise ValueError("BPOConfig.use_transformers_continuous_batching: takes no logits processor; strict "
                             "modes need transformers' generate (or vLLM colocate)")  # fmt: skip
        if self.min_think_tokens and self.min_think_tokens >= self.max_completion_length:
            raise ValueError(f"BPOConfig.min_think_tokens: {self.min_think_tokens} >= max_completion_length "
                             f"({self.max_completion_length}): no thinking rollout could close its block")

    @property
    def strict(self) -> bool:
        """Some strict-mode rule is on."""
        return bool(self.min_think_tokens or self.no_reopen or self.strict_auto)


def trl_reward(fn: Callable[[str, str], float], answer_column: str = "answer") -> Callable[..., list[float]]:
    """A TRL reward function from a ``(response, answer) -> float`` one, the response being the forced mode prefix
    plus TRL's completion (so ``accuracy_reward`` finds the answer after ``</think>`` in both modes).

    Conversational completions (``[{"role": "assistant", "content": ...}]``) use their content.

    Example:
        >>> from r4b_fast.training.rewards import accuracy_reward
        >>> reward = trl_reward(accuracy_reward)
        >>> reward(completions=["x\\n</think>\\n\\n7", "7"], answer=["7", "8"], bpo_prefix=["<think>\\n", ""])
        [1.0, 0.0]
    """
    if not callable(fn):
        raise TypeError(f"fn: expected a callable (response, answer) -> float, got {type(fn).__name__}")

    def reward(completions, bpo_prefix=None, completion_ids=None, **kwargs):
        if answer_column not in kwargs:
            raise ValueError(f"answer_column: the dataset has no {answer_column!r} column (columns passed to reward "
                             f"functions: {sorted(kwargs)})")  # fmt: skip
        answers = kwargs[answer_column]
        prefixes = bpo_prefix if bpo_prefix is not None else [""] * len(completions)
        tok = reward.tokenizer
        if tok is not None and completion_ids is not None:
            # TRL's texts lose special tokens (skip_special_tokens=True): a <think> / </think> registered as special
            # would vanish, so decode the ids keeping them, without eos / padding
            ends = {tok.eos_token_id, tok.pad_token_id} - {None}
            texts = [tok.decode([t for t in ids if t not in ends], skip_special_tokens=False)
                     for ids in completion_ids]  # fmt: skip
        else:
            texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [float(fn(p + t, str(a))) for p, t, a in zip(prefixes, texts, answers)]

    reward.__name__ = getattr(fn, "__name__", "reward")
    reward.tokenizer = None  # set by BPOTrainer: completion ids are then decoded with the think tags kept
    reward._r4b_trl_reward = True
    return reward


def thinks(response: str) -> bool:
    """The response holds a think block with something in it (closed or not): the thinking half's prefix opens one,
    the non-thinking half's is empty, so only a block it writes itself counts there.

    Example:
        >>> thinks("<think>\\n3*5=15\\n</think>\\n\\n15"), thinks("<think>\\n\\n</think>\\n\\n15")
        (True, False)
    """
    return any(m.group(1).strip() for m in _THINK_BLOCK.finditer(response))
