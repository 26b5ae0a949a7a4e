"""Test harness: without a GPU, Triton kernels run under the interpreter on CPU tensors.

TRITON_INTERPRET must be set before any @triton.jit kernel is defined, hence here, before r4b_fast's kernels are
imported (they are imported lazily on first use).
"""

import os

import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.pop("R4B_FAST_BACKEND", None)  # tests choose backends explicitly

import pytest  # noqa: E402

DEVICE = "cuda" if HAS_GPU else "cpu"


def kernel_backends() -> list:
    """Backends to check against the reference: each with a skip reason where it cannot run here."""
    from r4b_fast.backends import not_supported_reasons

    params = []
    for backend in ("torch", "triton", "cuda"):
        device = "cpu" if backend == "torch" else DEVICE
        reasons = not_supported_reasons(backend, device)
        marks = [pytest.mark.skip(reason="; ".join(reasons))] if reasons else []
        params.append(pytest.param((backend, device), id=backend, marks=marks))
    return params
