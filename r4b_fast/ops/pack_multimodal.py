"""Pack a padded multimodal batch into one varlen sequence: embeddings, vision scatter, unpad and RoPE positions.

Four implementations, by name:
- ``pack_multimodal_ref``: a plain Python loop per sample and per image, written the way HF does it (embedding,
  ``masked_scatter`` of the vision rows, Qwen2-VL ``get_rope_index``, unpad); the oracle of the tests.
- torch: ``_pack_meta_torch`` (vectorised over the flattened ``[B*L]`` batch: cumsums, no loop over samples or
  images) + ``_gather_torch`` (one row gather and one row scatter); the CPU path.
- triton: ``kernels/pack_multimodal.py``, one program per (sample, slice of D): positions, indices and the row
  copy of the embeddings in a single pass over the sample.
- cuda: ``csrc/pack_multimodal.cu``, one block per (sample, slice of D) with block-wide scans; same contract.

Encoding shared by every backend: a packed token ``t`` takes row ``src[t] >= 0`` of the text table (``embed_weight``
``[V, D]`` or ``text_embeds.view(B*L, D)``) or, when ``src[t] < 0``, row ``-1 - src[t]`` of ``vision_embeds``. The
differentiable part is the op ``r4b_fast::pack_multimodal_gather`` (registered fake + autograd); the integer metadata
(positions, indices, cu_seqlens) carries no gradient.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from r4b_fast.backends import device_guard, resolve_backend

OP_BACKENDS = ("torch", "triton", "cuda")
PREFERRED = {"cpu": ("torch",), "cuda": ("triton", "cuda", "torch")}
ROPES = ("1d", "mrope")
TABLE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


class PackedBatch(NamedTuple):
    """Result of :func:`pack_multimodal`. ``T`` = number of real (unpadded) tokens of the batch.

    inputs_embeds: [T, D] embeddings (dtype of the table), vision rows written at their placeholders.
    position_ids:  [T] int64 (``rope="1d"``, restarting at 0 per sample) or [3, T] int64 (``rope="mrope"``,
                   equal to transformers' Qwen2-VL ``get_rope_index`` at the real tokens).
    cu_seqlens:    [B+1] int32 cumulative sample lengths (flash-attn varlen convention).
    max_seqlen:    int, the longest sample.
    indices:       [T] int64 flat index ``b * L + l`` of each packed token in the padded ``[B, L]`` batch.
    rope_deltas:   [B, 1] int64 (mrope: ``max position + 1 - length``, as transformers returns) or None (1d).
    batch_size, seq_len: B and L of the padded batch (for :func:`unpack`).
    """

    inputs_embeds: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    indices: torch.Tensor
    rope_deltas: torch.Tensor | None
    batch_size: int
    seq_len: int

    def pack(self, values: torch.Tensor) -> torch.Tensor:
        """``[B, L, ...]`` per-token values (labels, masks, targets) -> ``[T, ...]`` in the packed order."""
        if values.shape[:2] != (self.batch_size, self.seq_len):
            raise ValueError(
                f"values: expected leading shape ({self.batch_size}, {self.seq_len}), got {tuple(values.shape)}"
            )
        return values.reshape(self.batch_size * self.seq_len, *values.shape[2:]).index_select(0, self.indices)


def unpack(packed_values: torch.Tensor, packed_batch: PackedBatch, fill_value: float = 0) -> torch.Tensor:
    """Scatter per-token results ``[T, ...]`` (or a model output ``[1, T, ...]``) back to the padded ``[B, L, ...]``.

    Padding positions get ``fill_value``. Differentiable (an index_put into a new tensor).

    Example:
        >>> logits = model(inputs_embeds=packed.inputs_embeds[None], ...).logits  # [1, T, V]
        >>> padded_logits = unpack(logits, packed)  # [B, L, V]
    """
    t = packed_batch.indices.numel()
    if packed_values.dim() >= 2 and packed_values.shape[0] == 1 and packed_values.shape[1] == t:
        packed_values = packed_values[0]  # a model output [1, T, ...] (batch of one packed sequence)
    if packed_values.shape[0] != t:
        raise ValueError(f"packed_values: expected {t} tokens in dim 0, got shape {tuple(packed_values.shape)}")
    b, n = packed_batch.batch_size, packed_batch.seq_len
    out = packed_values.new_full((b * n, *packed_values.shape[1:]), fill_value)
    out = out.index_put((packed_batch.indices,), packed_values)
    return out.view(b, n, *packed_values.shape[1:])


# ----------------------------------------------------------------------------------------------------------------
# Reference: a loop per sample and per image, the way transformers writes it.
# ----------------------------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------------------------
# Shared preparation: vectorised validation (one host sync) and the per-sample / per-image scalars of the kernels.
# ----------------------------------------------------------------------------------------------------------------
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


def _prepare(input_ids, attention_mask, vocab, n_vis, image_token_id, rope, grid, merge) -> _Prep:
    """Validate the values of the batch and compute the scalars every backend needs; one host sync in total."""
    dev = input_ids.device
    b_size, seq_len = input_ids.shape
    ids = input_ids.to(torch.int64)
    if attention_mask.dtype == torch.bool:
        mask = attention_mask
        bad_mask = torch.zeros((), dtype=torch.int64, device=dev)
    else:
        bad_mask = ((attention_mask != 0) & (attention_mask != 1)).sum()
        mask = attention_mask != 0
    lens = mask.sum(1)
    cu = torch.zeros(b_size + 1, dtype=torch.int64, device=dev)
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
    n_img = 0 if grid is None else grid.shape[0]
    empty = torch.zeros(0, dtype=torch.int64, device=dev)
    img_tokens = img_hh = img_ww = img_vis_start = img_shift = empty
    if grid is not None:
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
    values = dict(zip(checks, torch.stack([v.to(torch.int64).reshape(()) for v in checks.values()]).tolist()))
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
    if grid is not None:
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
    return _Prep(
        mask, ids, is_img, lens, cu, first, values["T"], values["max_seqlen"], n_img,
        img_tokens, img_hh, img_ww, img_vis_start, img_shift,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# torch backend: vectorised over the flattened batch.
# ----------------------------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------------------------
# Kernel backends
# ----------------------------------------------------------------------------------------------------------------
COPY_UNITS = (16, 8, 4, 2, 1)  # bytes


def copy_unit_bytes(row_bytes: int, tensors, widest: int) -> int:
    """The widest copy unit (16, 8, 4, 2 or 1 bytes, at most ``widest``) that divides ``row_bytes`` and aligns the
    data pointer of every non-empty tensor in ``tensors``. Both kernels copy rows as raw units of this size: 16
    bytes (CUDA) / 8 bytes (Triton) for aligned rows, narrower for odd rows or views at an odd offset. Reads only
    pointers and sizes: no sync, works on meta tensors.

    Example: ``copy_unit_bytes(2047 * 2, (table,), 16) == 2`` for a bf16 row of D = 2047.
    """
    for unit in COPY_UNITS:
        if unit > widest or row_bytes % unit:
            continue
        if all(t.numel() == 0 or (t.data_ptr() % unit == 0 and t.storage_offset() * t.element_size() % unit == 0)
               for t in tensors):
            return unit
    raise AssertionError("unreachable: a 1-byte unit always fits")


def _kernel_args(prep: _Prep):
    i32 = lambda t: t.to(torch.int32).contiguous()  # noqa: E731
    vis_counts = prep.is_img.sum(1)
    vis_start = torch.cumsum(vis_counts, 0) - vis_counts
    prev = torch.zeros_like(prep.is_img)
    prev[:, 1:] = prep.is_img[:, :-1]
    runs = (prep.is_img & ~prev).sum(1)
    img_start = torch.cumsum(runs, 0) - runs
    return dict(
        ids=prep.ids.contiguous(), first=i32(prep.first), lens=i32(prep.lens), out_start=i32(prep.cu_seqlens[:-1]),
        vis_start=i32(vis_start), img_start=i32(img_start), img_hh=i32(prep.img_hh), img_ww=i32(prep.img_ww),
        img_vis_start=i32(prep.img_vis_start), img_shift=i32(prep.img_shift),
    )  # fmt: skip


def _pack_kernel_backend(backend, prep, rope, table, vision, image_token_id, text_embeds):
    """Returns ``(inputs_embeds, indices, src, position_ids, rope_deltas)`` computed in one fused kernel."""
    dev = table.device
    b_size, seq_len = prep.ids.shape
    args = _kernel_args(prep)
    d = table.shape[1]
    out = torch.empty(prep.T, d, dtype=table.dtype, device=dev)
    indices = torch.empty(prep.T, dtype=torch.int64, device=dev)
    src = torch.empty(prep.T, dtype=torch.int64, device=dev)
    npos = 3 if rope == "mrope" else 1
    pos = torch.empty(npos, prep.T, dtype=torch.int64, device=dev)
    deltas = torch.empty(b_size, dtype=torch.int64, device=dev)
    vision = vision.to(table.dtype).contiguous()
    table = table.contiguous()
    if backend == "triton":
        from r4b_fast.kernels.pack_multimodal import launch_pack_multimodal

        launch_pack_multimodal(args, table, vision, out, indices, src, pos, deltas, image_token_id, seq_len,
                               rope == "mrope", text_embeds, prep.max_seqlen)  # fmt: skip
    else:
        _launch_pack_multimodal_cuda(args, table, vision, out, indices, src, pos, deltas, image_token_id, seq_len,
                                     rope == "mrope", text_embeds)  # fmt: skip
    position_ids = pos if rope == "mrope" else pos[0]
    rope_deltas = deltas.unsqueeze(1) if rope == "mrope" else None
    return out, indices, src, position_ids, rope_deltas


def _launch_pack_multimodal_cuda(args, table, vision, out, indices, src, pos, deltas, image_token_id, seq_len,
                                 mrope, text_embeds):  # fmt: skip
    import ctypes

    from r4b_fast import _cuda_build

    lib = _cuda_build.load_library("pack_multimodal")
    fn = lib.r4b_pack_multimodal
    fn.restype = ctypes.c_int

    def ptr(t):
        return ctypes.c_void_p(t.data_ptr() if t is not None and t.numel() else 0)

    row_bytes = table.shape[1] * table.element_size()
    unit = copy_unit_bytes(row_bytes, (table, vision, out), 16)  # the kernel copies raw units of this size
    with device_guard(out):  # the kernel launches on the current device: make it the tensors'
        stream = torch.cuda.current_stream(table.device).cuda_stream
        err = fn(
            ptr(args["ids"]), ptr(args["first"]), ptr(args["lens"]), ptr(args["out_start"]), ptr(args["vis_start"]),
            ptr(args["img_start"]), ptr(args["img_hh"]), ptr(args["img_ww"]), ptr(args["img_vis_start"]),
            ptr(args["img_shift"]), ptr(table), ptr(vision), ptr(out), ptr(indices), ptr(src), ptr(pos),
            ptr(deltas), ctypes.c_int64(args["ids"].shape[0]), ctypes.c_int64(seq_len), ctypes.c_int64(row_bytes),
            ctypes.c_int64(out.shape[0]), ctypes.c_int64(image_token_id), ctypes.c_int(int(mrope)),
            ctypes.c_int(int(text_embeds)), ctypes.c_int(unit), ctypes.c_void_p(stream),
        )  # fmt: skip
    if err != 0:
        lib.r4b_cuda_error_string.restype = ctypes.c_char_p
        raise RuntimeError(f"pack_multimodal cuda kernel failed: {lib.r4b_cuda_error_string(err).decode()}")
    return unit


# ----------------------------------------------------------------------------------------------------------------
# torch.library op: the differentiable row gather (forward of the torch backend; backward of all backends)
# ----------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("r4b_fast::pack_multimodal_gather", mutates_args=())
def _gather_op(table: torch.Tensor, vision: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    return _gather_torch(table, vision, src)


@_gather_op.register_fake
def _(table, vision, src):
    return table.new_empty((src.shape[0], table.shape[1]))


def _gather_setup(ctx, inputs, output):
    table, vision, src = inputs
    ctx.save_for_backward(src)
    ctx.table_shape, ctx.table_dtype = table.shape, table.dtype
    ctx.vision_shape, ctx.vision_dtype = vision.shape, vision.dtype


def _scatter_grads(grad, src, table_shape, n_vis):
    """Backward of the gather: ``(grad_table, grad_vision)``. Placeholder tokens give no gradient to the table
    (their embedding was replaced, as with ``masked_scatter``)."""
    is_vis = (src < 0).unsqueeze(1)
    g_text = torch.where(is_vis, 0, grad)
    grad_table = grad.new_zeros(table_shape).index_add_(0, src.clamp_min(0), g_text)
    if n_vis:
        pos = torch.nonzero_static(is_vis.squeeze(1), size=n_vis).reshape(-1)
        grad_vision = grad.index_select(0, pos)
    else:
        grad_vision = grad.new_zeros((0, grad.shape[1]))
    return grad_table, grad_vision


def _gather_backward(ctx, grad):
    (src,) = ctx.saved_tensors
    grad_table, grad_vision = _scatter_grads(grad, src, ctx.table_shape, ctx.vision_shape[0])
    return grad_table.to(ctx.table_dtype), grad_vision.to(ctx.vision_dtype), None


_gather_op.register_autograd(_gather_backward, setup_context=_gather_setup)


class _KernelPack(torch.autograd.Function):
    """Autograd around the fused kernels: forward returns the kernel's embeddings, backward is the gather's."""

    @staticmethod
    def forward(ctx, table, vision, out, src):
        ctx.save_for_backward(src)
        ctx.table_shape, ctx.table_dtype = table.shape, table.dtype
        ctx.n_vis, ctx.vision_dtype = vision.shape[0], vision.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        (src,) = ctx.saved_tensors
        grad_table, grad_vision = _scatter_grads(grad, src, ctx.table_shape, ctx.n_vis)
        return grad_table.to(ctx.table_dtype), grad_vision.to(ctx.vision_dtype), None, None


# ----------------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------------
def _check_int_tensor(name, t, shape=None, device=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex:
        raise TypeError(f"{name}: expected an integer tensor, got dtype {t.dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: on device {t.device}, but input_ids are on {device}")


def pack_multimodal(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    embed_weight: torch.Tensor | None = None,
    vision_embeds: torch.Tensor | None = None,
    *,
    image_token_id: int,
    text_embeds: torch.Tensor | None = None,
    rope: str = "1d",
    image_grid_thw: torch.Tensor | None = None,
    spatial_merge_size: int = 2,
    backend: str | None = None,
) -> PackedBatch:
    """Turn a padded multimodal batch into one packed (varlen) sequence in a single pass.

    Embeds the text tokens, writes each image's vision rows into its placeholder tokens (in batch order, as
    ``masked_scatter`` does), drops the padding and computes the RoPE positions of the packed tokens.

    Args:
        input_ids: ``[B, L]`` integer token ids (padding ids are ignored).
        attention_mask: ``[B, L]`` bool or 0/1 integers; each row one contiguous run of real tokens (left or right
            padding, possibly different per row), never empty.
        embed_weight: ``[V, D]`` input embedding table (``model.get_input_embeddings().weight``). Give this or
            ``text_embeds``.
        vision_embeds: ``[N_vis, D]`` projected vision features, one row per placeholder token, images in batch order.
        image_token_id: the placeholder id (``<image>`` for LLaVA-OneVision / R-4B, ``<|image_pad|>`` for Qwen2.5-VL).
        text_embeds: ``[B, L, D]`` precomputed text embeddings instead of ``embed_weight``.
        rope: ``"1d"`` (positions restart at 0 per sample) or ``"mrope"`` (Qwen2/2.5-VL 3-D positions, equal to
            transformers' ``get_rope_index``; needs ``image_grid_thw`` when there are images).
        image_grid_thw: ``[n_img, 3]`` integer (t, h, w) patch grid of each image, in batch order (mrope; optional
            for 1d, where it only adds the per-image checks).
        spatial_merge_size: the vision merger's spatial factor (2 for Qwen2/2.5-VL).
        backend: ``"torch"``, ``"triton"`` or ``"cuda"``; default ``$R4B_FAST_BACKEND`` or the best for the device.

    Returns:
        :class:`PackedBatch`. Gradients flow to ``vision_embeds`` and to ``embed_weight`` (or ``text_embeds``);
        placeholder tokens give no gradient to the table. One host sync (``T``, ``max_seqlen`` and all value checks).

    Example:
        >>> import torch
        >>> from r4b_fast.ops.pack_multimodal import pack_multimodal
        >>> ids = torch.tensor([[5, 9, 9, 6], [0, 0, 7, 8]])  # 9 = image placeholder; row 1 is left-padded
        >>> mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
        >>> out = pack_multimodal(ids, mask, torch.randn(16, 4), torch.randn(2, 4), image_token_id=9,
        ...                       rope="mrope", image_grid_thw=torch.tensor([[1, 2, 4]]))
        >>> out.position_ids
        tensor([[0, 1, 1, 3, 0, 1],
                [0, 1, 1, 3, 0, 1],
                [0, 1, 2, 3, 0, 1]])
        >>> out.cu_seqlens, out.max_seqlen
        (tensor([0, 4, 6], dtype=torch.int32), 4)
    """
    _check_int_tensor("input_ids", input_ids)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids: expected a 2-D tensor [B, L], got shape {tuple(input_ids.shape)}")
    b_size, seq_len = input_ids.shape
    if b_size == 0 or seq_len == 0:
        raise ValueError(f"input_ids: empty batch, shape {tuple(input_ids.shape)}")
    dev = input_ids.device
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask: expected a torch.Tensor, got {type(attention_mask).__name__}")
    if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
        raise TypeError(f"attention_mask: expected a bool or integer tensor, got dtype {attention_mask.dtype}")
    if tuple(attention_mask.shape) != (b_size, seq_len):
        raise ValueError(f"attention_mask: expected shape {(b_size, seq_len)} like input_ids, got "
                         f"{tuple(attention_mask.shape)}")  # fmt: skip
    if attention_mask.device != dev:
        raise ValueError(f"attention_mask: on device {attention_mask.device}, but input_ids are on {dev}")
    if (embed_weight is None) == (text_embeds is None):
        raise ValueError("embed_weight / text_embeds: give exactly one (the [V, D] table or [B, L, D] embeddings)")
    if embed_weight is not None:
        table_name, table = "embed_weight", embed_weight
        if not isinstance(table, torch.Tensor) or table.dim() != 2:
            raise ValueError(f"embed_weight: expected a 2-D tensor [V, D], got {_describe(table)}")
    else:
        table_name, table = "text_embeds", text_embeds
        if not isinstance(table, torch.Tensor) or table.dim() != 3 or tuple(table.shape[:2]) != (b_size, seq_len):
            raise ValueError(f"text_embeds: expected a tensor [B={b_size}, L={seq_len}, D], got {_describe(table)}")
    if not table.dtype.is_floating_point:
        raise TypeError(f"{table_name}: expected a floating-point tensor, got dtype {table.dtype}")
    if table.dtype not in TABLE_DTYPES:
        raise TypeError(f"{table_name}: dtype {table.dtype} is not supported; expected one of {TABLE_DTYPES}")
    if table.device != dev:
        raise ValueError(f"{table_name}: on device {table.device}, but input_ids are on {dev}")
    d = table.shape[-1]
    if vision_embeds is None:
        vision_embeds = table.new_zeros((0, d))
    if not isinstance(vision_embeds, torch.Tensor):
        raise TypeError(f"vision_embeds: expected a torch.Tensor, got {type(vision_embeds).__name__}")
    if vision_embeds.dim() != 2 or vision_embeds.shape[1] != d:
        raise ValueError(f"vision_embeds: expected shape [N_vis, D={d}], got {tuple(vision_embeds.shape)}")
    if not vision_embeds.dtype.is_floating_point:
        raise TypeError(f"vision_embeds: expected a floating-point tensor, got dtype {vision_embeds.dtype}")
    if vision_embeds.device != dev:
        raise ValueError(f"vision_embeds: on device {vision_embeds.device}, but input_ids are on {dev}")
    if isinstance(image_token_id, bool) or not isinstance(image_token_id, int):
        raise TypeError(f"image_token_id: expected an int, got {image_token_id!r}")
    if rope not in ROPES:
        raise ValueError(f"rope: expected one of {ROPES}, got {rope!r}")
    if isinstance(spatial_merge_size, bool) or not isinstance(spatial_merge_size, int) or spatial_merge_size < 1:
        raise ValueError(f"spatial_merge_size: expected a positive int, got {spatial_merge_size!r}")
    if image_grid_thw is not None:
        _check_int_tensor("image_grid_thw", image_grid_thw, device=dev)
        if image_grid_thw.dim() != 2 or image_grid_thw.shape[1] != 3:
            raise ValueError(f"image_grid_thw: expected shape [n_img, 3], got {tuple(image_grid_thw.shape)}")
    elif rope == "mrope" and vision_embeds.shape[0] > 0:
        raise ValueError("image_grid_thw: rope='mrope' with images needs the (t, h, w) grid of every image")
    if rope == "mrope" and image_grid_thw is None:
        image_grid_thw = torch.zeros(0, 3, dtype=torch.int64, device=dev)
    chosen = resolve_backend(backend, dev, OP_BACKENDS, PREFERRED, "pack_multimodal")
    vocab = table.shape[0] if embed_weight is not None else None
    prep = _prepare(input_ids, attention_mask, vocab, vision_embeds.shape[0], image_token_id, rope, image_grid_thw,
                    spatial_merge_size)  # fmt: skip
    is_text_embeds = text_embeds is not None
    flat_table = table.reshape(b_size * seq_len, d) if is_text_embeds else table
    if chosen == "torch":
        indices, src, position_ids, rope_deltas = _pack_meta_torch(prep, rope, is_text_embeds)
        embeds = _gather_op(flat_table, vision_embeds, src)
    else:
        out, indices, src, position_ids, rope_deltas = _pack_kernel_backend(
            chosen, prep, rope, flat_table.detach(), vision_embeds.detach(), image_token_id, is_text_embeds
        )
        embeds = _KernelPack.apply(flat_table, vision_embeds, out, src)
    return PackedBatch(embeds, position_ids, prep.cu_seqlens.to(torch.int32), prep.max_seqlen, indices, rope_deltas,
                       b_size, seq_len)  # fmt: skip


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"shape {tuple(x.shape)}"
    return type(x).__name__
