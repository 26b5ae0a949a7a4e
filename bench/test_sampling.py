"""sample_with_modes vs the engines' pattern (sort-based top-k/top-p + torch.multinomial + a host-side Python loop
per row for forced tokens and the thinking budget), and the bi-mode rollout engine on a tiny Qwen3.

Sampling setup: a BPO batch (half thinking, half non-thinking rows, budget 64), V = 151936 (Qwen3's vocabulary), two
kinds of logits: "peaked" (``randn * 4``, like an LLM's; T = 0.7, top_k = 50, top_p = 0.9) and "flat" (``randn``;
T = 0.8, top_p = 0.9, no top-k: the nucleus holds most of the vocabulary, the worst case of a sort-free sampler). One
call = one decoding step; "strict modes" rows sample with min_think_tokens and no_reopen (banned ids in the
kernels). On CPU: torch vs the sort baseline (the Triton interpreter's timing means nothing); on a GPU
also the triton and cuda kernels, up to B = 512.
"""

import pytest
import torch
from harness import DEVICE, QUICK, run

import r4b_fast
from r4b_fast import Mode
from r4b_fast.ops.sampling import ModeProcessorRef, ModeState, sample_with_modes

V = 4096 if QUICK else 151936
BATCHES = [1, 8] if QUICK else [1, 64, 512]
OPEN, NO_THINK, CLOSE = [151667, 198], [151667, 271, 151668, 271], [198, 151668, 271]  # Qwen3's ids (bench only)
if QUICK:
    OPEN, NO_THINK, CLOSE = [4000, 198], [4000, 271, 4001, 271], [198, 4001, 271]
EOS, PAD = 151645 if not QUICK else 4002, 0
KW = {"peaked": dict(temperature=0.7, top_k=50, top_p=0.9), "flat": dict(temperature=0.8, top_k=0, top_p=0.9)}
SCALE = {"peaked": 4.0, "flat": 1.0}
# (logits kind, B): flat rows at B = 64 on CPU (the sort baseline takes seconds per call beyond that), all on GPU
CASES = [("peaked", B) for B in BATCHES] + [("flat", B) for B in ([8] if QUICK else [64] if DEVICE == "cpu" else
                                                                    [64, 512])]
BUDGET_S = 0.5 if QUICK else 3.0


def _modes(B):
    return [Mode.THINK if i % 2 == 0 else Mode.NO_THINK for i in range(B)]


def hf_style_step(logits, proc, temperature, top_k, top_p, generator):
    """The transformers/vLLM pattern: logits processors (temperature, top-k, sort-based top-p), softmax,
    multinomial, log-probs, then the Python mode/budget processor over the rows (a host round trip)."""
    x = logits.float() / temperature
    logprobs_all = torch.log_softmax(x, -1)
    if top_k:
        kth = torch.topk(x, top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, -float("inf"))
    sorted_x, sorted_idx = torch.sort(x, descending=True, dim=-1)
    cum = sorted_x.softmax(-1).cumsum(-1)
    remove_sorted = cum > top_p
    remove_sorted[:, 1:] = remove_sorted[:, :-1].clone()
    remove_sorted[:, 0] = False
    remove = remove_sorted.scatter(1, sorted_idx, remove_sorted)
    x = x.masked_fill(remove, -float("inf"))
    sampled = torch.multinomial(x.softmax(-1), 1, generator=generator)[:, 0]
    tokens = torch.tensor(proc.step(sampled.tolist()), device=logits.device)
    return tokens, logprobs_all.gather(1, tokens[:, None])[:, 0]


def _logits(B, kind="peaked"):
    gen = torch.Generator(device=DEVICE).manual_seed(B)
    return torch.randn(B, V, generator=gen, device=DEVICE) * SCALE[kind]


def _proc(B):
    return ModeProcessorRef(_modes(B), OPEN, NO_THINK, CLOSE, budget=64, eos_id=EOS, pad_id=PAD)


def _state(B, strict=False):
    """strict: min_think_tokens=16 and no_reopen, every step samples with banned ids (the kernels' banned variant)."""
    extra = dict(min_think_tokens=16, no_reopen=True) if strict else {}
    return ModeState.create(torch.tensor(_modes(B), device=DEVICE), OPEN, NO_THINK, CLOSE, budget=64, eos_id=EOS,
                            pad_id=PAD, **extra)  # fmt: skip


def _group(kind, B):
    return f"sample_with_modes B={B} V={V}" + ("" if kind == "peaked" else " flat logits (T=0.8, top_p=0.9)")


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-B{c[1]}")
def test_reference(benchmark, case):
    kind, B = case
    benchmark.group = _group(kind, B)
    logits, gen = _logits(B, kind), torch.Generator(device=DEVICE).manual_seed(0)
    proc, kw = _proc(B), KW[kind]
    run(benchmark, lambda: hf_style_step(logits, proc, kw["temperature"], kw["top_k"], kw["top_p"], gen),
        impl="sort + multinomial + Python mode loop", baseline=True, memory=B <= 64 or DEVICE == "cuda",
        budget_s=BUDGET_S, B=B, V=V, logits=kind)  # fmt: skip


