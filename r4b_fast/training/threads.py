"""CPU threads and progress for both loops: ``--threads`` (how many threads torch computes with on the CPU) and the
plain progress lines (an estimate of the run's duration after its first steps, then a line every
``--progress-every`` seconds), printed whether or not stdout is a terminal (CI logs, ``nohup``, ``| tee``).

Why a thread default at all: torch's OpenMP pool spins while it waits for its slowest thread. On a machine with as
many cores as threads, one other busy process makes every parallel region wait for a descheduled thread; the tiny
demo slowed from ~2 min to > 11 min that way. Small models gain little from a second thread anyway (their matmuls
are tiny), so ``auto`` takes one thread for them, and for larger models the cores not already kept busy by other
processes (the 1-minute load average), at least one. Measured numbers: docs/training.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

SMALL_MODEL_PARAMS = 50_000_000  # below this, one thread: the per-op parallel overhead outweighs the split work


def add_thread_arguments(parser: argparse.ArgumentParser) -> None:
    """``--threads`` and ``--progress-every``, shared by both loops (neither changes a step's math)."""
    parser.add_argument("--threads", default="auto",
                        help="CPU threads for torch (a positive integer, or auto: OMP_NUM_THREADS when set, else 1 "
                             "for models under 50M parameters, else the cores that the load average leaves free); "
                             "does not apply to the GPU's work")  # fmt: skip
    parser.add_argument("--progress-every", type=float, default=30.0,
                        help="seconds between the plain progress lines (step, elapsed, time left); 0: none")


def check_thread_arguments(parser: argparse.ArgumentParser, args) -> None:
    if args.threads != "auto":
        try:
            n = int(args.threads)
        except ValueError:
            n = 0
        if n < 1:
            parser.error(f"--threads: expected a positive integer or auto, got {args.threads!r}")
        args.threads = n
    if not args.progress_every >= 0:  # NaN too
        parser.error(f"--progress-every: expected seconds >= 0, got {args.progress_every}")


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def choose_threads(requested, n_params: int, device: torch.device) -> tuple[int, str]:
    """The thread count for ``--threads requested`` and why (``auto`` keeps an ``OMP_NUM_THREADS`` the user set).
    Example: ``choose_threads("auto", 5e6, cpu)`` ->
    ``(1, "auto: a small model (5.0M parameters)")``."""
    cores = available_cores()
    if requested != "auto":
        return int(requested), "--threads"
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:  # the user's own setting wins over the guess
        return torch.get_num_threads(), f"auto: OMP_NUM_THREADS={env}"
    if device.type != "cpu":
        return torch.get_num_threads(), "auto: the GPU computes, torch's default for the CPU side"
    if n_params < SMALL_MODEL_PARAMS:
        return 1, f"auto: a small model ({n_params / 1e6:.1f}M parameters)"
    try:
        busy = round(os.getloadavg()[0])
    except OSError:
        busy = 0
    return max(1, min(cores, cores - busy)), f"auto: {cores} core(s), load average {busy}"


def set_threads(requested, model, device: torch.device, verbose: bool) -> int:
    """Apply :func:`choose_threads` for ``model`` and print the choice (``verbose``); returns the count."""
    n, why = choose_threads(requested, sum(p.numel() for p in model.parameters()), device)
    torch.set_num_threads(n)
    if verbose:
        print(f"threads: {n} ({why}; {available_cores()} core(s) available)", flush=True)
    return n


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class Progress:
    """Plain progress lines: after the first ``estimate_after`` steps the estimated time of the remaining steps,
    then every ``every`` seconds the step, the elapsed time and the time left. ``write``: where lines go (tqdm.write
    keeps a terminal's bar intact). ``extra_s``: work the estimate should add (evaluations, saves) per step.

    Example: ``p = Progress("bpo", 0, 150, 30.0, print)``; ``p.step_done(step + 1)`` after each step."""

    def __init__(self, name: str, start_step: int, total: int, every: float, write, estimate_after: int = 1):
        self.name, self.start_step, self.total, self.every, self.write = name, start_step, total, every, write
        self.estimate_after = estimate_after
        self.t0 = time.perf_counter()
        self.last = self.t0
        self.first_done: float | None = None  # the first step includes one-off warm-up: left out of the rate

    def _rate(self, done: int, now: float) -> float:
        """Seconds per step, from the steps after the first (the first alone when there is no other)."""
        if done - self.start_step > 1 and self.first_done is not None:
            return (now - self.first_done) / (done - self.start_step - 1)
        return (now - self.t0) / max(1, done - self.start_step)

    def _line(self, text: str) -> None:
        self.write(text)
        sys.stdout.flush()  # a pipe buffers: the line must reach a CI log now, not at exit

    def step_done(self, done: int) -> None:
        now = time.perf_counter()
        if done == self.start_step + 1:
            self.first_done = now
        if done == self.total:
            return
        ran = done - self.start_step
        if ran == min(self.estimate_after, self.total - self.start_step):
            rate = self._rate(done, now)
            self._line(f"{self.name}: {ran} step(s) in {_duration(now - self.t0)} ({rate:.2f} s/step); estimated "
                       f"{_duration(rate * (self.total - done))} for the remaining {self.total - done} of "
                       f"{self.total} steps")  # fmt: skip
            self.last = now
        elif self.every and now - self.last >= self.every:
            rate = self._rate(done, now)
            self._line(f"{self.name}: step {done}/{self.total} ({done / self.total:.0%}), "
                       f"{_duration(now - self.t0)} elapsed, ~{_duration(rate * (self.total - done))} left")
            self.last = now
