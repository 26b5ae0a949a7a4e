"""packed_forward: tiny random LLaVA-OneVision (Qwen3 text model, the R-4B architecture) and Qwen2.5-VL models give
the same logits and gradients on a packed batch as transformers' own padded forward."""

import importlib.util

import pytest
import torch
from test_pack_multimodal import IMG, VOCAB, make_batch, tiny_qwen25vl_config

from r4b_fast.ops.pack_multimodal import pack_multimodal, unpack
from r4b_fast.packed_forward import (
    ATTN_IMPLEMENTATION,
    attention_backend_reasons,
    choose_attention_backend,
    enable_packed_attention,
    packed_attention,
    packed_context,
    packed_forward,
)

HAS_GPU = torch.cuda.is_available()
N_IMAGES = (0, 1, 3, 1, 0)  # mixed lengths, left and right padding, 0, 1 and 3 images per sample


def _loss_weights(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _param_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare_grads(got, want, rtol=1e-4, atol=1e-5):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol, msg=name)


# ---------------------------------------------------------------------------------------------------------------
# Qwen2.5-VL: the full transformers path (pixels -> vision tower -> masked_scatter -> get_rope_index -> padded LM)
# ---------------------------------------------------------------------------------------------------------------
def test_qwen25vl_packed_equals_padded_forward_and_gradients():
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(tiny_qwen25vl_config()).float()
    ids, mask, grid = make_batch(N_IMAGES, seed=30)
    ids = ids.clamp_max(VOCAB - 1)
    cfg = model.config.vision_config
    pixels = torch.randn(int(grid.prod(-1).sum()), cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2)
    real = mask.bool()
    w = _loss_weights((int(real.sum()), VOCAB))

    model.zero_grad()
    padded = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid,
                   mm_token_type_ids=(ids == IMG).int()).logits  # fmt: skip
    (padded[real] * w).sum().backward()
    want_grads = _param_grads(model)
    assert model.config.text_config._attn_implementation == "sdpa"

    model.zero_grad()
    vision = torch.cat(model.model.get_image_features(pixels, grid).pooler_output)  # same tower, run unpadded
    packed = pack_multimodal(ids, mask, model.get_input_embeddings().weight, vision, image_token_id=IMG,
                             rope="mrope", image_grid_thw=grid)  # fmt: skip
    logits = packed_forward(model, packed, attn_backend="sdpa").logits
    assert logits.shape == (1, int(real.sum()), VOCAB)
    assert model.config.text_config._attn_implementation == ATTN_IMPLEMENTATION
    assert model.config.vision_config._attn_implementation == "sdpa"  # the tower keeps its own
    torch.testing.assert_close(unpack(logits, packed)[real], padded[real].detach(), rtol=1e-5, atol=1e-5)
    (logits[0] * w).sum().backward()
    got_grads = _param_grads(model)
    _compare_grads(got_grads, want_grads)
    assert any(n.startswith("model.visual") for n in got_grads)  # the gradient reached the vision tower

    # a padded forward still works on the switched model (SDPA attention and mask)
    again = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid,
                  mm_token_type_ids=(ids == IMG).int()).logits  # fmt: skip
    torch.testing.assert_close(again[real], padded[real], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# LLaVA-OneVision with a Qwen3 text model (R-4B): vision features fed directly, then the full SigLIP + AnyRes path
# ---------------------------------------------------------------------------------------------------------------
def tiny_llava_onevision_qwen3(llava=None, **text):
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    cfg = LlavaOnevisionConfig(
        text_config=dict(model_type="qwen3", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         max_position_embeddings=512, **text),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32,
                           num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=4),
        image_token_id=IMG, video_token_id=101, **(llava or {}),
    )  # fmt: skip
    torch.manual_seed(0)
    return LlavaOnevisionForConditionalGeneration(cfg).float()


