"""Run transformers' vision-language models on a :class:`~r4b_fast.ops.pack_multimodal.PackedBatch`: no padding.

How it plugs in (transformers' own extension points, no copied model code):

- ``AttentionInterface.register("r4b_packed", packed_attention)``: the attention of every decoder layer. With the
  varlen kwargs (``cu_seq_lens_q/k``, ``max_length_q/k``, which transformers forwards from ``model(...)`` down to the
  attention function) it attends within each packed sample only, through
  flash-attn's ``flash_attn_varlen_func`` when installed (CUDA, fp16/bf16), else xformers'
  ``BlockDiagonalCausalMask`` when installed (CUDA), else PyTorch SDPA per segment (works on CPU, any dtype).
  Without them (an ordinary padded forward) it is transformers' own SDPA attention.
- ``AttentionMaskInterface.register("r4b_packed", ...)``: no ``[T, T]`` mask is ever built for a packed forward (the
  segments are given by ``cu_seqlens``); a padded forward gets transformers' SDPA mask.
- the packed input goes in as ``inputs_embeds [1, T, D]`` with ``position_ids`` ``[1, T]`` (1-D RoPE: LLaVA-OneVision /
  R-4B with a Qwen3 text model) or ``[3, 1, T]`` (M-RoPE: Qwen2.5-VL), as each model's forward accepts them.

Supported families (tested): LLaVA-OneVision with a Qwen3 text model (the R-4B architecture), Qwen2.5-VL, and
Qwen3-VL's language model with its DeepStack features (``r4b_fast.models.families``).

Example:
    >>> packed = pack_multimodal(ids, mask, model.get_input_embeddings().weight, vision_embeds,
    ...                          image_token_id=model.config.image_token_id, rope="mrope", image_grid_thw=grid)
    >>> logits = packed_forward(model, packed).logits        # [1, T, V]
    >>> logprobs = unpack(logits[0].log_softmax(-1), packed)  # [B, L, V], padding filled with 0
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
from dataclasses import dataclass, field

import torch

from r4b_fast.ops.pack_multimodal import PackedBatch

ATTN_IMPLEMENTATION = "r4b_packed"
ATTN_BACKENDS = ("flash_attn", "xformers", "sdpa")


@dataclass
class _PackedContext:
    cu_seqlens: torch.Tensor
    backend: str | None
    cache: dict = field(default_factory=dict)

    @property
    def seqlens(self) -> list[int]:
        """Host copy of the sample lengths, read once per forward and only by the backends that need it (SDPA per
        segment, xformers' block-diagonal bias); flash-attn reads ``cu_seqlens`` on the device: no sync."""
        if "seqlens" not in self.cache:
            self.cache["seqlens"] = self.cu_seqlens.diff().tolist()
        return self.cache["seqlens"]


_ACTIVE: contextvars.ContextVar[_PackedContext | None] = contextvars.ContextVar("r4b_packed", default=None)


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def attention_backend_reasons(backend: str, device: torch.device | str, dtype: torch.dtype) -> list[str]:
    """Why ``backend`` cannot run packed attention for tensors of ``device``/``dtype``: empty when it can."""
    device = torch.device(device)
    if backend not in ATTN_BACKENDS:
        return [f"unknown attention backend {backend!r}; expected one of {ATTN_BACKENDS}"]
    reasons = []
    if backend == "flash_attn":
        if not _has("flash_attn"):
            reasons.append("flash-attn is not installed")
        if device.type != "cuda":
            reasons.append(f"flash-attn needs CUDA tensors, got {device}")
        if dtype not in (torch.float16, torch.bfloat16):
            reasons.append(f"flash-attn needs float16/bfloat16, got {dtype}")
    elif backend == "xformers":
        if not _has("xformers"):
            reasons.append("xformers is not installed")
        if device.type != "cuda":
            reasons.append(f"xformers' kernels need CUDA tensors, got {device}")
    return reasons


def choose_attention_backend(device: torch.device | str, dtype: torch.dtype, requested: str | None = None) -> str:
    """The attention backend a packed forward uses: ``requested`` (checked), else flash_attn > xformers > sdpa."""
    if requested is not None:
        reasons = attention_backend_reasons(requested, device, dtype)
        if reasons:
            raise RuntimeError(f"packed attention backend {requested!r} cannot run: " + "; ".join(reasons))
        return requested
    for backend in ATTN_BACKENDS:
        if not attention_backend_reasons(backend, device, dtype):
            return backend
    return "sdpa"


def _sdpa_segments(query, key, value, seqlens, scaling, dropout, is_causal, sliding_window, n_rep):
    """query [1, H, T, d], key/value [1, Hkv, T, d] -> [1, T, H, d]: one SDPA call per packed sample."""
    outs = []
    start = 0
    for n in seqlens:
        q, k, v = (x[:, :, start : start + n] for x in (query, key, value))
        if n_rep > 1:
            k = k.repeat_interleave(n_rep, dim=1)
            v = v.repeat_interleave(n_rep, dim=1)
        mask = None
        causal = is_causal
        if sliding_window is not None and is_causal:
            i = torch.arange(n, device=q.device)
            mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - sliding_window)
            causal = False
        outs.append(torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling, is_causal=causal and n > 1
        ))  # fmt: skip
        start += n
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous()


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function (``AttentionInterface``) for packed sequences.

    ``query [1, H, T, d]``, ``key``/``value`` ``[1, Hkv, T, d]``; returns ``([1, T, H, d], None)``. Packed when the
    call carries ``cu_seq_lens_q`` (and a :func:`packed_forward` is active); otherwise transformers' SDPA attention.
    """
    cu = kwargs.get("cu_seq_lens_q")
    ctx = _ACTIVE.get()
    if cu is None or ctx is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, softcap=softcap, **kwargs)  # fmt: skip
    if query.shape[0] != 1:
        raise ValueError(f"packed attention expects a batch of 1 packed sequence, got query {tuple(query.shape)}")
    if softcap is not None:
        raise NotImplementedError("packed attention: logit softcapping is not supported")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    dropout = dropout if module.training else 0.0
    backend = ctx.backend or choose_attention_backend(query.device, query.dtype)
    max_len = kwargs.get("max_length_q") or int(cu.diff().max())
    if backend == "flash_attn":
        from flash_attn import flash_attn_varlen_func

        window = (sliding_window - 1, 0) if sliding_window is not None else (-1, -1)
        q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, H, d]
        out = flash_attn_varlen_func(
            q,
            k,
            v,
            cu.to(torch.int32),
            cu.to(torch.int32),
            max_len,
            max_len,
            dropout_p=dropout,
            softmax_scale=scaling,
            causal=causal,
            window_size=window,
        )
        return out.unsqueeze(0), None
    n_rep = query.shape[1] // key.shape[1]
    if backend == "xformers" and sliding_window is None:
        import xformers.ops as xops
        from xformers.ops.fmha.attn_bias import BlockDiagonalCausalMask, BlockDiagonalMask

        key_ = ("xformers", causal)
        if key_ not in ctx.cache:
            cls = BlockDiagonalCausalMask if causal else BlockDiagonalMask
            ctx.cache[key_] = cls.from_seqlens(ctx.seqlens)
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # [1, T, H, d]
        if n_rep > 1:
            k = k.repeat_interleave(n_rep, dim=2)
            v = v.repeat_interleave(n_rep, dim=2)
        out = xops.memory_efficient_attention(q, k, v, attn_bias=ctx.cache[key_], p=dropout, scale=scaling)
        return out, None
    return _sdpa_segments(query, key, value, ctx.seqlens, scaling, dropout, causal, sliding_window, n_rep), None


def _packed_mask(*args, **kwargs):
    """Mask function for ``r4b_packed``: none for a packed forward (segments come from cu_seqlens), SDPA's else."""
    if _ACTIVE.get() is not None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


