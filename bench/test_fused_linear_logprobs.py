"""Fused LM-head log-probs / entropy / policy loss: eager (materialised logits) vs r4b_fast's backends vs
liger-kernel's ``LigerFusedLinearGRPOLoss``, against two limits measured in the same test: the bare (unchunked)
LM-head matmul, and the GEMMs no design can avoid, chunked as ours are (per token chunk: logits, dHidden, dWeight for
forward+backward; logits alone for the forward).

The work is the same for every row: an on-policy GRPO token-mean loss with an entropy bonus,
``mean_t(-A_t * exp(logp_t - sg(logp_t)) - 0.01 * entropy_t)``, its value (forward, under no_grad: scoring) or its
gradients in hidden and weight (forward+backward). ``r4b_fast policy_loss`` is ``fused_linear_policy_loss`` (gradients
formed in the forward: 3 GEMMs); ``r4b_fast logprobs`` builds the loss from ``fused_linear_logprobs``' per-token outputs
(its backward recomputes the logits: 4 GEMMs). liger computes its own GRPO loss (no entropy term) on ``[B, 256, H]``.

Shapes: CPU fp32 T=2048 H=512 V=65536 (the #10 target shape) and T=512 H=256 V=151936; GPU bf16 T=8192 H=4096
V=151936 (R-4B's LM head). extra_info: ``ratio_to_gemms`` (time / the chunked GEMMs' time), ``ratio_to_matmul``,
``peak_memory_bytes`` and ``peak_memory_ratio_to_eager``. On CPU the peak is replayed from the profiler's self
allocation events, which cannot see frees made by Python code inside a custom op: r4b_fast's torch rows are measured
on the chunk loop called directly.
"""

from __future__ import annotations

import functools
import importlib.util
import time

import pytest
import torch
from harness import DEVICE, QUICK, peak_memory_bytes, run, sync

import r4b_fast.ops.fused_linear_logprobs as flp
from r4b_fast.backends import not_supported_reasons

if DEVICE == "cuda":
    SHAPES, DTYPE = [(8192, 4096, 151936)], torch.bfloat16
else:
    SHAPES, DTYPE = ([(256, 128, 8192)] if QUICK else [(2048, 512, 65536), (512, 256, 151936)]), torch.float32
PASSES = ["forward", "forward+backward"]
SEQ_LEN = 256  # liger chunks over sequences: [T / SEQ_LEN, SEQ_LEN, H]
ENTROPY_COEF = 0.01


@functools.cache
def _inputs(T, H, V):
    gen = torch.Generator().manual_seed(T + H + V)
    h = torch.randn(T, H, generator=gen).to(DTYPE)
    w = (torch.randn(V, H, generator=gen) / H**0.5).to(DTYPE)
    y = torch.randint(0, V, (T,), generator=gen)
    adv = torch.randn(T // SEQ_LEN, generator=gen)
    return tuple(t.to(DEVICE) for t in (h, w, y, adv))


def _loss_from(lp, en, adv):
    a = adv.repeat_interleave(SEQ_LEN)
    return (-a * torch.exp(lp - lp.detach()) - ENTROPY_COEF * en).mean()


def _eager(h, w, y, adv):
    logsm = torch.log_softmax((h @ w.T).float(), -1)
    lp = logsm.gather(1, y[:, None]).squeeze(1)
    return _loss_from(lp, -(logsm.exp() * logsm).sum(-1), adv)


def _policy_loss(backend):
    def fn(h, w, y, adv):
        B = adv.shape[0]
        mask = torch.ones(B, SEQ_LEN, dtype=torch.bool, device=h.device)
        return flp.fused_linear_policy_loss(h.view(B, SEQ_LEN, -1), w, y.view(B, SEQ_LEN), adv, mask,
                                            entropy_coef=ENTROPY_COEF, backend=backend)[0]
    return fn


def _logprobs(backend):
    def fn(h, w, y, adv):
        lp, en = flp.fused_linear_logprobs(h, w, y, return_entropy=True, backend=backend)
        return _loss_from(lp, en, adv)
    return fn


def _liger():
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    loss_fn = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, compiled=DEVICE == "cuda", loss_type="dapo")

    def fn(h, w, y, adv):
        B = adv.shape[0]
        mask = torch.ones(B, SEQ_LEN, device=h.device)
        return loss_fn(h.view(B, SEQ_LEN, -1), w, y.view(B, SEQ_LEN), mask, adv)[0]
    return fn


def _gemms(T, H, V, pass_):
    """The GEMMs every design needs, chunked as r4b_fast's: per chunk z = h W^T (+ dH = z W, dW += z^T h)."""
    h, w, y, _ = _inputs(T, H, V)
    ct = flp._Head(h, w, None, y, None, -100, "torch").chunk_rows()  # the chunk r4b_fast uses
    dh, dw = torch.empty_like(h), torch.empty_like(w)

    def fn():
        for t0 in range(0, T, ct):
            z = h[t0:t0 + ct] @ w.T
            if pass_ != "forward":
                torch.mm(z, w, out=dh[t0:t0 + ct])
                if t0 == 0:
                    torch.mm(z.T, h[t0:t0 + ct], out=dw)
                else:
                    dw.addmm_(z.T, h[t0:t0 + ct])
    return fn


