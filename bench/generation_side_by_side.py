"""Tokens per CPU-second of the rollout engines and ``model.generate`` on the 114M Qwen2.5-VL
(bench/generation_models.py), configurations run one after another in one process, each printed as a markdown row
as soon as it ends (CPU time: ``time.process_time``, every thread of the process).

    python bench/generation_side_by_side.py loop     # engine alone vs the BPO step's configuration
    python bench/generation_side_by_side.py generate # engines vs model.generate, B = 8 / 32, N = 128
    python bench/generation_side_by_side.py generate-eos  # the same at B = 32 with eos biased: rows finish
    python bench/generation_side_by_side.py profile  # cProfile of one shared-engine call (strict, 2 threads)

``loop``: 4 image prompts (~110 tokens, 64 image tokens, M-RoPE) x ``bpo_modes(4)`` = 32 rollouts, 128 new tokens,
eos biased (+8: rollouts end after ~50 tokens, thinking rows not before 16 thought tokens under strict modes),
``noise_rows`` as the loop passes it; strict modes (min_think_tokens 16, no_reopen, strict_auto) on / off; 1 / 2
torch threads. ``generate``: text prompts, no eos (every row decodes N tokens), strict off, 1 thread, temperature 1;
``generate-eos``: the same with eos biased as in ``loop`` (rows finish after ~50 tokens: finished rows stay in
``generate``'s batch, as in the reference engine, and leave the shared engine's).
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import generation_models as G  # noqa: E402
import torch  # noqa: E402

from r4b_fast.training.rollout import bpo_modes, generate_rollouts  # noqa: E402

HEADER = ("| what | engine | strict | torch threads | engine num_threads | rollouts | N | tokens | CPU s | wall s | "
          "tokens / CPU-s |\n|---|---|---|---|---|---|---|---|---|---|---|")  # fmt: skip


def measure(fn) -> tuple[int, float, float]:
    c0, w0 = time.process_time(), time.perf_counter()
    tokens = fn()
    return tokens, time.process_time() - c0, time.perf_counter() - w0


def row(what, engine, strict, threads, num_threads, R, N, tokens, cpu, wall) -> str:
    return (f"| {what} | {engine} | {'on' if strict else 'off'} | {threads} | {num_threads} | {R} | {N} | {tokens} | "
            f"{cpu:.1f} | {wall:.1f} | {tokens / cpu:.1f} |")  # fmt: skip


def engine_call(model, ids, inputs, N, strict, engine, per_prompt=8, num_threads=1):
    R = len(ids) * per_prompt

    def fn():
        out = generate_rollouts(model, ids, [bpo_modes(per_prompt // 2)] * len(ids), **G.engine_kwargs(N, strict),
                                generator=torch.Generator().manual_seed(0), noise_rows=(0, R), prompt_embeds=inputs,
                                engine=engine, num_threads=num_threads)  # fmt: skip
        return int(out.completion_mask.sum())

    return fn


def loop(configs=None):
    model = G.qwen25_vl(eos_bias=8.0)
    ids = G.prompts(4)
    inputs = G.prompt_inputs(model, ids)
    # (engine, strict, torch threads, engine num_threads: None = the old engine's behaviour, torch's threads)
    default = [("reference", False, 1, None), ("reference", True, 2, None), ("shared", False, 1, 1),
               ("shared", True, 2, 1), ("reference", True, 2, 1), ("shared", True, 2, None)]  # fmt: skip
    if len(sys.argv) > 2:  # e.g. shared,1,2,1 reference,0,1,None
        configs = [(e, s == "1", int(t), None if n == "None" else int(n))
                   for e, s, t, n in (a.split(",") for a in sys.argv[2:])]  # fmt: skip
    print(HEADER, flush=True)
    for engine, strict, threads, num_threads in configs or default:
        torch.set_num_threads(threads)
        what = "loop config" if strict and threads == 2 else "standalone" if not strict and threads == 1 else "-"
        tokens, cpu, wall = measure(engine_call(model, ids, inputs, 128, strict, engine, num_threads=num_threads))
        print(row(what, engine, strict, threads, num_threads, 32, 128, tokens, cpu, wall), flush=True)


def generate(shapes=((32, 128), (8, 128)), eos_bias=0.0):
    model = G.qwen25_vl(eos_bias=eos_bias)
    torch.set_num_threads(1)
    print(HEADER, flush=True)
    for R, N in shapes:
        ids = G.prompts(R // 8, image=False)
        for engine in ("shared", "reference", "generate"):
            fn = (G.generate_call(model, ids, N) if engine == "generate"
                  else engine_call(model, ids, None, N, False, engine))
            tokens, cpu, wall = measure(fn)
            what = "vs generate" + (f", eos bias {eos_bias:g}" if eos_bias else "")
            print(row(what, engine, False, 1, 1, R, N, tokens, cpu, wall), flush=True)


def profile():
    import cProfile
    import pstats

    model = G.qwen25_vl(eos_bias=8.0)
    ids = G.prompts(4)
    inputs = G.prompt_inputs(model, ids)
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    fn = engine_call(model, ids, inputs, int(os.environ.get("N", "128")), True, os.environ.get("ENGINE", "shared"))
    pr = cProfile.Profile(timer=time.process_time)
    pr.enable()
    fn()
    pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    {"loop": loop, "generate": generate, "profile": profile,
     "generate-eos": lambda: generate(((32, 128),), eos_bias=8.0)}[sys.argv[1]]()  # fmt: skip
