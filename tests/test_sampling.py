"""sample / sample_with_modes: frequencies against the sort-based reference distribution, exact inverse-CDF checks
of the Triton kernel, log-probs, seeding, R-4B mode control against a Python-loop processor, bad input."""

import pytest
import torch
from conftest import kernel_backends

from r4b_fast import Mode
from r4b_fast.ops import sampling
from r4b_fast.ops.sampling import ModeProcessorRef, ModeState, filtered_probs_ref, sample, sample_with_modes

BACKENDS = kernel_backends()
TV_TOL = 0.05  # total variation bound (20000 draws over <= 64 tokens: sampling noise alone gives TV ~ 0.02)
Z_REJECT = 3.72  # chi-square test at p = 1e-4 (one-sided normal quantile, Wilson-Hilferty approximation)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small tensors: intra-op threads only add barriers (~10 ms per op on a busy 2-core machine). Restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tv(tokens, q):
    emp = torch.bincount(tokens, minlength=q.numel()).double() / tokens.numel()
    return 0.5 * (emp - q).abs().sum().item()


def _chi2_ok(tokens, q) -> bool:
    """Pearson chi-square goodness of fit of the draws to ``q`` (bins with expected count < 5 pooled), accepted
    unless p < 1e-4."""
    n = tokens.numel()
    obs = torch.bincount(tokens, minlength=q.numel()).double()
    exp = q * n
    big = exp >= 5
    o = torch.cat([obs[big], obs[~big].sum().reshape(1)])
    e = torch.cat([exp[big], exp[~big].sum().reshape(1)])
    keep = e > 0
    o, e = o[keep], e[keep]
    df = max(1, e.numel() - 1)
    stat = ((o - e) ** 2 / e).sum().item()
    bound = df * (1 - 2 / (9 * df) + Z_REJECT * (2 / (9 * df)) ** 0.5) ** 3
    return stat < bound


def _matches(tokens, q) -> bool:
    return bool((q[tokens] > 0).all()) and _tv(tokens, q) < TV_TOL and _chi2_ok(tokens, q)


def _rows(B, **kw):
    out = {}
    for name, v in kw.items():
        dtype = torch.int64 if name == "top_k" else torch.float32
        out[name] = v if isinstance(v, torch.Tensor) else torch.full((B,), v, dtype=dtype)
    for name, default in (("temperature", 1.0), ("top_k", 0), ("top_p", 1.0), ("min_p", 0.0)):
        out.setdefault(name, torch.full((B,), default, dtype=torch.int64 if name == "top_k" else torch.float32))
    return out


CONFIGS = {
    "plain": dict(),
    "temperature": dict(temperature=0.6),
    "top_k": dict(top_k=7),
    "top_p": dict(top_p=0.8),
    "min_p": dict(min_p=0.08),
    "all": dict(temperature=1.4, top_k=20, top_p=0.9, min_p=0.02),
    "hot_top_p": dict(temperature=3.0, top_p=0.95),
}


