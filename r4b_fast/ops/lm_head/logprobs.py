"""The public per-token ops: :func:`fused_linear_logprobs` (the fused LM head, backend dispatch) and
:func:`logprobs_from_logits` (for callers that already hold the logits)."""

from __future__ import annotations

import math

import torch

from r4b_fast.backends import resolve_backend
from r4b_fast.ops.lm_head.checks import (
    MIN_TEMPERATURE,
    _check_float,
    _check_targets,
    _check_temperature_float,
    _temperature_tensor,
    _validate_linear,
)
from r4b_fast.ops.lm_head.registration import _flp_op

OP_BACKENDS = ("torch", "triton")
PREFERRED = {"cpu": ("torch",), "cuda": ("triton", "torch")}


def _autocast_inputs(hidden, weight, bias):
    """Under ``torch.autocast`` on ``hidden``'s device: the LM head in the autocast dtype, like ``nn.Linear`` (a
    custom op is not cast by autocast itself; fp32 master weights would otherwise run an fp32 head)."""
    if not isinstance(hidden, torch.Tensor) or not torch.is_autocast_enabled(hidden.device.type):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(hidden.device.type)

    def cast(t):
        return t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype.is_floating_point else t

    return cast(hidden), cast(weight), cast(bias)


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
        ignore_index: rows with this target give 0 (log-prob and entropy) and no gradient, whatever their hidden
            state holds (a NaN or inf there reaches no gradient).
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
    logp, ent, _, _ = _flp_op(*args[:5], ignore_index, bool(return_entropy), args[5])
    if return_entropy:
        return logp.view(lead), ent.view(lead)
    return logp.view(lead)


def _check_logits_values(targets, temp, V):
    """Targets in ``[0, V)`` and tensor temperatures finite and ``>= MIN_TEMPERATURE``: one host sync."""
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
        _check_logits_values(targets, temp, V)
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
