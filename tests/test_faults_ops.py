"""Issue #12, ops part: each bad-input / fault case found against the ops, kept as a regression test. Every test
failed on the behaviour the issue reports (a token -1, a silent NaN, a gradient of 0, a dropped-but-counted token, a
20 GB buffer, a raw IndexError) and pins the defined result or the clear error now given."""

import math

import pytest
import torch
from conftest import kernel_backends

from r4b_fast.ops.fused_linear_logprobs import (
    MIN_TEMPERATURE,
    fused_linear_logprobs,
    fused_linear_policy_loss,
    logprobs_from_logits,
)
from r4b_fast.ops.group_advantages import group_advantages
from r4b_fast.ops.sampling import sample

HEAD_BACKENDS = [p for p in kernel_backends() if p.id != "cuda"]  # the fused LM head has no cuda backend


# ----------------------------------------------------------------------------------------------------------------
# Item 4: the sampler never returns an index outside [0, V), whatever check_values says
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend_device", kernel_backends())
@pytest.mark.parametrize("filters", [dict(), dict(top_k=5, top_p=0.9), dict(min_p=0.1)], ids=["plain", "topk-topp",
                                                                                              "minp"])
def test_sampler_rows_without_a_finite_logit_and_tiny_temperature(backend_device, filters):
    """All-NaN and all -inf rows give token 0 with a NaN log-prob (the documented flag); a temperature of 1e-39
    (1 / T overflows fp32) is the argmax with a finite log-prob; ordinary rows beside them are unaffected. Before:
    token -1 from the Triton kernel (a device assert on GPU) and V - 1 from the torch path."""
    backend, device = backend_device
    V = 37
    logits = torch.randn(5, V, generator=torch.Generator().manual_seed(3))
    logits[0] = float("nan")
    logits[1] = -float("inf")
    logits[3, :10] = -float("inf")  # a tiny temperature on a partly masked row
    temperature = torch.tensor([1.0, 1.0, 1e-39, 1e-39, 1.0])
    tokens, logprobs = sample(logits.to(device), temperature=temperature.to(device), backend=backend,
                              check_values=False, generator=torch.Generator().manual_seed(0), **filters)
    tokens, logprobs = tokens.cpu(), logprobs.cpu()
    assert ((tokens >= 0) & (tokens < V)).all(), tokens
    assert tokens[:2].tolist() == [0, 0] and logprobs[:2].isnan().all()
    assert tokens[2:4].tolist() == logits[2:4].argmax(1).tolist()
    assert torch.isfinite(logprobs[2:]).all()
    assert logprobs[2:4].tolist() == [0.0, 0.0]  # the argmax holds all the mass at T -> 0


# ----------------------------------------------------------------------------------------------------------------
# Item 5: fused_linear_policy_loss edge cases
# ----------------------------------------------------------------------------------------------------------------
def _policy_inputs(B=3, L=6, H=8, V=29, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(B, L, H, generator=gen)
    w = torch.randn(V, H, generator=gen) / math.sqrt(H)
    y = torch.randint(0, V, (B, L), generator=gen)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 4:] = False
    adv = torch.tensor([1.0, -0.5, 2.0])
    with torch.no_grad():
        base = torch.log_softmax(h @ w.T, -1).gather(-1, y[..., None]).squeeze(-1)
    old = base + 0.3 * torch.randn(B, L, generator=gen)
    ref = base + 0.2 * torch.randn(B, L, generator=gen)
    return h, w, y, adv, mask, old, ref


def _loss_and_grad(h, w, **kw):
    hh = h.clone().requires_grad_()
    loss, _ = fused_linear_policy_loss(hh, w, **kw)
    (g,) = torch.autograd.grad(loss, hh)
    return loss.detach(), g


