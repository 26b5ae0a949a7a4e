"""The loops' guards (issue #22): a divergence is caught at the update that caused it, with the step and the flag to
lower, before anything from that state is saved (items 5); SIGTERM / SIGUSR1 finish the step, save, exit 143 / 138,
and the run resumes from that checkpoint bit-identically to an uninterrupted one; a second signal stops at once
(item 4)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _bpo_args(model_dir, out, *extra):
    return ["--model", str(model_dir), "--prompts", "2", "--g", "2", "--max-new-tokens", "6", "--eval-items", "0",
            "--output-dir", str(out), *extra]  # fmt: skip


def _anneal_args(out, *extra):
    return ["--batch-size", "4", "--hidden-size", "32", "--layers", "1", "--eval-items", "0", "--warmup", "1",
            "--output-dir", str(out), *extra]  # fmt: skip


def _run(module, args, timeout=600):
    return subprocess.run([sys.executable, "-m", f"r4b_fast.training.{module}", *args], capture_output=True,
                          text=True, timeout=timeout, env=ENV)  # fmt: skip


# -- divergence ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lr, what", [("1e30", "explode"), ("1e38", "overflowed|non-finite|explode")])
def test_bpo_divergence_stops_at_the_update_naming_step_and_flag(tmp_path, tiny_policy_dir, monkeypatch, capsys, lr,
                                                                  what):  # fmt: skip
    """Before: --lr 1e30 saved a checkpoint of ~1e30 weights and died later on non-finite log-probs; --lr 1e38
    raised a raw overflow RuntimeError. Now: the run ends at step 1 with a message that says what and which flag
    (``SystemExit`` with the message: exit status 1), and nothing of that state is on disk (--save-every 1 would
    have saved it). The thinking half earns the reward, so that step 1 has a gradient (a random model's rollouts
    all earn 0)."""
    import re

    from r4b_fast.training import bpo, bpo_step

    monkeypatch.setattr(bpo_step, "accuracy_reward", lambda text, answer: float(not text.startswith("<think>\n\n")))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        bpo.main(_bpo_args(tiny_policy_dir, out, "--steps", "3", "--save-every", "1", "--lr", lr))
    message = str(exc.value.code)
    assert message.startswith("bpo: the update at step 1 ") and re.search(what, message), message
    assert "lower --lr" in message and "Nothing was saved" in message
    assert not (out / "checkpoint").exists() and not (out / "checkpoint.tmp").exists()
    assert not (out / "model").exists()


def test_annealing_divergence_names_the_learning_rate_flags(tmp_path):
    out = tmp_path / "run"
    proc = _run("annealing", _anneal_args(out, "--steps", "3", "--save-every", "1", "--lr-llm", "1e30"))
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("annealing: the update at step 1 made the weights explode") and "--lr-llm" in last, last
    assert not (out / "checkpoint").exists() and not (out / "model").exists()


def test_weight_guard_names_the_tensor_and_allows_ordinary_weights():
    from r4b_fast.training.guards import DivergenceError, WeightGuard

    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    guard = WeightGuard(net.named_parameters(), "--lr")
    assert guard.limit == 1e4  # small starting weights: the floor
    assert guard.check(1) == pytest.approx(max(float(p.detach().abs().max()) for p in net.parameters()))
    with torch.no_grad():
        net[1].bias[0] = 5e4
    with pytest.raises(DivergenceError, match=r"step 7 made the weights explode \(max \|w\| 5e\+04 in 1\.bias"):
        guard.check(7)
    with torch.no_grad():
        net[0].weight[1, 2] = float("nan")
    with pytest.raises(DivergenceError, match=r"step 8 made the weights non-finite .*in 0\.weight.*lower --lr"):
        guard.check(8)


def test_optimizer_overflow_becomes_a_divergence_error():
    from r4b_fast.training.guards import DivergenceError, WeightGuard

    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=1e38)
    p.grad = torch.ones(3)
    guard = WeightGuard([("w", p)], "--lr")
    try:
        guard.optimizer_step(opt, 1)
    except DivergenceError as err:
        assert "step 1 overflowed" in str(err) and "lower --lr" in str(err)
    else:
        with pytest.raises(DivergenceError, match="step 1 made the weights"):
            guard.check(1)


# -- preemption ---------------------------------------------------------------------------------------------------
def _signalled(module, args, signals, marker, tmp_path, gap=0.05):
    """Start the loop, wait for ``marker`` on its stdout (a step finished and its stop check passed), send
    ``signals`` (``gap`` seconds apart); returns (exit status, stdout, stderr)."""
    err = open(tmp_path / f"{module}.stderr", "w+")
    proc = subprocess.Popen([sys.executable, "-m", f"r4b_fast.training.{module}", *args], stdout=subprocess.PIPE,
                            stderr=err, text=True, env=ENV)  # fmt: skip
    lines, deadline = [], time.time() + 600
    try:
        for line in proc.stdout:
            lines.append(line)
            if marker in line:
                for sig in signals:
                    proc.send_signal(sig)
                    time.sleep(gap)
                break
            assert time.time() < deadline
        lines += proc.stdout.readlines()
        code = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    err.seek(0)
    return code, "".join(lines), err.read()


def _stopped_step(stdout: str, signame: str) -> int:
    import re

    found = re.search(rf"stopped by {signame} after step (\d+)", stdout)
    assert found, stdout[-2000:]
    return int(found.group(1))


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "checkpoint" / "model.safetensors"))


def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_bpo_sigterm_saves_exits_143_and_resumes_bit_identically(tmp_path, tiny_policy_dir):
    from r4b_fast.training.common import find_checkpoint, read_metrics

    steps = ["--steps", "5", "--save-every", "100"]  # only the preemption and the last step save
    full = _run("bpo", _bpo_args(tiny_policy_dir, tmp_path / "full", *steps))
    assert full.returncode == 0, full.stderr[-2000:]
    code, stdout, stderr = _signalled("bpo", _bpo_args(tiny_policy_dir, tmp_path / "cut", *steps),
                                      [signal.SIGTERM], "bpo: 1 step(s) in", tmp_path)  # fmt: skip
    assert code == 143, stderr[-2000:]
    step = _stopped_step(stdout, "SIGTERM")
    assert 2 <= step < 5 and "SIGTERM during step" in stderr and "finishing the step" in stderr
    assert find_checkpoint(tmp_path / "cut" / "checkpoint")[1]["step"] == step
    assert not (tmp_path / "cut" / "model").exists()
    resumed = _run("bpo", _bpo_args(tiny_policy_dir, tmp_path / "cut", *steps, "--resume"))
    assert resumed.returncode == 0 and f"at step {step}" in resumed.stdout, resumed.stderr[-2000:]
    _assert_same(_weights(tmp_path / "full"), _weights(tmp_path / "cut"))
    drop = {"tokens_per_s", "rollout_s", "step_s", "time", "wall_time"}
    a, b = (read_metrics(tmp_path / d / "metrics.jsonl") for d in ("full", "cut"))
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5]
    assert [{k: v for k, v in r.items() if k not in drop} for r in a] == \
        [{k: v for k, v in r.items() if k not in drop} for r in b]


def test_annealing_sigusr1_saves_exits_138_and_resumes_bit_identically(tmp_path):
    steps = ["--steps", "12", "--save-every", "0", "--progress-every", "0"]
    full = _run("annealing", _anneal_args(tmp_path / "full", *steps))
    assert full.returncode == 0, full.stderr[-2000:]
    code, stdout, stderr = _signalled("annealing", _anneal_args(tmp_path / "cut", *steps), [signal.SIGUSR1],
                                      "annealing: 5 step(s) in", tmp_path)  # fmt: skip
    assert code == 138, stderr[-2000:]
    step = _stopped_step(stdout, "SIGUSR1")
    assert 6 <= step < 12 and "exit status 138" in stdout
    resumed = _run("annealing", _anneal_args(tmp_path / "cut", *steps, "--resume"))
    assert resumed.returncode == 0 and f"at step {step}" in resumed.stdout, resumed.stderr[-2000:]
    _assert_same(_weights(tmp_path / "full"), _weights(tmp_path / "cut"))


def test_a_second_signal_stops_at_once(tmp_path, tiny_policy_dir):
    """In the loop: two SIGTERMs 0.3 s apart inside one (long) step: exit 143 without waiting for the step."""
    args = _bpo_args(tiny_policy_dir, tmp_path / "run", "--steps", "50", "--save-every", "100", "--prompts", "4",
                     "--g", "4")  # fmt: skip
    args[args.index("--max-new-tokens") + 1] = "40"
    code, stdout, stderr = _signalled("bpo", args, [signal.SIGTERM, signal.SIGTERM], "bpo: 1 step(s) in", tmp_path,
                                      gap=0.3)  # fmt: skip
    assert code == 143, stderr[-2000:]
    assert "second signal (SIGTERM): stopping now" in stderr
    assert "stopped by SIGTERM" not in stdout  # it did not wait for the step's end


def test_preemption_handler_first_flags_second_exits():
    """The handler alone, deterministic: the first signal only sets the flag; the second ends the process with
    128 + its number, whatever the code was doing."""
    script = ("import os, signal, time\n"
              "from r4b_fast.training.guards import Preemption\n"
              "with Preemption('x') as p:\n"
              "    os.kill(os.getpid(), signal.SIGUSR1); time.sleep(0.2)\n"
              "    assert p.requested() and p.exit_code() == 138\n"
              "    print('flagged', flush=True)\n"
              "    os.kill(os.getpid(), signal.SIGTERM); time.sleep(5)\n"
              "print('not reached')\n")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 143 and proc.stdout == "flagged\n", (proc.stdout, proc.stderr)
    assert "SIGUSR1 during step 0: finishing the step" in proc.stderr
    assert "second signal (SIGTERM): stopping now" in proc.stderr
