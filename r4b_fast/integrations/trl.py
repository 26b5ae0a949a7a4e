"""BPO inside TRL's ``GRPOTrainer``: forced thinking / non-thinking halves, mixed-group advantages, fused LM-head loss.

R-4B's BPO is GRPO in which every prompt's ``2g`` rollouts are split into ``g`` forced into thinking mode and ``g``
forced into non-thinking mode, with advantages normalised over the mixed group of ``2g``. :class:`BPOTrainer` is a
``trl.GRPOTrainer`` subclass that overrides four of its hooks (no TRL code is copied):

- ``_generate_and_score_completions``: marks each rollout with its mode before TRL generates and scores, then
  replaces TRL's advantages by ``r4b_fast.group_advantages(..., estimator="bpo", modes=...)`` over the same rewards
  and logs per-mode reward, completion length and think rate into ``self._metrics[mode]["bpo/..."]``;
- ``_tokenize_prompts``: appends the mode prefix to each tokenized prompt, after the chat template's generation
  prompt. TRL's own generation (transformers ``generate`` or vLLM, both take the prompt ids) then continues a forced
  mode, and the training forward sees the prefix as prompt (not trained), as in R-4B where the mode is chosen by what
  follows the assistant turn;
- ``_calculate_rewards``: keeps TRL's gathered per-function rewards for the advantage above;
- ``_compute_loss``: ``r4b_fast.fused_linear_policy_loss`` on the backbone's last hidden states and the LM-head
  weight, run inside the model's forward (so DDP / FSDP / DeepSpeed wrappers see one forward), without the
  ``[T, V]`` logits; TRL's ``loss_type``, ``epsilon`` / ``epsilon_high``, ``beta``, ``temperature``,
  ``entropy_coef``, ``importance_sampling_level`` and vLLM's ``importance_sampling_ratio`` map to its arguments.
  With the split it adds BPO's mode-decision loss (``r4b_fast.training.mode_decision``, ``BPOConfig.decision_coef``).

The mode-decision loss: the two prefixes part at one token (``"\\n"`` vs ``"\\n\\n"`` after ``<think>`` with a
tokenizer that merges ``"\\n\\n"``), which auto mode samples: the think / no-think decision. Here that token is
prompt, so the state that predicts it is at a prompt position: per row, the prefix ends the prompt (its last
real token, found from ``prompt_mask``: any padding side), the decision is the prefix's token ``k`` (where the two
prefixes part), and the state one before it predicts it. Targets and
weights are ``decision_targets`` over each group of ``2g`` (the mixed-group advantages above, the rewards, the
completion lengths for ties, ``decision_tie``), computed over every process's rollouts when the batch is generated
and carried as per-row tensors through TRL's shuffle and split. The term is ``decision_coef *
mode_decision_loss(...)`` with the policy loss's own normaliser for the micro-batch (rows x accumulation steps for
grpo / dr_grpo, tokens for bnpo / dapo), as ``training/bpo.py`` divides it by its policy loss's normaliser, so
``decision_coef`` weighs it against the policy loss as there; its two logits are computed in fp32.

Which rollout gets which mode: TRL's sampler repeats each prompt ``num_generations`` times in a row (over all
processes in process order), so the rollout at global position ``i`` is number ``i % num_generations`` of its group;
numbers ``0 .. g-1`` think, ``g .. 2g-1`` do not.

The prefixes: thinking ``"<think>\\n"`` (R-4B's; nothing in chat templates produces it); non-thinking is what the
chat template itself appends to the generation prompt with ``enable_thinking=False`` (Qwen3's template writes
``"<think>\\n\\n</think>\\n\\n"``), falling back to R-4B's ``"<think>\\n\\n</think>\\n\\n"`` where the template has
no such switch. Both are tokenized in context (the rendered generation prompt with and without the prefix), never
hard-coded ids. Reward functions receive two extra columns: ``bpo_mode`` (``"think"``, ``"no_think"``, or ``"auto"``
without the split) and ``bpo_prefix`` (the prefix text, which TRL's ``completions`` do not contain: it is part of the
prompt); :func:`trl_reward` turns a ``(response, answer) -> float`` function such as
``r4b_fast.training.rewards.accuracy_reward`` into a TRL reward function that sees ``bpo_prefix + completion``.

Example:
    >>> from r4b_fast.integrations.trl import BPOConfig, BPOTrainer, trl_reward  # doctest: +SKIP
    >>> from r4b_fast.training.rewards import accuracy_reward  # doctest: +SKIP
    >>> args = BPOConfig(output_dir="out", num_generations=8, loss_type="grpo")  # g = 4 per mode  # doctest: +SKIP
    >>> trainer = BPOTrainer(model=model, reward_funcs=trl_reward(accuracy_reward), args=args,
    ...                      train_dataset=dataset, processing_class=tokenizer)  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP

Needs ``trl`` (``pip install "r4b_fast[trl]"``); importing ``r4b_fast`` never imports this module.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from trl import GRPOConfig, GRPOTrainer

from r4b_fast.modes import Mode
from r4b_fast.ops.fused_linear_logprobs import fused_linear_policy_loss
from r4b_fast.ops.group_advantages import group_advantages
from r4b_fast.training.mode_decision import DecisionTokens, decision_targets, mode_decision_loss

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
DEFAULT_THINK_PREFIX = f"{THINK_OPEN}\n"
DEFAULT_NO_THINK_PREFIX = f"{THINK_OPEN}\n\n{THINK_CLOSE}\n\n"
MODE_NAMES = {Mode.THINK: "think", Mode.NO_THINK: "no_think", Mode.AUTO: "auto"}

# TRL loss_type -> our aggregation (the normaliser that makes it TRL's is chosen per micro-batch in _compute_loss)
LOSS_TYPES = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dr_grpo": "seq-mean-token-sum-norm",
              "dapo": "token-mean"}  # fmt: skip
# model inputs TRL puts into the batch for vision-language models (passed to the forward whole: no chunking here)
_FORWARD_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                 "token_type_ids", "mm_token_type_ids", "image_position_ids")  # fmt: skip
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
        for name in ("decision_coef", "decision_tie"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"BPOConfig.{name}: expected a finite number >= 0, got {value!r}")


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


def _install_loss_forward(model) -> None:
    """Let ``model(..., r4b_policy_loss=spec)`` return ``fused_linear_policy_loss``'s ``(loss, metrics)`` computed from
    the backbone's last hidden states: the loss runs inside the (possibly wrapped) model's forward, like TRL's fused
    LM head, so data-parallel wrappers see every parameter used in one forward. Other calls go to the previous
    forward unchanged (generation, TRL's ``fused_lm_head=True`` scoring).

    ``spec["decision"]`` (optional: ``tokens``, ``positions`` ``[B]`` int64 indices into the input of the states
    that predict each row's decision token, ``targets``, ``weights``, ``coef``) adds ``coef *`` the mode-decision
    loss with the policy loss's ``normaliser`` and ``temperature``, and its ``decision_loss`` / ``decision_p_think``
    metrics."""
    previous = model.forward

    def forward(self, *args, r4b_policy_loss=None, **kwargs):
        if r4b_policy_loss is None:
            return previous(*args, **kwargs)
        spec = dict(r4b_policy_loss)
        keep = spec.pop("logits_to_keep")
        cast_fp32 = spec.pop("cast_lm_head_to_fp32")
        decision = spec.pop("decision", None)
        kwargs["use_cache"] = False
        states = self.base_model(*args, **kwargs).last_hidden_state
        hidden = states[:, -keep - 1 : -1]  # states before each target
        head = self.get_output_embeddings()
        weight, bias = head.weight, head.bias
        if hasattr(weight, "full_tensor"):  # FSDP2 shards the head as a DTensor; the op takes a plain tensor
            weight = weight.full_tensor()
            bias = bias.full_tensor() if bias is not None else None
        hidden = hidden.to(weight.device)
        if cast_fp32:
            with torch.autocast(hidden.device.type, enabled=False):
                loss, metrics = fused_linear_policy_loss(hidden.float(), weight.float(),
                                                         bias=None if bias is None else bias.float(), **spec)
        else:
            loss, metrics = fused_linear_policy_loss(hidden, weight, bias=bias, **spec)
        if decision is None:
            return loss, metrics
        # the decision token is prompt (the forced prefix), so its predicting state sits at a prompt position, one
        # per row: hand mode_decision_loss those states as a one-position "completion"
        rows = torch.arange(states.size(0), device=states.device)
        at = states[rows, decision["positions"].to(states.device)].unsqueeze(1).to(weight.device)  # [B, 1, D]
        with torch.autocast(at.device.type, enabled=False):  # two logits per row: fp32 whatever the autocast
            term, m = mode_decision_loss(at.float(), weight, dataclasses.replace(decision["tokens"], position=0),
                                         decision["targets"], decision["weights"], temperature=spec["temperature"],
                                         normaliser=spec["normaliser"])  # fmt: skip
        metrics = {**metrics, "decision_loss": term.detach(), "decision_p_think": m["decision_p_think"].mean()}
        return loss + decision["coef"] * term, metrics

    model.forward = types.MethodType(forward, model)


class BPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` running BPO (see the module docstring); every ``GRPOTrainer`` argument works the same, with
    a :class:`BPOConfig` as ``args``.

    Logged per mode (``think`` / ``no_think``) besides TRL's own metrics: ``bpo/{mode}/reward`` (mean over the
    rollouts with a reward), ``bpo/{mode}/completion_length`` (generated tokens, the forced prefix excluded),
    ``bpo/{mode}/think_rate`` (share of rollouts whose response, prefix included, holds a non-empty think block:
    the thinking half's share that wrote something, the non-thinking half's share that reopened a block). With the
    decision loss: ``bpo/decision_loss`` (the term before ``decision_coef``) and ``bpo/decision_p_think`` (mean
    two-way p(think) at the decision over the micro-batch's rows), per micro-batch.

    Not supported (clear errors): ``tools``, ``environment_factory``, ``rollout_func`` with the split (they bypass or
    re-tokenize the prompt the prefix goes into); MoE router auxiliary loss; logit soft-capping or logit scaling heads;
    with ``decision_coef > 0``: prefixes that do not part at a token, an LM head with a bias.
    With vLLM, TRL's ``importance_sampling_ratio`` (any ``vllm_importance_sampling_mode``) becomes the op's
    ``rollout_is_weights``.

    Example:
        >>> trainer = BPOTrainer(model=model, reward_funcs=reward, args=BPOConfig(output_dir="out", num_generations=4),
        ...                      train_dataset=dataset, processing_class=tokenizer)  # doctest: +SKIP
        >>> trainer.train()  # doctest: +SKIP
    """

    _tag_names = ["trl", "grpo", "bpo", "r4b_fast"]

    def __init__(self, model, reward_funcs=None, args: BPOConfig | None = None, *pos, **kwargs):
        if pos:
            raise TypeError("BPOTrainer: pass every argument after args by keyword (train_dataset=..., ...)")
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "") or "model"
            args = BPOConfig(f"{str(name).rstrip('/').split('/')[-1]}-BPO")
        if not isinstance(args, BPOConfig):
            raise TypeError(f"args: expected a BPOConfig (BPO's settings on top of GRPOConfig), got "
                            f"{type(args).__name__}")  # fmt: skip
        if args.mode_split:
            for name in ("tools", "environment_factory", "rollout_func"):
                if kwargs.get(name):
                    raise ValueError(f"{name}: not supported with BPOConfig.mode_split=True (the mode prefix is "
                                     "appended to TRL's tokenized prompt, which these bypass or re-tokenize)")
        self._bpo_local_modes: list[Mode] | None = None
        self._bpo_rewards_per_func: torch.Tensor | None = None
        super().__init__(model, reward_funcs, args, **kwargs)
        if self.aux_loss_enabled:
            raise ValueError("BPOConfig.router_aux_loss_coef: the MoE load-balancing loss is not supported by the "
                             "fused BPO loss; set it to 0.0")  # fmt: skip
        text_config = self.model.config.get_text_config()
        for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                     "logits_scaling"):  # fmt: skip
            value = getattr(text_config, attr, None)
            if value is not None and value != 1.0:
                raise ValueError(f"model: config.{attr}={value} changes the logits after the LM head, which the "
                                 "fused BPO loss does not apply")  # fmt: skip
        self.bpo_prefix_text, self.bpo_prefix_ids = self._mode_prefixes()
        self.bpo_decision = self._decision_tokens()
        # TRL decodes completions with skip_special_tokens=True: a think tag that is a special token vanishes from
        # the text reward functions get. trl_reward's functions decode the completion ids themselves instead;
        # any other reward function is told.
        special = set(getattr(self._tokenizer, "all_special_tokens", []))
        stripped = sorted(special & {THINK_OPEN, THINK_CLOSE})
        for fn in self.reward_funcs:
            if getattr(fn, "_r4b_trl_reward", False):
                fn.tokenizer = self._tokenizer
            elif stripped and callable(fn) and not isinstance(fn, torch.nn.Module):
                warnings.warn(f"reward function {getattr(fn, '__name__', fn)!r}: the tokenizer marks {stripped} as "
                              "special tokens, which TRL strips from the completions it passes (a think block's "
                              "tags are gone); decode kwargs['completion_ids'] with skip_special_tokens=False, or "
                              "wrap a (response, answer) function with trl_reward, which does", stacklevel=2)
        _install_loss_forward(self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model)

    # ------------------------------------------------------------------ prefixes
    def _render_generation_prompt(self, **template_kwargs) -> str | None:
        """The chat template's rendering of a one-message conversation up to the generation prompt (None: no
        template), with TRL's chat_template_kwargs and ``template_kwargs`` on top."""
        if getattr(self.processing_class, "chat_template", None) is None and self._tokenizer.chat_template is None:
            return None
        content = [{"type": "text", "text": "x"}] if self._is_vlm else "x"
        kwargs = {**self.chat_template_kwargs, **template_kwargs}
        return self.processing_class.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                         add_generation_prompt=True, **kwargs)  # fmt: skip

    def _mode_prefixes(self) -> tuple[dict[Mode, str], dict[Mode, list[int]]]:
        base = self._render_generation_prompt()
        if base is not None and (THINK_CLOSE in base.rsplit("x", 1)[-1] or base.rstrip().endswith(THINK_OPEN)):
            raise ValueError("chat_template_kwargs / chat template: the generation prompt already fixes a mode "
                             f"(it ends {base[-40:]!r}); BPO appends each mode's prefix itself, so leave the mode open "
                             "(e.g. no enable_thinking=False)")  # fmt: skip
        no_think = self.args.no_think_prefix
        if no_think is None and base is not None:
            try:
                off = self._render_generation_prompt(enable_thinking=False)
            except Exception:  # a template that rejects the flag has no switch: fall back to R-4B's block
                off = base
            tail = off[len(base) :] if off.startswith(base) else ""
            no_think = tail if THINK_CLOSE in tail else None
        texts = {Mode.THINK: self.args.think_prefix or DEFAULT_THINK_PREFIX,
                 Mode.NO_THINK: no_think or DEFAULT_NO_THINK_PREFIX}  # fmt: skip
        ids = {}
        for mode, text in texts.items():
            ids[mode] = self._prefix_ids(base if base is not None else "", text)
        return texts, ids

    def _prefix_ids(self, context: str, text: str) -> list[int]:
        """``text``'s ids right after ``context`` (the rendered generation prompt): tokenized in context, so BPE
        merges at the boundary are those the model sees."""
        tok = self._tokenizer
        before = tok(context, add_special_tokens=False)["input_ids"]
        after = tok(context + text, add_special_tokens=False)["input_ids"]
        if after[: len(before)] != before or len(after) == len(before):
            raise ValueError(f"prefix {text!r}: its tokens merge with the end of the generation prompt "
                             f"({context[-20:]!r}), so it cannot be appended to the tokenized prompt")  # fmt: skip
        return after[len(before) :]

    def _decision_tokens(self) -> DecisionTokens | None:
        """Where the two prefixes part (the decision token, in prefix positions); None when the loss is off."""
        if not self.args.mode_split or self.args.decision_coef == 0:
            return None
        think, no_think = self.bpo_prefix_ids[Mode.THINK], self.bpo_prefix_ids[Mode.NO_THINK]
        try:
            tokens = DecisionTokens.from_prefixes(think, no_think)
        except ValueError as err:
            raise ValueError(
                f"BPOConfig.decision_coef: the mode-decision loss needs the prefixes to part at one token, but the "
                f"thinking prefix {self.bpo_prefix_text[Mode.THINK]!r} ({think}) and the non-thinking prefix "
                f"{self.bpo_prefix_text[Mode.NO_THINK]!r} ({no_think}) do not (one is a token prefix of the other); "
                "set decision_coef=0 or use a tokenizer that merges '\\n\\n'"
            ) from err
        if self.model.get_output_embeddings().bias is not None:
            raise ValueError("BPOConfig.decision_coef: the model's LM head has a bias, which the mode-decision loss "
                             "does not apply; set decision_coef=0")  # fmt: skip
        return tokens

    # ------------------------------------------------------------------ hooks
    def _group_modes(self, num: int, offset: int, n_gen: int) -> list[Mode]:
        """The modes of ``num`` rollouts starting at global position ``offset`` (groups of ``n_gen`` in a row)."""
        if not self.args.mode_split:
            return [Mode.AUTO] * num
        return [Mode.THINK if (offset + i) % n_gen < n_gen // 2 else Mode.NO_THINK for i in range(num)]

    def _tokenize_prompts(self, prompts: list):
        prompt_ids, images, multimodal_fields = super()._tokenize_prompts(prompts)
        modes = self._bpo_local_modes
        if modes is None or len(modes) != len(prompt_ids):
            raise RuntimeError("BPOTrainer: prompts tokenized outside _generate_and_score_completions")
        if not self.args.mode_split:
            return prompt_ids, images, multimodal_fields
        prompt_ids = [list(ids) + self.bpo_prefix_ids[m] for ids, m in zip(prompt_ids, modes)]
        for key in ("token_type_ids", "mm_token_type_ids"):  # per-token fields: the prefix holds no image token
            if key in multimodal_fields:
                raise NotImplementedError(f"BPOTrainer: processors that return per-token {key} are not supported "
                                          "with the mode split yet")  # fmt: skip
        return prompt_ids, images, multimodal_fields

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._bpo_rewards_per_func = rewards_per_func  # gathered over processes: [N_global, F]
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        mode = "train" if self.model.training else "eval"
        n_gen = self.num_generations if mode == "train" else self.num_generations_eval
        offset = self.accelerator.process_index * len(inputs)
        modes = self._group_modes(len(inputs), offset, n_gen)
        inputs = [{**x, "bpo_mode": MODE_NAMES[m], "bpo_prefix": self.bpo_prefix_text.get(m, "")}
                  for x, m in zip(inputs, modes)]  # fmt: skip
        self._bpo_local_modes = modes
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._bpo_local_modes = None
        rpf, self._bpo_rewards_per_func = self._bpo_rewards_per_func, None
        n_all = rpf.size(0)
        device = rpf.device
        all_modes = torch.tensor([int(m) for m in self._group_modes(n_all, 0, n_gen)], device=device)
        # TRL's reward: weighted sum over functions, NaN where every function returned None (excluded, advantage 0)
        rewards = (rpf * self.reward_weights.to(device).unsqueeze(0)).nansum(dim=1)
        rewards[torch.isnan(rpf).all(dim=1)] = torch.nan
        adv = group_advantages(rewards, group_size=n_gen, modes=all_modes if self.args.mode_split else None,
                               estimator="bpo" if self.args.mode_split else "grpo", scale=self.scale_rewards,
                               unbiased=True, eps=1e-4, nonfinite="zero")  # TRL: Bessel std, + 1e-4  # fmt: skip
        local = slice(offset, offset + len(inputs))
        output["advantages"] = adv.advantages[local].to(output["advantages"].dtype)
        logged = self._logs["advantages"]  # the completions table shows the advantages that are trained on
        for _ in range(min(n_all, len(logged))):
            logged.pop()
        logged.extend(adv.advantages.tolist())
        self._log_mode_metrics(mode, output, modes, rewards, all_modes)
        if self.bpo_decision is not None:
            # each group's verdict over all processes (a group may straddle them); rows travel with TRL's shuffle
            lengths = self.accelerator.gather(output["completion_mask"].sum(1).float())
            target, weight = decision_targets(adv.advantages, all_modes, n_gen, torch.isfinite(rewards),
                                              rewards=rewards, lengths=lengths,
                                              tie_weight=float(self.args.decision_tie))  # fmt: skip
            local_modes = all_modes[local]
            prefix_len = torch.where(local_modes == int(Mode.THINK), len(self.bpo_prefix_ids[Mode.THINK]),
                                     len(self.bpo_prefix_ids[Mode.NO_THINK]))  # fmt: skip
            output["bpo_decision_target"] = target[local].to(output["advantages"].device)
            output["bpo_decision_weight"] = weight[local].to(output["advantages"].device)
            output["bpo_prefix_length"] = prefix_len.to(output["advantages"].device)
        return output

    def _log_mode_metrics(self, mode: str, output: dict, local_modes: list[Mode], rewards, all_modes) -> None:
        """Per-mode reward, completion length and think rate over every process's rollouts."""
        device = rewards.device
        ids, mask = output["completion_ids"], output["completion_mask"].bool()
        drop = {*self.eos_token_ids, self._tokenizer.pad_token_id}
        think = []
        for row, keep, m in zip(ids.tolist(), mask.tolist(), local_modes):
            kept = [t for t, k in zip(row, keep) if k and t not in drop]
            text = self._tokenizer.decode(self.bpo_prefix_ids.get(m, []) + kept, skip_special_tokens=False)
            think.append(thinks(text))
        lengths = self.accelerator.gather(mask.sum(1).float())
        think = self.accelerator.gather(torch.tensor(think, dtype=torch.float32, device=device))
        for m in (Mode.THINK, Mode.NO_THINK) if self.args.mode_split else (Mode.AUTO,):
            sel = all_modes == int(m)
            if not sel.any():
                continue
            name = MODE_NAMES[m]
            scored = rewards[sel]
            scored = scored[~torch.isnan(scored)]
            self._metrics[mode][f"bpo/{name}/reward"].append(scored.mean().item() if scored.numel() else float("nan"))
            self._metrics[mode][f"bpo/{name}/completion_length"].append(lengths[sel].mean().item())
            self._metrics[mode][f"bpo/{name}/think_rate"].append(think[sel].mean().item())

    def _policy_loss_spec(self, inputs, mask) -> dict:
        """``fused_linear_policy_loss``'s arguments for TRL's settings and this micro-batch."""
        mode = "train" if self.model.training else "eval"
        accum = self.current_gradient_accumulation_steps if mode == "train" else 1  # no accumulation in eval
        rows = inputs["completion_ids"].size(0)
        max_length = None
        if self.loss_type in ("grpo", "dr_grpo"):  # TRL: mean over the micro-batch's rows, / accumulation steps
            normaliser = float(rows * accum)
            max_length = self.max_completion_length if self.loss_type == "dr_grpo" else None
        elif self.loss_type == "bnpo":  # tokens of this micro-batch, / accumulation steps
            normaliser = mask.sum().clamp(min=1).float() * accum
        else:  # dapo: the generation batch's tokens (all processes), rescaled to one accumulation window
            normaliser = inputs["num_items_in_batch"].clamp(min=1.0).float() / self.accelerator.num_processes
            if mode == "train":
                normaliser = normaliser * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        spec = dict(
            targets=inputs["completion_ids"], advantages=inputs["advantages"], mask=mask,
            old_logprobs=inputs.get("old_per_token_logps"),
            ref_logprobs=inputs.get("ref_per_token_logps") if self.beta != 0.0 else None,
            beta=float(self.beta), clip_low=float(self.epsilon_low), clip_high=float(self.epsilon_high),
            temperature=float(self.temperature), aggregation=LOSS_TYPES[self.loss_type], normaliser=normaliser,
            max_length=max_length, importance_level=self.importance_sampling_level,
            logits_to_keep=inputs["completion_ids"].size(1), cast_lm_head_to_fp32=bool(self.args.cast_lm_head_to_fp32),
        )  # fmt: skip
        if self.entropy_coef:  # TRL's bonus: a token mean whatever the loss_type, / accumulation steps
            spec.update(entropy_coef=float(self.entropy_coef) / accum, entropy_aggregation="token-mean")
        if self.use_vllm and self.vllm_importance_sampling_correction:  # TRL's ratio: [B, T] per token, [B, 1] per seq
            weights = inputs["importance_sampling_ratio"]
            spec["rollout_is_weights"] = weights.squeeze(-1) if weights.size(-1) == 1 else weights
        if self.bpo_decision is not None and "bpo_decision_target" in inputs:
            spec["decision"] = dict(tokens=self.bpo_decision, positions=self._decision_positions(inputs),
                                    targets=inputs["bpo_decision_target"], weights=inputs["bpo_decision_weight"],
                                    coef=float(self.args.decision_coef))  # fmt: skip
        return spec

    def _decision_positions(self, inputs) -> torch.Tensor:
        """``[B]`` int64: per row, the index in ``cat(prompt, completion)`` of the hidden state that predicts the
        decision token. The prompt ends with the row's prefix (left padding, or any padding: the last real prompt
        token is found from the mask); the decision token is the prefix's token ``position``, so its state is one
        before it."""
        mask = inputs["prompt_mask"]
        index = torch.arange(mask.size(1), device=mask.device)
        last = torch.where(mask.bool(), index, -1).amax(1)  # the last real prompt token
        start = last + 1 - inputs["bpo_prefix_length"].to(mask.device)  # where the forced prefix begins
        return start + self.bpo_decision.position - 1

    def _compute_loss(self, model, inputs):
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        extra = {k: inputs[k] for k in _FORWARD_KEYS if inputs.get(k) is not None}
        spec = self._policy_loss_spec(inputs, mask)
        with self.accelerator.autocast():
            loss, metrics = model(input_ids=input_ids, attention_mask=attention_mask, r4b_policy_loss=spec, **extra)
        mode = "train" if self.model.training else "eval"

        def mean(t):  # a mean over processes of each process's masked mean
            return self.accelerator.gather(t.detach().float().reshape(1)).mean().item()

        if self.beta != 0.0:
            self._metrics[mode]["kl"].append(mean(metrics["kl"]))
        self._metrics[mode]["entropy"].append(mean(metrics["entropy_mean"]))
        low, high = mean(metrics["clip_frac_low"]), mean(metrics["clip_frac_high"])
        self._metrics[mode]["clip_ratio/low_mean"].append(low)
        self._metrics[mode]["clip_ratio/high_mean"].append(high)
        self._metrics[mode]["clip_ratio/region_mean"].append(low + high)  # disjoint: A < 0 vs A > 0
        if "decision_loss" in metrics:
            self._metrics[mode]["bpo/decision_loss"].append(mean(metrics["decision_loss"]))
            self._metrics[mode]["bpo/decision_p_think"].append(mean(metrics["decision_p_think"]))
        return loss
