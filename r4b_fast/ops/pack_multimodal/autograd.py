"""The differentiable part of packing: the ``r4b_fast::pack_multimodal_gather`` ``torch.library`` op (the torch
backend's row gather, registered fake + autograd) and ``_KernelPack`` (autograd around the fused kernels' output).
Both backwards are :func:`_scatter_grads`."""

from __future__ import annotations

import torch

from r4b_fast.ops.pack_multimodal.torch_backend import _gather_torch


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
