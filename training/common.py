"""Pieces both loops share: seeding, metrics (jsonl + TensorBoard), checkpoints that resume exactly."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_FILES = ("model.safetensors", "trainer_state.pt")


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


class MetricsLogger:
    """Appends one JSON object per record to ``metrics.jsonl``; mirrors scalars to TensorBoard when installed."""

    def __init__(self, output_dir: Path, tensorboard: bool = True, resume_step: int | None = None):
        output_dir.mkdir(parents=True, exist_ok=True)
        self.path = output_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            # drop what was logged after the checkpoint we resume from: those steps run again
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()  # a fresh run into an old folder starts a fresh log
        self._file = self.path.open("a")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(output_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional: metrics.jsonl always has everything
                self._tb = None

    def log(self, step: int, record: dict[str, Any]) -> None:
        self._file.write(json.dumps({"step": step, **record}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def save_checkpoint(directory: Path, module, optimizer, scheduler, step: int, extra: dict | None = None) -> Path:
    """Weights as safetensors, and optimizer, scheduler, RNG states and the data position beside them.

    ``module``: the :class:`LossModule` that wraps the model, FSDP2-sharded or not. Under ``torchrun`` every rank
    must call this (the shards are gathered into full tensors); rank 0 writes. The files are the same for any
    number of processes (full tensors, optimizer state keyed by parameter name), so a run may resume on another
    world size. Written to a temporary folder and renamed, so a run killed mid-save leaves the previous checkpoint
    intact.
    """
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered on rank 0, in CPU memory
    model_state = get_model_state_dict(module, options=options)
    optim_state = get_optimizer_state_dict(module, optimizer, options=options)
    directory = Path(directory)
    if _rank() != 0:
        return directory
    tmp = directory.with_name(directory.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    # the model's own names (a plain transformers state dict); tied weights share storage, which safetensors
    # refuses, and clone() unties them
    state = {k.removeprefix("model."): v.detach().contiguous().clone() for k, v in model_state.items()}
    save_file(state, str(tmp / "model.safetensors"))
    torch.save(
        {
            "step": step,
            "optimizer": optim_state,
            "scheduler": scheduler.state_dict(),
            "rng_torch": torch.get_rng_state(),
            "rng_python": random.getstate(),
            "extra": extra or {},
        },
        tmp / "trainer_state.pt",
    )
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(old, ignore_errors=True)  # a leftover of a save that was killed while cleaning up
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def load_checkpoint(directory: Path, module, optimizer, scheduler) -> dict:
    """Restore what :func:`save_checkpoint` wrote into ``module`` (the :class:`LossModule`, sharded or not; every
    rank reads the files: under ``torchrun`` the output folder must be on a file system all ranks see) and
    ``optimizer`` (built on ``module``'s parameters); returns ``{"step": ..., "extra": ...}``."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    directory = Path(directory)
    if not directory.exists():  # killed between the two renames of save_checkpoint: the previous one is in .old
        for fallback in (directory.with_name(directory.name + ".old"), directory.with_name(directory.name + ".tmp")):
            if all((fallback / f).exists() for f in CHECKPOINT_FILES):
                directory = fallback
                break
    missing = [f for f in CHECKPOINT_FILES if not (directory / f).exists()]
    if missing:
        raise FileNotFoundError(f"resume: checkpoint {directory} lacks {missing}")
    import torch.distributed as dist

    # under torchrun rank 0 reads the tensors and broadcasts them shard by shard: one full copy in host memory
    sharded = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    reader = _rank() == 0
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=sharded)
    weights = {"model." + k: v for k, v in load_file(str(directory / "model.safetensors")).items()} if reader else {}
    set_model_state_dict(module, weights, options=options)
    state = torch.load(directory / "trainer_state.pt", weights_only=False, mmap=True)  # mmap: read what is used
    # strict=False: a parameter that never had a gradient (an unused layer) has no AdamW state to restore
    set_optimizer_state_dict(module, optimizer, optim_state_dict=state["optimizer"] if reader else {},
                             options=StateDictOptions(full_state_dict=True, strict=False,
                                                      broadcast_from_rank0=sharded))  # fmt: skip
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_torch"])
    random.setstate(state["rng_python"])
    return {"step": state["step"], "extra": state["extra"]}


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
    """A LLaVA-OneVision-architecture model and its tokenizer from a local folder or a hub id, on ``device``."""
    from transformers import AutoTokenizer, LlavaOnevisionForConditionalGeneration

    if not (Path(path) / "config.json").exists() and Path(path).exists():
        raise FileNotFoundError(f"--model: {path} has no config.json")
    # fp32 master weights whatever dtype the checkpoint was saved in (bf16 for R-4B): AdamW updates them in fp32,
    # and --precision bf16 autocasts the compute
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32).to(device)
    return model, AutoTokenizer.from_pretrained(str(path))


def init_distributed(device: torch.device | None = None) -> tuple[int, int]:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1): join the process group (NCCL when training on GPUs, gloo on CPU);
    returns ``(rank, world_size)``, ``(0, 1)`` for a plain run."""
    import os

    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        import datetime

        on_gpu = device.type == "cuda" if device is not None else torch.cuda.is_available()
        # rank 0 alone evaluates and writes checkpoints while the others wait in the next collective
        timeout = datetime.timedelta(seconds=int(os.environ.get("R4B_DIST_TIMEOUT_S", "7200")))
        dist.init_process_group("nccl" if on_gpu else "gloo", timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


class LossModule(torch.nn.Module):
    """Wraps ``loss_fn(model, *args)`` as the module FSDP2 shards at the root, so that the root's parameters
    (embeddings, tied head, vision tower, projector) are gathered for, and reduced after, a computation that reads
    them directly (the fused loss reads ``lm_head.weight``, packing reads the embedding table)."""

    def __init__(self, model, loss_fn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, *args, **kwargs):
        return self.loss_fn(self.model, *args, **kwargs)


def shard_model(model, loss_fn, device: torch.device | None = None) -> LossModule:
    """FSDP2: each decoder layer of the language model its own unit, everything else in the root unit (the
    returned :class:`LossModule`, to call instead of ``loss_fn(model, ...)``), on a mesh of ``device``'s type
    (FSDP2's default mesh would be CUDA on a GPU machine even for a ``--device cpu`` run)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),)) if device is not None else None
    for layer in model.model.language_model.layers:
        fully_shard(layer, mesh=mesh)
    root = LossModule(model, loss_fn)
    fully_shard(root, mesh=mesh)
    return root


@torch.no_grad()
def sync_weights(replica, model) -> None:
    """Copy ``model``'s weights (FSDP2-sharded: every rank must call this, it all-gathers) into ``replica``, a plain
    copy of the same architecture (the rollout engine's weights: generation needs no sharding and ranks may stop
    decoding at different steps)."""
    dst, src = list(replica.named_parameters()), list(model.named_parameters())
    if [n for n, _ in dst] != [n for n, _ in src]:
        raise ValueError("sync_weights: the replica's parameters do not match the model's")
    for (_, p), (_, q) in zip(dst, src):
        p.copy_(q.full_tensor() if hasattr(q, "full_tensor") else q)
