"""Rollout engine on a tiny random Qwen3: the batched, left-padded KV-cache engine against an unbatched no-cache
reference (full sequence re-run every step, host-side Python mode processor), log-probs against a full forward."""

import pytest
import torch
from conftest import with_logit_bias
from transformers import Qwen3Config, Qwen3ForCausalLM

from r4b_fast import Mode
from r4b_fast.ops.sampling import ModeProcessorRef
from r4b_fast.training.rollout import bpo_modes, generate_rollouts

V = 128
OPEN, NO_THINK, CLOSE = [120, 121], [120, 122, 123, 122], [121, 123, 122]  # stand-ins for the tokenizer's ids
PAD = 127
PROMPTS = [[5, 17, 33, 2, 9], [44, 3, 8, 91, 12, 6, 70, 31, 1], [100, 64, 7]]
MODES = [[Mode.THINK, Mode.NO_THINK, Mode.AUTO], [Mode.THINK, Mode.NO_THINK], [Mode.AUTO, Mode.THINK]]
MAX_NEW = 14


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's ops are far too small for intra-op threads: on a busy 2-core machine the thread barriers
    alone cost ~10 ms per op. Restored after this module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, max_position_embeddings=128)  # fmt: skip
    return Qwen3ForCausalLM(cfg).eval()


def _kw(eos, **extra):
    return dict(think_open_ids=OPEN, no_think_ids=NO_THINK, think_close_ids=CLOSE, eos_id=eos, pad_id=PAD,
                max_new_tokens=MAX_NEW, **extra)  # fmt: skip


def _reference(model, prompt, mode, eos, budget):
    """One rollout alone: no padding, no cache, the whole sequence re-run every step, greedy, Python processor."""
    proc = ModeProcessorRef([mode], OPEN, NO_THINK, CLOSE, budget=budget, eos_id=eos, pad_id=PAD)
    seq, out, forced, active, logps = list(prompt), [], [], [], []
    with torch.no_grad():
        for _ in range(MAX_NEW):
            logits = model(torch.tensor([seq])).logits[0, -1]
            was_finished = proc.finished[0]
            tok = proc.step([int(logits.argmax())])[0]
            out.append(tok)
            forced.append(proc.forced[0])
            active.append(not was_finished)
            logps.append(float(torch.log_softmax(logits, -1)[tok]) if not was_finished else 0.0)
            if not was_finished:
                seq.append(tok)
    return out, forced, active, logps, proc


@pytest.mark.parametrize("budget", [None, 3])
def test_kv_cache_engine_matches_no_cache_reference(model, budget):
    # eos: a token the model emits greedily on its own, so that finishing (and padding after it) is exercised
    probe = generate_rollouts(model, PROMPTS, MODES, **_kw(126), temperature=0.0)
    special = set(OPEN + NO_THINK + CLOSE)
    eos = next(t for t in probe.completions[2, 3:].tolist() if t not in special)  # an AUTO row's free token
    res = generate_rollouts(model, PROMPTS, MODES, **_kw(eos, budget=budget), temperature=0.0)
    r = 0
    for p, ms in enumerate(MODES):
        for m in ms:
            toks, forced, active, logps, proc = _reference(model, PROMPTS[p], int(m), eos, budget)
            n = res.steps
            assert res.completions[r, :n].tolist() == toks[:n], (p, m)
            assert res.forced_mask[r, :n].tolist() == forced[:n]
            assert res.completion_mask[r, :n].tolist() == active[:n]
            torch.testing.assert_close(res.logprobs[r, :n], torch.tensor(logps[:n]), rtol=1e-4, atol=1e-4)
            if n < MAX_NEW:  # stopped early: every row had finished
                assert proc.finished[0]
            assert bool(res.finished[r]) == proc.finished[0]
            assert bool(res.think_closed[r]) == proc.closed[0] and bool(res.think_opened[r]) == proc.opened[0]
            assert int(res.modes[r]) == int(m) and int(res.prompt_index[r]) == p
            r += 1
    assert res.lengths.tolist() == res.completion_mask.sum(1).tolist()
    assert res.finished.any(), "the test should exercise finishing"
    if budget is not None:  # thinking rows are closed by the budget, exactly after 3 sampled tokens
        closed_by_budget = 0
        for row in torch.nonzero(res.modes == Mode.THINK)[:, 0].tolist():
            seq = res.completions[row].tolist()
            thought = seq[len(OPEN) : len(OPEN) + 3]
            if eos not in thought and 123 not in thought:  # neither finished nor closed by itself first
                assert seq[len(OPEN) + 3 : len(OPEN) + 3 + len(CLOSE)] == CLOSE
                assert res.think_closed[row]
                closed_by_budget += 1
        assert closed_by_budget >= 2


