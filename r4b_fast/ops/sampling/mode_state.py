"""R-4B mode control state: :class:`ModeState` (per-row device tensors: mode, forced-token queue and pointer,
thinking budget and counter, phase, finished flag, strict-mode minimum), its construction (:meth:`ModeState.create`)
and the validation of its arguments and fields. :func:`~r4b_fast.ops.sampling.sample_with_modes` advances it."""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Sequence

import torch

from r4b_fast.modes import Mode

PHASE_BEFORE, PHASE_THINK, PHASE_AFTER = 0, 1, 2


@dataclasses.dataclass
class ModeState:
    """Per-row decoding state for R-4B modes, all on the logits' device (advanced in place, no host sync).

    mode [B] int64 (``r4b_fast.Mode``); queue [B, Q] int64 forced tokens with queue_len [B] and queue_pos [B];
    close_ids [C] int64 (emitted when a thinking row reaches its budget) with close_pos [B] (-1: not closing);
    budget [B] int64 (-1: unlimited) and think_count [B] (sampled tokens inside the think block); phase [B]
    (0 before a think block, 1 inside, 2 after); opened / closed / finished [B] bool; and the token ids
    think_start_id, think_end_id (tracked for every row, auto included), eos_id, pad_id.
    Strict modes: min_end [B] int64 (a THINK row cannot sample ``think_end_id`` nor ``eos_id`` inside its think
    block while ``think_count < min_end``: ``min_think_tokens`` plus the close sequence's tokens before
    ``think_end_id``; 0: off) and no_reopen (after a closed block, ``think_start_id`` / ``think_end_id`` cannot be
    sampled); strict: either is on for some row (else the plain sampling kernels run).
    """

    mode: torch.Tensor
    queue: torch.Tensor
    queue_len: torch.Tensor
    queue_pos: torch.Tensor
    close_ids: torch.Tensor
    close_pos: torch.Tensor
    budget: torch.Tensor
    think_count: torch.Tensor
    phase: torch.Tensor
    opened: torch.Tensor
    closed: torch.Tensor
    finished: torch.Tensor
    think_start_id: int
    think_end_id: int
    eos_id: int
    pad_id: int
    max_token_id: int = 0  # the largest id the state can emit (checked against V, no sync)
    min_end: torch.Tensor | None = None
    no_reopen: bool = False
    strict: bool = False

    def __post_init__(self) -> None:
        _check_fields(self)

    @classmethod
    def create(
        cls,
        modes: torch.Tensor | Sequence[int],
        think_open_ids: Sequence[int],
        no_think_ids: Sequence[int],
        think_close_ids: Sequence[int],
        *,
        budget: int | torch.Tensor | None = None,
        eos_id: int,
        pad_id: int,
        auto_ids: Sequence[int] = (),
        think_start_id: int | None = None,
        think_end_id: int | None = None,
        device: torch.device | str | None = None,
        min_think_tokens: int | torch.Tensor | Sequence[int] = 0,
        no_reopen: bool = False,
    ) -> ModeState:
        """Build the state for ``B`` rows.

        Args:
            modes: ``[B]`` ``r4b_fast.Mode`` per row: THINK rows first emit ``think_open_ids`` (the tokenizer's ids
                of ``"<think>\\n"``), NO_THINK rows ``no_think_ids`` (``"<think>\\n\\n</think>\\n\\n"``), AUTO rows
                ``auto_ids`` (default none: untouched).
            think_close_ids: emitted when a row inside a think block reaches its budget (``"\\n</think>\\n\\n"``).
            budget: max sampled tokens inside a think block (int or ``[B]``, -1 / None = unlimited).
            eos_id / pad_id: a row finishes after emitting ``eos_id``, then emits ``pad_id``.
            think_start_id / think_end_id: the single tokens that open / close a think block (phase tracking);
                default ``think_open_ids[0]`` and the first id of ``think_close_ids`` not in ``think_open_ids``.
            device: default ``modes``' device (CPU for lists).
            min_think_tokens: int or ``[B]`` (tensor or sequence), >= 0, applied to THINK rows only (0: off): inside
                the think block, ``think_end_id`` and ``eos_id`` cannot be sampled before ``k`` tokens have been
                sampled after the forced prefix, not counting the close sequence's tokens before ``think_end_id``
                (the ``"\n"`` of ``"\n</think>\n\n"``): the close sequence can neither start (when it starts with
                ``think_end_id``) nor be completed early, and the rollout cannot end inside the block. At most the
                row's ``budget`` (the budget still forces the close).
            no_reopen: once a row's think block is closed (by the NO_THINK prefix, the model, or the budget),
                ``think_start_id`` and ``think_end_id`` cannot be sampled: no think tag after the block. Every mode.
        """
        mode, mode_list, device = _mode_tensor(modes, device)
        seqs = _forced_sequences(think_open_ids, no_think_ids, think_close_ids, auto_ids)
        for name, v in (("eos_id", eos_id), ("pad_id", pad_id)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}: expected a non-negative int token id, got {v!r}")
        start = seqs["think_open_ids"][0] if think_start_id is None else _token_id("think_start_id", think_start_id)
        end = (_default_end_id(seqs["think_open_ids"], seqs["think_close_ids"]) if think_end_id is None
               else _token_id("think_end_id", think_end_id))  # fmt: skip
        if not isinstance(no_reopen, bool):
            raise ValueError(f"no_reopen: expected a bool, got {no_reopen!r}")
        B = len(mode_list)
        queue, qlen = _prefix_queue(mode_list, seqs, pad_id)
        budget_t = _budget_tensor(budget, B, device)
        min_end = _min_end(mode_list, _min_think_list(min_think_tokens, B), budget_t.tolist(), seqs["think_close_ids"],
                           end)  # fmt: skip
        zeros = torch.zeros(B, dtype=torch.int64, device=device)
        false = torch.zeros(B, dtype=torch.bool, device=device)
        return cls(
            mode=mode, queue=queue.to(device), queue_len=qlen.to(device), queue_pos=zeros.clone(),
            close_ids=torch.tensor(seqs["think_close_ids"], dtype=torch.int64, device=device),
            close_pos=torch.full((B,), -1, dtype=torch.int64, device=device), budget=budget_t,
            think_count=zeros.clone(), phase=zeros.clone(), opened=false.clone(), closed=false.clone(),
            finished=false.clone(), think_start_id=start, think_end_id=end, eos_id=eos_id, pad_id=pad_id,
            max_token_id=max([eos_id, pad_id, start, end] + [t for ids in seqs.values() for t in ids]),
            min_end=torch.tensor(min_end, dtype=torch.int64, device=device), no_reopen=no_reopen,
            strict=no_reopen or any(k > 0 for k in min_end),
        )  # fmt: skip

    @property
    def batch_size(self) -> int:
        return self.mode.shape[0]


