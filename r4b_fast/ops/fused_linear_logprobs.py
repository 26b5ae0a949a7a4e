"""Fused LM-head log-probs, entropy and the GRPO / DAPO / Dr.GRPO / GSPO / BPO policy loss, never materialising the
``[T, V]`` logits.

Design (the one known to reach GEMM speed on GPUs): per chunk of tokens, the ``[rows, V]`` logits by one GEMM
(``torch.mm``: cuBLAS on GPU, wgmma on sm_90), then one epilogue over the chunk (online log-sum-exp, target gather,
entropy and, when gradients are needed, ``d loss / d logits`` written over the chunk in place), then dHidden of the
chunk and dWeight by two more GEMMs. No atomics, no ``[T, V]`` buffer; the chunk is bounded by ``CHUNK_ELEMENTS``.

- ``fused_linear_policy_loss`` (the loss is the last op, its upstream gradient a scalar): the gradients are formed
  during the forward, 3 GEMMs in all, and handed to autograd scaled by the upstream scalar. Without gradients
  (scoring old / reference log-probs), 1 GEMM.
- ``fused_linear_logprobs`` (per-token outputs whose upstream gradients arrive later): forward 1 GEMM per chunk, the
  backward recomputes each chunk's logits from the saved log-sum-exp: 4 GEMMs for forward + backward.

Implementations, by name:
- ``fused_linear_logprobs_ref``: eager fp32 reference; materialises the logits (the oracle and the benchmark baseline).
- torch backend: the chunk loop below with ``_epilogue_torch`` / ``_grad_epilogue_torch`` (vectorised torch ops over
  the chunk, in place). The CPU path.
- triton backend: the same chunk loop, GEMMs by ``torch.mm``, epilogues by the Triton kernels in
  ``kernels/fused_linear_logprobs.py`` (one read of the chunk for the statistics, one read + write for the gradient).
- cuda: none. The GEMMs are cuBLAS already and the epilogue is a row-wise streaming kernel Triton writes as well as
  hand CUDA would.

Math, with ``x = (hidden @ weight.T + bias) / temperature`` per row, ``p = softmax(x)``, ``lse = logsumexp(x)``:
``logp = x[y] - lse``; ``entropy = lse - sum(p * x)``; ``d logp / dx = onehot(y) - p``;
``d entropy / dx = -p * (log p + entropy)``. Rows whose target is ``ignore_index`` give 0 and no gradient.

Precision: the GEMMs run in the input dtype (fp32 accumulation inside), the logits chunk is held in that dtype as eager
``h @ W.T`` would hold it, the epilogue computes in fp32, and the logits' gradient is written back in the input dtype
(as eager autograd holds it). dWeight is accumulated over chunks in the weight's dtype (one rounding per chunk).

Public functions: :func:`fused_linear_logprobs`, :func:`logprobs_from_logits`, :func:`fused_linear_policy_loss`.
All are torch.library custom ops (fake + autograd registered), so they work under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from r4b_fast.backends import resolve_backend

OP_BACKENDS = ("torch", "triton")
PREFERRED = {"cpu": ("torch",), "cuda": ("triton", "torch")}
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
IMPORTANCE_LEVELS = ("token", "sequence")
# Elements of one [rows, V] logit chunk, per device type. CPU: 16M fp32 (64 MiB). GPU: 256M (512 MiB in bf16):
# R-4B's V=151936 gives 1766-row chunks, big enough for full-speed GEMMs and a few percent of eager's [T, V] buffers
# at T=8192.
CHUNK_ELEMENTS = {"cpu": 1 << 24, "cuda": 1 << 28}
EPILOGUE_ELEMENTS = 1 << 20  # the torch epilogue's row slice (4 MiB fp32): its passes over a slice stay in cache
# The smallest temperature the log-prob ops accept. They scale the logits by 1 / T in fp32: at T = 1e-38 (1 / T is
# still finite) a logit of 4 already overflows to inf and the result is NaN. At 1e-6 only logits beyond 3e32 would;
# a rollout colder than that is greedy decoding, whose log-probs are those at T = 1 (as the sampler reports them).
MIN_TEMPERATURE = 1e-6
# hidden / weight dtypes of the fused LM head: the epilogues compute in fp32, so float64 would be silently rounded
LM_HEAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------------------------
# Reference: materialises the logits in fp32.
# ----------------------------------------------------------------------------------------------------------------
def fused_linear_logprobs_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager fp32 reference: ``(logprobs [T], entropy [T])``, differentiable by autograd; materialises ``[T, V]``."""
    logits = hidden.float() @ weight.float().T
    if bias is not None:
        logits = logits + bias.float()
    temp = temperature.float()[:, None] if isinstance(temperature, torch.Tensor) else temperature
    x = logits / temp
    logsm = torch.log_softmax(x, dim=-1)
    valid = targets != ignore_index
    logp = logsm.gather(1, torch.where(valid, targets, 0)[:, None]).squeeze(1)
    entropy = -(logsm.exp() * logsm).sum(-1)
    zero = torch.zeros((), dtype=torch.float32, device=hidden.device)
    return torch.where(valid, logp, zero), torch.where(valid, entropy, zero)


# ----------------------------------------------------------------------------------------------------------------
# The chunk loop: GEMM -> epilogue (torch or Triton) -> GEMMs. Shared by both backends.
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class _Head:
    """The LM head's validated inputs: contiguous ``hidden [T, H]``, ``weight [V, H]``, ``bias [V]`` or None, int64
    ``targets [T]``, fp32 ``inv_temp [T]``."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    targets: torch.Tensor
    inv_temp: torch.Tensor
    ignore_index: int
    backend: str

    def chunk_rows(self) -> int:
        T, V = self.hidden.shape[0], self.weight.shape[0]
        budget = CHUNK_ELEMENTS.get(self.hidden.device.type, CHUNK_ELEMENTS["cpu"])
        return max(1, min(T, budget // V))

    def logits(self, t0: int, t1: int) -> torch.Tensor:
        """``[t1 - t0, V]`` logits before the temperature, in the input dtype: one GEMM."""
        h = self.hidden[t0:t1]
        if self.bias is not None:
            return torch.addmm(self.bias, h, self.weight.T)
        return h @ self.weight.T


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


_EPILOGUES = {"torch": (_epilogue_torch, _grad_epilogue_torch), "triton": (_epilogue_triton, _grad_epilogue_triton)}


@dataclass
class _Grads:
    """Gradient outputs filled chunk by chunk (None where not needed): dHidden rows written per chunk, dWeight
    accumulated in the weight's dtype, dBias accumulated in fp32."""

    dh: torch.Tensor | None
    dw: torch.Tensor | None
    db: torch.Tensor | None

    @classmethod
    def empty(cls, head: _Head, need_dh: bool, need_dw: bool, need_db: bool) -> _Grads:
        dev = head.hidden.device
        return cls(
            torch.empty_like(head.hidden) if need_dh else None,
            torch.empty_like(head.weight) if need_dw else None,
            torch.zeros(head.weight.shape[0], dtype=torch.float32, device=dev) if need_db else None,
        )

    def add_chunk(self, head: _Head, dz: torch.Tensor, t0: int, t1: int) -> None:
        if self.dh is not None:
            torch.mm(dz, head.weight, out=self.dh[t0:t1])
        if self.dw is not None:
            if t0 == 0:
                torch.mm(dz.T, head.hidden[t0:t1], out=self.dw)
            else:
                self.dw.addmm_(dz.T, head.hidden[t0:t1])
        if self.db is not None:
            self.db += dz.sum(0, dtype=torch.float32)

    def outputs(self, head: _Head) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(dh, dw, db)`` with empty tensors for those not computed (a custom op returns tensors, not None)."""
        def none():  # a distinct empty tensor each: a custom op's outputs may not alias one another
            return head.hidden.new_empty(0)

        db = self.db.to(head.bias.dtype) if self.db is not None else none()
        return (self.dh if self.dh is not None else none(), self.dw if self.dw is not None else none(), db)


def _lm_head_forward(head: _Head, with_entropy: bool, grad_fn=None, grads: _Grads | None = None):
    """``(logp, entropy, lse)`` fp32 ``[T]``; with ``grad_fn(t0, t1, logp, entropy) -> (gl, gh)`` the loss's
    gradients are also accumulated into ``grads`` (3 GEMMs per chunk in all, 1 without)."""
    T = head.hidden.shape[0]
    f32 = dict(dtype=torch.float32, device=head.hidden.device)
    logp, entropy, lse = torch.empty(T, **f32), torch.zeros(T, **f32), torch.empty(T, **f32)
    epilogue = _EPILOGUES[head.backend][0]
    ct = head.chunk_rows()
    for t0 in range(0, T, ct):
        t1 = min(T, t0 + ct)
        z = head.logits(t0, t1)
        rows_grad = None if grad_fn is None else (lambda r0, r1, lp, en, t0=t0: grad_fn(t0 + r0, t0 + r1, lp, en))
        lp, en, ls = epilogue(z, head.inv_temp[t0:t1], head.targets[t0:t1], head.ignore_index, with_entropy, rows_grad)
        logp[t0:t1], entropy[t0:t1], lse[t0:t1] = lp, en, ls
        if grads is not None:
            grads.add_chunk(head, z, t0, t1)
        del z
    return logp, entropy, lse


def _lm_head_backward(head: _Head, lse, entropy, gl, gh, grads: _Grads) -> None:
    """Recompute each chunk's logits and accumulate the gradients of ``sum(gl * logp + gh * entropy)``."""
    T = head.hidden.shape[0]
    grad_epilogue = _EPILOGUES[head.backend][1]
    a0, a1 = _grad_coefficients(gl, gh, entropy)
    y_safe = torch.where(head.targets != head.ignore_index, head.targets, 0)  # ignored rows have gl = a0 = a1 = 0
    ct = head.chunk_rows()
    for t0 in range(0, T, ct):
        t1 = min(T, t0 + ct)
        z = head.logits(t0, t1)
        grad_epilogue(z, head.inv_temp[t0:t1], y_safe[t0:t1], lse[t0:t1], gl[t0:t1], a0[t0:t1],
                      a1[t0:t1] if a1 is not None else None)  # fmt: skip
        grads.add_chunk(head, z, t0, t1)
        del z


