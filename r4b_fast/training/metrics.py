"""The run's metrics: one JSON object per step in ``metrics.jsonl`` (and TensorBoard when installed), read back."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from r4b_fast.training.checkpoint import CheckpointError


class OutputDirError(CheckpointError):
    """The output folder cannot hold the run (read-only, a file where a folder must be, ``metrics.jsonl`` a
    directory); the message names the path and the cause. A :class:`CheckpointError`, so the loops end cleanly."""


class MetricsLogger:
    """Appends one JSON object per record to ``metrics.jsonl``; mirrors scalars to TensorBoard when installed.

    ``resume_step``: the step of the checkpoint a resumed run starts from; what was logged after it is dropped from
    ``metrics.jsonl`` (rewritten atomically) and hidden from TensorBoard (``purge_step``), since those steps run
    again. ``None``: a fresh run, which must not find a previous run's log (:func:`prepare_output_dir` sees to it).
    A log that cannot be written (a read-only folder, ``metrics.jsonl`` a directory) raises :class:`OutputDirError`.

    Example::

        logger = MetricsLogger(Path("runs/x"), tensorboard=False)
        logger.log(1, {"loss": 0.5})
        logger.close()
    """

    def __init__(self, output_dir: Path, tensorboard: bool = True, resume_step: int | None = None):
        self.path = Path(output_dir) / "metrics.jsonl"
        try:
            self._file = _open_log(self.path, resume_step)
        except OutputDirError:
            raise
        except OSError as err:
            raise OutputDirError(err.errno, f"metrics: cannot write {self.path} ({err.strerror or err}); give a "
                                            "writable --output-dir") from err  # fmt: skip
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
        """Append ``record`` for ``step``; a failed write (a full disk) raises :class:`OutputDirError`."""
        try:
            self._file.write(json.dumps({"step": step, **record}) + "\n")
            self._file.flush()
        except OSError as err:
            raise OutputDirError(err.errno, f"metrics: writing step {step} to {self.path} failed "
                                            f"({err.strerror or err})") from err  # fmt: skip
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _open_log(path: Path, resume_step: int | None):
    """``path`` opened for appending, after dropping the records past ``resume_step`` (atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        raise OutputDirError(f"metrics: {path} is a directory, not the run's log; move it away or give another "
                             "--output-dir")  # fmt: skip
    if resume_step is not None and path.exists():
        kept = [r for r in read_metrics(path) if r.get("step", 0) <= resume_step]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, path)  # a kill while rewriting leaves the old log, never half of it
    return path.open("a")


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
