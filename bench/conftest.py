"""Benchmark harness setup: without a GPU, Triton kernels run interpreted on CPU tensors (marked as such in
extra_info; those timings say nothing about GPU speed). TRITON_INTERPRET is set before any kernel is defined."""

import os

# CPU: let PyTorch's allocator back large tensors with transparent huge pages. Without it every fresh output of
# 100+ MiB pays ~4x its copy time in 4 KiB page faults on this kind of VM (measured: a 160 MiB clone 96 ms, a copy
# into a preallocated buffer 21 ms; with this setting 24 ms), which would time the kernel's allocator, not the op.
# Read lazily at the first large allocation, so it applies to every implementation alike; export
# THP_MEM_ALLOC_ENABLE=0 to measure without it.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.pop("R4B_FAST_BACKEND", None)
