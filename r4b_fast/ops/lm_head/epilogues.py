"""The per-chunk epilogues of the fused LM head, one pair per backend: statistics of a ``[rows, V]`` logit chunk
(online log-sum-exp, target gather, entropy) and, when gradients are needed, ``d loss / d logits`` written over the
chunk in place.

- torch: vectorised torch ops over row slices small enough (``EPILOGUE_ELEMENTS``) that their passes stay in cache.
- triton: the kernels of ``r4b_fast/kernels/fused_linear_logprobs.py`` (one read of the chunk for the statistics, one
  read + write for the gradient).

Math, with ``x = z * inv_temp`` per row, ``p = softmax(x)``: ``logp = x[y] - lse``, ``entropy = lse - sum(p * x)``;
the gradient ``dx = p * (a0 + a1 * log p) + gl * onehot(y)`` (``_grad_coefficients``).
"""

from __future__ import annotations

import torch

EPILOGUE_ELEMENTS = 1 << 20  # the torch epilogue's row slice (4 MiB fp32): its passes over a slice stay in cache


def _grad_coefficients(gl, gh, entropy):
    """Per-row ``(a0, a1)`` of ``dx = p * (a0 + a1 * log p) + gl * onehot`` for ``gl = d loss / d logp`` and ``gh =
    d loss / d entropy`` (None: no entropy term, ``a1`` None)."""
    if gh is None:
        return -gl, None
    return -(gl + gh * entropy), -gh


def _row_blocks(z):
    """Row slices of a logit chunk small enough (about ``EPILOGUE_ELEMENTS``) that the torch epilogue's several passes
    over one slice stay in cache, and its fp32 temporaries stay small."""
    rows, V = z.shape
    step = max(1, min(rows, EPILOGUE_ELEMENTS // max(V, 1)))
    return ((r0, min(rows, r0 + step)) for r0 in range(0, rows, step))


def _epilogue_torch(z, inv_temp, y, ignore_index, with_entropy, grad_fn):
    """Statistics of one logit chunk ``z [rows, V]``: ``(logp, entropy, lse)`` fp32 ``[rows]``. With ``grad_fn``
    (``(r0, r1, logp, entropy) -> (gl, gh)`` for rows ``r0:r1``), then overwrites ``z`` with ``d loss / d z``, reusing
    the exponentials of the statistics pass. Runs over row slices (``_row_blocks``)."""
    f32 = dict(dtype=torch.float32, device=z.device)
    rows = z.shape[0]
    logp, entropy, lse = torch.empty(rows, **f32), torch.zeros(rows, **f32), torch.empty(rows, **f32)
    for r0, r1 in _row_blocks(z):
        sl = slice(r0, r1)
        rows_grad = None if grad_fn is None else (lambda lp, en, r0=r0, r1=r1: grad_fn(r0, r1, lp, en))
        logp[sl], entropy[sl], lse[sl] = _epilogue_rows_torch(z[sl], inv_temp[sl], y[sl], ignore_index,
                                                              with_entropy, rows_grad)  # fmt: skip
    return logp, entropy, lse


def _epilogue_rows_torch(z, inv_temp, y, ignore_index, with_entropy, grad_fn):
    x = z if z.dtype == torch.float32 else z.float()  # fp32 working rows (z itself in fp32)
    x.mul_(inv_temp[:, None])
    m = x.amax(1)
    x.sub_(m[:, None])  # x - m <= 0
    e = torch.exp(x)
    s = e.sum(1)
    log_s = s.log()
    valid = y != ignore_index
    y_safe = torch.where(valid, y, 0)[:, None]
    logp = torch.where(valid, x.gather(1, y_safe).squeeze(1) - log_s, 0.0)
    # e * (x - m) <= 0: its (pairwise) sum has no cancellation; a bmm row dot accumulates naively, ~60x the error
    ex = e * x if with_entropy else None
    entropy = torch.where(valid, log_s - ex.sum(1) / s, 0.0) if with_entropy else torch.zeros_like(s)
    lse = m + log_s
    if grad_fn is None:
        return logp, entropy, lse
    gl, gh = grad_fn(logp, entropy)
    a0, a1 = _grad_coefficients(gl, gh, entropy)
    # p * (a0 + a1 * log p) with p = e / s, log p = (x - m) - log s:  e * c0 + (e * (x - m)) * c1, temperature folded
    if a1 is not None:
        c0 = (a0 - a1 * log_s) * inv_temp / s
        torch.addcmul(ex.mul_((a1 * inv_temp / s)[:, None]), e, c0[:, None], out=x)
    else:
        torch.mul(e, (a0 * inv_temp / s)[:, None], out=x)
    del e, ex
    x.scatter_add_(1, y_safe, (gl * inv_temp)[:, None])  # gl = 0 on ignored rows
    if x is not z:
        z.copy_(x)
    return logp, entropy, lse


def _grad_epilogue_torch(z, inv_temp, y, lse, gl, a0, a1):
    """Overwrite the chunk ``z`` with ``d loss / d z`` from saved per-row statistics (the recomputing backward)."""
    for r0, r1 in _row_blocks(z):
        zb, it = z[r0:r1], inv_temp[r0:r1]
        x = zb if zb.dtype == torch.float32 else zb.float()
        x.mul_(it[:, None]).sub_(lse[r0:r1, None])  # log p
        if a1 is None:
            x.exp_().mul_((a0[r0:r1] * it)[:, None])
        else:
            p = torch.exp(x)
            x.mul_((a1[r0:r1] * it)[:, None]).add_((a0[r0:r1] * it)[:, None]).mul_(p)
            del p
        x.scatter_add_(1, y[r0:r1, None], (gl[r0:r1] * it)[:, None])
        if x is not zb:
            zb.copy_(x)
    return z


def _grad_epilogue_triton(z, inv_temp, y, lse, gl, a0, a1):
    from r4b_fast.kernels.fused_linear_logprobs import launch_grad_

    a1 = a1.contiguous() if a1 is not None else None
    return launch_grad_(z, inv_temp, y, lse, gl.contiguous(), a0.contiguous(), a1)


def _epilogue_triton(z, inv_temp, y, ignore_index, with_entropy, grad_fn):
    from r4b_fast.kernels.fused_linear_logprobs import launch_stats

    logp, entropy, lse = launch_stats(z, inv_temp, y, ignore_index, with_entropy)
    if grad_fn is not None:
        gl, gh = grad_fn(0, z.shape[0], logp, entropy)
        _grad_epilogue_triton(z, inv_temp, y, lse, gl, *_grad_coefficients(gl, gh, entropy))
    return logp, entropy, lse


# backend -> (statistics epilogue, gradient epilogue)
EPILOGUES = {"torch": (_epilogue_torch, _grad_epilogue_torch), "triton": (_epilogue_triton, _grad_epilogue_triton)}
