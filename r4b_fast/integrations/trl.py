"""BPO inside TRL's ``GRPOTrainer``: forced thinking / non-thinking halves, mixed-group advantages, fused LM-head loss.

R-4B's BPO is GRPO in which every prompt's ``2g`` rollouts are split into ``g`` forced into thinking mode and ``g``
forced into non-thinking mode, with advantages normalised over the mixed group of ``2g``. :class:`BPOTrainer` is a
``trl.GRPOTrainer`` subclass that overrides six of its hooks (no TRL code is copied):

- ``_generate_and_score_completions``: marks each rollout with its mode before TRL generates and scores, then
  replaces TRL's advantages by ``r4b_fast.group_advantages(..., estimator="bpo", modes=...)`` over the same rewards
  and logs per-mode reward, completion length and think rate into ``self._metrics[mode]["bpo/..."]``;
- ``_tokenize_prompts``: appends the mode prefix to each tokenized prompt, after the chat template's generation
  prompt. TRL's own generation (transformers ``generate`` or vLLM, both take the prompt ids) then continues a forced
  mode, and the training forward sees the prefix as prompt (not trained), as in R-4B where the mode is chosen by what
  follows the assistant turn; per-token ``mm_token_type_ids`` get text (0) for the prefix;
- ``_generate_single_turn``: TRL's generation with the strict-mode logits processor (``BPOConfig.min_think_tokens``
  / ``no_reopen`` / ``strict_auto``) and its ``strict/*`` metrics;
- ``_get_per_token_logps_and_entropies``: TRL's forward with token types rebuilt from the ids it is given (its own
  come from a second processor call without the prefix, padded on the processor's side);
- ``_calculate_rewards``: keeps TRL's gathered per-function rewards for the advantage above;
- ``_compute_loss``: ``r4b_fast.fused_linear_policy_loss`` on the backbone's last hidden states and the LM-head
  weight, run inside the model's forward (so DDP / FSDP / DeepSpeed wrappers see one forward), without the
  ``[T, V]`` logits; TRL's ``loss_type``, ``epsilon`` / ``epsilon_high``, ``beta``, ``temperature``,
  ``entropy_coef``, ``importance_sampling_level`` map to ``PolicyLoss.trl(...)``, vLLM's
  ``importance_sampling_ratio`` to ``rollout_is_weights``.
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

Vision-language models (LLaVA-OneVision, R-4B, Qwen2.5-VL, Qwen3-VL) train with images: pass the family's processor
(``r4b_fast.models.processor_for``, no torchvision needed) as ``processing_class`` and a dataset with an ``image``
(or ``images``) column; the prefix extends the prompt's per-token ``mm_token_type_ids`` with text, and the training
forward's token types are rebuilt from the trained ids (:mod:`r4b_fast.integrations.trl_vlm`). Strict modes
(``BPOConfig.min_think_tokens`` / ``no_reopen`` / ``strict_auto``) run as a logits processor in TRL's generation
(:mod:`r4b_fast.integrations.trl_strict`).

The code: :mod:`~r4b_fast.integrations.trl_config` (``BPOConfig``, ``trl_reward``, ``thinks``),
:mod:`~r4b_fast.integrations.trl_prefixes` (prefixes, decision token, strict rules),
:mod:`~r4b_fast.integrations.trl_loss` (the fused loss in the model's forward), ``trl_vlm``, ``trl_strict``, and
:class:`BPOTrainer` here.

Needs ``trl`` (``pip install "r4b_fast[trl]"``); importing ``r4b_fast`` never imports this module.
"""

from __future__ import annotations

import functools
import warnings

import torch
from trl import GRPOTrainer

from r4b_fast.integrations.trl_config import (
    DEFAULT_NO_THINK_PREFIX,
    DEFAULT_THINK_PREFIX,
    LOSS_TYPES,
    MODE_NAMES,
    THINK_CLOSE,
    THINK_OPEN,
    BPOConfig,
    thinks,
    trl_reward,
)
from r4b_fast.integrations.trl_loss import install_loss_forward, policy_loss_spec
from r4b_fast.integrations.trl_prefixes import PrefixMixin
from r4b_fast.integrations.trl_strict import EXTRA_ARGS_KEY, StrictModesLogitsProcessor, StrictRules, violations
from r4b_fast.integrations.trl_vlm import check_vision, extend_token_types
from r4b_fast.modes import Mode
from r4b_fast.ops.group_advantages import group_advantages
from r4b_fast.training.mode_decision import decision_targets

__all__ = ["BPOConfig", "BPOTrainer", "StrictModesLogitsProcessor", "StrictRules", "thinks", "trl_reward",
           "DEFAULT_THINK_PREFIX", "DEFAULT_NO_THINK_PREFIX", "LOSS_TYPES", "MODE_NAMES"]