# ----------------------------------------------------------------------------------------------------------------
# torch.library ops
# ----------------------------------------------------------------------------------------------------------------
def _check_values(targets, temperature, vocab, ignore_index):
    """Raise ValueError for targets out of range or bad temperatures: one host sync."""
    valid = targets != ignore_index
    bad_t = (valid & ((targets < 0) | (targets >= vocab))).sum()
    bad_temp = (~(torch.isfinite(temperature) & (temperature >= MIN_TEMPERATURE))).sum()
    n_bad_t, n_bad_temp = torch.stack([bad_t, bad_temp]).tolist()
    if n_bad_t:
        bad = valid & ((targets < 0) | (targets >= vocab))
        first = int(torch.nonzero(bad)[0, 0])
        raise ValueError(
            f"targets: {n_bad_t} value(s) outside [0, V={vocab}) and not ignore_index={ignore_index}; "
            f"first at row {first} ({int(targets[first])})"
        )
    if n_bad_temp:
        raise ValueError(f"temperature: {n_bad_temp} row(s) not finite or below MIN_TEMPERATURE={MIN_TEMPERATURE}")


def _head(hidden, weight, bias, targets, temperature, ignore_index, backend) -> _Head:
    _check_values(targets, temperature, weight.shape[0], ignore_index)
    return _Head(hidden, weight, bias, targets, 1.0 / temperature, ignore_index, backend)


@torch.library.custom_op("r4b_fast::fused_linear_logprobs", mutates_args=())
def _flp_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    temperature: torch.Tensor,
    ignore_index: int,
    with_entropy: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    head = _head(hidden, weight, bias, targets, temperature, ignore_index, backend)
    return _lm_head_forward(head, with_entropy)


