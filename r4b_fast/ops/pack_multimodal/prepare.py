"""Shared preparation of :func:`~r4b_fast.ops.pack_multimodal.pack_multimodal`: the vectorised validation of the
batch's values (one host sync for every check) and the per-sample / per-image scalars every backend needs."""

from __future__ import annotations

from typing import NamedTuple

import torch


class _Prep(NamedTuple):
    mask: torch.Tensor  # [B, L] bool
    ids: torch.Tensor  # [B, L] int64 (input ids)
    is_img: torch.Tensor  # [B, L] bool, image placeholders among real tokens
    lens: torch.Tensor  # [B] int64
    cu_seqlens: torch.Tensor  # [B+1] int64
    first: torch.Tensor  # [B] int64, index of the first real token of each row (left padding)
    T: int
    max_seqlen: int
    n_img: int
    # per image (mrope; empty otherwise): tokens, merged height/width, first vision row, position advance - tokens
    img_tokens: torch.Tensor
    img_hh: torch.Tensor
    img_ww: torch.Tensor
    img_vis_start: torch.Tensor
    img_shift: torch.Tensor


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[index]`` along dim 0 through index_select (advanced indexing is ~100x slower on CPU); 0-dim index ok."""
    if index.dim() == 0:
        return x.index_select(0, index.reshape(1)).reshape(x.shape[1:])
    return x.index_select(0, index)


def _first_index(values: torch.Tensor, flag: torch.Tensor, missing: int) -> torch.Tensor:
    """Index of the first True of ``flag`` (flattened) as a 0-dim tensor, or ``missing`` when there is none."""
    flat = flag.reshape(-1)
    if flat.numel() == 0:
        return torch.tensor(missing, device=flag.device)
    return torch.where(flat.any(), flat.to(torch.int8).argmax(), missing)


def _mask_checks(ids, attention_mask, image_token_id, vocab) -> tuple:
    """The device-side checks of the mask and ids (no sync): ``(checks, mask, is_img, lens, cu, first)``."""
    dev = ids.device
    if attention_mask.dtype == torch.bool:
        mask = attention_mask
        bad_mask = torch.zeros((), dtype=torch.int64, device=dev)
    else:
        bad_mask = ((attention_mask != 0) & (attention_mask != 1)).sum()
        mask = attention_mask != 0
    lens = mask.sum(1)
    cu = torch.zeros(ids.shape[0] + 1, dtype=torch.int64, device=dev)
    torch.cumsum(lens, 0, out=cu[1:])
    transitions = (mask[:, 1:] != mask[:, :-1]).sum(1)  # 1 for left or right padding, 2+ when mixed or holed
    first = mask.to(torch.int8).argmax(1)
    is_img = (ids == image_token_id) & mask
    checks = {
        "bad_mask": bad_mask,
        "empty": (lens == 0).sum(),
        "first_empty": _first_index(lens, lens == 0, -1),
        "mixed": (transitions > 1).sum(),
        "first_mixed": _first_index(transitions, transitions > 1, -1),
        "T": cu[-1],
        "max_seqlen": lens.max(),
        "placeholders": is_img.sum(),
    }
    if vocab is not None:
        oov = mask & ((ids < 0) | (ids >= vocab))
        checks["oov"] = oov.sum()
        first_oov = _first_index(oov, oov, 0)
        checks["first_oov"] = first_oov
        checks["oov_value"] = _take(ids.reshape(-1), first_oov)
    return checks, mask, is_img, lens, cu, first


def _grid_checks(grid, is_img, merge, checks: dict) -> tuple[torch.Tensor, ...]:
    """The per-image scalars of ``grid`` (mrope) and their device-side checks, added to ``checks`` (no sync):
    ``(img_tokens, img_hh, img_ww, img_vis_start, img_shift)``."""
    dev, n_img = is_img.device, grid.shape[0]
    empty = torch.zeros(0, dtype=torch.int64, device=dev)
    g = grid.to(torch.int64)
    bad_grid = (g < 1).any(1) | (g[:, 1] % merge != 0) | (g[:, 2] % merge != 0)
    checks["bad_grid"] = bad_grid.sum()
    checks["first_bad_grid"] = _first_index(bad_grid, bad_grid, -1)
    img_hh, img_ww = g[:, 1] // merge, g[:, 2] // merge
    img_tokens = g[:, 0] * img_hh * img_ww
    img_vis_start = torch.cumsum(img_tokens, 0) - img_tokens
    img_shift = torch.maximum(img_hh, img_ww) - img_tokens
    checks["grid_tokens"] = img_tokens.sum()
    # runs of consecutive placeholders within a row are the images (as transformers groups them)
    prev = torch.zeros_like(is_img)
    prev[:, 1:] = is_img[:, :-1]
    starts = (is_img & ~prev).reshape(-1)
    k = torch.cumsum(starts, 0) - 1
    checks["runs"] = starts.sum()
    run_len = (
        torch.zeros(n_img, dtype=torch.int64, device=dev).index_add_(
            0, k.clamp(0, max(n_img - 1, 0)), is_img.reshape(-1).to(torch.int64)
        )
        if n_img
        else empty
    )
    wrong = run_len != img_tokens
    checks["wrong_runs"] = wrong.sum()
    first_wrong = _first_index(wrong, wrong, 0)
    checks["first_wrong_run"] = first_wrong
    checks["first_wrong_len"] = _take(run_len, first_wrong) if n_img else torch.zeros((), device=dev)
    checks["first_wrong_want"] = _take(img_tokens, first_wrong) if n_img else torch.zeros((), device=dev)
    return img_tokens, img_hh, img_ww, img_vis_start, img_shift


def _raise_batch_errors(values: dict, vocab, seq_len: int, n_vis: int, image_token_id: int) -> None:
    """The first failed check of the mask, the ids and the placeholder count, as a ``ValueError``."""
    if values["bad_mask"]:
        raise ValueError(f"attention_mask: {values['bad_mask']} value(s) other than 0 and 1")
    if values["empty"]:
        raise ValueError(
            f"attention_mask: {values['empty']} row(s) have no real token (first: row {values['first_empty']}); "
            "drop empty samples before packing"
        )
    if values["mixed"]:
        raise ValueError(
            f"attention_mask: {values['mixed']} row(s) mix left and right padding or have holes (first: row "
            f"{values['first_mixed']}); each row must be one contiguous run of real tokens"
        )
    if vocab is not None and values["oov"]:
        flat = values["first_oov"]
        raise ValueError(
            f"input_ids: {values['oov']} real token id(s) outside the vocabulary [0, {vocab}) of embed_weight "
            f"(first: id {values['oov_value']} at row {flat // seq_len}, column {flat % seq_len})"
        )
    if values["placeholders"] != n_vis:
        raise ValueError(
            f"vision_embeds: {n_vis} row(s), but input_ids hold {values['placeholders']} image placeholder "
            f"token(s) (image_token_id={image_token_id}); they must be equal"
        )


def _raise_grid_errors(values: dict, grid: torch.Tensor, n_vis: int, merge: int) -> None:
    """The first failed check of ``image_grid_thw`` against the placeholders, as a ``ValueError``."""
    n_img = grid.shape[0]
    if values["bad_grid"]:
        raise ValueError(
            f"image_grid_thw: {values['bad_grid']} image(s) with a size < 1 or a height/width not divisible by "
            f"spatial_merge_size={merge} (first: image {values['first_bad_grid']}, "
            f"grid {grid[values['first_bad_grid']].tolist()})"
        )
    if values["grid_tokens"] != n_vis:
        raise ValueError(
            f"image_grid_thw: the grids give {values['grid_tokens']} vision token(s) (t*h*w/merge^2 summed), "
            f"but vision_embeds has {n_vis} row(s)"
        )
    if values["runs"] != n_img:
        raise ValueError(
            f"image_grid_thw: {n_img} image(s), but input_ids hold {values['runs']} run(s) of consecutive "
            "placeholders; each image must be one run, separated from the next by a text token"
        )
    if values["wrong_runs"]:
        raise ValueError(
            f"image_grid_thw: {values['wrong_runs']} image(s) whose placeholder count does not match the grid "
            f"(first: image {values['first_wrong_run']} has {values['first_wrong_len']} placeholders, its grid "
            f"{grid[values['first_wrong_run']].tolist()} gives {values['first_wrong_want']})"
        )


def _prepare(input_ids, attention_mask, vocab, n_vis, image_token_id, rope, grid, merge) -> _Prep:
    """Validate the values of the batch and compute the scalars every backend needs; one host sync in total."""
    seq_len = input_ids.shape[1]
    ids = input_ids.to(torch.int64)
    checks, mask, is_img, lens, cu, first = _mask_checks(ids, attention_mask, image_token_id, vocab)
    n_img = 0 if grid is None else grid.shape[0]
    empty = torch.zeros(0, dtype=torch.int64, device=ids.device)
    img = (empty,) * 5  # img_tokens, img_hh, img_ww, img_vis_start, img_shift
    if grid is not None:
        img = _grid_checks(grid, is_img, merge, checks)
    values = dict(zip(checks, torch.stack([v.to(torch.int64).reshape(()) for v in checks.values()]).tolist()))
    _raise_batch_errors(values, vocab, seq_len, n_vis, image_token_id)
    if grid is not None:
        _raise_grid_errors(values, grid, n_vis, merge)
    return _Prep(mask, ids, is_img, lens, cu, first, values["T"], values["max_seqlen"], n_img, *img)
