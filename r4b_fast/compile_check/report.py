"""The text tables of the compile check (the compile records, the recorded launches) and its JSON records."""

from __future__ import annotations

from r4b_fast.compile_check.recording import Launch


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



def _launch_json(launch: Launch) -> dict:
    return {"module": launch.module, "kernel": launch.kernel, "variant": launch.variant, "features": launch.features,
            "launches": launch.count, "low_precision": launch.low_precision}
