"""The kernel backends of :func:`~r4b_fast.ops.pack_multimodal.pack_multimodal`: the fused kernels' arguments,
the copy width they share (:func:`copy_unit_bytes`), and the two launchers: triton
(``r4b_fast/kernels/pack_multimodal.py``: ``launch_pack_multimodal``) and cuda (``r4b_fast/csrc/pack_multimodal.cu``:
``_launch_pack_multimodal_cuda`` here, ctypes)."""

from __future__ import annotations

import torch

from r4b_fast.backends import device_guard
from r4b_fast.ops.pack_multimodal.prepare import _Prep

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

