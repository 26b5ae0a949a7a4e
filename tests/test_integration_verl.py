"""r4b_fast.integrations.verl through verl's own entry points, on CPU: ``compute_advantage`` on a ``DataProto``,
``get_policy_loss_fn`` against verl's ``vanilla``, ``VERL_USE_EXTERNAL_MODULES`` in a fresh process, and the
mode-forcing agent loop run the way verl's agent-loop manager runs it (stub LLM server)."""

import asyncio
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("verl", reason="verl not installed (pip install --no-deps verl==0.9.1 + its core's imports)")
pytest.importorskip("hydra", reason="verl's agent loop needs hydra-core")

from omegaconf import OmegaConf  # noqa: E402
from verl import DataProto  # noqa: E402
from verl.trainer.config import AlgoConfig  # noqa: E402
from verl.trainer.ppo.core_algos import get_adv_estimator_fn, get_policy_loss_fn  # noqa: E402
from verl.trainer.ppo.ray_trainer import compute_advantage  # noqa: E402

import r4b_fast  # noqa: E402
from r4b_fast.integrations import verl as rv  # noqa: E402
from r4b_fast.modes import Mode  # noqa: E402

EPS = 1e-6


def _batch(rewards, uids, lengths, L=6, modes=None):
    """A verl batch as the trainer has it before compute_advantage: the score on the last response token."""
    B = len(rewards)
    mask = torch.zeros(B, L)
    tlr = torch.zeros(B, L)
    for i, (r, n) in enumerate(zip(rewards, lengths)):
        mask[i, :n] = 1
        tlr[i, n - 1] = r
    non_tensor = {"uid": np.array(uids, dtype=object)}
    if modes is not None:
        non_tensor["bpo_mode"] = np.array(modes, dtype=object)
    return DataProto.from_dict(tensors={"token_level_rewards": tlr, "response_mask": mask}, non_tensors=non_tensor)


# Two prompts x (2 thinking + 2 non-thinking), interleaved so that grouping must follow the uid, not the position;
# prompt "a" rewards [1, 0, 1, 1] (mean 0.75, unbiased std 0.5), "b" [0, 1, 0, 0] (mean 0.25, std 0.5).
UIDS = ["a", "b", "a", "b", "a", "b", "a", "b"]
REWARDS = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0]
MODES = ["think", "think", "think", "think", "no_think", "no_think", "no_think", "no_think"]
LENGTHS = [6, 3, 1, 4, 2, 5, 6, 2]
HAND = [0.25, -0.25, -0.75, 0.75, 0.25, -0.25, 0.25, -0.25]  # r - mean of its uid group


def test_compute_advantage_bpo_exact_values_and_grouping():
    data = compute_advantage(_batch(REWARDS, UIDS, LENGTHS), adv_estimator="bpo", config=AlgoConfig())
    adv, ret, mask = data.batch["advantages"], data.batch["returns"], data.batch["response_mask"]
    expected = torch.tensor([h / (0.5 + EPS) for h in HAND])
    assert torch.allclose(adv[:, 0], expected, rtol=0, atol=1e-6)
    assert torch.equal(adv, adv[:, :1] * mask)  # one scalar per rollout, on its response tokens only
    assert torch.equal(ret, adv)
    # the same numbers as r4b_fast.group_advantages(estimator="bpo") with the modes, and verl's own grpo
    ga = r4b_fast.group_advantages(torch.tensor(REWARDS), group_index=torch.tensor([0, 1] * 4),
                                   modes=rv.modes_from_field(MODES), estimator="bpo")
    assert torch.allclose(adv[:, 0], ga.advantages, rtol=0, atol=1e-7)
    grpo = compute_advantage(_batch(REWARDS, UIDS, LENGTHS), adv_estimator="grpo", config=AlgoConfig())
    assert torch.allclose(adv, grpo.batch["advantages"], rtol=0, atol=1e-6)


