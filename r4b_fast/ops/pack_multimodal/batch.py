"""The result of :func:`~r4b_fast.ops.pack_multimodal.pack_multimodal` (:class:`PackedBatch`) and :func:`unpack`,
its inverse for per-token results."""

from __future__ import annotations

from typing import NamedTuple

import torch


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