def _min_think_list(value, B: int) -> list[int]:
    """``min_think_tokens`` as B non-negative Python ints (setup time)."""
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dtype == torch.bool:
            raise ValueError(f"min_think_tokens: expected an integer tensor, got dtype {value.dtype}")
        if value.shape not in ((), (B,)):
            raise ValueError(f"min_think_tokens: expected an int or [B] = ({B},) values, got shape "
                             f"{tuple(value.shape)}")  # fmt: skip
        vals = value.reshape(-1).tolist() * (B if value.dim() == 0 else 1)
    elif isinstance(value, int) and not isinstance(value, bool):
        vals = [value] * B
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        vals = list(value)
        if len(vals) != B:
            raise ValueError(f"min_think_tokens: {len(vals)} values for {B} rows")
        if any(isinstance(v, bool) or not isinstance(v, int) for v in vals):
            raise ValueError(f"min_think_tokens: expected ints, got {vals}")
    else:
        raise ValueError(f"min_think_tokens: expected an int >= 0 or [B] ints, got {value!r}")
    if any(v < 0 for v in vals):
        raise ValueError(f"min_think_tokens: expected values >= 0, got {min(vals)}")
    return [int(v) for v in vals]

def _default_end_id(think_open_ids, think_close_ids) -> int:
    """The token that closes a think block: the first id of the close sequence that is not in the open sequence
    (``"\\n</think>\\n\\n"`` -> ``"</think>"``)."""
    for t in think_close_ids:
        if t not in think_open_ids:
            return int(t)
    return int(think_close_ids[-1])



# ----------------------------------------------------------------------------------------------------------------
# Validation and setup of ModeState.create's arguments (setup time: host reads allowed)
# ----------------------------------------------------------------------------------------------------------------
_MODE_VALUES = "{NO_THINK: 0, THINK: 1, AUTO: 2}"


