"""fused_linear_logprobs: eager (materialised logits) vs r4b_fast's backends vs liger-kernel, against the bare LM-head
matmul as the limit. Groups per shape and pass (forward; forward+backward), log-probs and entropy both computed.

extra_info: ``ratio_to_matmul`` = this implementation's time / the bare matmul's time for the same pass (measured in
the same test, best of a few runs); ``peak_memory_bytes`` and ``peak_memory_ratio_to_eager``.

On CPU the peak is replayed from the profiler's self allocation events (harness.peak_memory_bytes), which cannot see
frees made by Python code inside a custom op: the torch backend's peak is measured on its backend functions called
directly, outside the custom op.
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

SHAPES = [(256, 128, 8192)] if QUICK else [(1024, 512, 32000), (512, 256, 151936)]
PASSES = ["forward", "forward+backward"]


@functools.cache
def _inputs(T, H, V, dtype=torch.float32):
    gen = torch.Generator().manual_seed(T + H + V)
    h = torch.randn(T, H, generator=gen).to(dtype)
    w = (torch.randn(V, H, generator=gen) / H**0.5).to(dtype)
    y = torch.randint(0, V, (T,), generator=gen)
    g_lp, g_en = torch.randn(T, generator=gen), torch.randn(T, generator=gen)
    return tuple(t.to(DEVICE) for t in (h, w, y, g_lp, g_en))


def _eager(h, w, y):
    logsm = torch.log_softmax((h @ w.T).float(), -1)
    return logsm.gather(1, y[:, None]).squeeze(1), -(logsm.exp() * logsm).sum(-1)


def _make(impl, T, H, V, pass_):
    h, w, y, g_lp, g_en = _inputs(T, H, V)
    if impl == "matmul":
        if pass_ == "forward":
            return lambda: h @ w.T
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        g = torch.randn(T, V, device=DEVICE)  # the upstream grad of the logits: outside the timed region

        def mm_fb():
            torch.autograd.grad(hh @ ww.T, (hh, ww), g)

        return mm_fb
    if impl == "eager":
        fn = _eager
    else:
        fn = lambda a, b, c: flp.fused_linear_logprobs(a, b, c, return_entropy=True, backend=impl)  # noqa: E731
    if pass_ == "forward":
        def fwd():
            with torch.no_grad():
                return fn(h, w, y)

        return fwd
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()

    def fwd_bwd():
        lp, en = fn(hh, ww, y)
        torch.autograd.grad((lp * g_lp + en * g_en).sum(), (hh, ww))

    return fwd_bwd


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
def _matmul_time(T, H, V, pass_):
    return _best_time(_make("matmul", T, H, V, pass_))


def _run(benchmark, fn, *, impl, baseline=False, peak_fn=None):
    run(benchmark, fn, impl=impl, baseline=baseline, budget_s=3.0, memory=DEVICE == "cuda")
    if DEVICE != "cuda":
        benchmark.extra_info["peak_memory_bytes"] = peak_memory_bytes(peak_fn or fn)


@functools.cache
def _eager_peak(T, H, V, pass_):
    return peak_memory_bytes(_make("eager", T, H, V, pass_))


def _unwrapped_torch_backend(T, H, V, pass_):
    h, w, y, g_lp, g_en = _inputs(T, H, V)
    temp = torch.ones(T, device=DEVICE)

    def fn():
        lp, en, lse = flp._flp_forward_torch(h, w, None, y, temp, -100, True)
        if pass_ != "forward":
            flp._flp_backward_torch(g_lp, g_en, h, w, None, y, temp, lse, en, -100)

    return fn


def _finish(benchmark, T, H, V, pass_):
    mean = benchmark.stats.stats.mean
    mm = _matmul_time(T, H, V, pass_)
    benchmark.extra_info.update(T=T, H=H, V=V, matmul_s=mm, ratio_to_matmul=mean / mm)
    peak = benchmark.extra_info.get("peak_memory_bytes")
    if peak is not None:
        benchmark.extra_info["peak_memory_ratio_to_eager"] = peak / _eager_peak(T, H, V, pass_)


def _group(T, H, V, pass_):
    return f"fused_linear_logprobs T={T} H={H} V={V} {pass_}"


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("T,H,V", SHAPES)
def test_eager(benchmark, T, H, V, pass_):
    benchmark.group = _group(T, H, V, pass_)
    _run(benchmark, _make("eager", T, H, V, pass_), impl="eager (materialised logits)", baseline=True)
    _finish(benchmark, T, H, V, pass_)


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("T,H,V", SHAPES)
def test_bare_matmul(benchmark, T, H, V, pass_):
    benchmark.group = _group(T, H, V, pass_)
    _run(benchmark, _make("matmul", T, H, V, pass_), impl="bare LM-head matmul (limit)")
    _finish(benchmark, T, H, V, pass_)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("T,H,V", SHAPES)
def test_r4b_fast(benchmark, T, H, V, pass_, backend):
    reasons = not_supported_reasons(backend, DEVICE, flp.OP_BACKENDS)
    if reasons:
        pytest.skip("; ".join(reasons))
    if backend == "triton" and DEVICE == "cpu":
        pytest.skip("the Triton interpreter takes far too long at these shapes on CPU; run on a GPU")
    benchmark.group = _group(T, H, V, pass_)
    fn = _make(backend, T, H, V, pass_)
    _run(benchmark, fn, impl=backend, peak_fn=_unwrapped_torch_backend(T, H, V, pass_) if backend == "torch" else None)
    _finish(benchmark, T, H, V, pass_)


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("T,H,V", SHAPES)
def test_liger(benchmark, T, H, V, pass_):
    if importlib.util.find_spec("liger_kernel") is None:
        pytest.skip("liger-kernel is not installed (its LigerFusedLinearGRPOLoss is the peer to compare with)")
    if DEVICE != "cuda":
        pytest.skip("liger-kernel's fused linear losses are Triton kernels that need a GPU")
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    benchmark.group = _group(T, H, V, pass_)
    h, w, y, _, _ = _inputs(T, H, V)
    loss_fn = LigerFusedLinearGRPOLoss()
    adv = torch.randn(1, device=DEVICE)
    mask = torch.ones(1, T, device=DEVICE)
    if pass_ == "forward":
        def fn():
            with torch.no_grad():
                loss_fn(h[None], w, y[None], mask, adv)
    else:
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()

        def fn():
            loss = loss_fn(hh[None], ww, y[None], mask, adv)[0]
            torch.autograd.grad(loss, (hh, ww))

    _run(benchmark, fn, impl="liger LigerFusedLinearGRPOLoss (loss, not per-token logprobs)")
    _finish(benchmark, T, H, V, pass_)
