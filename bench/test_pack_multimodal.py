"""pack_multimodal: transformers' path (embedding + masked_scatter + Qwen2.5-VL get_rope_index + unpad) vs r4b_fast's
backends, M-RoPE, 0-8 images per sample. ``ratio_to_copy``: time / time of a plain copy of the packed embeddings
(the op's memory-bound limit), measured in the same test: ``ratio_to_copy`` against ``clone()`` (the copy allocates
its output like every implementation), ``ratio_to_copy_prealloc`` against a copy into a preallocated buffer.
On the HF row ``ratio_to_copy`` is therefore the largest speed-up any implementation that writes its output can
reach at that shape. On CPU, ``THP_MEM_ALLOC_ENABLE=1`` removes most of the page-fault cost of fresh outputs for
every implementation (see ``conftest.py``).

On a GPU: B = 64, L = 4096, D = 2048 bf16 (the shape of issue #10) with the torch, triton and cuda backends beside
transformers' path; on CPU the shapes above (triton skipped: the interpreter's timing means nothing)."""

import time

import pytest
import torch
from harness import DEVICE, QUICK, run, sync

import r4b_fast.backends
from r4b_fast.ops.pack_multimodal import pack_multimodal

IMG, VSTART, VEND = 151655, 151652, 151653  # Qwen2.5-VL's <|image_pad|>, <|vision_start|>, <|vision_end|>
GPU = DEVICE == "cuda"  # a GPU runs the shape of issue #10 (B = 64, L = 4096, D = 2048), quick or not
VOCAB = 1024 if QUICK and not GPU else 151936
D = 128 if QUICK and not GPU else 2048
DTYPE = torch.bfloat16
if GPU:
    SHAPES = [(64, 4096)]
else:
    SHAPES = [(8, 256), (64, 256)] if QUICK else [(8, 1024), (8, 4096), (64, 1024), (64, 4096)]
SHORT = QUICK or GPU  # time budgets: a GPU runs each row in milliseconds
GRIDS = [(1, 8, 8), (1, 16, 16), (1, 12, 20), (1, 28, 28), (1, 16, 32)]  # patches; tokens = t*h*w/4


class _HFRope:
    """transformers' own Qwen2.5-VL ``get_rope_index`` (and the helper it calls), without building a model."""

    def __init__(self):
        from transformers import Qwen2_5_VLConfig
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

        self.config = Qwen2_5_VLConfig()
        self._get_rope_index = Qwen2_5_VLModel.get_rope_index
        self.get_vision_position_ids = Qwen2_5_VLModel.get_vision_position_ids.__get__(self)

    def get_rope_index(self, *args, **kwargs):
        return self._get_rope_index(self, *args, **kwargs)


