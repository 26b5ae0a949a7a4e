"""The checkpoint's weights file: safetensors written tensor by tensor from the parameters themselves (no copy of the
model in memory), tied parameters stored once with their other names recorded in the header's metadata."""

from __future__ import annotations

import json
import struct
from typing import Any

import torch
from safetensors.torch import _TYPES

_DTYPE_NAMES = {dtype: name for name, dtype in _TYPES.items()}
_ALIGN = 8  # safetensors pads its JSON header so that the data starts 8-byte aligned


def split_tied(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(unique, aliases)``: ``state`` with each group of names that view the same memory (same storage, offset,
    shape, stride and dtype: tied parameters such as ``lm_head.weight`` / ``embed_tokens.weight``) reduced to its
    first name, and ``{other_name: kept_name}`` for the rest. Tensors that only partly overlap are kept apart.

    Example: ``split_tied({"a": w, "b": w})`` -> ``({"a": w}, {"b": "a"})``
    """
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in state.items():
        key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
               tensor.stride(), tensor.dtype)  # fmt: skip
        if tensor.numel() > 0 and key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            unique[name] = tensor
    return unique, aliases


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes on the CPU, without a copy when it is already a contiguous CPU tensor."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def module_ties(module: torch.nn.Module) -> dict[str, str]:
    """``{other_name: first_name}`` of the parameters and buffers ``module`` registers under several names (tied
    weights), found by identity: it holds under FSDP2, where a full state dict gathers each name into its own
    tensor. Example: ``module_ties(model)`` -> ``{"lm_head.weight": "model.embed_tokens.weight"}``."""
    ties: dict[str, str] = {}
    for named in (module.named_parameters(remove_duplicate=False), module.named_buffers(remove_duplicate=False)):
        first: dict[int, str] = {}
        for name, tensor in named:
            if tensor is None:
                continue
            if id(tensor) in first:
                ties[name] = first[id(tensor)]
            else:
                first[id(tensor)] = name
    return ties


def write_safetensors(f, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                      ties: dict[str, str] | None = None) -> None:  # fmt: skip
    """Write ``state`` in the safetensors format into the binary file object ``f``, one tensor at a time: each
    tensor's bytes go from its own memory to the file (a tensor on a GPU is copied to the CPU alone). Tied tensors
    are stored once (those that share memory, and ``ties``: ``{other_name: kept_name}`` from
    :func:`module_ties`); the other names map to the kept one in ``__metadata__`` (as
    ``safetensors.torch.save_model`` and transformers write them), which :func:`read_safetensors` turns back into
    entries.

    Example::

        with open("model.safetensors", "wb") as f:
            write_safetensors(f, model.state_dict())
    """
    unique, aliases = split_tied(state)
    for name, kept in (ties or {}).items():
        if name != kept and name in unique and kept in unique and unique[name].shape == unique[kept].shape:
            del unique[name]
            aliases[name] = kept
    header: dict[str, Any] = {}
    offset = 0
    for name, tensor in unique.items():
        if tensor.dtype not in _DTYPE_NAMES:
            raise TypeError(f"write_safetensors: {name}: dtype {tensor.dtype} has no safetensors name")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}  # fmt: skip
        offset += size
    meta = {**(metadata or {}), **aliases}
    if meta:
        header["__metadata__"] = {str(k): str(v) for k, v in meta.items()}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % _ALIGN)
    f.write(struct.pack("<Q", len(encoded)))
    f.write(encoded)
    for tensor in unique.values():
        if tensor.numel():
            f.write(_raw_bytes(tensor))


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's bytes (empty when it has none)."""
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]).get("__metadata__") or {}


def read_safetensors(data: bytes) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file's bytes, each tied name (recorded in the metadata as ``alias -> kept``)
    restored as the same tensor as its kept name. A file that stores tied weights twice (checkpoints written before
    tied weights were stored once) reads as it is.

    Example: ``read_safetensors(Path("checkpoint/model.safetensors").read_bytes())["lm_head.weight"]``
    """
    from safetensors.torch import load

    tensors = load(data)
    for alias, kept in safetensors_metadata(data).items():
        if alias not in tensors and kept in tensors:
            tensors[alias] = tensors[kept]
    return tensors