@_flp_op.register_fake
def _(hidden, weight, bias, targets, temperature, ignore_index, with_entropy, backend):
    T = hidden.shape[0]
    return tuple(hidden.new_empty(T, dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("r4b_fast::fused_linear_logprobs_backward", mutates_args=())
def _flp_backward_op(
    grad_logp: torch.Tensor,
    grad_ent: torch.Tensor | None,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    temperature: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    ignore_index: int,
    need_dh: bool,
    need_dw: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    head = _Head(hidden, weight, bias, targets, 1.0 / temperature, ignore_index, backend)
    valid = targets != ignore_index
    gl = torch.where(valid, grad_logp.float(), 0.0)
    gh = torch.where(valid, grad_ent.float(), 0.0) if grad_ent is not None else None
    grads = _Grads.empty(head, need_dh, need_dw, bias is not None)
    _lm_head_backward(head, lse, entropy, gl, gh, grads)
    return grads.outputs(head)


def _grads_fake(hidden, weight, bias, need_dh, need_dw):
    return (hidden.new_empty(hidden.shape if need_dh else 0), weight.new_empty(weight.shape if need_dw else 0),
            bias.new_empty(bias.shape) if bias is not None else hidden.new_empty(0))  # fmt: skip


@_flp_backward_op.register_fake
def _(grad_logp, grad_ent, hidden, weight, bias, targets, temperature, lse, entropy, ignore_index, need_dh, need_dw,
      backend):  # fmt: skip
    return _grads_fake(hidden, weight, bias, need_dh, need_dw)


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, temperature, ignore_index, with_entropy, backend = inputs
    _, entropy, lse = output
    ctx.save_for_backward(hidden, weight, bias, targets, temperature, lse, entropy)
    ctx.ignore_index, ctx.with_entropy, ctx.backend = ignore_index, with_entropy, backend
    ctx.has_bias = bias is not None
    ctx.set_materialize_grads(False)  # an unused entropy output gives grad None: no entropy term in the backward


def _backward(ctx, grad_logp, grad_ent, grad_lse):
    hidden, weight, bias, targets, temperature, lse, entropy = ctx.saved_tensors
    if grad_logp is None:
        grad_logp = torch.zeros_like(lse)
    if not ctx.with_entropy:
        grad_ent = None
    need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dh, dw, db = _flp_backward_op(
        grad_logp, grad_ent, hidden, weight, bias if ctx.has_bias else None, targets, temperature, lse, entropy,
        ctx.ignore_index, need_dh, need_dw, ctx.backend,
    )  # fmt: skip
    return (dh if need_dh else None, dw if need_dw else None, db if ctx.has_bias else None,
            None, None, None, None, None)  # fmt: skip


_flp_op.register_autograd(_backward, setup_context=_setup_context)


@dataclass(frozen=True)
class _PPO:
    """The clipped policy-gradient objective's constants (``fused_linear_policy_loss``'s arguments). ``lr_low`` /
    ``lr_high``: the log-ratio clamp (None: none); ``kl_lr_clamp`` / ``kl_clamp``: verl's k3 clamps (None: none)."""

    clip_low: float
    clip_high: float
    dual_clip: float | None
    beta: float
    entropy_coef: float
    lr_low: float | None = None
    lr_high: float | None = None
    kl_lr_clamp: float | None = None
    kl_clamp: float | None = None


def _inside(x, low, high):
    """``torch.clamp(x, low, high)``'s gradient mask: 1 on the closed interval, 0 outside (either bound None)."""
    keep = torch.ones_like(x, dtype=torch.bool)
    if low is not None:
        keep = keep & (x >= low)
    if high is not None:
        keep = keep & (x <= high)
    return keep.float()


def _k3(logp, ref, ppo: _PPO):
    """``(k3, d k3 / d logp)`` with verl's optional clamps: ``d = clamp(ref - logp, +-kl_lr_clamp)``, ``k3 =
    clamp(exp(d) - d - 1, +-kl_clamp)``; the derivative as autograd gives it through the clamps."""
    d = ref - logp
    grad_mask = None
    if ppo.kl_lr_clamp is not None:
        grad_mask = _inside(d, -ppo.kl_lr_clamp, ppo.kl_lr_clamp)
        d = d.clamp(-ppo.kl_lr_clamp, ppo.kl_lr_clamp)
    e = torch.exp(d)
    kl = e - d - 1
    if ppo.kl_clamp is not None:
        inside = _inside(kl, -ppo.kl_clamp, ppo.kl_clamp)
        grad_mask = inside if grad_mask is None else grad_mask * inside
        kl = kl.clamp(-ppo.kl_clamp, ppo.kl_clamp)
    grad = 1 - e  # d k3 / d logp = -(exp(d) - 1)
    return kl, (grad if grad_mask is None else grad * grad_mask)


def _ppo_token_loss(log_ratio, logp, adv, ref, ppo: _PPO, is_weights=None):
    """Per-token ``(loss_tok, ratio, dual_active, kl)``: ``is_weights * max(-A r, -A clip(r))`` (dual-clipped where
    A < 0; ``r = exp(clamp(log_ratio))``) + ``beta * k3``; ``kl`` / ``dual_active`` None when not computed. The entropy
    bonus is added by the caller (its own aggregation). The one definition of the loss: the value and the fused
    gradients (``_ppo_token_grad``) both come from it."""
    if ppo.lr_low is not None or ppo.lr_high is not None:
        log_ratio = log_ratio.clamp(ppo.lr_low, ppo.lr_high)
    ratio = torch.exp(log_ratio)
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - ppo.clip_low, 1 + ppo.clip_high))
    dual_active = None
    if ppo.dual_clip is not None:
        pg3 = -adv * ppo.dual_clip
        dual_active = (adv < 0) & (pg > pg3)
        pg = torch.where(adv < 0, torch.minimum(pg, pg3), pg)
    if is_weights is not None:  # rollout importance weights (verl's TIS): the policy-gradient term only
        pg = pg * is_weights
    loss_tok, kl = pg, None
    if ref is not None:
        kl = _k3(logp, ref, ppo)[0]
        if ppo.beta != 0:
            loss_tok = loss_tok + ppo.beta * kl
    return loss_tok, ratio, dual_active, kl


def _ppo_token_grad(log_ratio, logp, adv, ref, ppo: _PPO, is_weights=None):
    """``d loss_tok / d logp`` of :func:`_ppo_token_loss` for a token-level ratio ``exp(logp - old)``, with autograd's
    conventions (a custom op's body runs below autograd, so the derivative is written out): ``maximum`` / ``minimum``
    split the gradient evenly at ties, ``clamp`` passes it on the closed interval."""
    through = None
    if ppo.lr_low is not None or ppo.lr_high is not None:
        through = _inside(log_ratio, ppo.lr_low, ppo.lr_high)
        log_ratio = log_ratio.clamp(ppo.lr_low, ppo.lr_high)
    ratio = torch.exp(log_ratio)
    lo, hi = 1 - ppo.clip_low, 1 + ppo.clip_high
    pg1, pg2 = -adv * ratio, -adv * ratio.clamp(lo, hi)
    tie = (pg1 == pg2).float() * 0.5
    share = (pg1 > pg2).float() + tie + ((pg2 > pg1).float() + tie) * ((ratio >= lo) & (ratio <= hi)).float()
    grad = -adv * ratio * share
    if ppo.dual_clip is not None:
        pg, pg3 = torch.maximum(pg1, pg2), -adv * ppo.dual_clip
        kept = (pg < pg3).float() + (pg == pg3).float() * 0.5
        grad = torch.where(adv < 0, grad * kept, grad)
    if through is not None:
        grad = grad * through
    if is_weights is not None:
        grad = grad * is_weights
    if ref is not None and ppo.beta != 0:
        grad = grad + ppo.beta * _k3(logp, ref, ppo)[1]
    return grad


@torch.library.custom_op("r4b_fast::fused_linear_policy_loss_grads", mutates_args=())
def _policy_grads_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    temperature: torch.Tensor,
    ignore_index: int,
    advantages: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    token_weights: torch.Tensor,
    entropy_weights: torch.Tensor | None,
    is_weights: torch.Tensor | None,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
    beta: float,
    entropy_coef: float,
    lr_low: float | None,
    lr_high: float | None,
    kl_lr_clamp: float | None,
    kl_clamp: float | None,
    need_dh: bool,
    need_dw: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logp, entropy, dh, dw, db)`` of ``loss = sum_t token_weights[t] * loss_tok[t] - entropy_coef *
    sum_t entropy_weights[t] * entropy[t]`` (token-level importance; ``entropy_weights`` None: ``token_weights``):
    each chunk's ``d loss / d logp`` (``_ppo_token_grad``) and ``d loss / d entropy`` weight the chunk's logit
    gradient, and its two GEMMs follow at once."""
    head = _head(hidden, weight, bias, targets, temperature, ignore_index, backend)
    ppo = _PPO(clip_low, clip_high, dual_clip, beta, entropy_coef, lr_low, lr_high, kl_lr_clamp, kl_clamp)
    ent_w = token_weights if entropy_weights is None else entropy_weights
    gh_const = None if entropy_coef == 0 else -entropy_coef * ent_w

    def grad_fn(t0, t1, logp, entropy):
        log_ratio = logp - old_logprobs[t0:t1] if old_logprobs is not None else torch.zeros_like(logp)
        ref = ref_logprobs[t0:t1] if ref_logprobs is not None else None
        w = is_weights[t0:t1] if is_weights is not None else None
        gl = _ppo_token_grad(log_ratio, logp, advantages[t0:t1], ref, ppo, w) * token_weights[t0:t1]
        return gl, (gh_const[t0:t1] if gh_const is not None else None)

    grads = _Grads.empty(head, need_dh, need_dw, bias is not None)
    logp, entropy, _ = _lm_head_forward(head, True, grad_fn, grads)
    return (logp, entropy, *grads.outputs(head))


@_policy_grads_op.register_fake
def _(hidden, weight, bias, targets, temperature, ignore_index, advantages, old_logprobs, ref_logprobs, token_weights,
      entropy_weights, is_weights, clip_low, clip_high, dual_clip, beta, entropy_coef, lr_low, lr_high, kl_lr_clamp,
      kl_clamp, need_dh, need_dw, backend):  # fmt: skip
    T = hidden.shape[0]
    rows = (hidden.new_empty(T, dtype=torch.float32), hidden.new_empty(T, dtype=torch.float32))
    return (*rows, *_grads_fake(hidden, weight, bias, need_dh, need_dw))


@torch.library.custom_op("r4b_fast::attach_lm_head_grads", mutates_args=())
def _attach_grads_op(
    loss: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    dh: torch.Tensor,
    dw: torch.Tensor,
    db: torch.Tensor,
) -> torch.Tensor:
    """The loss value, differentiable in ``hidden`` / ``weight`` / ``bias`` with the gradients formed in the forward
    (``dh`` etc. for a unit upstream gradient; empty where not computed)."""
    return loss.clone()


@_attach_grads_op.register_fake
def _(loss, hidden, weight, bias, dh, dw, db):
    return loss.new_empty(loss.shape)


def _attach_setup_context(ctx, inputs, output):
    _, _, _, bias, dh, dw, db = inputs
    ctx.save_for_backward(dh, dw, db)
    ctx.has_bias = bias is not None


def _attach_backward(ctx, grad):
    dh, dw, db = ctx.saved_tensors
    need = ctx.needs_input_grad

    def scaled(g):  # the upstream gradient of the loss is a scalar
        return g * grad.to(g.dtype) if g.numel() else None

    return (None, scaled(dh) if need[1] else None, scaled(dw) if need[2] else None,
            scaled(db) if ctx.has_bias and need[3] else None, None, None, None)  # fmt: skip


_attach_grads_op.register_autograd(_attach_backward, setup_context=_attach_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------------------
def _check_float(name, t, shape=None, dtype=None, device=None, ref="hidden"):
    """``t`` is a float tensor (of ``shape`` / ``dtype`` / ``device`` when given, those of the argument ``ref``)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name}: dtype {t.dtype} differs from {ref}'s {dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: on device {t.device}, but {ref} is on {device}")


