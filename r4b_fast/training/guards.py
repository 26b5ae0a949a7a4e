"""Guards both loops run around a step: divergence caught at the update that caused it (:class:`WeightGuard`), and
preemption (:class:`Preemption`: SIGTERM / SIGUSR1 finish the step, save a checkpoint and exit with 128 + the
signal's number; a second signal exits at once)."""

from __future__ import annotations

import math
import os
import signal

import torch

from r4b_fast.training.common import NonFiniteError

EXPLODED_FACTOR = 1000.0  # max |w| above this many times the starting one is an explosion ...
EXPLODED_FLOOR = 1e4  # ... and never below this (a model that starts with tiny weights)
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class DivergenceError(NonFiniteError):
    """An update made the weights non-finite or exploded; raised before anything from that state is saved."""


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p  # an FSDP2 shard: this rank's part


@torch.no_grad()
def max_abs_weights(params: list[torch.Tensor], world: int = 1) -> torch.Tensor:
    """``[P]`` float32, max |w| of each parameter (NaN counted as inf), over all ranks when ``world > 1``
    (every rank must call it). One ``vector_norm(ord=inf)`` per tensor, no host sync."""
    device = params[0].device
    zero = torch.zeros((), device=device)
    norms = torch.stack([torch.linalg.vector_norm(_local(p).detach(), ord=math.inf).float()
                         if _local(p).numel() else zero for p in params])  # fmt: skip
    norms = torch.nan_to_num(norms, nan=math.inf)
    if world > 1:
        torch.distributed.all_reduce(norms, op=torch.distributed.ReduceOp.MAX)
    return norms


class WeightGuard:
    """After each update: the largest |w| of every parameter, one host sync. Non-finite, or above
    ``max(EXPLODED_FLOOR, EXPLODED_FACTOR x`` the starting max |w|), raises :class:`DivergenceError` naming the
    step, the parameter and ``hint`` (the flag to lower).

    Example: ``guard = WeightGuard(model.named_parameters(), "--lr")``; after ``optimizer.step()``:
    ``guard.check(step + 1)``."""

    def __init__(self, named_parameters, hint: str, world: int = 1):
        named = [(n, p) for n, p in named_parameters if p.is_floating_point()]
        self.names, self.params = [n for n, _ in named], [p for _, p in named]
        self.hint, self.world = hint, world
        self.start = max(max_abs_weights(self.params, world).tolist()) if self.params else 0.0
        self.limit = max(EXPLODED_FLOOR, EXPLODED_FACTOR * self.start) if math.isfinite(self.start) else math.inf

    def check(self, step: int) -> float:
        """Raise when the weights after the update of ``step`` (1-based) diverged; returns the max |w|."""
        if not self.params:
            return 0.0
        norms = max_abs_weights(self.params, self.world).tolist()  # the one host sync
        worst = max(range(len(norms)), key=norms.__getitem__)
        top = norms[worst]
        if not math.isfinite(top):
            what = "non-finite"
        elif top > self.limit:
            what = "explode"
        else:
            return top
        raise DivergenceError(
            f"the update at step {step} made the weights {what} (max |w| {top:.3g} in {self.names[worst]}; "
            f"{self.start:.3g} at the start, limit {self.limit:.3g}); lower {self.hint}. Nothing was saved from "
            "that state: the last checkpoint, if any, is from before it"
        )

    def optimizer_step(self, optimizer, step: int) -> None:
        """``optimizer.step()``, its float overflow (a learning rate whose update does not fit the weights' dtype:
        ``value cannot be converted to type float without overflow``) turned into a :class:`DivergenceError`."""
        try:
            optimizer.step()
        except RuntimeError as err:
            if "overflow" not in str(err):
                raise
            raise DivergenceError(f"the update at step {step} overflowed ({err}); lower {self.hint}. Nothing was "
                                  "saved from that state: the last checkpoint, if any, is from before it") from err


class Preemption:
    """SIGTERM / SIGUSR1 (a scheduler's notice) ask the loop to stop after the current step: it saves a checkpoint
    and exits with ``128 + signal`` (143 for SIGTERM, 138 for SIGUSR1). A second signal exits at once (the last
    complete checkpoint stays; a save cut short is recovered on resume). Install with ``with Preemption(name) as
    pre:``; the loop polls :meth:`requested` once per step (under torchrun it agrees over the ranks).

    Example: ``if pre.requested(world): save(...); return pre.exit_code(step)``."""

    def __init__(self, name: str):
        self.name = name
        self.signum: int | None = None
        self.step = 0  # the step running when the signal came (1-based), for the message
        self._previous: dict[int, object] = {}

    def __enter__(self) -> Preemption:
        for sig in PREEMPT_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay as they are
                break
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:  # the second: now (os.write: a handler must not re-enter print's buffer)
            os.write(2, f"{self.name}: second signal ({name}): stopping now, without saving\n".encode())
            os._exit(128 + signum)
        self.signum = signum
        os.write(2, f"{self.name}: {name} during step {self.step}: finishing the step, then saving a checkpoint "
                    "(a second signal stops at once)\n".encode())  # fmt: skip

    def requested(self, world: int = 1, device: torch.device | None = None) -> bool:
        """Whether any rank was signalled (``world > 1``: every rank must call it, one all-reduce)."""
        if world > 1:
            flag = torch.tensor([self.signum or 0], device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            self.signum = int(flag.item()) or None
        return self.signum is not None

    def exit_code(self) -> int:
        return 128 + int(self.signum)

    def stopped(self, step: int, path) -> int:
        """Print that the run stopped after ``step`` with its checkpoint at ``path``; returns the exit status."""
        name = signal.Signals(self.signum).name
        print(f"{self.name}: stopped by {name} after step {step}; checkpoint {path} (continue with --resume); "
              f"exit status {self.exit_code()}", flush=True)
        return self.exit_code()
