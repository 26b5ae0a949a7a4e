"""Shared benchmark helpers: device choice, peak-memory measurement and a uniform ``extra_info``."""

from __future__ import annotations

import os
import time

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
QUICK = os.environ.get("R4B_BENCH_QUICK", "0") not in ("", "0")  # CI: small shapes only


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def peak_memory_bytes(fn) -> int:
    """Peak memory allocated by one call of ``fn`` beyond what was allocated before it.

    CUDA: the caching allocator's peak. CPU: replayed in time order from the profiler's *self* allocation events
    (each op's own allocations and frees, ``[memory]`` events for frees outside any op). Resolution is one op: a
    temporary allocated and freed inside a single op, or by Python code inside a custom op, is not seen, so measure
    a custom op's peak on its backend functions called directly.
    """
    if DEVICE == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        sync()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    current = peak = 0
    for e in sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start):
        current += e.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


def run(benchmark, fn, *, impl: str, baseline: bool = False, budget_s: float = 1.0, memory: bool = True, **extra):
    """Benchmark ``fn`` as implementation ``impl``; rounds fit ``budget_s``; peak memory goes in extra_info
    (``memory=False`` skips it: profiling a Python loop of 10^5 tiny ops takes minutes on CPU)."""
    fn()  # warm-up: compilation, caches
    sync()
    start = time.perf_counter()
    fn()
    sync()
    once = max(time.perf_counter() - start, 1e-7)
    benchmark.extra_info.update(
        impl=impl,
        baseline=baseline,
        device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
        interpreted=impl.startswith("triton") and DEVICE == "cpu",
        peak_memory_bytes=peak_memory_bytes(fn) if memory else None,
        **extra,
    )

    def call():
        fn()
        sync()

    rounds = int(min(200, max(3, budget_s / once)))
    benchmark.pedantic(call, rounds=rounds, warmup_rounds=0, iterations=1)
