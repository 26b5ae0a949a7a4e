"""Triton kernel for pack_multimodal: gather + vision scatter + unpad + RoPE positions in one pass.

One program per (sample, slice of D). A program walks its sample's real tokens in blocks of ``BLOCK_T``; per block it
finds the placeholders, numbers them with in-block cumsums carried across blocks (vision row, image index, M-RoPE
position shift), copies each token's row (text table or vision row) into the packed output, and (slice 0 only)
writes the packed token's flat index, its source row and its positions. Per-sample and per-image scalars (first
real token, packed offset, vision / image counts before the sample, merged grid sizes) come from a few vectorised
torch ops in ``r4b_fast/ops/pack_multimodal.py``; no atomics, deterministic.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _pack_multimodal_kernel(
    ids_ptr, first_ptr, lens_ptr, out_start_ptr, vis_start_ptr, img_start_ptr,
    img_hh_ptr, img_ww_ptr, img_vis_start_ptr, img_shift_ptr,
    table_ptr, vision_ptr, out_ptr, indices_ptr, src_ptr, pos_ptr, deltas_ptr,
    L, D, T, image_token_id,
    MROPE: tl.constexpr, TEXT_EMBEDS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    pd = tl.program_id(1)
    first = tl.load(first_ptr + b).to(tl.int64)
    n = tl.load(lens_ptr + b).to(tl.int64)
    o0 = tl.load(out_start_ptr + b).to(tl.int64)
    vis_run = tl.load(vis_start_ptr + b).to(tl.int64)
    img_run = tl.load(img_start_ptr + b).to(tl.int64)
    shift_run = vis_run * 0
    pmax = vis_run * 0 - 1
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = pd * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    for j0 in range(0, n, BLOCK_T):
        j = j0 + offs_t
        inside = j < n
        flat = b * L + first + j
        tok = tl.load(ids_ptr + flat, mask=inside, other=0)
        is_img = inside & (tok == image_token_id)
        img_i = is_img.to(tl.int64)
        v = vis_run + tl.cumsum(img_i, 0) - 1  # vision row of each placeholder
        if TEXT_EMBEDS:
            text_row = flat
        else:
            text_row = tok
        # the row copy: text rows and vision rows by two masked loads, one store
        tmask = (inside & ~is_img)[:, None] & dmask[None, :]
        vmask = is_img[:, None] & dmask[None, :]
        x_t = tl.load(table_ptr + text_row[:, None] * D + offs_d[None, :], mask=tmask, other=0.0)
        x_v = tl.load(vision_ptr + v[:, None] * D + offs_d[None, :], mask=vmask, other=0.0)
        x = tl.where(is_img[:, None], x_v, x_t)
        out_row = o0 + j
        tl.store(out_ptr + out_row[:, None] * D + offs_d[None, :], x, mask=inside[:, None] & dmask[None, :])
        if pd == 0:
            tl.store(indices_ptr + out_row, flat, mask=inside)
            tl.store(src_ptr + out_row, tl.where(is_img, -1 - v, text_row), mask=inside)
            if MROPE:
                prev_tok = tl.load(ids_ptr + flat - 1, mask=inside & (j > 0), other=0)
                next_tok = tl.load(ids_ptr + flat + 1, mask=(j + 1) < n, other=0)
                prev_img = (j > 0) & (prev_tok == image_token_id)
                next_img = ((j + 1) < n) & (next_tok == image_token_id)
                starts = (is_img & ~prev_img).to(tl.int64)
                ends = is_img & ~next_img
                k = img_run + tl.cumsum(starts, 0) - 1  # image index of each placeholder
                hh = tl.load(img_hh_ptr + k, mask=is_img, other=1).to(tl.int64)
                ww = tl.load(img_ww_ptr + k, mask=is_img, other=1).to(tl.int64)
                vstart = tl.load(img_vis_start_ptr + k, mask=is_img, other=0).to(tl.int64)
                delta = tl.load(img_shift_ptr + k, mask=ends, other=0).to(tl.int64)
                excl = tl.cumsum(delta, 0) - delta
                text_pos = j + shift_run + excl
                o = v - vstart  # offset of the placeholder within its image
                o = tl.where(is_img, o, 0)
                start = text_pos - o
                p_t = tl.where(is_img, start + o // (hh * ww), text_pos)
                p_h = tl.where(is_img, start + (o // ww) % hh, text_pos)
                p_w = tl.where(is_img, start + o % ww, text_pos)
                tl.store(pos_ptr + out_row, p_t, mask=inside)
                tl.store(pos_ptr + T + out_row, p_h, mask=inside)
                tl.store(pos_ptr + 2 * T + out_row, p_w, mask=inside)
                p_max = tl.maximum(tl.maximum(p_t, p_h), p_w)
                pmax = tl.maximum(pmax, tl.max(tl.where(inside, p_max, -1), 0))
                shift_run += tl.sum(delta, 0)
                img_run += tl.sum(starts, 0)
            else:
                tl.store(pos_ptr + out_row, j, mask=inside)
        vis_run += tl.sum(img_i, 0)
    if MROPE:
        if pd == 0:
            tl.store(deltas_ptr + b, pmax + 1 - n)


def launch_pack_multimodal(args, table, vision, out, indices, src, pos, deltas, image_token_id, seq_len, mrope,
                           text_embeds, max_seqlen):  # fmt: skip
    """``args``: the per-sample / per-image int32 tensors of ``_kernel_args``; ``table [V or B*L, D]``,
    ``vision [N_vis, D]`` in the output dtype; writes ``out [T, D]``, ``indices``/``src [T]`` int64, ``pos
    [1 or 3, T]`` int64 and ``deltas [B]`` int64 (mrope)."""
    b_size = args["ids"].shape[0]
    d = table.shape[1]
    t = out.shape[0]
    block_t = triton.next_power_of_2(max(2, min(int(max_seqlen), 64)))
    block_d = triton.next_power_of_2(max(2, min(d, 128)))
    dummy = args["lens"]  # never read when there is no image (masked loads)
    per_img = {k: args[k] if args[k].numel() else dummy for k in ("img_hh", "img_ww", "img_vis_start", "img_shift")}
    vis = vision if vision.numel() else table
    grid = (b_size, triton.cdiv(d, block_d))
    _pack_multimodal_kernel[grid](
        args["ids"], args["first"], args["lens"], args["out_start"], args["vis_start"], args["img_start"],
        per_img["img_hh"], per_img["img_ww"], per_img["img_vis_start"], per_img["img_shift"],
        table, vis, out, indices, src, pos, deltas,
        seq_len, d, t, int(image_token_id),
        MROPE=bool(mrope), TEXT_EMBEDS=bool(text_embeds), BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip
