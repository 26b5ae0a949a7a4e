"""Fused LM-head log-probs, entropy and the GRPO / DAPO / Dr.GRPO / GSPO / BPO policy loss, never materialising the
``[T, V]`` logits.

Implementations, by name:
- ``fused_linear_logprobs_ref``: eager fp32 reference; materialises the logits (the oracle and the benchmark baseline).
- ``_flp_forward_torch`` / ``_flp_backward_torch``: chunked over tokens and vocabulary with an online fp32
  log-sum-exp; the backward recomputes each chunk's logits from the saved per-row log-sum-exp. The CPU path: extra
  memory is a couple of ``[chunk_t, chunk_v]`` fp32 buffers (``CHUNK_ELEMENTS`` elements each).
- triton: ``kernels/fused_linear_logprobs.py``: a tiled matmul fused with the online log-sum-exp, target gather and
  entropy (forward), and one kernel that recomputes logit tiles and accumulates dHidden / dWeight with atomics.
- cuda: none. The op is a GEMM with a fused epilogue; Triton's ``tl.dot`` tiles reach tensor-core GEMM speed with the
  epilogue fused, and a hand-written CUDA GEMM would not beat it (nor cuBLAS + a separate epilogue kernel, which is what
  the torch backend does on GPU).

Math, with ``x = (hidden @ weight.T + bias) / temperature`` per row, ``p = softmax(x)``, ``lse = logsumexp(x)``:
``logp = x[y] - lse``; ``entropy = lse - sum(p * x)``; ``d logp / dx = onehot(y) - p``;
``d entropy / dx = -p * (x - lse + entropy)``. Rows whose target is ``ignore_index`` give 0 and no gradient.

Public functions: :func:`fused_linear_logprobs`, :func:`logprobs_from_logits`, :func:`fused_linear_policy_loss`.
``fused_linear_logprobs`` is the torch.library op ``r4b_fast::fused_linear_logprobs`` (forward) with autograd through
``r4b_fast::fused_linear_logprobs_backward``; the policy loss is plain torch ops on its ``[T]`` outputs, so all three
work under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import math

import torch

from r4b_fast.backends import resolve_backend

OP_BACKENDS = ("torch", "triton")
PREFERRED = {"cpu": ("torch",), "cuda": ("triton", "torch")}
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
IMPORTANCE_LEVELS = ("token", "sequence")
CHUNK_ELEMENTS = 1 << 20  # fp32 elements of one [chunk_t, chunk_v] logit chunk in the torch backend (4 MiB)
MAX_CHUNK_TOKENS = 4096
_LOW_PRECISION = (torch.bfloat16, torch.float16)


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
# torch backend: chunks over tokens and vocabulary, online log-sum-exp in fp32.
# ----------------------------------------------------------------------------------------------------------------
def _chunks(T: int, V: int) -> tuple[int, int]:
    ct = max(1, min(T, MAX_CHUNK_TOKENS))
    cv = max(1, min(V, CHUNK_ELEMENTS // ct))
    return ct, cv


def _scaled_hidden(h, inv_temp):
    """``h / temperature`` per row (input dtype): the temperature folded into the matmul."""
    return h * inv_temp[:, None].to(h.dtype)


def _chunk_logits(h, hs, weight, bias, v0, v1, inv_temp):
    """fp32 ``x = (h @ W[v0:v1].T + b) / temperature`` for one chunk; the matmul runs in the input dtype.

    fp32 without bias: ``x = hs @ W.T`` with ``hs = h / temperature`` (no pass over the chunk for the temperature).
    """
    w = weight[v0:v1]
    if hs is not None:
        return hs @ w.T
    z = torch.addmm(bias[v0:v1], h, w.T) if bias is not None else h @ w.T
    if z.dtype == torch.float32:
        return z.mul_(inv_temp[:, None])
    return torch.mul(z, inv_temp[:, None])  # 16-bit logits -> fp32 in the same pass


def _rowdot(a, b):
    """``(a * b).sum(1)`` as a batched dot product: one pass, no [rows, cols] temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _flp_forward_torch(hidden, weight, bias, targets, temperature, ignore_index, with_entropy):
    T, V = hidden.shape[0], weight.shape[0]
    ct, cv = _chunks(T, V)
    fold = hidden.dtype == torch.float32 and bias is None
    f32 = dict(dtype=torch.float32, device=hidden.device)
    logp, entropy, lse_out = torch.empty(T, **f32), torch.zeros(T, **f32), torch.empty(T, **f32)
    for t0 in range(0, T, ct):
        t1 = min(T, t0 + ct)
        h, y, inv_temp = hidden[t0:t1], targets[t0:t1], 1.0 / temperature[t0:t1]
        hs = _scaled_hidden(h, inv_temp) if fold else None
        m = s = u = None  # running max, sum exp(x - m), sum exp(x - m) * (x - m)
        xy = torch.zeros(t1 - t0, **f32)
        for v0 in range(0, V, cv):
            v1 = min(V, v0 + cv)
            x = _chunk_logits(h, hs, weight, bias, v0, v1, inv_temp)
            inside = (y >= v0) & (y < v1)
            xy += torch.where(inside, x.gather(1, (y - v0).clamp(0, v1 - v0 - 1)[:, None]).squeeze(1), 0.0)
            m_new = x.amax(1) if m is None else torch.maximum(m, x.amax(1))
            x.sub_(m_new[:, None])  # x - m_new <= 0
            e = x.exp()
            s_c = e.sum(1)
            u_c = _rowdot(e, x) if with_entropy else None
            if m is None:
                s, u = s_c, u_c
            else:
                delta = m - m_new  # <= 0
                scale = delta.exp()
                if with_entropy:  # rescale sum e * (x - m_old) to the new max: + delta * s_old
                    u = scale * (u + delta * s) + u_c
                s = scale * s + s_c
            m = m_new
            del x, e
        lse = m + s.log()
        valid = y != ignore_index
        logp[t0:t1] = torch.where(valid, xy - lse, 0.0)
        lse_out[t0:t1] = lse
        if with_entropy:
            entropy[t0:t1] = torch.where(valid, s.log() - u / s, 0.0)
    return logp, entropy, lse_out


