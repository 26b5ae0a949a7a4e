"""BPO training: ``python -m r4b_fast.training.bpo``.

The full loop (tiny R-4B-architecture model, synthetic visual task, rollouts forced into both modes) is not built
yet. Until it lands, this entry point runs the piece of BPO that is built: on a synthetic batch it computes the
mixed-group advantages with r4b_fast.group_advantages on every backend available here, checks them against the
loop reference, and prints what BPO logs per step. It says plainly that no model is trained.
"""

from __future__ import annotations

import argparse
import sys

import torch

import r4b_fast
from r4b_fast.modes import Mode

NOT_BUILT = (
    "not built yet: the model, the rollout engine (sample_with_modes), the fused log-prob loss and the training loop; "
    "this run trains nothing"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m r4b_fast.training.bpo", description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64, help="prompts in the synthetic batch")
    parser.add_argument("--group-size", type=int, default=8, help="g: rollouts per mode per prompt (2g per group)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.prompts < 1 or args.group_size < 1:
        parser.error("--prompts and --group-size must be positive")

    gen = torch.Generator().manual_seed(args.seed)
    g = args.group_size
    # Synthetic accuracy rewards: thinking rollouts succeed more often on "hard" prompts (odd ids).
    hard = (torch.arange(args.prompts) % 2 == 1).repeat_interleave(2 * g)
    modes = torch.tensor([Mode.THINK] * g + [Mode.NO_THINK] * g).repeat(args.prompts)
    p_correct = torch.where(hard, torch.where(modes == Mode.THINK, 0.9, 0.4), 0.95)
    rewards = torch.bernoulli(p_correct, generator=gen)

    ref_adv, _ = r4b_fast.group_advantages_ref(
        rewards, torch.arange(rewards.numel()) // (2 * g), args.prompts, modes, estimator="bpo"
    )
    print(f"r4b_fast {r4b_fast.__version__}: BPO advantages on a synthetic batch of {args.prompts} prompts x {2 * g}")
    for backend in r4b_fast.available_backends("cpu"):
        out = r4b_fast.group_advantages(rewards, 2 * g, modes=modes, estimator="bpo", backend=backend)
        err = (out.advantages.double() - ref_adv).abs().max().item()
        print(f"  backend={backend}: max |adv - reference| = {err:.2e}")
        if err > 1e-5:
            print("  mismatch against the reference", file=sys.stderr)
            return 1
    print(
        f"  reward per mode: think {out.mode_mean_overall[Mode.THINK]:.3f}, "
        f"no-think {out.mode_mean_overall[Mode.NO_THINK]:.3f}; zero-signal groups: {int(out.zero_signal_groups)}"
        f" of {args.prompts}"
    )
    print(NOT_BUILT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