@pytest.mark.parametrize("candidates", [1024, 8], ids=["candidates", "full-vocab-fallback"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_torch_frequencies_match_reference(config, candidates, monkeypatch):
    # 8: most rows take the exact bisection fallback
    monkeypatch.setattr(sampling.torch_backend, "CANDIDATES", candidates)
    V, N = 64, 20000
    gen = torch.Generator().manual_seed(list(CONFIGS).index(config))
    base = torch.randn(V, generator=gen) * 1.5
    base[3] = -float("inf")  # a masked token
    kw = CONFIGS[config]
    tokens, logprobs = sample(base.expand(N, V).contiguous(), generator=gen, backend="torch", **kw)
    q = filtered_probs_ref(base[None], **_rows(1, **kw))[0]
    assert (q[tokens] > 0).all(), "a token outside the filtered set was drawn"
    assert _tv(tokens, q) < TV_TOL
    assert _chi2_ok(tokens, q)
    t = kw.get("temperature", 1.0)
    torch.testing.assert_close(logprobs, torch.log_softmax(base / t, -1)[tokens])


def test_ties_at_the_top_k_and_top_p_boundary():
    # integer logits: many ties; the threshold semantics keep every tied token
    base = torch.tensor([3.0, 3.0, 3.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, -2.0])
    N = 20000
    for kw in (dict(top_k=2), dict(top_k=4), dict(top_p=0.5), dict(top_p=0.9)):
        tokens, _ = sample(base.expand(N, -1).contiguous(), generator=torch.Generator().manual_seed(0), **kw)
        q = filtered_probs_ref(base[None], **_rows(1, **kw))[0]
        assert _matches(tokens, q), kw
    q = filtered_probs_ref(base[None], **_rows(1, top_k=2))[0]
    assert (q[:3] > 0).all() and (q[3:] == 0).all()


def test_per_row_parameters_are_honoured():
    V, n = 48, 5000
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(V, generator=gen) * 2
    rows = [dict(temperature=0.5, top_k=0, top_p=1.0, min_p=0.0), dict(temperature=1.0, top_k=5, top_p=1.0, min_p=0.0),
            dict(temperature=1.2, top_k=0, top_p=0.7, min_p=0.0), dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.2)]
    per = {k: torch.tensor([r[k] for r in rows for _ in range(n)]) for k in rows[0]}
    tokens, logprobs = sample(base.expand(4 * n, V).contiguous(), generator=gen, **per)
    for i, r in enumerate(rows):
        q = filtered_probs_ref(base[None], **_rows(1, **r))[0]
        tok = tokens[i * n : (i + 1) * n]
        assert _matches(tok, q), r
        torch.testing.assert_close(logprobs[i * n : (i + 1) * n], torch.log_softmax(base / r["temperature"], -1)[tok])


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_inverse_cdf_exact_against_reference(backend_device):
    """Given the generator's uniforms, every backend's token is the reference's inverse CDF in vocabulary order."""
    backend, device = backend_device
    B, V = 8, 200
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(B, V, generator=gen) * 2
    logits[2, :10] = -float("inf")
    params = dict(temperature=torch.tensor([1.0, 0.7, 0.0, 1.3, 1.0, 2.0, 0.9, 1.0]),
                  top_k=torch.tensor([0, 5, 0, 40, 0, 0, 3, 17]),
                  top_p=torch.tensor([1.0, 1.0, 1.0, 0.6, 0.9, 0.95, 1.0, 0.5]),
                  min_p=torch.tensor([0.0, 0.0, 0.0, 0.01, 0.0, 0.0, 0.3, 0.05]))  # fmt: skip
    tokens, logprobs = sample(logits.to(device), generator=torch.Generator().manual_seed(11), backend=backend,
                              **{k: v.to(device) for k, v in params.items()})
    u = torch.rand(B, generator=torch.Generator().manual_seed(11)).double()
    q = filtered_probs_ref(logits, **params)
    cdf = q.cumsum(1)
    expected = torch.searchsorted(cdf, u[:, None], right=True).clamp(max=V - 1)[:, 0]
    greedy = params["temperature"] == 0
    expected = torch.where(greedy, logits.argmax(1), expected)
    near = (cdf - u[:, None]).abs().min(1).values < 1e-5  # a CDF boundary within rounding: either side is right
    assert ((tokens.cpu() == expected) | near).all(), (tokens, expected)
    t = torch.where(greedy, 1.0, params["temperature"])
    want = torch.log_softmax(logits / t[:, None], -1).gather(1, expected[:, None])[:, 0]
    torch.testing.assert_close(logprobs.cpu(), want)


def test_inverse_cdf_exact_torch_fallback(monkeypatch):
    """The torch backend's full-vocabulary fallback (4 candidates: most rows overflow) against the same oracle."""
    monkeypatch.setattr(sampling.torch_backend, "CANDIDATES", 4)
    test_inverse_cdf_exact_against_reference(("torch", "cpu"))


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_same_seed_same_tokens(backend_device):
    backend, device = backend_device
    logits = torch.randn(4, 129, generator=torch.Generator().manual_seed(0)).to(device)
    kw = dict(temperature=1.1, top_p=0.9, top_k=50, backend=backend)
    a, la = sample(logits, generator=torch.Generator(device).manual_seed(5), **kw)
    b, lb = sample(logits, generator=torch.Generator(device).manual_seed(5), **kw)
    c, _ = sample(logits, generator=torch.Generator(device).manual_seed(6), **kw)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(a, c)


def test_a_slice_of_the_global_noise_samples_what_the_whole_batch_does():
    """Data parallelism: rank r samples rows [lo, hi) of a global batch with its slice of the global uniforms and
    gets exactly the whole batch's tokens for those rows."""
    logits = torch.randn(12, 257, generator=torch.Generator().manual_seed(3))
    kw = dict(temperature=0.9, top_p=0.95, top_k=40)
    whole, whole_lp = sample(logits, generator=torch.Generator().manual_seed(8), **kw)
    noise = torch.rand(12, generator=torch.Generator().manual_seed(8))
    for lo, hi in ((0, 6), (6, 12), (3, 4)):
        part, part_lp = sample(logits[lo:hi], uniforms=noise[lo:hi], **kw)
        assert torch.equal(part, whole[lo:hi]) and torch.equal(part_lp, whole_lp[lo:hi])


def test_greedy_and_low_precision():
    logits = torch.randn(16, 1000, generator=torch.Generator().manual_seed(1))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        lg = logits.to(dtype)
        tokens, lp = sample(lg, temperature=0.0, top_p=0.5, top_k=3)
        assert torch.equal(tokens, lg.float().argmax(1))
        torch.testing.assert_close(lp, torch.log_softmax(lg.float(), -1).gather(1, tokens[:, None])[:, 0])
    big = torch.zeros(2, 200_000)  # more tokens than candidates, flat: the fallback over the full vocabulary
    big[1, 123_456] = 50.0
    tokens, _ = sample(big, top_p=0.999, generator=torch.Generator().manual_seed(0))
    assert tokens[1] == 123_456 and 0 <= tokens[0] < 200_000


# ---------------------------------------------------------------------------------------------------------------
# Multi-block rows, low precision, min_p = 1, rows with nothing to sample, devices
# ---------------------------------------------------------------------------------------------------------------
def _expected_tokens(logits, params, u):
    """The reference's inverse CDF in vocabulary order for the uniforms ``u`` (greedy rows: the first argmax) and a
    mask of rows whose uniform sits within rounding of a CDF boundary (either side is right there)."""
    q = filtered_probs_ref(logits, **params)
    cdf = q.cumsum(1)
    expected = torch.searchsorted(cdf, u.double()[:, None], right=True).clamp(max=logits.shape[1] - 1)[:, 0]
    greedy = params["temperature"] == 0
    expected = torch.where(greedy, logits.argmax(1), expected)
    near = (cdf - u.double()[:, None]).abs().min(1).values < 1e-5
    return expected, near


def _mixed_params(B, V):
    """Per-row filters over a batch: greedy rows, top-k (small and near V), top-p, min-p, all at once, plain."""
    i = torch.arange(B)
    return dict(temperature=torch.where(i % 9 == 0, 0.0, 0.8 + (i % 5) * 0.1),
                top_k=torch.where(i % 4 == 1, (1 + i * 37) % V, torch.where(i % 8 == 0, 40, 0)),
                top_p=torch.where(i % 4 == 2, 0.7, torch.where(i % 8 == 0, 0.9, 1.0)),
                min_p=torch.where(i % 4 == 3, 0.05, torch.where(i % 8 == 0, 0.01, 0.0)))  # fmt: skip


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_multi_block_rows_against_reference(backend_device):
    """B = 64 rows of V = 2 * 1024 + 77 tokens: three blocks of the kernels' BLOCK (1024), so every loop of the
    kernels (max / log-sum-exp, both threshold searches, the inverse-CDF scan with its carried running sum) crosses
    block boundaries; the torch backend sees the same batch with 64 candidates (most rows take the histogram path)."""
    backend, device = backend_device
    B, V = 64, 2 * 1024 + 77
    gen = torch.Generator().manual_seed(21)
    logits = torch.randn(B, V, generator=gen) * 2
    logits[5, 1500:] = -float("inf")  # masked tail, across a block boundary
    logits[7, :1100] = -float("inf")  # masked head: the row's mass starts in the second block
    logits[9, 2000] = logits[9].max() + 0.0  # a tie at the max in the last block: greedy takes the first
    params = _mixed_params(B, V)
    u = torch.rand(B, generator=gen)
    tokens, logprobs = sample(logits.to(device), uniforms=u.to(device), backend=backend,
                              **{k: v.to(device) for k, v in params.items()})  # fmt: skip
    expected, near = _expected_tokens(logits, params, u)
    assert ((tokens.cpu() == expected) | near).all(), (tokens.cpu() != expected).nonzero()
    assert (tokens.cpu() == expected).float().mean() > 0.9
    t = torch.where(params["temperature"] == 0, 1.0, params["temperature"])
    want = torch.log_softmax(logits / t[:, None], -1).gather(1, tokens.cpu()[:, None])[:, 0]
    torch.testing.assert_close(logprobs.cpu(), want)


def test_multi_block_torch_histogram_path(monkeypatch):
    """The torch backend with few candidates: rows go through the flat-row test and the histogram thresholds."""
    monkeypatch.setattr(sampling.torch_backend, "CANDIDATES", 64)
    test_multi_block_rows_against_reference(("torch", "cpu"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend_device", BACKENDS)
def test_low_precision_logits_through_the_kernels(backend_device, dtype):
    """bf16 / fp16 logits read by the kernels in their own dtype (upcast in registers), over several blocks: the
    same tokens as the reference on the upcast logits, log-probs of the upcast logits."""
    backend, device = backend_device
    B, V = 16, 2 * 1024 + 77
    gen = torch.Generator().manual_seed(22)
    logits = (torch.randn(B, V, generator=gen) * 3).to(dtype)
    params = _mixed_params(B, V)
    u = torch.rand(B, generator=gen)
    tokens, logprobs = sample(logits.to(device), uniforms=u.to(device), backend=backend,
                              **{k: v.to(device) for k, v in params.items()})  # fmt: skip
    ref_logits = logits.float()
    expected, near = _expected_tokens(ref_logits, params, u)
    assert ((tokens.cpu() == expected) | near).all()
    t = torch.where(params["temperature"] == 0, 1.0, params["temperature"])
    want = torch.log_softmax(ref_logits / t[:, None], -1).gather(1, tokens.cpu()[:, None])[:, 0]
    torch.testing.assert_close(logprobs.cpu(), want)


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_min_p_one_returns_the_argmax(backend_device):
    """min_p = 1 keeps only the tokens at the max: ``e == 1`` exactly there in every pass (the kernels compute
    ``exp((l - max) / T)``, which no compiler contracts into an FMA), so the argmax always passes."""
    backend, device = backend_device
    B, V = 24, 2 * 1024 + 77  # B >= 64 runs in test_multi_block_rows_against_reference (the interpreter is slow)
    gen = torch.Generator().manual_seed(23)
    logits = torch.randn(B, V, generator=gen) * 3
    temperature = 0.3 + torch.rand(B, generator=gen) * 2  # awkward 1 / T: products that round
    for rows, top_p, top_k in ((B, 1.0, 0), (8, 0.5, 5)):  # with the threshold searches: fewer rows (interpreter)
        lg, t = logits[:rows], temperature[:rows]
        tokens, logprobs = sample(lg.to(device), temperature=t.to(device), min_p=1.0, top_p=top_p, top_k=top_k,
                                  generator=torch.Generator().manual_seed(0), backend=backend)
        assert torch.equal(tokens.cpu(), lg.argmax(1))
        want = torch.log_softmax(lg / t[:, None], -1).gather(1, lg.argmax(1)[:, None])[:, 0]
        torch.testing.assert_close(logprobs.cpu(), want)
    # ties at the max: min_p = 1 keeps both, each drawn
    tied = torch.zeros(32, 300)
    tied[:, 17] = tied[:, 260] = 5.0
    tokens, _ = sample(tied.to(device), min_p=1.0, generator=torch.Generator().manual_seed(1), backend=backend)
    assert set(tokens.cpu().tolist()) == {17, 260}


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on inf / NaN rows
@pytest.mark.parametrize("backend_device", BACKENDS)
def test_rows_with_nothing_to_sample_never_give_an_invalid_index(backend_device):
    """With check_values=False (sample_with_modes' default), every backend agrees: a row with no finite logit
    (all NaN, all -inf) returns the first index of its max -- 0 -- with a NaN log-prob (the flag), a row with +inf
    its first +inf, NaN logits elsewhere act as -inf, and temperatures too small for ``l / T`` in float32 sample
    the argmax with a finite log-prob. Never an index outside [0, V)."""
    backend, device = backend_device
    B, V = 8, 1100  # two blocks
    logits = torch.randn(B, V, generator=torch.Generator().manual_seed(24))
    logits[0] = float("nan")
    logits[1] = -float("inf")
    logits[2, 700] = float("inf")
    logits[2, 900] = float("inf")
    logits[3, ::2] = float("nan")  # NaN as masks: sampled among the odd tokens
    temperature = torch.tensor([1.0, 1.0, 1.0, 1.0, 1e-39, 1e-38, 1e-30, 0.0])
    for kw in (dict(), dict(top_p=0.9, top_k=50, min_p=0.1)):
        tokens, logprobs = sample(logits.to(device), temperature=temperature.to(device), check_values=False,
                                  generator=torch.Generator().manual_seed(2), backend=backend, **kw)
        tokens, logprobs = tokens.cpu(), logprobs.cpu()
        assert ((tokens >= 0) & (tokens < V)).all(), tokens
        assert tokens[:3].tolist() == [0, 0, 700]
        assert logprobs[:3].isnan().all()
        assert tokens[3] % 2 == 1 and logprobs[3].isfinite()
        torch.testing.assert_close(tokens[4:], logits[4:].argmax(1))
        assert logprobs[4:].isfinite().all() and (logprobs[4:7] == 0).all()
    # through the rollout path (check_values=False by default)
    st = ModeState.create([Mode.AUTO] * B, [1], [2], [3], eos_id=4, pad_id=5, device=device)
    step = sample_with_modes(logits.to(device), st, temperature=temperature.to(device), backend=backend,
                             generator=torch.Generator().manual_seed(3))
    assert ((step.tokens.cpu() >= 0) & (step.tokens.cpu() < V)).all()
    with pytest.raises(ValueError, match="NaN or .inf"):
        sample(logits.to(device), backend=backend)


def test_tiny_temperature_forced_logprobs_are_finite():
    """Forced tokens' log-probs use the same ``(l - max) / T - log Z`` as sampled ones: finite for any T > 0."""
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(25)) * 3
    st = ModeState.create([Mode.THINK, Mode.NO_THINK], [7, 1], [7, 2, 8, 2], [1, 8, 2], eos_id=9, pad_id=0)
    for t in (1e-30, 1e-39):
        step = sample_with_modes(logits, st, temperature=t)
        want = torch.log_softmax(logits.double() / t, -1).gather(1, step.tokens[:, None])[:, 0].float()
        assert not step.logprobs.isnan().any()
        torch.testing.assert_close(step.logprobs, want)
    step = sample_with_modes(logits, st, temperature=0.7)
    torch.testing.assert_close(step.logprobs, torch.log_softmax(logits / 0.7, -1).gather(1, step.tokens[:, None])[:, 0])


def _rows_for_thresholds():
    gen = torch.Generator().manual_seed(26)
    V = 3000
    flat = torch.randn(4, V, generator=gen)
    peaked = torch.randn(4, V, generator=gen) * 5
    ties = torch.randint(-3, 2, (4, V), generator=gen).float()  # many exact ties
    masked = torch.randn(4, V, generator=gen)
    masked[:, ::3] = -float("inf")
    x = torch.cat([flat, peaked, ties, masked])
    return torch.exp(x - x.amax(1, keepdim=True))


def test_histogram_thresholds_equal_the_bisection():
    """The CPU histogram search (``_hist_threshold``) returns the same float32 thresholds as the exact 31-pass
    bisection on the bit pattern (the device path), for counts and for masses, at random targets."""
    e = _rows_for_thresholds()
    b = e.shape[0]
    gen = torch.Generator().manual_seed(27)
    bins = (e.view(torch.int32) >> sampling._HIST_SHIFT).long()
    k = torch.randint(1, 2500, (b,), generator=gen)
    t_count = sampling._hist_threshold(e, bins, (e > 0).float(), k.float())
    ref_count = sampling._bisect_threshold(e, lambda keep: (keep & (e > 0)).sum(1) >= k)
    assert torch.equal(t_count, ref_count)
    for frac in (0.05, 0.5, 0.9, 0.999):
        need = frac * e.sum(1)
        t_mass = sampling._hist_threshold(e, bins, e, need)
        ref_mass = sampling._bisect_threshold(e, lambda keep, need=need: torch.where(keep, e, 0).sum(1) >= need)
        # the two sum in different orders: a threshold may differ only where the target is within rounding
        diff = t_mass != ref_mass
        for r in diff.nonzero()[:, 0].tolist():
            lo, hi = sorted((t_mass[r].item(), ref_mass[r].item()))
            between = e[r][(e[r] >= lo) & (e[r] <= hi)].sum().item()
            assert between <= 1e-5 * e[r].sum().item() + e[r][e[r] >= lo].min().item(), (r, frac)


def test_device_and_cpu_fallback_paths_agree():
    """The torch backend's full-vocabulary paths, bisection (GPU: no host sync) and histogram (CPU), draw the same
    tokens from the same uniforms."""
    e = _rows_for_thresholds()
    b, V = e.shape
    gen = torch.Generator().manual_seed(28)
    top_k = torch.where(torch.arange(b) % 2 == 0, torch.randint(1, V, (b,), generator=gen), 0)
    top_p = torch.where(torch.arange(b) % 3 == 0, 1.0, 0.85)
    min_p = torch.where(torch.arange(b) % 5 == 0, 0.02, 0.0)
    u = torch.rand(b, generator=gen)
    a = sampling._bisect_rows(e, top_k, top_p, min_p, u)
    h = sampling._hist_rows(e, e.sum(1), top_k, top_p, min_p, u)
    assert (a == h).float().mean() >= 0.9 and (e.gather(1, h[:, None]) > 0).all()


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_tensor_on_another_gpu_than_the_current_one(backend):
    """Launchers run on the tensors' device (device_guard), not the current one: logits on cuda:1 while cuda:0 is
    current give the torch backend's tokens."""
    from r4b_fast.backends import not_supported_reasons

    reasons = not_supported_reasons(backend, "cuda")
    if reasons:
        pytest.skip("; ".join(reasons))
    B, V = 64, 2 * 1024 + 77
    logits = torch.randn(B, V, generator=torch.Generator().manual_seed(29))
    params = _mixed_params(B, V)
    u = torch.rand(B, generator=torch.Generator().manual_seed(30))
    want, want_lp = sample(logits, uniforms=u, backend="torch", **params)
    with torch.cuda.device(0):
        tokens, logprobs = sample(logits.to("cuda:1"), uniforms=u.to("cuda:1"), backend=backend,
                                  **{k: v.to("cuda:1") for k, v in params.items()})  # fmt: skip
        torch.cuda.synchronize(1)
    assert tokens.device == torch.device("cuda:1")
    assert (tokens.cpu() == want).float().mean() > 0.9
    torch.testing.assert_close(logprobs.cpu(), want_lp)


def test_aot_scenarios_launch_on_meta_tensors(monkeypatch):
    """kernels.sampling.aot_scenarios() calls the real launcher with meta tensors (no host reads in it): every
    (dtype, BLOCK, num_warps) combination it can produce, recorded instead of run."""
    from r4b_fast.kernels import sampling as K

    calls = []

    def record(self, *args, grid, warmup, **kwargs):
        calls.append((self, args, kwargs))

    monkeypatch.setattr(type(K._sample_kernel), "run", record)
    K.aot_scenarios()
    assert {c[0] for c in calls} == {K._sample_kernel}
    combos = {(c[1][0].dtype, c[2]["BLOCK"], c[2]["num_warps"]) for c in calls}
    dtypes = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
    assert combos == {(dt, blk, nw) for dt in dtypes for blk, nw in ((1024, 8), (128, 4))}
    assert all(a.device.type == "meta" for c in calls for a in c[1] if isinstance(a, torch.Tensor))
    assert K.block_size(151936) == 1024 and K.block_size(100) == 128


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(logits=torch.tensor([[0.0, float("nan")]])), ValueError, "logits: 1 NaN or .inf"),
        (dict(logits=torch.tensor([[0.0, float("inf")]])), ValueError, "logits: 1 NaN or .inf"),
        (dict(logits=torch.full((2, 3), -float("inf"))), ValueError, "entirely -inf"),
        (dict(logits=torch.zeros(3)), ValueError, r"logits: expected a non-empty \[B, V\]"),
        (dict(logits=torch.zeros(2, 3, dtype=torch.long)), TypeError, "logits: expected a floating-point"),
        (dict(logits=torch.zeros(2, 3), top_p=0.0), ValueError, r"top_p: expected a value in \(0.0, 1.0\]"),
        (dict(logits=torch.zeros(2, 3), top_p=1.5), ValueError, "top_p"),
        (dict(logits=torch.zeros(2, 3), top_p=torch.tensor([0.5, 1.2])), ValueError, r"top_p: 1 value\(s\) outside"),
        (dict(logits=torch.zeros(2, 3), top_k=-1), ValueError, "top_k: expected a value in"),
        (dict(logits=torch.zeros(2, 3), top_k=torch.tensor([1, -2])), ValueError, r"top_k: 1 value\(s\) < 0"),
        (dict(logits=torch.zeros(2, 3), top_k=2.5), TypeError, "top_k: expected an int"),
        (dict(logits=torch.zeros(2, 3), temperature=-1.0), ValueError, "temperature"),
        (dict(logits=torch.zeros(2, 3), min_p=1.5), ValueError, "min_p"),
        (dict(logits=torch.zeros(2, 3), temperature=torch.ones(3)), ValueError, r"temperature: expected a scalar"),
        (dict(logits=torch.zeros(2, 3), generator=3), TypeError, "generator"),
        (dict(logits=torch.zeros(2, 3), uniforms=torch.rand(3)), ValueError, r"uniforms: expected shape \(2,\)"),
        (dict(logits=torch.zeros(2, 3), uniforms=torch.tensor([0.5, 1.0])), ValueError, r"uniforms: values must"),
        (dict(logits=torch.zeros(2, 3), uniforms=torch.zeros(2, dtype=torch.long)), TypeError, "uniforms: expected"),
        (dict(logits=torch.zeros(2, 3), uniforms=torch.rand(2), generator=torch.Generator()), ValueError,
         "either uniforms or generator"),
        (dict(logits=torch.zeros(2, 3), backend="cuda"), Exception, "cuda backend needs CUDA tensors"),
    ],
)  # fmt: skip
def test_bad_input_is_rejected(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        sample(**kwargs)


def test_opcheck():
    op = torch.ops.r4b_fast.sample.default
    B, V = 4, 50
    args = (torch.randn(B, V), torch.ones(B), torch.tensor([0, 3, 0, 5]), torch.tensor([1.0, 0.9, 0.5, 1.0]),
            torch.zeros(B), torch.rand(B), 8, "torch")  # fmt: skip
    torch.library.opcheck(op, args)


# ---------------------------------------------------------------------------------------------------------------
# Mode control
# ---------------------------------------------------------------------------------------------------------------
OPEN, NO_THINK, CLOSE = [90, 91], [90, 92, 93, 92], [91, 93, 92]  # "<think>\n", "<think>\n\n</think>\n\n", ...
EOS, PAD, V_MODES = 99, 0, 100


def test_forced_sequences_are_exact_and_auto_rows_untouched():
    modes = [Mode.THINK, Mode.NO_THINK, Mode.AUTO, Mode.THINK, Mode.AUTO]
    logits = torch.randn(5, V_MODES, generator=torch.Generator().manual_seed(0))
    logits[:, EOS] = -float("inf")  # nobody finishes in this test
    st = ModeState.create(modes, OPEN, NO_THINK, CLOSE, eos_id=EOS, pad_id=PAD)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    emitted, forced = [], []
    for _ in range(6):
        step = sample_with_modes(logits, st, temperature=0.8, top_p=0.9, generator=g1)
        free, free_lp = sample(logits, temperature=0.8, top_p=0.9, generator=g2)
        for r in (2, 4):  # auto rows: exactly the unconstrained tokens and log-probs
            assert step.tokens[r] == free[r] and step.logprobs[r] == free_lp[r]
        lp = torch.log_softmax(logits / 0.8, -1).gather(1, step.tokens[:, None])[:, 0]
        torch.testing.assert_close(step.logprobs, lp)
        emitted.append(step.tokens)
        forced.append(step.forced)
    emitted, forced = torch.stack(emitted, 1), torch.stack(forced, 1)
    assert emitted[0, :2].tolist() == OPEN and emitted[3, :2].tolist() == OPEN
    assert emitted[1, :4].tolist() == NO_THINK
    assert forced[0].tolist() == [True, True, False, False, False, False]
    assert forced[1].tolist() == [True] * 4 + [False] * 2
    assert not forced[2].any()
    assert st.phase.tolist()[:2] == [1, 2] and st.opened[:2].tolist() == [True, True]
    assert st.closed[:2].tolist() == [False, True]


@pytest.mark.parametrize("budget", [0, 1, 5])
def test_budget_is_enforced_to_the_token(budget):
    B = 3
    logits = torch.zeros(B, V_MODES)
    logits[:, 10:20] = 30.0  # the model never closes nor finishes on its own
    st = ModeState.create([Mode.THINK] * B, OPEN, NO_THINK, CLOSE, eos_id=EOS, pad_id=PAD, budget=budget)
    out = torch.stack([sample_with_modes(logits, st, generator=torch.Generator().manual_seed(i)).tokens
                       for i in range(len(OPEN) + budget + len(CLOSE) + 3)], 1)
    for r in range(B):
        row = out[r].tolist()
        assert row[: len(OPEN)] == OPEN
        assert all(10 <= t < 20 for t in row[len(OPEN) : len(OPEN) + budget])
        assert row[len(OPEN) + budget : len(OPEN) + budget + len(CLOSE)] == CLOSE
        assert all(10 <= t < 20 for t in row[len(OPEN) + budget + len(CLOSE) :])  # the answer, sampled freely
    assert st.closed.all() and (st.phase == 2).all() and (st.think_count == budget).all()


def test_modes_match_the_python_loop_processor():
    """Random mixed batch over many steps: the device state machine equals the host-side reference loop."""
    B, steps = 12, 40
    gen = torch.Generator().manual_seed(5)
    modes = torch.randint(0, 3, (B,), generator=gen)
    budget = torch.randint(-1, 8, (B,), generator=gen)
    st = ModeState.create(modes, OPEN, NO_THINK, CLOSE, eos_id=EOS, pad_id=PAD, budget=budget, auto_ids=[90])
    ref = ModeProcessorRef(modes.tolist(), OPEN, NO_THINK, CLOSE, eos_id=EOS, pad_id=PAD, budget=budget.tolist(),
                           auto_ids=[90])
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    for _ in range(steps):
        logits = torch.randn(B, V_MODES, generator=gen)
        logits[:, [EOS, 91, 90, 92, 93]] += torch.tensor([0.8, 1.5, 0.5, 1.0, 1.0])  # special tokens come up
        step = sample_with_modes(logits, st, top_k=12, generator=g1)
        free, _ = sample(logits, top_k=12, generator=g2)
        was_finished = list(ref.finished)
        expected = ref.step(free.tolist())
        assert step.tokens.tolist() == expected
        assert step.forced.tolist() == ref.forced
        assert step.active.tolist() == [not f for f in was_finished]
        assert (step.logprobs[~step.active] == 0).all()
    assert st.finished.tolist() == ref.finished and st.closed.tolist() == ref.closed
    assert st.opened.tolist() == ref.opened
    assert st.finished.any() and st.closed.any()  # the test exercised finishing and closing


def test_mode_state_bad_input():
    with pytest.raises(ValueError, match="think_open_ids: empty forced sequence"):
        ModeState.create([1], [], NO_THINK, CLOSE, eos_id=EOS, pad_id=PAD)
    with pytest.raises(ValueError, match="think_close_ids: empty"):
        ModeState.create([1], OPEN, NO_THINK, [], eos_id=EOS, pad_id=PAD)
    with pytest.raises(ValueError, match="modes: 1 value"):
        ModeState.create([1, 5], OPEN, NO_THINK, CLOSE, eos_id=EOS, pad_id=PAD)
    with pytest.raises(ValueError, match="budget"):
        ModeState.create([1, 0], OPEN, NO_THINK, CLOSE, eos_id=EOS, pad_id=PAD, budget=torch.ones(3))
    st = ModeState.create([1, 0], OPEN, NO_THINK, CLOSE, eos_id=EOS, pad_id=PAD)
    with pytest.raises(ValueError, match="logits: batch of 3 rows, but state has 2"):
        sample_with_modes(torch.zeros(3, V_MODES), st)
    with pytest.raises(ValueError, match="ids go up to 99"):
        sample_with_modes(torch.zeros(2, 50), st)
    with pytest.raises(TypeError, match="state: expected a ModeState"):
        sample_with_modes(torch.zeros(2, V_MODES), None)


def test_public_examples_in_docstrings():
    import doctest

    runner = doctest.DocTestRunner()
    for fn in (sampling.sample, sampling.sample_with_modes):
        for t in doctest.DocTestFinder().find(fn, fn.__name__, globs={}):
            runner.run(t)
    assert runner.failures == 0 and runner.tries > 0


# ---------------------------------------------------------------------------------------------------------------
# Strict modes: min_think_tokens, no_reopen (banned ids inside every backend)
# ---------------------------------------------------------------------------------------------------------------
START, END = OPEN[0], CLOSE[1]  # "<think>", "</think>": the single tokens that open / close a block


def _run_modes(logits, st, steps, backend, device, seed=0, **kw):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        u = torch.rand(st.batch_size, generator=gen).to(device)
        out.append(sample_with_modes(logits.to(device), st, backend=backend, uniforms=u, **kw))
    return (torch.stack([o.tokens.cpu() for o in out], 1), torch.stack([o.logprobs.cpu() for o in out], 1),
            torch.stack([o.forced.cpu() for o in out], 1))  # fmt: skip


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("close", [CLOSE, [END, 92]], ids=["newline-close", "close-token-first"])
def test_min_think_tokens_thinks_despite_a_close_biased_model(backend_device, close):
    """The close token has by far the highest logit (eos next): THINK rows forced with min_think_tokens=k still
    think for exactly k tokens before the close sequence (greedy: ``</think>`` at the first allowed position; T=1:
    the close token has probability ~1 once allowed), and with k=0 they close at once: the constraint is what
    changes it. Log-probs are those of the unbanned distribution."""
    backend, device = backend_device
    B, ks = 8, [0, 1, 4, 6, 0, 1, 4, 6]
    logits = torch.randn(B, V_MODES, generator=torch.Generator().manual_seed(40))
    logits[:, END] = 30.0
    logits[:, EOS] = 25.0
    offset = close.index(END)  # "\n</think>": the "\n" before it does not count as thinking
    for temperature in (0.0, 1.0):
        st = ModeState.create([Mode.THINK] * B, OPEN, NO_THINK, close, eos_id=EOS, pad_id=PAD, min_think_tokens=ks)
        toks, lps, forced = _run_modes(logits, st, 12, backend, device, temperature=temperature)
        for r, k in enumerate(ks):
            row = toks[r].tolist()
            assert row[: len(OPEN)] == OPEN
            first_end = row.index(END)
            assert first_end == len(OPEN) + (k + offset if k else 0), (r, row)
            assert EOS not in row[:first_end]
            assert not forced[r, len(OPEN) :].any()
        t = 1.0 if temperature == 0 else temperature
        want = torch.log_softmax(logits / t, -1).gather(1, toks)
        torch.testing.assert_close(lps, want)
        assert (st.think_count == torch.tensor([k + offset + 1 if k else 1 for k in ks])).all()  # + </think>
    # the other modes are untouched by min_think_tokens: AUTO and NO_THINK rows as without it
    modes = [Mode.AUTO, Mode.NO_THINK, Mode.AUTO, Mode.NO_THINK]
    a = _run_modes(logits[:4], ModeState.create(modes, OPEN, NO_THINK, close, eos_id=EOS, pad_id=PAD,
                                                min_think_tokens=5), 8, backend, device)  # fmt: skip
    b = _run_modes(logits[:4], ModeState.create(modes, OPEN, NO_THINK, close, eos_id=EOS, pad_id=PAD), 8, backend,
                   device)  # fmt: skip
    assert torch.equal(a[0], b[0])


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_no_reopen_never_samples_a_think_tag_after_a_closed_block(backend_device):
    """After the forced non-thinking block, a THINK block closed by its budget or by the model, and an AUTO block
    the model closed itself, logits that strongly favour ``<think>`` and ``</think>`` never produce one with
    no_reopen (and do without it). Sampled at T=1 with top-k / top-p (filters after the ban: the next best tokens
    fill the nucleus) and greedy."""
    backend, device = backend_device
    B = 6
    modes = [Mode.NO_THINK, Mode.THINK, Mode.AUTO, Mode.NO_THINK, Mode.THINK, Mode.AUTO]
    logits = torch.randn(B, V_MODES, generator=torch.Generator().manual_seed(41))
    closes_itself = torch.tensor([False, False, True, False, True, True])  # </think> first, else <think> first
    logits[:, START] = torch.where(closes_itself, 19.0, 20.0)
    logits[:, END] = torch.where(closes_itself, 20.0, 19.0)
    logits[:, EOS] = -float("inf")
    budget = torch.tensor([-1, 2, -1, -1, -1, -1])  # row 1: closed by the budget; rows 2, 4, 5: by the model
    steps = 14
    mk = dict(eos_id=EOS, pad_id=PAD, budget=budget, auto_ids=[START])  # AUTO: "<think>", the model decides
    for kw in (dict(temperature=1.0, top_k=5, top_p=0.9), dict(temperature=0.0)):
        st = ModeState.create(modes, OPEN, NO_THINK, CLOSE, **mk, no_reopen=True)
        toks, lps, forced = _run_modes(logits, st, steps, backend, device, **kw)
        assert st.closed.all(), toks
        for r in range(B):
            row = toks[r].tolist()
            closed_at = row.index(END)  # the block's own close (forced or sampled)
            assert closed_at < 6
            assert START not in row[closed_at + 1 :] and END not in row[closed_at + 1 :], (r, row)
        t = kw["temperature"] or 1.0
        torch.testing.assert_close(lps, torch.log_softmax(logits / t, -1).gather(1, toks))
        st = ModeState.create(modes, OPEN, NO_THINK, CLOSE, **mk)
        free, _, _ = _run_modes(logits, st, steps, backend, device, **kw)
        for r in range(B):
            after = free[r].tolist()[free[r].tolist().index(END) + 1 :]
            assert after.count(START) + after.count(END) > 4, (r, free[r].tolist())


def test_task_tokenizer_think_tags_are_the_banned_ids():
    """The project's task tokenizer: whatever it does with ``"\\n\\n"``, the ids that open and close a block (and
    that strict modes ban) are its single special tokens ``<think>`` and ``</think>``, not a newline."""
    from r4b_fast.training.task import MODE_PREFIX, THINK_CLOSE_SEQUENCE, build_tokenizer

    tok = build_tokenizer()
    ids = {m: tok.encode(MODE_PREFIX[m], add_special_tokens=False) for m in (Mode.THINK, Mode.NO_THINK)}
    close = tok.encode(THINK_CLOSE_SEQUENCE, add_special_tokens=False)
    eos = tok.convert_tokens_to_ids(tok.eos_token)
    st = ModeState.create([Mode.NO_THINK, Mode.THINK], ids[Mode.THINK], ids[Mode.NO_THINK], close, eos_id=eos,
                          pad_id=tok.pad_token_id, no_reopen=True, min_think_tokens=2)  # fmt: skip
    assert st.think_start_id == tok.convert_tokens_to_ids("<think>")
    assert st.think_end_id == tok.convert_tokens_to_ids("</think>")
    nl = tok.convert_tokens_to_ids("\n")
    assert nl not in (st.think_start_id, st.think_end_id)
    # min_end counts the close sequence's tokens before </think> ("\n")
    assert st.min_end.tolist() == [0, 2 + close.index(st.think_end_id)]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on the all -inf allowed row
@pytest.mark.parametrize("backend_device", BACKENDS)
def test_banned_sampling_matches_the_reference_inverse_cdf(backend_device):
    """The sampler with banned ids (two blocks of vocabulary, every filter) is the inverse CDF of the reference
    distribution with those ids set to -inf first; log-probs of the unbanned row; a row whose only finite logits
    are banned returns its first allowed id, never a banned one."""
    backend, device = backend_device
    B, V = 8, 1100
    gen = torch.Generator().manual_seed(42)
    logits = torch.randn(B, V, generator=gen) * 2
    banned = torch.tensor([[int(logits[r].argmax()), 7, -1] for r in range(B)])  # the argmax banned: a real change
    banned[3] = torch.tensor([-1, -1, -1])
    banned[5, 2] = banned[5, 0]  # repeated ids
    logits[6] = -float("inf")
    logits[6, [0, 1]] = 3.0
    banned[6] = torch.tensor([0, 1, -1])  # only finite logits banned -> first allowed id: 2
    params = dict(temperature=torch.tensor([1.0, 0.7, 0.0, 1.3, 1.0, 2.0, 1.0, 1.0]),
                  top_k=torch.tensor([0, 5, 0, 40, 0, 0, 0, 17]),
                  top_p=torch.tensor([1.0, 1.0, 1.0, 0.6, 0.9, 0.95, 1.0, 0.5]),
                  min_p=torch.tensor([0.0, 0.0, 0.0, 0.01, 0.0, 0.0, 0.0, 0.05]))  # fmt: skip
    u = torch.rand(B, generator=torch.Generator().manual_seed(11))
    tokens, logprobs, row_max, log_z, _ = sampling._sample_impl(
        logits.to(device), *[params[k].to(device) for k in ("temperature", "top_k", "top_p", "min_p")], None, backend,
        False, u.to(device), banned.to(device))  # fmt: skip
    tokens, logprobs = tokens.cpu(), logprobs.cpu()
    ok = torch.tensor([r != 6 for r in range(B)])
    q = filtered_probs_ref(logits[ok], *[params[k][ok] for k in ("temperature", "top_k", "top_p", "min_p")],
                           banned=banned[ok])  # fmt: skip
    cdf = q.cumsum(1)
    expected = torch.searchsorted(cdf, u[ok].double()[:, None], right=True).clamp(max=V - 1)[:, 0]
    near = (cdf - u[ok].double()[:, None]).abs().min(1).values < 1e-5
    assert ((tokens[ok] == expected) | near).all(), (tokens[ok], expected)
    assert tokens[2] == logits[2].topk(2).indices[1]  # greedy: the best allowed token
    assert tokens[6] == 2 and logprobs[6] == -float("inf")
    assert not (tokens[:, None] == banned).any()
    t = torch.where(params["temperature"] == 0, 1.0, params["temperature"])
    want = torch.log_softmax(logits / t[:, None], -1)
    torch.testing.assert_close(logprobs[ok], want[ok].gather(1, tokens[ok, None])[:, 0])
    torch.testing.assert_close(row_max.cpu(), logits.amax(1))
    torch.testing.assert_close(log_z.cpu()[ok], torch.logsumexp((logits - logits.amax(1, keepdim=True))[ok]
                                                                / t[ok, None], -1))  # fmt: skip


def test_banned_sampling_frequencies_match_the_reference():
    """torch backend, candidates and full-vocabulary paths: draws with banned ids follow the reference."""
    V, n = 64, 20000
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(43)).expand(n, V).contiguous() * 1.5
    ban_row = torch.tensor([int(logits[0].argmax()), 3, -1])
    banned = ban_row.expand(n, 3)
    for candidates in (1024, 8):
        u = torch.rand(n, generator=torch.Generator().manual_seed(candidates))
        tokens, *_ = sampling._sample_op(logits, torch.ones(n), torch.zeros(n, dtype=torch.int64),
                                         torch.full((n,), 0.9), torch.zeros(n), u, candidates, "torch", banned)
        q = filtered_probs_ref(logits[:1], torch.ones(1), torch.zeros(1, dtype=torch.int64), torch.full((1,), 0.9),
                               torch.zeros(1), banned=ban_row[None])[0]  # fmt: skip
        assert _matches(tokens, q)