def _check_targets(targets, shape, device, ref="hidden", shape_of="hidden.shape[:-1]"):
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets: expected a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets: expected an integer tensor, got dtype {targets.dtype}")
    if tuple(targets.shape) != tuple(shape):
        raise ValueError(f"targets: expected shape {tuple(shape)} ({shape_of}), got {tuple(targets.shape)}")
    if targets.device != device:
        raise ValueError(f"targets: on device {targets.device}, but {ref} is on {device}")


def _check_temperature_float(temperature):
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature: expected a float or a tensor, got {type(temperature).__name__}")
    if not math.isfinite(temperature) or temperature < MIN_TEMPERATURE:
        raise ValueError(f"temperature: expected a finite float >= MIN_TEMPERATURE={MIN_TEMPERATURE} (the logits are "
                         f"scaled by 1 / temperature in fp32), got {temperature!r}")


def _temperature_tensor(temperature, shape, device):
    if isinstance(temperature, torch.Tensor):
        _check_float("temperature", temperature, shape=shape, device=device)
        return temperature.detach().float().reshape(-1).contiguous()
    _check_temperature_float(temperature)
    return torch.full((math.prod(shape),), float(temperature), dtype=torch.float32, device=device)


def _autocast_inputs(hidden, weight, bias):
    """Under ``torch.autocast`` on ``hidden``'s device: the LM head in the autocast dtype, like ``nn.Linear`` (a
    custom op is not cast by autocast itself; fp32 master weights would otherwise run an fp32 head)."""
    if not isinstance(hidden, torch.Tensor) or not torch.is_autocast_enabled(hidden.device.type):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(hidden.device.type)

    def cast(t):
        return t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype.is_floating_point else t

    return cast(hidden), cast(weight), cast(bias)


def _validate_linear(hidden, weight, bias):
    _check_float("hidden", hidden)
    if hidden.dtype not in LM_HEAD_DTYPES:
        raise TypeError(f"hidden: dtype {hidden.dtype} is not supported: the fused LM head computes in float32 (its "
                        f"GEMMs in the input dtype), so give one of {LM_HEAD_DTYPES}")
    if hidden.dim() < 2:
        raise ValueError(f"hidden: expected [..., H] with at least 2 dims, got shape {tuple(hidden.shape)}")
    _check_float("weight", weight, dtype=hidden.dtype, device=hidden.device)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight: expected shape [V, H={hidden.shape[-1]}], got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight: empty vocabulary (V = 0)")
    if bias is not None:
        _check_float("bias", bias, shape=(weight.shape[0],), dtype=hidden.dtype, device=hidden.device)


def _prepare_head(hidden, weight, bias, targets, temperature, ignore_index, backend):
    """Validate the LM head's inputs (after the autocast cast): ``((hidden [T, H], weight, bias, int64 targets [T],
    fp32 temperature [T], backend), leading shape)``, all contiguous."""
    _validate_linear(hidden, weight, bias)
    lead = tuple(hidden.shape[:-1])
    _check_targets(targets, lead, hidden.device)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    if 0 <= ignore_index < weight.shape[0]:
        raise ValueError(f"ignore_index: {ignore_index} is a valid token id in [0, V={weight.shape[0]})")
    if math.prod(lead) == 0:
        raise ValueError(f"hidden: no rows (shape {tuple(hidden.shape)})")
    temp = _temperature_tensor(temperature, lead, hidden.device)
    chosen = resolve_backend(backend, hidden.device, OP_BACKENDS, PREFERRED, "fused_linear_logprobs")
    args = (hidden.reshape(-1, hidden.shape[-1]).contiguous(), weight.contiguous(),
            bias.contiguous() if bias is not None else None, targets.reshape(-1).to(torch.int64).contiguous(), temp,
            chosen)  # fmt: skip
    return args, lead


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each target token under ``softmax((hidden @ weight.T + bias) / temperature)``, without
    materialising the ``[T, V]`` logits (chunks over tokens and vocabulary, online log-sum-exp in fp32).

    Args:
        hidden: ``[..., H]`` float32/bfloat16/float16 last hidden states (``T`` = product of the leading dims).
        weight: ``[V, H]`` LM-head weight, same dtype and device as ``hidden`` (under ``torch.autocast`` for their
            device both are cast to the autocast dtype first, as ``nn.Linear`` would be; gradients reach the
            original tensors through the cast).
        targets: ``[...]`` integer token ids (``hidden.shape[:-1]``), in ``[0, V)`` or equal to ``ignore_index``.
        bias: optional ``[V]`` LM-head bias.
        temperature: a finite float ``>= MIN_TEMPERATURE`` (1e-6), or a ``[...]`` per-row tensor of such values (not
            differentiated).
        return_entropy: also return the entropy of each row's distribution (differentiable too).
        ignore_index: rows with this target give 0 (log-prob and entropy) and no gradient.
        backend: ``"torch"`` or ``"triton"``; default ``$R4B_FAST_BACKEND`` or the best for the device.

    Returns:
        ``logprobs`` (``[...]`` float32), or ``(logprobs, entropy)`` with ``return_entropy=True``. Differentiable in
        ``hidden``, ``weight`` and ``bias``; the backward recomputes the logits chunk by chunk (4 GEMMs for forward +
        backward; a loss on these outputs is cheaper through :func:`fused_linear_policy_loss`, 3 GEMMs). The value
        checks (targets in range, temperatures finite and ``>= MIN_TEMPERATURE``) cost one host sync per call, also
        under torch.compile.

    Example:
        >>> import torch, r4b_fast
        >>> h, w = torch.randn(4, 8, requires_grad=True), torch.randn(32, 8, requires_grad=True)
        >>> y = torch.tensor([3, 1, -100, 31])
        >>> logp, ent = r4b_fast.fused_linear_logprobs(h, w, y, return_entropy=True)
        >>> logp.shape, float(logp.detach()[2])
        (torch.Size([4]), 0.0)
        >>> (logp.sum() + ent.sum()).backward()
    """
    hidden, weight, bias = _autocast_inputs(hidden, weight, bias)
    args, lead = _prepare_head(hidden, weight, bias, targets, temperature, ignore_index, backend)
    logp, ent, _ = _flp_op(*args[:5], ignore_index, bool(return_entropy), args[5])
    if return_entropy:
        return logp.view(lead), ent.view(lead)
    return logp.view(lead)


def logprobs_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float | torch.Tensor = 1.0,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probs (and entropy) of ``targets`` for callers that already hold the logits; compile-safe torch ops.

    Args:
        logits: ``[..., V]`` float logits (float64 is computed in float64; every other dtype in float32).
        targets: ``[...]`` integer ids in ``[0, V)``.
        temperature: a finite float ``>= MIN_TEMPERATURE`` or a ``[...]`` per-row tensor of such values; the logits
            are divided by it.
        return_entropy: also return the entropy of ``softmax(logits / temperature)``.

    Returns:
        ``logprobs`` ``[...]`` float32 (float64 for float64 logits), and ``entropy`` ``[...]`` of the same dtype.
        Uses ``log_softmax`` (max-shifted), so all-negative or very large logits are exact. The value checks
        (targets in range, tensor temperatures finite and ``>= MIN_TEMPERATURE``) cost one host sync; under
        ``torch.compile`` they are skipped.

    Example:
        >>> import torch, r4b_fast
        >>> r4b_fast.logprobs_from_logits(torch.tensor([[-1000.0, -1001.0]]), torch.tensor([0]))
        tensor([-0.3133])
    """
    _check_float("logits", logits)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits: expected [..., V] with V > 0, got shape {tuple(logits.shape)}")
    V = logits.shape[-1]
    _check_targets(targets, logits.shape[:-1], logits.device, ref="logits", shape_of="logits.shape[:-1]")
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    temp = None
    if isinstance(temperature, torch.Tensor):
        _check_float("temperature", temperature, shape=logits.shape[:-1], device=logits.device, ref="logits")
        temp = temperature.detach().to(compute)
    else:
        _check_temperature_float(temperature)
    if not torch.compiler.is_compiling():  # one host sync for the value checks
        bad = (targets < 0) | (targets >= V)
        checks = [bad.sum()]
        if temp is not None:
            checks.append((~(torch.isfinite(temp) & (temp >= MIN_TEMPERATURE))).sum())
        counts = torch.stack(checks).tolist()
        if counts[0]:
            first = tuple(int(i) for i in torch.nonzero(bad)[0])
            raise ValueError(f"targets: {counts[0]} value(s) outside [0, V={V}); first at index {first} "
                             f"({int(targets[first])})")
        if len(counts) > 1 and counts[1]:
            raise ValueError(f"temperature: {counts[1]} value(s) not finite or below MIN_TEMPERATURE={MIN_TEMPERATURE}")
    x = logits.to(compute)
    if temp is not None:
        x = x / temp.unsqueeze(-1)
    elif temperature != 1.0:
        x = x / float(temperature)
    logsm = torch.log_softmax(x, dim=-1)  # max-shifted: no cancellation for large or all-negative logits
    logp = logsm.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    if not return_entropy:
        return logp
    entropy = -(logsm.exp() * logsm).sum(-1)
    return logp, entropy


