"""The ahead-of-time compile check (r4b_fast.compile_check) and the GPU check's no-GPU exit.

The check must run with TRITON_INTERPRET unset (this conftest sets it), so every compile happens in a subprocess.
Toy kernel packages written to tmp_path exercise the framework: coverage, a plain Python global, dedupe, alignment,
autotune configs, the re-exec without the interpreter. One real kernel launch is compiled for sm_80.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from r4b_fast import compile_check as cc

ROOT = Path(__file__).resolve().parents[1]


def _env(extra_path: Path | None = None, cache: Path | None = None, interpret: bool = False) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "R4B_AOT_CACHE_DIR")}
    env["OMP_NUM_THREADS"] = "1"
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    if cache is not None:
        env["R4B_AOT_CACHE_DIR"] = str(cache)
    paths = [str(ROOT)] + ([str(extra_path)] if extra_path else []) + [env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return env


def _check(*args, extra_path=None, cache=None, interpret=False, timeout=240):
    return subprocess.run([sys.executable, "-m", "r4b_fast.compile_check", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=_env(extra_path, cache, interpret))


def _package(root: Path, name: str, modules: dict) -> Path:
    pkg = root / name
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    for mod, src in modules.items():
        (pkg / f"{mod}.py").write_text(textwrap.dedent(src))
    return root


ADD = """
    import torch
    import triton
    import triton.language as tl


    @triton.jit
    def _add_kernel(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=m) + tl.load(y_ptr + offs, mask=m), mask=m)


    @triton.jit
    def _twice(x):  # a helper: not a launched kernel, needs no scenario
        return x + x


    def launch_add(x, y):
        out = torch.empty_like(x)
        _add_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, out, x.numel(), BLOCK=1024, num_warps=4)
        return out


    def aot_scenarios():
        for dt in (torch.bfloat16, torch.float32):
            x = torch.empty(1 << 20, device="meta", dtype=dt)
            launch_add(x, x)
            launch_add(x, x)  # same specialisation: compiled once
        x = torch.empty(1001, device="meta", dtype=torch.float32)
        launch_add(x[1:], x[1:])  # 4-byte offset and n % 16 != 0: its own specialisation
"""

AUTOTUNED = """
    import torch
    import triton
    import triton.language as tl


    @triton.autotune(configs=[triton.Config({"BLOCK": 128}, num_warps=2), triton.Config({"BLOCK": 512}, num_warps=4)],
                     key=["n"])
    @triton.jit
    def _scale_kernel(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * 2.0, mask=offs < n)


    def aot_scenarios():
        x = torch.empty(4096, device="meta", dtype=torch.float16)
        _scale_kernel[lambda meta: (triton.cdiv(4096, meta["BLOCK"]),)](x, 4096)
"""

PLAIN_GLOBAL = """
    import torch
    import triton
    import triton.language as tl

    SCALE = 2.0  # a plain global: the interpreter reads it, the compiler refuses it


    @triton.jit
    def _global_scale_kernel(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * SCALE, mask=offs < n)


    def aot_scenarios():
        x = torch.empty(4096, device="meta")
        _global_scale_kernel[(4,)](x, 4096, BLOCK=1024)
"""

UNCOVERED = """
    import torch
    import triton
    import triton.language as tl


    @triton.jit
    def _used_kernel(x_ptr):
        tl.store(x_ptr, 1.0)


    @triton.jit
    def _forgotten_kernel(x_ptr):
        tl.store(x_ptr, 2.0)


    def aot_scenarios():
        _used_kernel[(1,)](torch.empty(1, device="meta"))
