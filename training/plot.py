"""Plot a run's curves to PNG: ``python -m r4b_fast.training.plot RUN_DIR [--out FILE]``.

Reads ``RUN_DIR/metrics.jsonl`` and draws, for whichever of them the run logged: reward per mode (BPO), the think
rate of auto-mode rollouts on easy and hard items, response length per mode, and the training loss.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from r4b_fast.training.common import read_metrics

PANELS = {
    "reward per mode": ("reward/think", "reward/no_think", "reward/auto"),
    "auto-mode think rate": ("eval/think_rate_easy", "eval/think_rate_hard"),
    "auto-mode accuracy": ("eval/acc_auto_easy", "eval/acc_auto_hard"),
    "response length per mode": ("length/think", "length/no_think"),
    "loss": ("loss",),
}


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """Draw the run's curves into one PNG; returns its path. Raises ValueError if nothing plottable was logged."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"run_dir: no metrics.jsonl in {run_dir}")
    records = read_metrics(path)
    panels = {
        title: {k: [(r["step"], r[k]) for r in records if isinstance(r.get(k), (int, float))] for k in keys}
        for title, keys in PANELS.items()
    }
    panels = {t: {k: v for k, v in series.items() if v} for t, series in panels.items()}
    panels = {t: s for t, s in panels.items() if s}
    if not panels:
        known = sorted(k for keys in PANELS.values() for k in keys)
        raise ValueError(f"run_dir: {path} has none of the plotted metrics {known}")
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.6 * len(panels)), squeeze=False)
    for ax, (title, series) in zip(axes[:, 0], panels.items()):
        for key, points in series.items():
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if len(points) < 30 else None, label=key.split("/")[-1])
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(loc="best", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m r4b_fast.training.plot", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        print(plot_run(args.run_dir, args.out))
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