@pytest.mark.parametrize("importance_level", ["token", "sequence"])
def test_old_ref_logprobs_and_advantages_that_require_grad_are_constants(importance_level):
    """old / ref log-probs and advantages computed from the policy's own graph (no ``torch.no_grad``): the gradient
    is that of their detached values, as TRL and verl detach them. Before: old_logprobs from the same forward made
    the ratio's two paths cancel, a gradient of exactly 0."""
    h, w, y, adv, mask, _, _ = _policy_inputs()
    B, L, H = h.shape
    noise = torch.randn(B, L, generator=torch.Generator().manual_seed(9))
    kw = dict(targets=y, mask=mask, beta=0.1, importance_level=importance_level)
    grads = []
    for detach in (True, False):
        hh = h.clone().requires_grad_()
        logp = fused_linear_logprobs(hh, w, y)  # the behaviour / reference policy's log-probs, graph attached
        old, ref = logp + 0.3 * noise, logp - 0.2 * noise
        a = adv + (hh.sum((1, 2)) - hh.sum((1, 2)).detach())  # adv's values, with a path to hh
        if detach:
            old, ref, a = old.detach(), ref.detach(), a.detach()
        loss, _ = fused_linear_policy_loss(hh, w, advantages=a, old_logprobs=old, ref_logprobs=ref, **kw)
        grads.append(torch.autograd.grad(loss, hh)[0])
    want, got = grads
    assert want.abs().sum() > 0
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_ignore_index_target_inside_the_mask_is_rejected(monkeypatch):
    """A -100 label where mask is 1: an error naming targets and the position. Before: the token was dropped from
    the log-probs but still counted in the means (ratio_mean 2.7e5)."""
    h, w, y, adv, mask, old, _ = _policy_inputs()
    y = y.clone()
    y[2, 1] = -100
    with pytest.raises(ValueError, match=r"targets: 1 value\(s\) outside \[0, V=29\) where mask is 1.*\(2, 1\)"):
        fused_linear_policy_loss(h.requires_grad_(), w, y, adv, mask, old_logprobs=old)
    # under torch.compile the boundary's value checks are skipped: the op's own range check still rejects it
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with pytest.raises(ValueError, match=r"targets: 1 value\(s\) outside \[0, V=29\)"):
        fused_linear_policy_loss(h, w, y, adv, mask, old_logprobs=old)
    # where mask is 0 any label (-100 included) is padding
    y[1, 5] = -100
    mask[2, 1] = False
    monkeypatch.undo()
    loss, metrics = fused_linear_policy_loss(h, w, y, adv, mask, old_logprobs=old)
    assert torch.isfinite(loss) and 0.5 < float(metrics["ratio_mean"]) < 2


@pytest.mark.parametrize("value", [0.0, float("nan"), -3.0, float("inf")])
def test_bad_tensor_normaliser_is_rejected(value):
    """Before: a tensor normaliser of 0 / NaN gave a NaN loss, a negative one a sign-flipped loss."""
    h, w, y, adv, mask, _, _ = _policy_inputs()
    with pytest.raises(ValueError, match="normaliser: expected a finite number > 0"):
        fused_linear_policy_loss(h.requires_grad_(), w, y, adv, mask, normaliser=torch.tensor(value))
    with pytest.raises(ValueError, match="normaliser: expected a finite number > 0"):
        fused_linear_policy_loss(h, w, y, adv, mask, normaliser=value)


def test_tensor_normaliser_equals_the_float_one():
    h, w, y, adv, mask, old, _ = _policy_inputs()
    want = _loss_and_grad(h, w, targets=y, advantages=adv, mask=mask, old_logprobs=old, normaliser=40.0)
    got = _loss_and_grad(h, w, targets=y, advantages=adv, mask=mask, old_logprobs=old, normaliser=torch.tensor(40))
    unnormalised = _loss_and_grad(h, w, targets=y, advantages=adv, mask=mask, old_logprobs=old)
    torch.testing.assert_close(got, want)
    n_tokens = int(mask.sum())
    torch.testing.assert_close(got[1] * 40, unnormalised[1] * n_tokens)


def test_float_targets_are_rejected():
    """Before: float targets were truncated to integers (3.7 -> token 3)."""
    h, w, y, adv, mask, _, _ = _policy_inputs()
    with pytest.raises(TypeError, match="targets: expected an integer tensor, got dtype torch.float32"):
        fused_linear_policy_loss(h, w, y.float() + 0.7, adv, mask)


@pytest.mark.parametrize("value", [0.5, float("nan"), 2.0, -1.0])
def test_mask_values_other_than_0_and_1_are_rejected(value):
    """Before: a mask of 0.5 or NaN (anything nonzero) acted as 1."""
    h, w, y, adv, mask, _, _ = _policy_inputs()
    loose = mask.float()
    loose[0, 3] = value
    with pytest.raises(ValueError, match=r"mask: 1 value\(s\) neither 0 nor 1.*\(0, 3\)"):
        fused_linear_policy_loss(h, w, y, adv, loose)


def test_float_and_integer_masks_equal_the_bool_mask():
    h, w, y, adv, mask, old, _ = _policy_inputs()
    want = _loss_and_grad(h, w, targets=y, advantages=adv, mask=mask, old_logprobs=old)
    for m in (mask.float(), mask.to(torch.int32), mask.bfloat16()):
        got = _loss_and_grad(h, w, targets=y, advantages=adv, mask=m, old_logprobs=old)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend_device", HEAD_BACKENDS)