def _token_weights(mask_f, aggregation, normaliser, max_length):
    """``w [B, L]`` with ``loss = sum(w * loss_tok)``: verl's agg_loss modes (all linear in the per-token loss) with a
    trainer-given normaliser (global token count or sequence count) replacing the denominator."""
    if aggregation == "token-mean":
        per_token = mask_f
        denom = mask_f.sum().clamp_min(1) if normaliser is None else normaliser
    else:
        n_tok = mask_f.sum(-1, keepdim=True)
        if aggregation == "seq-mean-token-mean":
            per_token = mask_f / n_tok.clamp_min(1)
        elif aggregation == "seq-mean-token-sum":
            per_token = mask_f
        else:  # seq-mean-token-sum-norm (Dr.GRPO): divide by a constant length
            per_token = mask_f / max_length
        denom = (n_tok > 0).sum().clamp_min(1) if normaliser is None else normaliser
    return per_token / denom


def _masked_mean(x, mask_f):
    return (x * mask_f).sum() / mask_f.sum().clamp_min(1)


def _log_ratio_bounds(log_ratio_clamp) -> tuple[float | None, float | None]:
    """``log_ratio_clamp`` (None, ``c`` or ``(low, high)``) as ``(low, high)``; an infinite bound becomes None."""
    if log_ratio_clamp is None:
        return None, None
    pair = isinstance(log_ratio_clamp, (tuple, list))
    values = tuple(log_ratio_clamp) if pair else (log_ratio_clamp,)
    if len(values) != (2 if pair else 1) or any(
        isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) for v in values
    ):
        raise ValueError(f"log_ratio_clamp: expected a float or a (low, high) pair of floats, got {log_ratio_clamp!r}")
    if not pair:
        if not values[0] > 0:
            raise ValueError(f"log_ratio_clamp: expected a float > 0 (verl: 20.0), got {log_ratio_clamp!r}")
        values = (-values[0], values[0])
    low, high = values
    if not low <= 0 <= high or low == high:
        raise ValueError(f"log_ratio_clamp: expected (low, high) with low <= 0 <= high and low < high (the on-policy "
                         f"log-ratio 0 must stay inside), got {log_ratio_clamp!r}")
    return (None if math.isinf(low) else float(low)), (None if math.isinf(high) else float(high))