def register_packed_attention() -> str:
    """Register ``"r4b_packed"`` with transformers' AttentionInterface and AttentionMaskInterface (idempotent).

    Returns the name, to pass as ``attn_implementation=`` to ``from_pretrained`` / ``from_config`` or to
    ``model.set_attn_implementation``.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, packed_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _packed_mask)
    return ATTN_IMPLEMENTATION


def enable_packed_attention(model) -> None:
    """Switch ``model``'s text model to ``"r4b_packed"`` attention (the vision tower keeps its own). Padded forwards
    keep working (they get transformers' SDPA attention and mask)."""
    register_packed_attention()
    config = model.config
    if hasattr(config, "text_config") and config.text_config is not None:
        model.set_attn_implementation({"text_config": ATTN_IMPLEMENTATION})
    else:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)


def _text_attn_implementation(model) -> str | None:
    config = model.config
    text = getattr(config, "text_config", None) or config
    return text._attn_implementation


@contextlib.contextmanager
def packed_context(packed: PackedBatch, attn_backend: str | None = None):
    """Make packed attention active for forwards inside the block (``packed_forward`` uses it; use it directly to
    call a model's forward yourself with the varlen kwargs of :func:`packed_kwargs`)."""
    if attn_backend is not None and attn_backend not in ATTN_BACKENDS:
        raise ValueError(f"attn_backend: expected one of {ATTN_BACKENDS} or None, got {attn_backend!r}")
    token = _ACTIVE.set(_PackedContext(packed.cu_seqlens, attn_backend))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def packed_kwargs(packed: PackedBatch) -> dict:
    """The model-forward kwargs of a packed batch: ``inputs_embeds [1, T, D]``, ``position_ids`` (``[1, T]`` or
    ``[3, 1, T]``), and transformers' varlen kwargs ``cu_seq_lens_q/k``, ``max_length_q/k``."""
    pos = packed.position_ids
    position_ids = pos[:, None, :] if pos.dim() == 2 else pos[None, :]
    return dict(
        inputs_embeds=packed.inputs_embeds[None],
        position_ids=position_ids,
        cu_seq_lens_q=packed.cu_seqlens,
        cu_seq_lens_k=packed.cu_seqlens,
        max_length_q=packed.max_seqlen,
        max_length_k=packed.max_seqlen,
    )


