"""The shared-prefill, compacting rollout engine (``engine="shared"``, the default) and the static-shape one
(``engine="static"``) against the reference engine (``engine="reference"``: one row per rollout from the prompt on,
every row to the end), for the same seed: the same
tokens, masks, states and steps, log-probs equal to float rounding. Every model family with images (LLaVA-OneVision,
R-4B: 1-D RoPE; Qwen2.5-VL: M-RoPE; Qwen3-VL: M-RoPE + DeepStack), strict modes on (minimum thinking, no reopening,
strict auto), sampled, with rows finishing at different steps so that compaction runs (at every finished row, at
the default threshold, never)."""

import pytest
import test_rollout
import torch
from conftest import with_logit_bias
from test_models import FAMILY_PARAMS, _load, _rows, dataset, family_dir  # noqa: F401  (module fixtures)

from r4b_fast import Mode
from r4b_fast.training.rollout import bpo_modes, generate_rollouts

V = test_rollout.V
model, one_thread = test_rollout.model, test_rollout.one_thread  # the same tiny Qwen3; one thread

OPEN, NO_THINK, CLOSE = [120, 121], [120, 122, 123, 122], [121, 123, 122]
PAD = 127
PROMPTS = [[5, 17, 33, 2, 9], [44, 3, 8, 91, 12, 6, 70, 31, 1], [100, 64, 7]]


def assert_same_rollouts(a, b, atol=1e-5):
    """Engine ``a`` vs reference ``b``: every integer / bool field equal, log-probs to float rounding."""
    for name in ("completions", "completion_mask", "forced_mask", "modes", "prompt_index", "lengths",
                 "think_opened", "think_closed", "finished"):  # fmt: skip
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.steps == b.steps
    torch.testing.assert_close(a.logprobs, b.logprobs, rtol=1e-5, atol=atol)


def _eos_from(res, special):
    """A token the rollouts sample mid-way (so rows finish at different steps when it is eos)."""
    toks = res.completions[:, 4:][res.completion_mask[:, 4:]].tolist()
    counts = {}
    for t in toks:
        if t not in special:
            counts[t] = counts.get(t, 0) + 1
    return max(counts, key=counts.get)


@pytest.mark.parametrize("compact_below", [1.0, 0.75, 0.0])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_shared_engine_equals_reference_tiny_qwen3(model, compact_below, temperature):
    modes = [bpo_modes(3) + [Mode.AUTO], bpo_modes(2), [Mode.AUTO, Mode.THINK, Mode.NO_THINK]]
    kw = dict(think_open_ids=OPEN, no_think_ids=NO_THINK, think_close_ids=CLOSE, pad_id=PAD, max_new_tokens=24,
              temperature=temperature, top_p=0.95, top_k=60, auto_ids=[OPEN[0]], min_think_tokens=2, no_reopen=True,
              strict_auto=True, budget=12)  # fmt: skip
    probe = generate_rollouts(model, PROMPTS, modes, eos_id=126, engine="reference", **kw,
                              generator=torch.Generator().manual_seed(1))  # fmt: skip
    eos = _eos_from(probe, set(OPEN + NO_THINK + CLOSE))
    ref = generate_rollouts(model, PROMPTS, modes, eos_id=eos, engine="reference", **kw,
                            generator=torch.Generator().manual_seed(1))  # fmt: skip
    new = generate_rollouts(model, PROMPTS, modes, eos_id=eos, compact_below=compact_below, **kw,
                            generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert ref.finished.any() and not ref.finished.all(), "rows should finish at different steps"
    assert_same_rollouts(new, ref)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_static_engine_equals_reference_tiny_qwen3(model, temperature):
    """engine="static" (fixed-shape steps: static KV buffers and a 4-D mask, eager on CPU) samples what the
    reference does."""
    modes = [bpo_modes(3) + [Mode.AUTO], bpo_modes(2), [Mode.AUTO, Mode.THINK, Mode.NO_THINK]]
    kw = dict(think_open_ids=OPEN, no_think_ids=NO_THINK, think_close_ids=CLOSE, pad_id=PAD, max_new_tokens=24,
              temperature=temperature, top_p=0.95, auto_ids=[OPEN[0]], min_think_tokens=2, no_reopen=True,
              strict_auto=True, budget=12, eos_id=5)  # fmt: skip
    ref = generate_rollouts(model, PROMPTS, modes, **kw, engine="reference", generator=torch.Generator().manual_seed(1))
    new = generate_rollouts(model, PROMPTS, modes, **kw, engine="static", generator=torch.Generator().manual_seed(1))
    assert_same_rollouts(new, ref)


def test_shared_engine_slices_of_a_global_batch_and_the_global_rng(model):
    """noise_rows (data-parallel ranks) and generator=None (the global RNG) draw the same stream in both engines."""
    modes = [bpo_modes(2)] * 3
    kw = dict(think_open_ids=OPEN, no_think_ids=NO_THINK, think_close_ids=CLOSE, pad_id=PAD, max_new_tokens=16,
              eos_id=126, temperature=1.0)  # fmt: skip
    ref = generate_rollouts(model, PROMPTS[1:], modes[1:], **kw, engine="reference",
                            generator=torch.Generator().manual_seed(3), noise_rows=(4, 12))  # fmt: skip
    new = generate_rollouts(model, PROMPTS[1:], modes[1:], **kw, compact_below=1.0,
                            generator=torch.Generator().manual_seed(3), noise_rows=(4, 12))  # fmt: skip
    assert_same_rollouts(new, ref)
    torch.manual_seed(7)
    ref = generate_rollouts(model, PROMPTS, modes, **kw, engine="reference")
    torch.manual_seed(7)
    new = generate_rollouts(model, PROMPTS, modes, **kw)
    assert_same_rollouts(new, ref)


def test_compaction_really_drops_rows(model):
    """A model biased towards eos finishes its non-thinking rows early: with compaction the decoding forwards see
    fewer rows (counted at the model), and the result is the reference's."""
    bias = torch.zeros(V)
    bias[126] = 4.0
    m = with_logit_bias(__import__("copy").deepcopy(model), bias)
    seen = []
    hook = m.model.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(kwargs["input_ids"].shape[0])
                                             if kwargs.get("input_ids") is not None else None, with_kwargs=True)
    kw = dict(think_open_ids=OPEN, no_think_ids=NO_THINK, think_close_ids=CLOSE, pad_id=PAD, max_new_tokens=20,
              eos_id=126, temperature=1.0, min_think_tokens=8, budget=16)  # fmt: skip
    try:
        ref = generate_rollouts(m, PROMPTS, [bpo_modes(4)] * 3, **kw, engine="reference",
                                generator=torch.Generator().manual_seed(0))  # fmt: skip
        ref_rows, seen[:] = list(seen), []
        new = generate_rollouts(m, PROMPTS, [bpo_modes(4)] * 3, **kw, generator=torch.Generator().manual_seed(0))
        new_rows = list(seen)
    finally:
        hook.remove()
    assert_same_rollouts(new, ref)
    assert ref_rows[0] == 24 and new_rows[0] == 3  # prefill: one row per rollout vs one per prompt
    assert set(ref_rows[1:]) == {24}
    assert new_rows[-1] < 24 and sum(new_rows[1:]) < sum(ref_rows[1:])