"""


# ------------------------------------------------------------------------------------------------------------------
# the project's own kernels
# ------------------------------------------------------------------------------------------------------------------
def _jit_kernels_in_source() -> dict:
    """Independent of the check: every ``@triton.jit`` (or autotuned) function named ``*_kernel`` in kernels/*.py,
    found by parsing the source."""
    found = {}
    for path in sorted((ROOT / "r4b_fast" / "kernels").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel"):
                decorators = [ast.unparse(d) for d in node.decorator_list]
                if any("jit" in d or "autotune" in d or "heuristics" in d for d in decorators):
                    found.setdefault(path.stem, []).append(node.name)
    return found


def test_list_covers_every_kernel(tmp_path):
    out = tmp_path / "launches.json"
    proc = _check("--list", "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    assert data["errors"] == []
    launched = {(x["module"].rsplit(".", 1)[-1], x["kernel"]) for x in data["launches"]}
    expected = {(mod, k) for mod, names in _jit_kernels_in_source().items() for k in names}
    assert expected, "no kernel found in kernels/"
    assert expected <= launched, f"not launched by any aot_scenarios(): {sorted(expected - launched)}"
    assert all(x["launches"] >= 1 for x in data["launches"])
    # every kernel module is a scenario module (the check would fail otherwise, this names the file)
    modules = {p.stem for p in (ROOT / "r4b_fast" / "kernels").glob("*.py") if p.stem != "__init__"}
    assert modules <= {x["module"].rsplit(".", 1)[-1] for x in data["launches"]}


def test_real_kernel_compiles_for_sm80(tmp_path):
    listing = tmp_path / "launches.json"
    assert _check("--list", "--json", str(listing)).returncode in (0, 1)
    launches = json.loads(listing.read_text())["launches"]
    assert launches, "no launch recorded"
    # the smallest kernel by its block sizes: a quick, real compile of one of the project's own launches
    first = min(launches, key=lambda x: (sum(int(v) for v in x["features"].values() if v.isdigit()), x["kernel"]))
    out = tmp_path / "aot.json"
    proc = _check("--arch", "80", "--only", f"{first['kernel']} {first['variant']}", "--json", str(out),
                  cache=tmp_path / "cache")
    records = json.loads(out.read_text())["records"]
    assert records and all(r["arch"] == 80 for r in records)
    for r in records:
        assert r["ok"], r.get("error")
        assert isinstance(r["registers"], int) and r["registers"] > 0
        assert isinstance(r["spill_stores"], int) and isinstance(r["spill_loads"], int)
        assert r["mma"] in ("-", "mma.sync", "wgmma", "wgmma+mma.sync")
    assert f"{first['kernel']}" in proc.stdout


# ------------------------------------------------------------------------------------------------------------------
# the framework, on toy kernels
# ------------------------------------------------------------------------------------------------------------------
def test_toy_package_compiles_with_dedupe_alignment_and_autotune(tmp_path):
    root = _package(tmp_path / "src", "toy_ok", {"add": ADD, "tuned": AUTOTUNED})
    out = tmp_path / "aot.json"
    # started with TRITON_INTERPRET=1 on purpose: the check must re-run itself without it
    proc = _check("--package", "toy_ok", "--json", str(out), extra_path=root, cache=tmp_path / "cache",
                  interpret=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "re-running without it" in proc.stderr
    records = json.loads(out.read_text())["records"]
    add = [r for r in records if r["kernel"] == "_add_kernel"]
    assert sorted((r["variant"], r["arch"]) for r in add) == sorted(
        (v, a) for v in ("bf16 n=i32%16", "fp32 n=i32%16", "fp32 n=i32 x_ptr=unaligned y_ptr=unaligned")
        for a in (80, 90))
    assert {r["launches"] for r in add if r["variant"].startswith("bf16")} == {2}
    tuned = [r for r in records if r["kernel"] == "_scale_kernel"]
    assert sorted(r["variant"] for r in tuned if r["arch"] == 80) == ["fp16 BLOCK=128 num_warps=2",
                                                                      "fp16 BLOCK=512 num_warps=4"]
    for r in records:
        assert r["ok"] and r["registers"] > 0 and r["spill_stores"] == 0 and r["atomics"] == 0
        assert r["low_precision"] == ("bf16" in r["variant"] or "fp16" in r["variant"])
    assert "_add_kernel" in proc.stdout and "sm_90" in proc.stdout


def test_uncovered_kernel_and_missing_scenarios_fail(tmp_path):
    root = _package(tmp_path / "src", "toy_cov", {"two": UNCOVERED, "bare": "X = 1\n"})
    proc = _check("--package", "toy_cov", "--list", extra_path=root)
    assert proc.returncode == 1
    assert "two.py: _forgotten_kernel is launched by no aot_scenarios() case" in proc.stderr
    assert "bare.py defines no aot_scenarios()" in proc.stderr
    assert "_used_kernel" in proc.stdout and "_forgotten_kernel" not in proc.stdout


def test_plain_global_fails_to_compile_naming_the_kernel(tmp_path):
    root = _package(tmp_path / "src", "toy_glob", {"glob": PLAIN_GLOBAL})
    out = tmp_path / "aot.json"
    proc = _check("--package", "toy_glob", "--arch", "80", "--json", str(out), extra_path=root,
                  cache=tmp_path / "cache")
    assert proc.returncode == 1
    assert "FAILED sm_80 _global_scale_kernel" in proc.stderr
    assert "SCALE" in proc.stderr
    (rec,) = json.loads(out.read_text())["records"]
    assert not rec["ok"] and rec["problems"][0].startswith("compile error:") and "SCALE" in rec["problems"][0]


def test_only_that_matches_nothing_fails(tmp_path):
    root = _package(tmp_path / "src", "toy_only", {"add": ADD})
    proc = _check("--package", "toy_only", "--only", "no_such_kernel", extra_path=root)
    assert proc.returncode == 1 and "matches no launch" in proc.stderr


# ------------------------------------------------------------------------------------------------------------------
# pure functions: parsing and the pass/fail rules
# ------------------------------------------------------------------------------------------------------------------
def test_parse_ptxas_log():
    log = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_k' for 'sm_80'
ptxas info    : Function properties for _k
    48 bytes stack frame, 56 bytes spill stores, 68 bytes spill loads
ptxas info    : Used 128 registers, used 1 barriers, 48 bytes cumulative stack size, 1024 bytes smem, 456 bytes cmem[0]
"""
    info = cc.parse_ptxas_log(log)
    assert info == {"registers": 128, "stack": 48, "spill_stores": 56, "spill_loads": 68, "static_smem": 1024,
                    "parsed": True}
    assert cc.parse_ptxas_log("garbage")["registers"] is None


def test_ptx_stats():
    ptx = """
    wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%f1}, %rd1, %rd2;
    @%p3 atom.global.gpu.acq_rel.add.f32 %f2, [%rd3], %f4;
    red.global.add.f32 [%rd5], %f6;
    mov.u32 %r1, %r2;  // not an atomic: $L__red.x
    """
    assert cc.ptx_stats(ptx) == {"mma": "wgmma", "atomics": 2}
    assert cc.ptx_stats("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32")["mma"] == "mma.sync"
    assert cc.ptx_stats("add.f32 %f1, %f2, %f3;") == {"mma": "-", "atomics": 0}


def _rec(**kw):
    base = {"ok": True, "shared": 0, "static_smem": 0, "spill_stores": 0, "spill_loads": 0, "registers": 40,
            "low_precision": False}
    return {**base, **kw}


@pytest.mark.parametrize(
    "rec, problems, warnings",
    [
        (_rec(), 0, 0),
        (_rec(spill_stores=8, spill_loads=8, low_precision=True), 1, 0),  # bf16/fp16 spill: fails
        (_rec(spill_stores=8, spill_loads=8), 0, 1),  # fp32/fp64 spill: a warning
        (_rec(shared=160 * 1024), 0, 0),
        (_rec(shared=160 * 1024 + 1), 1, 0),
        (_rec(registers=None), 1, 0),
        ({"ok": False, "error": "CompilationError: at 1:2:\nNameError('Cannot access global variable X')"}, 1, 0),
    ],
)
def test_judge(rec, problems, warnings):
    p, w = cc.judge(rec)
    assert (len(p), len(w)) == (problems, warnings), (p, w)
    if not rec["ok"]:
        assert "NameError" in p[0]


# ------------------------------------------------------------------------------------------------------------------
# bench/gpu_check.sh on a machine without a GPU
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-GPU exit")
def test_gpu_check_fails_at_once_without_gpu(tmp_path):
    out = tmp_path / "gpu"
    start = time.perf_counter()
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), str(out)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**_env(), "PYTHON": sys.executable})
    elapsed = time.perf_counter() - start
    assert proc.returncode != 0
    assert "no CUDA GPU" in proc.stderr
    assert elapsed < 60
    # nothing installed or run: only the probe's log and the summary saying why
    assert sorted(p.name for p in out.iterdir()) == ["gpu_probe.log", "summary.md"]
    assert "no CUDA GPU" in (out / "summary.md").read_text()


def test_gpu_report_summary(tmp_path):
    """bench/gpu_report.py on the files the stages leave: counts from the junit xml, stage table, BPO metrics."""
    (tmp_path / "stages.tsv").write_text("stage\trc\tseconds\ttimed_out\tlimit_s\ninstall\t0\t3.1\t0\t60\n"
                                         "tests\t124\t190.2\t1\t190\nbpo\t0\t41.0\t0\t70\n")
    (tmp_path / "versions.txt").write_text("NVIDIA H200, 570.1, 143771 MiB, 9.0\ntorch 2.11.0 cuda 12.8\n"
                                           "triton 3.6.0\ngpu NVIDIA H200 capability (9, 0) count 1\n")
    (tmp_path / "junit.xml").write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="5" failures="1" errors="1" skipped="1" '
        'time="12.5"><testcase classname="tests.test_a" name="test_ok"/>'
        '<testcase classname="tests.test_a" name="test_bad"><failure message="assert 1 == 2">x</failure></testcase>'
        '<testcase classname="tests.test_b" name="test_err"><error message="CUDA error">y</error></testcase>'
        '</testsuite></testsuites>')
    (tmp_path / "bench.md").write_text("### sample B=512\n\n| impl | mean |\n|---|---|\n| triton | 1 ms |\n")
    (tmp_path / "bpo").mkdir()
    (tmp_path / "bpo" / "metrics.jsonl").write_text('{"step": 19, "loss": 0.5}\n{"step": 20, "loss": 0.25, '
                                                    '"reward/all": 0.75}\n')
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_report.py"), str(tmp_path),
                           "--total-seconds", "300"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "summary.md").read_text()
    assert "GPU: **NVIDIA H200 capability (9, 0) count 1**" in text
    assert "5 tests: 2 passed, 1 failed, 1 errors, 1 skipped" in text
    assert "`tests.test_a::test_bad` | failure | assert 1 == 2" in text
    assert "| tests | TIMED OUT | 124 | 190.2 | 190 |" in text and "1 stage(s) failed, 300 s in all" in text
    assert "### sample B=512" in text
    assert "Last record (step 20)" in text and "| reward/all | 0.75 |" in text and "| loss | 0.25 |" in text
