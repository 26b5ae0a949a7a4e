"""BPO vs GRPO under the same budget: ``python -m r4b_fast.training.compare``.

Runs ``python -m r4b_fast.training.bpo`` with ``--algo bpo`` and ``--algo grpo`` from the same annealed model, for
each seed, with the same steps, prompts, rollouts per prompt and every other setting (the loop's defaults unless
given here), then evaluates the starting model and every trained model on the same held-out items of the embedded
task (half easy, half hard) in all three modes, greedy (T=0) and sampled (T=1). Writes ``results.json`` (every run's
numbers), ``table.md`` (mean and spread over seeds) and ``compare.png`` under ``--output-dir``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ALGOS = ("bpo", "grpo")
# the table's rows: (label, metric under eval/ or eval_t1/, or a derived ratio)
ROWS = (
    ("auto acc, easy", "acc_auto_easy"),
    ("auto acc, hard", "acc_auto_hard"),
    ("forced thinking acc, hard", "acc_think_hard"),
    ("forced non-thinking acc, hard", "acc_no_think_hard"),
    ("auto think rate, easy", "think_rate_easy"),
    ("auto think rate, hard", "think_rate_hard"),
    ("forced non-thinking acc where auto answers directly, hard", "acc_no_think_when_auto_skips_hard"),
    ("tokens, easy: auto / non-thinking", "ratio_auto_no_think_easy"),
    ("tokens, 50/50 mix: auto / forced thinking", "ratio_auto_think_mix"),
)


def derived(metrics: dict[str, float]) -> dict[str, float]:
    """Adds the token ratios of both temperatures: auto / non-thinking on easy items, and auto / forced thinking over
    the half-easy half-hard mix (mean lengths of equal-sized halves: the ratio of their sums).

    Example: ``derived({"eval/length_auto_easy": 6, "eval/length_no_think_easy": 5, ...})["eval/ratio_..."]``."""
    out = dict(metrics)
    for p in ("eval", "eval_t1"):
        m = metrics
        if f"{p}/length_auto_easy" in m and m.get(f"{p}/length_no_think_easy"):
            out[f"{p}/ratio_auto_no_think_easy"] = m[f"{p}/length_auto_easy"] / m[f"{p}/length_no_think_easy"]
        keys = [f"{p}/length_{mode}_{level}" for mode in ("auto", "think") for level in ("easy", "hard")]
        if all(k in m for k in keys) and m[keys[2]] + m[keys[3]] > 0:
            out[f"{p}/ratio_auto_think_mix"] = (m[keys[0]] + m[keys[1]]) / (m[keys[2]] + m[keys[3]])
    return out


def summarise(runs: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, tuple[float, float]]]:
    """Per algorithm, per metric: ``(mean, spread)`` over its runs (spread: the sample standard deviation, 0 for one
    run). Example: ``summarise({"bpo": [{"a": 1.0}, {"a": 3.0}]})`` -> ``{"bpo": {"a": (2.0, 1.414...)}}``."""
    out = {}
    for algo, results in runs.items():
        keys = sorted(set.intersection(*(set(r) for r in results)))
        out[algo] = {k: (statistics.fmean(r[k] for r in results),
                         statistics.stdev(r[k] for r in results) if len(results) > 1 else 0.0) for k in keys}
    return out


def table(summary: dict[str, dict[str, tuple[float, float]]], start: dict[str, float], n_seeds: int) -> str:
    """A markdown table: one row per ``ROWS`` entry; the annealed model, then each algorithm's mean ± spread, at T=0
    and T=1."""
    head = ["metric (held-out)"]
    for t in ("T=0", "T=1"):
        head += [f"annealed {t}"] + [f"{a.upper()} {t} (mean ± sd, {n_seeds} seeds)" for a in summary]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, key in ROWS:
        cells = [label]
        for p in ("eval", "eval_t1"):
            cells.append(f"{start[f'{p}/{key}']:.2f}" if f"{p}/{key}" in start else "-")
            for algo in summary:
                v = summary[algo].get(f"{p}/{key}")
                cells.append("-" if v is None else f"{v[0]:.2f} ± {v[1]:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(summary, start: dict[str, float], out: Path) -> Path:
    """Grouped bars (annealed, then each algorithm with its spread as error bars) for the table's rows at T=0 and
    T=1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(11, 7), squeeze=False)
    names = ["annealed", *summary]
    width = 0.8 / len(names)
    for ax, (p, t) in zip(axes[:, 0], (("eval", "T=0 (greedy)"), ("eval_t1", "T=1 (sampled)"))):
        for i, name in enumerate(names):
            if name == "annealed":
                vals, errs = [start.get(f"{p}/{k}", float("nan")) for _, k in ROWS], None
            else:
                pairs = [summary[name].get(f"{p}/{k}", (float("nan"), 0.0)) for _, k in ROWS]
                vals, errs = [v for v, _ in pairs], [e for _, e in pairs]
            ax.bar([j + i * width for j in range(len(ROWS))], vals, width, yerr=errs, capsize=2, label=name.upper()
                   if name != "annealed" else name)  # fmt: skip
        ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(ROWS))])
        ax.set_xticklabels([label for label, _ in ROWS], rotation=20, ha="right", fontsize=7)
        ax.set_title(f"held-out items, {t}")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _evaluate(model_dir: Path, args) -> dict[str, float]:
    from r4b_fast.training.common import load_model
    from r4b_fast.training.evaluation import evaluate_held_out
    from r4b_fast.training.vision import ImageEncoder

    model, tok = load_model(model_dir, "cpu")
    model.eval()
    encoder = ImageEncoder.for_model(model, model_dir)
    # the same items and sampling draws for every model (seed 0); as strict as the runs' rollouts
    return derived(evaluate_held_out(model, tok, encoder, args.eval_items, seed=0, max_new_tokens=args.max_new_tokens,
                                     min_think_tokens=args.min_think_tokens, no_reopen=args.no_reopen,
                                     strict_auto=args.strict_auto))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The checked arguments of the comparison command."""
    from r4b_fast.training import bpo
    from r4b_fast.training.evaluation import DEFAULT_MIN_THINK_TOKENS

    p = argparse.ArgumentParser(prog="python -m r4b_fast.training.compare", description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=bpo.DEFAULT_MODEL, help="annealed model (default: the shipped one)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None, help="default: the BPO loop's")
    p.add_argument("--prompts", type=int, default=None, help="default: the BPO loop's")
    p.add_argument("--g", type=int, default=None, help="default: the BPO loop's")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--min-think-tokens", type=int, default=DEFAULT_MIN_THINK_TOKENS)
    p.add_argument("--no-reopen", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--strict-auto", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--eval-items", type=int, default=512,
                   help="held-out items (half easy, half hard; 256 hard items: a rate's sd <= 0.03)")
    p.add_argument("--output-dir", type=Path, default=Path("runs/compare"))
    args = p.parse_args(argv)
    for name in ("steps", "prompts", "g"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name}: must be positive, got {getattr(args, name)}")
    if args.eval_items < 2:
        p.error(f"--eval-items: at least 2 (one easy, one hard), got {args.eval_items}")
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds: repeated seeds {args.seeds}")
    if not args.model.exists():
        p.error(f"--model: {args.model} does not exist")
    if args.max_new_tokens < 1 or not 0 <= args.min_think_tokens <= args.max_new_tokens:
        p.error("--max-new-tokens must be positive and --min-think-tokens in [0, --max-new-tokens]")
    return args


def main(argv: list[str] | None = None) -> int:
    from r4b_fast.training import bpo

    args = parse_args(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    common = ["--model", str(args.model), "--max-new-tokens", str(args.max_new_tokens), "--min-think-tokens",
              str(args.min_think_tokens), "--no-reopen" if args.no_reopen else "--no-no-reopen",
              "--strict-auto" if args.strict_auto else "--no-strict-auto", "--eval-items", "0", "--overwrite"]
    for name in ("steps", "prompts", "g"):
        if getattr(args, name) is not None:
            common += [f"--{name}", str(getattr(args, name))]
    start = _evaluate(args.model, args)
    runs: dict[str, list[dict[str, float]]] = {a: [] for a in ALGOS}
    seconds = {}
    for seed in args.seeds:
        for algo in ALGOS:  # the same seed for both: the same prompts per step and the same sampling noise
            out = args.output_dir / f"{algo}-seed{seed}"
            t0 = time.perf_counter()
            code = bpo.main([*common, "--algo", algo, "--seed", str(seed), "--output-dir", str(out),
                             "--save-every", "1000000"])  # fmt: skip
            if code:
                raise SystemExit(f"compare: {algo} seed {seed} failed ({code})")
            seconds[f"{algo}-seed{seed}"] = time.perf_counter() - t0
            runs[algo].append(_evaluate(out / "model", args))
            print(f"{algo} seed {seed}: " + ", ".join(f"{k.removeprefix('eval')} {runs[algo][-1][k]:.2f}"
                                                      for k in sorted(runs[algo][-1]) if "acc_auto" in k
                                                      or "think_rate" in k))  # fmt: skip
    summary = summarise(runs)
    text = table(summary, start, len(args.seeds))
    (args.output_dir / "table.md").write_text(text)
    (args.output_dir / "results.json").write_text(json.dumps(
        {"settings": vars(args) | {"model": str(args.model), "output_dir": str(args.output_dir)}, "annealed": start,
         "runs": {a: dict(zip(args.seeds, r)) for a, r in runs.items()}, "seconds": seconds,
         "summary": {a: {k: list(v) for k, v in s.items()} for a, s in summary.items()}}, indent=1))
    png = plot(summary, start, args.output_dir / "compare.png")
    print(text)
    print(f"wrote {args.output_dir / 'table.md'}, {args.output_dir / 'results.json'}, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
