"""pack_multimodal: every backend against the loop reference and transformers' own get_rope_index, gradients, unpack,
bad input, torch.library."""

import pytest
import torch
from conftest import kernel_backends

from r4b_fast.ops.pack_multimodal import PackedBatch, pack_multimodal, pack_multimodal_ref, unpack

BACKENDS = kernel_backends()
IMG, VSTART, VEND, VOCAB = 100, 102, 103, 128


def make_batch(
    n_images=(0, 1, 3),
    seed=0,
    merge=2,
    max_text=7,
    pad_sides=("right", "left"),
    grids=None,
    vocab=VOCAB,
    image_token_id=IMG,
):
    """A padded batch with one sample per entry of ``n_images``: random text, images wrapped in vision start/end
    tokens, mixed lengths, left and right padding. Returns ``(input_ids, attention_mask, grid [n_img, 3])``."""
    gen = torch.Generator().manual_seed(seed)
    rows, grid = [], []
    sizes = grids or [(1, 2, 2), (1, 2, 4), (1, 4, 2), (1, 4, 6), (2, 2, 4), (1, 6, 4)]
    for n in n_images:
        toks = torch.randint(0, 90, (int(torch.randint(1, max_text + 1, (1,), generator=gen)),), generator=gen).tolist()
        for _ in range(n):
            t, h, w = sizes[int(torch.randint(0, len(sizes), (1,), generator=gen))]
            t, h, w = t, h * merge // 2, w * merge // 2
            grid.append((t, h, w))
            toks += [VSTART] + [image_token_id] * (t * h * w // merge**2) + [VEND]
            toks += torch.randint(
                0, 90, (int(torch.randint(0, max_text, (1,), generator=gen)),), generator=gen
            ).tolist()
        rows.append(toks)
    seq_len = max(len(r) for r in rows) + 2
    ids = torch.full((len(rows), seq_len), 0, dtype=torch.long)
    mask = torch.zeros(len(rows), seq_len, dtype=torch.long)
    for b, toks in enumerate(rows):
        start = 0 if pad_sides[b % len(pad_sides)] == "right" else seq_len - len(toks)
        ids[b, start : start + len(toks)] = torch.tensor(toks)
        mask[b, start : start + len(toks)] = 1
    ids[mask == 0] = vocab + 7  # padding ids outside the vocabulary must be ignored
    grid_t = torch.tensor(grid, dtype=torch.long).reshape(-1, 3)
    return ids, mask, grid_t


def _n_vis(ids, mask):
    return int(((ids == IMG) & mask.bool()).sum())


def tiny_qwen25vl_config(**text):
    from transformers import Qwen2_5_VLConfig

    text_config = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]}, **text)  # fmt: skip
    vision_config = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                         patch_size=2, spatial_merge_size=2, temporal_patch_size=2, window_size=8,
                         fullatt_block_indexes=[0])  # fmt: skip
    return Qwen2_5_VLConfig(text_config=text_config, vision_config=vision_config, image_token_id=IMG,
                            video_token_id=101, vision_start_token_id=VSTART, vision_end_token_id=VEND)  # fmt: skip


@pytest.fixture(scope="module")
def hf_qwen25vl():
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(tiny_qwen25vl_config()).eval()


