"""Write OUTDIR/summary.md for bench/gpu_check.sh: ``python bench/gpu_report.py OUTDIR [--total-seconds N]``.

Reads what the stages left in OUTDIR (stages.tsv, versions.txt, junit.xml, bench.md, bpo/metrics.jsonl) and writes
one markdown page: GPU and versions, each stage's status and wall time, the test counts (and the failures by name),
the benchmark tables and the BPO run's last metrics. Standard library only, so it runs whatever else is broken.

Example::

    python bench/gpu_report.py /tmp/gpu-run --total-seconds 431
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def read_stages(path: Path) -> list[dict]:
    """Rows of stages.tsv: stage, rc, seconds, timed_out, limit_s."""
    if not path.exists():
        return []
    with path.open() as f:
        return list(csv.DictReader(f, delimiter="\t"))


def junit_counts(path: Path) -> dict:
    """Test counts from a pytest junit xml: tests, passed, failed, errors, skipped, seconds, and the failing ids.

    >>> import tempfile, os
    >>> p = Path(tempfile.mkdtemp()) / "j.xml"
    >>> _ = p.write_text('<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1" time="2.5">'
    ...                  '<testcase classname="tests.test_a" name="test_x"><failure message="boom"/></testcase>'
    ...                  '</testsuite></testsuites>')
    >>> c = junit_counts(p); (c["tests"], c["passed"], c["failed"], c["skipped"], c["failures"][0][0])
    (3, 1, 1, 1, 'tests.test_a::test_x')
    """
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = {"tests": 0, "failed": 0, "errors": 0, "skipped": 0, "seconds": 0.0, "failures": []}
    for s in suites:
        counts["tests"] += int(s.get("tests", 0))
        counts["failed"] += int(s.get("failures", 0))
        counts["errors"] += int(s.get("errors", 0))
        counts["skipped"] += int(s.get("skipped", 0))
        counts["seconds"] += float(s.get("time", 0) or 0)
        for case in s.iter("testcase"):
            for kind in ("failure", "error"):
                bad = case.find(kind)
                if bad is not None:
                    msg = (bad.get("message") or bad.text or "").strip().splitlines()
                    counts["failures"].append((f"{case.get('classname')}::{case.get('name')}", kind,
                                               msg[0][:200] if msg else ""))
    counts["passed"] = counts["tests"] - counts["failed"] - counts["errors"] - counts["skipped"]
    return counts


def last_metrics(path: Path) -> dict | None:
    """The last record of a metrics.jsonl (BPO's per-step log)."""
    if not path.exists():
        return None
    last = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                last = json.loads(line)
            except json.JSONDecodeError:
                continue
    return last


def _versions(text: str) -> tuple[str, list[str]]:
    gpu, lines = "?", []
    for line in text.splitlines():
        if line.startswith("gpu "):
            gpu = line[4:]
        elif line.split(" ", 1)[0] in ("python", "torch", "triton", "transformers", "liger_kernel", "pytest",
                                         "pytest_benchmark", "flash_attn", "xformers"):
            lines.append(line)
        elif line.startswith("NVIDIA") and "driver" not in line.lower() and "," in line:
            lines.append("nvidia-smi: " + line)
    return gpu, lines


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def render(out: Path, total_seconds: float | None = None) -> str:
    """The summary page of one gpu_check run directory."""
    parts = ["# GPU check", ""]
    vtext = (out / "versions.txt").read_text() if (out / "versions.txt").exists() else ""
    gpu, vlines = _versions(vtext)
    parts += [f"GPU: **{gpu}**", ""] + [f"- {v}" for v in vlines] + [""]

    stages = read_stages(out / "stages.tsv")
    failed = [s for s in stages if s["rc"] != "0"]
    verdict = "all stages passed" if stages and not failed else f"{len(failed)} stage(s) failed"
    total = f", {total_seconds:.0f} s in all" if total_seconds is not None else ""
    parts += ["## Stages", "", f"{verdict}{total}.", "", "| stage | status | exit | seconds | limit |",
              "| --- | --- | --- | --- | --- |"]
    for s in stages:
        status = "TIMED OUT" if s["timed_out"] == "1" else ("ok" if s["rc"] == "0" else "FAILED")
        parts.append(f"| {s['stage']} | {status} | {s['rc']} | {s['seconds']} | {s['limit_s']} |")
    parts.append("")

    parts += ["## Tests", ""]
    junit = out / "junit.xml"
    if junit.exists():
        try:
            c = junit_counts(junit)
            parts.append(f"{c['tests']} tests: {c['passed']} passed, {c['failed']} failed, {c['errors']} errors, "
                         f"{c['skipped']} skipped ({c['seconds']:.0f} s).")
            if c["failures"]:
                parts += ["", "| test | kind | message |", "| --- | --- | --- |"]
                for name, kind, msg in c["failures"][:40]:
                    parts.append(f"| `{name}` | {kind} | {msg.replace('|', '/')} |")
                if len(c["failures"]) > 40:
                    parts.append(f"\n... and {len(c['failures']) - 40} more (tests.log).")
        except ET.ParseError as err:
            parts.append(f"junit.xml unreadable: {err}")
    else:
        parts.append("No junit.xml (see tests.log).")
    parts.append("")

    parts += ["## Benchmarks", ""]
    bench = out / "bench.md"
    parts.append(bench.read_text().strip() if bench.exists() and bench.stat().st_size else
                 "No benchmark tables (see bench.log / render.log).")
    parts.append("")

    parts += ["## BPO (20 steps, --device cuda)", ""]
    metrics = last_metrics(out / "bpo" / "metrics.jsonl")
    if metrics:
        step = metrics.get("step", "?")
        parts += [f"Last record (step {step}):", "", "| metric | value |", "| --- | --- |"]
        for k in sorted(metrics):
            if k != "step" and isinstance(metrics[k], (int, float)):
                parts.append(f"| {k} | {_fmt(metrics[k])} |")
    else:
        parts.append("No metrics.jsonl (see bpo.log).")
    parts += ["", "Logs: gpu_check.log, " + ", ".join(f"{s['stage']}.log" for s in stages) + "."]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--total-seconds", type=float, default=None)
    args = parser.parse_args(argv)
    text = render(args.outdir, args.total_seconds)
    (args.outdir / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
