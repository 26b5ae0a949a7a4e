"""Argument validation of the LM-head ops: types, shapes, dtypes and devices at the public boundary (no sync), and the
value checks that need the data (one host sync per call, batched into one ``tolist``)."""

from __future__ import annotations

import math

import torch

# The smallest temperature the log-prob ops accept. They scale the logits by 1 / T in fp32: at T = 1e-38 (1 / T is
# still finite) a logit of 4 already overflows to inf and the result is NaN. At 1e-6 only logits beyond 3e32 would;
# a rollout colder than that is greedy decoding, whose log-probs are those at T = 1 (as the sampler reports them).
MIN_TEMPERATURE = 1e-6
# hidden / weight dtypes of the fused LM head: the epilogues compute in fp32, so float64 would be silently rounded
LM_HEAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# old / ref log-probs above this (at tokens that count) are not log-probabilities: rounding can lift a log-prob of a
# near-certain token a little above 0, nothing more
LOGPROB_TOLERANCE = 1e-4


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


def _check_mask(mask, shape, device, ref="hidden"):
    """``mask``: a bool or 0/1 real tensor of ``shape`` on ``device`` (its values are checked with the others)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask: expected a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype.is_complex:
        raise TypeError(f"mask: expected a bool or 0/1 tensor, got dtype {mask.dtype}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"mask: expected shape {tuple(shape)}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"mask: on device {mask.device}, but {ref} is on {device}")


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


def _check_values(targets, temperature, vocab, ignore_index, nonfinite_ignored=None):
    """Raise ValueError for targets out of range or bad temperatures: one host sync. Returns the count of ignored rows
    with a non-finite hidden state (``nonfinite_ignored``, a 0-dim device tensor, fetched in the same sync)."""
    valid = targets != ignore_index
    bad_t = (valid & ((targets < 0) | (targets >= vocab))).sum()
    bad_temp = (~(torch.isfinite(temperature) & (temperature >= MIN_TEMPERATURE))).sum()
    extra = [nonfinite_ignored] if nonfinite_ignored is not None else []
    n_bad_t, n_bad_temp, *n_masked = torch.stack([bad_t, bad_temp, *extra]).tolist()
    if n_bad_t:
        bad = valid & ((targets < 0) | (targets >= vocab))
        first = int(torch.nonzero(bad)[0, 0])
        raise ValueError(
            f"targets: {n_bad_t} value(s) outside [0, V={vocab}) and not ignore_index={ignore_index}; "
            f"first at row {first} ({int(targets[first])})"
        )
    if n_bad_temp:
        raise ValueError(f"temperature: {n_bad_temp} row(s) not finite or below MIN_TEMPERATURE={MIN_TEMPERATURE}")
    return n_masked[0] if n_masked else 0