def _flp_backward_torch(grad_logp, grad_ent, hidden, weight, bias, targets, temperature, lse, entropy, ignore_index):
    """dHidden, dWeight, dBias (dBias empty without bias) in the input dtype; each chunk's logits recomputed.

    Works with ``dx`` = d loss / d (logits / temperature):
    ``dx = -p * (gl + gh * (entropy + log p)) + gl * onehot``, then ``dHidden = (dx @ W) / temperature``,
    ``dWeight = dx.T @ (h / temperature)``, ``dBias = (1 / temperature) @ dx`` (no pass over a chunk for it).
    """
    T, V = hidden.shape[0], weight.shape[0]
    ct, cv = _chunks(T, V)
    fold = hidden.dtype == torch.float32 and bias is None
    low = hidden.dtype != torch.float32
    dh = torch.zeros(T, hidden.shape[1], dtype=torch.float32, device=hidden.device)
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    db = torch.zeros(V, dtype=torch.float32, device=weight.device) if bias is not None else None
    valid = targets != ignore_index
    inv_temp_all = 1.0 / temperature
    gl_all = torch.where(valid, grad_logp, 0.0)
    if grad_ent is not None:
        gh_all = torch.where(valid, grad_ent, 0.0)
        a0_all = -(gl_all + gh_all * entropy)  # dx = p * (a0 + a1 * log p)
        a1_all = -gh_all
    for t0 in range(0, T, ct):
        t1 = min(T, t0 + ct)
        h, y, inv_temp, lse_c = hidden[t0:t1], targets[t0:t1], inv_temp_all[t0:t1], lse[t0:t1]
        hs = _scaled_hidden(h, inv_temp)
        gl = gl_all[t0:t1]
        for v0 in range(0, V, cv):
            v1 = min(V, v0 + cv)
            logq = _chunk_logits(h, hs if fold else None, weight, bias, v0, v1, inv_temp).sub_(lse_c[:, None])
            if grad_ent is not None:
                p = logq.exp()
                dx = logq.mul_(a1_all[t0:t1, None]).add_(a0_all[t0:t1, None]).mul_(p)
                del p
            else:
                dx = logq.exp_().mul_(-gl[:, None])
            inside = (y >= v0) & (y < v1)
            idx = (y - v0).clamp(0, v1 - v0 - 1)[:, None]
            dx.scatter_add_(1, idx, torch.where(inside, gl, 0.0)[:, None])
            if db is not None:
                db[v0:v1].addmv_(dx.T, inv_temp)
            if low:
                dxl = dx.to(hidden.dtype)
                del dx
                dh[t0:t1] += dxl @ weight[v0:v1]
                dw[v0:v1] += dxl.T @ hs
                del dxl
            else:
                dh[t0:t1].addmm_(dx, weight[v0:v1])
                dw[v0:v1].addmm_(dx.T, hs)
                del dx
    dh.mul_(inv_temp_all[:, None])
    db_out = db.to(bias.dtype) if db is not None else hidden.new_empty(0)
    return dh.to(hidden.dtype), dw.to(weight.dtype), db_out


