"""Ahead-of-time compile check of every Triton kernel for real GPUs, without a GPU.

``python -m r4b_fast.compile_check [--arch 80,90] [--only SUBSTR] [--json OUT] [--list] [--jobs N]``

1. Imports every module of the ``r4b_fast.kernels`` package (``--package`` for another one). Each must define
   ``aot_scenarios()``, which calls the module's own launchers with tensors on the ``"meta"`` device at GPU shapes.
2. Records the launches: ``JITFunction.run`` (what ``kernel[grid](...)`` calls) and ``Autotuner.run`` (one launch per
   config) are patched to store the kernel, its arguments (tensors become mock tensors of the same dtype, shape and
   16-byte alignment) and its options instead of launching. Identical specialisations are compiled once.
   Every ``@triton.jit`` function named ``*_kernel`` defined in those modules must be launched by some scenario.
3. Compiles each launch with Triton's own compiler for ``GPUTarget("cuda", arch, 32)`` under a stub driver (no GPU,
   no CUDA driver), then runs the wheel's ptxas ``-v`` on the PTX for registers, shared memory and spills.

Fails (exit 1) on: a module without ``aot_scenarios()``, a scenario that raises, an uncovered ``*_kernel``, a compile
error, shared memory above 160 KiB, or spills in a variant with bf16/fp16 tensors (fp32/fp64 spills are warnings).
``--list`` records and checks coverage without compiling. TRITON_INTERPRET must be unset (the interpreter replaces
``@triton.jit`` at definition time): when it is set the check re-executes itself without it.

Another Triton (the GPU machines run 3.6): unpack its wheel and put it first on the path, e.g.
``pip download triton==3.6.0 --no-deps -d /tmp/w && unzip -q /tmp/w/triton-*.whl -d /tmp/t36 &&
PYTHONPATH=/tmp/t36 R4B_AOT_CACHE_DIR=/tmp/aot36 python -m r4b_fast.compile_check`` (each version has its own ptxas,
so registers and spills differ).

Caches: Triton's under ``$R4B_AOT_CACHE_DIR/triton`` (default ``~/.cache/r4b_fast/triton_aot``), apart from the
runtime cache; ptxas results under ``.../ptxas``, keyed by the PTX and the ptxas version.

Example::

    python -m r4b_fast.compile_check --arch 80,90 --json /tmp/aot.json
    python -m r4b_fast.compile_check --list
    python -m r4b_fast.compile_check --only _sample_kernel --arch 90
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

SMEM_LIMIT = 160 * 1024  # bytes: what a kernel may use and still fit sm_80 (164 KiB) with room for static smem
LOW_PRECISION = ("bfloat16", "float16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
_SHORT_DTYPE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64", "int64": "i64",
                "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1"}


def default_cache_dir() -> Path:
    """Root of this check's caches (not the runtime Triton cache)."""
    env = os.environ.get("R4B_AOT_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "r4b_fast" / "triton_aot"


# ------------------------------------------------------------------------------------------------------------------
# recording
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class Launch:
    """One recorded launch: the kernel, mocked arguments and the features that tell its variant apart."""

    module: str
    kernel: str
    fn: object  # the JITFunction
    args: tuple
    kwargs: dict
    key: tuple  # identical keys compile to the same binary
    features: dict  # name -> short value (constexprs, options, int specialisation, dtypes)
    low_precision: bool
    count: int = 1  # how many recorded launches share this key
    variant: str = ""


@dataclass
class Recording:
    launches: list = field(default_factory=list)
    kernels: dict = field(default_factory=dict)  # module -> [kernel names defined there ending in _kernel]
    errors: list = field(default_factory=list)  # problems that fail the check before any compile


def _mock_class():
    from triton.runtime.jit import MockTensor

    class AotTensor(MockTensor):
        """MockTensor with the real tensor's byte offset, so pointer alignment specialises as on the GPU (a fresh
        allocation is 256-byte aligned there; a view may not be)."""

        def __init__(self, dtype, shape, offset_bytes):
            super().__init__(dtype, list(shape) or [1])
            self.offset_bytes = offset_bytes

        def data_ptr(self):  # noqa: D102 - overrides MockTensor's staticmethod
            return self.offset_bytes

        def __repr__(self):
            return f"AotTensor({self.dtype}, {self.shape}, +{self.offset_bytes})"

    return AotTensor


def _mock(value, mock_cls):
    import torch

    if isinstance(value, torch.Tensor):
        return mock_cls(value.dtype, tuple(value.shape), value.storage_offset() * value.element_size())
    if isinstance(value, tuple):
        return tuple(_mock(v, mock_cls) for v in value)
    return value


def _short(value) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if value is None:
        return "None"
    name = getattr(value, "__name__", None)
    if callable(value) and name:
        return name
    text = str(value)
    if text.startswith("torch."):
        text = _SHORT_DTYPE.get(text[6:], text[6:])
    return text


def _int_spec(value: int, specialize: bool) -> str:
    # what Triton specialises a non-constexpr int on: its width, == 1, divisibility by 16
    width = "i32" if -(2**31) <= value < 2**31 else ("u64" if value >= 2**63 else "i64")
    if not specialize:
        return width
    if value == 1:
        return "1"
    return width + ("%16" if value % 16 == 0 else "")


def _describe(fn, args: tuple, kwargs: dict, mock_cls):
    """(dedupe key, features, low_precision) of one launch."""
    params = list(fn.params)
    names = [p.name for p in params]
    bound = dict(zip(names, args))
    options = {}
    for k, v in kwargs.items():
        (bound if k in names else options)[k] = v
    defaults = {p.name: p.default for p in params}
    key, features, floats, ints = [], {}, set(), set()
    for p in params:
        if p.name not in bound:
            if defaults[p.name] is inspect.Parameter.empty:
                raise TypeError(f"{fn.__name__}: launch without argument {p.name!r}")
            bound[p.name] = defaults[p.name]
        v = bound[p.name]
        if p.is_constexpr:
            key.append((p.name, "c", repr(v)))
            features[p.name] = _short(v)
        elif isinstance(v, mock_cls):
            dt = str(v.dtype).removeprefix("torch.")
            aligned = v.offset_bytes % 16 == 0
            key.append((p.name, "t", dt, aligned))
            (floats if v.dtype.is_floating_point else ints).add(dt)
            if not aligned:
                features[p.name] = "unaligned"
        elif isinstance(v, bool) or v is None or isinstance(v, float):
            key.append((p.name, type(v).__name__))
        elif isinstance(v, int):
            spec = _int_spec(v, not getattr(p, "do_not_specialize", False))
            key.append((p.name, "i", spec))
            features[p.name] = spec
        else:
            key.append((p.name, "o", repr(v)))
    for k in sorted(options):
        key.append((k, "opt", repr(options[k])))
        features[k] = _short(options[k])
    # the floating dtypes tell a variant apart; kernels without any (copies in integer units): the integer ones
    features["dtypes"] = "+".join(sorted(_SHORT_DTYPE.get(d, d) for d in (floats or ints)) or ["-"])
    low = any(d in LOW_PRECISION for d in floats)
    return (fn.module, fn.__name__, tuple(key)), features, low


def _unwrap(obj):
    """The JITFunction behind an Autotuner / Heuristics wrapper, or None."""
    from triton.runtime.jit import JITFunction, KernelInterface

    seen = 0
    while isinstance(obj, KernelInterface) and not isinstance(obj, JITFunction) and seen < 8:
        obj = getattr(obj, "fn", None)
        seen += 1
    return obj if isinstance(obj, JITFunction) else None


def _interpreted(obj) -> bool:
    return type(obj).__name__ == "InterpretedFunction"


def record(package: str = "r4b_fast.kernels") -> Recording:
    """Import every module of ``package``, run its ``aot_scenarios()`` with launches recorded, check coverage.

    Returns a :class:`Recording` with the unique launches (``count`` = recorded launches with that key) and the
    errors found (missing ``aot_scenarios``, a scenario that raised, a ``*_kernel`` no scenario launched).
    """
    import triton.runtime.autotuner as autotuner
    from triton.runtime.jit import JITFunction

    mock_cls = _mock_class()
    rec = Recording()
    pkg = importlib.import_module(package)
    mod_names = sorted(m.name for m in pkgutil.walk_packages(pkg.__path__, package + ".") if not m.ispkg)
    by_key: dict = {}
    current: list = []

    def recording_run(self, *args, grid, warmup, **kwargs):
        margs = tuple(_mock(a, mock_cls) for a in args)
        mkw = {k: _mock(v, mock_cls) for k, v in kwargs.items()}
        key, features, low = _describe(self, margs, mkw, mock_cls)
        if key in by_key:
            by_key[key].count += 1
        else:
            launch = Launch(self.module, self.__name__, self, margs, mkw, key, features, low)
            by_key[key] = launch
            rec.launches.append(launch)
        current.append(key)
        return None

    def recording_autotune(self, *args, **kwargs):
        # compile every config the autotuner could pick, not only the one a benchmark would
        for config in self.configs:
            cfg = dict(config.all_kwargs())
            self.fn.run(*args, **{**kwargs, **cfg})
        return None

    saved = (JITFunction.run, autotuner.Autotuner.run)
    JITFunction.run, autotuner.Autotuner.run = recording_run, recording_autotune
    try:
        for name in mod_names:
            rel = name[len(package) + 1:].replace(".", "/") + ".py"
            try:
                mod = importlib.import_module(name)
            except Exception as exc:  # noqa: BLE001 - report, keep checking the others
                rec.errors.append(f"{rel}: import failed: {type(exc).__name__}: {exc}")
                continue
            defined = []
            for obj in vars(mod).values():
                if _interpreted(obj):
                    rec.errors.append(f"{rel}: kernels were defined under TRITON_INTERPRET; unset it")
                    break
                jf = _unwrap(obj)
                if jf is not None and jf.module == name and jf.__name__.endswith("_kernel"):
                    defined.append(jf.__name__)
            rec.kernels[name] = sorted(set(defined))
            scenarios = getattr(mod, "aot_scenarios", None)
            if scenarios is None:
                rec.errors.append(f"{rel} defines no aot_scenarios()")
                continue
            current.clear()
            try:
                scenarios()
            except Exception as exc:  # noqa: BLE001
                tb = traceback.format_exc(limit=-3)
                rec.errors.append(f"{rel}: aot_scenarios() raised {type(exc).__name__}: {exc}\n{tb}")
            if not current and defined:
                rec.errors.append(f"{rel}: aot_scenarios() launched no kernel")
    finally:
        JITFunction.run, autotuner.Autotuner.run = saved
    launched = {(launch.module, launch.kernel) for launch in rec.launches}
    for name, kernels in rec.kernels.items():
        rel = name[len(package) + 1:].replace(".", "/") + ".py"
        for k in kernels:
            if (name, k) not in launched:
                rec.errors.append(f"{rel}: {k} is launched by no aot_scenarios() case (add it to the scenarios)")
    _label(rec.launches)
    return rec


def _label(launches: list) -> None:
    """Variant label: the dtypes plus every feature whose value differs between launches of the same kernel."""
    groups: dict = {}
    for launch in launches:
        groups.setdefault((launch.module, launch.kernel), []).append(launch)
    for group in groups.values():
        names = list(dict.fromkeys(k for g in group for k in g.features if k != "dtypes"))
        varying = [k for k in names if len({g.features.get(k) for g in group}) > 1]
        for g in group:
            parts = [g.features["dtypes"]] + [f"{k}={g.features[k]}" for k in varying if k in g.features]
            g.variant = " ".join(parts)


# ------------------------------------------------------------------------------------------------------------------
# compiling
# ------------------------------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------------------------
def _table(rows: list, header: list) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def format_records(records: list) -> str:
    """The compile table: one row per (kernel, variant, arch)."""
    header = ["kernel", "variant", "arch", "regs", "smem", "spill st/ld", "mma", "atomics", "secs", "status"]
    rows = []
    for r in records:
        status = "FAIL" if r["problems"] else ("warn" if r["warnings"] else "ok")
        if r.get("ok"):
            rows.append([r["kernel"], r["variant"], f"sm_{r['arch']}", r.get("registers"),
                         max(r.get("shared") or 0, r.get("static_smem") or 0),
                         f"{r.get('spill_stores', 0)}/{r.get('spill_loads', 0)}", r.get("mma"), r.get("atomics"),
                         f"{r['seconds']:.1f}", status])
        else:
            rows.append([r["kernel"], r["variant"], f"sm_{r['arch']}", "-", "-", "-", "-", "-", f"{r['seconds']:.1f}",
                         status])
    return _table(rows, header)


def format_launches(launches: list) -> str:
    rows = [[launch.kernel, launch.variant, launch.count, launch.module] for launch in launches]
    return _table(rows, ["kernel", "variant", "launches", "module"])


# ------------------------------------------------------------------------------------------------------------------
# entry point
# ------------------------------------------------------------------------------------------------------------------
def _reexec_without_interpreter(argv: list) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    print("compile_check: TRITON_INTERPRET is set; re-running without it (the compiler needs real @jit kernels)",
          file=sys.stderr, flush=True)
    os.execve(sys.executable, [sys.executable, "-m", "r4b_fast.compile_check", *argv], env)


def main(argv: list | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m r4b_fast.compile_check",
                                     description="Compile every Triton kernel for sm_80/sm_90 without a GPU.")
    parser.add_argument("--arch", default="80,90", help="comma-separated SM versions (default: %(default)s)")
    parser.add_argument("--only", default="", help="compile only launches whose 'kernel variant' contains this")
    parser.add_argument("--json", type=Path, default=None, help="write the compile records here")
    parser.add_argument("--list", action="store_true", help="record the launches and check coverage; no compile")
    parser.add_argument("--package", default="r4b_fast.kernels", help="kernel package (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="compile processes (default: %(default)s)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="cache root (default: $R4B_AOT_CACHE_DIR or ~/.cache/r4b_fast/triton_aot)")
    args = parser.parse_args(argv)
    try:
        archs = [int(a.strip().removeprefix("sm_")) for a in args.arch.split(",") if a.strip()]
    except ValueError:
        parser.error(f"--arch must be comma-separated SM numbers like 80,90; got {args.arch!r}")
    if not archs:
        parser.error("--arch is empty")
    if os.environ.get("TRITON_INTERPRET"):
        _reexec_without_interpreter(argv)

    cache = args.cache_dir or default_cache_dir()
    # before Triton reads it: this check's binaries must not mix with the runtime cache
    os.environ["TRITON_CACHE_DIR"] = str(cache / "triton")
    t0 = time.perf_counter()
    import warnings

    import triton

    # the runtime default is what we compile; the notice about it changing in 3.10 is noise here
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    try:
        triton.knobs.cache.dir = str(cache / "triton")
    except AttributeError:  # older Triton reads only the environment
        pass
    rec = record(args.package)
    n_recorded = sum(launch.count for launch in rec.launches)
    print(f"recorded {n_recorded} launches: {len(rec.launches)} unique specialisations of "
          f"{len({(launch.module, launch.kernel) for launch in rec.launches})} kernels "
          f"({time.perf_counter() - t0:.1f} s, triton {triton.__version__})", flush=True)
    for err in rec.errors:
        print(f"ERROR {err}", file=sys.stderr, flush=True)

    if args.list:
        print(format_launches(rec.launches))
        if args.json:
            args.json.write_text(json.dumps({"launches": [_launch_json(x) for x in rec.launches],
                                             "errors": rec.errors}, indent=1))
        return 1 if rec.errors else 0

    launches = [x for x in rec.launches if args.only in f"{x.kernel} {x.variant}" or args.only in x.module]
    if args.only and not launches:
        print(f"ERROR --only {args.only!r} matches no launch", file=sys.stderr)
        return 1

    def progress(r):
        status = "FAIL " + "; ".join(r["problems"]) if r["problems"] else "ok"
        print(f"  sm_{r['arch']} {r['kernel']} [{r['variant']}] {r['seconds']:.1f} s {status}", flush=True)

    t1 = time.perf_counter()
    records = compile_all(launches, archs, max(1, args.jobs), cache / "ptxas", progress)
    elapsed = time.perf_counter() - t1
    print()
    print(format_records(records))
    failed = [r for r in records if r["problems"]]
    warned = [r for r in records if r["warnings"]]
    for r in warned:
        print(f"WARNING sm_{r['arch']} {r['kernel']} [{r['variant']}]: {'; '.join(r['warnings'])} (not bf16/fp16)")
    shown = set()
    for r in failed:
        print(f"FAILED sm_{r['arch']} {r['kernel']} [{r['variant']}] ({r['module']}): {'; '.join(r['problems'])}",
              file=sys.stderr)
        if not r.get("ok") and r.get("error") not in shown:  # the full message once per distinct error
            shown.add(r.get("error"))
            print("    " + r.get("error", "").strip().replace("\n", "\n    ")[-2500:], file=sys.stderr)
    for err in rec.errors:
        print(f"ERROR {err.splitlines()[0]}", file=sys.stderr)
    print(f"compile check: {len(records)} compiles ({len(launches)} specialisations x {len(archs)} archs) in "
          f"{elapsed:.1f} s, {len(failed)} failed, {len(warned)} warnings, {len(rec.errors)} scenario errors; "
          f"total {time.perf_counter() - t0:.1f} s", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"records": records, "errors": rec.errors,
                                         "triton": triton.__version__}, indent=1, default=str))
    return 1 if failed or rec.errors else 0


def _launch_json(launch: Launch) -> dict:
    return {"module": launch.module, "kernel": launch.kernel, "variant": launch.variant, "features": launch.features,
            "launches": launch.count, "low_precision": launch.low_precision}


if __name__ == "__main__":
    sys.exit(main())