@pytest.mark.parametrize("source", ["embed_weight", "text_embeds"])
def test_llava_onevision_qwen3_packed_equals_padded_forward_and_gradients(source):
    model = tiny_llava_onevision_qwen3()
    assert type(model.model.language_model).__name__ == "Qwen3Model"
    ids, mask, _ = make_batch(N_IMAGES, seed=31)
    ids = ids.clamp_max(VOCAB - 1)
    real = mask.bool()
    n_vis = int((ids == IMG).sum())
    vision_ref = torch.randn(n_vis, 32, generator=torch.Generator().manual_seed(2)).requires_grad_()
    w = _loss_weights((int(real.sum()), VOCAB), seed=1)

    model.zero_grad()
    embeds = model.get_input_embeddings()(ids)
    image_mask, _ = model.model.get_placeholder_mask(ids, inputs_embeds=embeds, image_features=vision_ref)
    embeds = embeds.masked_scatter(image_mask, vision_ref)
    positions = (mask.cumsum(1) - 1).clamp_min(0)  # 1-D RoPE restarting at 0 per sample, left padding included
    padded = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
    (padded[real] * w).sum().backward()
    want_grads = _param_grads(model)

    model.zero_grad()
    vision = vision_ref.detach().clone().requires_grad_()
    if source == "embed_weight":
        table = dict(embed_weight=model.get_input_embeddings().weight)
    else:
        table = dict(text_embeds=model.get_input_embeddings()(ids))
    packed = pack_multimodal(ids, mask, vision_embeds=vision, image_token_id=IMG, rope="1d", **table)
    logits = packed_forward(model, packed).logits
    torch.testing.assert_close(unpack(logits, packed)[real], padded[real].detach(), rtol=1e-5, atol=1e-5)
    (logits[0] * w).sum().backward()
    _compare_grads(_param_grads(model), want_grads)
    torch.testing.assert_close(vision.grad, vision_ref.grad, rtol=1e-5, atol=1e-6)


# AnyRes at the tiny scale: 8x8 crops of 2x2 SigLIP patches (4 tokens each), grid pinpoints up to 16x16 pixels.
ANYRES = dict(image_grid_pinpoints=[[8, 8], [8, 16], [16, 8], [16, 16]], vision_aspect_ratio="anyres_max_2",
              vision_feature_layer=-1, vision_feature_select_strategy="full")  # fmt: skip
LLAVA_IMAGES = (0, 1, 3, 1, 1)  # images per sample (batch_num_images)
# (H, W) of each image in batch order, and the placeholders transformers' AnyRes path gives it (as
# LlavaOnevisionProcessor counts them): a sample with one image gets base view + grid crops, unpadded to its aspect
# ratio, one newline per row, pooled above anyres_max_2; a sample with several images gets the base view + a newline.
IMAGE_SIZES = ((16, 9), (8, 8), (3, 5), (12, 7), (6, 14), (15, 15))
IMAGE_TOKENS = [
    4 + 4 * (2 + 1),  # 16x16 grid (4 crops), unpadded 4x4 -> 4x2
    5, 5, 5,  # three images in one sample: base only
    4 + 2 * (4 + 1),  # 8x16 grid (2 crops), 2x4
    4 + 2 * (2 + 1),  # 16x16 grid, 4x4 pooled to 2x2
]  # fmt: skip


def _llava_batch(tokens_per_image, n_images, seed):
    """A padded batch: random text around each image's run of placeholders, mixed lengths, right/left padding."""
    gen = torch.Generator().manual_seed(seed)
    runs = iter(tokens_per_image)

    def text(lo, hi):
        return torch.randint(0, 90, (int(torch.randint(lo, hi + 1, (1,), generator=gen)),), generator=gen).tolist()

    rows = []
    for n in n_images:
        toks = text(1, 7)
        for _ in range(n):
            toks += [IMG] * next(runs) + text(0, 6)
        rows.append(toks)
    seq_len = max(map(len, rows)) + 2
    ids = torch.zeros(len(rows), seq_len, dtype=torch.long)  # padding id 0: a real token, ignored through the mask
    mask = torch.zeros_like(ids)
    for b, toks in enumerate(rows):
        start = 0 if b % 2 == 0 else seq_len - len(toks)
        ids[b, start : start + len(toks)] = torch.tensor(toks)
        mask[b, start : start + len(toks)] = 1
    return ids, mask


