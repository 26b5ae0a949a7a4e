"""Backend dispatch: which implementation of an op runs.

Order of choice (DESIGN.md): an explicit ``backend=`` argument, else the ``R4B_FAST_BACKEND`` environment
variable, else the op's preferred backend that can run on the tensors' device. A backend that cannot run
raises :class:`BackendUnavailableError` with every reason; nothing silently falls back once a backend was
asked for by name.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

BACKENDS = ("torch", "triton", "cuda")
ENV_BACKEND = "R4B_FAST_BACKEND"


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here; the message says why."""


def device_guard(tensor: torch.Tensor):
    """Context for a kernel launch on ``tensor``'s device: ``torch.cuda.device(tensor.device)`` for a CUDA tensor
    (Triton and our CUDA launchers launch on the *current* device and stream; a tensor on ``cuda:1`` while the
    current device is 0 would otherwise be launched on GPU 0), a no-op elsewhere (CPU, the interpreter, meta)."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def triton_interpret_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None  # finds, does not import


def not_supported_reasons(
    backend: str, device: torch.device | str, op_backends: tuple[str, ...] = BACKENDS
) -> list[str]:
    """Why ``backend`` cannot run an op on ``device``: an empty list means it can.

    ``op_backends`` are the backends the op implements.
    """
    device = torch.device(device)
    reasons = []
    if backend not in BACKENDS:
        return [f"unknown backend {backend!r}; expected one of {BACKENDS}"]
    if backend not in op_backends:
        reasons.append(f"this op has no {backend} implementation (it has {op_backends})")
    if backend == "triton":
        if not _TRITON_IMPORTABLE:
            reasons.append("triton is not installed")
        if device.type == "cpu" and not triton_interpret_enabled():
            reasons.append(
                "triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set before r4b_fast's kernels are first "
                "used (the interpreter runs them on CPU tensors, slowly)"
            )
        elif device.type not in ("cpu", "cuda"):
            reasons.append(f"triton kernels run on cuda tensors, got device {device}")
    if backend == "cuda":
        if device.type != "cuda":
            reasons.append(f"the cuda backend needs CUDA tensors, got device {device}")
        from r4b_fast import _cuda_build

        reason = _cuda_build.unavailable_reason()
        if reason:
            reasons.append(reason)
    return reasons


def available_backends(device: torch.device | str, op_backends: tuple[str, ...] = BACKENDS) -> list[str]:
    """The backends in ``op_backends`` that can run on ``device``."""
    return [b for b in op_backends if not not_supported_reasons(b, device, op_backends)]


def resolve_backend(
    backend: str | None,
    device: torch.device | str,
    op_backends: tuple[str, ...],
    preferred: dict[str, tuple[str, ...]],
    op_name: str,
) -> str:
    """Pick the backend for one call of ``op_name``.

    ``preferred`` maps a device type to the op's preference order when nothing was asked for.
    """
    requested = backend if backend is not None else os.environ.get(ENV_BACKEND) or None
    if requested is not None and requested != "auto":
        reasons = not_supported_reasons(requested, device, op_backends)
        if reasons:
            source = "backend=" if backend is not None else f"{ENV_BACKEND}="
            raise BackendUnavailableError(
                f"{op_name}: {source}{requested!r} cannot run on device {torch.device(device)}: " + "; ".join(reasons)
            )
        return requested
    device = torch.device(device)
    for candidate in preferred.get(device.type, ("torch",)):
        if candidate in op_backends and not not_supported_reasons(candidate, device, op_backends):
            return candidate
    raise BackendUnavailableError(f"{op_name}: no backend can run on device {device}")
