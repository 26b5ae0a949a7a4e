"""Triton kernels for fused LM-head log-probs and entropy: the ``[T, V]`` logits live only as register tiles.

Forward (one program per block of ``BLOCK_T`` rows): for each ``BLOCK_V`` vocabulary tile, a ``tl.dot`` loop over
``H`` builds the logit tile in fp32, then an online log-sum-exp keeps per row the running max ``m``, ``s = sum
exp(x - m)`` and ``u = sum exp(x - m) * (x - m)`` (rescaled when ``m`` grows) and picks the target's logit.
``lse = m + log s``, ``logp = x[y] - lse``, ``entropy = log s - u / s``.

Backward (one program per ``(BLOCK_T, BLOCK_V)`` tile): recompute the logit tile, ``dz = -p * (c0 + c1 * x) + gl *
onehot(y)`` (per-row coefficients from the host), then for each ``BLOCK_K`` slice of ``H`` atomically add
``dz @ W`` into dHidden and ``dz.T @ h`` into dWeight (fp32 accumulators). Each logit tile is computed twice in all
(once forward, once backward), as in the torch backend; the atomics make the gradients non-deterministic in the
last bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from r4b_fast.backends import triton_interpret_enabled

NEG_BIG = -1.0e30  # the running max starts finite: exp(NEG_BIG - m) = 0 and 0 * (NEG_BIG - m) stays finite


@triton.jit
def _logit_tile(h_ptr, w_ptr, b_ptr, inv_temp, rows, cols, row_ok, col_ok, H,
                HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                PRECISION: tl.constexpr, UPCAST: tl.constexpr):  # fmt: skip
    acc = tl.zeros([BLOCK_T, BLOCK_V], dtype=tl.float32)
    ks = tl.arange(0, BLOCK_K)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + ks
        k_ok = k < H
        a = tl.load(h_ptr + rows[:, None] * H + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptr + cols[:, None] * H + k[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter's 16-bit tl.dot is wrong (triton 3.9): exact fp32 products of 16-bit values
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc * inv_temp[:, None]


@triton.jit
def _flp_forward_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr, temp_ptr, logp_ptr, ent_ptr, lse_ptr,
    T, V, H, ignore_index,
    HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    y = tl.load(y_ptr + rows, mask=row_ok, other=0)
    inv_temp = 1.0 / tl.load(temp_ptr + rows, mask=row_ok, other=1.0)
    m = tl.zeros([BLOCK_T], dtype=tl.float32) + NEG_BIG
    s = tl.zeros([BLOCK_T], dtype=tl.float32)
    u = tl.zeros([BLOCK_T], dtype=tl.float32)
    xy = tl.zeros([BLOCK_T], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        x = _logit_tile(h_ptr, w_ptr, b_ptr, inv_temp, rows, cols, row_ok, col_ok, H,
                        HAS_BIAS, BLOCK_T, BLOCK_V, BLOCK_K, PRECISION, UPCAST)  # fmt: skip
        x = tl.where(col_ok[None, :], x, NEG_BIG)
        xy += tl.sum(tl.where(cols[None, :] == y[:, None], x, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(x, axis=1))
        d = x - m_new[:, None]
        e = tl.where(col_ok[None, :], tl.exp(d), 0.0)
        delta = m - m_new
        scale = tl.exp(delta)
        if WITH_ENTROPY:
            u = scale * (u + delta * s) + tl.sum(e * d, axis=1)
        s = scale * s + tl.sum(e, axis=1)
        m = m_new
    log_s = tl.log(s)
    lse = m + log_s
    valid = y != ignore_index
    tl.store(logp_ptr + rows, tl.where(valid, xy - lse, 0.0), mask=row_ok)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    if WITH_ENTROPY:
        tl.store(ent_ptr + rows, tl.where(valid, log_s - u / s, 0.0), mask=row_ok)


@triton.jit
def _flp_backward_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr, temp_ptr, lse_ptr, gl_ptr, c0_ptr, c1_ptr, dh_ptr, dw_ptr, db_ptr,
    T, V, H,
    HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < T
    col_ok = cols < V
    y = tl.load(y_ptr + rows, mask=row_ok, other=-1)
    inv_temp = 1.0 / tl.load(temp_ptr + rows, mask=row_ok, other=1.0)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    gl = tl.load(gl_ptr + rows, mask=row_ok, other=0.0)  # d loss / d logp, / temperature, 0 on ignored rows
    x = _logit_tile(h_ptr, w_ptr, b_ptr, inv_temp, rows, cols, row_ok, col_ok, H,
                    HAS_BIAS, BLOCK_T, BLOCK_V, BLOCK_K, PRECISION, UPCAST)  # fmt: skip
    ok = row_ok[:, None] & col_ok[None, :]
    p = tl.where(ok, tl.exp(x - lse[:, None]), 0.0)
    if WITH_ENTROPY:
        c0 = tl.load(c0_ptr + rows, mask=row_ok, other=0.0)
        c1 = tl.load(c1_ptr + rows, mask=row_ok, other=0.0)
        dz = -p * (c0[:, None] + c1[:, None] * x)
    else:
        dz = -p * gl[:, None]
    dz += tl.where(cols[None, :] == y[:, None], gl[:, None], 0.0)
    dz = tl.where(ok, dz, 0.0)
    if HAS_BIAS:
        tl.atomic_add(db_ptr + cols, tl.sum(dz, axis=0), mask=col_ok)
    dzl = dz.to(h_ptr.dtype.element_ty)  # gradients of the logits in the input dtype, as eager autograd
    if UPCAST:
        dzl = dzl.to(tl.float32)
    ks = tl.arange(0, BLOCK_K)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + ks
        k_ok = k < H
        hk = tl.load(h_ptr + rows[:, None] * H + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wk = tl.load(w_ptr + cols[:, None] * H + k[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:
            hk = hk.to(tl.float32)
            wk = wk.to(tl.float32)
        dh = tl.dot(dzl, wk, input_precision=PRECISION)  # [BLOCK_T, BLOCK_K]
        dw = tl.dot(tl.trans(dzl), hk, input_precision=PRECISION)  # [BLOCK_V, BLOCK_K]
        tl.atomic_add(dh_ptr + rows[:, None] * H + k[None, :], dh, mask=row_ok[:, None] & k_ok[None, :])
        tl.atomic_add(dw_ptr + cols[:, None] * H + k[None, :], dw, mask=col_ok[:, None] & k_ok[None, :])


def _blocks(H: int) -> tuple[int, int, int]:
    block_k = max(16, min(64, triton.next_power_of_2(H)))
    return 32, 64, block_k


def _upcast(dtype: torch.dtype) -> bool:
    return dtype != torch.float32 and triton_interpret_enabled()


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit inputs


def launch_forward(hidden, weight, bias, targets, temperature, ignore_index, with_entropy):
    """``(logp [T], entropy [T], lse [T])`` fp32 for contiguous ``hidden [T, H]``, ``weight [V, H]``, ``bias [V]``
    or None, int64 ``targets [T]``, fp32 ``temperature [T]``."""
    T, H = hidden.shape
    V = weight.shape[0]
    block_t, block_v, block_k = _blocks(H)
    f32 = dict(dtype=torch.float32, device=hidden.device)
    logp, ent, lse = torch.empty(T, **f32), torch.zeros(T, **f32), torch.empty(T, **f32)
    _flp_forward_kernel[(triton.cdiv(T, block_t),)](
        hidden, weight, bias if bias is not None else weight, targets, temperature, logp, ent, lse,
        T, V, H, ignore_index,
        HAS_BIAS=bias is not None, WITH_ENTROPY=bool(with_entropy), PRECISION=_precision(hidden.dtype),
        UPCAST=_upcast(hidden.dtype),
        BLOCK_T=block_t, BLOCK_V=block_v, BLOCK_K=block_k,
    )  # fmt: skip
    return logp, ent, lse


def launch_backward(grad_logp, grad_ent, hidden, weight, bias, targets, temperature, lse, entropy, ignore_index):
    """``(dHidden, dWeight, dBias)`` in the input dtype (dBias empty without bias); fp32 atomics underneath."""
    T, H = hidden.shape
    V = weight.shape[0]
    block_t, block_v, block_k = _blocks(H)
    valid = targets != ignore_index
    inv_temp = 1.0 / temperature
    gl = (torch.where(valid, grad_logp, 0.0) * inv_temp).contiguous()
    if grad_ent is not None:
        c1 = (torch.where(valid, grad_ent, 0.0) * inv_temp).contiguous()
        c0 = (gl + c1 * (entropy - lse)).contiguous()
    else:
        c0 = c1 = gl
    dh = torch.zeros(T, H, dtype=torch.float32, device=hidden.device)
    dw = torch.zeros(V, H, dtype=torch.float32, device=hidden.device)
    db = torch.zeros(V if bias is not None else 1, dtype=torch.float32, device=hidden.device)
    grid = (triton.cdiv(T, block_t), triton.cdiv(V, block_v))
    _flp_backward_kernel[grid](
        hidden, weight, bias if bias is not None else weight, targets, temperature, lse, gl, c0, c1, dh, dw, db,
        T, V, H,
        HAS_BIAS=bias is not None, WITH_ENTROPY=grad_ent is not None, PRECISION=_precision(hidden.dtype),
        UPCAST=_upcast(hidden.dtype),
        BLOCK_T=block_t, BLOCK_V=block_v, BLOCK_K=block_k,
    )  # fmt: skip
    db_out = db.to(bias.dtype) if bias is not None else hidden.new_empty(0)
    return dh.to(hidden.dtype), dw.to(weight.dtype), db_out