def test_logprobs_match_a_full_forward(model):
    gen = torch.Generator().manual_seed(0)
    res = generate_rollouts(model, PROMPTS, [bpo_modes(2)] * 3, **_kw(126, budget=4), temperature=0.8, top_p=0.9,
                            top_k=50, generator=gen)  # fmt: skip
    assert res.completions.shape == (12, MAX_NEW)
    with torch.no_grad():
        for r in range(12):
            prompt = PROMPTS[int(res.prompt_index[r])]
            mask = res.completion_mask[r]
            comp = res.completions[r][mask].tolist()
            logits = model(torch.tensor([prompt + comp])).logits[0].float()
            lp = torch.log_softmax(logits / 0.8, -1)[len(prompt) - 1 : -1].gather(1, torch.tensor(comp)[:, None])[:, 0]
            torch.testing.assert_close(res.logprobs[r][mask], lp, rtol=1e-4, atol=1e-4)
            assert (res.logprobs[r][~mask] == 0).all()
    assert (res.modes == torch.tensor([1, 1, 0, 0] * 3)).all()
    assert res.think_opened.all()  # both forced modes open a block; no-think rows close it at once
    assert res.think_closed[res.modes == Mode.NO_THINK].all()
    # the forced prefix is marked forced, the rest is the policy's
    assert res.forced_mask[res.modes == Mode.NO_THINK, : len(NO_THINK)].all()
    assert (res.policy_mask == (res.completion_mask & ~res.forced_mask)).all()


def test_prompt_embeds_pass_through(model):
    kw = _kw(126)
    a = generate_rollouts(model, PROMPTS, MODES, **kw, temperature=0.0)
    emb = [model.get_input_embeddings()(torch.tensor(p)).detach() for p in PROMPTS]
    b = generate_rollouts(model, PROMPTS, MODES, **kw, temperature=0.0, prompt_embeds=emb)
    assert torch.equal(a.completions, b.completions)
    torch.testing.assert_close(a.logprobs, b.logprobs)


def test_ranks_generating_slices_sample_what_one_process_does(model):
    """Data parallelism: two 'ranks' each generate their prompts' rollouts with ``noise_rows`` and together give
    exactly the one-process rollouts (sampled, temperature 1, top-p), although their padding widths differ."""
    kw = dict(**_kw(126), temperature=1.0, top_p=0.95)
    whole = generate_rollouts(model, PROMPTS, MODES, **kw, generator=torch.Generator().manual_seed(4))
    total = sum(map(len, MODES))
    parts, offset = [], 0
    for lo, hi in ((0, 1), (1, 3)):
        part = generate_rollouts(model, PROMPTS[lo:hi], MODES[lo:hi], **kw, generator=torch.Generator().manual_seed(4),
                                 noise_rows=(offset, total))  # fmt: skip
        offset += part.completions.shape[0]
        parts.append(part)
    got = torch.cat([p.completions for p in parts])
    assert torch.equal(got, whole.completions)
    torch.testing.assert_close(torch.cat([p.logprobs for p in parts]), whole.logprobs, rtol=1e-5, atol=1e-5)
    # and the noise is really used: another seed samples something else
    other = generate_rollouts(model, PROMPTS, MODES, **kw, generator=torch.Generator().manual_seed(5))
    assert not torch.equal(other.completions, whole.completions)
    with pytest.raises(ValueError, match="noise_rows: rows"):
        generate_rollouts(model, PROMPTS, MODES, **kw, generator=torch.Generator(), noise_rows=(3, total))


