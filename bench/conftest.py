"""Benchmark harness setup: without a GPU, Triton kernels run interpreted on CPU tensors (marked as such in
extra_info; those timings say nothing about GPU speed). TRITON_INTERPRET is set before any kernel is defined."""

import os

# Not set here: THP_MEM_ALLOC_ENABLE=1 (PyTorch's allocator backing large CPU tensors with transparent huge pages).
# It removes the page faults of fresh 100+ MiB outputs (a 160 MiB clone: 96 ms -> 24 ms on the dev VM; a copy into a
# preallocated buffer is 21 ms), but it is not neutral: it makes the fused loss's repeated chunk allocations slower
# (1.16 s -> 1.40 s) and eager's big logits faster (1.45 s -> 1.00 s) at T=1024 V=32000 fwd+bwd. Runs with it are
# saved separately (bench/results/cpu-pack-thp.*).
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.pop("R4B_FAST_BACKEND", None)
