"""The ahead-of-time CUDA build command (the training commands are tested in test_bpo.py / test_task.py)."""

import subprocess
import sys

import pytest

from r4b_fast import _cuda_build


def _run(*args):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300)


def test_build_rejects_bad_arch():
    proc = _run("r4b_fast.build", "--arch", "hopper")
    assert proc.returncode != 0 and "--arch must be comma-separated SM numbers" in proc.stderr


@pytest.mark.skipif(_cuda_build.nvcc_path() is None, reason="nvcc not installed")
def test_build_compiles_every_source(tmp_path):
    proc = _run("r4b_fast.build", "--arch", "90", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    built = sorted(p.name for p in tmp_path.glob("*.so"))
    assert built == sorted(f"{s.stem}-sm90.so" for s in _cuda_build.sources())