def _mode_tensor(modes, device) -> tuple[torch.Tensor, list[int], torch.device]:
    """``modes`` (a ``[B]`` integer tensor or a sequence of exact integers) as ``(mode [B] int64 on device, the same
    as a list, device)``; ``device`` defaults to the tensor's (CPU for a sequence)."""
    if isinstance(modes, torch.Tensor):
        if modes.dtype.is_floating_point or modes.dtype == torch.bool:
            raise TypeError(f"modes: expected an integer tensor, got dtype {modes.dtype}")
        device = modes.device if device is None else torch.device(device)
        mode = modes.to(device=device, dtype=torch.int64)
        mode_list = mode.tolist()  # setup time, not the hot loop
    else:
        if isinstance(modes, (str, bytes)) or not isinstance(modes, Sequence):
            raise ValueError(f"modes: expected a [B] sequence or tensor of modes, got {type(modes).__name__}")
        # exact integers only: int() would read 1.5 as THINK and "0" as NO_THINK
        wrong = [m for m in modes if isinstance(m, bool) or not isinstance(m, numbers.Integral)]
        if wrong:
            raise ValueError(f"modes: expected integer modes in {_MODE_VALUES}, got "
                             f"{len(wrong)} non-integer value(s), e.g. {wrong[0]!r}")  # fmt: skip
        mode_list = [int(m) for m in modes]
        device = torch.device("cpu") if device is None else torch.device(device)
        mode = torch.tensor(mode_list, dtype=torch.int64, device=device)
    if mode.dim() != 1 or mode.numel() == 0:
        raise ValueError(f"modes: expected a non-empty [B] sequence, got shape {tuple(mode.shape)}")
    bad = [m for m in mode_list if m not in tuple(int(x) for x in Mode)]
    if bad:
        raise ValueError(f"modes: {len(bad)} value(s) outside {_MODE_VALUES}, e.g. {bad[0]}")
    return mode, mode_list, device


def _forced_sequences(think_open_ids, no_think_ids, think_close_ids, auto_ids) -> dict[str, list[int]]:
    """The four forced sequences as lists of non-negative ints, by argument name (only ``auto_ids`` may be empty)."""
    seqs = {}
    named = (("think_open_ids", think_open_ids, False), ("no_think_ids", no_think_ids, False),
             ("think_close_ids", think_close_ids, False), ("auto_ids", auto_ids, True))  # fmt: skip
    for name, ids, may_be_empty in named:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if not may_be_empty and len(ids) == 0:
            raise ValueError(f"{name}: empty forced sequence; pass the tokenizer's ids of the mode's text")
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in ids):
            raise ValueError(f"{name}: expected non-negative int token ids, got {ids}")
        seqs[name] = ids
    return seqs


def _token_id(name: str, value) -> int:
    """One token id: an int (or a 0-d integer tensor / numpy integer), ``>= 0``; ``TypeError`` / ``ValueError``
    naming ``name`` and the value seen."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype.is_floating_point or value.dtype in (torch.bool, torch.complex64,
                                                                                 torch.complex128):  # fmt: skip
            raise TypeError(f"{name}: expected an int token id, got a tensor of shape {tuple(value.shape)} and dtype "
                            f"{value.dtype}")  # fmt: skip
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int token id, got {type(value).__name__} {value!r}")
    if value < 0:
        raise ValueError(f"{name}: expected a non-negative token id, got {int(value)}")
    return int(value)


def _prefix_queue(mode_list: list[int], seqs: dict, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(queue [B, Q] int64, queue_len [B] int64)`` on the CPU: each row's mode prefix, padded with ``pad_id``."""
    prefix = {int(Mode.THINK): seqs["think_open_ids"], int(Mode.NO_THINK): seqs["no_think_ids"],
              int(Mode.AUTO): seqs["auto_ids"]}  # fmt: skip
    Q = max(1, max(len(prefix[m]) for m in set(mode_list)))
    queue = torch.full((len(mode_list), Q), pad_id, dtype=torch.int64)
    qlen = torch.zeros(len(mode_list), dtype=torch.int64)
    for i, m in enumerate(mode_list):
        queue[i, : len(prefix[m])] = torch.tensor(prefix[m], dtype=torch.int64)
        qlen[i] = len(prefix[m])
    return queue, qlen


def _budget_tensor(budget, B: int, device: torch.device) -> torch.Tensor:
    """``budget`` (None, an int >= -1, or a ``[B]`` / 0-d integer tensor with values >= -1 on the state's device or
    the CPU) as ``[B]`` int64 on ``device`` (-1: unlimited)."""
    if budget is None:
        return torch.full((B,), -1, dtype=torch.int64, device=device)
    if isinstance(budget, torch.Tensor):
        if budget.shape not in ((), (B,)):
            raise ValueError(f"budget: expected an int or a [B] = ({B},) tensor, got shape {tuple(budget.shape)}")
        if budget.dtype.is_floating_point or budget.dtype.is_complex or budget.dtype == torch.bool:
            raise TypeError(f"budget: expected an integer tensor (token counts), got dtype {budget.dtype}")
        if budget.device != device and budget.device.type != "cpu":
            raise ValueError(f"budget: on device {budget.device}, but the state is on {device} (pass it there or on "
                             f"the CPU)")  # fmt: skip
        budget_t = budget.to(device=device, dtype=torch.int64).expand(B).clone()
        low = int(budget_t.min())  # setup time
        if low < -1:
            raise ValueError(f"budget: expected values >= -1 (-1: unlimited), got {low}")
        return budget_t
    if isinstance(budget, int) and not isinstance(budget, bool) and budget >= -1:
        return torch.full((B,), budget, dtype=torch.int64, device=device)
    raise ValueError(f"budget: expected an int >= -1 (or None: unlimited), got {budget!r}")


