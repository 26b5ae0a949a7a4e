"""Reference packing: a plain Python loop per sample and per image, written the way transformers does it (embedding,
``masked_scatter`` of the vision rows, Qwen2-VL ``get_rope_index``, unpad); the oracle of the tests."""

from __future__ import annotations

import torch


def pack_multimodal_ref(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    table: torch.Tensor,
    vision_embeds: torch.Tensor,
    *,
    image_token_id: int,
    rope: str = "1d",
    image_grid_thw: torch.Tensor | None = None,
    spatial_merge_size: int = 2,
    text_embeds: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Loop reference: returns ``(inputs_embeds [T, D], position_ids [T] | [3, T], cu_seqlens [B+1], rope_deltas)``.

    ``table`` is ``embed_weight [V, D]`` or, with ``text_embeds=True``, ``text_embeds [B, L, D]``. Expects valid input.
    """
    b_size = input_ids.shape[0]
    mask = attention_mask.bool()
    embeds, positions, lens, deltas = [], [], [], []
    vis_row, img = 0, 0
    for b in range(b_size):
        ids = input_ids[b][mask[b]]
        rows = table[b][mask[b]] if text_embeds else table[ids]
        rows = rows.clone()
        is_img = ids == image_token_id
        n_img_tokens = int(is_img.sum())
        rows[is_img] = vision_embeds[vis_row : vis_row + n_img_tokens].to(rows.dtype)
        vis_row += n_img_tokens
        embeds.append(rows)
        lens.append(len(ids))
        if rope == "1d":
            positions.append(torch.arange(len(ids)))
            continue
        pos, cur, j = [], 0, 0
        flags = is_img.tolist()
        while j < len(flags):
            if not flags[j]:
                pos.append([cur, cur, cur])
                cur += 1
                j += 1
                continue
            t, h, w = (int(x) for x in image_grid_thw[img])
            hh, ww = h // spatial_merge_size, w // spatial_merge_size
            for ti in range(t):
                for hi in range(hh):
                    for wi in range(ww):
                        pos.append([cur + ti, cur + hi, cur + wi])
            j += t * hh * ww
            cur += max(hh, ww)
            img += 1
        p = torch.tensor(pos, dtype=torch.int64).T.reshape(3, -1)
        positions.append(p)
        deltas.append(int(p.max()) + 1 - len(ids))
    cu = torch.zeros(b_size + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    position_ids = torch.cat(positions, -1)
    rope_deltas = torch.tensor(deltas, dtype=torch.int64).unsqueeze(1) if rope == "mrope" else None
    return torch.cat(embeds), position_ids, cu, rope_deltas

