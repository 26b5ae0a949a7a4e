"""The torch backend of :func:`~r4b_fast.ops.pack_multimodal.pack_multimodal` (the CPU path): ``_pack_meta_torch``
(vectorised over the flattened ``[B*L]`` batch: cumsums, no loop over samples or images) and ``_gather_torch`` (one
row gather and one row scatter)."""

from __future__ import annotations

import torch

from r4b_fast.ops.pack_multimodal.prepare import _Prep, _take


def _pack_meta_torch(prep: _Prep, rope: str, text_embeds: bool):
    """Returns ``(indices [T], src [T], position_ids, rope_deltas)`` without a loop over samples or images."""
    b_size, seq_len = prep.ids.shape
    dev = prep.ids.device
    mask = prep.mask.reshape(-1)
    indices = torch.nonzero_static(mask, size=prep.T).reshape(-1)
    ids = _take(prep.ids.reshape(-1), indices)
    is_img = _take(prep.is_img.reshape(-1), indices)
    row = torch.div(indices, seq_len, rounding_mode="floor")
    j = torch.arange(prep.T, device=dev) - _take(prep.cu_seqlens, row)  # position of the token within its sample
    vis = torch.cumsum(is_img, 0) - 1  # vision row of each placeholder (in order: the masked_scatter order)
    text_row = indices if text_embeds else ids
    src = torch.where(is_img, -1 - vis, text_row)
    if rope == "1d":
        return indices, src, j, None
    prev = torch.zeros_like(is_img)
    prev[1:] = is_img[:-1]
    starts = is_img & ~(prev & (j > 0))
    nxt = torch.zeros_like(is_img)
    nxt[:-1] = is_img[1:] & (j[1:] > 0)
    ends = is_img & ~nxt
    k = (torch.cumsum(starts, 0) - 1).clamp(0, max(prep.n_img - 1, 0))
    if prep.n_img:
        delta = torch.where(ends, _take(prep.img_shift, k), 0)
    else:
        delta = torch.zeros_like(j)
    excl = torch.cumsum(delta, 0) - delta
    shift = excl - _take(_take(excl, prep.cu_seqlens[:-1]), row)  # shift within the sample: images before this token
    text_pos = j + shift
    if prep.n_img:
        o = vis - _take(prep.img_vis_start, k)
        hh, ww = _take(prep.img_hh, k), _take(prep.img_ww, k)
        hw = hh * ww
        start = text_pos - o
        t_i = torch.div(o, hw, rounding_mode="floor")
        h_i = torch.div(o, ww, rounding_mode="floor") % hh
        w_i = o % ww
        pos = torch.stack([torch.where(is_img, start + t_i, text_pos), torch.where(is_img, start + h_i, text_pos),
                           torch.where(is_img, start + w_i, text_pos)])  # fmt: skip
    else:
        pos = text_pos.expand(3, -1).clone()
    pmax = torch.full((b_size,), -1, dtype=torch.int64, device=dev).scatter_reduce_(0, row, pos.amax(0), "amax")
    rope_deltas = (pmax + 1 - prep.lens).unsqueeze(1)
    return indices, src, pos, rope_deltas


def _gather_torch(table: torch.Tensor, vision: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    is_vis = src < 0
    out = table.index_select(0, src.clamp_min(0))
    if vision.shape[0]:  # vision row v goes to the v-th placeholder (masked_scatter's order); index_copy_ is ~4x
        pos = torch.nonzero_static(is_vis, size=vision.shape[0]).reshape(-1)  # faster than masked_scatter_ on CPU
        out.index_copy_(0, pos, vision.to(out.dtype))
    return out