@pytest.mark.parametrize("strict", [False, True], ids=["plain", "strict"])
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-B{c[1]}")
def test_r4b_fast(benchmark, case, backend, strict):
    kind, B = case
    reasons = r4b_fast.not_supported_reasons(backend, DEVICE)
    if reasons:
        pytest.skip("; ".join(reasons))
    if backend == "triton" and DEVICE == "cpu":
        pytest.skip("the Triton interpreter runs a bisection loop per row over V: its CPU timing means nothing")
    benchmark.group = _group(kind, B)
    logits, gen = _logits(B, kind), torch.Generator(device=DEVICE).manual_seed(0)
    state = _state(B, strict)
    run(benchmark, lambda: sample_with_modes(logits, state, generator=gen, backend=backend, **KW[kind]),
        impl=backend + (" strict modes" if strict else ""), memory=B <= 64 or DEVICE == "cuda", budget_s=BUDGET_S,
        B=B, V=V, logits=kind)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Rollout engine on a tiny Qwen3
# ---------------------------------------------------------------------------------------------------------------
# (vocabulary, prompts, g, new tokens): a tiny vocabulary (the forward dominates) and a 32k one (sampling shows)
ROLLOUTS = [(512, 1, 1, 4)] if QUICK else [(512, 8, 4, 48), (32768, 4, 2, 32)]
T_OPEN, T_NO, T_CLOSE, T_EOS, T_PAD = [500, 501], [500, 502, 503, 502], [501, 503, 502], 510, 511


def _tiny_model(vocab):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      max_position_embeddings=512)  # fmt: skip
    return Qwen3ForCausalLM(cfg).eval().to(DEVICE)


def _prompts(n_prompts):
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, 400, (int(n),), generator=gen).tolist()
            for n in torch.randint(8, 24, (n_prompts,), generator=gen)]  # fmt: skip


@torch.inference_mode()
def reference_rollouts(model, prompts, modes, generator, max_new):
    """The same left-padded KV-cache loop, stepping with hf_style_step (sort + multinomial + Python mode loop)."""
    from r4b_fast.training.rollout import _cache_kwarg, _new_cache

    rows = [p for p, ms in enumerate(modes) for _ in ms]
    flat = [m for ms in modes for m in ms]
    L = max(len(p) for p in prompts)
    ids = torch.tensor([[T_PAD] * (L - len(prompts[p])) + prompts[p] for p in rows], device=DEVICE)
    attn = torch.tensor([[0] * (L - len(prompts[p])) + [1] * len(prompts[p]) for p in rows], device=DEVICE)
    pos = (attn.cumsum(1) - 1).clamp_min(0)
    ckw = {_cache_kwarg(model): _new_cache(model)}
    proc = ModeProcessorRef(flat, T_OPEN, T_NO, T_CLOSE, budget=32, eos_id=T_EOS, pad_id=T_PAD)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, **ckw).logits[:, -1]
    nxt, out = pos[:, -1] + 1, []
    for _ in range(max_new):
        tok, _lp = hf_style_step(logits, proc, 1.0, 50, 0.95, generator)
        out.append(tok)
        if all(proc.finished):
            break
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], 1)
        logits = model(input_ids=tok[:, None], attention_mask=attn, position_ids=nxt[:, None], use_cache=True,
                       **ckw).logits[:, -1]  # fmt: skip
        nxt = nxt + 1
    return torch.stack(out, 1)


def _ours(model, prompts, modes, generator, max_new):
    from r4b_fast.training.rollout import generate_rollouts

    return generate_rollouts(model, prompts, modes, think_open_ids=T_OPEN, no_think_ids=T_NO, think_close_ids=T_CLOSE,
                             eos_id=T_EOS, pad_id=T_PAD, max_new_tokens=max_new, budget=32, temperature=1.0, top_k=50,
                             top_p=0.95, generator=generator)  # fmt: skip


@pytest.mark.parametrize("impl", ["reference", "r4b_fast"])
@pytest.mark.parametrize("config", ROLLOUTS, ids=lambda c: f"V{c[0]}")
def test_rollout(benchmark, impl, config):
    from r4b_fast.training.rollout import bpo_modes

    vocab, n_prompts, g, max_new = config
    benchmark.group = f"rollout tiny Qwen3 V={vocab}: {n_prompts} prompts x {2 * g} modes, {max_new} new tokens"
    model, prompts, modes = _tiny_model(vocab), _prompts(n_prompts), [bpo_modes(g)] * n_prompts
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    if impl == "reference":
        fn = lambda: reference_rollouts(model, prompts, modes, gen, max_new)  # noqa: E731
        tokens = lambda out: int((out != T_PAD).sum())  # noqa: E731
    else:
        fn = lambda: _ours(model, prompts, modes, gen, max_new)  # noqa: E731
        tokens = lambda out: int(out.completion_mask.sum())  # noqa: E731
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model's ops are too small for intra-op threads (they only add barriers)
    try:
        n_tokens = tokens(fn())
        _run_rollout(benchmark, fn, impl, vocab, n_prompts, g, n_tokens)
    finally:
        torch.set_num_threads(threads)
    benchmark.extra_info["tokens_per_s"] = n_tokens / benchmark.stats.stats.mean


def _run_rollout(benchmark, fn, impl, vocab, n_prompts, g, n_tokens):
    run(benchmark, fn, impl=impl if impl == "r4b_fast" else "sort + multinomial + Python mode loop",
        baseline=impl == "reference", memory=False, budget_s=BUDGET_S, rollouts=n_prompts * 2 * g, tokens=n_tokens,
        vocab=vocab, torch_threads=1)
