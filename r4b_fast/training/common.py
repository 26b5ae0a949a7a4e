"""Pieces both loops share: seeding, metrics (jsonl + TensorBoard), checkpoints that resume exactly."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
import zlib
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_FILES = ("model.safetensors", "trainer_state.pt")


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


class MetricsLogger:
    """Appends one JSON object per record to ``metrics.jsonl``; mirrors scalars to TensorBoard when installed.

    ``resume_step``: the step of the checkpoint a resumed run starts from; what was logged after it is dropped from
    ``metrics.jsonl`` (rewritten atomically) and hidden from TensorBoard (``purge_step``), since those steps run
    again. ``None``: a fresh run, which must not find a previous run's log (:func:`prepare_output_dir` sees to it).

    Example::

        logger = MetricsLogger(Path("runs/x"), tensorboard=False)
        logger.log(1, {"loss": 0.5})
        logger.close()
    """

    def __init__(self, output_dir: Path, tensorboard: bool = True, resume_step: int | None = None):
        output_dir.mkdir(parents=True, exist_ok=True)
        self.path = output_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)  # a kill while rewriting leaves the old log, never half of it
        self._file = self.path.open("a")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step: TensorBoard hides the old event file's records from this step on (no duplicated steps)
                purge = None if resume_step is None else resume_step + 1
                if purge is not None:
                    _after_existing_event_files(output_dir / "tensorboard")
                self._tb = SummaryWriter(str(output_dir / "tensorboard"), purge_step=purge)
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


def _after_existing_event_files(logdir: Path) -> None:
    """Wait (at most a second) until a new event file's name sorts after the existing ones. TensorBoard reads event
    files in name order and applies a purge only to records read before it; the name is
    ``events.out.tfevents.<seconds>.<host>.<pid>.<counter>``, so within the same second a counter that went from 9 to 10
    would sort the new file first and the purge would be lost."""
    stamps = []
    for f in logdir.glob("events.out.tfevents.*"):
        parts = f.name.split(".")
        if len(parts) > 3 and parts[3].isdigit():
            stamps.append(int(parts[3]))
    if stamps:
        while int(time.time()) <= max(stamps):
            time.sleep(0.05)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``. A torn last line (a run killed mid-write) is dropped with a warning on
    stderr; a bad line elsewhere raises ``ValueError`` naming its line number.

    Example: ``[r["loss"] for r in read_metrics(Path("runs/bpo/metrics.jsonl")) if "loss" in r]``
    """
    import sys

    lines = Path(path).read_text(errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if any(rest.strip() for rest in lines[number:]):
                raise ValueError(f"{path}: line {number} is not JSON ({err.msg})") from err
            print(f"warning: {path}: dropped a torn last line ({number}: {line[:60]!r})", file=sys.stderr)
    return records


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


# -- checkpoints ------------------------------------------------------------------------------------------------------
# A checkpoint folder is complete when its MANIFEST (written last, after every file was fsynced) lists each file with
# its size and CRC32 and the files match. A save writes NAME.tmp, then rotates NAME -> NAME.old, NAME.tmp -> NAME
# (directory fsynced after each rename), then removes NAME.old. A kill at any point leaves at least one complete
# folder among NAME, NAME.old, NAME.tmp; resume takes the newest complete one and reads it fully into memory (a later
# save removes or rewrites these files: nothing may stay mapped from them). The filesystem steps go through the small
# functions below, one call per step, so that a test can kill the process before any one of them.
MANIFEST = "MANIFEST.json"


class CheckpointError(OSError):
    """A checkpoint could not be written or no complete one could be read; the message says which and why."""


class NonFiniteError(ValueError):
    """Training produced a non-finite loss, gradient or weight; the message names the step."""


def _write_file(path: Path, fill) -> None:
    """Create ``path``, let ``fill(file)`` write it, flush and fsync it."""
    with open(path, "wb") as f:
        fill(f)
        f.flush()
        _fsync(f.fileno())


def _fsync(fd: int) -> None:
    os.fsync(fd)


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable (POSIX: the directory entry needs its own fsync)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rename(src: Path, dst: Path) -> None:
    os.rename(src, dst)


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _file_digest(path: Path) -> dict:
    """``{"bytes": size, "crc32": ...}`` of a file, read in chunks."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc, size = zlib.crc32(chunk, crc), size + len(chunk)
    return {"bytes": size, "crc32": crc}


def _siblings(directory: Path) -> tuple[Path, Path, Path]:
    """``(NAME, NAME.old, NAME.tmp)``: the folders a save rotates through."""
    return directory, directory.with_name(directory.name + ".old"), directory.with_name(directory.name + ".tmp")


def _read_manifest(folder: Path) -> dict | None:
    """The folder's manifest when the folder is a complete checkpoint (every listed file has its size), else None.
    The CRCs are checked when the files are read (:func:`load_checkpoint`)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
        if set(files) != set(CHECKPOINT_FILES) or not isinstance(manifest["step"], int):
            return None
        if any((folder / name).stat().st_size != meta["bytes"] for name, meta in files.items()):
            return None
        return manifest
    except (OSError, ValueError, KeyError, TypeError):  # missing, torn or foreign: not a complete checkpoint
        return None


def find_checkpoint(directory: Path) -> tuple[Path, dict] | None:
    """The newest complete checkpoint among ``directory`` and the ``.old`` / ``.tmp`` folders an interrupted save
    leaves, as ``(folder, manifest)``; None when there is none. ``manifest``: ``{"step", "files", "settings"}``.

    Example: ``find_checkpoint(Path("runs/bpo/checkpoint"))`` -> ``(Path("runs/bpo/checkpoint"), {"step": 50, ...})``
    """
    found = [(m["step"], -i, folder, m) for i, folder in enumerate(_siblings(Path(directory)))
             if (m := _read_manifest(folder)) is not None]  # fmt: skip
    if not found:
        return None
    _, _, folder, manifest = max(found, key=lambda t: t[:2])  # newest step; on a tie the earlier name
    return folder, manifest


def check_finite_weights(state: dict[str, torch.Tensor], step: int) -> None:
    """Raise :class:`NonFiniteError` naming ``step`` and the first tensors with NaN/inf values of ``state`` (a
    name -> tensor dict). Example: ``check_finite_weights(model.state_dict(), 10)``."""
    bad = [name for name, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise NonFiniteError(f"step {step}: non-finite weights in {len(bad)} tensor(s) ({', '.join(bad[:3])}"
                             f"{', ...' if len(bad) > 3 else ''}); stopping before anything is saved")


def check_finite_step(step: int, loss: float, grad_norm: float) -> None:
    """Raise :class:`NonFiniteError` naming ``step`` when its loss or gradient norm is NaN/inf (called before the
    optimizer applies the step: nothing non-finite reaches the weights or a checkpoint).
    Example: ``check_finite_step(3, loss.item(), grad_norm.item())``."""
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise NonFiniteError(f"step {step}: loss {loss} and gradient norm {grad_norm}: not finite; stopping before "
                             "the optimizer step and before anything is saved (check the learning rates and data)")


def save_checkpoint(directory: Path, module, optimizer, scheduler, step: int, extra: dict | None = None,
                    settings: dict | None = None) -> Path:  # fmt: skip
    """Weights as safetensors, and optimizer, scheduler, RNG states and the data position beside them.

    ``module``: the :class:`LossModule` that wraps the model, FSDP2-sharded or not. Under ``torchrun`` every rank
    must call this (the shards are gathered into full tensors); rank 0 writes. The files are the same for any
    number of processes (full tensors, optimizer state keyed by parameter name), so a run may resume on another
    world size. ``settings``: the run's settings that alter the math (compared on resume, :func:`changed_settings`).

    Written as a database would: into ``NAME.tmp`` (each file fsynced, the manifest last), then renamed into place
    (see the comment above :data:`MANIFEST`), so a kill at any moment leaves a complete checkpoint to resume from.
    Non-finite weights raise :class:`NonFiniteError` before anything is written; a failed write (a full disk)
    removes the partial copy and raises :class:`CheckpointError`, leaving the previous checkpoint as it was.

    Example: ``save_checkpoint(Path("runs/x/checkpoint"), LossModule(model, fn), opt, sched, step=10)``
    """
    from safetensors.torch import save as safetensors_bytes
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
    # the model's own names (a plain transformers state dict); tied weights share storage, which safetensors
    # refuses, and clone() unties them
    state = {k.removeprefix("model."): v.detach().contiguous().clone() for k, v in model_state.items()}
    check_finite_weights(state, step)
    trainer_state = {"step": step, "optimizer": optim_state, "scheduler": scheduler.state_dict(),
                     "rng_torch": torch.get_rng_state(), "rng_python": random.getstate(), "extra": extra or {}}
    directory.parent.mkdir(parents=True, exist_ok=True)
    _, old, tmp = _siblings(directory)
    _recover(directory)
    _remove_tree(tmp)  # a partial save a kill left (the newest complete one is at `directory` now)
    _remove_tree(old)
    try:
        tmp.mkdir()
        _write_file(tmp / "model.safetensors", lambda f: f.write(safetensors_bytes(state)))
        _write_file(tmp / "trainer_state.pt", lambda f: torch.save(trainer_state, f))
        manifest = {"step": step, "files": {name: _file_digest(tmp / name) for name in CHECKPOINT_FILES},
                    "settings": settings or {}}
        _write_file(tmp / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
        _fsync_dir(tmp)
    except OSError as err:
        _remove_tree(tmp)
        previous = find_checkpoint(directory)
        kept = f"the previous checkpoint {previous[0]} (step {previous[1]['step']}) is intact" if previous else \
            "there is no previous checkpoint"
        raise CheckpointError(err.errno, f"checkpoint: saving step {step} into {tmp} failed "
                                         f"({err.strerror or err}); removed the partial copy, {kept}") from err
    if directory.exists():
        _rename(directory, old)
        _fsync_dir(directory.parent)
    _rename(tmp, directory)
    _fsync_dir(directory.parent)
    _remove_tree(old)
    return directory


def _recover(directory: Path) -> None:
    """Finish the rotation a kill interrupted: move the newest complete checkpoint (``.tmp`` or ``.old``) to
    ``directory``, so that what a save removes next is never the only complete checkpoint. Each rename leaves the
    newest complete checkpoint in one of the three folders."""
    found = find_checkpoint(directory)
    if found is None or found[0] == directory:
        return
    _, old, tmp = _siblings(directory)
    if found[0] == tmp and directory.exists():  # directory: an older complete checkpoint
        _remove_tree(old)
        _rename(directory, old)
        _fsync_dir(directory.parent)
    elif found[0] == old:  # directory, if any, is incomplete (a complete one is never older than .old)
        _remove_tree(directory)
    _rename(found[0], directory)
    _fsync_dir(directory.parent)


def load_checkpoint(directory: Path, module, optimizer, scheduler) -> dict:
    """Restore what :func:`save_checkpoint` wrote into ``module`` (the :class:`LossModule`, sharded or not; every
    rank reads the files: under ``torchrun`` the output folder must be on a file system all ranks see) and
    ``optimizer`` (built on ``module``'s parameters); returns ``{"step", "extra", "path", "settings"}``, ``path``
    being the folder used: the newest complete one among ``directory``, ``.old`` and ``.tmp``
    (:func:`find_checkpoint`). The files are read whole into memory and checked against the manifest's CRC32s.

    Example: ``load_checkpoint(Path("runs/x/checkpoint"), LossModule(model, fn), opt, sched)["step"]``
    """
    import io

    from safetensors.torch import load as load_safetensors
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    directory = Path(directory)
    found = find_checkpoint(directory)
    if found is None:
        raise CheckpointError(f"resume: no complete checkpoint at {directory} (nor {directory.name}.old / .tmp)")
    folder, manifest = found
    data = {}
    for name, meta in manifest["files"].items():
        # read into memory: a later save removes these files (a mapping of them would die under it)
        data[name] = (folder / name).read_bytes()
        if len(data[name]) != meta["bytes"] or zlib.crc32(data[name]) != meta["crc32"]:
            raise CheckpointError(f"resume: {folder / name} does not match its manifest (torn or changed file)")
    import torch.distributed as dist

    # under torchrun rank 0 holds the tensors and broadcasts them shard by shard: one full copy in host memory
    sharded = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    reader = _rank() == 0
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=sharded)
    weights = {"model." + k: v for k, v in load_safetensors(data.pop("model.safetensors")).items()} if reader else {}
    set_model_state_dict(module, weights, options=options)
    state = torch.load(io.BytesIO(data.pop("trainer_state.pt")), weights_only=False)
    # strict=False: a parameter that never had a gradient (an unused layer) has no AdamW state to restore
    set_optimizer_state_dict(module, optimizer, optim_state_dict=state["optimizer"] if reader else {},
                             options=StateDictOptions(full_state_dict=True, strict=False,
                                                      broadcast_from_rank0=sharded))  # fmt: skip
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_torch"])
    random.setstate(state["rng_python"])
    if sharded:
        dist.barrier()  # every rank has read the files before rank 0 renames them
    if reader:
        _recover(directory)  # a resumed run that saves nothing more still leaves its newest checkpoint in place
    return {"step": state["step"], "extra": state["extra"], "path": folder, "settings": manifest.get("settings", {})}


# -- run folders and settings ------------------------------------------------------------------------------------------
def add_run_arguments(parser) -> None:
    """``--resume``, ``--overwrite``, ``--allow-changed-settings``, shared by both loops."""
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUTPUT_DIR/checkpoint (the newest complete one)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a previous run in OUTPUT_DIR (without it such a folder is refused)")
    parser.add_argument("--allow-changed-settings", action="store_true",
                        help="--resume with settings that differ from the checkpoint's (each change is logged)")


_RUN_FILES = ("metrics.jsonl", "tensorboard", "model", "curves.png")


def prepare_output_dir(parser, args) -> dict | None:
    """Check ``--output-dir`` against ``--resume`` / ``--overwrite`` before anything loads; returns the manifest
    of the checkpoint to resume from (None for a fresh run). A folder that holds a previous run (a checkpoint or
    a non-empty ``metrics.jsonl``) is refused without one of the two; ``--overwrite`` removes that run's files.
    Errors end the run with the parser's usage error naming the flag.

    Example: ``manifest = prepare_output_dir(parser, args)`` then ``manifest["step"]`` when resuming.
    """
    out = Path(args.output_dir)
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite: give one of them")
    found = find_checkpoint(out / "checkpoint")
    if args.resume:
        if found is None:
            parser.error(f"--resume: no complete checkpoint in {out} (checkpoint, checkpoint.old, checkpoint.tmp)")
        return found[1]
    metrics = out / "metrics.jsonl"
    previous = [p.name for p in (*_siblings(out / "checkpoint"), out / "model") if p.exists()]
    if metrics.exists() and metrics.stat().st_size > 0:
        previous.insert(0, metrics.name)
    if previous and not args.overwrite:
        parser.error(f"--output-dir: {out} holds a previous run ({', '.join(previous)}); give --resume to continue "
                     "it or --overwrite to replace it")  # fmt: skip
    if args.overwrite and _rank() == 0:
        for p in (*_siblings(out / "checkpoint"), *(out / name for name in _RUN_FILES)):
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    return None


def run_settings(args, names: tuple[str, ...]) -> dict[str, Any]:
    """``{"--flag": value}`` of the ``args`` attributes in ``names`` (paths as strings): what a checkpoint records
    and a resume compares. Example: ``run_settings(args, ("lr", "g"))`` -> ``{"--lr": 0.0001, "--g": 4}``."""
    out = {}
    for name in names:
        value = getattr(args, name)
        out["--" + name.replace("_", "-")] = str(value) if isinstance(value, Path) else value
    return out


def changed_settings(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"--flag: checkpoint A, now B"`` for every setting recorded in both that differs."""
    return [f"{k}: checkpoint {saved[k]!r}, now {current[k]!r}" for k in current if k in saved and saved[k] !=
            current[k]]  # fmt: skip


def check_resume(parser, args, manifest: dict, current: dict[str, Any]) -> list[str]:
    """Refuse a resume whose settings differ from the checkpoint's (they alter the math) unless
    ``--allow-changed-settings``, and a ``--steps`` below the checkpoint's step; returns the allowed changes (the
    caller logs them). Example: ``check_resume(parser, args, prepare_output_dir(parser, args), settings)``."""
    if args.steps < manifest["step"]:
        parser.error(f"--steps {args.steps}: the checkpoint is already at step {manifest['step']}; nothing to train "
                     f"(give --steps above {manifest['step']} to continue)")  # fmt: skip
    changes = changed_settings(manifest.get("settings", {}), current)
    if changes and not args.allow_changed_settings:
        parser.error("--resume: settings differ from the checkpoint's (they change the training): " + "; ".join(changes)
                     + ". Give --allow-changed-settings to continue with the new ones")  # fmt: skip
    return changes


def apply_learning_rates(optimizer, scheduler, base_lrs: list[float]) -> None:
    """Set each param group's base learning rate (after a resume restored the checkpoint's), keeping the
    scheduler's position: ``lr = base * lambda(step)`` of a ``LambdaLR``.
    Example: ``apply_learning_rates(opt, sched, [1e-3])``."""
    scheduler.base_lrs = list(base_lrs)
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(base_lrs, scheduler.lr_lambdas)]
    for group, base, lr in zip(optimizer.param_groups, base_lrs, lrs):
        group["initial_lr"], group["lr"] = base, lr
    scheduler._last_lr = lrs


def check_range(parser, flag: str, value: float, *, low: float = 0.0, high: float = math.inf,
                    low_inclusive: bool = False, high_inclusive: bool = True) -> None:  # fmt: skip
    """End the run with a usage error naming ``flag`` unless ``value`` is a finite number in the range
    (``(low, high]`` by default). Example: ``check_range(parser, "--lr", args.lr)``."""
    ok = math.isfinite(value) and (value >= low if low_inclusive else value > low) and \
        (value <= high if high_inclusive else value < high)
    if not ok:
        lo, hi = "[" if low_inclusive else "(", "]" if high_inclusive else ")"
        parser.error(f"{flag}: expected a finite number in {lo}{low:g}, {high:g}{hi}, got {value!r}")


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
