"""Plot a run's curves to PNG: ``python -m r4b_fast.training.plot RUN_DIR [--out FILE]``.

Reads ``RUN_DIR/metrics.jsonl`` and draws, for whichever of them the run logged: the rollouts' reward per mode and
difficulty, the think rate and accuracy of held-out evaluation (auto mode; forced modes where evaluated), BPO's
p(think) at auto mode's decision, response length per mode, KL to the reference, policy entropy, clip fractions and
the rollout / training log-prob mismatch. Not the RL loss: on-policy with advantages
that sum to zero per group it is ~0 by construction; an annealing run (no rewards) gets its SFT loss instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from r4b_fast.training.common import read_metrics

PANELS = {
    "rollout reward per mode and difficulty": ("reward/think_easy", "reward/think_hard", "reward/no_think_easy",
                                               "reward/no_think_hard", "reward/all"),
    "held-out auto-mode think rate": ("eval/think_rate_easy", "eval/think_rate_hard"),
    "auto mode's p(think) at the decision (BPO, training prompts)": ("decision/p_think_easy",
                                                                     "decision/p_think_hard"),
    "held-out accuracy": ("eval/acc_auto_easy", "eval/acc_auto_hard", "eval/acc_think_hard", "eval/acc_no_think_hard"),
    "rollout length per mode (tokens)": ("length/think", "length/no_think"),
    "KL to the reference (--beta > 0)": ("kl",),
    "policy entropy (nats/token)": ("entropy_mean",),
    "clip fraction": ("clip_frac_low", "clip_frac_high"),
    "rollout vs training log-probs (|diff|)": ("mismatch/abs_mean", "mismatch/abs_max"),
    "SFT loss (annealing)": ("loss",),
}


def plot_panels(records: list[dict]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """The panels a run's metrics records fill: ``{title: {metric: [(step, value), ...]}}``, empty ones left out
    (and the loss of an RL run: ~0 by construction). Example: ``plot_panels([{"step": 1, "kl": 0.1}])`` ->
    ``{"KL to the reference (--beta > 0)": {"kl": [(1, 0.1)]}}``."""
    rl_run = any(k.startswith("reward/") for r in records for k in r)
    panels = {
        title: {k: [(r["step"], r[k]) for r in records if isinstance(r.get(k), (int, float))] for k in keys}
        for title, keys in PANELS.items() if not (rl_run and keys == ("loss",))
    }
    panels = {t: {k: v for k, v in series.items() if v} for t, series in panels.items()}
    return {t: s for t, s in panels.items() if s}


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """Draw the run's curves into one PNG; returns its path. Raises ValueError if nothing plottable was logged."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"run_dir: no metrics.jsonl in {run_dir}")
    panels = plot_panels(read_metrics(path))
    if not panels:
        known = sorted(k for keys in PANELS.values() for k in keys)
        raise ValueError(f"run_dir: {path} has none of the plotted metrics {known}")
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.6 * len(panels)), squeeze=False)
    for ax, (title, series) in zip(axes[:, 0], panels.items()):
        for key, points in series.items():
            steps, values = zip(*points)
            label = key.split("/", 1)[-1]
            if len(points) < 30:  # evaluations: every point
                ax.plot(steps, values, marker="o", label=label)
                continue
            # per-step values of 8 prompts are noisy: faint, with a trailing 10-step mean on top
            (line,) = ax.plot(steps, values, alpha=0.25)
            mean = [sum(values[max(0, i - 9) : i + 1]) / len(values[max(0, i - 9) : i + 1]) for i in range(len(values))]
            ax.plot(steps, mean, color=line.get_color(), label=f"{label} (10-step mean)")
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
