"""fused_linear_logprobs / logprobs_from_logits / fused_linear_policy_loss: every backend against eager references
that materialise the logits, gradients by autograd, bf16 numerics, the policy-loss formulas written out in loops,
bad input, torch.compile, and the torch backend's memory."""

import dataclasses
import math

import pytest
import torch
from conftest import DEVICE, kernel_backends

from r4b_fast.backends import BackendUnavailableError
from r4b_fast.ops import fused_linear_logprobs as flp
from r4b_fast.ops.fused_linear_logprobs import (
    AGGREGATIONS,
    PolicyLoss,
    fused_linear_logprobs,
    fused_linear_logprobs_ref,
    fused_linear_policy_loss,
    logprob_mismatch,
    logprobs_from_logits,
    rollout_importance_weights,
)
from r4b_fast.ops.lm_head import driver, epilogues

BACKENDS = [p for p in kernel_backends() if p.id != "cuda"]  # no cuda backend for this op (see the module docstring)


def _data(T, H, V, *, seed=0, dtype=torch.float32, bias=True, scale=1.0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(T, H, generator=gen) * scale).to(dtype)
    w = (torch.randn(V, H, generator=gen) / math.sqrt(H)).to(dtype)
    b = (torch.randn(V, generator=gen) * 0.5).to(dtype) if bias else None
    y = torch.randint(0, V, (T,), generator=gen)
    y[::5] = -100  # some ignored rows
    temp = torch.rand(T, generator=gen) + 0.5
    g_lp, g_en = torch.randn(T, generator=gen), torch.randn(T, generator=gen)
    mv = lambda t: None if t is None else t.to(device)  # noqa: E731
    return mv(h), mv(w), mv(b), mv(y), mv(temp), mv(g_lp), mv(g_en)


def _values_and_grads(fn, h, w, b, with_entropy, g_lp, g_en):
    leaves = [t.detach().clone().requires_grad_() for t in (h, w) + ((b,) if b is not None else ())]
    out = fn(*leaves)
    lp, en = out
    total = (lp * g_lp).sum() + ((en * g_en).sum() if with_entropy else 0)
    grads = torch.autograd.grad(total, leaves)
    return lp.detach(), en.detach(), grads


# (33, 16, 9001): three 4096-wide vocabulary slices in the Triton epilogues, several token chunks below
SHAPES = [(1, 8, 1), (7, 16, 31), (129, 8, 31), (7, 32, 64), (33, 16, 9001), (129, 4, 32007)]