def _matmul(T, H, V, pass_):
    h, w, _, _ = _inputs(T, H, V)
    if pass_ == "forward":
        return lambda: h @ w.T
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    g = torch.randn(T, V, device=DEVICE, dtype=DTYPE)  # the logits' upstream gradient: outside the timed region
    return lambda: torch.autograd.grad(hh @ ww.T, (hh, ww), g)


def _make(loss_fn, T, H, V, pass_):
    h, w, y, adv = _inputs(T, H, V)
    if pass_ == "forward":
        def fwd():
            with torch.no_grad():
                return loss_fn(h, w, y, adv)
        return fwd
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    return lambda: torch.autograd.grad(loss_fn(hh, ww, y, adv), (hh, ww))


def _torch_chunk_loop(T, H, V, pass_, per_token):
    """r4b_fast's torch rows called below the custom op, for the CPU peak (see the module docstring)."""
    h, w, y, adv = _inputs(T, H, V)
    head = flp._Head(h, w, None, y, torch.ones(T, device=DEVICE), -100, "torch")
    gl = -adv.repeat_interleave(SEQ_LEN) / T
    gh = torch.full((T,), -ENTROPY_COEF / T, device=DEVICE)

    def fn():
        if pass_ == "forward":
            flp._lm_head_forward(head, True)
        elif per_token:
            _, en, lse = flp._lm_head_forward(head, True)
            flp._lm_head_backward(head, lse, en, gl, gh, flp._Grads.empty(head, True, True, False))
        else:
            grads = flp._Grads.empty(head, True, True, False)
            flp._lm_head_forward(head, True, lambda t0, t1, lp, en: (gl[t0:t1], gh[t0:t1]), grads)
    return fn


def _best_time(fn, reps=3):
    fn()
    sync()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


@functools.cache
def _limit_times(T, H, V, pass_):
    return _best_time(_gemms(T, H, V, pass_)), _best_time(_matmul(T, H, V, pass_))


@functools.cache
def _eager_peak(T, H, V, pass_):
    return peak_memory_bytes(_make(_eager, T, H, V, pass_))


def _bench(benchmark, fn, T, H, V, pass_, *, impl, baseline=False, peak_fn=None):
    benchmark.group = f"fused LM-head GRPO loss T={T} H={H} V={V} {str(DTYPE).split('.')[-1]} {pass_}"
    run(benchmark, fn, impl=impl, baseline=baseline, budget_s=3.0, memory=DEVICE == "cuda")
    if DEVICE != "cuda":
        benchmark.extra_info["peak_memory_bytes"] = peak_memory_bytes(peak_fn or fn)
    mean = benchmark.stats.stats.mean
    gemms, mm = _limit_times(T, H, V, pass_)
    benchmark.extra_info.update(T=T, H=H, V=V, dtype=str(DTYPE), gemms_s=gemms, matmul_s=mm,
                                ratio_to_gemms=mean / gemms, ratio_to_matmul=mean / mm)
    peak = benchmark.extra_info.get("peak_memory_bytes")
    if peak is not None:
        benchmark.extra_info["peak_memory_ratio_to_eager"] = peak / _eager_peak(T, H, V, pass_)


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("T,H,V", SHAPES)
def test_eager(benchmark, T, H, V, pass_):
    _bench(benchmark, _make(_eager, T, H, V, pass_), T, H, V, pass_, impl="eager (materialised logits)",
           baseline=True)


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("T,H,V", SHAPES)
def test_limits(benchmark, T, H, V, pass_):
    _bench(benchmark, _gemms(T, H, V, pass_), T, H, V, pass_, impl="chunked GEMMs (the floor)")


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("T,H,V", SHAPES)
def test_bare_matmul(benchmark, T, H, V, pass_):
    _bench(benchmark, _matmul(T, H, V, pass_), T, H, V, pass_, impl="bare LM-head matmul, unchunked")


@pytest.mark.parametrize("op", ["policy_loss", "logprobs"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("T,H,V", SHAPES)
def test_r4b_fast(benchmark, T, H, V, pass_, backend, op):
    reasons = not_supported_reasons(backend, DEVICE, flp.OP_BACKENDS)
    if reasons:
        pytest.skip("; ".join(reasons))
    if backend == "triton" and DEVICE == "cpu":
        pytest.skip("the Triton interpreter takes far too long at these shapes on CPU; run on a GPU")
    if op == "logprobs" and pass_ == "forward":
        pytest.skip("same forward as policy_loss")
    loss_fn = _policy_loss(backend) if op == "policy_loss" else _logprobs(backend)
    peak_fn = _torch_chunk_loop(T, H, V, pass_, op == "logprobs") if backend == "torch" else None
    _bench(benchmark, _make(loss_fn, T, H, V, pass_), T, H, V, pass_, impl=f"r4b_fast {op} ({backend})",
           peak_fn=peak_fn)


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("T,H,V", SHAPES)
def test_liger(benchmark, T, H, V, pass_):
    if importlib.util.find_spec("liger_kernel") is None:
        pytest.skip("liger-kernel is not installed (pip install --no-deps liger-kernel: its chunked losses are torch)")
    _bench(benchmark, _make(_liger(), T, H, V, pass_), T, H, V, pass_,
           impl=f"liger LigerFusedLinearGRPOLoss (compiled={DEVICE == 'cuda'})")
