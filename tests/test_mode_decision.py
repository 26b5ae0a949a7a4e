"""BPO's mode-decision loss (training/mode_decision.py): the token after "<think>" trained over the two mode tokens."""

import pytest
import torch

from r4b_fast.modes import Mode
from r4b_fast.training.evaluation import ModeTokens
from r4b_fast.training.mode_decision import DecisionTokens, decision_targets, mode_decision_loss
from r4b_fast.training.task import build_tokenizer


def test_decision_tokens_of_the_task_tokenizer():
    tok = build_tokenizer()
    tokens = ModeTokens.from_tokenizer(tok)
    d = DecisionTokens.from_prefixes(tokens.think_open, tokens.no_think)
    assert d.position == len(tokens.auto) == 1  # right after "<think>"
    assert tok.decode([d.think]) == "\n" and tok.decode([d.no_think]) == "\n\n"


def test_decision_tokens_refuse_prefixes_that_do_not_part():
    # an unmerged tokenizer: "<think>\n" is a token prefix of "<think>\n\n</think>\n\n"
    with pytest.raises(ValueError, match="mode prefixes"):
        DecisionTokens.from_prefixes([5, 9], [5, 9, 9, 6, 9, 9])


def _reference(hidden, weight, d, targets, w, temperature, norm):
    # written independently: log-softmax over the two decision tokens' logits, one rollout at a time
    total = torch.zeros(())
    for r in range(hidden.shape[0]):
        logits = torch.stack([hidden[r, d.position] @ weight[d.think], hidden[r, d.position] @ weight[d.no_think]])
        logp = torch.log_softmax(logits / temperature, 0)[0 if targets[r] == Mode.THINK else 1]
        total = total - w[r] * logp
    return total / norm


def test_loss_and_gradients_equal_the_reference():
    g = torch.Generator().manual_seed(0)
    R, N, D, V = 10, 5, 16, 12
    d = DecisionTokens(position=2, think=3, no_think=7)
    hidden = torch.randn(R, N, D, generator=g, requires_grad=True)
    weight = torch.randn(V, D, generator=g, requires_grad=True)
    targets = torch.tensor([1, 1, 1, 0, 0, 0, 1, 1, 0, 0])
    w = torch.rand(R, generator=g)
    w[4] = 0
    loss, m = mode_decision_loss(hidden, weight, d, targets, w, temperature=0.7, normaliser=4.0)
    gh, gw = torch.autograd.grad(loss, (hidden, weight))
    ref = _reference(hidden, weight, d, targets, w, 0.7, 4.0)
    rh, rw = torch.autograd.grad(ref, (hidden, weight))
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(gh, rh)
    torch.testing.assert_close(gw, rw)
    # only the two decision rows of the LM head and the decision position of hidden get a gradient
    others = [v for v in range(V) if v not in (3, 7)]
    assert gw[others].abs().max() == 0 and gw[[3, 7]].abs().max() > 0
    assert gh[:, [0, 1, 3, 4]].abs().max() == 0 and gh[4].abs().max() == 0  # row 4 weighs 0
    p = torch.sigmoid((hidden[:, 2] @ (weight[3] - weight[7])) / 0.7)
    torch.testing.assert_close(m["decision_p_think"], p.detach())


