"""Fused, sync-free token sampling (temperature / top-k / top-p / min-p) and R-4B mode control for rollouts.

Implementations, by name (one file each):
- ``filtered_probs_ref`` / ``sample_ref`` (``reference.py``): the transformers/vLLM pattern, eager fp32: a full sort
  of the vocabulary, cumulative sums for top-p, ``torch.multinomial``. The oracle of the frequency tests and the
  benchmark baseline. ``ModeProcessorRef`` is the matching host-side Python loop per row per step (forced prefixes,
  thinking budget).
- ``_sample_torch`` (``torch_backend.py``): no sort of the vocabulary. ``torch.topk`` on a bounded candidate set
  (``CANDIDATES`` tokens) finds the top-k / top-p thresholds exactly when the nucleus fits in it (the usual case for
  LLM logits). Rows whose filtered set does not fit take a full-vocabulary path. On CPU (host reads are free): rows
  that surely do not fit (flat logits: a nucleus of mass ``top_p * Z > CANDIDATES`` while every ``e <= 1``; or no
  filter) skip the candidates, and those rows get their exact thresholds from a histogram of ``e`` over the top bits
  of its float32 pattern (one scatter-add locates the threshold's bin; only that bin's tokens, a few hundred, are
  sorted): about ten passes over the row instead of a sort. On other devices every row computes an exact 31-pass
  bisection on the float32 bit pattern of the threshold (``torch.where``): no host sync. The CPU path.
- triton: ``r4b_fast/kernels/sampling.py``, one program per row: an online max / log-sum-exp pass, a 16-pivot search
  on the float32 bit pattern for the top-k count and top-p mass thresholds (8 passes each, exact, no sort), then an
  inverse-CDF scan in vocabulary order.
- cuda: ``r4b_fast/csrc/sampling.cu`` (launcher: ``cuda_backend.py``), one thread block per row, the same passes as
  the Triton kernel (block reductions, a cub block scan for the inverse CDF that stops at the hit). Compiled by CI;
  numerically tested only where a GPU is present.
- ``sample`` (``dispatch.py``): validation, backend choice, the ``r4b_fast::sample`` ``torch.library`` op.

Semantics (every backend):
- ``x = logits / T`` (rows with ``T == 0`` are greedy: ``argmax(logits)``, first index on ties), ``p = softmax(x)``,
  computed as ``e = exp((logits - max) / T)`` (exactly 1 at the max, so ``min_p = 1`` keeps the argmax; any
  ``T > 0`` works, however small: no ``logits / T`` overflow).
- Filters in transformers' order: top-k keeps ``p >= (k-th largest p)`` (ties at the boundary are kept); top-p keeps,
  among those, the smallest set of most probable tokens whose mass reaches ``top_p`` of the top-k mass (threshold
  semantics: ties kept); min-p keeps ``p >= min_p * max(p)`` (invariant to the order). The token is drawn from the
  kept tokens renormalised, by inverse CDF with one uniform per row drawn from ``generator``
  (``torch.rand(B, generator=generator)``), walking the CDF in vocabulary order: same generator state -> same
  tokens, and the backends agree token for token up to float rounding at a CDF boundary (sums in different orders).
- Returned log-probs are ``log_softmax(logits / T)[token]`` of the temperature-scaled **unfiltered** distribution
  (as TRL and vLLM use for ``old_logprobs``: the training forward recomputes exactly this quantity). Greedy rows
  (``T == 0``) report ``log_softmax(logits)[token]`` (``T = 1``).
- Never a token outside ``[0, V)``. Inputs that ``check_values=True`` rejects, when not checked
  (``check_values=False``, :func:`sample_with_modes`' default), are read so, identically by every backend: NaN
  logits act as ``-inf``; a row with no finite logit (all ``-inf`` / NaN, or a ``+inf``) returns the first index of
  its maximum (0 for all ``-inf`` / NaN) with a **NaN log-prob** (the flag: a loss on it fails loudly); a temperature
  that is not ``> 0`` (negative, NaN) is greedy, ``+inf`` is uniform; ``min_p`` outside [0, 1] is clamped (NaN: 0);
  ``top_p`` >= 1 or NaN and ``top_k`` <= 0 are off.

  ``sample(..., return_invalid=True)`` also returns the ``[B]`` bool mask of those rows.

Mode control (R-4B): :class:`ModeState` (``mode_state.py``) holds per-row device tensors (mode, forced-token queue and
pointer, thinking budget and counter, phase, finished flag); :func:`sample_with_modes` (``with_modes.py``) samples and
advances it with no host sync.
"""

# ruff: noqa: F401  (re-exports: the public names below, and the private ones tests reach through the package)
from r4b_fast.ops.sampling.cuda_backend import _launch_sample_cuda
from r4b_fast.ops.sampling.dispatch import OP_BACKENDS, PREFERRED, _sample_impl, _sample_op, sample
from r4b_fast.ops.sampling.mode_state import PHASE_AFTER, PHASE_BEFORE, PHASE_THINK, ModeState, _default_end_id
from r4b_fast.ops.sampling.reference import ModeProcessorRef, filtered_probs_ref, sample_ref
from r4b_fast.ops.sampling.torch_backend import (
    _HIST_SHIFT,
    CANDIDATES,
    _bisect_rows,
    _bisect_threshold,
    _hist_rows,
    _hist_threshold,
    _sample_torch,
    _sanitise,
)
from r4b_fast.ops.sampling.with_modes import ModeStep, _mode_bans, sample_with_modes

__all__ = [
    "CANDIDATES",
    "OP_BACKENDS",
    "PHASE_AFTER",
    "PHASE_BEFORE",
    "PHASE_THINK",
    "PREFERRED",
    "ModeProcessorRef",
    "ModeState",
    "ModeStep",
    "filtered_probs_ref",
    "sample",
    "sample_ref",
    "sample_with_modes",
]
