"""Strict modes in TRL's generation (r4b_fast.integrations.trl_strict): the rules against the sampler's reference
(``ModeProcessorRef``), frequency tests (the processed distribution, sampled with a fixed seed, matches the model's
distribution renormalised over the allowed tokens: chi-square), ban tests (banned tokens are never sampled, through
``generate`` inside BPOTrainer, on a model biased towards them), strict auto's two-token decision, and the vLLM
logits processor's logic on plain tensors with a stand-in for vLLM's base class and batch updates (vLLM is not
installed here and cannot run on this machine)."""

import math
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("trl", reason="the TRL integration needs trl (pip install 'r4b_fast[trl]')")

from conftest import with_logit_bias  # noqa: E402
from test_integration_trl import Recorder, batch_inputs, build_tokenizer, make_trainer, tiny_model  # noqa: E402

from r4b_fast.integrations.trl_strict import (  # noqa: E402
    EXTRA_ARGS_KEY,
    RowState,
    StrictModesLogitsProcessor,
    StrictRules,
    constrain,
    violations,
    vllm_logits_processor_class,
)
from r4b_fast.modes import Mode  # noqa: E402

V = 12
START, END, EOS, NL, NLNL = 3, 4, 5, 6, 7
RULES = StrictRules(think_start=START, think_end=END, eos_ids=(EOS,), think_prefix=(START, NL),
                    no_think_prefix=(START, NLNL, END, NLNL), close_offset=1, min_think_tokens=3, no_reopen=True,
                    strict_auto=True, auto_common=(START,), decision=(NL, NLNL))  # fmt: skip


def chi_square_ok(counts: torch.Tensor, probs: torch.Tensor) -> bool:
    """Pearson's chi-square of ``counts`` against ``probs`` (bins with probability > 0) below the 99.9% quantile
    (Wilson-Hilferty's approximation of the chi-square distribution)."""
    on = probs > 0
    n = counts.sum()
    expected = probs[on] * n
    stat = float(((counts[on] - expected) ** 2 / expected).sum())
    df = int(on.sum()) - 1
    z = 3.09
    q = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    return stat < q


