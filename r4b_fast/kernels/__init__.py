"""Triton kernels (``@triton.jit`` + launch helpers, no autograd). Imported lazily by r4b_fast's ops, so that
``TRITON_INTERPRET=1`` may still be set after ``import r4b_fast`` and before the first Triton call."""
