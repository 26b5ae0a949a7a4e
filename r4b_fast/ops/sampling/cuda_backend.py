"""The cuda backend of :func:`r4b_fast.ops.sampling.sample`: the launcher of ``csrc/sampling.cu`` (ctypes, C ABI).

One thread block per row, the same passes as the Triton kernel (``r4b_fast/kernels/sampling.py``). Compiled by CI;
numerically tested only where a GPU is present.
"""

from __future__ import annotations

import torch

from r4b_fast.backends import device_guard


def _launch_sample_cuda(logits, temperature, top_k, top_p, min_p, uniforms, banned=None):
    import ctypes

    from r4b_fast import _cuda_build

    codes = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
    if logits.dtype not in codes:
        logits = logits.float()
    logits = logits.contiguous()
    B, V = logits.shape
    outs = [torch.empty(B, dtype=dt, device=logits.device)
            for dt in (torch.int64, torch.float32, torch.float32, torch.float32)]  # tokens, logprobs, max, log_z
    params = [temperature.float().contiguous(), top_k.to(torch.int64).contiguous(), top_p.float().contiguous(),
              min_p.float().contiguous(), uniforms.float().contiguous()]  # fmt: skip
    nban = 0 if banned is None else banned.shape[1]
    ban = outs[0] if nban == 0 else banned.to(torch.int32).contiguous()  # nban = 0: never read
    lib = _cuda_build.load_library("sampling")
    lib.r4b_sample.restype = ctypes.c_int

    def ptr(t):
        return ctypes.c_void_p(t.data_ptr())

    with device_guard(logits):
        stream = torch.cuda.current_stream(logits.device).cuda_stream
        err = lib.r4b_sample(
            ptr(logits), ctypes.c_int(codes[logits.dtype]), ctypes.c_int64(B), ctypes.c_int64(V),
            ctypes.c_int64(logits.stride(0)), *[ptr(p) for p in params], ptr(ban), ctypes.c_int(nban),
            *[ptr(o) for o in outs],
            ctypes.c_void_p(stream),
        )  # fmt: skip
    if err != 0:
        lib.r4b_cuda_error_string.restype = ctypes.c_char_p
        raise RuntimeError(f"sample cuda kernel failed: {lib.r4b_cuda_error_string(err).decode()}")
    return tuple(outs)