@pytest.mark.parametrize("backend_device", [b for b in BACKENDS if b.values[0][0] != "torch"])
def test_strict_modes_backends_agree_with_torch(backend_device):
    """Same uniforms -> same tokens: a random mixed batch with min_think_tokens, no_reopen and a budget, run by a
    kernel backend and by the torch backend side by side (log-probs to rounding)."""
    backend, device = backend_device
    B, steps = 10, 24
    gen = torch.Generator().manual_seed(44)
    modes = torch.randint(0, 3, (B,), generator=gen)
    budget = torch.tensor([-1, 6, -1, 9, -1, -1, 5, -1, -1, 12])
    mk = dict(eos_id=EOS, pad_id=PAD, budget=budget, min_think_tokens=torch.tensor([3, 2, 0, 4, 5, 1, 5, 2, 8, 3]),
              no_reopen=True)  # fmt: skip
    a = ModeState.create(modes.to(device), OPEN, NO_THINK, CLOSE, **mk)
    b = ModeState.create(modes, OPEN, NO_THINK, CLOSE, **mk)
    for _ in range(steps):
        logits = torch.randn(B, V_MODES, generator=gen)
        logits[:, [EOS, START, END, 92, 93]] += torch.tensor([0.5, 2.5, 3.0, 1.0, 1.0])
        u = torch.rand(B, generator=gen)
        sa = sample_with_modes(logits.to(device), a, temperature=0.9, top_p=0.95, uniforms=u.to(device),
                               backend=backend)  # fmt: skip
        sb = sample_with_modes(logits, b, temperature=0.9, top_p=0.95, uniforms=u, backend="torch")
        assert sa.tokens.cpu().tolist() == sb.tokens.tolist()
        torch.testing.assert_close(sa.logprobs.cpu(), sb.logprobs)
    assert b.closed.any() and b.finished.any()


