"""Triton epilogues of the fused LM head: one program per row of a ``[rows, V]`` logit chunk that a GEMM (cuBLAS,
``torch.mm``) has just written. The GEMMs stay GEMMs (tensor-core speed, wgmma on sm_90); these kernels fuse
everything between them into one read (statistics) and one read + write (gradient) of the chunk, with no atomics.

- ``_logit_stats_kernel``: per row, ``x = z * inv_temp`` in fp32, an online log-sum-exp over ``BLOCK_V`` slices (per
  slice: max, then ``s = sum exp(x - m)`` and ``u = sum exp(x - m) * (x - m)`` rescaled when ``m`` grows), the
  target's logit read directly. Writes ``lse = m + log s``, ``logp = x[y] - lse`` and ``entropy = log s - u / s``
  (0 for rows whose target is ``ignore_index``).
- ``_logit_grad_kernel``: overwrites the chunk in place with ``d loss / d z`` in z's dtype (as eager autograd holds the
  logits' gradient): ``dz = inv_temp * (p * (a0 + a1 * log p) + gl * onehot(y))``, ``log p = x - lse``, with per-row
  coefficients from the host (``a0 = -(gl + gh * entropy)``, ``a1 = -gh`` for ``gl = d loss / d logp``, ``gh = d loss /
  d entropy``); ``A1 = False`` drops the entropy term (one FMA less per element).

Offsets are int64 (``row * stride`` exceeds 2^31 for a few thousand rows of a 150k vocabulary). The launchers run under
``device_guard`` so a chunk on ``cuda:1`` launches there. ``aot_scenarios`` calls the launchers on meta tensors at
R-4B-sized shapes for the ahead-of-time compile check (``python -m r4b_fast.compile_check``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from r4b_fast.backends import device_guard

# a tl.constexpr instance: Triton's compiler rejects plain (and, in 3.9, annotated) globals in @jit code.
# Finite start for the running max: exp(NEG_BIG - m) = 0 and 0 * (NEG_BIG - m) stays 0.
NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def _logit_stats_kernel(
    z_ptr, stride_z, inv_temp_ptr, y_ptr, logp_ptr, ent_ptr, lse_ptr,
    V, ignore_index,
    WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * stride_z
    inv_temp = tl.load(inv_temp_ptr + row)
    y = tl.load(y_ptr + row)
    cols = tl.arange(0, BLOCK_V)
    m = tl.full([], NEG_BIG, tl.float32)
    s = tl.zeros([], tl.float32)
    u = tl.zeros([], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        ok = v0 + cols < V
        x = tl.load(base + v0 + cols, mask=ok, other=0.0).to(tl.float32) * inv_temp
        x = tl.where(ok, x, NEG_BIG)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        d = x - m_new
        e = tl.where(ok, tl.exp(d), 0.0)
        delta = m - m_new  # <= 0
        scale = tl.exp(delta)
        if WITH_ENTROPY:  # sum e * (x - m_old) moved to the new max: + delta * s_old
            u = scale * (u + delta * s) + tl.sum(e * d, axis=0)
        s = scale * s + tl.sum(e, axis=0)
        m = m_new
    log_s = tl.log(s)
    lse = m + log_s
    valid = y != ignore_index
    y_safe = tl.where(valid & (y >= 0) & (y < V), y, 0)
    xy = tl.load(base + y_safe).to(tl.float32) * inv_temp
    tl.store(logp_ptr + row, tl.where(valid, xy - lse, 0.0))
    tl.store(lse_ptr + row, lse)
    if WITH_ENTROPY:
        tl.store(ent_ptr + row, tl.where(valid, log_s - u / s, 0.0))


@triton.jit
def _logit_grad_kernel(
    z_ptr, stride_z, inv_temp_ptr, y_ptr, lse_ptr, gl_ptr, a0_ptr, a1_ptr,
    V,
    A1: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * stride_z
    inv_temp = tl.load(inv_temp_ptr + row)
    y = tl.load(y_ptr + row)
    lse = tl.load(lse_ptr + row)
    gl = tl.load(gl_ptr + row)  # 0 on ignored rows: with a0 = a1 = 0 there, the row's gradient is exactly 0
    a0 = tl.load(a0_ptr + row)
    cols = tl.arange(0, BLOCK_V)
    for v0 in range(0, V, BLOCK_V):
        c = v0 + cols
        ok = c < V
        z = tl.load(base + c, mask=ok, other=0.0)
        logq = z.to(tl.float32) * inv_temp - lse
        p = tl.exp(logq)
        if A1:
            a1 = tl.load(a1_ptr + row)
            dx = p * (a0 + a1 * logq)
        else:
            dx = p * a0
        dx = tl.where(c == y, dx + gl, dx) * inv_temp
        tl.store(base + c, dx.to(z.dtype), mask=ok)


def _block_v(V: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps): 4096-wide slices (16 elements per thread at 8 warps) for LM-head vocabularies."""
    block = min(4096, max(128, triton.next_power_of_2(V)))
    return block, (8 if block >= 2048 else 4)


def launch_stats(z, inv_temp, targets, ignore_index, with_entropy):
    """``(logp, entropy, lse)`` fp32 ``[rows]`` of the logit chunk ``z [rows, V]`` (row stride may exceed V; unit
    column stride), fp32 ``inv_temp [rows]``, int64 ``targets [rows]``. ``entropy`` is zeros without
    ``with_entropy``."""
    rows, V = z.shape
    block, warps = _block_v(V)
    f32 = dict(dtype=torch.float32, device=z.device)
    logp, ent, lse = torch.empty(rows, **f32), torch.zeros(rows, **f32), torch.empty(rows, **f32)
    with device_guard(z):
        _logit_stats_kernel[(rows,)](
            z, z.stride(0), inv_temp, targets, logp, ent, lse, V, ignore_index,
            WITH_ENTROPY=bool(with_entropy), BLOCK_V=block, num_warps=warps,
        )  # fmt: skip
    return logp, ent, lse


def launch_grad_(z, inv_temp, targets, lse, gl, a0, a1):
    """Overwrite the logit chunk ``z [rows, V]`` with ``d loss / d z`` (see the module docstring); ``a1`` None: no
    entropy term. All per-row vectors are fp32 ``[rows]``, ``targets`` int64. Returns ``z``."""
    rows, V = z.shape
    block, warps = _block_v(V)
    with device_guard(z):
        _logit_grad_kernel[(rows,)](
            z, z.stride(0), inv_temp, targets, lse, gl, a0, a1 if a1 is not None else a0, V,
            A1=a1 is not None, BLOCK_V=block, num_warps=warps,
        )  # fmt: skip
    return z


def aot_scenarios():
    """The launches a GPU run makes, on meta tensors: chunks of R-4B's LM head (V=151936, 2048 rows) in each logit
    dtype, with and without the entropy, and a small odd vocabulary (one partial slice)."""
    for rows, V in ((2048, 151936), (7, 1000)):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            z = torch.empty(rows, V, dtype=dtype, device="meta")
            vec = torch.empty(rows, dtype=torch.float32, device="meta")
            y = torch.empty(rows, dtype=torch.int64, device="meta")
            for with_entropy in (False, True):
                launch_stats(z, vec, y, -100, with_entropy)
                launch_grad_(z, vec, y, vec, vec, vec, vec if with_entropy else None)
