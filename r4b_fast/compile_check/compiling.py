"""Compiling recorded launches: Triton's own compiler for ``GPUTarget("cuda", arch, 32)`` under a stub driver (no GPU,
no CUDA driver), then the wheel's ``ptxas -v`` on the PTX for registers, shared memory and spills (cached by content),
and the verdict on each record (:func:`judge`)."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from r4b_fast.compile_check.recording import Launch

SMEM_LIMIT = 160 * 1024  # bytes: what a kernel may use and still fit sm_80 (164 KiB) with room for static smem


def default_cache_dir() -> Path:
    """Root of this check's caches (not the runtime Triton cache)."""
    env = os.environ.get("R4B_AOT_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "r4b_fast" / "triton_aot"



class _StubDriver:
    """Just what ``JITFunction.run(warmup=True)`` asks of a driver: a device, a stream and the target. The device id
    is the arch, so each target has its own binder and in-memory kernel cache."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_current_device(self):
        return self.arch

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", self.arch, 32)

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")

    def is_active(self):
        return True


def _set_driver(arch: int) -> None:
    from triton.runtime.driver import driver as cfg

    if not hasattr(cfg, "set_active"):  # Triton < 3.2 had no pluggable driver
        import triton

        raise RuntimeError(f"triton {triton.__version__} has no driver.set_active; the check needs triton >= 3.2")
    cfg.set_active(_StubDriver(arch))


def _ptxas(arch: int) -> str:
    from triton.backends.nvidia import compiler as nv

    get = getattr(nv, "get_ptxas", None)
    if get is not None:
        try:
            tool = get(arch)
        except TypeError:  # older signature without the arch
            tool = get()
        return tool.path
    from triton import knobs

    return knobs.nvidia.ptxas.path


def _ptxas_flags(enable_fp_fusion: bool, ptx_options: str | None = None) -> list:
    # the flags Triton's make_cubin passes, so the registers match the binary it built
    from triton.backends.nvidia.compiler import CUDABackend

    flags = ["-lineinfo", "-v"]
    if not enable_fp_fusion:
        flags.append("--fmad=false")
    if ptx_options:
        flags += ptx_options.split()
    try:
        if "regAllocOptLevel=2" in inspect.getsource(CUDABackend.make_cubin):
            flags.append("--regAllocOptLevel=2")
    except (OSError, TypeError):
        pass
    return flags


def parse_ptxas_log(log: str) -> dict:
    """Registers, stack, spills and static shared memory from a ``ptxas -v`` log (summed / maxed over functions).

    >>> parse_ptxas_log("ptxas info    : Used 40 registers, used 1 barriers, 16 bytes smem\\n"
    ...                 "    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads")["spill_stores"]
    4
    """
    regs = [int(x) for x in re.findall(r"Used (\d+) registers", log)]
    frames = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    smem = [int(x) for x in re.findall(r"(\d+) bytes smem", log)]
    return {
        "registers": max(regs) if regs else None,
        "stack": max((int(f[0]) for f in frames), default=0),
        "spill_stores": sum(int(f[1]) for f in frames),
        "spill_loads": sum(int(f[2]) for f in frames),
        "static_smem": max(smem, default=0),
        "parsed": bool(regs),
    }


def ptx_stats(ptx: str) -> dict:
    """MMA kind and atomic instruction count of a PTX listing."""
    wg = re.search(r"\bwgmma\.mma_async\b", ptx) is not None
    ms = re.search(r"\bmma\.sync\b", ptx) is not None
    mma = "+".join(k for k, on in (("wgmma", wg), ("mma.sync", ms)) if on) or "-"
    atomics = len(re.findall(r"^\s*(?:@!?%p\w*\s+)?(?:atom|red)\.", ptx, re.M))
    return {"mma": mma, "atomics": atomics}


def run_ptxas(ptx: str, arch: int, enable_fp_fusion: bool, cache: Path | None, ptx_options: str | None = None) -> dict:
    """``ptxas -v`` of one PTX for ``sm_<arch>`` (``sm_90a`` for 90, as Triton does), cached by content."""
    from triton.backends.nvidia.compiler import get_ptxas_version, sm_arch_from_capability

    ptxas = _ptxas(arch)
    flags = _ptxas_flags(enable_fp_fusion, ptx_options)
    gpu = sm_arch_from_capability(arch)
    try:
        version = get_ptxas_version(arch)
    except TypeError:
        version = get_ptxas_version()
    digest = hashlib.sha256("\0".join([ptx, gpu, ptxas, str(version), *flags]).encode()).hexdigest()
    hit = cache / f"{digest}.json" if cache else None
    if hit is not None and hit.exists():
        return json.loads(hit.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([ptxas, *flags, f"--gpu-name={gpu}", src, "-o", src + ".o"], capture_output=True,
                              text=True)
    log = proc.stderr + proc.stdout
    info = parse_ptxas_log(log)
    info["ptxas_rc"] = proc.returncode
    if proc.returncode != 0 or not info["parsed"]:
        info["ptxas_log"] = log[-3000:]
    elif hit is not None:
        hit.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = hit.with_suffix(f".{os.getpid()}.tmp")
        tmp_path.write_text(json.dumps(info))
        os.replace(tmp_path, hit)
    return info


def _error_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()


def _error_summary(text: str) -> str:
    """The line of a compile error that says what is wrong (the inner NameError, not 'CompilationError: at 3:66')."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    named = [ln for ln in lines if re.search(r"\w+(Error|Exception)\b", ln) and "CompilationError: at" not in ln]
    return ((named or lines or ["?"])[-1])[:300]


def compile_launch(launch: Launch, arch: int, cache: Path | None = None) -> dict:
    """Compile one recorded launch for ``sm_<arch>`` and measure it. Returns a JSON-able record."""
    from triton.runtime.jit import JITFunction

    _set_driver(arch)
    rec = {"module": launch.module, "kernel": launch.kernel, "variant": launch.variant, "arch": arch,
           "features": launch.features, "low_precision": launch.low_precision, "launches": launch.count}
    t0 = time.perf_counter()
    try:
        kernel = JITFunction.run(launch.fn, *launch.args, grid=(1,), warmup=True, **launch.kwargs)
        md = kernel.metadata
        ptx = kernel.asm["ptx"]
        rec.update(ok=True, shared=int(md.shared), num_warps=md.num_warps, num_stages=md.num_stages)
        rec.update(ptx_stats(ptx))
        rec.update(run_ptxas(ptx, arch, getattr(md, "enable_fp_fusion", True), cache,
                             getattr(md, "ptx_options", None)))
        if rec.get("ptxas_rc"):
            rec["ok"] = False
            rec["error"] = "ptxas failed:\n" + rec.get("ptxas_log", "")
    except Exception as exc:  # noqa: BLE001 - one failing kernel must not hide the others
        rec.update(ok=False, error=_error_text(exc))
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    rec["problems"], rec["warnings"] = judge(rec)
    return rec


def judge(rec: dict) -> tuple:
    """(problems that fail the check, warnings) of one compile record."""
    problems, warnings = [], []
    if not rec.get("ok"):
        problems.append("compile error: " + _error_summary(rec.get("error", "")))
        return problems, warnings
    smem = max(rec.get("shared") or 0, rec.get("static_smem") or 0)
    if smem > SMEM_LIMIT:
        problems.append(f"shared memory {smem} B > {SMEM_LIMIT} B")
    spill = (rec.get("spill_stores") or 0) + (rec.get("spill_loads") or 0)
    if spill:
        msg = f"spills {rec.get('spill_stores')} B stores / {rec.get('spill_loads')} B loads"
        (problems if rec.get("low_precision") else warnings).append(msg)
    if rec.get("registers") is None:
        problems.append("ptxas output not understood (no register count)")
    return problems, warnings


_WORKER: dict = {}


def _worker_compile(task):
    index, arch = task
    return index, compile_launch(_WORKER["launches"][index], arch, _WORKER["cache"])


def compile_all(launches: list, archs: list, jobs: int, cache: Path, progress=None) -> list:
    """Compile every (launch, arch); ``jobs`` > 1 forks worker processes (they inherit the recorded launches)."""
    tasks = [(i, a) for a in archs for i in range(len(launches))]
    results: dict = {}
    _WORKER.update(launches=launches, cache=cache)
    if jobs > 1 and len(tasks) > 1 and sys.platform.startswith("linux"):
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), mp_context=mp.get_context("fork")) as pool:
            for index, rec in pool.map(_worker_compile, tasks, chunksize=1):
                results[(index, rec["arch"])] = rec
                if progress:
                    progress(rec)
    else:
        for task in tasks:
            index, rec = _worker_compile(task)
            results[(index, rec["arch"])] = rec
            if progress:
                progress(rec)
    return [results[t] for t in sorted(tasks, key=lambda t: (launches[t[0]].kernel, launches[t[0]].variant, t[1]))]