def _batch(b, seq, seed=0):
    """Right-padded batch: lengths uniform in [seq/4, seq], 0-8 images per sample (as many as fit)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.zeros(b, seq, dtype=torch.long)
    mask = torch.zeros(b, seq, dtype=torch.long)
    grid = []
    for i in range(b):
        n = int(torch.randint(seq // 4, seq + 1, (1,), generator=gen))
        toks = []
        for _ in range(int(torch.randint(0, 9, (1,), generator=gen))):
            g = GRIDS[int(torch.randint(0, len(GRIDS), (1,), generator=gen))]
            k = g[0] * g[1] * g[2] // 4
            if len(toks) + k + 8 > n:
                break
            toks += torch.randint(0, 1000, (int(torch.randint(1, 6, (1,), generator=gen)),), generator=gen).tolist()
            toks += [VSTART] + [IMG] * k + [VEND]
            grid.append(g)
        toks += torch.randint(0, 1000, (n - len(toks),), generator=gen).tolist()
        ids[i, :n] = torch.tensor(toks)
        mask[i, :n] = 1
    vocab_ids = ids
    if VOCAB < IMG:  # quick mode: a small table; remap the special ids into it
        vocab_ids = torch.where(ids == IMG, VOCAB - 1, torch.where(ids >= VOCAB, VOCAB - 2, ids))
    grid_t = torch.tensor(grid, dtype=torch.long).reshape(-1, 3)
    return vocab_ids, mask, grid_t


_CACHE = {}


def _inputs(b, seq):
    key = (b, seq)
    if key not in _CACHE:
        _CACHE.clear()
        ids, mask, grid = _batch(b, seq)
        image_id = IMG if VOCAB > IMG else VOCAB - 1
        gen = torch.Generator().manual_seed(1)
        weight = torch.randn(VOCAB, D, generator=gen).to(DTYPE)
        n_vis = int(((ids == image_id) & mask.bool()).sum())
        vision = torch.randn(n_vis, D, generator=gen).to(DTYPE)
        _CACHE[key] = tuple(x.to(DEVICE) for x in (ids, mask, grid, weight, vision)) + (image_id,)
    return _CACHE[key]


def hf_path(rope, ids, mask, grid, weight, vision, image_id):
    """What a transformers training step does before the decoder: embed the padded batch, masked_scatter the vision
    features, get_rope_index (a Python loop per sample and image, with host syncs), then unpad."""
    embeds = torch.nn.functional.embedding(ids, weight)
    image_mask = (ids == image_id).unsqueeze(-1).expand_as(embeds)
    embeds = embeds.masked_scatter(image_mask, vision)
    position_ids, deltas = rope.get_rope_index(ids, (ids == image_id).int(), image_grid_thw=grid,
                                               attention_mask=mask)  # fmt: skip
    real = mask.bool()
    return embeds[real], position_ids[:, real], deltas


def _copy_times(out, n=5):
    """Mean seconds of a plain copy of the packed embeddings: ``out.clone()`` (allocates its output, as every
    implementation here must) and ``dst.copy_(out)`` into a preallocated buffer (no page faults: on this CPU VM,
    first-touching fresh memory costs about as much as the copy itself)."""
    dst = torch.empty_like(out)
    times = {}
    for name, fn in (("clone", lambda: out.clone()), ("prealloc", lambda: dst.copy_(out))):
        fn()
        sync()
        total = 0.0
        for _ in range(n):
            start = time.perf_counter()
            fn()
            sync()
            total += time.perf_counter() - start
        times[name] = total / n
    return times


def _finish(benchmark, copy):
    mean = benchmark.stats.stats.mean
    benchmark.extra_info["copy_mean_s"] = copy["clone"]
    benchmark.extra_info["copy_prealloc_mean_s"] = copy["prealloc"]
    benchmark.extra_info["ratio_to_copy"] = mean / copy["clone"]
    benchmark.extra_info["ratio_to_copy_prealloc"] = mean / copy["prealloc"]


@pytest.mark.parametrize("b,seq", SHAPES)
def test_hf_path(benchmark, b, seq):
    benchmark.group = f"pack_multimodal mrope B={b} L={seq} D={D} {str(DTYPE).removeprefix('torch.')}"
    ids, mask, grid, weight, vision, image_id = _inputs(b, seq)
    rope = _HFRope()
    out = hf_path(rope, ids, mask, grid, weight, vision, image_id)
    t, n_img = out[0].shape[0], grid.shape[0]
    run(benchmark, lambda: hf_path(rope, ids, mask, grid, weight, vision, image_id), impl="hf (transformers)",
        baseline=True, budget_s=0.5 if QUICK else (2.0 if GPU else 8.0), memory=False, tokens=t,
        images=n_img)  # fmt: skip
    _finish(benchmark, _copy_times(out[0]))


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("b,seq", SHAPES)
def test_r4b_fast(benchmark, b, seq, backend):
    reasons = r4b_fast.backends.not_supported_reasons(backend, DEVICE)
    if reasons:
        pytest.skip("; ".join(reasons))
    if backend == "triton" and DEVICE == "cpu":
        pytest.skip("the Triton interpreter on CPU: its timing means nothing")
    benchmark.group = f"pack_multimodal mrope B={b} L={seq} D={D} {str(DTYPE).removeprefix('torch.')}"
    ids, mask, grid, weight, vision, image_id = _inputs(b, seq)

    def fn():
        return pack_multimodal(ids, mask, weight, vision, image_token_id=image_id, rope="mrope",
                               image_grid_thw=grid, backend=backend)  # fmt: skip

    out = fn()
    run(benchmark, fn, impl=backend, budget_s=0.5 if SHORT else 5.0, memory=QUICK or GPU,
        tokens=out.inputs_embeds.shape[0], images=grid.shape[0])  # fmt: skip
    _finish(benchmark, _copy_times(out.inputs_embeds.detach()))
