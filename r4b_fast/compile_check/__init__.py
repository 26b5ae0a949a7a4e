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

Files: ``recording.py`` (step 2: the recorded launches and coverage), ``compiling.py`` (step 3: compile, ptxas,
:func:`judge`), ``report.py`` (tables), ``cli.py`` (the command line), ``__main__.py``.
"""

# ruff: noqa: F401  (re-exports: what the module held before the split)
from r4b_fast.compile_check.cli import _reexec_without_interpreter, main
from r4b_fast.compile_check.compiling import (
    SMEM_LIMIT,
    _error_summary,
    _ptxas_flags,
    compile_all,
    compile_launch,
    default_cache_dir,
    judge,
    parse_ptxas_log,
    ptx_stats,
    run_ptxas,
)
from r4b_fast.compile_check.recording import LOW_PRECISION, Launch, Recording, _describe, _mock_class, record
from r4b_fast.compile_check.report import _launch_json, format_launches, format_records

__all__ = [
    "LOW_PRECISION",
    "SMEM_LIMIT",
    "Launch",
    "Recording",
    "compile_all",
    "compile_launch",
    "default_cache_dir",
    "format_launches",
    "format_records",
    "judge",
    "main",
    "parse_ptxas_log",
    "ptx_stats",
    "record",
    "run_ptxas",
]