# model inputs TRL puts into the batch for vision-language models (passed to the forward whole: no chunking here)
_FORWARD_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                 "token_type_ids", "mm_token_type_ids", "image_position_ids")  # fmt: skip


class BPOTrainer(PrefixMixin, GRPOTrainer):
    """``trl.GRPOTrainer`` running BPO (see the module docstring); every ``GRPOTrainer`` argument works the same, with
    a :class:`BPOConfig` as ``args``.

    Logged per mode (``think`` / ``no_think``) besides TRL's own metrics: ``bpo/{mode}/reward`` (mean over the
    rollouts with a reward), ``bpo/{mode}/completion_length`` (generated tokens, the forced prefix excluded),
    ``bpo/{mode}/think_rate`` (share of rollouts whose response, prefix included, holds a non-empty think block:
    the thinking half's share that wrote something, the non-thinking half's share that reopened a block). With the
    decision loss: ``bpo/decision_loss`` (the term before ``decision_coef``) and ``bpo/decision_p_think`` (mean
    two-way p(think) at the decision over the micro-batch's rows), per micro-batch. With strict modes:
    ``strict/constrained_frac``, ``strict/logp_mismatch/{mean,max}`` (transformers generation).

    Refused when built (clear errors naming the field, before any forward): ``tools``, ``environment_factory``,
    ``rollout_func`` with the split (they bypass or re-tokenize the prompt the prefix goes into); MoE router
    auxiliary loss; logit soft-capping or logit scaling heads; with ``decision_coef > 0``: prefixes that do not part
    at a token, an LM head with a bias; images without a processor, a processor for a model outside the supported
    families, a processor whose image placeholder is not the model's, video columns; strict modes with
    ``use_transformers_continuous_batching`` or vLLM server mode; and every ``BPOConfig`` refusal.
    With vLLM, TRL's ``importance_sampling_ratio`` (any ``vllm_importance_sampling_mode``) becomes the op's
    ``rollout_is_weights``.

    Example:
        >>> trainer = BPOTrainer(model=model, reward_funcs=reward, args=BPOConfig(output_dir="out", num_generations=4),
        ...                      train_dataset=dataset, processing_class=processor)  # doctest: +SKIP
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
        if args.strict and kwargs.get("rollout_func"):
            raise ValueError("rollout_func: generates outside TRL's generation, where strict modes apply")
        self._bpo_local_modes: list[Mode] | None = None
        self._bpo_rewards_per_func: torch.Tensor | None = None
        data = [kwargs.get("train_dataset"), kwargs.get("eval_dataset")]
        early = not isinstance(model, str) and kwargs.get("processing_class") is not None
        if early:  # before TRL's own set-up, which fails obscurely on some of these (e.g. a processor, a text model)
            vision = check_vision(model, kwargs["processing_class"], data)
        super().__init__(model, reward_funcs, args, **kwargs)
        self._check_model()
        self.bpo_vision = vision if early else check_vision(self.model, self.processing_class, data)
        self.bpo_prefix_text, self.bpo_prefix_ids = self._mode_prefixes()
        self.bpo_decision = self._decision_tokens()
        self.bpo_strict_rules = self._strict_rules()
        self.bpo_strict = StrictModesLogitsProcessor(self.bpo_strict_rules) if self.bpo_strict_rules else None
        if self.bpo_strict is not None and self.use_vllm:  # colocate (BPOConfig refuses the server): per request
            gen = self.vllm_generation
            gen.generation_kwargs = {**(gen.generation_kwargs or {}),
                                     "extra_args": {EXTRA_ARGS_KEY: self.bpo_strict_rules.to_dict()}}  # fmt: skip
        self._connect_rewards()
        install_loss_forward(self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model)

    def _check_model(self) -> None:
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

    def _connect_rewards(self) -> None:
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
                              "wrap a (response, answer) function with trl_reward, which does", stacklevel=3)

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
        prefixes = [self.bpo_prefix_ids.get(m, []) if self.args.mode_split else [] for m in modes]
        prompt_ids = [list(ids) + p for ids, p in zip(prompt_ids, prefixes)]
        # per-token fields (unpadded, one list per prompt): the prefix is text; TRL left-pads them like the ids
        multimodal_fields = extend_token_types(multimodal_fields, [len(p) for p in prefixes])
        vis = self.bpo_vision
        if vis is not None and vis.key is not None and images is not None:  # M-RoPE needs them: from the ids
            multimodal_fields[vis.key] = [vis.types(torch.tensor([ids]), torch.ones(1, len(ids)), len(ids))[0].tolist()
                                          for ids in prompt_ids]  # fmt: skip
        return prompt_ids, images, multimodal_fields

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        """TRL's generation, with the strict-mode logits processor on transformers' ``generate`` (and the rules
        checked on what vLLM returns)."""
        strict, modes = self.bpo_strict, self._bpo_local_modes
        if strict is None:
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                 has_tool_images)  # fmt: skip
        if self.use_vllm:
            completion_ids, logprobs = super()._generate_single_turn(prompt_ids, images, multimodal_fields,
                                                                     num_generations, has_tool_images)  # fmt: skip
            bad = violations(self.bpo_strict_rules, modes or [Mode.AUTO] * len(completion_ids), completion_ids)
            if bad:
                raise RuntimeError(f"BPOConfig strict modes: vLLM's completions break them ({bad[:3]}): load "
                                   "r4b_fast.integrations.trl_strict.vllm_logits_processor_class() into vLLM")
            return completion_ids, logprobs
        from transformers import LogitsProcessorList

        model = self.accelerator.unwrap_model(self.model_wrapped)
        strict.begin(list(modes) if modes is not None else None)
        model.generate = functools.partial(type(model).generate, model,
                                           logits_processor=LogitsProcessorList([strict]))  # fmt: skip
        try:
            out = super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                has_tool_images)  # fmt: skip
        finally:
            del model.generate
        mode = "train" if self.model.training else "eval"
        for name, value in strict.stats().items():
            self._metrics[mode][name].append(value)
        return out

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        vis = self.bpo_vision
        if vis is not None and vis.key is not None and kwargs.get("image_grid_thw") is not None:
            # the trained ids' own token types (TRL's come from a second processor call: no prefix, its padding)
            kwargs[vis.key] = vis.types(input_ids, attention_mask, input_ids.size(1) - logits_to_keep)
        return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, *args,
                                                          **kwargs)  # fmt: skip

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._bpo_rewards_per_func = rewards_per_func  # gathered over processes: [N_global, F]
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        mode = "train" if self.model.training else "eval"
        n_gen = self.num_generations if mode == "train" else self.num_generations_eval
        offset = self.accelerator.process_index * len(inputs)
        modes = self._group_modes(len(inputs), offset, n_gen)
        inputs = [{**x, "bpo_mode": MODE_NAMES[m], "bpo_prefix": self.bpo_prefix_text.get(m, "")
                   if self.args.mode_split else ""} for x, m in zip(inputs, modes)]  # fmt: skip
        self._bpo_local_modes = modes
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._bpo_local_modes = None
        self._align_token_types(output)
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
            self._add_decision_rows(output, adv.advantages, all_modes, rewards, n_gen, local)
        return output

    def _align_token_types(self, output: dict) -> None:
        """The training forward's token types from the trained ids (see ``trl_vlm``)."""
        vis = self.bpo_vision
        if vis is None or vis.key is None or output.get("image_grid_thw") is None:
            return
        ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        output[vis.key] = vis.types(ids, mask, output["prompt_ids"].size(1))

    def _add_decision_rows(self, output, advantages, all_modes, rewards, n_gen, local) -> None:
        # each group's verdict over all processes (a group may straddle them); rows travel with TRL's shuffle
        lengths = self.accelerator.gather(output["completion_mask"].sum(1).float())
        target, weight = decision_targets(advantages, all_modes, n_gen, torch.isfinite(rewards), rewards=rewards,
                                          lengths=lengths, tie_weight=float(self.args.decision_tie))  # fmt: skip
        local_modes = all_modes[local]
        prefix_len = torch.where(local_modes == int(Mode.THINK), len(self.bpo_prefix_ids[Mode.THINK]),
                                 len(self.bpo_prefix_ids[Mode.NO_THINK]))  # fmt: skip
        device = output["advantages"].device
        output["bpo_decision_target"] = target[local].to(device)
        output["bpo_decision_weight"] = weight[local].to(device)
        output["bpo_prefix_length"] = prefix_len.to(device)

    def _log_mode_metrics(self, mode: str, output: dict, local_modes: list[Mode], rewards, all_modes) -> None:
        """Per-mode reward, completion length and think rate over every process's rollouts."""
        device = rewards.device
        ids, mask = output["completion_ids"], output["completion_mask"].bool()
        drop = {*self.eos_token_ids, self._tokenizer.pad_token_id}
        think = []
        for row, keep, m in zip(ids.tolist(), mask.tolist(), local_modes):
            kept = [t for t, k in zip(row, keep) if k and t not in drop]
            prefix = self.bpo_prefix_text.get(m, "") if self.args.mode_split else ""
            think.append(thinks(prefix + self._tokenizer.decode(kept, skip_special_tokens=False)))
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
        return policy_loss_spec(self, inputs, mask)

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