def test_strict_modes_match_the_python_loop_processor():
    """The device state machine's banned ids equal the host-side reference loop's, step by step, on a random mixed
    batch (the free tokens drawn with the reference's bans)."""
    B, steps = 12, 40
    gen = torch.Generator().manual_seed(45)
    modes = torch.randint(0, 3, (B,), generator=gen)
    budget = torch.randint(-1, 10, (B,), generator=gen)
    mt = torch.where(budget >= 0, torch.minimum(budget, torch.tensor(3)), 3)
    kw = dict(eos_id=EOS, pad_id=PAD, budget=budget.tolist(), auto_ids=[90], no_reopen=True,
              min_think_tokens=mt.tolist())  # fmt: skip
    st = ModeState.create(modes, OPEN, NO_THINK, CLOSE, **{**kw, "budget": budget})
    ref = ModeProcessorRef(modes.tolist(), OPEN, NO_THINK, CLOSE, **kw)
    for _ in range(steps):
        logits = torch.randn(B, V_MODES, generator=gen)
        logits[:, [EOS, 91, 90, 92, 93]] += torch.tensor([1.5, 1.5, 2.0, 1.0, 2.5])  # special tokens come up
        u = torch.rand(B, generator=gen)
        bans = ref.banned()
        ban_t = torch.tensor([b + [-1] * (4 - len(b)) for b in bans])
        free, *_ = sampling._sample_impl(logits, *[torch.full((B,), v) for v in (1.0,)], 12, 1.0, 0.0, None, "torch",
                                         False, u, ban_t)  # fmt: skip
        step = sample_with_modes(logits, st, top_k=12, uniforms=u, backend="torch")
        assert step.tokens.tolist() == ref.step(free.tolist())
        assert step.forced.tolist() == ref.forced
    assert st.closed.tolist() == ref.closed and st.finished.tolist() == ref.finished
    assert st.closed.any() and st.finished.any() and any(ref.banned())


