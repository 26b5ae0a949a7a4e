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
