"""Pack a padded multimodal batch into one varlen sequence: embeddings, vision scatter, unpad and RoPE positions.

Four implementations, by name (one file each):
- ``pack_multimodal_ref`` (``reference.py``): a plain Python loop per sample and per image, written the way HF does
  it (embedding, ``masked_scatter`` of the vision rows, Qwen2-VL ``get_rope_index``, unpad); the oracle of the tests.
- torch (``torch_backend.py``): ``_pack_meta_torch`` (vectorised over the flattened ``[B*L]`` batch: cumsums, no
  loop over samples or images) + ``_gather_torch`` (one row gather and one row scatter); the CPU path.
- triton: ``r4b_fast/kernels/pack_multimodal.py``, one program per (sample, slice of D): positions, indices and the
  row copy of the embeddings in a single pass over the sample.
- cuda: ``r4b_fast/csrc/pack_multimodal.cu``, one block per (sample, slice of D) with block-wide scans; same contract.
  Both kernels' launch (arguments, copy width, the cuda launcher): ``kernel_backends.py``.

Encoding shared by every backend: a packed token ``t`` takes row ``src[t] >= 0`` of the text table (``embed_weight``
``[V, D]`` or ``text_embeds.view(B*L, D)``) or, when ``src[t] < 0``, row ``-1 - src[t]`` of ``vision_embeds``. The
differentiable part is the op ``r4b_fast::pack_multimodal_gather`` (registered fake + autograd); the integer metadata
(positions, indices, cu_seqlens) carries no gradient (``autograd.py``). The public :func:`pack_multimodal`
(``api.py``) validates the arguments; ``prepare.py`` checks the batch's values in one host sync; ``batch.py`` holds
:class:`PackedBatch` and :func:`unpack`.
"""

# ruff: noqa: F401  (re-exports: the public names, and the private ones tests reach through the package)
from r4b_fast.ops.pack_multimodal.api import OP_BACKENDS, PREFERRED, ROPES, TABLE_DTYPES, pack_multimodal
from r4b_fast.ops.pack_multimodal.autograd import _gather_op, _KernelPack, _scatter_grads
from r4b_fast.ops.pack_multimodal.batch import PackedBatch, unpack
from r4b_fast.ops.pack_multimodal.kernel_backends import (
    COPY_UNITS,
    _launch_pack_multimodal_cuda,
    _pack_kernel_backend,
    copy_unit_bytes,
)
from r4b_fast.ops.pack_multimodal.prepare import _Prep, _prepare
from r4b_fast.ops.pack_multimodal.reference import pack_multimodal_ref
from r4b_fast.ops.pack_multimodal.torch_backend import _gather_torch, _pack_meta_torch

__all__ = [
    "COPY_UNITS",
    "OP_BACKENDS",
    "PREFERRED",
    "ROPES",
    "TABLE_DTYPES",
    "PackedBatch",
    "copy_unit_bytes",
    "pack_multimodal",
    "pack_multimodal_ref",
    "unpack",
]