def test_targets_follow_the_better_half_with_its_advantage_sum():
    adv = torch.tensor([1.0, 0.5, 1.0, -1.0, -0.5, -1.0,    # thinking won: S = 2.5
                        -0.2, -0.2, -0.2, 0.2, 0.2, 0.2,    # non-thinking won: |S| = 0.6
                        0.0, 0.0, 0.0, 0.0, 0.0, 0.0,       # a tie: no push
                        0.9, 0.3, -0.4, -0.5, 0.1, -0.4])   # row 20 has no reward: S = 0.9 + 0.3 + 0.0
    modes = torch.tensor([1, 1, 1, 0, 0, 0] * 4)
    rows = torch.ones(24, dtype=torch.bool)
    rows[20] = False
    target, w = decision_targets(adv, modes, 6, rows)
    assert target[:6].tolist() == [Mode.THINK] * 6 and target[6:12].tolist() == [Mode.NO_THINK] * 6
    torch.testing.assert_close(w[:6], torch.full((6,), 2.5 / 6))
    torch.testing.assert_close(w[6:12], torch.full((6,), 0.6 / 6))
    assert w[12:18].abs().max() == 0
    expected = torch.full((6,), 1.2 / 5)
    expected[2] = 0
    torch.testing.assert_close(w[18:], expected)
    assert target[18:].eq(Mode.THINK).all()
    # a group with one mode only (GRPO-like) gets no push
    _, w1 = decision_targets(adv[:6], torch.ones(6, dtype=torch.int64), 6)
    assert w1.abs().max() == 0
    with pytest.raises(ValueError, match="advantages"):
        decision_targets(adv[:5], modes[:5], 6)


def test_a_tie_goes_to_the_shorter_half_with_the_tie_weight():
    # groups: all right (a tie; lengths favour no-think), all right (lengths favour thinking), a chance tie of mixed
    # results (no verdict), all wrong (no verdict), a won one
    adv = torch.tensor([0.0] * 8 + [1.0, -1.0, -1.0, 1.0] + [0.0] * 4 + [1.0, 1.0, -1.0, -1.0])
    rewards = torch.tensor([1.0] * 8 + [1.0, 0.0, 0.0, 1.0] + [0.0] * 4 + [1.0, 1.0, 0.0, 0.0])
    modes = torch.tensor([1, 1, 0, 0] * 5)
    lengths = torch.tensor([12, 14, 5, 5, 4, 6, 9, 9, 20, 20, 5, 5, 20, 20, 5, 5, 20, 20, 5, 5])
    target, w = decision_targets(adv, modes, 4, rewards=rewards, lengths=lengths, tie_weight=0.5)
    assert target[:8].tolist() == [Mode.NO_THINK] * 4 + [Mode.THINK] * 4
    assert target[16:].eq(Mode.THINK).all()
    torch.testing.assert_close(w, torch.tensor([0.125] * 8 + [0.0] * 8 + [0.5] * 4))
    # without lengths a tie goes to non-thinking; tie_weight 0: ties train nothing
    target, w = decision_targets(adv, modes, 4, rewards=rewards, tie_weight=0.5)
    assert target[:8].eq(Mode.NO_THINK).all() and w[:8].eq(0.125).all()
    _, w0 = decision_targets(adv, modes, 4, rewards=rewards, lengths=lengths)
    assert w0[:16].abs().max() == 0 and w0[16:].gt(0).all()
    # a row without a reward does not break a tie of the others
    r2 = rewards.clone()
    r2[1] = float("nan")
    rows = torch.isfinite(r2)
    target, w = decision_targets(adv, modes, 4, rows, rewards=r2, lengths=lengths, tie_weight=0.5)
    torch.testing.assert_close(w[:4], torch.tensor([0.5 / 3, 0.0, 0.5 / 3, 0.5 / 3]))
    with pytest.raises(ValueError, match="tie_weight"):
        decision_targets(adv, modes, 4, tie_weight=-1.0)
    with pytest.raises(ValueError, match="rewards"):
        decision_targets(adv, modes, 4, tie_weight=0.5)


def test_the_push_fades_once_the_decision_is_made():
    # gradient on the gap: |S| * (1 - p2(better)): full at atrophy (p ~ 0), ~0 once p2(better) ~ 1
    grads = []
    for bias in (-6.0, 0.0, 6.0):
        gap = torch.tensor(bias, requires_grad=True)
        hidden = torch.zeros(6, 1, 2)
        hidden[:, 0, 0] = 1.0
        weight = torch.stack([torch.stack([gap, torch.tensor(0.0)]), torch.zeros(2)])  # z_think = gap, z_no = 0
        target, w = decision_targets(torch.tensor([1.0, 0.5, 1.0, -1.0, -0.5, -1.0]), torch.tensor([1, 1, 1, 0, 0, 0]),
                                     6)  # fmt: skip
        loss, _ = mode_decision_loss(hidden, weight, DecisionTokens(0, 0, 1), target, w)
        (grad,) = torch.autograd.grad(loss, gap)
        grads.append(float(grad))
        torch.testing.assert_close(grad, -2.5 * (1 - torch.sigmoid(gap.detach())))
    assert grads[0] < -2.4 and abs(grads[2]) < 0.01