def test_bad_engine_arguments(model):
    kw = dict(think_open_ids=OPEN, no_think_ids=NO_THINK, think_close_ids=CLOSE, pad_id=PAD, max_new_tokens=4,
              eos_id=126)  # fmt: skip
    with pytest.raises(ValueError, match="engine: expected one of"):
        generate_rollouts(model, PROMPTS, [[1]] * 3, **kw, engine="fast")
    with pytest.raises(ValueError, match="compact_below"):
        generate_rollouts(model, PROMPTS, [[1]] * 3, **kw, compact_below=1.5)
    with pytest.raises(ValueError, match="num_threads"):
        generate_rollouts(model, PROMPTS, [[1]] * 3, **kw, num_threads=0)


def test_num_threads_is_set_while_generating_and_restored(model):
    """CPU: the engine decodes with ``num_threads`` intra-op threads (default 1) and restores torch's setting."""
    seen = []
    hook = model.register_forward_pre_hook(lambda *a: seen.append(torch.get_num_threads()))
    kw = dict(think_open_ids=OPEN, no_think_ids=NO_THINK, think_close_ids=CLOSE, pad_id=PAD, max_new_tokens=3,
              eos_id=126)  # fmt: skip
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        generate_rollouts(model, PROMPTS, [[1]] * 3, **kw)
        assert set(seen) == {1} and torch.get_num_threads() == 2
        seen.clear()
        generate_rollouts(model, PROMPTS, [[1]] * 3, **kw, num_threads=None)
        assert set(seen) == {2} and torch.get_num_threads() == 2
    finally:
        hook.remove()
        torch.set_num_threads(before)


@pytest.mark.parametrize("name", FAMILY_PARAMS)
def test_shared_engine_equals_reference_every_family(family_dir, dataset, name):  # noqa: F811
    """Each family with its images (prompt embeddings, M-RoPE positions, DeepStack), strict modes on, sampled:
    the shared engine's rollouts are the reference engine's."""
    from r4b_fast.training.evaluation import ModeTokens, prompt_embeddings
    from r4b_fast.training.vision import ImageEncoder

    path = family_dir(name)
    model, tok, family = _load(path)
    model.eval()
    encoder = ImageEncoder.for_model(model, path)
    t = ModeTokens.from_tokenizer(tok, model)
    rows = _rows(dataset)[:3]
    prompt_ids = [t.prompt_ids(r, encoder.count(model, r)) for r in rows]
    embeds = prompt_embeddings(model, prompt_ids, rows, t.image, encoder)
    modes = [bpo_modes(2) + [Mode.AUTO]] * len(rows)
    kw = dict(think_open_ids=t.think_open, no_think_ids=t.no_think, think_close_ids=t.think_close, auto_ids=t.auto,
              pad_id=t.pad, think_start_id=t.think_start, think_end_id=t.think_end, max_new_tokens=16,
              temperature=1.0, prompt_embeds=embeds, min_think_tokens=2, no_reopen=True, strict_auto=True)  # fmt: skip
    probe = generate_rollouts(model, prompt_ids, modes, eos_id=t.eos, engine="reference", **kw,
                              generator=torch.Generator().manual_seed(0))  # fmt: skip
    special = set(t.think_open + t.no_think + t.think_close + [t.eos, t.pad, t.image])
    eos = _eos_from(probe, special)  # rows finish at different steps: compaction runs
    ref = generate_rollouts(model, prompt_ids, modes, eos_id=eos, engine="reference", **kw,
                            generator=torch.Generator().manual_seed(0))  # fmt: skip
    for extra in ({"compact_below": 1.0}, {"compact_below": 0.75}, {"engine": "static"}):
        new = generate_rollouts(model, prompt_ids, modes, eos_id=eos, **extra, **kw,
                                generator=torch.Generator().manual_seed(0))  # fmt: skip
        assert_same_rollouts(new, ref)
    assert ref.finished.any()
