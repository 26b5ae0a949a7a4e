"""Build csrc/*.cu into shared libraries with a C ABI and load them with ctypes.

Why not a torch C++ extension: it needs the torch headers and a matching CUDA toolkit at build time, and
cannot be checked by CI on a CPU-only torch. A plain ``nvcc -shared`` library takes raw pointers and the
current stream, compiles anywhere nvcc runs (CI compiles every source for sm_80 and sm_90 with the same
command the runtime uses), and is imported only when the cuda backend is used.

Cache: ``$R4B_FAST_CACHE_DIR`` or ``~/.cache/r4b_fast``, one file per (source hash, arch, nvcc version),
built under a file lock so concurrent processes (torchrun ranks) build once. ``R4B_FAST_NO_JIT=1`` forbids
building at run time: the library must have been built ahead of time with ``python -m r4b_fast.build``.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
from importlib import resources
from pathlib import Path

ENV_NO_JIT = "R4B_FAST_NO_JIT"
ENV_CACHE_DIR = "R4B_FAST_CACHE_DIR"
DEFAULT_ARCHS = ("80", "90")


def csrc_dir() -> Path:
    return Path(str(resources.files("r4b_fast.csrc")))


def cache_dir() -> Path:
    return Path(os.environ.get(ENV_CACHE_DIR) or Path.home() / ".cache" / "r4b_fast")


def sources() -> list[Path]:
    return sorted(csrc_dir().glob("*.cu"))


@functools.cache
def nvcc_path() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(cuda_home) / "bin" / "nvcc"
    return str(candidate) if candidate.exists() else None


@functools.cache
def _nvcc_version() -> str:
    nvcc = nvcc_path()
    if nvcc is None:
        return "none"
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False).stdout
    return out.strip().splitlines()[-1] if out.strip() else "unknown"


def _jit_allowed() -> bool:
    return os.environ.get(ENV_NO_JIT, "0") in ("", "0")


def _library_path(source: Path, archs: tuple[str, ...]) -> Path:
    digest = hashlib.sha256()
    digest.update(source.read_bytes())
    for header in sorted(source.parent.glob("*.cuh")):
        digest.update(header.read_bytes())
    digest.update(_nvcc_version().encode())
    key = digest.hexdigest()[:16]
    return cache_dir() / f"{source.stem}-{key}-sm{'_'.join(archs)}.so"


def nvcc_command(source: Path, output: Path, archs: tuple[str, ...]) -> list[str]:
    nvcc = nvcc_path()
    if nvcc is None:
        raise RuntimeError("nvcc not found on PATH or in $CUDA_HOME/bin")
    cmd = [nvcc, "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-lineinfo"]
    for arch in archs:
        cmd += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    cmd += ["-I", str(source.parent), "-o", str(output), str(source)]
    return cmd


def compile_source(source: Path, archs: tuple[str, ...] = DEFAULT_ARCHS, output: Path | None = None) -> Path:
    """Compile one .cu file into a shared library (cached; safe under concurrency). Returns its path."""
    from filelock import FileLock

    output = output or _library_path(source, archs)
    if output.exists():
        return output
    output.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(output) + ".lock"):
        if output.exists():  # another process built it while we waited
            return output
        tmp = output.with_suffix(f".tmp{os.getpid()}.so")
        proc = subprocess.run(nvcc_command(source, tmp, archs), capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise RuntimeError(f"nvcc failed to compile {source.name}:\n{proc.stderr or proc.stdout}")
        os.replace(tmp, output)  # atomic: readers never see a half-written library
    return output


def unavailable_reason() -> str | None:
    """Why the cuda backend cannot run at all here, or None."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device is visible to torch"
    if not _jit_allowed():
        return None  # prebuilt libraries may exist; load_library reports precisely if not
    if nvcc_path() is None:
        return "nvcc was not found (install the CUDA toolkit, or prebuild with `python -m r4b_fast.build`)"
    return None


def _device_arch() -> str:
    import torch

    major, minor = torch.cuda.get_device_capability()
    return f"{major}{minor}"


@functools.cache
def load_library(name: str) -> ctypes.CDLL:
    """Load csrc/<name>.cu as a library for the current GPU, building it first if needed and allowed."""
    source = csrc_dir() / f"{name}.cu"
    if not source.exists():
        raise FileNotFoundError(f"no CUDA source {source}")
    arch = _device_arch()
    # A library built ahead of time for the default archs serves this GPU when its arch is among them.
    candidates = [_library_path(source, DEFAULT_ARCHS)] if arch in DEFAULT_ARCHS else []
    candidates.append(_library_path(source, (arch,)))
    for path in candidates:
        if path.exists():
            return ctypes.CDLL(str(path))
    if not _jit_allowed():
        raise RuntimeError(
            f"{ENV_NO_JIT} is set and no prebuilt library for {name} (sm_{arch}) is in {cache_dir()}; "
            f"run `python -m r4b_fast.build --arch {arch}` first"
        )
    return ctypes.CDLL(str(compile_source(source, (arch,))))