# ---------------------------------------------------------------------------------------------------------------
# against the loop reference
# ---------------------------------------------------------------------------------------------------------------
CASES = [
    ((0, 1, 3), 0, "mrope"),
    ((3, 0, 1, 1), 1, "mrope"),
    ((0,), 2, "mrope"),
    ((1,), 3, "1d"),
    ((0, 3, 1, 0, 2), 4, "1d"),
]


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("n_images,seed,rope", CASES)
@pytest.mark.parametrize("source", ["embed_weight", "text_embeds"])
def test_matches_loop_reference(backend_device, n_images, seed, rope, source):
    backend, device = backend_device
    ids, mask, grid = make_batch(n_images, seed)
    d = 24
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(VOCAB, d, generator=gen)
    vision = torch.randn(_n_vis(ids, mask), d, generator=gen)
    table = weight if source == "embed_weight" else weight[ids.clamp_max(VOCAB - 1)] + 0.5
    kw = dict(image_token_id=IMG, rope=rope, image_grid_thw=grid if rope == "mrope" else None)
    ref_embeds, ref_pos, ref_cu, ref_deltas = pack_multimodal_ref(
        ids, mask, table, vision, text_embeds=source != "embed_weight", **kw
    )
    tensors = {source: table.to(device)}
    out = pack_multimodal(
        ids.to(device),
        mask.to(device),
        vision_embeds=vision.to(device),
        backend=backend,
        **tensors,
        **{**kw, "image_grid_thw": None if kw["image_grid_thw"] is None else grid.to(device)},
    )
    assert isinstance(out, PackedBatch)
    assert torch.equal(out.inputs_embeds.cpu(), ref_embeds)  # a copy: bit-exact
    assert out.position_ids.dtype == torch.int64 and torch.equal(out.position_ids.cpu(), ref_pos)
    assert out.cu_seqlens.dtype == torch.int32 and torch.equal(out.cu_seqlens.cpu(), ref_cu)
    assert out.max_seqlen == int(mask.sum(1).max())
    assert torch.equal(out.indices.cpu(), torch.nonzero(mask.reshape(-1)).reshape(-1))
    if rope == "mrope":
        assert torch.equal(out.rope_deltas.cpu(), ref_deltas)
    else:
        assert out.rope_deltas is None


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_tables_copy_exactly(backend_device, dtype):
    backend, device = backend_device
    ids, mask, grid = make_batch((1, 0, 3), 5)
    weight = torch.randn(VOCAB, 40).to(dtype)
    vision = torch.randn(_n_vis(ids, mask), 40).to(dtype)
    ref = pack_multimodal_ref(ids, mask, weight, vision, image_token_id=IMG, rope="mrope", image_grid_thw=grid)
    out = pack_multimodal(
        ids.to(device),
        mask.to(device),
        weight.to(device),
        vision.to(device),
        image_token_id=IMG,
        rope="mrope",
        image_grid_thw=grid.to(device),
        backend=backend,
    )
    assert out.inputs_embeds.dtype == dtype
    assert torch.equal(out.inputs_embeds.cpu(), ref[0])
    assert torch.equal(out.position_ids.cpu(), ref[1])


# ---------------------------------------------------------------------------------------------------------------
# against transformers' own Qwen2.5-VL get_rope_index (the real method, on a tiny model built from its config)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("n_images,seed", [((0, 1, 3), 10), ((3, 3, 0, 1, 1, 0), 11), ((1,), 12), ((2, 1), 13)])
def test_mrope_positions_equal_transformers_get_rope_index(hf_qwen25vl, backend_device, n_images, seed):
    backend, device = backend_device
    ids, mask, grid = make_batch(n_images, seed)
    ids = ids.clamp_max(VOCAB - 1)  # transformers' loop reads padding ids as text
    want, want_deltas = hf_qwen25vl.model.get_rope_index(
        ids, (ids == IMG).int(), image_grid_thw=grid if len(grid) else None, attention_mask=mask
    )
    weight = hf_qwen25vl.get_input_embeddings().weight.detach()
    vision = torch.randn(_n_vis(ids, mask), weight.shape[1])
    out = pack_multimodal(
        ids.to(device),
        mask.to(device),
        weight.to(device),
        vision.to(device),
        image_token_id=IMG,
        rope="mrope",
        image_grid_thw=grid.to(device),
        backend=backend,
    )
    got = out.position_ids.cpu()
    assert got.dtype == want.dtype
    assert torch.equal(got, want.reshape(3, -1)[:, mask.reshape(-1).bool()])  # bit-identical at the real tokens
    assert torch.equal(out.rope_deltas.cpu(), want_deltas)
    # the same batch through transformers' masked_scatter path gives the same embeddings
    embeds = hf_qwen25vl.get_input_embeddings()(ids)
    image_mask, _ = hf_qwen25vl.model.get_placeholder_mask(ids, inputs_embeds=embeds, image_features=vision)
    embeds = embeds.masked_scatter(image_mask, vision)
    assert torch.equal(out.inputs_embeds.detach().cpu(), embeds[mask.bool()].detach())


