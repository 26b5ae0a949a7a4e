"""Activation memory of the BPO loss per completion token, with and without --gradient-checkpointing:
``python -m r4b_fast.training.bpo_memory [--lengths 512 2048 4096] [--hidden-size 256] [--layers 4]``.

Each (length, checkpointing) case runs in a fresh process: a tiny R-4B-architecture model, ``--rows`` completions of
``length`` tokens after one image prompt, one forward of ``policy_forward`` + ``fused_linear_policy_loss`` and its
backward. Two numbers per case:

- saved: the bytes autograd holds between the forward and the backward (``saved_tensors_hooks``, each storage once,
  parameters left out): the activations a longer completion costs;
- peak RSS: the process's peak resident memory above what it held before the forward (``ru_maxrss``), which also
  counts the backward's temporaries (with checkpointing, one layer's recomputed activations).

The table in docs/training.md was made with this command.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from types import SimpleNamespace

import torch


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _case(length: int, checkpointing: bool, hidden: int, layers: int, rows: int) -> dict:
    from r4b_fast.ops.fused_linear_logprobs import fused_linear_policy_loss
    from r4b_fast.training.bpo_loss import enable_gradient_checkpointing, policy_forward
    from r4b_fast.training.evaluation import ModeTokens
    from r4b_fast.training.task import build_tokenizer, sample_items
    from r4b_fast.training.tiny_model import build_tiny_r4b, num_image_tokens
    from r4b_fast.training.vision import ImageEncoder

    torch.set_num_threads(1)
    tok = build_tokenizer()
    model = build_tiny_r4b(tok, hidden_size=hidden, layers=layers, seed=0).train()
    if checkpointing:
        enable_gradient_checkpointing(model)
    tokens = ModeTokens.from_tokenizer(tok, model)
    items = sample_items(1, 0)
    prompt_ids = [tokens.prompt_ids(items[0], num_image_tokens(model))]
    gen = torch.Generator().manual_seed(0)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def run(n: int, saved: dict | None):
        rollouts = SimpleNamespace(completions=torch.randint(10, len(tok), (rows, n), generator=gen),
                                   completion_mask=torch.ones(rows, n, dtype=torch.bool),
                                   prompt_index=torch.zeros(rows, dtype=torch.int64))  # fmt: skip

        def pack(t):
            storage = t.untyped_storage()
            if saved is not None and storage.data_ptr() not in params:
                saved[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            hidden_states = policy_forward(model, items, prompt_ids, rollouts, tokens.image, tokens.pad,
                                           ImageEncoder(model))  # fmt: skip
            loss, _ = fused_linear_policy_loss(hidden_states, model.lm_head.weight, rollouts.completions,
                                               torch.ones(rows), rollouts.completion_mask,
                                               old_logprobs=torch.zeros(rows, n))  # fmt: skip
        loss.backward()
        model.zero_grad(set_to_none=True)

    run(16, None)  # warm-up: lazy inits and allocator pools outside the measurement
    saved: dict[int, int] = {}
    before = _rss_bytes()
    run(length, saved)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    tokens_total = rows * length
    return {"length": length, "checkpointing": checkpointing, "rows": rows, "hidden": hidden, "layers": layers,
            "saved_bytes": sum(saved.values()), "saved_per_token": sum(saved.values()) / tokens_total,
            "peak_rss_above_bytes": max(0, peak - before),
            "peak_rss_per_token": max(0, peak - before) / tokens_total}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m r4b_fast.training.bpo_memory", description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 4096])
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rows", type=int, default=2, help="completions per case (one prompt)")
    p.add_argument("--case", nargs=2, help=argparse.SUPPRESS)  # the child: LENGTH CHECKPOINTING
    args = p.parse_args(argv)
    if args.case:
        print(json.dumps(_case(int(args.case[0]), args.case[1] == "1", args.hidden_size, args.layers, args.rows)))
        return 0
    print("| completion tokens | checkpointing | saved for backward | per token | peak RSS above start | per token |")
    print("|---|---|---|---|---|---|")
    for length in args.lengths:
        for ckpt in (False, True):
            out = subprocess.run([sys.executable, "-m", "r4b_fast.training.bpo_memory", "--case", str(length),
                                  str(int(ckpt)), "--hidden-size", str(args.hidden_size), "--layers",
                                  str(args.layers), "--rows", str(args.rows)],
                                 capture_output=True, text=True, check=True)  # fmt: skip
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {args.rows} x {length} | {'on' if ckpt else 'off'} | {r['saved_bytes'] / 2**20:.1f} MiB | "
                  f"{r['saved_per_token'] / 1024:.1f} KiB | {r['peak_rss_above_bytes'] / 2**20:.1f} MiB | "
                  f"{r['peak_rss_per_token'] / 1024:.1f} KiB |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
