"""``--device`` / ``--precision``: which device a run uses, in which precision, and the autocast context."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """``--device``: ``auto`` is this process's GPU when CUDA is available (``LOCAL_RANK`` under torchrun),
    else the CPU; ``cuda`` without an index means ``cuda:LOCAL_RANK``."""
    import os

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: expected auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device: {name!r} requested, but torch sees no CUDA device")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError(f"--device {name}: under torchrun give cuda (each rank takes cuda:LOCAL_RANK)")
        torch.cuda.set_device(device)
    return device


def resolve_precision(name: str, device: torch.device) -> str:
    """``--precision``: ``auto`` is bf16 autocast on CUDA, fp32 on CPU (CPU bf16 matmuls are slower than fp32 on
    most CPUs without AMX)."""
    if name == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("--precision bf16: this GPU does not support bfloat16; use fp32")
    return name


def autocast(device: torch.device, precision: str):
    """The context for forward passes: ``torch.autocast`` to bf16 (weights and optimizer stay fp32) or nothing."""
    import contextlib

    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def device_from_arguments(parser, args) -> tuple[torch.device, str]:
    """``(device, precision)`` from the arguments :func:`add_device_arguments` added; bad values end the run with
    the parser's usage error."""
    try:
        device = resolve_device(args.device)
        return device, resolve_precision(args.precision, device)
    except ValueError as err:
        parser.error(str(err))


def add_device_arguments(parser) -> None:
    """``--device`` / ``--precision``, shared by both loops."""
    parser.add_argument("--device", default="auto",
                        help="auto (this process's GPU when CUDA is available, else CPU), cpu, cuda or cuda:N")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="bf16: autocast forward passes to bfloat16 (fp32 weights and optimizer); "
                             "auto: bf16 on CUDA, fp32 on CPU")  # fmt: skip


def load_model(path, device):
    """A model of a supported family (LLaVA-OneVision, R-4B, Qwen2.5-VL, Qwen3-VL: ``r4b_fast.models``, chosen by
    the config's ``architectures``) and its tokenizer, from a local folder or a hub id, on ``device``. An
    unsupported architecture raises ``ValueError`` naming it and the supported ones.

    Example: ``model, tok = load_model("runs/annealing/model", "cpu")``."""
    from r4b_fast.models import load_pretrained

    # fp32 master weights whatever dtype the checkpoint was saved in (bf16 for R-4B): AdamW updates them in fp32,
    # and --precision bf16 autocasts the compute
    model, tokenizer, _ = load_pretrained(path, device, dtype=torch.float32)
    return model, tokenizer