# ----------------------------------------------------------------------------------------------------------------
# torch.library ops
# ----------------------------------------------------------------------------------------------------------------
def _check_values(targets, temperature, vocab, ignore_index):
    """Raise ValueError for targets out of range or bad temperatures: one host sync."""
    valid = targets != ignore_index
    bad_t = (valid & ((targets < 0) | (targets >= vocab))).sum()
    bad_temp = (~(torch.isfinite(temperature) & (temperature > 0))).sum()
    n_bad_t, n_bad_temp = torch.stack([bad_t, bad_temp]).tolist()
    if n_bad_t:
        bad = valid & ((targets < 0) | (targets >= vocab))
        first = int(torch.nonzero(bad)[0, 0])
        raise ValueError(
            f"targets: {n_bad_t} value(s) outside [0, V={vocab}) and not ignore_index={ignore_index}; "
            f"first at row {first} ({int(targets[first])})"
        )
    if n_bad_temp:
        raise ValueError(f"temperature: {n_bad_temp} row(s) not finite and > 0")


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
    _check_values(targets, temperature, weight.shape[0], ignore_index)
    if backend == "triton":
        from r4b_fast.kernels.fused_linear_logprobs import launch_forward

        return launch_forward(hidden, weight, bias, targets, temperature, ignore_index, with_entropy)
    return _flp_forward_torch(hidden, weight, bias, targets, temperature, ignore_index, with_entropy)


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
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_logp = grad_logp.float().contiguous()
    grad_ent = grad_ent.float().contiguous() if grad_ent is not None else None
    if backend == "triton":
        from r4b_fast.kernels.fused_linear_logprobs import launch_backward

        return launch_backward(grad_logp, grad_ent, hidden, weight, bias, targets, temperature, lse, entropy,
                               ignore_index)
    return _flp_backward_torch(grad_logp, grad_ent, hidden, weight, bias, targets, temperature, lse, entropy,
                               ignore_index)


@_flp_backward_op.register_fake
def _(grad_logp, grad_ent, hidden, weight, bias, targets, temperature, lse, entropy, ignore_index, backend):
    db = bias.new_empty(bias.shape) if bias is not None else hidden.new_empty(0)
    return hidden.new_empty(hidden.shape), weight.new_empty(weight.shape), db


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
    dh, dw, db = _flp_backward_op(
        grad_logp, grad_ent, hidden, weight, bias if ctx.has_bias else None, targets, temperature, lse, entropy,
        ctx.ignore_index, ctx.backend,
    )  # fmt: skip
    return dh, dw, (db if ctx.has_bias else None), None, None, None, None, None


_flp_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------------------
def _check_float(name, t, shape=None, dtype=None, device=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name}: dtype {t.dtype} differs from hidden's {dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: on device {t.device}, but hidden is on {device}")


def _check_targets(targets, shape, device):
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets: expected a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets: expected an integer tensor, got dtype {targets.dtype}")
    if tuple(targets.shape) != tuple(shape):
        raise ValueError(f"targets: expected shape {tuple(shape)} (hidden.shape[:-1]), got {tuple(targets.shape)}")
    if targets.device != device:
        raise ValueError(f"targets: on device {targets.device}, but hidden is on {device}")