def test_a_step_moves_the_decision_towards_the_better_half():
    g = torch.Generator().manual_seed(1)
    head = torch.nn.Linear(8, 6, bias=False)
    hidden = torch.randn(1, 3, 8, generator=g).expand(8, 3, 8)  # one prompt: its 8 rollouts share the context
    d = DecisionTokens(1, 2, 4)
    target, w = decision_targets(torch.tensor([1.0] * 4 + [-1.0] * 4), torch.tensor([1] * 4 + [0] * 4), 8)
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    before = torch.softmax(hidden[:, 1] @ head.weight.t(), -1).detach()
    before_weight = head.weight.detach().clone()
    loss, _ = mode_decision_loss(hidden, head.weight, d, target, w)
    loss.backward()
    opt.step()
    after = torch.softmax(hidden[:, 1] @ head.weight.t(), -1).detach()
    assert (after[:, 2] / after[:, 4] > before[:, 2] / before[:, 4]).all()
    logits_before = hidden[:, 1] @ before_weight.t()
    logits_after = hidden[:, 1] @ head.weight.detach().t()
    others = [0, 1, 3, 5]  # the other tokens' logits did not move: nothing is pushed onto them
    torch.testing.assert_close(logits_after[:, others], logits_before[:, others])


def test_bad_hidden_shape_is_named():
    with pytest.raises(ValueError, match="hidden"):
        mode_decision_loss(torch.zeros(2, 1, 4), torch.zeros(3, 4), DecisionTokens(1, 0, 1), torch.zeros(2),
                           torch.zeros(2))


def test_evaluation_splits_forced_accuracy_by_auto_modes_choice(monkeypatch):
    """evaluate(): with auto and the forced modes, each forced mode's accuracy on the items where auto mode thought /
    answered directly, from the same items' completions (here scripted per item)."""
    import r4b_fast.training.evaluation as ev
    from r4b_fast.training.task import sample_items

    items = sample_items(8, 3, hard_fraction=1.0)
    scripted = {  # per mode, per item: the completion's text
        Mode.AUTO: ["<think>\nx\n</think>\n\n"] * 3 + ["<think>\n\n</think>\n\n"] * 5,
        Mode.NO_THINK: [f"<think>\n\n</think>\n\n{it.answer if i in (0, 3, 4, 5) else 'x'}"
                        for i, it in enumerate(items)],
        Mode.THINK: [f"<think>\ns\n</think>\n\n{it.answer if i != 7 else 'x'}" for i, it in enumerate(items)],
    }  # fmt: skip
    monkeypatch.setattr(ev, "mode_completions", lambda model, tok, tokens, its, mode, enc, **kw: scripted[mode])
    monkeypatch.setattr(ev.ModeTokens, "from_tokenizer", classmethod(lambda cls, tok, model=None: None))

    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": list(text)}

    m = ev.evaluate(None, Tok(), items, None, modes=(Mode.AUTO, Mode.NO_THINK, Mode.THINK))
    assert m["eval/think_rate_hard"] == 3 / 8 and m["eval/auto_skips_hard"] == 5 / 8
    assert m["eval/acc_no_think_when_auto_thinks_hard"] == 1 / 3  # items 0-2: only 0 right without thinking
    assert m["eval/acc_no_think_when_auto_skips_hard"] == 3 / 5  # items 3-7: 3, 4, 5 right
    assert m["eval/acc_think_when_auto_thinks_hard"] == 1.0 and m["eval/acc_think_when_auto_skips_hard"] == 4 / 5
    assert not any("when_auto" in k for k in ev.evaluate(None, Tok(), items, None, modes=(Mode.NO_THINK,)))