def test_float64_lm_head_is_rejected_at_the_boundary(backend_device):
    """The epilogues (torch and Triton) compute in fp32, so float64 is refused before any work. Before: it passed
    validation and the backward crashed (scatter dtype mismatch) or was silently rounded to fp32."""
    backend, device = backend_device
    h, w, y, adv, mask, _, _ = _policy_inputs()
    h64, w64 = h.double().to(device).requires_grad_(), w.double().to(device)
    y, adv, mask = y.to(device), adv.to(device), mask.to(device)
    with pytest.raises(TypeError, match="hidden: dtype torch.float64 is not supported"):
        fused_linear_logprobs(h64.view(-1, 8), w64, y.view(-1), backend=backend)
    with pytest.raises(TypeError, match="hidden: dtype torch.float64 is not supported"):
        fused_linear_policy_loss(h64, w64, y, adv, mask, backend=backend)
    with torch.no_grad(), pytest.raises(TypeError, match="hidden: dtype torch.float64 is not supported"):
        fused_linear_policy_loss(h64, w64, y, adv, mask, backend=backend)


def test_logprobs_from_logits_computes_float64_in_float64():
    """Logits 1e8 and 1e8 + 1 differ only in float64: log_softmax gives log(1 / (1 + e)) exactly, fp32 log(1/2)."""
    logits = torch.tensor([[1e8, 1e8 + 1.0, -1e8]], dtype=torch.float64)
    logp, ent = logprobs_from_logits(logits, torch.tensor([0]), return_entropy=True)
    assert logp.dtype == torch.float64 and ent.dtype == torch.float64
    want = torch.log_softmax(torch.tensor([0.0, 1.0], dtype=torch.float64), 0)
    torch.testing.assert_close(logp, want[:1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ent, -(want.exp() * want).sum()[None], rtol=1e-12, atol=1e-12)
    assert logprobs_from_logits(logits.float(), torch.tensor([0])).dtype == torch.float32


@pytest.mark.parametrize("backend_device", HEAD_BACKENDS)
def test_entropy_precision_few_rows_large_vocabulary(backend_device):
    """R-4B's vocabulary (V = 152064) with 2..7 rows (the whole vocabulary in one chunk): the entropy's error vs a
    float64 reference is within 2x plain fp32 torch's (``-(p * log_softmax).sum()``). Before: 2.8e-4 nats against
    plain torch's 3-8e-5 (the row dot was one long naive sum)."""
    backend, device = backend_device
    V, H = 152064, 64
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(V, H, generator=gen) / math.sqrt(H)
    for T in range(2, 8):
        h = torch.randn(T, H, generator=gen) * (1 + T % 3)  # entropies from near log V down to a few nats
        y = torch.randint(0, V, (T,), generator=gen)
        logits = h @ w.T
        ref_ls = torch.log_softmax(logits.double(), -1)
        ref = -(ref_ls.exp() * ref_ls).sum(-1)
        ls = torch.log_softmax(logits, -1)
        plain_err = (-(ls.exp() * ls).sum(-1).double() - ref).abs().max().item()
        _, ent = fused_linear_logprobs(h.to(device), w.to(device), y.to(device), return_entropy=True,
                                       backend=backend)
        err = (ent.cpu().double() - ref).abs().max().item()
        assert err <= 2 * plain_err + 1e-7, (T, err, plain_err)


# ----------------------------------------------------------------------------------------------------------------
# Item 7: group ids, logprobs_from_logits' targets and names, temperatures
# ----------------------------------------------------------------------------------------------------------------
def test_sparse_group_ids_are_rejected_not_allocated():
    """Ids up to 10^6 for 4 rollouts: a clear error naming group_index and the relabelling. Before: buffers of
    max id + 1 groups (ids up to 1e8: 20 GB, 75 s)."""
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.25])
    ids = torch.tensor([10**6, 7, 10**6, 7])
    with pytest.raises(ValueError, match=r"group_index: largest id 1000000 for N = 4 rollouts.*torch.unique"):
        group_advantages(rewards, group_index=ids)
    with pytest.raises(ValueError, match=r"num_groups: 1000001 groups for N = 4 rollouts"):
        group_advantages(rewards, group_index=ids, num_groups=10**6 + 1)
    # the suggested relabelling gives the dense ids' result
    dense = torch.unique(ids, return_inverse=True)[1]
    assert dense.tolist() == [1, 0, 1, 0]
    out = group_advantages(rewards, group_index=dense)
    want = group_advantages(rewards[[1, 3, 0, 2]], group_size=2)
    torch.testing.assert_close(out.advantages, want.advantages[[2, 0, 3, 1]])
    torch.testing.assert_close(out.group_mean, torch.tensor([0.125, 0.75]))


