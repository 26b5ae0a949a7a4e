"""The run folder (``--output-dir``): one writer at a time, refused when it holds a previous run unless ``--resume``
or ``--overwrite``, and a resume's settings compared with its checkpoint's."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

from r4b_fast.training.checkpoint import _siblings, find_checkpoint
from r4b_fast.training.run_lock import RunLockedError, acquire_run_lock, describe

_RUN_FILES = ("metrics.jsonl", "tensorboard", "model", "curves.png")


def add_run_arguments(parser) -> None:
    """``--resume``, ``--overwrite``, ``--allow-changed-settings``, shared by both loops."""
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUTPUT_DIR/checkpoint (the newest complete one)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a previous run in OUTPUT_DIR (without it such a folder is refused)")
    parser.add_argument("--allow-changed-settings", action="store_true",
                        help="--resume with settings that differ from the checkpoint's (each change is logged)")


def _fail(parser, message: str, status: int) -> None:
    """End the run with one line on stderr (no usage text: the arguments are fine, the folder is not)."""
    parser.exit(status, f"{parser.prog}: error: {message}\n")


def _lock_output_dir(parser, out: Path) -> None:
    """Take the run folder's lock (rank 0 under torchrun: the one process that writes there). A folder that
    cannot be written, or that another live run holds, ends the run with one line."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    try:
        stale = acquire_run_lock(out)
    except RunLockedError as err:
        _fail(parser, str(err), 1)
    except OSError as err:
        where = err.filename or out
        _fail(parser, f"--output-dir: cannot write to {where} ({err.strerror or err}); give a writable folder", 2)
    if stale:
        print(f"run lock: {out}: the previous run ({describe(stale)}) ended without releasing its lock; taking it "
              "over", file=sys.stderr)  # fmt: skip


def _previous_run(out: Path) -> list[str]:
    """The names of what a previous run left in ``out``."""
    metrics = out / "metrics.jsonl"
    previous = [p.name for p in (*_siblings(out / "checkpoint"), out / "model") if p.exists()]
    if metrics.exists() and (metrics.is_dir() or metrics.stat().st_size > 0):
        previous.insert(0, metrics.name)
    return previous


def prepare_output_dir(parser, args) -> dict | None:
    """Check ``--output-dir`` against ``--resume`` / ``--overwrite`` before anything loads; returns the manifest
    of the checkpoint to resume from (None for a fresh run). The folder's lock is taken first and held until the
    process ends (:mod:`r4b_fast.training.run_lock`): a second run on the same folder, resumed or not, is refused
    with one line naming the holder's pid, host and start time; a folder that cannot be written likewise. A folder
    that holds a previous run (a checkpoint or a non-empty ``metrics.jsonl``) is refused without one of the two
    flags; ``--overwrite`` removes that run's files. Usage errors name the flag.

    Example: ``manifest = prepare_output_dir(parser, args)`` then ``manifest["step"]`` when resuming.
    """
    out = Path(args.output_dir)
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite: give one of them")
    _lock_output_dir(parser, out)
    metrics = out / "metrics.jsonl"
    if metrics.is_dir() and not args.overwrite:
        _fail(parser, f"--output-dir: {metrics} is a directory, not the run's log; move it away (or give "
                      "--overwrite to remove it)", 2)  # fmt: skip
    found = find_checkpoint(out / "checkpoint")
    if args.resume:
        if found is None:
            parser.error(f"--resume: no complete checkpoint in {out} (checkpoint, checkpoint.old, checkpoint.tmp)")
        return found[1]
    previous = _previous_run(out)
    if previous and not args.overwrite:
        parser.error(f"--output-dir: {out} holds a previous run ({', '.join(previous)}); give --resume to continue "
                     "it or --overwrite to replace it")  # fmt: skip
    if args.overwrite and int(os.environ.get("RANK", "0")) == 0:
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