def _temperature_tensor(temperature, shape, device):
    if isinstance(temperature, torch.Tensor):
        _check_float("temperature", temperature, shape=shape, device=device)
        return temperature.detach().float().reshape(-1).contiguous()
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature: expected a float or a tensor, got {type(temperature).__name__}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature: expected a finite float > 0, got {temperature!r}")
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
    if hidden.dim() < 2:
        raise ValueError(f"hidden: expected [..., H] with at least 2 dims, got shape {tuple(hidden.shape)}")
    _check_float("weight", weight, dtype=hidden.dtype, device=hidden.device)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight: expected shape [V, H={hidden.shape[-1]}], got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight: empty vocabulary (V = 0)")
    if bias is not None:
        _check_float("bias", bias, shape=(weight.shape[0],), dtype=hidden.dtype, device=hidden.device)


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
        temperature: a float > 0, or a ``[...]`` per-row tensor (not differentiated).
        return_entropy: also return the entropy of each row's distribution (differentiable too).
        ignore_index: rows with this target give 0 (log-prob and entropy) and no gradient.
        backend: ``"torch"`` or ``"triton"``; default ``$R4B_FAST_BACKEND`` or the best for the device.

    Returns:
        ``logprobs`` (``[...]`` float32), or ``(logprobs, entropy)`` with ``return_entropy=True``. Differentiable in
        ``hidden``, ``weight`` and ``bias``; the backward recomputes the logits chunk by chunk. The value checks
        (targets in range, temperatures finite and > 0) cost one host sync per call, also under torch.compile.

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
    _validate_linear(hidden, weight, bias)
    lead = tuple(hidden.shape[:-1])
    _check_targets(targets, lead, hidden.device)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    if 0 <= ignore_index < weight.shape[0]:
        raise ValueError(f"ignore_index: {ignore_index} is a valid token id in [0, V={weight.shape[0]})")
    temp = _temperature_tensor(temperature, lead, hidden.device)
    chosen = resolve_backend(backend, hidden.device, OP_BACKENDS, PREFERRED, "fused_linear_logprobs")
    h2 = hidden.reshape(-1, hidden.shape[-1])
    if math.prod(lead) == 0:
        raise ValueError(f"hidden: no rows (shape {tuple(hidden.shape)})")
    logp, ent, _ = _flp_op(
        h2.contiguous(), weight.contiguous(), bias.contiguous() if bias is not None else None,
        targets.reshape(-1).to(torch.int64).contiguous(), temp, ignore_index, bool(return_entropy), chosen,
    )  # fmt: skip
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
        logits: ``[..., V]`` float logits (any float dtype; the computation runs in fp32).
        targets: ``[...]`` integer ids in ``[0, V)``.
        temperature: a float > 0 or a ``[...]`` per-row tensor; the logits are divided by it.
        return_entropy: also return the entropy of ``softmax(logits / temperature)``.

    Returns:
        ``logprobs`` ``[...]`` float32 (and ``entropy`` ``[...]`` float32). Uses ``log_softmax`` (max-shifted), so
        all-negative or very large logits are exact.

    Example:
        >>> import torch, r4b_fast
        >>> r4b_fast.logprobs_from_logits(torch.tensor([[-1000.0, -1001.0]]), torch.tensor([0]))
        tensor([-0.3133])
    """
    _check_float("logits", logits)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits: expected [..., V] with V > 0, got shape {tuple(logits.shape)}")
    _check_targets(targets, logits.shape[:-1], logits.device)
    if isinstance(temperature, torch.Tensor):
        _check_float("temperature", temperature, shape=logits.shape[:-1], device=logits.device)
        x = logits.float() / temperature.float().unsqueeze(-1)
    else:
        _temperature_tensor(temperature, (1,), logits.device)  # validates the float
        x = logits.float() / float(temperature) if temperature != 1.0 else logits.float()
    logsm = torch.log_softmax(x, dim=-1)  # max-shifted: no cancellation for large or all-negative logits
    logp = logsm.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    if not return_entropy:
        return logp
    entropy = -(logsm.exp() * logsm).sum(-1)
    return logp, entropy


def _agg(loss_tok, mask_f, aggregation, normaliser, max_length):
    """verl's agg_loss with a trainer-given normaliser (global token count or sequence count)."""
    if aggregation == "token-mean":
        denom = mask_f.sum().clamp_min(1) if normaliser is None else normaliser
        return (loss_tok * mask_f).sum() / denom
    tok_sum = (loss_tok * mask_f).sum(-1)
    n_tok = mask_f.sum(-1)
    if aggregation == "seq-mean-token-mean":
        per_seq = tok_sum / n_tok.clamp_min(1)
    elif aggregation == "seq-mean-token-sum":
        per_seq = tok_sum
    else:  # seq-mean-token-sum-norm (Dr.GRPO): divide by a constant length
        per_seq = tok_sum / max_length
    denom = (n_tok > 0).sum().clamp_min(1) if normaliser is None else normaliser
    return per_seq.sum() / denom


