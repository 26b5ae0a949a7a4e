"""The public :func:`sample`: input validation, backend choice and the ``r4b_fast::sample`` ``torch.library`` op.

Backends: ``torch`` (:mod:`.torch_backend`), ``triton`` (``r4b_fast/kernels/sampling.py``), ``cuda``
(:mod:`.cuda_backend`, ``csrc/sampling.cu``). Semantics in the package docstring (:mod:`r4b_fast.ops.sampling`).
"""

from __future__ import annotations

import math

import torch

from r4b_fast.backends import resolve_backend
from r4b_fast.ops.sampling import torch_backend
from r4b_fast.ops.sampling.cuda_backend import _launch_sample_cuda
from r4b_fast.ops.sampling.torch_backend import _sample_torch

OP_BACKENDS = ("torch", "triton", "cuda")
PREFERRED = {"cpu": ("torch",), "cuda": ("triton", "cuda", "torch")}


# ----------------------------------------------------------------------------------------------------------------
# torch.library op
# ----------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("r4b_fast::sample", mutates_args=())
def _sample_op(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    uniforms: torch.Tensor,
    candidates: int,
    backend: str,
    banned: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(tokens [B] int64, logprobs [B] fp32, row_max [B] fp32 = max of the logits, log_z [B] fp32 =
    log sum exp((logits - row_max) / T))``: ``log_softmax(logits / T)[i] = (logits[i] - row_max) / T - log_z``.
    ``banned``: None or ``[B, n]`` int64 ids in ``[-1, V)`` that cannot be sampled (-1: none); row_max, log_z and
    the log-probs stay those of the unbanned row."""
    if backend == "triton":
        from r4b_fast.kernels.sampling import launch_sample

        return launch_sample(logits.contiguous(), temperature, top_k, top_p, min_p, uniforms, banned)
    if backend == "cuda":
        return _launch_sample_cuda(logits, temperature, top_k, top_p, min_p, uniforms, banned)
    return _sample_torch(logits, temperature, top_k, top_p, min_p, uniforms, candidates, banned)


@_sample_op.register_fake
def _(logits, temperature, top_k, top_p, min_p, uniforms, candidates, backend, banned=None):
    B = logits.shape[0]
    return (logits.new_empty((B,), dtype=torch.int64), logits.new_empty((B,), dtype=torch.float32),
            logits.new_empty((B,), dtype=torch.float32), logits.new_empty((B,), dtype=torch.float32))  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------------------
def _per_row(name, value, B, device, dtype, lo, hi, lo_open=False) -> torch.Tensor:
    """A scalar or ``[B]`` tensor parameter as a ``[B]`` tensor; Python scalars are range-checked here (no sync)."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            value = value.reshape(1).expand(B)
        if value.shape != (B,):
            raise ValueError(f"{name}: expected a scalar or a [B] = ({B},) tensor, got shape {tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"{name}: on device {value.device}, but logits are on {device}")
        if dtype == torch.int64 and (value.dtype.is_floating_point or value.dtype == torch.bool):
            raise TypeError(f"{name}: expected an integer tensor, got dtype {value.dtype}")
        return value.to(dtype)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number or a [B] tensor, got {type(value).__name__}")
    if dtype == torch.int64 and not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {value!r}")
    if not math.isfinite(value) or value < lo or value > hi or (lo_open and value == lo):
        interval = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise ValueError(f"{name}: expected a value in {interval}, got {value!r}")
    return torch.full((B,), value, dtype=dtype, device=device)


def _check_tensor_values(logits, params) -> None:
    """Range checks of tensor parameters and logits in one host sync."""
    temperature, top_k, top_p, min_p = params
    checks = torch.stack([
        (torch.isnan(logits) | (logits == float("inf"))).sum(),
        (logits == float("-inf")).all(1).sum(),
        (~torch.isfinite(temperature) | (temperature < 0)).sum(),
        (top_k < 0).sum(),
        (~(top_p > 0) | (top_p > 1)).sum(),
        (~(min_p >= 0) | (min_p > 1)).sum(),
    ]).tolist()  # fmt: skip
    names = [
        "logits: {} NaN or +inf value(s); mask tokens with -inf, never NaN",
        "logits: {} row(s) are entirely -inf: nothing can be sampled",
        "temperature: {} value(s) negative or non-finite (0 means greedy)",
        "top_k: {} value(s) < 0 (0 means off)",
        "top_p: {} value(s) outside (0, 1]",
        "min_p: {} value(s) outside [0, 1]",
    ]
    for n, msg in zip(checks, names):
        if n:
            raise ValueError(msg.format(n))


def _prepare(logits, temperature, top_k, top_p, min_p, check_values):
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits: expected a torch.Tensor, got {type(logits).__name__}")
    if not logits.dtype.is_floating_point:
        raise TypeError(f"logits: expected a floating-point tensor, got dtype {logits.dtype}")
    if logits.dim() != 2 or logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"logits: expected a non-empty [B, V] tensor, got shape {tuple(logits.shape)}")
    B, dev = logits.shape[0], logits.device
    params = (
        _per_row("temperature", temperature, B, dev, torch.float32, 0.0, math.inf),
        _per_row("top_k", top_k, B, dev, torch.int64, 0, 2**62),
        _per_row("top_p", top_p, B, dev, torch.float32, 0.0, 1.0, lo_open=True),
        _per_row("min_p", min_p, B, dev, torch.float32, 0.0, 1.0),
    )
    if check_values:
        _check_tensor_values(logits, params)
    return params


def _uniforms(B, device, generator, uniforms=None) -> torch.Tensor:
    if uniforms is not None:
        if generator is not None:
            raise ValueError("uniforms: give either uniforms or generator, not both")
        if not isinstance(uniforms, torch.Tensor) or not uniforms.dtype.is_floating_point:
            got = uniforms.dtype if isinstance(uniforms, torch.Tensor) else type(uniforms).__name__
            raise TypeError(f"uniforms: expected a float tensor, got {got}")
        if tuple(uniforms.shape) != (B,):
            raise ValueError(f"uniforms: expected shape ({B},), got {tuple(uniforms.shape)}")
        if uniforms.device != torch.device(device):
            raise ValueError(f"uniforms: on device {uniforms.device}, but logits are on {device}")
        return uniforms.float()
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
    if generator is not None and generator.device != torch.device(device) and torch.device(device).type != "cpu":
        u = torch.rand(B, generator=generator, device=generator.device).to(device)
    else:
        u = torch.rand(B, generator=generator, device=device)
    return u


def _sample_impl(logits, temperature, top_k, top_p, min_p, generator, backend, check_values, uniforms=None,
                 banned=None):
    params = _prepare(logits, temperature, top_k, top_p, min_p, check_values)
    chosen = resolve_backend(backend, logits.device, OP_BACKENDS, PREFERRED, "sample")
    u = _uniforms(logits.shape[0], logits.device, generator, uniforms)
    if uniforms is not None and check_values and bool(((u < 0) | (u >= 1) | u.isnan()).any()):
        raise ValueError("uniforms: values must lie in [0, 1)")
    # one top-k for the whole batch: k + 1 candidates hold its filtered set (the extra one detects boundary ties)
    cap = torch_backend.CANDIDATES  # read at call time (tests lower it)
    candidates = min(cap, top_k + 1) if isinstance(top_k, int) and top_k > 0 else cap
    tokens, logprobs, row_max, log_z = _sample_op(logits.detach(), *params, u, candidates, chosen, banned)
    return tokens, logprobs, row_max, log_z, params[0]


def sample(
    logits: torch.Tensor,
    *,
    temperature: float | torch.Tensor = 1.0,
    top_k: int | torch.Tensor = 0,
    top_p: float | torch.Tensor = 1.0,
    min_p: float | torch.Tensor = 0.0,
    generator: torch.Generator | None = None,
    backend: str | None = None,
    check_values: bool = True,
    uniforms: torch.Tensor | None = None,
    return_invalid: bool = False,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample one token per row with temperature, top-k, top-p and min-p, without sorting the vocabulary.

    Args:
        logits: ``[B, V]`` float32/bfloat16/float16/float64; ``-inf`` masks a token; NaN/+inf are errors.
        temperature: float or ``[B]`` tensor, ``>= 0``; 0 means greedy for that row.
        top_k: int or ``[B]`` integer tensor, ``>= 0``; 0 means off. Ties at the k-th value are kept.
        top_p: float or ``[B]`` tensor in ``(0, 1]``; 1 means off.
        min_p: float or ``[B]`` tensor in ``[0, 1]``; keep ``p >= min_p * max p``; 0 means off.
        generator: the source of the one uniform per row (``torch.rand(B)``); same state -> same tokens.
        backend: ``"torch"``, ``"triton"`` or ``"cuda"``; default ``$R4B_FAST_BACKEND`` or the best for the device.
        check_values: check tensor parameters and logits for bad values (one host sync). Python scalars are
            always checked, without a sync; pass False in a hot loop on GPU.
        uniforms: ``[B]`` float noise in ``[0, 1)``, one per row, used instead of drawing it from ``generator``:
            data-parallel ranks that each sample a slice of one global batch draw the global batch's
            ``torch.rand(B_global, generator=g)`` and pass their slice, and then sample exactly what one process
            sampling the whole batch would.
        return_invalid: also return ``invalid``, a ``[B]`` bool mask of the rows that had nothing to sample (see
            below), computed on the device with no host sync. Off by default: ``tokens, logprobs = sample(...)``
            keeps working.

    Returns:
        ``(tokens [B] int64, logprobs [B] float32)``, or ``(tokens, logprobs, invalid [B] bool)`` with
        ``return_invalid=True``. ``logprobs = log_softmax(logits / T)[token]`` under the temperature-scaled
        **unfiltered** distribution (greedy rows: ``T = 1``), as TRL/vLLM use for old log-probs. Tokens are always
        in ``[0, V)``.

    Invalid rows (only with ``check_values=False``, which otherwise raises on them): a row with no finite logit
    (every logit ``-inf`` or NaN, or a ``+inf`` among them) has nothing to sample. Its token is the first index of
    its maximum (**token 0** for an all-NaN / all ``-inf`` row), a placeholder, and its log-prob is **NaN** (a loss
    on it fails loudly, never a silent wrong value). ``invalid`` flags exactly those rows (``logprobs.isnan()``
    agrees): mask them out, or stop the rollout.

    Example:
        >>> import torch
        >>> from r4b_fast.ops.sampling import sample
        >>> logits = torch.tensor([[0.0, 5.0, 1.0], [2.0, 0.0, 0.0]])
        >>> tokens, logprobs = sample(logits, temperature=torch.tensor([0.0, 1.0]), top_k=1)
        >>> tokens.tolist()
        [1, 0]
    """
    if not isinstance(return_invalid, bool):
        raise TypeError(f"return_invalid: expected a bool, got {return_invalid!r}")
    tokens, logprobs, row_max, *_ = _sample_impl(logits, temperature, top_k, top_p, min_p, generator, backend,
                                                 check_values, uniforms)  # fmt: skip
    if return_invalid:
        return tokens, logprobs, ~torch.isfinite(row_max)  # no finite logit: NaN log-prob, placeholder token
    return tokens, logprobs

