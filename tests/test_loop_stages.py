"""The loops' step stages and run-time flags: --mismatch-every (issue #20 item 5), --threads and the progress lines
(issue #18 item 5), --gradient-checkpointing (issue #20 item 4: the same loss and gradients, less activation
memory)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from r4b_fast.training.common import read_metrics

MISMATCH_KEYS = ("mismatch/abs_mean", "mismatch/abs_max", "mismatch/k3")


def _bpo(tmp_path, model_dir, name, *extra):
    from r4b_fast.training import bpo

    out = tmp_path / name
    args = ["--model", str(model_dir), "--prompts", "2", "--g", "2", "--max-new-tokens", "8", "--eval-items", "0",
            "--output-dir", str(out), *extra]  # fmt: skip
    assert bpo.main(args) == 0
    return out


@pytest.mark.parametrize("every, measured", [("2", [1, 3, 5]), ("0", []), ("10", [1])])
def test_mismatch_forward_runs_every_n_steps(tmp_path, tiny_policy_dir, monkeypatch, every, measured):
    """--mismatch-every N: the no-grad training forward (and its metrics) on steps 1, 1 + N, ...; 0: never. The
    other metrics do not depend on it (it measures, it does not train)."""
    from r4b_fast.training import bpo_step

    forwards = []
    real = bpo_step._completion_logprobs
    monkeypatch.setattr(bpo_step, "_completion_logprobs", lambda *a: forwards.append(1) or real(*a))
    out = _bpo(tmp_path, tiny_policy_dir, "run", "--steps", "5", "--mismatch-every", every)
    log = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in log if all(k in r for k in MISMATCH_KEYS)] == measured
    assert len(forwards) == len(measured)
    if every == "2":  # the training itself is the same as with the forward every step
        every_step = read_metrics(_bpo(tmp_path, tiny_policy_dir, "each", "--steps", "5", "--mismatch-every", "1")
                                  / "metrics.jsonl")  # fmt: skip
        for a, b in zip(log, every_step):
            assert a["loss"] == b["loss"] and a["reward/all"] == b["reward/all"]


def test_rollout_is_measures_every_step_whatever_mismatch_every(tmp_path, tiny_policy_dir):
    out = _bpo(tmp_path, tiny_policy_dir, "run", "--steps", "2", "--mismatch-every", "0", "--rollout-is", "token")
    assert all(all(k in r for k in MISMATCH_KEYS) for r in read_metrics(out / "metrics.jsonl"))


def test_mismatch_every_and_threads_flags_validated(tmp_path, tiny_policy_dir, capsys):
    from r4b_fast.training import annealing, bpo

    for flag, value in (("--mismatch-every", "-1"), ("--threads", "0"), ("--threads", "two"),
                        ("--progress-every", "nan")):  # fmt: skip
        with pytest.raises(SystemExit):
            bpo.parse_args(["--model", str(tiny_policy_dir), flag, value, "--output-dir", str(tmp_path / "x")])
        assert flag in capsys.readouterr().err.splitlines()[-1]
    with pytest.raises(SystemExit):
        annealing.main(["--threads", "-2", "--output-dir", str(tmp_path / "y")])
    assert "--threads" in capsys.readouterr().err.splitlines()[-1]
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_thread_choice(monkeypatch):
    from r4b_fast.training import threads

    cpu = torch.device("cpu")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "available_cores", lambda: 8)
    assert threads.choose_threads("auto", 1_000_000, cpu)[0] == 1  # the tiny models: one thread
    assert threads.choose_threads(3, 1_000_000, cpu) == (3, "--threads")
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (2.6, 0.0, 0.0))
    assert threads.choose_threads("auto", 4_000_000_000, cpu)[0] == 5  # 8 cores, ~3 busy
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (30.0, 0.0, 0.0))
    assert threads.choose_threads("auto", 4_000_000_000, cpu)[0] == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's setting: kept (torch read it at start)
    assert threads.choose_threads("auto", 1_000_000, cpu) == (torch.get_num_threads(), "auto: OMP_NUM_THREADS=3")


def test_progress_lines_estimate_then_every_interval(monkeypatch):
    from r4b_fast.training import threads

    now = [0.0]
    monkeypatch.setattr(threads.time, "perf_counter", lambda: now[0])
    lines = []
    progress = threads.Progress("bpo", 0, 100, 30.0, lines.append)
    for step, t in ((1, 10.0), (2, 12.0), (3, 14.0), (16, 40.0), (17, 42.0), (100, 240.0)):
        now[0] = t
        progress.step_done(step)
    assert lines[0] == "bpo: 1 step(s) in 10 s (10.00 s/step); estimated 16.5 min for the remaining 99 of 100 steps"
    # 30 s after the estimate: step 16 at 40 s; the rate leaves out the first step (warm-up): 2 s/step
    assert lines[1] == "bpo: step 16/100 (16%), 40 s elapsed, ~2.8 min left"
    assert len(lines) == 2  # nothing at 42 s (too soon) nor at the end


def test_progress_reaches_a_pipe_while_the_run_goes_on(tmp_path, tiny_policy_dir):
    """stdout not a terminal (CI): the estimate and progress lines are there, the tqdm bar is not."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # auto's own choice
    proc = subprocess.run([sys.executable, "-m", "r4b_fast.training.bpo", "--model", str(tiny_policy_dir),
                           "--steps", "3", "--prompts", "1", "--g", "1", "--max-new-tokens", "4", "--eval-items", "0",
                           "--progress-every", "1e-9", "--output-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=600, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "threads: 1 (auto: a small model" in out
    assert "bpo: 1 step(s) in" in out and "estimated" in out and "bpo: step 2/3 (67%)" in out
    assert not re.search(r"bpo: +\d+%\|", out + proc.stderr)  # the loop's tqdm bar (transformers' own still draw)


def _sft_loss_and_grads(model, checkpointing: bool):
    from r4b_fast.training.annealing import encode_sft_batch, sft_loss
    from r4b_fast.training.bpo_loss import enable_gradient_checkpointing
    from r4b_fast.training.task import annealing_mix, build_tokenizer, sample_items
    from r4b_fast.training.tiny_model import num_image_tokens

    if checkpointing:
        assert enable_gradient_checkpointing(model) >= 2  # the vision tower's layers and the LLM's
    items = sample_items(3, 4)
    modes, auto = annealing_mix(items, 4)
    ids, mask, labels, images = encode_sft_batch(build_tokenizer(), items, modes, num_image_tokens(model), auto)
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = sft_loss(model, ids, mask, labels, images)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, saved[0]


def test_gradient_checkpointing_same_loss_and_gradients_less_saved():
    from r4b_fast.training.task import build_tokenizer
    from r4b_fast.training.tiny_model import build_tiny_r4b

    model = build_tiny_r4b(build_tokenizer(), hidden_size=32, layers=2, seed=0).train()
    loss, grads, saved = _sft_loss_and_grads(model, False)
    loss_c, grads_c, saved_c = _sft_loss_and_grads(model, True)
    torch.testing.assert_close(loss_c, loss, rtol=0, atol=0)
    assert grads.keys() == grads_c.keys() and any("vision_tower" in k for k in grads)
    for k in grads:
        torch.testing.assert_close(grads_c[k], grads[k], rtol=1e-6, atol=1e-7, msg=k)
    assert saved_c < 0.5 * saved, (saved_c, saved)  # what autograd holds outside the checkpointed layers


def test_bpo_gradient_checkpointing_trains_the_same(tmp_path, tiny_policy_dir):
    from safetensors.torch import load_file

    runs = [_bpo(tmp_path, tiny_policy_dir, name, "--steps", "2", *flag)
            for name, flag in (("plain", []), ("ckpt", ["--gradient-checkpointing"]))]  # fmt: skip
    a, b = (read_metrics(r / "metrics.jsonl") for r in runs)
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-7)
    wa, wb = (load_file(str(r / "checkpoint" / "model.safetensors")) for r in runs)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6, msg=k)