def test_compute_advantage_bpo_config_and_zero_signal():
    # norm_adv_by_std_in_grpo=False reaches the registered estimator through config (verl passes nothing else)
    data = compute_advantage(_batch(REWARDS, UIDS, LENGTHS), adv_estimator="bpo",
                             config=AlgoConfig(norm_adv_by_std_in_grpo=False))
    assert torch.allclose(data.batch["advantages"][:, 0], torch.tensor(HAND), rtol=0, atol=1e-7)
    # an all-equal group gives exactly 0 (no signal); the other group is untouched
    rewards = [1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0]  # "a" all 1, "b" = [1, 0, 1, 1]
    data = compute_advantage(_batch(rewards, UIDS, LENGTHS), adv_estimator="bpo", config=AlgoConfig())
    adv = data.batch["advantages"][:, 0]
    assert torch.equal(adv[0::2], torch.zeros(4))
    assert torch.allclose(adv[1::2], torch.tensor([0.25, -0.75, 0.25, 0.25]) / (0.5 + EPS), rtol=0, atol=1e-6)


def test_compute_advantage_bpo_singleton_conventions():
    # a prompt with one rollout: 0 by default; verl's grpo convention r / (1 + eps) with algorithm.bpo_singleton=verl
    uids, rewards, lengths = ["a", "a", "s"], [1.0, 0.0, 0.7], [2, 3, 4]
    zero = compute_advantage(_batch(rewards, uids, lengths), adv_estimator="bpo", config=AlgoConfig())
    assert zero.batch["advantages"][2].abs().sum() == 0
    cfg = OmegaConf.create({"norm_adv_by_std_in_grpo": True, "bpo_singleton": "verl"})  # the trainer's DictConfig
    ours = compute_advantage(_batch(rewards, uids, lengths), adv_estimator="bpo", config=cfg)
    grpo = compute_advantage(_batch(rewards, uids, lengths), adv_estimator="grpo", config=AlgoConfig())
    assert ours.batch["advantages"][2, 0].item() == pytest.approx(0.7 / (1 + EPS), rel=1e-6)
    assert torch.allclose(ours.batch["advantages"], grpo.batch["advantages"], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="singleton"):
        compute_advantage(_batch(rewards, uids, lengths), adv_estimator="bpo",
                          config=OmegaConf.create({"bpo_singleton": "one"}))


def test_estimator_modes_checked_and_metrics():
    fn = get_adv_estimator_fn("bpo")
    data = _batch(REWARDS, UIDS, LENGTHS, modes=MODES)
    adv, _ = fn(data.batch["token_level_rewards"], data.batch["response_mask"], data.non_tensor_batch["uid"],
                modes=data.non_tensor_batch["bpo_mode"])
    assert torch.allclose(adv[:, 0], torch.tensor(HAND) / (0.5 + EPS), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="modes"):  # prompt "a" only thinking: not a mixed group
        fn(data.batch["token_level_rewards"], data.batch["response_mask"], data.non_tensor_batch["uid"],
           modes=["think", "think"] * 2 + ["no_think", "think"] * 2)
    with pytest.raises(ValueError, match="bpo_mode"):
        rv.modes_from_field(["thinking"])
    with pytest.raises(ValueError, match="index"):
        fn(data.batch["token_level_rewards"], data.batch["response_mask"], np.array(["a"], dtype=object))
    data.batch["advantages"] = adv
    m = rv.bpo_mode_metrics(data)
    # think: rewards [1, 0, 0, 1], lengths [6, 3, 1, 4]; no_think: rewards [1, 0, 1, 0], lengths [2, 5, 6, 2]
    assert m["bpo/think/reward_mean"] == 0.5 and m["bpo/no_think/reward_mean"] == 0.5
    assert m["bpo/think/response_length"] == 3.5 and m["bpo/no_think/response_length"] == 3.75
    assert m["bpo/think/count"] == 4.0 and "bpo/auto/count" not in m
    assert m["bpo/think/advantage_mean"] == pytest.approx(0.0, abs=1e-6)


