"""Triton kernel for pack_multimodal: gather + vision scatter + unpad + RoPE positions in one pass.

One program per (sample, slice of the row). A program walks its sample's real tokens in blocks of ``BLOCK_T``; per
block it finds the placeholders, numbers them with in-block cumsums carried across blocks (vision row, image index,
M-RoPE position shift), copies each token's row slice (text table or vision row, one masked load through a selected
row pointer) into the packed output, and (slice 0 only) writes the packed token's flat index, its source row and its
positions. Per-sample and per-image scalars (first real token, packed offset, vision / image counts before the
sample, merged grid sizes) come from a few vectorised torch ops in ``r4b_fast/ops/pack_multimodal/``; no atomics,
deterministic.

The copy is dtype-agnostic: rows are moved as raw integer units of the widest width (16, 8, 4 or 2 bytes) that the
row size and every pointer allow (``copy_plan``), so bf16/fp16/fp32/fp64 tables share four kernel variants and an
odd row (D = 2047 in bf16) still copies correctly, in narrower units. All row offsets are int64 (``_row_offset``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from r4b_fast.backends import device_guard
from r4b_fast.ops.pack_multimodal import copy_unit_bytes

SLICE_BYTES = 256  # bytes of each row one program copies (grid.y = ceil(row bytes / this))
MAX_BLOCK_T = 64  # tokens per step: a [64, 256 B] tile is 32 registers a thread at 4 warps
WIDEST_UNIT = 8  # bytes: Triton's widest integer type (16-byte copies: the compiler vectorises int64 pairs)
_UNIT_DTYPES = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


@triton.jit
def _row_offset(row, row_units):
    """Offset of the first unit of ``row`` in a ``[rows, row_units]`` tensor, in int64: ``row * row_units`` passes
    2^31 at 600k packed tokens of D = 4096 even when both factors fit in 32 bits."""
    return row.to(tl.int64) * row_units


@triton.jit
def _flat_index(b, L, first, j):
    """Flat index ``b * L + first + j`` of a token of the padded ``[B, L]`` batch, in int64."""
    return b.to(tl.int64) * L + first.to(tl.int64) + j


@triton.jit
def _mrope_block(ids_ptr, img_hh_ptr, img_ww_ptr, img_vis_start_ptr, img_shift_ptr, pos_ptr, flat, j, n, inside,
                 is_img, v, out_row, img_run, shift_run, T, image_token_id):  # fmt: skip
    """M-RoPE positions of one block of a sample's tokens, stored as rows t, h, w of ``pos`` [3, T]: text tokens at
    ``j`` plus the images' shift so far, each placeholder at its image's start plus its (t, h, w) index. Returns
    ``(largest position of the block, shift advance, images started)`` for the running counters."""
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
    pos_row = pos_ptr + out_row  # rows t, h, w of [3, T]: pointer steps of T, no 2 * T in 32 bits
    tl.store(pos_row, p_t, mask=inside)
    tl.store(pos_row + T, p_h, mask=inside)
    tl.store(pos_row + T + T, p_w, mask=inside)
    p_max = tl.maximum(tl.maximum(p_t, p_h), p_w)
    return tl.max(tl.where(inside, p_max, -1), 0), tl.sum(delta, 0), tl.sum(starts, 0)


@triton.jit(do_not_specialize=["L", "T", "image_token_id"])  # their divisibility changes no code: one variant
def _pack_multimodal_kernel(
    ids_ptr, first_ptr, lens_ptr, out_start_ptr, vis_start_ptr, img_start_ptr,
    img_hh_ptr, img_ww_ptr, img_vis_start_ptr, img_shift_ptr,
    table_ptr, vision_ptr, out_ptr, indices_ptr, src_ptr, pos_ptr, deltas_ptr,
    L, R, T, image_token_id,
    MROPE: tl.constexpr, TEXT_EMBEDS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
    ALIGN16: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    pr = tl.program_id(1)
    first = tl.load(first_ptr + b).to(tl.int64)
    n = tl.load(lens_ptr + b).to(tl.int64)
    o0 = tl.load(out_start_ptr + b).to(tl.int64)
    vis_run = tl.load(vis_start_ptr + b).to(tl.int64)
    img_run = tl.load(img_start_ptr + b).to(tl.int64)
    shift_run = vis_run * 0
    pmax = vis_run * 0 - 1
    offs_t = tl.arange(0, BLOCK_T)
    offs_r = pr * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = offs_r < R
    for j0 in range(0, n, BLOCK_T):
        j = j0 + offs_t
        inside = j < n
        flat = _flat_index(b, L, first, j)
        tok = tl.load(ids_ptr + flat, mask=inside, other=0)
        is_img = inside & (tok == image_token_id)
        img_i = is_img.to(tl.int64)
        v = vis_run + tl.cumsum(img_i, 0) - 1  # vision row of each placeholder
        if TEXT_EMBEDS:
            text_row = flat
        else:
            text_row = tok
        # the row copy: one load through a per-token row pointer (vision row or text row), one store
        row_ptr = tl.where(is_img, vision_ptr + _row_offset(v, R), table_ptr + _row_offset(text_row, R))
        if ALIGN16:  # the select hides the rows' alignment from the compiler: restate it for 16-byte vectors
            row_ptr = tl.multiple_of(row_ptr, 16)
        tile = inside[:, None] & rmask[None, :]
        x = tl.load(row_ptr[:, None] + offs_r[None, :], mask=tile, other=0)
        out_row = o0 + j
        tl.store(out_ptr + _row_offset(out_row, R)[:, None] + offs_r[None, :], x, mask=tile)
        if pr == 0:
            tl.store(indices_ptr + out_row, flat, mask=inside)
            tl.store(src_ptr + out_row, tl.where(is_img, -1 - v, text_row), mask=inside)
            if MROPE:
                bmax, dshift, dimg = _mrope_block(ids_ptr, img_hh_ptr, img_ww_ptr, img_vis_start_ptr, img_shift_ptr,
                                                  pos_ptr, flat, j, n, inside, is_img, v, out_row, img_run,
                                                  shift_run, T, image_token_id)  # fmt: skip
                pmax = tl.maximum(pmax, bmax)
                shift_run += dshift
                img_run += dimg
            else:
                tl.store(pos_ptr + out_row, j, mask=inside)
        vis_run += tl.sum(img_i, 0)
    if MROPE:
        if pr == 0:
            tl.store(deltas_ptr + b, pmax + 1 - n)


def copy_plan(table: torch.Tensor, vision: torch.Tensor, out: torch.Tensor) -> tuple[int, int, int, int]:
    """``(width, unit, row_units, BLOCK_R)`` of the row copy. ``width``: the widest copy (16, 8, 4 or 2 bytes,
    ``copy_unit_bytes``, the same choice as the CUDA kernel's) that divides the row and aligns every pointer;
    ``unit``: the integer type the kernel moves (``min(width, 8)``: 16-byte copies are pairs of int64 the compiler
    vectorises); ``row_units``: the row length in units; ``BLOCK_R``: units one program copies (``SLICE_BYTES``).
    Host metadata only: works on meta tensors."""
    row_bytes = table.shape[1] * table.element_size()
    width = copy_unit_bytes(row_bytes, (table, vision, out), 16)
    unit = min(width, WIDEST_UNIT)
    row_units = row_bytes // unit
    block_r = min(SLICE_BYTES // unit, triton.next_power_of_2(max(row_units, 2)))
    return width, unit, row_units, block_r


def launch_pack_multimodal(args, table, vision, out, indices, src, pos, deltas, image_token_id, seq_len, mrope,
                           text_embeds, max_seqlen):  # fmt: skip
    """``args``: the per-sample / per-image int32 tensors of ``_kernel_args``; ``table [V or B*L, D]``,
    ``vision [N_vis, D]`` in the output dtype; writes ``out [T, D]``, ``indices``/``src [T]`` int64, ``pos
    [1 or 3, T]`` int64 and ``deltas [B]`` int64 (mrope). ``max_seqlen`` is a host int (the op's one sync), so the
    launcher does no data-dependent host work and runs on meta tensors (the ahead-of-time compile check).
    Returns the copy width in bytes (``copy_plan``)."""
    b_size = args["ids"].shape[0]
    t = out.shape[0]
    vis = vision if vision.numel() else table  # never read without placeholders
    width, unit, row_units, block_r = copy_plan(table, vis, out)
    as_units = lambda x: x.view(_UNIT_DTYPES[unit])  # noqa: E731 - raw bytes: the copy is exact for any dtype
    block_t = triton.next_power_of_2(max(2, min(int(max_seqlen), MAX_BLOCK_T)))
    dummy = args["lens"]  # never read when there is no image (masked loads)
    per_img = {k: args[k] if args[k].numel() else dummy for k in ("img_hh", "img_ww", "img_vis_start", "img_shift")}
    grid = (b_size, triton.cdiv(row_units, block_r))
    with device_guard(out):
        _pack_multimodal_kernel[grid](
            args["ids"], args["first"], args["lens"], args["out_start"], args["vis_start"], args["img_start"],
            per_img["img_hh"], per_img["img_ww"], per_img["img_vis_start"], per_img["img_shift"],
            as_units(table), as_units(vis), as_units(out), indices, src, pos, deltas,
            seq_len, row_units, t, int(image_token_id),
            MROPE=bool(mrope), TEXT_EMBEDS=bool(text_embeds), BLOCK_T=block_t, BLOCK_R=block_r,
            ALIGN16=width == 16, num_warps=4,
        )  # fmt: skip
    return width


def _meta_args(b_size: int, n_img: int) -> dict:
    i32 = dict(dtype=torch.int32, device="meta")
    args = {k: torch.empty(b_size, **i32) for k in ("first", "lens", "out_start", "vis_start", "img_start")}
    args.update({k: torch.empty(n_img, **i32) for k in ("img_hh", "img_ww", "img_vis_start", "img_shift")})
    return args


def aot_scenarios():
    """Every variant the launcher produces at the GPU shape of issue #10 (B = 64, L = 4096, D = 2048; bf16, fp16,
    fp32, fp64; 1-D RoPE and M-RoPE; embedding table or text embeddings), plus the narrower copy units (a row of
    D = 2046 / 2047 bf16 elements, a table view misaligned by one element) and a short batch (small BLOCK_T),
    launched on meta tensors for the ahead-of-time compile check."""
    meta = dict(device="meta")
    vocab, image_token_id = 151936, 151655

    def launch(b_size, seq_len, d, dtype, mrope, text_embeds, max_seqlen, table_offset=0):
        t = b_size * seq_len - 1234 if b_size * seq_len > 4096 else b_size * seq_len - 1
        n_vis, n_img = t // 4, b_size * 4
        rows = b_size * seq_len if text_embeds else vocab
        table = torch.empty(rows * d + table_offset, dtype=dtype, **meta)[table_offset:].view(rows, d)
        args = dict(_meta_args(b_size, n_img), ids=torch.empty(b_size, seq_len, dtype=torch.int64, **meta))
        i64 = dict(dtype=torch.int64, **meta)
        launch_pack_multimodal(
            args, table, torch.empty(n_vis, d, dtype=dtype, **meta), torch.empty(t, d, dtype=dtype, **meta),
            torch.empty(t, **i64), torch.empty(t, **i64), torch.empty(3 if mrope else 1, t, **i64),
            torch.empty(b_size, **i64), image_token_id, seq_len, mrope, text_embeds, max_seqlen,
        )  # fmt: skip

    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        for mrope in (False, True):
            for text_embeds in (False, True):
                launch(64, 4096, 2048, dtype, mrope, text_embeds, 4096)
    for d, offset in ((2044, 0), (2046, 0), (2047, 0), (2048, 1)):  # 8-, 4-, 2-, 2-byte copies
        for mrope in (False, True):
            launch(64, 4096, d, torch.bfloat16, mrope, False, 4096, offset)
    launch(8, 24, 2048, torch.bfloat16, True, False, 20)  # short samples: BLOCK_T = 32
