"""Benchmark harness setup: without a GPU, Triton kernels run interpreted on CPU tensors (marked as such in
extra_info; those timings say nothing about GPU speed). TRITON_INTERPRET is set before any kernel is defined."""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.pop("R4B_FAST_BACKEND", None)