def _actor_config(**info):
    return OmegaConf.create({"clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.28, "clip_ratio_c": 3.0,
                             "global_batch_info": info})


def _loss_inputs(seed, B=5, L=7):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, L, generator=g) * 3
    log_ratio = torch.randn(B, L, generator=g) * 0.4
    log_ratio[0, 1], log_ratio[1, 2], log_ratio[2, 0] = 25.0, -30.0, 2.0  # the +-20 clamp, dual clip (A < 0, r = e^2)
    adv = torch.randn(B, 1, generator=g).expand(B, L).clone()
    adv[2] = -1.0
    mask = (torch.rand(B, L, generator=g) < 0.8).float()
    mask[:, 0] = 1
    mask[1, 2] = mask[0, 1] = mask[2, 0] = 1
    mask[4] = 0  # a fully masked sequence: excluded from the sequence means
    is_w = torch.rand(B, L, generator=g) * 2
    return old, old + log_ratio, adv, mask, is_w


AGG_CASES = [
    ("token-mean", {}), ("token-sum", {}), ("seq-mean-token-mean", {}), ("seq-mean-token-sum", {}),
    ("seq-mean-token-sum-norm", {}),
    ("token-mean", {"dp_size": 2, "batch_num_tokens": 40}),
    ("seq-mean-token-mean", {"dp_size": 2, "global_batch_size": 9}),
    ("seq-mean-token-sum-norm", {"global_batch_size": 6, "loss_scale_factor": 11}),
    ("token-sum", {"dp_size": 4}),
]


@pytest.mark.parametrize("use_is", [False, True])
@pytest.mark.parametrize("agg,info", AGG_CASES)
def test_registered_loss_equals_verl_vanilla(agg, info, use_is):
    old, lp, adv, mask, is_w = _loss_inputs(seed=len(agg) + len(info))
    results = []
    for name in ("vanilla", "r4b_bpo"):
        x = lp.clone().requires_grad_(True)
        loss, metrics = get_policy_loss_fn(name)(old_log_prob=old, log_prob=x, advantages=adv, response_mask=mask,
                                                 loss_agg_mode=agg, config=_actor_config(**info),
                                                 rollout_is_weights=is_w if use_is else None)
        loss.backward()
        results.append((loss.detach(), x.grad, metrics))
    (l_v, g_v, m_v), (l_r, g_r, m_r) = results
    assert torch.allclose(l_r, l_v, rtol=1e-6, atol=1e-7), (l_r, l_v)
    assert torch.allclose(g_r, g_v, rtol=1e-6, atol=1e-8)
    assert g_v.abs().sum() > 0 and g_v[0, 1] == 0  # the clamp cuts the gradient at log-ratio 25 in both
    for key in ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"):
        assert m_r[key] == pytest.approx(m_v[key], rel=1e-6, abs=1e-7), key
    assert m_v["actor/pg_clipfrac_lower"] > 0  # the dual clip was exercised


