"""The chunked LM-head driver shared by both backends: per chunk of tokens, the ``[rows, V]`` logits by one GEMM
(``torch.mm``: cuBLAS on GPU), one epilogue over the chunk (``epilogues.py``, torch or Triton), then dHidden of the
chunk and dWeight by two more GEMMs. No atomics, no ``[T, V]`` buffer; the chunk is bounded by ``CHUNK_ELEMENTS``.

Ignored rows (target ``ignore_index``) whose hidden state is not finite are zeroed chunk by chunk before the GEMMs
(``_Head.mask_rows``): ``0 * NaN`` in the dWeight GEMM would otherwise make the whole ``weight.grad`` NaN. The flag
comes from the op's one value-check sync (:func:`nonfinite_ignored_rows`); with nothing to mask no copy is made.

Precision: the GEMMs run in the input dtype (fp32 accumulation inside), the logits chunk is held in that dtype as eager
``h @ W.T`` would hold it, the epilogue computes in fp32, and the logits' gradient is written back in the input dtype
(as eager autograd holds it). dWeight is accumulated over chunks in the weight's dtype (one rounding per chunk).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from r4b_fast.ops.lm_head.epilogues import EPILOGUES, _grad_coefficients

# Elements of one [rows, V] logit chunk, per device type. CPU: 16M fp32 (64 MiB). GPU: 256M (512 MiB in bf16):
# R-4B's V=151936 gives 1766-row chunks, big enough for full-speed GEMMs and a few percent of eager's [T, V] buffers
# at T=8192.
CHUNK_ELEMENTS = {"cpu": 1 << 24, "cuda": 1 << 28}


def nonfinite_ignored_rows(hidden: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """0-dim int64 count (on the device, no sync) of ignored rows whose hidden state holds a NaN or an inf. A row sum
    in fp32 is non-finite for every such row (and, harmlessly, for finite rows that overflow it)."""
    row_sums = hidden.sum(-1, dtype=torch.float32)
    return ((targets == ignore_index) & ~torch.isfinite(row_sums)).sum()


@dataclass
class _Head:
    """The LM head's validated inputs: contiguous ``hidden [T, H]``, ``weight [V, H]``, ``bias [V]`` or None, int64
    ``targets [T]``, fp32 ``inv_temp [T]``; ``mask_rows``: zero the ignored rows of ``hidden`` before the GEMMs."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    targets: torch.Tensor
    inv_temp: torch.Tensor
    ignore_index: int
    backend: str
    mask_rows: bool = False

    def chunk_rows(self) -> int:
        T, V = self.hidden.shape[0], self.weight.shape[0]
        budget = CHUNK_ELEMENTS.get(self.hidden.device.type, CHUNK_ELEMENTS["cpu"])
        return max(1, min(T, budget // V))

    def rows(self, t0: int, t1: int) -> torch.Tensor:
        """``hidden[t0:t1]``, with ignored rows zeroed when ``mask_rows`` (a chunk-sized copy)."""
        h = self.hidden[t0:t1]
        if not self.mask_rows:
            return h
        return torch.where((self.targets[t0:t1] != self.ignore_index)[:, None], h, h.new_zeros(()))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """``[rows, V]`` logits of the hidden rows ``h`` before the temperature, in the input dtype: one GEMM."""
        if self.bias is not None:
            return torch.addmm(self.bias, h, self.weight.T)
        return h @ self.weight.T


@dataclass
class _Grads:
    """Gradient outputs filled chunk by chunk (None where not needed): dHidden rows written per chunk, dWeight
    accumulated in the weight's dtype, dBias accumulated in fp32."""

    dh: torch.Tensor | None
    dw: torch.Tensor | None
    db: torch.Tensor | None

    @classmethod
    def empty(cls, head: _Head, need_dh: bool, need_dw: bool, need_db: bool) -> _Grads:
        dev = head.hidden.device
        return cls(
            torch.empty_like(head.hidden) if need_dh else None,
            torch.empty_like(head.weight) if need_dw else None,
            torch.zeros(head.weight.shape[0], dtype=torch.float32, device=dev) if need_db else None,
        )

    def add_chunk(self, head: _Head, dz: torch.Tensor, h: torch.Tensor, t0: int, t1: int) -> None:
        """Add the chunk ``t0:t1`` (logit gradient ``dz``, its hidden rows ``h`` as the logits GEMM read them)."""
        if self.dh is not None:
            torch.mm(dz, head.weight, out=self.dh[t0:t1])
        if self.dw is not None:
            if t0 == 0:
                torch.mm(dz.T, h, out=self.dw)
            else:
                self.dw.addmm_(dz.T, h)
        if self.db is not None:
            self.db += dz.sum(0, dtype=torch.float32)

    def outputs(self, head: _Head) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(dh, dw, db)`` with empty tensors for those not computed (a custom op returns tensors, not None)."""

        def none():  # a distinct empty tensor each: a custom op's outputs may not alias one another
            return head.hidden.new_empty(0)

        db = self.db.to(head.bias.dtype) if self.db is not None else none()
        return (self.dh if self.dh is not None else none(), self.dw if self.dw is not None else none(), db)


def _chunks(head: _Head):
    ct = head.chunk_rows()
    T = head.hidden.shape[0]
    return ((t0, min(T, t0 + ct)) for t0 in range(0, T, ct))


def _lm_head_forward(head: _Head, with_entropy: bool, grad_fn=None, grads: _Grads | None = None):
    """``(logp, entropy, lse)`` fp32 ``[T]``; with ``grad_fn(t0, t1, logp, entropy) -> (gl, gh)`` the loss's
    gradients are also accumulated into ``grads`` (3 GEMMs per chunk in all, 1 without)."""
    T = head.hidden.shape[0]
    f32 = dict(dtype=torch.float32, device=head.hidden.device)
    logp, entropy, lse = torch.empty(T, **f32), torch.zeros(T, **f32), torch.empty(T, **f32)
    epilogue = EPILOGUES[head.backend][0]
    for t0, t1 in _chunks(head):
        h = head.rows(t0, t1)
        z = head.logits(h)
        rows_grad = None if grad_fn is None else (lambda r0, r1, lp, en, t0=t0: grad_fn(t0 + r0, t0 + r1, lp, en))
        lp, en, ls = epilogue(z, head.inv_temp[t0:t1], head.targets[t0:t1], head.ignore_index, with_entropy, rows_grad)
        logp[t0:t1], entropy[t0:t1], lse[t0:t1] = lp, en, ls
        if grads is not None:
            grads.add_chunk(head, z, h, t0, t1)
        del z, h
    return logp, entropy, lse


def _lm_head_backward(head: _Head, lse, entropy, gl, gh, grads: _Grads) -> None:
    """Recompute each chunk's logits and accumulate the gradients of ``sum(gl * logp + gh * entropy)``."""
    grad_epilogue = EPILOGUES[head.backend][1]
    a0, a1 = _grad_coefficients(gl, gh, entropy)
    y_safe = torch.where(head.targets != head.ignore_index, head.targets, 0)  # ignored rows have gl = a0 = a1 = 0
    for t0, t1 in _chunks(head):
        h = head.rows(t0, t1)
        z = head.logits(h)
        grad_epilogue(z, head.inv_temp[t0:t1], y_safe[t0:t1], lse[t0:t1], gl[t0:t1], a0[t0:t1],
                      a1[t0:t1] if a1 is not None else None)  # fmt: skip
        grads.add_chunk(head, z, h, t0, t1)
        del z, h
