"""The rollout engine (``generate_rollouts``: shared prefill + compaction, and the reference engine it replaced) vs
transformers' ``model.generate`` (sampling, ``num_return_sequences`` rollouts per prompt), tokens per CPU-second.

Model and prompts: bench/generation_models.py (a 114M-parameter Qwen2.5-VL, vocabulary 151936, ~110-token text
prompts; R-QUICK: hidden 32, one layer, same vocabulary, 8 new tokens). B rollouts = B / 8 prompts x 8 (BPO's
``bpo_modes(4)``: 4 thinking, 4 non-thinking; ``generate``: 8 return sequences), temperature 1, no top-k / top-p,
every row decodes all N tokens (a random model never samples eos), strict modes off: the same work for the three.
``extra_info``: ``tokens`` (emitted), ``cpu_s`` (process CPU time of the timed call: every thread),
``tokens_per_cpu_s``, ``torch_threads``, ``loadavg`` (the machine's other load). Run with ``OMP_NUM_THREADS=1``
(the comparison is per CPU-second; bench/results/generation-cpu.md).
"""

import os
import time

import generation_models as G
import pytest
import torch
from harness import QUICK

SHAPES = [(8, 8)] if QUICK else [(8, 128), (32, 128), (8, 512), (32, 512)]  # (B rollouts, N new tokens)
IMPLS = ["shared", "reference", "generate"]
MODEL = "hidden 32, 1 layer" if QUICK else "114M"
PER_PROMPT = 8


@pytest.fixture(scope="module")
def model():
    if QUICK:
        return G.qwen25_vl(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64)
    return G.qwen25_vl()


def _ours(model, ids, N, engine):
    from r4b_fast.training.rollout import bpo_modes, generate_rollouts

    def fn():
        out = generate_rollouts(model, ids, [bpo_modes(PER_PROMPT // 2)] * len(ids), **G.engine_kwargs(N, False),
                                generator=torch.Generator().manual_seed(0), engine=engine)  # fmt: skip
        return int(out.completion_mask.sum())

    return fn


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}-N{s[1]}")
def test_generation(benchmark, model, impl, shape):
    B, N = shape
    benchmark.group = f"generation Qwen2.5-VL {MODEL}: B={B} rollouts ({B // PER_PROMPT} prompts x {PER_PROMPT}), N={N}"
    ids = G.prompts(B // PER_PROMPT, image=False)
    fn = G.generate_call(model, ids, N, PER_PROMPT) if impl == "generate" else _ours(model, ids, N, impl)
    if QUICK:
        fn()  # warm-up (the full shapes run seconds: no warm-up round)
    record = {}

    def timed():
        c0 = time.process_time()
        record["tokens"] = fn()
        record["cpu_s"] = time.process_time() - c0

    benchmark.pedantic(timed, rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(
        impl={"shared": "r4b_fast (shared prefill + compaction)", "reference": "r4b_fast reference engine",
              "generate": "transformers model.generate"}[impl],
        baseline=impl == "generate", tokens=record["tokens"], cpu_s=record["cpu_s"],
        tokens_per_cpu_s=record["tokens"] / record["cpu_s"], torch_threads=torch.get_num_threads(),
        loadavg=os.getloadavg()[0], rollouts=B, new_tokens=N,
    )  # fmt: skip
