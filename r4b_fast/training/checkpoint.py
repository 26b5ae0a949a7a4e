"""Checkpoints that resume exactly: written atomically and checked (a manifest of sizes and CRC32s, written last),
tied weights stored once, nothing copied whole in memory while saving; every failed save a :class:`CheckpointError`.

A checkpoint folder is complete when its MANIFEST (written last, after every file was fsynced) lists each file with
its size and CRC32 and the files match. A save writes NAME.tmp, then rotates NAME -> NAME.old, NAME.tmp -> NAME
(directory fsynced after each rename), then removes NAME.old. A kill at any point leaves at least one complete
folder among NAME, NAME.old, NAME.tmp; resume takes the newest complete one and reads it fully into memory (a later
save removes or rewrites these files: nothing may stay mapped from them). The filesystem steps go through the small
functions below, one call per step, so that a test can kill the process (or fail the step) before any one of them.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import shutil
import zlib
from pathlib import Path

import torch

from r4b_fast.training.distributed import _rank
from r4b_fast.training.weights_file import module_ties, read_safetensors, write_safetensors

CHECKPOINT_FILES = ("model.safetensors", "trainer_state.pt")
MANIFEST = "MANIFEST.json"


class CheckpointError(OSError):
    """A checkpoint could not be written or no complete one could be read; the message says which and why."""


class NonFiniteError(ValueError):
    """Training produced a non-finite loss, gradient or weight; the message names the step."""


# -- the filesystem steps (one call each; tests hook them through r4b_fast.training.common) ---------------------------
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


# -- finding a complete checkpoint -------------------------------------------------------------------------------------
def _file_digest(path: Path) -> dict:
    """``{"bytes": size, "crc32": ...}`` of a file, read into one reused 4 MiB buffer."""
    crc, size = 0, 0
    buf = bytearray(1 << 22)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            crc, size = zlib.crc32(view[:n], crc), size + n
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


# -- finite checks -----------------------------------------------------------------------------------------------------
def _finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite, without a temporary the size of the tensor (``isfinite`` makes one, and
    ``abs`` another): min and max propagate NaN, and are finite exactly when every value is."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor.detach())
    return math.isfinite(low.item()) and math.isfinite(high.item())


def check_finite_weights(state: dict[str, torch.Tensor], step: int) -> None:
    """Raise :class:`NonFiniteError` naming ``step`` and the first tensors with NaN/inf values of ``state`` (a
    name -> tensor dict). Example: ``check_finite_weights(model.state_dict(), 10)``."""
    bad = [name for name, t in state.items() if not _finite(t)]
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


# -- saving ------------------------------------------------------------------------------------------------------------
def _cause(err: BaseException) -> str:
    """One line saying why a filesystem step or a writer failed (torch's zip writer raises RuntimeError)."""
    if isinstance(err, OSError) and err.strerror:
        text = err.strerror + (f": {err.filename}" if err.filename else "")
    else:
        text = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    line = " ".join(text.split())
    return line if len(line) <= 300 else line[:297] + "..."


def _error(err: BaseException, message: str) -> CheckpointError:
    code = getattr(err, "errno", None)
    return CheckpointError(code, message) if isinstance(code, int) else CheckpointError(message)


def _previous(directory: Path) -> str:
    found = find_checkpoint(directory)
    if found is None:
        return "there is no previous checkpoint"
    return f"the previous checkpoint {found[0]} (step {found[1]['step']}) is intact"


def _gather(module, optimizer) -> tuple[dict, dict]:
    """Full model and optimizer state dicts: FSDP2 shards gathered on rank 0 in CPU memory; a plain module's
    tensors are its own, not copies, wherever they are (the writers move a GPU tensor to the CPU one at a time)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    sharded = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    options = StateDictOptions(full_state_dict=True, cpu_offload=sharded)
    return get_model_state_dict(module, options=options), get_optimizer_state_dict(module, optimizer, options=options)


def _write_folder(tmp: Path, state: dict, trainer_state: dict, step: int, settings: dict | None,
                  ties: dict[str, str] | None = None) -> None:  # fmt: skip
    """The three files of a checkpoint into ``tmp``: weights (tied ones once), trainer state, manifest last."""
    tmp.mkdir()
    _write_file(tmp / "model.safetensors", lambda f: write_safetensors(f, state, {"format": "pt"}, ties))
    _write_file(tmp / "trainer_state.pt", lambda f: torch.save(trainer_state, f))
    manifest = {"step": step, "files": {name: _file_digest(tmp / name) for name in CHECKPOINT_FILES},
                "settings": settings or {}}  # fmt: skip
    _write_file(tmp / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
    _fsync_dir(tmp)


def _rotate(directory: Path) -> None:
    """``NAME -> NAME.old``, ``NAME.tmp -> NAME``, remove ``NAME.old``; the parent fsynced after each rename."""
    _, old, tmp = _siblings(directory)
    if directory.exists():
        _rename(directory, old)
        _fsync_dir(directory.parent)
    _rename(tmp, directory)
    _fsync_dir(directory.parent)
    _remove_tree(old)


def save_checkpoint(directory: Path, module, optimizer, scheduler, step: int, extra: dict | None = None,
                    settings: dict | None = None) -> Path:  # fmt: skip
    """Weights as safetensors, and optimizer, scheduler, RNG states and the data position beside them.

    ``module``: the :class:`LossModule` that wraps the model, FSDP2-sharded or not. Under ``torchrun`` every rank
    must call this (the shards are gathered into full tensors); rank 0 writes. The files are the same for any
    number of processes (full tensors, optimizer state keyed by parameter name), so a run may resume on another
    world size. ``settings``: the run's settings that alter the math (compared on resume, :func:`changed_settings`).
    Tied parameters are stored once (the other names in the file's metadata); the tensors are written from the
    parameters and optimizer moments themselves, so a save needs no second copy of the model in memory.

    Written as a database would: into ``NAME.tmp`` (each file fsynced, the manifest last), then renamed into place
    (see the module's docstring), so a kill at any moment leaves a complete checkpoint to resume from. Non-finite
    weights raise :class:`NonFiniteError` before anything is written. Any failed step (a full disk, an I/O error, a
    read-only folder, torch's zip writer) raises :class:`CheckpointError` with one line naming the folder and the
    cause: before the new checkpoint is complete, the partial copy is removed and the previous one is left as it
    was; after, the newest complete one stays where a resume finds it.

    Example: ``save_checkpoint(Path("runs/x/checkpoint"), LossModule(model, fn), opt, sched, step=10)``
    """
    model_state, optim_state = _gather(module, optimizer)
    directory = Path(directory)
    if _rank() != 0:
        return directory
    # the model's own names (a plain transformers state dict), the tensors as they are: no clone
    state = {k.removeprefix("model."): v.detach() for k, v in model_state.items()}
    ties = {k.removeprefix("model."): v.removeprefix("model.") for k, v in module_ties(module).items()}
    check_finite_weights(state, step)
    trainer_state = {"step": step, "optimizer": optim_state, "scheduler": scheduler.state_dict(),
                     "rng_torch": torch.get_rng_state(), "rng_python": random.getstate(), "extra": extra or {}}
    _, old, tmp = _siblings(directory)
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        _recover(directory)  # nothing is removed when this fails: .tmp may be the newest complete checkpoint
    except Exception as err:
        raise _error(err, f"checkpoint: saving step {step}: cannot prepare {directory} ({_cause(err)}); "
                          f"nothing was written, {_previous(directory)}") from err  # fmt: skip
    try:
        _remove_tree(tmp)  # a partial save a kill left (the newest complete one is at `directory` now)
        _remove_tree(old)
        _write_folder(tmp, state, trainer_state, step, settings, ties)
    except Exception as err:  # OSError (ENOSPC, EIO, EROFS, EACCES), torch's RuntimeError, anything else
        _remove_tree(tmp)
        left = " (could not remove it)" if tmp.exists() else ""
        raise _error(err, f"checkpoint: saving step {step} into {tmp} failed ({_cause(err)}); removed the partial "
                          f"copy{left}, {_previous(directory)}") from err  # fmt: skip
    try:
        _rotate(directory)
    except Exception as err:
        found = find_checkpoint(directory)
        newest = f"{found[0]} (step {found[1]['step']})" if found else "none"
        raise _error(err, f"checkpoint: step {step} is written but moving it into {directory} failed "
                          f"({_cause(err)}); the newest complete checkpoint is {newest}") from err  # fmt: skip
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


def _recover_after_load(directory: Path, folder: Path, step: int) -> None:
    """Put the checkpoint a resume read in place (a resumed run that saves nothing more still leaves its newest
    checkpoint at ``directory``); a failed rename is one line, like a failed save."""
    try:
        _recover(directory)
    except Exception as err:
        raise _error(err, f"resume: read step {step} from {folder} but could not move it into {directory} "
                          f"({_cause(err)}); {_previous(directory)}") from err  # fmt: skip


# -- loading -----------------------------------------------------------------------------------------------------------
def _read_checked(folder: Path, manifest: dict) -> dict[str, bytes]:
    """Each file of the checkpoint read whole into memory (a later save removes these files: a mapping of them would
    die under it) and checked against the manifest's size and CRC32."""
    data = {}
    for name, meta in manifest["files"].items():
        try:
            data[name] = (folder / name).read_bytes()
        except OSError as err:
            raise _error(err, f"resume: cannot read {folder / name} ({_cause(err)})") from err
        if len(data[name]) != meta["bytes"] or zlib.crc32(data[name]) != meta["crc32"]:
            raise CheckpointError(f"resume: {folder / name} does not match its manifest (torn or changed file)")
    return data


def load_checkpoint(directory: Path, module, optimizer, scheduler) -> dict:
    """Restore what :func:`save_checkpoint` wrote into ``module`` (the :class:`LossModule`, sharded or not; every
    rank reads the files: under ``torchrun`` the output folder must be on a file system all ranks see) and
    ``optimizer`` (built on ``module``'s parameters); returns ``{"step", "extra", "path", "settings"}``, ``path``
    being the folder used: the newest complete one among ``directory``, ``.old`` and ``.tmp``
    (:func:`find_checkpoint`). The files are read whole into memory and checked against the manifest's CRC32s.
    Tied weights stored once are given to every name of the tie (the model's tie is kept: a parameter is loaded in
    place); checkpoints that hold them twice load as they are.

    Example: ``load_checkpoint(Path("runs/x/checkpoint"), LossModule(model, fn), opt, sched)["step"]``
    """
    import torch.distributed as dist
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
    data = _read_checked(folder, manifest)
    # under torchrun rank 0 holds the tensors and broadcasts them shard by shard: one full copy in host memory
    sharded = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    reader = _rank() == 0
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=sharded)
    weights = {"model." + k: v for k, v in read_safetensors(data.pop("model.safetensors")).items()} if reader else {}
    set_model_state_dict(module, weights, options=options)
    del weights
    # on the CPU whatever device saved it (the optimizer's load moves each state to its parameter's device)
    state = torch.load(io.BytesIO(data.pop("trainer_state.pt")), weights_only=False, map_location="cpu")
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
        _recover_after_load(directory, folder, state["step"])
    return {"step": state["step"], "extra": state["extra"], "path": folder, "settings": manifest.get("settings", {})}