def test_llava_onevision_qwen3_vision_tower_anyres_packed_equals_padded():
    """transformers' padded forward from pixels (SigLIP tower, projector, AnyRes with image_sizes and
    batch_num_images, image_newline, masked_scatter) against packed_forward fed by the same model's
    get_image_features: same logits, same gradients everywhere, the vision tower's included."""
    model = tiny_llava_onevision_qwen3(llava=ANYRES)
    gen = torch.Generator().manual_seed(3)
    sizes = torch.tensor(IMAGE_SIZES)
    pixel_values = torch.randn(len(sizes), 5, 3, 8, 8, generator=gen)  # [n_img, max crops, C, H, W], rest padding
    batch_num_images = torch.tensor(LLAVA_IMAGES)

    def image_features():  # the model's own tower + projector + AnyRes layout: one [n_tokens, D] per image
        out = model.model.get_image_features(pixel_values, sizes, batch_num_images=batch_num_images)
        return out.pooler_output

    with torch.no_grad():
        assert [len(f) for f in image_features()] == IMAGE_TOKENS
    ids, mask = _llava_batch(IMAGE_TOKENS, LLAVA_IMAGES, seed=34)
    real = mask.bool()
    positions = (mask.cumsum(1) - 1).clamp_min(0)  # 1-D RoPE restarting at 0 per sample, as the packed positions
    w = _loss_weights((int(real.sum()), VOCAB), seed=4)

    model.zero_grad()
    padded = model(input_ids=ids, attention_mask=mask, position_ids=positions, pixel_values=pixel_values,
                   image_sizes=sizes, batch_num_images=batch_num_images).logits  # fmt: skip
    (padded[real] * w).sum().backward()
    want_grads = _param_grads(model)

    model.zero_grad()
    vision = torch.cat(image_features())
    packed = pack_multimodal(ids, mask, model.get_input_embeddings().weight, vision, image_token_id=IMG, rope="1d")
    logits = packed_forward(model, packed).logits
    assert model.config.vision_config._attn_implementation == "sdpa"  # the tower keeps its own attention
    torch.testing.assert_close(unpack(logits, packed)[real], padded[real].detach(), rtol=1e-5, atol=1e-5)
    (logits[0] * w).sum().backward()
    got_grads = _param_grads(model)
    _compare_grads(got_grads, want_grads)
    for name in ("model.vision_tower.embeddings.patch_embedding.weight",
                 "model.vision_tower.encoder.layers.0.self_attn.q_proj.weight",
                 "model.multi_modal_projector.linear_1.weight", "model.image_newline",
                 "model.language_model.layers.1.self_attn.q_proj.weight"):  # fmt: skip
        assert got_grads[name].abs().sum() > 0, name  # tower, projector, newline, LLM: all reached and compared


