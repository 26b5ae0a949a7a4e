"""The public :func:`pack_multimodal`: argument validation, backend choice, and the dispatch to the torch backend
(the ``r4b_fast::pack_multimodal_gather`` op) or a fused kernel (``_KernelPack``)."""

from __future__ import annotations

import torch

from r4b_fast.backends import resolve_backend
from r4b_fast.ops.pack_multimodal.autograd import _gather_op, _KernelPack
from r4b_fast.ops.pack_multimodal.batch import PackedBatch
from r4b_fast.ops.pack_multimodal.kernel_backends import _pack_kernel_backend
from r4b_fast.ops.pack_multimodal.prepare import _prepare
from r4b_fast.ops.pack_multimodal.torch_backend import _pack_meta_torch

OP_BACKENDS = ("torch", "triton", "cuda")
PREFERRED = {"cpu": ("torch",), "cuda": ("triton", "cuda", "torch")}
ROPES = ("1d", "mrope")
TABLE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


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
    b_size, seq_len = _check_batch(input_ids, attention_mask)
    dev = input_ids.device
    table = _check_table(embed_weight, text_embeds, b_size, seq_len, dev)
    d = table.shape[-1]
    vision_embeds = _check_vision(vision_embeds, table, dev)
    image_grid_thw = _check_options(image_token_id, rope, spatial_merge_size, image_grid_thw, vision_embeds, dev)
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


# ----------------------------------------------------------------------------------------------------------------
# Validation of the arguments (shapes, dtypes, devices: no host sync; the values are checked by _prepare)
# ----------------------------------------------------------------------------------------------------------------
def _check_batch(input_ids, attention_mask) -> tuple[int, int]:
    """``input_ids`` [B, L] integer and ``attention_mask`` [B, L] bool / integer on its device: ``(B, L)``."""
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
    return b_size, seq_len


def _check_table(embed_weight, text_embeds, b_size: int, seq_len: int, dev) -> torch.Tensor:
    """Exactly one of ``embed_weight`` [V, D] / ``text_embeds`` [B, L, D], floating point of a supported dtype, on
    ``dev``: that one."""
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
    return table


def _check_vision(vision_embeds, table: torch.Tensor, dev) -> torch.Tensor:
    """``vision_embeds`` [N_vis, D] floating point on ``dev`` (None: no rows)."""
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
    return vision_embeds


def _check_options(image_token_id, rope, spatial_merge_size, image_grid_thw, vision_embeds, dev):
    """``image_token_id``, ``rope``, ``spatial_merge_size`` and ``image_grid_thw`` [n_img, 3]: the grid to use
    (an empty one for mrope without images, None for 1d without a grid)."""
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
    return image_grid_thw


def _check_int_tensor(name, t, shape=None, device=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex:
        raise TypeError(f"{name}: expected an integer tensor, got dtype {t.dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: on device {t.device}, but input_ids are on {device}")


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"shape {tuple(x.shape)}"
    return type(x).__name__