def fused_linear_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    entropy_coef: float = 0.0,
    temperature: float | torch.Tensor = 1.0,
    aggregation: str = "token-mean",
    normaliser: float | torch.Tensor | None = None,
    max_length: int | None = None,
    importance_level: str = "token",
    rollout_is_weights: torch.Tensor | None = None,
    log_ratio_clamp: float | tuple[float, float] | None = None,
    kl_log_ratio_clamp: float | None = None,
    kl_clamp: float | None = None,
    entropy_aggregation: str | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clipped GRPO / DAPO / Dr.GRPO / GSPO / BPO policy loss straight from the LM head's input.

    Per token (``m`` = mask): ``ratio = exp(logp - old)``, ``pg = max(-A * ratio, -A * clip(ratio, 1 - clip_low,
    1 + clip_high))``; with ``dual_clip = c > 1``, ``pg = min(pg, -c * A)`` where ``A < 0``; with rollout importance
    weights ``w``, ``pg = w * pg``; ``loss_tok = pg + beta * k3(ref, logp)`` with ``k3 = exp(ref - logp) - (ref -
    logp) - 1``; ``loss = agg(loss_tok) - entropy_coef * agg_H(entropy)``, ``agg`` the ``aggregation``, ``agg_H``
    the same unless ``entropy_aggregation`` says otherwise. The README's table "Reproducing a trainer's loss" lists
    the arguments that give TRL's and verl's losses exactly.

    Args:
        hidden: ``[B, L, H]`` last hidden states (``[B*L, H]`` also accepted).
        weight: ``[V, H]`` LM-head weight (same dtype/device); ``bias`` optional ``[V]``.
        targets: ``[B, L]`` integer ids; any value where ``mask`` is 0 (padding), ``[0, V)`` elsewhere.
        advantages: ``[B]`` per sequence (broadcast over tokens) or ``[B, L]`` per token, finite; a constant of the
            loss (detached).
        mask: ``[B, L]`` bool, or 0/1 float / integer, the response tokens that count (other values are an error).
        old_logprobs: ``[B, L]`` log-probs of the behaviour policy (detached); None = on-policy (ratio 1, gradient
            flows).
        ref_logprobs: ``[B, L]`` reference log-probs for the k3 KL (needed when ``beta != 0``; detached).
        beta, clip_low, clip_high, dual_clip, entropy_coef: as in the formula (``clip_high`` > ``clip_low`` is
            DAPO's clip-higher; ``dual_clip`` is verl's ``clip_ratio_c``).
        temperature: a finite float ``>= MIN_TEMPERATURE`` or a ``[B, L]`` per-token tensor, applied to the logits.
        aggregation: verl's ``loss_agg_mode``: ``"token-mean"`` (sum / masked tokens, DAPO), ``"seq-mean-token-mean"``
            (GRPO), ``"seq-mean-token-sum"``, ``"seq-mean-token-sum-norm"`` (Dr.GRPO: token sum / ``max_length``,
            then mean over sequences). Sequence means run over sequences with at least one masked token.
        normaliser: replaces the denominator: the global masked-token count (token-mean) or global sequence count
            (seq-mean-*) when gradients are accumulated over micro-batches; a finite number > 0 or a one-element
            tensor of one.
        max_length: the constant length of ``seq-mean-token-sum-norm`` (default ``L``).
        importance_level: ``"token"`` (PPO/GRPO) or ``"sequence"`` (GSPO: ``s_i = exp(mean_t(logp - old))`` per
            sequence, per-token ``s_i = sg[s_i] * pi(y_t) / sg[pi(y_t)]``).
        rollout_is_weights: ``[B, L]`` per token or ``[B]`` per sequence, finite and ``>= 0``, detached: multiply the
            policy-gradient term of each token (not the KL or entropy terms), as verl's ``rollout_is_weights`` (TIS,
            ``compute_policy_loss_vanilla`` / ``_gspo``) and TRL's ``importance_sampling_ratio`` (``per_token_loss *
            importance_sampling_ratio`` before the KL is added). Correct a rollout engine whose log-probs differ
            from the trainer's: pass the trainer's own log-probs as ``old_logprobs`` and
            :func:`rollout_importance_weights` of them and the rollout's log-probs here.
        log_ratio_clamp: clamp ``logp - old`` before ``exp``: a float ``c`` clamps to ``[-c, c]`` (verl's
            vanilla / dual-clip loss: ``20.0``), a pair ``(low, high)`` to ``[low, high]`` (``low <= 0 <= high``,
            either may be infinite; verl's GSPO: ``(-math.inf, 10.0)``, applied to the per-token sequence
            log-ratio). Gradients as ``torch.clamp``'s (0 outside). None: no clamp (TRL).
        kl_log_ratio_clamp, kl_clamp: verl's ``kl_penalty("k3" / "low_var_kl")``: ``ref - logp`` clamped to
            ``+-kl_log_ratio_clamp`` (``20.0``) before ``exp``, the k3 value to ``+-kl_clamp`` (``10.0``). None: none
            (TRL). Floats ``> 0``.
        entropy_aggregation: how the entropy bonus is averaged: None (default) as ``aggregation`` with ``normaliser``
            (verl's ``entropy_coeff``), or one of the aggregations over this call's tokens without ``normaliser``:
            ``"token-mean"`` is TRL's ``entropy_coef`` bonus, a token mean whatever the ``loss_type`` (with gradient
            accumulation over ``k`` micro-batches TRL divides it by ``k``: pass ``entropy_coef / k``).
        backend: for the fused log-prob op.

    Returns:
        ``(loss, metrics)``: a 0-dim float32 loss and a dict of detached 0-dim tensors: ``kl`` (masked mean k3, 0
        without ``ref_logprobs``), ``clip_frac_low`` (A < 0 and ratio < 1 - clip_low), ``clip_frac_high`` (A > 0 and
        ratio > 1 + clip_high), ``dual_clip_frac``, ``ratio_mean``, ``entropy_mean``, ``logprob_mean``, and with
        ``rollout_is_weights`` ``rollout_is_mean`` (masked mean weight).
        With gradients enabled and ``importance_level="token"``, the gradients of ``hidden`` / ``weight`` / ``bias``
        are formed during this call (3 GEMMs per token chunk, no recomputation) and ``loss.backward()`` only scales
        them by the upstream scalar; GSPO's sequence-level ratio needs every token first, so it recomputes (4 GEMMs).

    Example:
        >>> import torch, r4b_fast
        >>> h, w = torch.randn(2, 5, 8, requires_grad=True), torch.randn(32, 8)
        >>> y, m = torch.randint(0, 32, (2, 5)), torch.ones(2, 5, dtype=torch.bool)
        >>> loss, metrics = r4b_fast.fused_linear_policy_loss(h, w, y, torch.tensor([1.0, -1.0]), m)
        >>> loss.backward(); float(metrics["ratio_mean"])
        1.0
    """
    _validate_linear(hidden, weight, bias)
    if not isinstance(targets, torch.Tensor) or targets.dim() != 2:
        shape = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise ValueError(f"targets: expected [B, L], got {shape}")
    B, L = targets.shape
    H = hidden.shape[-1]
    V = weight.shape[0]
    if tuple(hidden.shape) not in ((B, L, H), (B * L, H)):
        raise ValueError(f"hidden: expected [B={B}, L={L}, H] or [B*L, H] to match targets, got {tuple(hidden.shape)}")
    dev = hidden.device
    _check_targets(targets, (B, L), dev, shape_of="[B, L]")
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask: expected a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype.is_complex:
        raise TypeError(f"mask: expected a bool or 0/1 tensor, got dtype {mask.dtype}")
    if tuple(mask.shape) != (B, L):
        raise ValueError(f"mask: expected shape {(B, L)}, got {tuple(mask.shape)}")
    if mask.device != dev:
        raise ValueError(f"mask: on device {mask.device}, but hidden is on {dev}")
    _check_float("advantages", advantages, device=dev)
    if tuple(advantages.shape) not in ((B,), (B, L)):
        raise ValueError(f"advantages: expected shape ({B},) or {(B, L)}, got {tuple(advantages.shape)}")
    for name, t in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs)):
        if t is not None:
            _check_float(name, t, shape=(B, L), device=dev)
    if rollout_is_weights is not None:
        _check_float("rollout_is_weights", rollout_is_weights, device=dev)
        if tuple(rollout_is_weights.shape) not in ((B,), (B, L)):
            raise ValueError(f"rollout_is_weights: expected shape ({B},) or {(B, L)}, got "
                             f"{tuple(rollout_is_weights.shape)}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation: expected one of {AGGREGATIONS}, got {aggregation!r}")
    if entropy_aggregation is not None and entropy_aggregation not in AGGREGATIONS:
        raise ValueError(f"entropy_aggregation: expected None or one of {AGGREGATIONS}, got {entropy_aggregation!r}")
    lr_low, lr_high = _log_ratio_bounds(log_ratio_clamp)
    for name, v in (("kl_log_ratio_clamp", kl_log_ratio_clamp), ("kl_clamp", kl_clamp)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                              or not v > 0):
            raise ValueError(f"{name}: expected a finite float > 0 (verl: 20.0 / 10.0) or None, got {v!r}")
    if importance_level not in IMPORTANCE_LEVELS:
        raise ValueError(f"importance_level: expected one of {IMPORTANCE_LEVELS}, got {importance_level!r}")
    for name, v in (("beta", beta), ("clip_low", clip_low), ("clip_high", clip_high), ("entropy_coef", entropy_coef)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{name}: expected a finite float >= 0, got {v!r}")
    if clip_low >= 1:
        raise ValueError(f"clip_low: must be < 1 (the ratio is clipped to 1 - clip_low > 0), got {clip_low}")
    if dual_clip is not None and (not isinstance(dual_clip, (int, float)) or not dual_clip > 1):
        raise ValueError(f"dual_clip: expected a float > 1 (verl's clip_ratio_c, e.g. 3.0) or None, got {dual_clip!r}")
    if beta != 0 and ref_logprobs is None:
        raise ValueError("ref_logprobs: needed for the KL penalty when beta != 0")
    if isinstance(temperature, torch.Tensor):
        _check_float("temperature", temperature, shape=(B, L), device=dev)
    if max_length is None:
        max_length = L
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length: expected a positive int, got {max_length!r}")
    if normaliser is not None:
        if isinstance(normaliser, torch.Tensor):
            if normaliser.numel() != 1:
                raise ValueError(f"normaliser: expected a scalar, got shape {tuple(normaliser.shape)}")
            if normaliser.dtype.is_complex or normaliser.dtype == torch.bool:
                raise TypeError(f"normaliser: expected a real number, got dtype {normaliser.dtype}")
            normaliser = normaliser.detach().reshape(())
        elif (isinstance(normaliser, bool) or not isinstance(normaliser, (int, float)) or not math.isfinite(normaliser)
              or not normaliser > 0):
            raise ValueError(f"normaliser: expected a finite number > 0, got {normaliser!r}")

    mask_b = mask if mask.dtype == torch.bool else mask != 0
    if not torch.compiler.is_compiling():  # value checks (one host sync); under compile only the op's checks run
        zero = torch.zeros((), dtype=torch.int64, device=dev)
        bad_target = mask_b & ((targets < 0) | (targets >= V))
        checks = {
            "advantages": (~torch.isfinite(advantages)).sum(),
            "old_logprobs": (~torch.isfinite(old_logprobs)).sum() if old_logprobs is not None else zero,
            "ref_logprobs": (~torch.isfinite(ref_logprobs)).sum() if ref_logprobs is not None else zero,
            "rollout_is_weights": (~(torch.isfinite(rollout_is_weights) & (rollout_is_weights >= 0))).sum()
            if rollout_is_weights is not None else zero,
            # NaN != 0 and 0.5 != 0: a loose mask would count such positions as whole tokens
            "mask": ((mask != 0) & (mask != 1)).sum() if mask.dtype != torch.bool else zero,
            "targets": bad_target.sum(),
            "normaliser": ((~torch.isfinite(normaliser)) | (normaliser <= 0)).sum().to(dev)
            if isinstance(normaliser, torch.Tensor) else zero,
        }  # fmt: skip
        counts = dict(zip(checks, torch.stack(list(checks.values())).tolist()))
        for name in ("advantages", "old_logprobs", "ref_logprobs"):
            if counts[name]:
                raise ValueError(f"{name}: {counts[name]} non-finite value(s)")
        if counts["rollout_is_weights"]:
            raise ValueError(f"rollout_is_weights: {counts['rollout_is_weights']} value(s) not finite or negative "
                             "(importance weights are exp(log-ratio), truncated: finite and >= 0)")
        if counts["mask"]:
            first = tuple(int(i) for i in torch.nonzero((mask != 0) & (mask != 1))[0])
            raise ValueError(f"mask: {counts['mask']} value(s) neither 0 nor 1 (a weight is not a mask); first at "
                             f"{first} ({mask[first].item()})")
        if counts["targets"]:
            first = tuple(int(i) for i in torch.nonzero(bad_target)[0])
            raise ValueError(f"targets: {counts['targets']} value(s) outside [0, V={V}) where mask is 1 (ignore-index "
                             f"labels such as -100 belong where mask is 0); first at {first} ({int(targets[first])})")
        if counts["normaliser"]:
            raise ValueError(f"normaliser: expected a finite number > 0, got {normaliser.item()!r}")

    mask_f = mask_b.float()
    ignore = -100
    # Padding positions may hold anything: their targets are ignored and their loss inputs zeroed, so no inf/NaN there
    # reaches the loss or (as 0 * inf) the gradient. A masked-in target equal to the internal ignore index (checked
    # above, but not under compile) becomes -1, so the op's own range check rejects it instead of dropping the token.
    safe_targets = torch.where(mask_b, torch.where(targets == ignore, -1, targets.long()), ignore)
    adv = advantages.detach().float()  # a constant of the loss, as in TRL and verl
    adv = (adv[:, None] if adv.dim() == 1 else adv).expand(B, L)
    adv = torch.where(mask_b, adv, 0.0)
    old = torch.where(mask_b, old_logprobs.detach().float(), 0.0) if old_logprobs is not None else None
    ref = torch.where(mask_b, ref_logprobs.detach().float(), 0.0) if ref_logprobs is not None else None
    w_tok = _token_weights(mask_f, aggregation, normaliser, max_length)
    # the entropy bonus's own weights (TRL: a token mean whatever the loss type); None: the loss's
    w_ent = None if entropy_aggregation is None else _token_weights(mask_f, entropy_aggregation, None, max_length)
    is_w = None
    if rollout_is_weights is not None:
        is_w = rollout_is_weights.detach().float()
        is_w = torch.where(mask_b, (is_w[:, None] if is_w.dim() == 1 else is_w).expand(B, L), 0.0)
    opt = (lambda v: None if v is None else float(v))
    ppo = _PPO(float(clip_low), float(clip_high), opt(dual_clip), float(beta), float(entropy_coef), lr_low, lr_high,
               opt(kl_log_ratio_clamp), opt(kl_clamp))  # fmt: skip
    temp = temperature.reshape(-1) if isinstance(temperature, torch.Tensor) else temperature
    hidden, weight, bias = _autocast_inputs(hidden, weight, bias)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if needs_grad and importance_level == "token":
        # The loss is the last op: form its gradients during the forward (3 GEMMs), attach them below.
        args, _ = _prepare_head(hidden.reshape(B * L, H), weight, bias, safe_targets.reshape(-1), temp, ignore, backend)
        h2, w2, b2, y2, t2, chosen = args
        flat = (lambda t: t.reshape(-1).contiguous() if t is not None else None)
        logp, entropy, dh, dw, db = _policy_grads_op(
            h2.detach(), w2.detach(), b2.detach() if b2 is not None else None, y2, t2, ignore, flat(adv), flat(old),
            flat(ref), flat(w_tok.detach().float()), flat(w_ent), flat(is_w), ppo.clip_low, ppo.clip_high,
            ppo.dual_clip, ppo.beta, ppo.entropy_coef, ppo.lr_low, ppo.lr_high, ppo.kl_lr_clamp, ppo.kl_clamp,
            hidden.requires_grad, weight.requires_grad, chosen,
        )  # fmt: skip
        logp, entropy = logp.view(B, L), entropy.view(B, L)
    else:
        logp, entropy = fused_linear_logprobs(
            hidden.reshape(B * L, H), weight, safe_targets.reshape(-1), bias=bias, temperature=temp,
            return_entropy=True, ignore_index=ignore, backend=backend,
        )  # fmt: skip
        logp, entropy = logp.view(B, L), entropy.view(B, L)
        if entropy_coef == 0:
            entropy = entropy.detach()
    old_or_current = logp.detach() if old is None else old
    if importance_level == "token":
        log_ratio = logp - old_or_current
    else:  # GSPO
        seq_log_ratio = ((logp - old_or_current) * mask_f).sum(-1) / mask_f.sum(-1).clamp_min(1)
        log_ratio = seq_log_ratio.detach()[:, None] + logp - logp.detach()
    loss_tok, ratio, dual_active, kl = _ppo_token_loss(log_ratio, logp, adv, ref, ppo, is_w)
    loss = (loss_tok * w_tok).sum()
    if entropy_coef != 0:
        loss = loss - ppo.entropy_coef * (entropy * (w_tok if w_ent is None else w_ent)).sum()
    if needs_grad and importance_level == "token":
        dh = dh.view(hidden.shape) if dh.numel() else dh
        loss = _attach_grads_op(loss.detach(), hidden, weight, bias, dh, dw, db)
    with torch.no_grad():
        r = ratio.detach()
        zero = mask_f.new_zeros(())
        metrics = {
            "kl": _masked_mean(kl.detach(), mask_f) if kl is not None else zero,
            "clip_frac_low": _masked_mean(((adv < 0) & (r < 1 - clip_low)).float(), mask_f),
            "clip_frac_high": _masked_mean(((adv > 0) & (r > 1 + clip_high)).float(), mask_f),
            "dual_clip_frac": _masked_mean(dual_active.float(), mask_f) if dual_active is not None else zero,
            "ratio_mean": _masked_mean(r, mask_f),
            "entropy_mean": _masked_mean(entropy.detach(), mask_f),
            "logprob_mean": _masked_mean(logp.detach(), mask_f),
        }
        if is_w is not None:
            metrics["rollout_is_mean"] = _masked_mean(is_w, mask_f)
    return loss, metrics


# ----------------------------------------------------------------------------------------------------------------
# Rollout vs trainer log-probs: importance weights and mismatch metrics
# ----------------------------------------------------------------------------------------------------------------
IS_LEVELS = ("token", "sequence")
# verl's SAFETY_BOUND (rollout_corr_helper): log-ratios are clamped to +-20 before exp
IS_LOG_RATIO_BOUND = 20.0


def _check_logprob_pair(names, a, b, mask):
    """Validate two ``[B, L]`` float log-prob tensors and a ``[B, L]`` 0/1 mask (names for the errors); return the
    bool mask. Values at masked-in positions must be finite (one host sync, skipped under compile)."""
    _check_float(names[0], a)
    if a.dim() != 2:
        raise ValueError(f"{names[0]}: expected [B, L], got shape {tuple(a.shape)}")
    _check_float(names[1], b, shape=a.shape, device=a.device, ref=names[0])
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask: expected a torch.Tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(a.shape):
        raise ValueError(f"mask: expected shape {tuple(a.shape)}, got {tuple(mask.shape)}")
    if mask.device != a.device:
        raise ValueError(f"mask: on device {mask.device}, but {names[0]} is on {a.device}")
    if mask.dtype.is_complex:
        raise TypeError(f"mask: expected a bool or 0/1 tensor, got dtype {mask.dtype}")
    mask_b = mask if mask.dtype == torch.bool else mask != 0
    if not torch.compiler.is_compiling():
        zero = torch.zeros((), dtype=torch.int64, device=a.device)
        counts = torch.stack([
            (mask_b & ~torch.isfinite(a)).sum(), (mask_b & ~torch.isfinite(b)).sum(),
            ((mask != 0) & (mask != 1)).sum() if mask.dtype != torch.bool else zero,
        ]).tolist()  # fmt: skip
        for name, n in zip(names, counts):
            if n:
                raise ValueError(f"{name}: {n} non-finite value(s) where mask is 1")
        if counts[2]:
            raise ValueError(f"mask: {counts[2]} value(s) neither 0 nor 1")
    return mask_b


def rollout_importance_weights(
    old_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    cap: float | None = 2.0,
    level: str = "token",
) -> torch.Tensor:
    """Truncated importance weights ``pi_train / pi_rollout`` that correct a rollout engine whose log-probs differ from
    the trainer's (the rollout's kernels, precision or a stale copy of the weights): pass them to
    :func:`fused_linear_policy_loss` as ``rollout_is_weights``, with ``old_logprobs`` (the trainer's) as its
    ``old_logprobs``.

    ``level="token"``: ``w_t = min(exp(old_t - rollout_t), cap)``; ``level="sequence"``: one weight per sequence,
    ``min(exp(sum_t m_t (old_t - rollout_t)), cap)``, on every token of it. The log-ratio is clamped to ``+-20``
    before ``exp``. This is verl 0.9.1's ``compute_rollout_correction_weights(log_ratio=old - rollout,
    rollout_is=level, rollout_is_threshold=cap)`` (TIS; ``algorithm.rollout_correction.rollout_is`` /
    ``rollout_is_threshold``, default 2.0) exactly, and TRL 1.16's ``importance_sampling_ratio`` with
    ``vllm_importance_sampling_mode="token_truncate"`` / ``"sequence_truncate"`` and
    ``vllm_importance_sampling_clip_max=cap`` (``clip_min=None``; TRL clamps no log-ratio, which differs only
    where it is below -20, by less than ``exp(-20) = 2e-9``; TRL's weight on padding is 1, ours and verl's 0: the
    loss masks it either way).

    Args:
        old_logprobs: ``[B, L]`` float log-probs of the sampled tokens under the training forward (detached).
        rollout_logprobs: ``[B, L]`` the rollout engine's log-probs of the same tokens (same temperature).
        mask: ``[B, L]`` bool or 0/1: the tokens that count; values elsewhere are ignored (may be anything).
        cap: truncation ``> 0`` (verl's ``rollout_is_threshold``, TRL's ``clip_max``); None: none.
        level: ``"token"`` or ``"sequence"`` (verl's ``rollout_is``).

    Returns:
        ``[B, L]`` float32 weights, detached, 0 where ``mask`` is 0.

    Example:
        >>> import torch, r4b_fast
        >>> old = torch.tensor([[-1.0, -2.0, -0.5]]); rollout = torch.tensor([[-1.5, -2.0, -3.0]])
        >>> r4b_fast.rollout_importance_weights(old, rollout, torch.tensor([[1, 1, 0]]), cap=2.0)
        tensor([[1.6487, 1.0000, 0.0000]])
    """
    mask_b = _check_logprob_pair(("old_logprobs", "rollout_logprobs"), old_logprobs, rollout_logprobs, mask)
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or math.isnan(cap)
                            or not cap > 0):
        raise ValueError(f"cap: expected a float > 0 (verl's rollout_is_threshold, default 2.0) or None, got {cap!r}")
    if level not in IS_LEVELS:
        raise ValueError(f"level: expected one of {IS_LEVELS}, got {level!r}")
    with torch.no_grad():
        d = torch.where(mask_b, old_logprobs.float() - rollout_logprobs.float(), 0.0)
        if level == "sequence":
            d = d.sum(-1, keepdim=True)
        w = torch.exp(d.clamp(-IS_LOG_RATIO_BOUND, IS_LOG_RATIO_BOUND))
        if cap is not None:
            w = w.clamp(max=float(cap))
        return torch.where(mask_b, w.expand(mask_b.shape), 0.0)


def logprob_mismatch(
    train_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """How far the rollout engine's log-probs are from the training forward's on the same tokens.

    Returns 0-dim float32 tensors (0 when no token counts): ``mismatch/abs_mean`` and ``mismatch/abs_max`` of
    ``|train - rollout|`` over the masked tokens (TRL's ``sampling/sampling_logp_difference/mean`` / ``max``) and
    ``mismatch/k3``, the masked mean of ``exp(d) - d - 1`` with ``d = train - rollout`` (verl's
    ``rollout_corr/k3_kl``, an estimate of KL(pi_rollout || pi_train)); computed in float64 with ``expm1``, so that a
    mismatch of 1e-6 gives k3 ~ 5e-13 rather than float32 rounding noise.

    Args:
        train_logprobs: ``[B, L]`` float log-probs of the sampled tokens under the training forward.
        rollout_logprobs: ``[B, L]`` the rollout's log-probs of the same tokens, at the same temperature.
        mask: ``[B, L]`` bool or 0/1: the tokens to compare (sampled ones; values elsewhere are ignored).

    Example:
        >>> import torch, r4b_fast
        >>> m = r4b_fast.logprob_mismatch(torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -2.0]]),
        ...                               torch.ones(1, 2, dtype=torch.bool))
        >>> float(m["mismatch/abs_mean"]), float(m["mismatch/abs_max"])
        (0.25, 0.5)
    """
    mask_b = _check_logprob_pair(("train_logprobs", "rollout_logprobs"), train_logprobs, rollout_logprobs, mask)
    with torch.no_grad():
        d = torch.where(mask_b, train_logprobs.double() - rollout_logprobs.double(), 0.0)
        n = mask_b.sum().clamp_min(1)
        a = d.abs()
        out = {
            "mismatch/abs_mean": a.sum() / n,
            "mismatch/abs_max": a.amax() if d.numel() else a.sum(),
            "mismatch/k3": (torch.expm1(d) - d).sum() / n,  # 0 on masked-out positions (d = 0)
        }
        return {k: v.float() for k, v in out.items()}