def test_registered_loss_equals_fused_linear_policy_loss():
    g = torch.Generator().manual_seed(3)
    B, L, H, V = 3, 6, 16, 50
    hidden = torch.randn(B, L, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.3
    targets = torch.randint(0, V, (B, L), generator=g)
    mask = torch.ones(B, L)
    mask[1, 4:] = 0
    adv = torch.tensor([1.0, -0.5, 0.7])[:, None].expand(B, L)
    with torch.no_grad():
        old = r4b_fast.fused_linear_logprobs(hidden + 0.05 * torch.randn(B, L, H, generator=g), weight, targets)
    cfg = _actor_config()
    grads = []
    for path in ("logprobs", "fused"):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        if path == "logprobs":  # verl's actor hands the registered loss log-probs
            logp = r4b_fast.fused_linear_logprobs(h, w, targets)
            loss, _ = get_policy_loss_fn("r4b_bpo")(old, logp, adv, mask, "seq-mean-token-mean", cfg)
        else:  # a custom actor with the last hidden states: no [T, V] logits
            loss, _ = rv.fused_policy_loss_for_verl(h, w, targets, adv, mask, old, cfg, "seq-mean-token-mean")
        loss.backward()
        grads.append((loss.detach(), h.grad, w.grad))
    (l1, dh1, dw1), (l2, dh2, dw2) = grads
    assert torch.allclose(l1, l2, rtol=1e-5, atol=1e-7)
    assert torch.allclose(dh1, dh2, rtol=1e-4, atol=1e-6) and torch.allclose(dw1, dw2, rtol=1e-4, atol=1e-6)
    assert dh1.abs().sum() > 0


def test_loss_kwargs_validation():
    with pytest.raises(ValueError, match="loss_agg_mode"):
        rv.verl_policy_loss_kwargs(_actor_config(), "token-max")
    with pytest.raises(ValueError, match="batch_num_tokens"):
        rv.verl_policy_loss_kwargs(_actor_config(dp_size=2), "token-mean")
    with pytest.raises(ValueError, match="config"):
        rv.verl_policy_loss_kwargs(None)
    kw = rv.verl_policy_loss_kwargs({"clip_ratio": 0.1, "clip_ratio_high": 0.3})
    assert (kw["clip_low"], kw["clip_high"], kw["dual_clip"], kw["log_ratio_clamp"]) == (0.1, 0.3, 3.0, 20.0)


def test_external_modules_env_registers_names_in_a_fresh_process():
    code = ("import verl\n"
            "from verl.trainer.ppo.core_algos import get_adv_estimator_fn, get_policy_loss_fn\n"
            "from verl.experimental.agent_loop.agent_loop import _agent_loop_registry\n"
            "print(get_adv_estimator_fn('bpo').__name__, get_policy_loss_fn('r4b_bpo').__name__,\n"
            "      _agent_loop_registry['r4b_bpo_agent']['_target_'])\n")
    env = dict(os.environ, VERL_USE_EXTERNAL_MODULES="r4b_fast.integrations.verl", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["compute_bpo_outcome_advantage", "compute_policy_loss_r4b",
                                  "r4b_fast.integrations.verl.BPOModeAgentLoop"]


class _StubServer:
    """verl's LLM server client, answering every request with the same response tokens."""

    def __init__(self, response_ids):
        self.response_ids = response_ids
        self.prompts = []

    async def generate(self, *, request_id, prompt_ids, sampling_params, **kwargs):
        from verl.workers.rollout.replica import TokenOutput

        self.prompts.append(list(prompt_ids))
        return TokenOutput(token_ids=list(self.response_ids), log_probs=None)


def _agent_loop(n, tok, server, prompt_length=64):
    from verl.experimental.agent_loop.agent_loop import DictConfigWrap, _agent_loop_registry
    from verl.utils.dataset.rl_dataset import RLHFDataset

    assert _agent_loop_registry[rv.AGENT_LOOP]["_target_"] == "r4b_fast.integrations.verl.BPOModeAgentLoop"
    cfg = OmegaConf.create({"actor_rollout_ref": {"rollout": {"n": n, "prompt_length": prompt_length,
                                                              "response_length": 8}}, "data": {}})
    return rv.BPOModeAgentLoop(trainer_config=DictConfigWrap(cfg), server_manager=server, tokenizer=tok,
                               processor=None, dataset_cls=RLHFDataset, data_config=DictConfigWrap(cfg.data))


@pytest.fixture(scope="module")
def chat_tokenizer():
    from r4b_fast.training.task import build_tokenizer

    tok = build_tokenizer()
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tok


def test_agent_loop_forces_half_of_each_uid_into_each_mode(chat_tokenizer):
    tok = chat_tokenizer
    n, prompts = 4, 3
    response = tok.encode("3+4=7", add_special_tokens=False)
    server = _StubServer(response)
    # what the trainer and verl's agent-loop manager do: a uid per row, repeat(n, interleave=True), priority =
    # position in the repeated batch (assigned before the batch is split across workers)
    batch = DataProto.from_dict(non_tensors={
        "uid": np.array([f"u{i}" for i in range(prompts)], dtype=object),
        "raw_prompt": np.array([[{"role": "user", "content": f"q{i}"}] for i in range(prompts)] + [None],
                               dtype=object)[:prompts],
    })
    batch = batch.repeat(n, interleave=True)
    batch.non_tensor_batch["priority"] = np.arange(len(batch), dtype=np.int64)
    chunks = batch.chunk(2)  # two agent-loop workers; each sees a chunk that starts mid-prompt

    async def run_all():  # verl's agent loop binds the running event loop when it is built
        loop = _agent_loop(n, tok, server)
        outs = []
        for chunk in chunks:
            for i in range(len(chunk)):
                kwargs = {k: v[i] for k, v in chunk.non_tensor_batch.items()}
                outs.append((kwargs["uid"], await loop.run({"temperature": 1.0}, **kwargs)))
        return outs

    outs = asyncio.run(run_all())
    prefix = {m: tok.encode(rv.BPOModeAgentLoop.MODE_PREFIX[m], add_special_tokens=False)
              for m in (Mode.THINK, Mode.NO_THINK)}
    assert prefix[Mode.THINK] != prefix[Mode.NO_THINK]
    counts = {}
    for uid, out in outs:
        mode = out.extra_fields["bpo_mode"]
        counts.setdefault(uid, []).append(mode)
        want = prefix[Mode.THINK if mode == "think" else Mode.NO_THINK]
        assert out.prompt_ids[-len(want):] == want  # the forced prefix ends the prompt (not trained on)
        assert out.response_ids == response and out.response_mask == [1] * len(response)
    assert server.prompts == [out.prompt_ids for _, out in outs]  # the engine was asked with the prefix
    assert sorted(counts) == ["u0", "u1", "u2"]
    for modes in counts.values():
        assert modes.count("think") == n // 2 and modes.count("no_think") == n // 2


def test_agent_loop_row_request_and_validation(chat_tokenizer):
    tok = chat_tokenizer
    msgs = [{"role": "user", "content": "q"}]

    async def run(n, prompt_length=64, **kwargs):  # verl's agent loop binds the running event loop when it is built
        return await _agent_loop(n, tok, _StubServer([5]), prompt_length).run({}, priority=0, raw_prompt=msgs,
                                                                              **kwargs)

    assert asyncio.run(run(4)).extra_fields["bpo_mode"] == "think"  # replica 0 of 4
    assert asyncio.run(run(4, bpo_mode="no_think")).extra_fields["bpo_mode"] == "no_think"  # the row's request
    with pytest.raises(ValueError, match="rollout.n"):
        asyncio.run(run(3))
    fits = len(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False))
    assert asyncio.run(run(4, prompt_length=fits + 2)).prompt_ids[-2:] == tok.encode("<think>\n")  # 2 tokens
    with pytest.raises(ValueError, match="prompt_length"):  # the prompt fits, the prompt + prefix does not
        asyncio.run(run(4, prompt_length=fits + 1))
    assert [rv.bpo_mode_for_sample(p, 6) for p in range(12)] == ([Mode.THINK] * 3 + [Mode.NO_THINK] * 3) * 2
    import pandas as pd

    df = rv.add_bpo_agent_column(pd.DataFrame({"prompt": ["a", "b"]}))
    assert df["agent_name"].tolist() == ["r4b_bpo_agent"] * 2
    with pytest.raises(TypeError, match="frame"):
        rv.add_bpo_agent_column([1, 2])


def test_docstring_examples_run():
    import doctest

    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in finder.find(rv, globs={"np": np, "torch": torch, **vars(rv)}) if t.examples]
    assert len(tests) >= 6
    for t in tests:
        runner.run(t)
    assert runner.summarize(verbose=False).failed == 0
