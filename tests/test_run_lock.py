"""One writer per run folder (issue #22 item 1), with real processes: a second run on the same ``--output-dir`` (fresh
or ``--resume``) is refused at start in one line naming the holder's pid, host and start time; a lock left by a
killed run is taken over, saying whose it was."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import torch

# takes the folder's lock the way both loops do (prepare_output_dir), says "ready", holds it until told to end
_HOLDER = r"""
import argparse, sys
from pathlib import Path
from r4b_fast.training.common import add_run_arguments, prepare_output_dir
parser = argparse.ArgumentParser(prog="holder")
parser.add_argument("--output-dir", type=Path)
add_run_arguments(parser)
prepare_output_dir(parser, parser.parse_args(sys.argv[1:]))
print("ready", flush=True)
sys.stdin.readline()
"""
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore"}


def _start(out: Path, *flags: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, "--output-dir", str(out), *flags], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)  # fmt: skip
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise AssertionError(f"the holder did not take the lock: {line!r} {proc.stderr.read()[-2000:]}")
    return proc


def _end(proc: subprocess.Popen) -> str:
    _, err = proc.communicate("\n", timeout=60)
    assert proc.returncode == 0, err
    return err


def _run(out: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _HOLDER, "--output-dir", str(out), *flags], input="\n",
                          capture_output=True, text=True, timeout=120, env=ENV)  # fmt: skip


def _check_refused(proc: subprocess.CompletedProcess, out: Path, holder_pid: int, prog: str) -> None:
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    line = lines[0]
    assert line.startswith(f"{prog}: error: --output-dir: {out} is in use by another run"), line
    assert f"pid {holder_pid} on host {socket.gethostname()}, started 20" in line, line


def test_a_second_run_on_the_same_folder_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    holder = _start(out)
    try:
        # the real loop: refused before anything loads or is written
        proc = subprocess.run([sys.executable, "-m", "r4b_fast.training.annealing", "--steps", "2", "--batch-size",
                               "4", "--hidden-size", "32", "--layers", "1", "--eval-items", "0", "--device", "cpu",
                               "--output-dir", str(out)], capture_output=True, text=True, timeout=300,
                              env=ENV)  # fmt: skip
        _check_refused(proc, out, holder.pid, "python -m r4b_fast.training.annealing")
        assert sorted(p.name for p in out.iterdir()) == ["run.lock"]
        info = json.loads((out / "run.lock").read_text())
        assert info["pid"] == holder.pid and info["host"] == socket.gethostname()
    finally:
        err = _end(holder)
    assert "run lock" not in err
    assert (out / "run.lock").read_text() == ""  # a clean end clears the holder's info
    proc = _run(out)  # free again, and no stale lock to report
    assert proc.returncode == 0 and "ready" in proc.stdout and "run lock" not in proc.stderr, proc.stderr


def test_two_concurrent_resumes_of_one_run_are_refused_the_same_way(tmp_path):
    from r4b_fast.training.common import LossModule, save_checkpoint

    out = tmp_path / "run"
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(net.parameters())
    save_checkpoint(out / "checkpoint", LossModule(net, None), opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1),
                    3)  # fmt: skip
    holder = _start(out, "--resume")
    try:
        _check_refused(_run(out, "--resume"), out, holder.pid, "holder")
        _check_refused(_run(out, "--overwrite"), out, holder.pid, "holder")  # and never deletes the run under it
        assert (out / "checkpoint").exists()
    finally:
        _end(holder)
    assert _run(out, "--resume").returncode == 0


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_message(tmp_path):
    out = tmp_path / "run"
    holder = _start(out)
    holder.send_signal(signal.SIGKILL)  # no cleanup: the kernel releases the flock, the holder's info stays
    holder.wait(timeout=60)
    assert json.loads((out / "run.lock").read_text())["pid"] == holder.pid
    taker = _start(out)
    try:
        _, err = taker.communicate("\n", timeout=60)
    finally:
        if taker.poll() is None:
            taker.kill()
    assert taker.returncode == 0, err
    lines = [line for line in err.splitlines() if "run lock" in line]
    assert len(lines) == 1, err
    assert f"the previous run (pid {holder.pid} on host {socket.gethostname()}, started 20" in lines[0]
    assert "ended without releasing its lock; taking it over" in lines[0]


def test_the_same_process_may_prepare_its_folder_again(tmp_path):
    """The loops' tests call main() repeatedly in one process: the lock is re-entrant there."""
    from argparse import ArgumentParser

    from r4b_fast.training.common import add_run_arguments, prepare_output_dir, release_run_lock

    out = tmp_path / "run"
    parser = ArgumentParser(prog="loop")
    parser.add_argument("--output-dir", type=Path)
    add_run_arguments(parser)
    try:
        for _ in range(2):
            assert prepare_output_dir(parser, parser.parse_args(["--output-dir", str(out)])) is None
        proc = _run(out)
        assert proc.returncode == 1 and f"pid {os.getpid()}" in proc.stderr, proc.stderr
    finally:
        release_run_lock(out)
    assert _run(out).returncode == 0