def packed_forward(model, packed: PackedBatch, *, attn_backend: str | None = None, **kwargs):
    """Run a supported transformers VLM (LLaVA-OneVision/R-4B with a Qwen3 text model, Qwen2.5-VL) on a packed batch.

    Args:
        model: e.g. ``LlavaOnevisionForConditionalGeneration`` or ``Qwen2_5_VLForConditionalGeneration`` (or their
            ``*Model``). Its text attention is switched to ``"r4b_packed"`` if it is not already.
        packed: from :func:`~r4b_fast.ops.pack_multimodal.pack_multimodal`; ``inputs_embeds`` already hold the vision
            features, so no ``pixel_values`` are passed. ``rope="mrope"`` for Qwen2.5-VL, ``"1d"`` for LLaVA-OneVision.
        attn_backend: ``"flash_attn"``, ``"xformers"`` or ``"sdpa"`` (per-segment, CPU-capable); default: the first
            that can run.
        kwargs: passed to ``model(...)`` (e.g. ``logits_to_keep``).

    Returns:
        The model's output for a batch of one sequence of ``T`` tokens (``logits [1, T, V]``); use
        :func:`~r4b_fast.ops.pack_multimodal.unpack` to get ``[B, L, ...]`` back.
    """
    if not isinstance(packed, PackedBatch):
        raise TypeError(f"packed: expected a PackedBatch from pack_multimodal, got {type(packed).__name__}")
    if _text_attn_implementation(model) != ATTN_IMPLEMENTATION:
        enable_packed_attention(model)
    with packed_context(packed, attn_backend):
        return model(**packed_kwargs(packed), use_cache=False, **kwargs)