def _min_end(mode_list, min_think, budgets, close_ids, end) -> list[int]:
    """Per row, the sampled tokens a THINK row needs in its block before ``think_end_id`` / ``eos_id`` may be sampled:
    ``min_think_tokens`` plus the close sequence's tokens before ``think_end_id`` (sampled tokens of the block too);
    0 for other modes. A minimum above the row's budget is an error (the budget closes the block first)."""
    is_think = [m == int(Mode.THINK) for m in mode_list]
    for i in range(len(mode_list)):
        if is_think[i] and 0 <= budgets[i] < min_think[i]:
            raise ValueError(f"min_think_tokens: {min_think[i]} for row {i}, above its thinking budget "
                             f"{budgets[i]} (the budget closes the block first)")  # fmt: skip
    offset = close_ids.index(end) if end in close_ids else 0
    return [k + offset if t and k > 0 else 0 for k, t in zip(min_think, is_think)]


# ----------------------------------------------------------------------------------------------------------------
# Validation of a ModeState's fields (every construction, ``create`` and direct: metadata only, no host sync)
# ----------------------------------------------------------------------------------------------------------------
_ROW_FIELDS = {"queue_len": torch.int64, "queue_pos": torch.int64, "close_pos": torch.int64, "budget": torch.int64,
               "think_count": torch.int64, "phase": torch.int64, "opened": torch.bool, "closed": torch.bool,
               "finished": torch.bool}  # fmt: skip
_ID_FIELDS = ("think_start_id", "think_end_id", "eos_id", "pad_id", "max_token_id")


def _check_field(name: str, t, dtype: torch.dtype, shape: tuple, device: torch.device) -> None:
    """One tensor field: ``TypeError`` for a non-tensor or a wrong dtype, ``ValueError`` for a wrong shape / device
    (``None`` in ``shape``: any size)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"ModeState.{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"ModeState.{name}: expected dtype {dtype}, got {t.dtype}")
    if t.dim() != len(shape) or any(want is not None and got != want for got, want in zip(t.shape, shape)):
        want = "[" + ", ".join("*" if w is None else str(w) for w in shape) + "]"
        raise ValueError(f"ModeState.{name}: expected shape {want}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"ModeState.{name}: on device {t.device}, but mode is on {device}")


def _check_fields(s: ModeState) -> None:
    """Dtypes, shapes and devices of a ModeState's tensors (all on ``mode``'s device), and its token ids (ints >= 0)
    and flags (bools): what :func:`~r4b_fast.ops.sampling.sample_with_modes` relies on."""
    if not isinstance(s.mode, torch.Tensor):
        raise TypeError(f"ModeState.mode: expected a torch.Tensor, got {type(s.mode).__name__}")
    dev = s.mode.device
    _check_field("mode", s.mode, torch.int64, (None,), dev)
    B = s.mode.shape[0]  # 0 rows is allowed here (a compacted batch); create() asks for at least one
    _check_field("queue", s.queue, torch.int64, (B, None), dev)
    _check_field("close_ids", s.close_ids, torch.int64, (None,), dev)
    if s.queue.shape[1] == 0 or s.close_ids.numel() == 0:
        raise ValueError(f"ModeState: queue {tuple(s.queue.shape)} and close_ids {tuple(s.close_ids.shape)} "
                         f"must not be empty")  # fmt: skip
    for name, dtype in _ROW_FIELDS.items():
        _check_field(name, getattr(s, name), dtype, (B,), dev)
    if s.min_end is not None:
        _check_field("min_end", s.min_end, torch.int64, (B,), dev)
    for name in _ID_FIELDS:
        v = getattr(s, name)
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"ModeState.{name}: expected an int token id, got {type(v).__name__} {v!r}")
        if v < 0:
            raise ValueError(f"ModeState.{name}: expected a non-negative token id, got {v}")
    for name in ("no_reopen", "strict"):
        if not isinstance(getattr(s, name), bool):
            raise TypeError(f"ModeState.{name}: expected a bool, got {getattr(s, name)!r}")
