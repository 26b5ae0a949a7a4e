"""Build every CUDA source ahead of time: ``python -m r4b_fast.build [--arch 80,90] [--out DIR]``.

Without ``--out`` the libraries go to the runtime cache, so a later ``R4B_FAST_NO_JIT=1`` run finds them.
CI runs this with ``--out`` to a scratch folder so that a compile error in csrc/ fails the build.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from r4b_fast import _cuda_build


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m r4b_fast.build", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default=",".join(_cuda_build.DEFAULT_ARCHS),
                        help="comma-separated SM versions, e.g. 80,90 (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="write libraries here instead of the runtime cache")
    args = parser.parse_args(argv)
    archs = tuple(a.strip().removeprefix("sm_") for a in args.arch.split(",") if a.strip())
    bad = [a for a in archs if not a.isdigit()]
    if bad or not archs:
        parser.error(f"--arch must be comma-separated SM numbers like 80,90; got {args.arch!r}")
    sources = _cuda_build.sources()
    if not sources:
        print("no CUDA sources found", file=sys.stderr)
        return 1
    failed = 0
    for source in sources:
        out = None if args.out is None else args.out / f"{source.stem}-sm{'_'.join(archs)}.so"
        start = time.perf_counter()
        try:
            path = _cuda_build.compile_source(source, archs, out)
        except RuntimeError as err:
            failed += 1
            print(f"FAILED {source.name}: {err}", file=sys.stderr)
            continue
        print(f"built {source.name} for sm_{', sm_'.join(archs)} -> {path} ({time.perf_counter() - start:.1f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