@pytest.mark.parametrize("bad", [5, 7, -1, -100])
def test_logprobs_from_logits_out_of_range_target(bad):
    """Before: a raw IndexError from gather (a device assert on GPU)."""
    targets = torch.tensor([[0, 4], [bad, 1]])
    with pytest.raises(ValueError, match=rf"targets: 1 value\(s\) outside \[0, V=5\); first at index \(1, 0\) "
                                         rf"\({bad}\)"):
        logprobs_from_logits(torch.randn(2, 2, 5), targets)


def test_logprobs_from_logits_messages_name_its_own_arguments():
    """Before: its messages named ``hidden``, an argument it does not have."""
    logits = torch.randn(3, 5)
    cases = [
        (dict(targets=torch.zeros(2, dtype=torch.long)), r"targets: expected shape \(3,\) \(logits.shape\[:-1\]\)"),
        (dict(targets=torch.zeros(3, dtype=torch.long, device="meta")), "targets: on device meta, but logits is on"),
        (dict(targets=torch.zeros(3, dtype=torch.long), temperature=torch.ones(3, device="meta")),
         "temperature: on device meta, but logits is on"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError) as info:
            logprobs_from_logits(logits, **kw)
        assert "hidden" not in str(info.value)
        assert info.match(msg)


BAD_TEMPERATURES = [0.0, -1.0, float("nan"), float("inf"), 1e-38, 1e-39, MIN_TEMPERATURE / 2]


def _temperature_calls(temperature):
    """The three fused log-prob ops with the same temperature (float, or a tensor of that value per row)."""
    gen = torch.Generator().manual_seed(1)
    h, w = torch.randn(2, 3, 8, generator=gen), torch.randn(11, 8, generator=gen)
    y = torch.randint(0, 11, (2, 3), generator=gen)
    temp = (lambda shape: torch.full(shape, temperature)) if isinstance(temperature, torch.Tensor) else (
        lambda shape: temperature)
    return {
        "logprobs_from_logits": lambda: logprobs_from_logits(h @ w.T, y, temperature=temp((2, 3)), return_entropy=True),
        "fused_linear_logprobs": lambda: fused_linear_logprobs(h, w, y, temperature=temp((2, 3)), return_entropy=True),
        "fused_linear_policy_loss": lambda: fused_linear_policy_loss(
            h.clone().requires_grad_(), w, y, torch.tensor([1.0, -1.0]), torch.ones(2, 3, dtype=torch.bool),
            temperature=temp((2, 3)))[0],
    }


@pytest.mark.parametrize("as_tensor", [False, True], ids=["float", "tensor"])
@pytest.mark.parametrize("temperature", BAD_TEMPERATURES)
def test_bad_temperatures_are_rejected_by_every_fused_op(temperature, as_tensor):
    """One rule for all three ops: finite and >= MIN_TEMPERATURE. Before: a tensor temperature of 0, negative or
    NaN gave NaN silently in logprobs_from_logits; 1e-38 passed every op's ``> 0`` check and gave NaN."""
    t = torch.tensor(temperature) if as_tensor else temperature
    for name, call in _temperature_calls(t).items():
        with pytest.raises(ValueError, match="temperature: .*MIN_TEMPERATURE") as info:
            call()
        assert info.type is ValueError, name


def test_smallest_accepted_temperature_gives_finite_results():
    for as_tensor in (False, True):
        t = torch.tensor(MIN_TEMPERATURE) if as_tensor else MIN_TEMPERATURE
        for name, call in _temperature_calls(t).items():
            out = call()
            for o in out if isinstance(out, tuple) else (out,):
                assert torch.isfinite(o).all(), name



# ----------------------------------------------------------------------------------------------------------------
# Issue #22 item 6: non-finite hidden states at ignored positions; old / ref log-probs above 0
# ----------------------------------------------------------------------------------------------------------------
def _grads_of(fn, *leaves):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*leaves)
    return out.detach(), torch.autograd.grad(out, leaves)


def _assert_finite_and_equal(got, want):
    (value, grads), (want_value, want_grads) = got, want
    assert torch.isfinite(value).all()
    torch.testing.assert_close(value, want_value, rtol=0, atol=0)
    for g, wg in zip(grads, want_grads):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, wg, rtol=0, atol=0)