def test_sliding_window_layers_match_padded():
    model = tiny_llava_onevision_qwen3(use_sliding_window=True, sliding_window=3, max_window_layers=0,
                                       layer_types=["sliding_attention", "sliding_attention"])  # fmt: skip
    ids, mask, _ = make_batch((1, 0, 3), seed=32)
    ids = ids.clamp_max(VOCAB - 1)
    vision = torch.randn(int((ids == IMG).sum()), 32)
    embeds = model.get_input_embeddings()(ids).masked_scatter((ids == IMG)[..., None], vision)
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    padded = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
    packed = pack_multimodal(ids, mask, model.get_input_embeddings().weight, vision, image_token_id=IMG)
    logits = packed_forward(model, packed).logits
    torch.testing.assert_close(unpack(logits, packed)[mask.bool()], padded[mask.bool()], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# the attention function and its backends
# ---------------------------------------------------------------------------------------------------------------
class _Module(torch.nn.Module):
    is_causal = True


def _block_diagonal_reference(q, k, v, seqlens, scaling):
    """Dense block-diagonal causal attention over [1, H, T, d] (GQA expanded)."""
    seg = torch.repeat_interleave(torch.arange(len(seqlens)), torch.tensor(seqlens))
    t = torch.arange(seg.numel())
    allowed = (seg[:, None] == seg[None, :]) & (t[None, :] <= t[:, None])
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = (q @ k.transpose(-1, -2)) * scaling
    s = s.masked_fill(~allowed, float("-inf"))
    return (s.softmax(-1) @ v).transpose(1, 2)


def _attention_backends():
    params = []
    for backend in ("sdpa", "flash_attn", "xformers"):
        device = "cuda" if HAS_GPU else "cpu"
        dtype = torch.bfloat16 if backend == "flash_attn" else torch.float32
        reasons = attention_backend_reasons(backend, device, dtype)
        marks = [pytest.mark.skip(reason="; ".join(reasons))] if reasons else []
        params.append(pytest.param((backend, device, dtype), id=backend, marks=marks))
    return params


@pytest.mark.parametrize("backend_device_dtype", _attention_backends())
def test_packed_attention_is_block_diagonal_causal(backend_device_dtype):
    backend, device, dtype = backend_device_dtype
    seqlens = [5, 1, 9, 3]
    gen = torch.Generator().manual_seed(0)
    t = sum(seqlens)
    q = torch.randn(1, 4, t, 8, generator=gen)
    k = torch.randn(1, 2, t, 8, generator=gen)
    v = torch.randn(1, 2, t, 8, generator=gen)
    want = _block_diagonal_reference(q, k, v, seqlens, 8**-0.5)
    ids = torch.zeros(1, t, dtype=torch.long)
    packed = pack_multimodal(ids, torch.ones_like(ids), torch.randn(1, 4), image_token_id=3)
    packed = packed._replace(cu_seqlens=torch.tensor([0, 5, 6, 15, 18], dtype=torch.int32), max_seqlen=9)
    with packed_context(packed, backend):
        got, _ = packed_attention(_Module(), *(x.to(device, dtype) for x in (q, k, v)), None, scaling=8**-0.5,
                                  cu_seq_lens_q=packed.cu_seqlens.to(device), max_length_q=9)  # fmt: skip
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float().cpu(), want, rtol=tol, atol=tol)


def test_no_dense_mask_is_built_for_a_packed_forward(monkeypatch):
    import transformers.masking_utils as mu

    model = tiny_llava_onevision_qwen3()
    enable_packed_attention(model)
    calls = []
    real_sdpa_mask = mu.sdpa_mask
    monkeypatch.setattr(mu, "sdpa_mask", lambda *a, **k: calls.append(1) or real_sdpa_mask(*a, **k))
    ids, mask, _ = make_batch((0, 0), seed=33)
    ids = ids.clamp_max(VOCAB - 1)
    packed = pack_multimodal(ids, mask, model.get_input_embeddings().weight, image_token_id=IMG)
    packed_forward(model, packed)
    assert calls == []
    model(input_ids=ids, attention_mask=mask)  # a padded forward does build its mask
    assert calls


def test_attention_backend_choice_and_errors():
    assert choose_attention_backend("cpu", torch.float32) == "sdpa"
    with pytest.raises(RuntimeError, match="flash-attn needs CUDA tensors"):
        choose_attention_backend("cpu", torch.float32, "flash_attn")
    assert attention_backend_reasons("nope", "cpu", torch.float32)[0].startswith("unknown attention backend")
    if importlib.util.find_spec("flash_attn") is None:
        assert "flash-attn is not installed" in attention_backend_reasons("flash_attn", "cuda", torch.bfloat16)
    ids = torch.zeros(1, 3, dtype=torch.long)
    packed = pack_multimodal(ids, torch.ones_like(ids), torch.randn(1, 4), image_token_id=3)
    with pytest.raises(ValueError, match="attn_backend: expected one of"):
        with packed_context(packed, "flash"):
            pass
    with pytest.raises(TypeError, match="packed: expected a PackedBatch"):
        packed_forward(torch.nn.Identity(), (1, 2))