# ---------------------------------------------------------------------------------------------------------------
# gradients, unpack
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("source", ["embed_weight", "text_embeds"])
def test_gradients_match_reference(backend_device, source):
    backend, device = backend_device
    ids, mask, grid = make_batch((0, 1, 3), 7)
    d = 16
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(VOCAB, d, generator=gen, dtype=torch.float64)
    table = base if source == "embed_weight" else torch.randn(*ids.shape, d, generator=gen, dtype=torch.float64)
    vision = torch.randn(_n_vis(ids, mask), d, generator=gen, dtype=torch.float64)
    t_ref, v_ref = table.clone().requires_grad_(), vision.clone().requires_grad_()
    ref = pack_multimodal_ref(
        ids,
        mask,
        t_ref,
        v_ref,
        image_token_id=IMG,
        rope="mrope",
        image_grid_thw=grid,
        text_embeds=source != "embed_weight",
    )[0]
    w = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    (ref * w).sum().backward()
    t_got = table.to(device).requires_grad_()
    v_got = vision.to(device).requires_grad_()
    out = pack_multimodal(
        ids.to(device),
        mask.to(device),
        vision_embeds=v_got,
        image_token_id=IMG,
        rope="mrope",
        image_grid_thw=grid.to(device),
        backend=backend,
        **{source: t_got},
    )
    (out.inputs_embeds * w.to(device)).sum().backward()
    torch.testing.assert_close(t_got.grad.cpu(), t_ref.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(v_got.grad.cpu(), v_ref.grad, rtol=0, atol=0)
    if source == "embed_weight":  # placeholders give no gradient to the image token's row (it was replaced)
        assert (t_got.grad[IMG] == 0).all()


def test_gradcheck_torch_op():
    ids, mask, grid = make_batch((1, 0), 3, max_text=3)
    table = torch.randn(VOCAB, 3, dtype=torch.float64, requires_grad=True)
    vision = torch.randn(_n_vis(ids, mask), 3, dtype=torch.float64, requires_grad=True)

    def f(t, v):
        return pack_multimodal(ids, mask, t, v, image_token_id=IMG, rope="mrope", image_grid_thw=grid).inputs_embeds

    assert torch.autograd.gradcheck(f, (table, vision))


def test_unpack_and_pack_round_trip():
    ids, mask, grid = make_batch((0, 1, 3), 8)
    weight = torch.randn(VOCAB, 8)
    vision = torch.randn(_n_vis(ids, mask), 8)
    out = pack_multimodal(ids, mask, weight, vision, image_token_id=IMG, rope="mrope", image_grid_thw=grid)
    labels = torch.where(mask.bool(), ids, -100)
    packed_labels = out.pack(labels)
    assert torch.equal(packed_labels, ids[mask.bool()])
    back = unpack(packed_labels, out, fill_value=-100)
    assert torch.equal(back, labels)
    per_token = out.inputs_embeds.sum(-1)
    padded = unpack(per_token[None], out)  # a [1, T] model output works too
    assert padded.shape == ids.shape and (padded[~mask.bool()] == 0).all()
    # differentiable
    x = out.inputs_embeds.clone().requires_grad_()
    unpack(x, out).sum().backward()
    assert (x.grad == 1).all()


def test_one_host_sync(monkeypatch):
    """All value checks, T and max_seqlen are read back with a single ``.tolist()``; nothing else syncs."""
    ids, mask, grid = make_batch((0, 1, 3), 9)
    weight, vision = torch.randn(VOCAB, 8), torch.randn(_n_vis(ids, mask), 8)
    calls = {"tolist": 0, "item": 0}
    orig_tolist, orig_item = torch.Tensor.tolist, torch.Tensor.item

    def tolist(self):
        calls["tolist"] += 1
        return orig_tolist(self)

    def item(self):
        calls["item"] += 1
        return orig_item(self)

    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    monkeypatch.setattr(torch.Tensor, "item", item)
    pack_multimodal(ids, mask, weight, vision, image_token_id=IMG, rope="mrope", image_grid_thw=grid, backend="torch")
    assert calls == {"tolist": 1, "item": 0}


# ---------------------------------------------------------------------------------------------------------------
# bad input: a clear error before any kernel runs
# ---------------------------------------------------------------------------------------------------------------
def _bad_cases():
    ids, mask, grid = make_batch((1, 3), 20)
    w = torch.randn(VOCAB, 8)
    nv = _n_vis(ids, mask)
    v = torch.randn(nv, 8)
    base = dict(input_ids=ids, attention_mask=mask, embed_weight=w, vision_embeds=v, image_token_id=IMG,
                rope="mrope", image_grid_thw=grid)  # fmt: skip
    mixed = mask.clone()
    mixed[0, 0] = 0  # row 0 is right-padded: now padded on both sides
    holed = mask.clone()
    holed[1, int(mask[1].nonzero()[2])] = 0
    empty = mask.clone()
    empty[1] = 0
    oov = ids.clone()
    oov[1, int(mask[1].nonzero()[0])] = VOCAB + 3
    neg = ids.clone()
    neg[0, 0] = -1
    grid_bad = grid.clone()
    grid_bad[1, 1] += 2  # image 1's grid says more placeholders than it has (total count then differs too)
    grid_swap = grid.flip(0)  # right total only if equal sizes; usually per-image mismatch
    return [
        (
            dict(vision_embeds=torch.randn(nv - 1, 8)),
            ValueError,
            f"vision_embeds: {nv - 1} row.s., but input_ids hold {nv} image placeholder",
        ),
        (dict(vision_embeds=torch.randn(nv, 9)), ValueError, "vision_embeds: expected shape"),
        (dict(image_grid_thw=grid_bad), ValueError, "image_grid_thw: the grids give"),
        (dict(image_grid_thw=grid_swap), ValueError, "image_grid_thw"),
        (dict(image_grid_thw=grid[:1]), ValueError, "image_grid_thw"),
        (dict(image_grid_thw=torch.tensor([[1, 3, 4], [1, 2, 2]])), ValueError, "not divisible by spatial_merge"),
        (dict(image_grid_thw=None), ValueError, "image_grid_thw: rope='mrope' with images needs"),
        (dict(image_grid_thw=grid.float()), TypeError, "image_grid_thw: expected an integer"),
        (
            dict(input_ids=oov),
            ValueError,
            rf"input_ids: 1 real token id.s. outside the vocabulary \[0, {VOCAB}\).*"
            rf"id {VOCAB + 3} at row 1",
        ),
        (dict(input_ids=neg), ValueError, "input_ids: 1 real token id.s. outside the vocabulary"),
        (dict(attention_mask=mixed), ValueError, "attention_mask: 1 row.s. mix left and right padding.*row 0"),
        (dict(attention_mask=holed), ValueError, "attention_mask: 1 row.s. mix left and right padding.*row 1"),
        (dict(attention_mask=empty), ValueError, "attention_mask: 1 row.s. have no real token .first: row 1"),
        (dict(attention_mask=mask * 2), ValueError, "attention_mask: .* other than 0 and 1"),
        (dict(attention_mask=mask.float()), TypeError, "attention_mask: expected a bool or integer"),
        (dict(attention_mask=mask[:, 1:]), ValueError, "attention_mask: expected shape"),
        (dict(input_ids=ids.float()), TypeError, "input_ids: expected an integer"),
        (dict(input_ids=ids[0]), ValueError, "input_ids: expected a 2-D"),
        (dict(embed_weight=None), ValueError, "give exactly one"),
        (dict(text_embeds=torch.randn(*ids.shape, 8)), ValueError, "give exactly one"),
        (dict(embed_weight=w.long()), TypeError, "embed_weight: expected a floating-point"),
        (dict(rope="2d"), ValueError, "rope: expected one of"),
        (dict(image_token_id=1.0), TypeError, "image_token_id: expected an int"),
        (dict(spatial_merge_size=0), ValueError, "spatial_merge_size"),
        (dict(backend="nope"), Exception, "unknown backend"),
    ], base


@pytest.mark.parametrize("case", range(len(_bad_cases()[0])))
def test_bad_input_is_rejected_with_a_clear_error(case):
    cases, base = _bad_cases()
    change, exc, match = cases[case]
    with pytest.raises(exc, match=match):
        pack_multimodal(**{**base, **change})


def test_adjacent_images_are_rejected_as_transformers_cannot_split_them():
    ids = torch.tensor([[5, IMG, IMG, IMG, IMG, 6]])  # two 1x4x2 images with no separator
    with pytest.raises(ValueError, match="2 image.s., but input_ids hold 1 run"):
        pack_multimodal(
            ids,
            torch.ones_like(ids),
            torch.randn(VOCAB, 4),
            torch.randn(4, 4),
            image_token_id=IMG,
            rope="mrope",
            image_grid_thw=torch.tensor([[1, 4, 2], [1, 4, 2]]),
        )


# ---------------------------------------------------------------------------------------------------------------
# torch.library
# ---------------------------------------------------------------------------------------------------------------
def test_opcheck():
    op = torch.ops.r4b_fast.pack_multimodal_gather.default
    table = torch.randn(10, 4, requires_grad=True)
    vision = torch.randn(3, 4, requires_grad=True)
    src = torch.tensor([0, -1, -2, 5, 9, -3, 5])
    torch.library.opcheck(op, (table, vision, src))


def test_public_example_in_docstring():
    import doctest

    from r4b_fast.ops import pack_multimodal as mod

    runner = doctest.DocTestRunner()
    for t in doctest.DocTestFinder().find(mod.pack_multimodal, "pack_multimodal", globs={}):
        runner.run(t)
    assert runner.failures == 0 and runner.tries > 0


def test_grid_that_does_not_match_each_image_is_rejected():
    # image 0 has 2 placeholders, image 1 has 4: the grids swapped give the right total but the wrong split
    ids = torch.tensor([[5, VSTART, IMG, IMG, VEND, 6, VSTART, IMG, IMG, IMG, IMG, VEND]])
    grid = torch.tensor([[1, 4, 4], [1, 2, 4]])
    with pytest.raises(ValueError, match=r"2 image.s. whose placeholder count does not match.*first: image 0 has 2"):
        pack_multimodal(
            ids, torch.ones_like(ids), torch.randn(VOCAB, 4), torch.randn(6, 4), image_token_id=IMG, rope="mrope",
            image_grid_thw=grid,
        )  # fmt: skip
    out = pack_multimodal(ids, torch.ones_like(ids), torch.randn(VOCAB, 4), torch.randn(6, 4), image_token_id=IMG,
                          rope="mrope", image_grid_thw=grid.flip(0))  # fmt: skip
    assert out.position_ids.shape == (3, 12)


# ---------------------------------------------------------------------------------------------------------------
# multi-block paths: samples over 256 tokens (several Triton BLOCK_T steps and CUDA 256-token chunks), rows over
# several slices (Triton 256 bytes, CUDA 512 bytes) and every copy width the launchers choose
# ---------------------------------------------------------------------------------------------------------------
# (dtype, D, storage offset of the table in elements, copy width in bytes that copy_unit_bytes must choose)
WIDTH_CASES = [
    (torch.bfloat16, 296, 0, 16),  # 592-byte rows
    (torch.float32, 150, 0, 8),  # 600 bytes: 8-aligned, not 16
    (torch.bfloat16, 298, 0, 4),  # 596 bytes
    (torch.float16, 297, 0, 2),  # 594 bytes
    (torch.bfloat16, 296, 1, 2),  # 16-byte rows, but the table view starts 2 bytes into its storage
    (torch.float64, 76, 0, 16),  # 608 bytes
]


def _long_batch(seed):
    """Three samples, the longest well over 256 tokens, images of 32-64 placeholders, left and right padding."""
    ids, mask, grid = make_batch((3, 0, 2), seed, max_text=150, grids=[(1, 16, 16), (1, 12, 20), (2, 8, 8)])
    assert int(mask.sum(1).max()) > 300
    return ids, mask, grid


def _spy_widths(monkeypatch):
    """Record the copy width each launcher chose (copy_unit_bytes is looked up in both modules)."""
    import r4b_fast.ops.pack_multimodal.kernel_backends as ops_mod  # the cuda launcher's module

    seen, original = [], ops_mod.copy_unit_bytes

    def spy(*args, **kwargs):
        seen.append(original(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(ops_mod, "copy_unit_bytes", spy)
    try:
        import r4b_fast.kernels.pack_multimodal as kmod

        monkeypatch.setattr(kmod, "copy_unit_bytes", spy)
    except ImportError:  # no triton: only the cuda launcher can run
        pass
    return seen


def test_width_cases_cover_every_copy_width():
    from r4b_fast.ops.pack_multimodal import COPY_UNITS, copy_unit_bytes

    widths = set()
    for dtype, d, offset, want in WIDTH_CASES:
        table = torch.zeros(VOCAB * d + offset, dtype=dtype)[offset:].view(VOCAB, d)
        got = copy_unit_bytes(d * table.element_size(), (table,), 16)
        assert got == want, (dtype, d, offset)
        widths.add(got)
    # 1-byte copies need 1-byte elements, which pack_multimodal rejects
    assert widths == set(COPY_UNITS) - {1}


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("dtype,d,offset,width", WIDTH_CASES)
@pytest.mark.parametrize("rope,source", [("mrope", "embed_weight"), ("1d", "text_embeds")])
def test_multi_block_every_copy_width(backend_device, dtype, d, offset, width, rope, source, monkeypatch):
    backend, device = backend_device
    ids, mask, grid = _long_batch(30 + d)
    gen = torch.Generator().manual_seed(d)
    rows = VOCAB if source == "embed_weight" else ids.numel()
    storage = torch.randn(rows * d + offset, generator=gen).to(dtype).to(device)
    table = storage[offset:].view(rows, d)
    vision = torch.randn(_n_vis(ids, mask), d, generator=gen).to(dtype)
    table_cpu = table.cpu() if source == "embed_weight" else table.cpu().view(*ids.shape, d)
    kw = dict(image_token_id=IMG, rope=rope, image_grid_thw=grid if rope == "mrope" else None)
    ref_embeds, ref_pos, ref_cu, ref_deltas = pack_multimodal_ref(
        ids, mask, table_cpu, vision, text_embeds=source == "text_embeds", **kw
    )
    seen = _spy_widths(monkeypatch)
    arg = table if source == "embed_weight" else table.view(*ids.shape, d)
    out = pack_multimodal(ids.to(device), mask.to(device), vision_embeds=vision.to(device), backend=backend,
                          **{source: arg}, **{**kw, "image_grid_thw": None if rope == "1d" else grid.to(device)})
    if backend != "torch":  # both launchers choose the same width (Triton moves 16-byte copies as int64 pairs)
        assert seen == [width]
    assert torch.equal(out.inputs_embeds.cpu(), ref_embeds)  # a copy: bit-exact
    assert torch.equal(out.position_ids.cpu(), ref_pos)
    assert torch.equal(out.cu_seqlens.cpu(), ref_cu)
    if rope == "mrope":
        assert torch.equal(out.rope_deltas.cpu(), ref_deltas)


def test_fp8_tables_are_rejected():
    ids, mask, _ = make_batch((0,), 1)
    with pytest.raises(TypeError, match="embed_weight: dtype torch.float8_e4m3fn is not supported"):
        pack_multimodal(ids, mask, torch.zeros(VOCAB, 4).to(torch.float8_e4m3fn), image_token_id=IMG)


# ---------------------------------------------------------------------------------------------------------------
# offsets near 2^31: the kernels' index helpers, run by a probe kernel (interpreted here, compiled on a GPU)
# ---------------------------------------------------------------------------------------------------------------
try:  # the kernels' own index helpers, called from a probe kernel (module level: @jit resolves module globals)
    import triton
    import triton.language as tl

    from r4b_fast.kernels.pack_multimodal import _flat_index, _row_offset

    @triton.jit
    def _offset_probe_kernel(rows_ptr, out_ptr, flat_ptr, n, R, L, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        rows = tl.load(rows_ptr + i, mask=i < n, other=0)  # int32
        tl.store(out_ptr + i, _row_offset(rows, R), mask=i < n)
        tl.store(flat_ptr + i, _flat_index(rows, L, rows * 0 + 5, i), mask=i < n)
except ImportError:
    _offset_probe_kernel = None


@pytest.mark.skipif(not [p for p in BACKENDS if p.id == "triton" and not p.marks], reason="triton cannot run here")
def test_row_offsets_are_64_bit_past_2_31():
    """600k packed tokens of D = 4096 (and a padded batch of 300k x 8192): int32 products would wrap. The inputs
    arrive as int32, as the kernel's per-sample arrays and program ids do."""
    from conftest import DEVICE

    rows = torch.tensor([1, 524287, 524288, 600000, 2**31 // 4096 + 7, 2**31 - 1], dtype=torch.int32)
    out = torch.zeros(6, dtype=torch.int64, device=DEVICE)
    flat = torch.zeros(6, dtype=torch.int64, device=DEVICE)
    _offset_probe_kernel[(1,)](rows.to(DEVICE), out, flat, 6, 4096, 8192, BLOCK=8)
    r64 = rows.long()
    assert out.cpu().tolist() == (r64 * 4096).tolist()
    assert flat.cpu().tolist() == (r64 * 8192 + 5 + torch.arange(6)).tolist()
    assert (out.cpu()[3:] > 2**31).all()


# ---------------------------------------------------------------------------------------------------------------
# a tensor on another GPU than the current one: the launch must follow the tensors (device guard)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend_device", [p for p in BACKENDS if p.id != "torch"])
def test_tensors_on_another_gpu(backend_device):
    backend, _ = backend_device
    ids, mask, grid = _long_batch(5)
    weight = torch.randn(VOCAB, 296).to(torch.bfloat16)
    vision = torch.randn(_n_vis(ids, mask), 296).to(torch.bfloat16)
    ref = pack_multimodal_ref(ids, mask, weight, vision, image_token_id=IMG, rope="mrope", image_grid_thw=grid)
    dev = torch.device("cuda", 1)
    assert torch.cuda.current_device() == 0
    out = pack_multimodal(ids.to(dev), mask.to(dev), weight.to(dev), vision.to(dev), image_token_id=IMG,
                          rope="mrope", image_grid_thw=grid.to(dev), backend=backend)
    torch.cuda.synchronize(dev)
    assert out.inputs_embeds.device == dev
    assert torch.equal(out.inputs_embeds.cpu(), ref[0])
    assert torch.equal(out.position_ids.cpu(), ref[1])
