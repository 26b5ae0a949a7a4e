"""Backend dispatch and the CUDA build: explicit argument, environment variable, reasons when unavailable."""

import ctypes

import pytest
import torch
from conftest import HAS_GPU

import r4b_fast
from r4b_fast import BackendUnavailableError, _cuda_build, group_advantages
from r4b_fast.backends import resolve_backend


def test_default_backend_for_cpu_is_torch():
    assert resolve_backend(None, "cpu", ("torch", "triton", "cuda"), {"cpu": ("torch",)}, "op") == "torch"


def test_env_variable_selects_backend(monkeypatch):
    monkeypatch.setenv("R4B_FAST_BACKEND", "triton")
    assert resolve_backend(None, "cpu", ("torch", "triton"), {"cpu": ("torch",)}, "op") == "triton"
    # an explicit argument wins over the environment
    assert resolve_backend("torch", "cpu", ("torch", "triton"), {"cpu": ("torch",)}, "op") == "torch"


def test_env_variable_naming_unavailable_backend_says_why(monkeypatch):
    monkeypatch.setenv("R4B_FAST_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="R4B_FAST_BACKEND='cuda' cannot run on device cpu"):
        group_advantages(torch.ones(4), 2)


@pytest.mark.skipif(HAS_GPU, reason="checks the CPU-only message")
def test_cuda_backend_on_cpu_says_why():
    with pytest.raises(BackendUnavailableError, match="needs CUDA tensors.*no CUDA device"):
        group_advantages(torch.ones(4), 2, backend="cuda")
    assert "cuda" not in r4b_fast.available_backends("cpu")


def test_triton_on_cpu_without_interpreter_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        group_advantages(torch.ones(4), 2, backend="triton")


def test_unknown_backend():
    with pytest.raises(BackendUnavailableError, match="unknown backend 'jax'"):
        group_advantages(torch.ones(4), 2, backend="jax")


def test_op_without_a_backend_says_so():
    reasons = r4b_fast.not_supported_reasons("cuda", "cpu", op_backends=("torch",))
    assert any("no cuda implementation" in r for r in reasons)


@pytest.mark.skipif(_cuda_build.nvcc_path() is None, reason="nvcc not installed")
def test_cuda_sources_build_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("R4B_FAST_CACHE_DIR", str(tmp_path))
    source = _cuda_build.csrc_dir() / "group_advantages.cu"
    first = _cuda_build.compile_source(source, ("80",))
    mtime = first.stat().st_mtime_ns
    again = _cuda_build.compile_source(source, ("80",))
    assert again == first and again.stat().st_mtime_ns == mtime  # cached, not rebuilt
    assert first.parent == tmp_path and not list(tmp_path.glob("*.tmp*"))
    lib = ctypes.CDLL(str(first))  # loads without a GPU (the CUDA runtime is linked statically)
    for symbol in ("r4b_group_advantages_f32", "r4b_group_advantages_f64", "r4b_cuda_error_string"):
        assert hasattr(lib, symbol)


@pytest.mark.skipif(_cuda_build.nvcc_path() is None, reason="nvcc not installed")
def test_cuda_compile_error_is_reported(tmp_path):
    bad = tmp_path / "broken.cu"
    bad.write_text("__global__ void k() { this is not cuda; }\n")
    with pytest.raises(RuntimeError, match="nvcc failed to compile broken.cu"):
        _cuda_build.compile_source(bad, ("80",), tmp_path / "broken.so")


def test_import_needs_no_gpu_toolchain():
    import subprocess
    import sys

    code = ("import sys, r4b_fast; bad = [m for m in ('triton', 'flash_attn', 'xformers') if m in sys.modules];"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, env={"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": ""})