def _several_chunks(monkeypatch, T, V):
    """Chunks of about T / 7 rows (ragged last one) on every device, torch epilogue slices of 3 rows."""
    rows = max(1, T // 7)
    monkeypatch.setattr(driver, "CHUNK_ELEMENTS", {"cpu": rows * V, "cuda": rows * V})
    monkeypatch.setattr(epilogues, "EPILOGUE_ELEMENTS", 3 * V)


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("T,H,V", SHAPES)
@pytest.mark.parametrize("with_entropy", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_reference_values_and_grads(backend_device, T, H, V, with_entropy, with_bias, monkeypatch):
    backend, device = backend_device
    if backend == "triton" and DEVICE == "cpu" and T * V > 400_000:
        pytest.skip("interpreted Triton: small shapes only")
    _several_chunks(monkeypatch, T, V)
    h, w, b, y, temp, g_lp, g_en = _data(T, H, V, seed=T * 7 + V, bias=with_bias, device=device)

    def ours(hh, ww, bb=None):
        return fused_linear_logprobs(hh, ww, y, bias=bb, temperature=temp, return_entropy=True, backend=backend)

    def ref(hh, ww, bb=None):
        return fused_linear_logprobs_ref(hh.double(), ww.double(), y, bias=None if bb is None else bb.double(),
                                         temperature=temp)

    lp, en, grads = _values_and_grads(ours, h, w, b, with_entropy, g_lp, g_en)
    rlp, ren, rgrads = _values_and_grads(
        lambda *a: tuple(o.double() for o in ref(*a)), h, w, b, with_entropy, g_lp.double(), g_en.double())
    assert lp.dtype == torch.float32 and lp.shape == (T,)
    ignored = y == -100
    assert (lp[ignored] == 0).all() and (en[ignored] == 0).all()
    torch.testing.assert_close(lp.double(), rlp, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(en.double(), ren, rtol=1e-5, atol=2e-5)
    for name, g, rg in zip(("hidden", "weight", "bias"), grads, rgrads):
        assert g.dtype == torch.float32, name
        torch.testing.assert_close(g.double(), rg.double(), rtol=1e-4, atol=2e-5, msg=name)
    # ignored rows get no gradient
    assert (grads[0][ignored] == 0).all()


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_leading_dims_scalar_temperature_no_bias(backend_device):
    backend, device = backend_device
    h, w, _, y, _, _, _ = _data(12, 16, 48, bias=False, device=device)
    h3, y3 = h.view(3, 4, 16), y.view(3, 4)
    lp = fused_linear_logprobs(h3, w, y3, temperature=0.7, backend=backend)
    rlp, _ = fused_linear_logprobs_ref(h, w, y, temperature=0.7)
    assert lp.shape == (3, 4)
    torch.testing.assert_close(lp.reshape(-1), rlp, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_all_negative_and_huge_logits(backend_device):
    backend, device = backend_device
    h, w, b, y, _, _, _ = _data(7, 16, 40, device=device)
    for shift in (-1e4, 1e4):
        bb = b + shift  # every logit ~ shift: a naive exp over- or underflows
        lp, en = fused_linear_logprobs(h, w, y, bias=bb, return_entropy=True, backend=backend)
        rlp, ren = (o.double() for o in fused_linear_logprobs_ref(h.double(), w.double(), y, bias=b.double()))
        assert torch.isfinite(lp).all() and torch.isfinite(en).all()
        torch.testing.assert_close(lp.double(), rlp, rtol=1e-3, atol=5e-3)  # fp32 logits of 1e4 carry ~1e-3 error
        torch.testing.assert_close(en.double(), ren, rtol=1e-3, atol=5e-3)


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss", ["logprobs", "policy"])
def test_low_precision_within_twice_eager_error(backend_device, dtype, loss, monkeypatch):
    """16-bit inputs through every backend (the Triton epilogues read and write 16-bit chunks natively): values and
    gradients within 2x eager's own error vs an fp64 reference, for the per-token op (recomputing backward) and the
    policy loss (gradients formed in the forward, dWeight accumulated over several chunks in the input dtype)."""
    backend, device = backend_device
    T, H, V = 129, 64, 5001  # two vocabulary slices in the Triton epilogues
    _several_chunks(monkeypatch, T, V)
    h, w, b, y, temp, g_lp, g_en = _data(T, H, V, dtype=dtype, scale=2.0, device=device)
    valid = y != -100
    y_safe = y.clamp_min(0)
    adv = torch.randn(T, generator=torch.Generator().manual_seed(4)).to(device)

    def head_out(hh, ww, bb):
        if loss == "logprobs":
            return fused_linear_logprobs(hh, ww, y, bias=bb, temperature=temp, return_entropy=True, backend=backend)
        out, _ = fused_linear_policy_loss(hh, ww, y_safe[None], adv[None], valid[None], bias=bb,
                                          temperature=temp[None], entropy_coef=0.1, backend=backend)
        return out, out

    def from_logits(logits):
        logsm = torch.log_softmax(logits / temp[:, None].to(logits.dtype), -1)
        lp = torch.where(valid, logsm.gather(1, y_safe[:, None]).squeeze(1), 0.0)
        en = torch.where(valid, -(logsm.exp() * logsm).sum(-1), 0.0)
        if loss == "logprobs":
            return lp, en
        out = ((-adv * torch.exp(lp - lp.detach()) - 0.1 * en) * valid).sum() / valid.sum()
        return out, out

    def eager(hh, ww, bb):  # what a trainer does in 16 bits: 16-bit logits, log_softmax in fp32
        return from_logits(torch.addmm(bb, hh, ww.T).float())

    def ref(hh, ww, bb):
        return from_logits(hh.double() @ ww.double().T + bb.double())

    def run(fn):
        if loss == "logprobs":
            return _values_and_grads(fn, h, w, b, True, g_lp, g_en)
        leaves = [t.detach().clone().requires_grad_() for t in (h, w, b)]
        out = fn(*leaves)[0]
        return out.detach(), out.detach(), torch.autograd.grad(out, leaves)

    res = {name: run(fn) for name, fn in (("ours", head_out), ("eager", eager), ("ref", ref))}

    def err(a, r):
        return (a.double() - r.double()).abs().max().item()

    for i, what in ((0, "logprobs / loss"), (1, "entropy / loss")):
        e_ours, e_eager = err(res["ours"][i], res["ref"][i]), err(res["eager"][i], res["ref"][i])
        assert e_ours <= 2 * e_eager + 1e-3, (what, e_ours, e_eager)
    for j, what in enumerate(("d hidden", "d weight", "d bias")):
        g_ref = res["ref"][2][j]
        e_ours, e_eager = err(res["ours"][2][j], g_ref), err(res["eager"][2][j], g_ref)
        assert res["ours"][2][j].dtype == dtype
        assert e_ours <= 2 * e_eager + 1e-3 * g_ref.abs().max().item(), (what, e_ours, e_eager)


def test_autocast_runs_the_head_in_the_autocast_dtype():
    """Under torch.autocast(bf16) fp32 hidden/weight give exactly what explicitly cast bf16 inputs give (as
    nn.Linear would), and the gradients reach the fp32 tensors in fp32; outside autocast nothing is cast."""
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(37, 32, generator=gen, requires_grad=True)
    w = torch.randn(301, 32, generator=gen, requires_grad=True)
    y = torch.randint(0, 301, (37,), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = fused_linear_logprobs(h, w, y, backend="torch")
        loss, _ = fused_linear_policy_loss(h.view(1, 37, 32), w, y.view(1, 37), torch.ones(1), torch.ones(1, 37))
    lp.sum().backward()
    hb, wb = h.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_()
    lp_b = fused_linear_logprobs(hb, wb, y, backend="torch")
    lp_b.sum().backward()
    torch.testing.assert_close(lp, lp_b, rtol=0, atol=0)
    assert h.grad.dtype == w.grad.dtype == torch.float32
    torch.testing.assert_close(h.grad, hb.grad.float(), rtol=0, atol=0)
    torch.testing.assert_close(w.grad, wb.grad.float(), rtol=0, atol=0)
    fp32 = fused_linear_logprobs(h.detach(), w.detach(), y, backend="torch")
    assert (fp32 - lp.detach()).abs().max() > 0  # the cast did happen (bf16 rounding differs from fp32)
    assert torch.isfinite(loss)


# ----------------------------------------------------------------------------------------------------------------
# logprobs_from_logits
# ----------------------------------------------------------------------------------------------------------------
def test_logprobs_from_logits_matches_reference():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 33, generator=gen) * 3 - 50  # all negative
    y = torch.randint(0, 33, (2, 5), generator=gen)
    temp = torch.rand(2, 5, generator=gen) + 0.5
    lp, en = logprobs_from_logits(logits, y, temperature=temp, return_entropy=True)
    ref = torch.log_softmax(logits.double() / temp.double()[..., None], -1)
    torch.testing.assert_close(lp.double(), ref.gather(-1, y[..., None]).squeeze(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(en.double(), -(ref.exp() * ref).sum(-1), rtol=1e-5, atol=1e-5)
    lp16 = logprobs_from_logits(logits.bfloat16(), y, temperature=2.0)
    assert lp16.dtype == torch.float32
    compiled = torch.compile(logprobs_from_logits, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(logits, y, temperature=temp), lp)


# ----------------------------------------------------------------------------------------------------------------
# Policy loss: the formulas written out token by token
# ----------------------------------------------------------------------------------------------------------------
def _aggregate(tok_loss, aggregation, normaliser, max_length):
    """verl's agg_loss over a [B][L] list of per-token losses (None: not a token)."""
    all_toks = [x for row in tok_loss for x in row if x is not None]
    if aggregation == "token-mean":
        return sum(all_toks) / (normaliser if normaliser is not None else max(len(all_toks), 1))
    per_seq = []
    for row in tok_loss:
        toks = [x for x in row if x is not None]
        if not toks:
            continue
        if aggregation == "seq-mean-token-mean":
            per_seq.append(sum(toks) / len(toks))
        elif aggregation == "seq-mean-token-sum":
            per_seq.append(sum(toks))
        else:
            per_seq.append(sum(toks) / max_length)
    return sum(per_seq) / (normaliser if normaliser is not None else max(len(per_seq), 1))


def _loop_policy_loss(logp, ent, adv, mask, old, ref, *, beta, clip_low, clip_high, dual_clip, entropy_coef,
                      aggregation, normaliser, max_length, importance_level, rollout_is_weights=None,
                      log_ratio_clamp=None, kl_log_ratio_clamp=None, kl_clamp=None, entropy_aggregation=None):
    B, L = logp.shape
    lo, hi = (-log_ratio_clamp, log_ratio_clamp) if isinstance(log_ratio_clamp, float) else (log_ratio_clamp or
                                                                                           (None, None))
    ent_loss = [[None] * L for _ in range(B)]
    tok_loss = [[None] * L for _ in range(B)]
    n_low = n_high = n_dual = 0
    kl_sum = ratio_sum = ent_sum = 0.0
    n_tok = 0
    for i in range(B):
        toks = [t for t in range(L) if mask[i, t]]
        if importance_level == "sequence" and toks:
            s = sum((logp[i, t] - old[i, t]) for t in toks) / len(toks)
        for t in toks:
            a = float(adv[i] if adv.dim() == 1 else adv[i, t])
            if importance_level == "token":
                log_ratio = logp[i, t] - old[i, t]
            else:  # GSPO: sg[s_i] * pi / sg[pi]
                log_ratio = s.detach() + logp[i, t] - logp[i, t].detach()
            if lo is not None or hi is not None:
                log_ratio = torch.clamp(log_ratio, None if lo == -math.inf else lo, None if hi == math.inf else hi)
            ratio = torch.exp(log_ratio)
            clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
            loss = torch.maximum(-a * ratio, -a * clipped)
            if dual_clip is not None and a < 0:
                if float(loss.detach()) > -a * dual_clip:
                    n_dual += 1
                loss = torch.minimum(loss, torch.tensor(-a * dual_clip, dtype=loss.dtype))
            if rollout_is_weights is not None:
                w_is = rollout_is_weights[i] if rollout_is_weights.dim() == 1 else rollout_is_weights[i, t]
                loss = loss * float(w_is)
            r = float(ratio.detach())
            n_low += int(a < 0 and r < 1 - clip_low)
            n_high += int(a > 0 and r > 1 + clip_high)
            if ref is not None:
                d = ref[i, t] - logp[i, t]
                if kl_log_ratio_clamp is not None:
                    d = torch.clamp(d, -kl_log_ratio_clamp, kl_log_ratio_clamp)
                kl = torch.exp(d) - d - 1
                if kl_clamp is not None:
                    kl = torch.clamp(kl, -kl_clamp, kl_clamp)
                kl_sum += float(kl.detach())
                loss = loss + beta * kl
            if entropy_aggregation is None:
                loss = loss - entropy_coef * ent[i, t]
            else:
                ent_loss[i][t] = ent[i, t]
            tok_loss[i][t] = loss
            ratio_sum += r
            ent_sum += float(ent[i, t].detach())
            n_tok += 1
    total = _aggregate(tok_loss, aggregation, normaliser, max_length)
    if entropy_aggregation is not None:  # TRL-style: its own aggregation over these tokens, no normaliser
        total = total - entropy_coef * _aggregate(ent_loss, entropy_aggregation, None, max_length)
    n = max(n_tok, 1)
    metrics = dict(kl=kl_sum / n, clip_frac_low=n_low / n, clip_frac_high=n_high / n, dual_clip_frac=n_dual / n,
                   ratio_mean=ratio_sum / n, entropy_mean=ent_sum / n)
    return total, metrics


def _policy_case(seed, B=3, L=6, H=8, V=29, per_token_adv=False):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(B, L, H, generator=gen)
    w = torch.randn(V, H, generator=gen) / math.sqrt(H)
    y = torch.randint(0, V, (B, L), generator=gen)
    mask = torch.rand(B, L, generator=gen) < 0.7
    mask[0, 0] = True
    mask[-1] = False  # an empty sequence
    y[~mask] = -1  # padding targets may be anything
    adv = torch.randn(B, L, generator=gen) if per_token_adv else torch.randn(B, generator=gen)
    with torch.no_grad():
        logsm = torch.log_softmax(h @ w.T, -1)
        base = logsm.gather(-1, y.clamp_min(0)[..., None]).squeeze(-1)
    old = base + 0.4 * torch.randn(B, L, generator=gen)  # ratios spread over the clip range
    ref = base + 0.3 * torch.randn(B, L, generator=gen)
    return h, w, y, adv, mask, old, ref


POLICY_CASES = [
    dict(aggregation=a, importance_level="token") for a in AGGREGATIONS
] + [
    # DAPO-ish: clip-higher, dual clip, KL and entropy bonus
    dict(aggregation="token-mean", dual_clip=1.05, clip_high=0.28, beta=0.05, entropy_coef=0.01, per_token_adv=True),
    dict(aggregation="seq-mean-token-mean", importance_level="sequence", clip_low=3e-4, clip_high=4e-4),  # GSPO
    dict(aggregation="seq-mean-token-mean", importance_level="sequence", beta=0.1),
    dict(aggregation="token-mean", normaliser=37.0, beta=0.1, per_token_adv=True),
    dict(aggregation="seq-mean-token-sum-norm", max_length=16, normaliser=5.0, entropy_coef=0.1),
    dict(aggregation="seq-mean-token-mean", on_policy=True, beta=0.04),
    # rollout importance weights (per token / per sequence), verl's clamps, TRL's token-mean entropy bonus
    dict(aggregation="token-mean", rollout_is_weights="token", beta=0.05, dual_clip=1.05, per_token_adv=True),
    dict(aggregation="seq-mean-token-mean", rollout_is_weights="sequence", entropy_coef=0.02),
    dict(aggregation="seq-mean-token-mean", importance_level="sequence", rollout_is_weights="token",
         log_ratio_clamp=(-math.inf, 0.05)),
    dict(aggregation="token-mean", log_ratio_clamp=0.3, kl_log_ratio_clamp=0.25, kl_clamp=0.02, beta=0.5,
         per_token_adv=True, dual_clip=1.05),
    dict(aggregation="seq-mean-token-sum-norm", max_length=9, normaliser=4.0, entropy_coef=0.3,
         entropy_aggregation="token-mean", rollout_is_weights="token"),
]


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("case", POLICY_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_policy_loss_matches_loop_formulas(case, backend_device):
    """Loss, gradients (formed in the forward for token-level ratios, recomputed for GSPO) and metrics against the
    formulas written out token by token over an fp64 eager LM head."""
    backend, device = backend_device
    case = dict(case)
    on_policy = case.pop("on_policy", False)
    h, w, y, adv, mask, old, ref = _policy_case(11, per_token_adv=case.pop("per_token_adv", False))
    if "rollout_is_weights" in case:  # weights in [0, 2], 0 for some tokens; [B] for the sequence level
        shape = (y.shape[0],) if case["rollout_is_weights"] == "sequence" else y.shape
        case["rollout_is_weights"] = torch.rand(shape, generator=torch.Generator().manual_seed(3)) * 2
        case["rollout_is_weights"].view(-1)[1] = 0.0
    kw = dict(beta=0.0, clip_low=0.2, clip_high=0.2, dual_clip=None, entropy_coef=0.0, aggregation="token-mean",
              normaliser=None, max_length=None, importance_level="token")
    kw.update(case)
    use_ref = kw["beta"] != 0 or case.get("importance_level") == "sequence"
    hh, ww = h.clone().to(device).requires_grad_(), w.clone().to(device).requires_grad_()
    on = lambda t: t.to(device)  # noqa: E731
    op_kw = {k: on(v) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    loss, metrics = fused_linear_policy_loss(hh, ww, on(y), on(adv), on(mask),
                                             old_logprobs=None if on_policy else on(old),
                                             ref_logprobs=on(ref) if use_ref else None, backend=backend, **op_kw)
    gh, gw = (g.cpu() for g in torch.autograd.grad(loss, (hh, ww)))
    loss = loss.cpu()
    metrics = {k: v.cpu() for k, v in metrics.items()}

    h2, w2 = h.double().requires_grad_(), w.double().requires_grad_()
    logsm = torch.log_softmax(h2 @ w2.T, -1)
    logp = logsm.gather(-1, y.clamp_min(0)[..., None]).squeeze(-1)
    ent = -(logsm.exp() * logsm).sum(-1)
    old_used = logp.detach() if on_policy else old.double()
    loop_kw = dict(kw, max_length=kw["max_length"] or y.shape[1])
    total, ref_metrics = _loop_policy_loss(logp, ent, adv.double(), mask, old_used,
                                           ref.double() if use_ref else None, **loop_kw)
    rgh, rgw = torch.autograd.grad(total, (h2, w2))
    torch.testing.assert_close(loss.double(), total.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh.double(), rgh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw.double(), rgw, rtol=1e-4, atol=1e-6)
    for k, v in ref_metrics.items():
        if k == "kl" and not use_ref:
            continue
        assert metrics[k].dim() == 0
        assert abs(float(metrics[k]) - v) < 1e-5, (k, float(metrics[k]), v)
    if not on_policy and case.get("importance_level") != "sequence":
        assert float(metrics["clip_frac_low"]) + float(metrics["clip_frac_high"]) > 0  # the case exercises clipping
    if case.get("dual_clip"):
        assert float(metrics["dual_clip_frac"]) > 0
    options = ("rollout_is_weights", "log_ratio_clamp", "kl_log_ratio_clamp", "kl_clamp", "entropy_aggregation")
    if any(k in case for k in options):  # the case's options change the gradient: they are exercised
        plain = {k: v for k, v in op_kw.items() if k not in options}
        loss0, _ = fused_linear_policy_loss(hh, ww, on(y), on(adv), on(mask),
                                            old_logprobs=None if on_policy else on(old),
                                            ref_logprobs=on(ref) if use_ref else None, backend=backend, **plain)
        assert not torch.allclose(torch.autograd.grad(loss0, hh)[0].cpu(), gh, rtol=1e-3, atol=1e-5)
    if "rollout_is_weights" in case:
        is_w = case["rollout_is_weights"]
        is_w = (is_w[:, None] if is_w.dim() == 1 else is_w).expand(mask.shape)
        assert float(metrics["rollout_is_mean"]) == pytest.approx(float(is_w[mask].mean()), rel=1e-5)


def test_policy_loss_on_policy_ratio_is_one_and_grad_is_pg():
    h, w, y, adv, mask, _, _ = _policy_case(5)
    hh = h.clone().requires_grad_()
    loss, metrics = fused_linear_policy_loss(hh, w, y, adv, mask)
    assert float(metrics["ratio_mean"]) == pytest.approx(1.0)
    assert float(metrics["clip_frac_low"]) == 0 and float(metrics["clip_frac_high"]) == 0
    loss.backward()
    assert hh.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------------
# Rollout importance weights and mismatch metrics
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_rollout_is_weights_several_chunks_match_eager(backend_device, level, monkeypatch):
    """Weights from rollout_importance_weights, the fused gradients over several token chunks (and epilogue slices)
    against autograd over materialised fp64 logits with the weights multiplied into the clipped term."""
    backend, device = backend_device
    B, L, H, V = 4, 9, 16, 67
    _several_chunks(monkeypatch, B * L, V)
    gen = torch.Generator().manual_seed(7)
    h, w = torch.randn(B, L, H, generator=gen), torch.randn(V, H, generator=gen) / 4
    y = torch.randint(0, V, (B, L), generator=gen)
    mask = torch.rand(B, L, generator=gen) < 0.8
    adv = torch.randn(B, L, generator=gen)
    with torch.no_grad():
        base = torch.log_softmax(h @ w.T, -1).gather(-1, y[..., None]).squeeze(-1)
    old = base + 0.3 * torch.randn(B, L, generator=gen)  # the trainer's old log-probs
    rollout = old + 0.4 * torch.randn(B, L, generator=gen)  # a rollout engine that disagrees with it
    ref = base + 0.2 * torch.randn(B, L, generator=gen)
    is_w = rollout_importance_weights(old, rollout, mask, cap=1.3 if level == "token" else 2.0, level=level)
    assert (is_w == is_w.max()).sum() > 1 and (is_w[mask] < 1).any()  # truncation active, weights below 1 too
    kw = dict(old_logprobs=old, ref_logprobs=ref, beta=0.1, clip_low=0.2, clip_high=0.28, dual_clip=2.0,
              entropy_coef=0.01, aggregation="seq-mean-token-mean")
    on = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
    hh, ww = h.clone().to(device).requires_grad_(), w.clone().to(device).requires_grad_()
    loss, _ = fused_linear_policy_loss(hh, ww, on(y), on(adv), on(mask), rollout_is_weights=on(is_w),
                                       backend=backend, **{k: on(v) for k, v in kw.items()})
    gh, gw = (g.cpu().double() for g in torch.autograd.grad(loss, (hh, ww)))

    h2, w2 = h.double().requires_grad_(), w.double().requires_grad_()
    logsm = torch.log_softmax(h2 @ w2.T, -1)
    logp = logsm.gather(-1, y[..., None]).squeeze(-1)
    ent = -(logsm.exp() * logsm).sum(-1)
    ratio = torch.exp(logp - old.double())
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.28))
    pg = torch.where(adv < 0, torch.minimum(pg, -adv * 2.0), pg) * is_w.double()
    d = ref.double() - logp
    tok = pg + 0.1 * (torch.exp(d) - d - 1) - 0.01 * ent
    m = mask.double()
    total = ((tok * m).sum(-1) / m.sum(-1)).mean()
    rgh, rgw = torch.autograd.grad(total, (h2, w2))
    torch.testing.assert_close(loss.cpu().double(), total.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh, rgh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw, rgw, rtol=1e-4, atol=1e-6)


def test_rollout_importance_weights_values():
    old = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-1.0, -40.0, -1.0, 0.0]])
    rollout = torch.tensor([[-1.5, -2.0, -3.0, float("nan")], [-0.9, -1.0, -1.2, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]])  # NaN where masked out: ignored
    tok = rollout_importance_weights(old, rollout, mask, cap=2.0)
    expect = torch.tensor([[math.exp(0.5), 1.0, 2.0, 0.0], [math.exp(-0.1), math.exp(-20.0), math.exp(0.2), 0.0]])
    torch.testing.assert_close(tok, expect)  # -39 clamped to -20 (verl's SAFETY_BOUND), 2.5 truncated to cap 2
    seq = rollout_importance_weights(old, rollout, mask, cap=None, level="sequence")
    expect = torch.tensor([[math.exp(3.0)] * 3 + [0.0], [math.exp(-20.0)] * 3 + [0.0]])  # sums 3.0 and -38.9
    torch.testing.assert_close(seq, expect)
    assert not tok.requires_grad
    assert rollout_importance_weights(old, rollout, mask.bool(), cap=1.0, level="sequence")[0, 0] == 1.0


def test_logprob_mismatch_values():
    train = torch.tensor([[-1.0, -2.0, 5.0], [-0.3, -0.2, -0.1]], dtype=torch.float64)
    rollout = torch.tensor([[-1.5, -2.0, float("inf")], [-0.3, -0.2 - 1e-6, -0.1]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    m = logprob_mismatch(train, rollout, mask)
    d = torch.tensor([0.5, 0.0, 0.0, 1e-6, 0.0], dtype=torch.float64)
    assert float(m["mismatch/abs_mean"]) == pytest.approx(float(d.abs().mean()), rel=1e-6)
    assert float(m["mismatch/abs_max"]) == pytest.approx(0.5)
    k3 = (math.exp(0.5) - 1.5 + (math.exp(1e-6) - 1e-6 - 1)) / 5
    assert float(m["mismatch/k3"]) == pytest.approx(k3, rel=1e-6)
    tiny = logprob_mismatch(torch.tensor([[-1.0]]), torch.tensor([[-1.0 - 2**-20]]), torch.ones(1, 1))
    assert float(tiny["mismatch/k3"]) == pytest.approx(2.0**-41, rel=1e-3)  # expm1 in float64: no fp32 noise
    empty = logprob_mismatch(train, rollout, torch.zeros(2, 3))
    assert all(float(v) == 0 for v in empty.values())


def test_bad_input_rollout_options():
    h, w, y, adv, mask, old, ref = _policy_case(1)
    call = lambda **kw: fused_linear_policy_loss(**{**dict(hidden=h, weight=w, targets=y, advantages=adv,  # noqa: E731
                                                           mask=mask, old_logprobs=old), **kw})
    with pytest.raises(ValueError, match=r"rollout_is_weights: expected shape \(3,\) or \(3, 6\)"):
        call(rollout_is_weights=torch.ones(3, 5))
    with pytest.raises(TypeError, match="rollout_is_weights: expected a floating-point tensor"):
        call(rollout_is_weights=torch.ones(3, 6, dtype=torch.long))
    with pytest.raises(ValueError, match=r"rollout_is_weights: 1 value\(s\) not finite or negative"):
        call(rollout_is_weights=torch.tensor([1.0, -0.5, 1.0]))
    with pytest.raises(ValueError, match=r"rollout_is_weights: 1 value\(s\) not finite"):
        call(rollout_is_weights=torch.tensor([1.0, float("nan"), 1.0]))
    for bad in (0.0, -1.0, (1.0, 2.0), (0.0, 0.0), (-1.0, 2.0, 3.0), "20", float("nan"), (None, 10.0)):
        with pytest.raises(ValueError, match="log_ratio_clamp: expected"):
            call(log_ratio_clamp=bad)
    for name in ("kl_log_ratio_clamp", "kl_clamp"):
        for bad in (0.0, -1.0, float("inf"), True):
            with pytest.raises(ValueError, match=f"{name}: expected a finite float > 0"):
                call(**{name: bad})
    with pytest.raises(ValueError, match="entropy_aggregation: expected None or one of"):
        call(entropy_aggregation="mean")
    with pytest.raises(ValueError, match=r"mask: expected shape \(3, 6\)"):
        rollout_importance_weights(old, ref, mask[:, :2])
    with pytest.raises(ValueError, match=r"rollout_logprobs: expected shape \(3, 6\)"):
        rollout_importance_weights(old, ref[:, :2], mask)
    with pytest.raises(ValueError, match="cap: expected a float > 0"):
        rollout_importance_weights(old, ref, mask, cap=0.0)
    with pytest.raises(ValueError, match="level: expected one of"):
        rollout_importance_weights(old, ref, mask, level="batch")
    with pytest.raises(ValueError, match=r"old_logprobs: 1 non-finite value\(s\) where mask is 1"):
        rollout_importance_weights(old.masked_fill(torch.arange(18).view(3, 6) == 0, float("nan")), ref, mask)
    with pytest.raises(ValueError, match=r"train_logprobs: expected \[B, L\]"):
        logprob_mismatch(old[0], ref[0], mask[0])
    with pytest.raises(ValueError, match=r"mask: 1 value\(s\) neither 0 nor 1"):
        logprob_mismatch(old, ref, torch.where(torch.arange(18).view(3, 6) == 4, 0.5, mask.float()))


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------
def test_bad_input_logprobs():
    h, w, b, y, _, _, _ = _data(7, 16, 31)
    with pytest.raises(ValueError, match=r"weight: expected shape \[V, H=16\]"):
        fused_linear_logprobs(h, w[:, :8], y)
    with pytest.raises(ValueError, match=r"targets: expected shape \(7,\)"):
        fused_linear_logprobs(h, w, y[:5])
    with pytest.raises(TypeError, match="targets: expected an integer tensor"):
        fused_linear_logprobs(h, w, y.float())
    with pytest.raises(ValueError, match=r"targets: 1 value\(s\) outside \[0, V=31\)"):
        fused_linear_logprobs(h, w, torch.where(torch.arange(7) == 3, 31, y.clamp_min(0)))
    with pytest.raises(ValueError, match="targets: 1 value"):
        fused_linear_logprobs(h, w, torch.where(torch.arange(7) == 3, -1, y.clamp_min(0)))
    with pytest.raises(TypeError, match="weight: dtype torch.bfloat16 differs"):
        fused_linear_logprobs(h, w.bfloat16(), y)
    with pytest.raises(ValueError, match=r"bias: expected shape \(31,\)"):
        fused_linear_logprobs(h, w, y, bias=b[:3])
    with pytest.raises(ValueError, match="temperature: expected a finite float >= MIN_TEMPERATURE"):
        fused_linear_logprobs(h, w, y, temperature=0.0)
    with pytest.raises(ValueError, match=r"temperature: 1 row\(s\) not finite"):
        fused_linear_logprobs(h, w, y, temperature=torch.tensor([1.0] * 6 + [float("nan")]))
    with pytest.raises(ValueError, match="ignore_index: 3 is a valid token id"):
        fused_linear_logprobs(h, w, y, ignore_index=3)
    with pytest.raises(TypeError, match="hidden: expected a torch.Tensor"):
        fused_linear_logprobs(h.tolist(), w, y)
    with pytest.raises(BackendUnavailableError, match="fused_linear_logprobs"):
        fused_linear_logprobs(h, w, y, backend="cuda")
    with pytest.raises(ValueError, match=r"targets: expected shape \(2,\)"):
        logprobs_from_logits(torch.randn(2, 5), torch.zeros(3, dtype=torch.long))


def test_bad_input_policy_loss():
    h, w, y, adv, mask, old, ref = _policy_case(1)
    call = lambda **kw: fused_linear_policy_loss(**{**dict(hidden=h, weight=w, targets=y, advantages=adv,  # noqa: E731
                                                           mask=mask), **kw})
    with pytest.raises(ValueError, match="aggregation: expected one of"):
        call(aggregation="seq-sum")
    with pytest.raises(ValueError, match="importance_level"):
        call(importance_level="batch")
    with pytest.raises(ValueError, match=r"advantages: 1 non-finite"):
        call(advantages=torch.tensor([1.0, float("nan"), 0.0]))
    with pytest.raises(ValueError, match=r"advantages: expected shape \(3,\) or \(3, 6\)"):
        call(advantages=adv[:2])
    with pytest.raises(ValueError, match=r"mask: expected shape \(3, 6\)"):
        call(mask=mask[:, :4])
    with pytest.raises(ValueError, match=r"hidden: expected \[B=3, L=6, H\]"):
        call(hidden=h[:, :5])
    with pytest.raises(ValueError, match=r"old_logprobs: expected shape \(3, 6\)"):
        call(old_logprobs=old[:, :2])
    with pytest.raises(ValueError, match="old_logprobs: 1 non-finite"):
        call(old_logprobs=torch.where(torch.arange(18).view(3, 6) == 2, float("inf"), old))
    with pytest.raises(ValueError, match="ref_logprobs: needed"):
        call(beta=0.1)
    with pytest.raises(ValueError, match="dual_clip: expected a float > 1"):
        call(dual_clip=0.5)
    with pytest.raises(ValueError, match="clip_low: must be < 1"):
        call(clip_low=1.0)
    with pytest.raises(ValueError, match="normaliser: expected a finite number > 0"):
        call(normaliser=0)
    with pytest.raises(ValueError, match=r"targets: 1 value\(s\) outside \[0, V=29\)"):
        call(targets=torch.where(torch.arange(18).view(3, 6) == 0, 999, y))  # mask[0, 0] is set


# ----------------------------------------------------------------------------------------------------------------
# PolicyLoss: the settings as one frozen, validated object
# ----------------------------------------------------------------------------------------------------------------
def test_policy_loss_settings_object_equals_the_keyword_form():
    h, w, y, adv, mask, old, ref = _policy_case(4)
    settings = dict(clip_low=0.1, clip_high=0.28, dual_clip=3.0, beta=0.05, entropy_coef=0.01,
                    aggregation="seq-mean-token-sum-norm", max_length=9, normaliser=torch.tensor(2.0),
                    log_ratio_clamp=(-5.0, 3.0), kl_log_ratio_clamp=20.0, kl_clamp=10.0)
    results = []
    for kw in (settings, dict(loss=PolicyLoss(**settings))):
        hh = h.clone().requires_grad_()
        loss, metrics = fused_linear_policy_loss(hh, w, y, adv, mask, old_logprobs=old, ref_logprobs=ref, **kw)
        results.append((loss.detach(), torch.autograd.grad(loss, hh)[0], metrics["kl"]))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_policy_loss_settings_are_validated_once_and_named():
    h, w, y, adv, mask, old, ref = _policy_case(1)
    with pytest.raises(TypeError, match="beta: given together with loss="):
        fused_linear_policy_loss(h, w, y, adv, mask, loss=PolicyLoss(), beta=0.1)
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['clip_ratio'\]"):
        fused_linear_policy_loss(h, w, y, adv, mask, clip_ratio=0.2)
    with pytest.raises(TypeError, match="loss: expected a PolicyLoss"):
        fused_linear_policy_loss(h, w, y, adv, mask, loss=dict(beta=0.1))
    for field, bad, error in (("clip_high", -0.1, ValueError), ("clip_low", "0.2", ValueError),
                              ("dual_clip", math.inf, ValueError), ("max_length", 0, ValueError),
                              ("rollout_is_level", "batch", ValueError), ("rollout_is_cap", 0.0, ValueError),
                              ("normaliser", torch.ones(2), ValueError), ("normaliser", torch.tensor(True), TypeError),
                              ("aggregation", "token-sum", ValueError)):  # fmt: skip
        with pytest.raises(error, match=f"^{field}: "):
            PolicyLoss(**{field: bad})
    settings = PolicyLoss(rollout_is_level="token")
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.beta = 0.1
    with pytest.raises(ValueError, match="clip_low: must be < 1"):
        settings.replace(clip_low=1.0)
    with pytest.raises(ValueError, match="rollout_is_weights: needed"):
        fused_linear_policy_loss(h, w, y, adv, mask, old_logprobs=old, loss=settings)
    weights = settings.rollout_is_weights(old, ref, mask)
    torch.testing.assert_close(weights, rollout_importance_weights(old, ref, mask, cap=2.0, level="token"))
    loss, metrics = fused_linear_policy_loss(h, w, y, adv, mask, old_logprobs=old, rollout_is_weights=weights,
                                             loss=settings)  # fmt: skip
    assert torch.isfinite(loss) and "rollout_is_mean" in metrics


def test_ignored_rows_are_masked_only_when_not_finite():
    """The non-finite-row flag comes from the op's one value-check sync: finite hidden states (the usual case) are
    never copied; a NaN at an ignored row switches the chunk masking on."""
    from r4b_fast.ops.lm_head.registration import _head

    h, w, b, y, temp, _, _ = _data(7, 8, 31)
    assert (y == -100).any()
    assert not _head(h, w, b, y, temp, -100, "torch").mask_rows
    h[y == -100] = float("nan")
    assert _head(h, w, b, y, temp, -100, "torch").mask_rows
    h[y != -100] = float("nan")  # NaN at a valid row is the caller's: not masked
    h[y == -100] = 0.0
    assert not _head(h, w, b, y, temp, -100, "torch").mask_rows


# ----------------------------------------------------------------------------------------------------------------
# torch.library / torch.compile
# ----------------------------------------------------------------------------------------------------------------
def test_opcheck():
    h, w, b, y, temp, _, _ = _data(7, 8, 31)
    args = (h.requires_grad_(), w.requires_grad_(), b.requires_grad_(), y, temp, -100, True, "torch")
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(flp._flp_op, args, test_utils=utils)
    lse = torch.zeros(7)
    for need_dh, need_dw in ((True, True), (False, True), (True, False)):
        for masked in (False, True):
            torch.library.opcheck(flp._flp_backward_op, (torch.randn(7), torch.randn(7), h.detach(), w.detach(),
                                                         b.detach(), y, temp, lse, lse, torch.tensor(masked), -100,
                                                         need_dh, need_dw, "torch"), test_utils=utils)  # fmt: skip
        vec = torch.randn(7)
        for extra in ((None, None, None, None, None, None), (vec.abs() + 0.1, vec.abs(), -20.0, 10.0, 20.0, 10.0)):
            ent_w, is_w, clamps = extra[0], extra[1], extra[2:]
            ppo = flp._PPO(0.2, 0.3, 3.0, 0.1, 0.01, *clamps)
            torch.library.opcheck(flp._policy_grads_op, (h.detach(), w.detach(), b.detach(), y, temp, -100, vec,
                                                         vec - 1, vec + 1, vec.abs(), ent_w, is_w, ppo.as_op_list(),
                                                         need_dh, need_dw, "torch"), test_utils=utils)  # fmt: skip
    torch.library.opcheck(flp._attach_grads_op, (torch.tensor(1.5), h, w, b, torch.randn(7, 8), torch.randn(31, 8),
                                                 torch.randn(31)), test_utils=utils)  # fmt: skip


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_compile_fullgraph(backend_device):
    backend, device = backend_device
    h, w, y, adv, mask, old, ref = (t.to(device) for t in _policy_case(2))

    def step(hh, ww, backend):
        lp, en = fused_linear_logprobs(hh.reshape(-1, hh.shape[-1]), ww, torch.where(mask, y, -100).reshape(-1),
                                       return_entropy=True, temperature=0.9, backend=backend)
        loss, metrics = fused_linear_policy_loss(hh, ww, y, adv, mask, old_logprobs=old, ref_logprobs=ref,
                                                 beta=0.1, entropy_coef=0.01, dual_clip=3.0, backend=backend)
        return loss + lp.sum() * 0.1 + en.sum() * 0.1, metrics["clip_frac_high"]

    results = []
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for fn, b in ((step, "torch"), (step, backend), (compiled, backend)):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        out, frac = fn(hh, ww, b)
        out.backward()
        results.append((out.detach(), frac, hh.grad, ww.grad))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Memory: the torch backend never holds [T, V]
# ----------------------------------------------------------------------------------------------------------------
def _peak_cpu_bytes(fn):
    """Peak of the allocations replayed from the profiler, each event's own (self) allocations and frees in start
    order. Counting self memory sees matmul outputs; frees that Python code makes inside a custom op would be dated
    at the op's start, so the backend functions are measured directly."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.events() if e.self_cpu_memory_usage]
    current = peak = 0
    for e in sorted(events, key=lambda e: e.time_range.start):
        current += e.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


def _torch_head(h, w, b, y, temp):
    return flp._Head(h, w, b, y, 1.0 / temp, -100, "torch")


def test_torch_backend_memory_is_chunk_bounded(monkeypatch):
    T, H, V = 512, 16, 16384  # [T, V] fp32 = 32 MiB
    chunk = T * V // 8
    monkeypatch.setattr(driver, "CHUNK_ELEMENTS", {"cpu": chunk})
    monkeypatch.setattr(epilogues, "EPILOGUE_ELEMENTS", 8 * V)
    h, w, b, y, temp, g_lp, g_en = _data(T, H, V)
    head = _torch_head(h, w, b, y, temp)

    def fwd_bwd():  # the per-token op: forward, then the recomputing backward
        _, en, lse = flp._lm_head_forward(head, True)
        grads = flp._Grads.empty(head, True, True, True)
        flp._lm_head_backward(head, lse, en, torch.where(y != -100, g_lp, 0.0), torch.where(y != -100, g_en, 0.0),
                              grads)  # fmt: skip

    def fused():  # the policy loss: gradients formed in the forward
        grads = flp._Grads.empty(head, True, True, True)
        flp._lm_head_forward(head, True, lambda t0, t1, lp, en: (g_lp[t0:t1], g_en[t0:t1]), grads)

    def eager():
        hh, ww, bb = (t.clone().requires_grad_() for t in (h, w, b))
        lp, en = fused_linear_logprobs_ref(hh, ww, y, bias=bb, temperature=temp)
        torch.autograd.grad((lp * g_lp + en * g_en).sum(), (hh, ww, bb))

    peak_eager = _peak_cpu_bytes(eager)
    # the logits chunk, three fp32 epilogue slices, the gradients themselves (dW is V*H*4 bytes)
    budget = chunk * 4 + 3 * epilogues.EPILOGUE_ELEMENTS * 4 + 2 * V * H * 4 + 2 * T * H * 4
    for fn in (fwd_bwd, fused):
        peak = _peak_cpu_bytes(fn)
        assert peak < budget < T * V * 4 / 2, (fn.__name__, peak, budget, T * V * 4)
    assert peak_eager >= 3 * T * V * 4 > 6 * peak  # the measurement does see [T, V] buffers when they exist


def test_fused_gradients_match_the_recomputing_backward(monkeypatch):
    """The chunk loop's two gradient routes (formed in the forward from d loss / d logp; recomputed from the saved
    log-sum-exp) give the same dHidden / dWeight / dBias, over several chunks, with and without the entropy term."""
    T, H, V = 97, 24, 1003
    _several_chunks(monkeypatch, T, V)
    h, w, b, y, temp, g_lp, g_en = _data(T, H, V)
    head = _torch_head(h, w, b, y, temp)
    valid = y != -100
    for gh in (torch.where(valid, g_en, 0.0), None):
        fused = flp._Grads.empty(head, True, True, True)

        def grad_fn(t0, t1, lp, e, gh=gh):
            return g_lp[t0:t1] * valid[t0:t1], None if gh is None else gh[t0:t1]

        _, en, lse = flp._lm_head_forward(head, True, grad_fn, fused)
        recomputed = flp._Grads.empty(head, True, True, True)
        flp._lm_head_backward(head, lse, en, torch.where(valid, g_lp, 0.0), gh, recomputed)
        for a, r in zip(fused.outputs(head), recomputed.outputs(head)):
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)


def test_frozen_head_skips_its_gradient():
    """A frozen LM head (weight.requires_grad False, e.g. LoRA) gets no dWeight GEMM; dHidden is unchanged."""
    h, w, y, adv, mask, old, _ = _policy_case(3)
    grads = []
    for train_w in (True, False):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_(train_w)
        loss, _ = fused_linear_policy_loss(hh, ww, y, adv, mask, old_logprobs=old)
        loss.backward()
        grads.append(hh.grad)
        assert (ww.grad is not None) == train_w
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_epilogue_row_offsets_are_64_bit(backend_device):
    """The Triton epilogues address row ``r`` of a chunk at ``r * stride`` in int64: a chunk whose row stride puts a
    row beyond 2^31 elements (a [rows, V] chunk of 2^31+ elements is 4 GiB in bf16, too big for a test) is read and
    written at the right place. A strided view over a small buffer with a huge stride is not possible without the
    memory, so the offset is checked on the kernel's own arithmetic: the interpreter runs int32 arithmetic as numpy
    int32 (wrapping), the GPU as 32-bit registers."""
    backend, device = backend_device
    if backend != "triton":
        pytest.skip("the offset arithmetic under test is the Triton kernels'")
    import triton
    import triton.language as tl

    @triton.jit
    def _offsets(out_ptr, first_row, stride):
        row = (first_row + tl.program_id(0)).to(tl.int64)  # as _logit_stats_kernel / _logit_grad_kernel do
        tl.store(out_ptr + tl.program_id(0), row * stride)

    first_row, stride = 2**31 // 151936 - 1, 151936  # rows of R-4B's vocabulary around element 2^31
    out = torch.zeros(4, dtype=torch.int64, device=device)
    _offsets[(4,)](out, first_row, stride)
    expected = torch.tensor([(first_row + i) * stride for i in range(4)], dtype=torch.int64)
    assert expected.max() > 2**31  # the case crosses 2^31
    torch.testing.assert_close(out.cpu(), expected, rtol=0, atol=0)
    import inspect

    from r4b_fast.kernels import fused_linear_logprobs as kernels

    for fn in (kernels._logit_stats_kernel, kernels._logit_grad_kernel):
        src = inspect.getsource(fn.fn)
        assert "row = tl.program_id(0).to(tl.int64)" in src and "row * stride_z" in src, fn.fn.__name__


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_runs_on_the_tensors_device_not_the_current_one(backend):
    """Tensors on cuda:1 while cuda:0 is current: the launchers' device guard puts the kernels on cuda:1."""
    h, w, b, y, temp, g_lp, g_en = _data(33, 16, 5001)
    rlp, ren = fused_linear_logprobs_ref(h, w, y, bias=b, temperature=temp)
    with torch.cuda.device(0):
        hh, ww, bb = (t.to("cuda:1").requires_grad_() for t in (h, w, b))
        lp, en = fused_linear_logprobs(hh, ww, y.to("cuda:1"), bias=bb, temperature=temp.to("cuda:1"),
                                       return_entropy=True, backend=backend)
        (lp * g_lp.to("cuda:1")).sum().backward()
    assert lp.device == hh.grad.device == torch.device("cuda:1")
    torch.testing.assert_close(lp.cpu(), rlp, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(en.cpu(), ren, rtol=1e-4, atol=1e-4)


def test_rollout_helpers_docstring_examples():
    import doctest

    for fn in (rollout_importance_weights, logprob_mismatch):
        runner = doctest.DocTestRunner()
        for t in doctest.DocTestFinder().find(fn):
            runner.run(t)
        assert runner.failures == 0 and runner.tries > 0, fn.__name__
