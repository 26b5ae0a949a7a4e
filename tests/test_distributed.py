"""torchrun + FSDP2 (gloo on CPU): 2 processes give the same losses and weights as 1 process on the same data."""

import json
import subprocess
import sys

import pytest
import torch


def _anneal(out, nproc=None):
    args = ["-m", "r4b_fast.training.annealing", "--steps", "3", "--batch-size", "8", "--hidden-size", "32",
            "--layers", "2", "--eval-items", "0", "--warmup", "1", "--output-dir", str(out)]
    if nproc is None:
        cmd = [sys.executable, *args]
    else:
        import socket

        with socket.socket() as sock:  # a free port for the rendezvous (port 0 is not shared with the workers)
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(port), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")
def test_two_process_fsdp_annealing_matches_one_process(tmp_path):
    from safetensors.torch import load_file

    single = _anneal(tmp_path / "one")
    assert single.returncode == 0, single.stderr
    double = _anneal(tmp_path / "two", nproc=2)
    assert double.returncode == 0, double.stderr[-3000:]
    assert "2 process(es)" in double.stdout
    losses = [[json.loads(line)["loss"] for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
              for d in ("one", "two")]
    assert len(losses[0]) == 3
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-5, atol=1e-6)
    a = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    # and training did something: the comparison is not between two untouched initialisations
    assert losses[0][2] < losses[0][0]


def _torchrun(nproc, module, *args):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(port), "-m", module, *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def _bpo(out, nproc, *extra):
    """BPO from the shipped annealed model (so that rewards vary and the update is not zero), 3 small steps."""
    args = ["--steps", "3", "--prompts", "4", "--g", "4", "--max-new-tokens", "40", "--hard-fraction", "1",
            "--eval-items", "0", "--grad-accum", "2", "--save-every", "1", "--output-dir", str(out),
            *extra]  # fmt: skip
    if nproc == 1:
        return subprocess.run([sys.executable, "-m", "r4b_fast.training.bpo", *args], capture_output=True, text=True,
                              timeout=600)  # fmt: skip
    return _torchrun(nproc, "r4b_fast.training.bpo", *args)


def _losses(path):
    return [r["loss"] for r in map(json.loads, (path / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")
def test_two_process_bpo_matches_one_process_and_resumes_across_world_sizes(tmp_path):
    """BPO under torchrun (FSDP2 policy, plain rollout replica, each rank its prompts and its slice of the global
    sampling noise, global normaliser): the same rollouts, losses and weights as one process. Then a 1-process run
    killed after step 2 resumes under 2 processes (checkpoint loaded into the shards) and ends where both did."""
    from safetensors.torch import load_file

    from r4b_fast.training.bpo import DEFAULT_MODEL

    one = _bpo(tmp_path / "one", 1)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _bpo(tmp_path / "two", 2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 process(es)" in two.stdout
    l1, l2 = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(l1) == 3  # (on-policy, the loss's value is -mean advantage = 0; its gradient is not)
    torch.testing.assert_close(torch.tensor(l2), torch.tensor(l1), rtol=1e-4, atol=1e-6)
    m1 = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    for key in ("reward/all", "reward/think", "reward/no_think", "length/think", "length/no_think"):
        assert [r[key] for r in m2] == pytest.approx([r[key] for r in m1]), key  # same rollouts
    assert min(r["zero_signal_groups"] for r in m1) < 4  # some groups carry a learning signal

    a = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
    init = load_file(str(DEFAULT_MODEL / "model.safetensors"))
    assert a.keys() == b.keys()
    # A key projection's bias has a zero gradient in exact arithmetic (softmax ignores a per-query shift): its
    # gradient is rounding noise, which Adam scales up to a full-size step of random sign. Nothing to compare.
    compared = [k for k in a if not k.endswith("k_proj.bias")]
    for k in compared:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    moved = [k for k in compared if k in init and (a[k] - init[k]).abs().max() > 1e-4]
    assert len(moved) > len(compared) // 2, moved  # training moved the weights: not two untouched copies

    killed = _bpo(tmp_path / "cross", 1, "--stop-after", "2")
    assert killed.returncode == 3
    resumed = _bpo(tmp_path / "cross", 2, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 2" in resumed.stdout
    c = load_file(str(tmp_path / "cross" / "model" / "model.safetensors"))
    for k in compared:
        torch.testing.assert_close(c[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    torch.testing.assert_close(torch.tensor(_losses(tmp_path / "cross")), torch.tensor(l1), rtol=1e-4, atol=1e-6)
