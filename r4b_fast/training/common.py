"""Pieces both loops share. The work is done in one module per job; this module re-exports their names so that
``from r4b_fast.training.common import X`` keeps working:

- :mod:`~r4b_fast.training.checkpoint`: checkpoints that resume exactly (atomic, checked, tied weights once)
- :mod:`~r4b_fast.training.weights_file`: the weights file, streamed, tied tensors stored once
- :mod:`~r4b_fast.training.run_dir` / :mod:`~r4b_fast.training.run_lock`: the output folder, its one-writer lock
- :mod:`~r4b_fast.training.metrics`: ``metrics.jsonl`` and TensorBoard
- :mod:`~r4b_fast.training.devices`: ``--device`` / ``--precision``, loading a model onto the device
- :mod:`~r4b_fast.training.distributed`: torchrun, FSDP2
- here: seeding, range checks of numeric flags, learning rates after a resume.

Setting one of the checkpoint's filesystem steps here (``common._write_file = hooked``, as the fault tests do)
sets it where the checkpoint code calls it.
"""

from __future__ import annotations

import math
import random
import sys
import types

import torch

from r4b_fast.training import checkpoint as _checkpoint
from r4b_fast.training.checkpoint import (  # noqa: F401
    CHECKPOINT_FILES,
    MANIFEST,
    CheckpointError,
    NonFiniteError,
    _file_digest,
    _fsync,
    _fsync_dir,
    _read_manifest,
    _recover,
    _remove_tree,
    _rename,
    _siblings,
    _write_file,
    check_finite_step,
    check_finite_weights,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from r4b_fast.training.devices import (  # noqa: F401
    add_device_arguments,
    autocast,
    device_from_arguments,
    load_model,
    resolve_device,
    resolve_precision,
)
from r4b_fast.training.distributed import LossModule, _rank, init_distributed, shard_model, sync_weights  # noqa: F401
from r4b_fast.training.metrics import (  # noqa: F401
    MetricsLogger,
    OutputDirError,
    _after_existing_event_files,
    read_metrics,
)
from r4b_fast.training.run_dir import (  # noqa: F401
    _RUN_FILES,
    add_run_arguments,
    changed_settings,
    check_resume,
    prepare_output_dir,
    run_settings,
)
from r4b_fast.training.run_lock import RunLockedError, acquire_run_lock, release_run_lock  # noqa: F401

# the checkpoint's filesystem steps: a test that replaces one of them here replaces it in the checkpoint module
_FORWARDED = ("_write_file", "_fsync", "_fsync_dir", "_rename", "_remove_tree", "_file_digest")


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


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


class _Common(types.ModuleType):
    """This module's type: assigning one of :data:`_FORWARDED` also assigns it in the checkpoint module."""

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name in _FORWARDED:
            setattr(_checkpoint, name, value)


sys.modules[__name__].__class__ = _Common