def sample_counts(scores: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    draws = torch.multinomial(torch.softmax(scores, -1), n, replacement=True, generator=gen)
    return torch.bincount(draws, minlength=scores.numel()).float()


# --------------------------------------------------------------------------------------------- rules vs sampler
def test_row_rules_equal_the_samplers_reference():
    """Each step's banned set equals ``ModeProcessorRef``'s (the sampler's host-side oracle) for the same tokens:
    the forced prefix (a prompt in TRL) then random sampled tokens, thinking and non-thinking rows."""
    from r4b_fast.ops.sampling import ModeProcessorRef

    gen = torch.Generator().manual_seed(0)
    rules = StrictRules(**{**RULES.to_dict(), "strict_auto": False, "auto_common": (), "decision": None})
    for trial in range(40):
        mode = Mode.THINK if trial % 2 == 0 else Mode.NO_THINK
        ref = ModeProcessorRef([int(mode)], list(rules.think_prefix), list(rules.no_think_prefix), [NL, END, NLNL],
                               eos_id=EOS, pad_id=0, think_start_id=START, think_end_id=END, min_think_tokens=3,
                               no_reopen=True)  # fmt: skip
        prefix = rules.think_prefix if mode == Mode.THINK else rules.no_think_prefix
        for _ in prefix:
            ref.step([0])
        row = RowState(rules, mode)
        for _ in range(12):
            assert sorted(set(row.banned())) == sorted(set(ref.banned()[0]))
            allowed = [t for t in range(V) if t not in row.banned() and t != EOS]
            tok = allowed[int(torch.randint(len(allowed), (1,), generator=gen))]
            ref.step([tok])
            row.advance(tok)


# ----------------------------------------------------------------------------------------------- frequency tests
def test_processed_distribution_is_the_renormalised_one_and_bans_hold():
    """A thinking row inside its block before ``min_end``: ``</think>`` and eos are never sampled, the other tokens
    follow ``softmax(logits)`` renormalised over them (chi-square, 40k draws, fixed seed); the recorded mismatch is
    ``-log`` of the allowed mass."""
    torch.manual_seed(0)
    logits = torch.randn(1, V) * 1.5
    logits[0, END] += 2.0  # the banned tokens carry real mass
    logits[0, EOS] += 1.0
    proc = StrictModesLogitsProcessor(RULES)
    proc.begin([Mode.THINK])
    prompt = torch.tensor([[1, 2, START, NL]])
    out = proc(prompt, logits.clone())
    counts = sample_counts(out[0], 40000, seed=1)
    assert counts[END] == 0 and counts[EOS] == 0
    p = torch.softmax(logits[0], -1)
    allowed = torch.ones(V, dtype=torch.bool)
    allowed[[END, EOS]] = False
    renorm = torch.where(allowed, p, 0.0) / p[allowed].sum()
    assert chi_square_ok(counts, renorm)
    assert not chi_square_ok(counts, torch.where(allowed, 1.0 / allowed.sum(), 0.0))  # the test can fail
    stats = proc.stats()
    assert stats["strict/logp_mismatch/mean"] == pytest.approx(-math.log(float(p[allowed].sum())), rel=1e-5)


def test_strict_auto_forces_the_common_part_then_a_two_token_decision():
    """Auto rows: first the prefixes' common part (``<think>``), then only the two decision tokens, sampled in the
    model's ratio (chi-square); then nothing is constrained until the block closes (no_reopen)."""
    torch.manual_seed(1)
    logits = torch.randn(1, V)
    proc = StrictModesLogitsProcessor(RULES)
    proc.begin([Mode.AUTO])
    ids = torch.tensor([[1, 2]])
    out = proc(ids, logits.clone())
    assert torch.isfinite(out[0]).sum() == 1 and torch.isfinite(out[0, START])
    out = proc(torch.cat([ids, torch.tensor([[START]])], 1), logits.clone())
    assert set(torch.isfinite(out[0]).nonzero().flatten().tolist()) == {NL, NLNL}
    counts = sample_counts(out[0], 20000, seed=2)
    p = torch.softmax(logits[0], -1)
    two = torch.zeros(V)
    two[[NL, NLNL]] = p[[NL, NLNL]] / p[[NL, NLNL]].sum()
    assert chi_square_ok(counts, two)
    out = proc(torch.tensor([[1, 2, START, NL]]), logits.clone())
    assert torch.isfinite(out[0]).all()  # thinking chosen: an auto row has no minimum


def test_constrain_never_empties_a_row():
    scores = torch.full((1, V), float("-inf"))
    scores[0, 0] = 0.0
    row = RowState(RULES, Mode.AUTO)  # only START is allowed, whose logit is -inf
    out, _ = constrain(scores, [row])
    assert torch.isfinite(out[0]).tolist() == [t == START for t in range(V)]


# ------------------------------------------------------------------------------- ban test through BPOTrainer
def test_generate_never_samples_banned_tokens_even_when_the_model_prefers_them(tmp_path):
    """A model biased towards ``</think>``, eos and ``<think>``: with min_think_tokens=3 and no_reopen, no thinking
    rollout closes before 3 tokens (+ the close's ``\\n``) nor ends inside its block, and no rollout writes a think
    tag after its block; without strict modes the same model does both (the control)."""
    tok = build_tokenizer()
    bias = torch.zeros(len(tok))
    for t in ("</think>", "<think>"):
        bias[tok.convert_tokens_to_ids(t)] = 4.0
    bias[tok.eos_token_id] = 3.0

    def run(strict):
        model = with_logit_bias(tiny_model(tok), bias)
        extra = dict(min_think_tokens=3, no_reopen=True) if strict else {}
        trainer = make_trainer(tmp_path / str(strict), reward=Recorder(), model=model, tok=tok, decision_coef=0.0,
                               max_completion_length=8, **extra)  # fmt: skip
        trainer.model.train()
        out = trainer._generate_and_score_completions(batch_inputs())
        comps = [ids[m.bool()].tolist() for ids, m in zip(out["completion_ids"], out["completion_mask"])]
        return comps, trainer

    comps, trainer = run(strict=True)
    rules, modes = trainer.bpo_strict_rules, trainer._group_modes(8, 0, 4)
    assert rules.min_end == 4 and violations(rules, modes, comps) == []
    assert all(rules.think_end not in c[:4] and not (set(c[:4]) & set(rules.eos_ids))
               for c, m in zip(comps, modes) if m == Mode.THINK)  # fmt: skip
    assert trainer._metrics["train"]["strict/constrained_frac"][0] > 0
    control, _ = run(strict=False)
    assert violations(rules, modes, control)  # the biased model breaks the rules when nothing stops it


# ----------------------------------------------------------------------------------------- vLLM logits processor
class _Base:  # stand-in for vllm.v1.sample.logits_processor.LogitsProcessor (an ABC with these methods)
    pass


def _added(index, rules, prompt, output):
    params = SimpleNamespace(extra_args={EXTRA_ARGS_KEY: rules.to_dict()} if rules else None)
    return (index, params, prompt, output)


def test_vllm_processor_follows_batch_updates():
    """Requests added, removed, moved and swapped as vLLM's ``BatchUpdate`` describes; output-token lists are the
    live ones (extended in place after each step); only requests carrying the rules are constrained."""
    cls = vllm_logits_processor_class(_Base)
    cls.validate_params(SimpleNamespace(extra_args={EXTRA_ARGS_KEY: RULES.to_dict()}))
    with pytest.raises(TypeError):
        cls.validate_params(SimpleNamespace(extra_args={EXTRA_ARGS_KEY: {"bogus": 1}}))
    proc = cls(None, torch.device("cpu"), False)
    assert proc.is_argmax_invariant() is False
    think_out, no_think_out, plain_out = [], [], []
    update = SimpleNamespace(batch_size=3, removed=[], moved=[], added=[
        _added(0, RULES, [1, START, NL], think_out), _added(1, RULES, [1, START, NLNL, END, NLNL], no_think_out),
        _added(2, None, [1, START, NL], plain_out)])  # fmt: skip
    proc.update_state(update)
    out = proc.apply(torch.zeros(3, V))
    assert torch.isinf(out[0, [END, EOS]]).all() and torch.isfinite(out[0, :END]).all()  # thinking: too short
    assert torch.isinf(out[1, [START, END]]).all() and torch.isfinite(out[1, EOS])  # closed: no reopening
    assert torch.isfinite(out[2]).all()  # no rules: untouched
    think_out += [8, 9, 10]  # 3 sampled tokens: min_end = 3 + the close's "\n" before </think> = 4
    proc.update_state(None)
    assert torch.isinf(proc.apply(torch.zeros(3, V))[0, END])
    think_out.append(NL)
    proc.update_state(None)
    out = proc.apply(torch.zeros(3, V))
    assert torch.isfinite(out[0, END]) and torch.isfinite(out[0, EOS])
    # swap rows 0 and 1, then remove row 2
    proc.update_state(SimpleNamespace(batch_size=3, removed=[2], added=[],
                                      moved=[(0, 1, SimpleNamespace(name="SWAP"))]))  # fmt: skip
    out = proc.apply(torch.zeros(2, V))
    assert torch.isinf(out[0, [START, END]]).all()  # the non-thinking row now sits at 0
    assert sorted(proc.rows) == [0, 1]


def test_vllm_and_transformers_processors_agree_on_random_rows():
    cls = vllm_logits_processor_class(_Base)
    gen = torch.Generator().manual_seed(3)
    prompts = [[1, START, NL], [1, START, NLNL, END, NLNL], [1, 2]]
    outputs = [[], [], []]
    vproc = cls(None, None, False)
    added = [_added(i, RULES, p, o) for i, (p, o) in enumerate(zip(prompts, outputs))]
    vproc.update_state(SimpleNamespace(batch_size=3, removed=[], moved=[], added=added))
    tproc = StrictModesLogitsProcessor(RULES)
    tproc.begin(None)  # modes read from the prompts, as vLLM does
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    for _ in range(10):
        logits = torch.randn(3, V, generator=gen)
        a = tproc(ids, logits.clone())
        vproc.update_state(None)
        b = vproc.apply(logits.clone())
        assert torch.equal(torch.isfinite(a), torch.isfinite(b))
        nxt = torch.multinomial(torch.softmax(a, -1), 1, generator=gen)
        ids = torch.cat([ids, nxt], 1)
        for o, t in zip(outputs, nxt[:, 0].tolist()):
            o.append(t)


def test_strict_auto_through_the_trainer(tmp_path):
    """``mode_split=False, strict_auto=True``: every rollout starts with the prefixes' common part (``<think>``) and
    one of the two decision tokens, on a model biased against both; the trainer's rules say so."""
    tok = build_tokenizer()
    bias = torch.zeros(len(tok))
    bias[tok.convert_tokens_to_ids("<think>")] = -6.0
    bias[tok.eos_token_id] = 4.0
    model = with_logit_bias(tiny_model(tok), bias)
    trainer = make_trainer(tmp_path, reward=Recorder(), model=model, tok=tok, mode_split=False, strict_auto=True,
                           decision_coef=0.0)  # fmt: skip
    rules = trainer.bpo_strict_rules
    assert rules.auto_common == (tok.convert_tokens_to_ids("<think>"),)
    assert set(rules.decision) == set(tok.convert_tokens_to_ids(["\n", "\n\n"]))
    trainer.model.train()
    out = trainer._generate_and_score_completions(batch_inputs())
    for ids, m in zip(out["completion_ids"], out["completion_mask"]):
        row = ids[m.bool()].tolist()
        assert row[0] == rules.auto_common[0] and row[1] in rules.decision