def test_mode_state_strict_bad_input():
    kw = dict(eos_id=EOS, pad_id=PAD)
    for bad in ([1.5, 0], [1.0], ["1"], [True, 0], [None]):
        with pytest.raises(ValueError, match="modes: expected integer modes"):
            ModeState.create(bad, OPEN, NO_THINK, CLOSE, **kw)
    import numpy as np

    st = ModeState.create([np.int64(1), Mode.AUTO, 0], OPEN, NO_THINK, CLOSE, **kw)
    assert st.mode.tolist() == [1, 2, 0]
    for bad, match in ((-1, "values >= 0"), (1.5, "expected an int"), ([1, 2, 3], "3 values for 2 rows"),
                       (torch.tensor([1.0, 2.0]), "integer tensor"), (torch.ones(3, dtype=torch.long), "shape")):
        with pytest.raises(ValueError, match=f"min_think_tokens: .*{match}"):
            ModeState.create([1, 0], OPEN, NO_THINK, CLOSE, min_think_tokens=bad, **kw)
    with pytest.raises(ValueError, match="min_think_tokens: 5 for row 0, above its thinking budget 3"):
        ModeState.create([1, 0], OPEN, NO_THINK, CLOSE, min_think_tokens=5, budget=3, **kw)
    ModeState.create([0, 2], OPEN, NO_THINK, CLOSE, min_think_tokens=5, budget=3, **kw)  # not THINK rows: unused
    with pytest.raises(ValueError, match="no_reopen: expected a bool"):
        ModeState.create([1, 0], OPEN, NO_THINK, CLOSE, no_reopen=1, **kw)