def _masked_mean(x, mask_f):
    return (x * mask_f).sum() / mask_f.sum().clamp_min(1)


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
    backend: str | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clipped GRPO / DAPO / Dr.GRPO / GSPO / BPO policy loss straight from the LM head's input.

    Per token (``m`` = mask): ``ratio = exp(logp - old)``, ``pg = max(-A * ratio, -A * clip(ratio, 1 - clip_low,
    1 + clip_high))``; with ``dual_clip = c > 1``, ``pg = min(pg, -c * A)`` where ``A < 0``; ``loss_tok = pg + beta *
    k3(ref, logp) - entropy_coef * entropy`` with ``k3 = exp(ref - logp) - (ref - logp) - 1``; then aggregated.

    Args:
        hidden: ``[B, L, H]`` last hidden states (``[B*L, H]`` also accepted).
        weight: ``[V, H]`` LM-head weight (same dtype/device); ``bias`` optional ``[V]``.
        targets: ``[B, L]`` integer ids; any value where ``mask`` is 0 (padding), ``[0, V)`` elsewhere.
        advantages: ``[B]`` per sequence (broadcast over tokens) or ``[B, L]`` per token, finite.
        mask: ``[B, L]`` bool or 0/1 float, the response tokens that count.
        old_logprobs: ``[B, L]`` log-probs of the behaviour policy; None = on-policy (ratio 1, gradient flows).
        ref_logprobs: ``[B, L]`` reference log-probs for the k3 KL (needed when ``beta != 0``).
        beta, clip_low, clip_high, dual_clip, entropy_coef: as in the formula (``clip_high`` > ``clip_low`` is
            DAPO's clip-higher; ``dual_clip`` is verl's ``clip_ratio_c``).
        temperature: float > 0 or ``[B, L]`` per-token tensor, applied to the logits.
        aggregation: verl's ``loss_agg_mode``: ``"token-mean"`` (sum / masked tokens, DAPO), ``"seq-mean-token-mean"``
            (GRPO), ``"seq-mean-token-sum"``, ``"seq-mean-token-sum-norm"`` (Dr.GRPO: token sum / ``max_length``,
            then mean over sequences). Sequence means run over sequences with at least one masked token.
        normaliser: replaces the denominator: the global masked-token count (token-mean) or global sequence count
            (seq-mean-*) when gradients are accumulated over micro-batches.
        max_length: the constant length of ``seq-mean-token-sum-norm`` (default ``L``).
        importance_level: ``"token"`` (PPO/GRPO) or ``"sequence"`` (GSPO: ``s_i = exp(mean_t(logp - old))`` per
            sequence, per-token ``s_i = sg[s_i] * pi(y_t) / sg[pi(y_t)]``).
        backend: for the fused log-prob op.

    Returns:
        ``(loss, metrics)``: a 0-dim float32 loss and a dict of detached 0-dim tensors: ``kl`` (masked mean k3, 0
        without ``ref_logprobs``), ``clip_frac_low`` (A < 0 and ratio < 1 - clip_low), ``clip_frac_high`` (A > 0 and
        ratio > 1 + clip_high), ``dual_clip_frac``, ``ratio_mean``, ``entropy_mean``, ``logprob_mean``.

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
    if tuple(hidden.shape) not in ((B, L, H), (B * L, H)):
        raise ValueError(f"hidden: expected [B={B}, L={L}, H] or [B*L, H] to match targets, got {tuple(hidden.shape)}")
    dev = hidden.device
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask: expected a torch.Tensor, got {type(mask).__name__}")
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
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation: expected one of {AGGREGATIONS}, got {aggregation!r}")
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
        elif isinstance(normaliser, bool) or not isinstance(normaliser, (int, float)) or not normaliser > 0:
            raise ValueError(f"normaliser: expected a number > 0, got {normaliser!r}")
    if not torch.compiler.is_compiling():  # value checks (one host sync); under compile only the op's checks run
        checks = [(~torch.isfinite(advantages)).sum()]
        checks += [(~torch.isfinite(t)).sum() if t is not None else checks[0] * 0 for t in (old_logprobs, ref_logprobs)]
        n_adv, n_old, n_ref = torch.stack(checks).tolist()
        for name, n in (("advantages", n_adv), ("old_logprobs", n_old), ("ref_logprobs", n_ref)):
            if n:
                raise ValueError(f"{name}: {n} non-finite value(s)")

    mask_b = mask if mask.dtype == torch.bool else mask != 0
    mask_f = mask_b.float()
    ignore = -100
    safe_targets = torch.where(mask_b, targets.long(), ignore)  # padding targets may be anything
    logp, entropy = fused_linear_logprobs(
        hidden.reshape(B * L, H), weight, safe_targets.reshape(-1), bias=bias,
        temperature=temperature.reshape(-1) if isinstance(temperature, torch.Tensor) else temperature,
        return_entropy=True, ignore_index=ignore, backend=backend,
    )  # fmt: skip
    logp, entropy = logp.view(B, L), entropy.view(B, L)
    if entropy_coef == 0:
        entropy = entropy.detach()
    old = logp.detach() if old_logprobs is None else old_logprobs.float()
    adv = (advantages.float()[:, None] if advantages.dim() == 1 else advantages.float()).expand(B, L)
    if importance_level == "token":
        log_ratio = logp - old
    else:  # GSPO
        seq_log_ratio = ((logp - old) * mask_f).sum(-1) / mask_f.sum(-1).clamp_min(1)
        log_ratio = seq_log_ratio.detach()[:, None] + logp - logp.detach()
    ratio = torch.exp(log_ratio)
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
    pg = torch.maximum(pg1, pg2)
    if dual_clip is not None:
        pg3 = -adv * dual_clip
        dual_active = (adv < 0) & (pg > pg3)
        pg = torch.where(adv < 0, torch.minimum(pg, pg3), pg)
    loss_tok = pg
    if ref_logprobs is not None:
        d = ref_logprobs.float() - logp
        kl = torch.exp(d) - d - 1
        if beta != 0:
            loss_tok = loss_tok + beta * kl
    if entropy_coef != 0:
        loss_tok = loss_tok - entropy_coef * entropy
    loss = _agg(loss_tok, mask_f, aggregation, normaliser, max_length)
    with torch.no_grad():
        r = ratio.detach()
        zero = mask_f.new_zeros(())
        metrics = {
            "kl": _masked_mean(kl.detach(), mask_f) if ref_logprobs is not None else zero,
            "clip_frac_low": _masked_mean(((adv < 0) & (r < 1 - clip_low)).float(), mask_f),
            "clip_frac_high": _masked_mean(((adv > 0) & (r > 1 + clip_high)).float(), mask_f),
            "dual_clip_frac": _masked_mean(dual_active.float(), mask_f) if dual_clip is not None else zero,
            "ratio_mean": _masked_mean(r, mask_f),
            "entropy_mean": _masked_mean(entropy.detach(), mask_f),
            "logprob_mean": _masked_mean(logp.detach(), mask_f),
        }
    return loss, metrics
