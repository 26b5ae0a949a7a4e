"""The command line of the compile check: ``python -m r4b_fast.compile_check [--arch 80,90] [--only SUBSTR]
[--json OUT] [--list] [--jobs N]`` (see the package docstring)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from r4b_fast.compile_check.compiling import compile_all, default_cache_dir
from r4b_fast.compile_check.recording import Recording, record
from r4b_fast.compile_check.report import _launch_json, format_launches, format_records


def _reexec_without_interpreter(argv: list) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    print("compile_check: TRITON_INTERPRET is set; re-running without it (the compiler needs real @jit kernels)",
          file=sys.stderr, flush=True)
    os.execve(sys.executable, [sys.executable, "-m", "r4b_fast.compile_check", *argv], env)


def _parse_args(argv: list) -> tuple[argparse.Namespace, list]:
    """``(args, archs)``; exits with a usage error on a bad ``--arch``."""
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
    return args, archs


def _setup_triton(cache: Path):
    """Import Triton with this check's own cache directory (apart from the runtime cache); returns the module."""
    # before Triton reads it: this check's binaries must not mix with the runtime cache
    os.environ["TRITON_CACHE_DIR"] = str(cache / "triton")
    import warnings

    import triton

    # the runtime default is what we compile; the notice about it changing in 3.10 is noise here
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    try:
        triton.knobs.cache.dir = str(cache / "triton")
    except AttributeError:  # older Triton reads only the environment
        pass
    return triton


def _report(records: list, rec: Recording) -> tuple[list, list]:
    """Print the compile table, the warnings, the failures (each distinct error once) and the scenario errors:
    ``(failed, warned)`` records."""
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
    return failed, warned


def _progress(r: dict) -> None:
    status = "FAIL " + "; ".join(r["problems"]) if r["problems"] else "ok"
    print(f"  sm_{r['arch']} {r['kernel']} [{r['variant']}] {r['seconds']:.1f} s {status}", flush=True)


def main(argv: list | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, archs = _parse_args(argv)
    if os.environ.get("TRITON_INTERPRET"):
        _reexec_without_interpreter(argv)

    cache = args.cache_dir or default_cache_dir()
    t0 = time.perf_counter()
    triton = _setup_triton(cache)
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
    t1 = time.perf_counter()
    records = compile_all(launches, archs, max(1, args.jobs), cache / "ptxas", _progress)
    elapsed = time.perf_counter() - t1
    failed, warned = _report(records, rec)
    print(f"compile check: {len(records)} compiles ({len(launches)} specialisations x {len(archs)} archs) in "
          f"{elapsed:.1f} s, {len(failed)} failed, {len(warned)} warnings, {len(rec.errors)} scenario errors; "
          f"total {time.perf_counter() - t0:.1f} s", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"records": records, "errors": rec.errors,
                                         "triton": triton.__version__}, indent=1, default=str))
    return 1 if failed or rec.errors else 0
