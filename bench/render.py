"""Render a pytest-benchmark JSON into a markdown table: ``python bench/render.py results.json [--out table.md]``.

One table per benchmark group; each row gives the mean time, the speed-up over the group's baseline (the row whose
extra_info has ``baseline=True``), peak memory, and any ratio the benchmark recorded (``ratio_*`` in extra_info).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def _fmt_time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"


def render(data: dict) -> str:
    groups = defaultdict(list)
    for bench in data["benchmarks"]:
        groups[bench["group"] or bench["name"]].append(bench)
    machine = data.get("machine_info", {})
    lines = [f"Machine: {machine.get('node', '?')}, {machine.get('cpu', {}).get('brand_raw', '?')}, "
             f"{machine.get('python_version', '?')}; run {data.get('datetime', '?')}", ""]
    for group, benches in groups.items():
        base = next((b for b in benches if b["extra_info"].get("baseline")), None)
        ratio_keys = sorted({k for b in benches for k in b["extra_info"] if k.startswith("ratio_")})
        header = ["impl", "device", "mean", "speed-up vs baseline", "peak memory", *ratio_keys]
        lines += [f"### {group}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for b in sorted(benches, key=lambda b: b["stats"]["mean"], reverse=True):
            info = b["extra_info"]
            impl = info.get("impl", b["name"]) + (" (interpreted)" if info.get("interpreted") else "")
            speedup = f"{base['stats']['mean'] / b['stats']['mean']:.3g}x" if base else "-"
            ratios = [f"{info[k]:.3g}" if isinstance(info.get(k), (int, float)) else "-" for k in ratio_keys]
            row = [impl, info.get("device", "?"), _fmt_time(b["stats"]["mean"]), speedup,
                   _fmt_bytes(info.get("peak_memory_bytes")), *ratios]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    table = render(json.loads(args.json.read_text()))
    if args.out:
        args.out.write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