@pytest.mark.parametrize("backend_device", HEAD_BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nonfinite_hidden_at_ignored_rows_reaches_no_gradient_logprobs(backend_device, bad, monkeypatch):
    """fused_linear_logprobs: a NaN / +inf hidden state where the target is ``ignore_index``, over several chunks,
    gives finite log-probs, entropies and gradients equal to the same call with those rows zeroed. Before: 0 * NaN
    in the dWeight GEMM made the whole weight.grad (and bias.grad) NaN."""
    from r4b_fast.ops.lm_head import driver

    backend, device = backend_device
    T, H, V = 23, 8, 37
    monkeypatch.setattr(driver, "CHUNK_ELEMENTS", {"cpu": 4 * V, "cuda": 4 * V})  # 6 chunks
    gen = torch.Generator().manual_seed(7)
    h = torch.randn(T, H, generator=gen)
    w, b = torch.randn(V, H, generator=gen) / math.sqrt(H), torch.randn(V, generator=gen)
    y = torch.randint(0, V, (T,), generator=gen)
    ignored = torch.zeros(T, dtype=torch.bool)
    ignored[[0, 5, 6, 17, 22]] = True
    y[ignored] = -100
    g_lp, g_en = torch.randn(T, generator=gen), torch.randn(T, generator=gen)
    h, w, b, y, ignored, g_lp, g_en = (t.to(device) for t in (h, w, b, y, ignored, g_lp, g_en))

    def call(hh, ww, bb):
        lp, en = fused_linear_logprobs(hh, ww, y, bias=bb, return_entropy=True, backend=backend)
        return (lp * g_lp).sum() + (en * g_en).sum()

    zeroed = torch.where(ignored[:, None], 0.0, h)
    poisoned = torch.where(ignored[:, None], bad, h)
    poisoned[5, 3] = 1.0  # a row with one bad value among finite ones
    _assert_finite_and_equal(_grads_of(call, poisoned, w, b), _grads_of(call, zeroed, w, b))


@pytest.mark.parametrize("backend_device", HEAD_BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("importance_level", ["token", "sequence"])
def test_nonfinite_hidden_at_masked_positions_reaches_no_gradient_policy_loss(backend_device, bad, importance_level):
    """fused_linear_policy_loss: NaN / +inf hidden states where ``mask`` is 0 (padding), on the fused-gradient path
    (token level) and the recomputing one (GSPO): loss and gradients finite and equal to the call with those rows
    zeroed. Before: the weight's gradient was all NaN."""
    backend, device = backend_device
    h, w, y, adv, mask, old, ref = (t.to(device) for t in _policy_inputs())
    mask = mask.clone()
    mask[0, 2] = False
    kw = dict(targets=y, advantages=adv, mask=mask, old_logprobs=old, ref_logprobs=ref, beta=0.05, entropy_coef=0.01,
              importance_level=importance_level, backend=backend)

    def call(hh, ww):
        return fused_linear_policy_loss(hh, ww, **kw)[0]

    zeroed = torch.where(mask[..., None], h, 0.0)
    poisoned = torch.where(mask[..., None], h, bad)
    _assert_finite_and_equal(_grads_of(call, poisoned, w), _grads_of(call, zeroed, w))


@pytest.mark.parametrize("name", ["old_logprobs", "ref_logprobs"])
def test_logprobs_above_zero_are_rejected(name):
    """A log-probability above 0 (beyond 1e-4 of rounding) where mask is 1 is an error naming the argument and the
    position: a probability above 1 is a bug upstream (a sign flip, logits passed as log-probs). Before: accepted,
    a ratio exp(logp - old) silently off."""
    h, w, y, adv, mask, old, ref = _policy_inputs()
    kw = dict(old_logprobs=old, ref_logprobs=ref, beta=0.1)
    bad = kw[name].clone()
    bad[2, 3] = 0.5
    with pytest.raises(ValueError, match=rf"{name}: 1 value\(s\) above 0 where mask is 1.*\(2, 3\)"):
        fused_linear_policy_loss(h, w, y, adv, mask, **{**kw, name: bad})
    with pytest.raises(ValueError, match=rf"{name}: 1 value\(s\) above 0"):
        fused_linear_policy_loss(h.requires_grad_(), w, y, adv, mask, **{**kw, name: bad})
    # rounding above 0 is accepted; where mask is 0 anything finite is (padding)
    ok = kw[name].clone()
    ok[2, 3] = 5e-5
    ok[1, 5] = 7.0  # mask[1, 4:] is 0
    loss, _ = fused_linear_policy_loss(h, w, y, adv, mask, **{**kw, name: ok})
    assert torch.isfinite(loss)