def _biased(model, bias):
    """A copy of the tiny model whose LM head adds ``bias`` [V] to every logit (a bias layer, as a model that
    learned to close its think block at once would have)."""
    import copy

    return with_logit_bias(copy.deepcopy(model), bias)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_strict_modes_through_the_rollout_engine(model, temperature):
    """A model biased to close the block at once (``</think>`` far above everything, ``<think>`` next): with
    min_think_tokens=3 its THINK rollouts think for 3 tokens before the close sequence ("\n</think>": </think> at
    OPEN + 3 + 1) and with 0 close at once; with no_reopen no think tag follows a closed block (NO_THINK's forced
    one, THINK's, AUTO's), without it they come back. Log-probs stay the unconstrained model's (a full forward)."""
    start, end = OPEN[0], CLOSE[1]
    bias = torch.zeros(V)
    bias[end], bias[start] = 60.0, 50.0
    m = _biased(model, bias)
    modes = [[Mode.THINK, Mode.NO_THINK, Mode.AUTO]] * 2
    kw = dict(**_kw(126), temperature=temperature, auto_ids=[start])
    strict = generate_rollouts(m, PROMPTS[:2], modes, **kw, min_think_tokens=3, no_reopen=True,
                               generator=torch.Generator().manual_seed(0))  # fmt: skip
    loose = generate_rollouts(m, PROMPTS[:2], modes, **kw, generator=torch.Generator().manual_seed(0))
    for r in range(6):
        row, free = strict.completions[r].tolist(), loose.completions[r].tolist()
        mode = int(strict.modes[r])
        first_end = row.index(end)
        if mode == Mode.THINK:
            assert row[: len(OPEN)] == OPEN and first_end == len(OPEN) + 3 + 1, row
            assert free.index(end) == len(OPEN), free  # without the constraint: closed at once
            assert not strict.forced_mask[r, len(OPEN) :].any()  # thought and closed by the model itself
        assert start not in row[first_end + 1 :] and end not in row[first_end + 1 :], (mode, row)
        after = free[free.index(end) + 1 :]
        assert after.count(start) + after.count(end) >= 3, (mode, free)
    assert strict.think_closed.all()
    with torch.no_grad():
        for r in range(6):
            prompt = PROMPTS[int(strict.prompt_index[r])]
            comp = strict.completions[r][strict.completion_mask[r]].tolist()
            logits = m(torch.tensor([prompt + comp])).logits[0].float() / (temperature or 1.0)
            lp = torch.log_softmax(logits, -1)[len(prompt) - 1 : -1].gather(1, torch.tensor(comp)[:, None])[:, 0]
            torch.testing.assert_close(strict.logprobs[r][strict.completion_mask[r]], lp, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="min_think_tokens: 5 for row 0, above its thinking budget 2"):
        generate_rollouts(m, PROMPTS[:1], [[Mode.THINK]], **_kw(126, budget=2), min_think_tokens=5)


def test_strict_auto_decides_between_the_two_mode_tokens(model):
    """strict_auto: an AUTO rollout's first sampled token is one of the two tokens where the thinking and
    non-thinking prefixes part (OPEN[1] / NO_THINK[1] after <think>), drawn with their two-way probabilities (a
    frequency test over 600 rows), even for a model biased towards a third token there; the recorded log-prob is
    the full-vocabulary one. Without it the third token wins. Forced rows are untouched."""
    start, third = OPEN[0], 50
    bias = torch.zeros(V)
    bias[third], bias[OPEN[1]], bias[NO_THINK[1]] = 12.0, 2.0, 1.5
    m = _biased(model, bias)
    n = 600
    modes = [[Mode.AUTO] * n + [Mode.THINK, Mode.NO_THINK]]
    kw = dict(**{**_kw(126), "max_new_tokens": 3}, temperature=1.0, auto_ids=[start])
    strict = generate_rollouts(m, PROMPTS[:1], modes, **kw, strict_auto=True,
                               generator=torch.Generator().manual_seed(0))
    loose = generate_rollouts(m, PROMPTS[:1], modes, **kw, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = m(torch.tensor([PROMPTS[0] + [start]])).logits[0, -1].float()
    full = torch.log_softmax(logits, -1)
    p_think = float(torch.softmax(logits[[OPEN[1], NO_THINK[1]]], -1)[0])
    decisions = strict.completions[:n, 1]
    assert set(decisions.tolist()) <= {OPEN[1], NO_THINK[1]}
    freq = float((decisions == OPEN[1]).float().mean())
    assert abs(freq - p_think) < 4 * (p_think * (1 - p_think) / n) ** 0.5, (freq, p_think)
    torch.testing.assert_close(strict.logprobs[:n, 1], full[decisions], rtol=1e-4, atol=1e-4)
    assert float((loose.completions[:n, 1] == third).float().mean()) > 0.9  # what the model alone would write
    for r, prefix in ((n, OPEN), (n + 1, NO_THINK)):  # forced rows: their prefixes as always
        assert strict.completions[r, : min(3, len(prefix))].tolist() == prefix[:3]
    with pytest.raises(ValueError, match="strict_auto: auto_ids"):
        generate_rollouts(m, PROMPTS[:1], [[Mode.AUTO]], **{**kw, "auto_ids": [start, OPEN[1]]}, strict_auto=True)


def test_bad_input(model):
    with pytest.raises(ValueError, match="modes: 2 entries for 3 prompts"):
        generate_rollouts(model, PROMPTS, MODES[:2], **_kw(126))
    with pytest.raises(ValueError, match="no_think_ids: empty forced sequence"):
        generate_rollouts(model, PROMPTS, MODES, **{**_kw(126), "no_think_ids": []})
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_rollouts(model, PROMPTS, MODES, **{**_kw(126), "max_new_tokens": 0})
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate_rollouts(model, [[1], []], [[1], [0]], **_kw(126))
    with pytest.raises(ValueError, match="g: expected a positive int"):
        bpo_modes(0)


def test_public_example_in_docstring():
    import doctest

    from r4b_fast.training import rollout

    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for t in doctest.DocTestFinder().find(rollout.generate_rollouts, "generate_rollouts", globs={}):
        runner.run(t)
    assert runner.failures == 0 and runner.tries > 0
