"""Faults at the sampling boundary (issue #22, item 6): ModeState's arguments and fields are type-, dtype-, shape-
and device-checked, with errors naming the argument and what was seen; and an all-NaN (or all -inf) logits row under
``sample(check_values=False)`` is flagged, not only a silent token 0 (``return_invalid=True``)."""

import dataclasses

import pytest
import torch
from conftest import kernel_backends

from r4b_fast import Mode
from r4b_fast.ops.sampling import ModeState, sample

OPEN, NO_THINK, CLOSE = [10, 11], [10, 11, 12, 11], [11, 12, 11]  # "<think>\n", "<think>\n\n</think>\n\n", ...
EOS, PAD = 13, 0
KW = dict(eos_id=EOS, pad_id=PAD)
BACKENDS = kernel_backends()


def _state(**kw):
    return ModeState.create([Mode.THINK, Mode.NO_THINK], OPEN, NO_THINK, CLOSE, **{**KW, **kw})


# ---------------------------------------------------------------------------------------------------------------
# ModeState.create: its arguments
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bool])
def test_budget_tensor_of_a_non_integer_dtype_is_a_type_error(dtype):
    """A float budget tensor was truncated silently (2.7 -> 2); a bool one read as 0 / 1."""
    with pytest.raises(TypeError, match=rf"budget: expected an integer tensor .*got dtype {dtype}"):
        _state(budget=torch.tensor([2.7, 5.0]).to(dtype))


def test_budget_tensor_below_minus_one_is_a_value_error():
    with pytest.raises(ValueError, match=r"budget: expected values >= -1 .*got -3"):
        _state(budget=torch.tensor([4, -3]))


def test_budget_tensor_on_another_device_is_a_value_error():
    """The state's device or the CPU (host values copied over); anything else names both devices."""
    with pytest.raises(ValueError, match=r"budget: on device meta, but the state is on cpu"):
        _state(budget=torch.tensor([4, 2], device="meta"))
    st = _state(budget=torch.tensor([4, 2]))  # CPU: fine
    assert st.budget.tolist() == [4, 2]


@pytest.mark.parametrize("name", ["think_start_id", "think_end_id"])
def test_negative_think_tag_id_is_a_value_error(name):
    """-1 was taken as a token id: the phase never opened (or closed), with no error."""
    with pytest.raises(ValueError, match=rf"{name}: expected a non-negative token id, got -1"):
        _state(**{name: -1})
    import numpy as np  # integer scalars of other kinds stay accepted, as Python ints

    st = _state(**{name: np.int64(12)})
    assert getattr(st, name) == 12 and type(getattr(st, name)) is int


@pytest.mark.parametrize("name", ["think_start_id", "think_end_id"])
@pytest.mark.parametrize("bad", [1.5, "10", True, torch.tensor([10, 11])], ids=["float", "str", "bool", "tensor"])
def test_think_tag_id_of_a_wrong_type_is_a_type_error(name, bad):
    """int(1.5) read a float id as 1; a bool or a str was accepted or failed without naming the argument."""
    with pytest.raises(TypeError, match=rf"{name}: expected an int token id, got"):
        _state(**{name: bad})


# ---------------------------------------------------------------------------------------------------------------
# ModeState(...): its fields (a state built or edited by hand, e.g. dataclasses.replace)
# ---------------------------------------------------------------------------------------------------------------
def test_fields_of_a_wrong_dtype_are_type_errors():
    st = _state()
    with pytest.raises(TypeError, match=r"ModeState.budget: expected dtype torch.int64, got torch.float32"):
        dataclasses.replace(st, budget=st.budget.float())
    with pytest.raises(TypeError, match=r"ModeState.finished: expected dtype torch.bool, got torch.int64"):
        dataclasses.replace(st, finished=st.finished.long())
    with pytest.raises(TypeError, match=r"ModeState.mode: expected dtype torch.int64, got torch.int32"):
        dataclasses.replace(st, mode=st.mode.int())
    with pytest.raises(TypeError, match=r"ModeState.queue: expected a torch.Tensor, got list"):
        dataclasses.replace(st, queue=st.queue.tolist())


def test_fields_of_a_wrong_shape_are_value_errors():
    st = _state()
    with pytest.raises(ValueError, match=r"ModeState.think_count: expected shape \[2\], got \(3,\)"):
        dataclasses.replace(st, think_count=torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"ModeState.queue: expected shape \[2, \*\], got \(2,\)"):
        dataclasses.replace(st, queue=st.queue[:, 0])
    with pytest.raises(ValueError, match=r"ModeState.min_end: expected shape \[2\], got \(2, 1\)"):
        dataclasses.replace(st, min_end=st.min_end[:, None])


def test_fields_on_another_device_are_value_errors():
    st = _state()
    with pytest.raises(ValueError, match=r"ModeState.phase: on device meta, but mode is on cpu"):
        dataclasses.replace(st, phase=torch.zeros(2, dtype=torch.int64, device="meta"))


def test_field_ids_and_flags_are_checked():
    st = _state()
    with pytest.raises(ValueError, match=r"ModeState.eos_id: expected a non-negative token id, got -1"):
        dataclasses.replace(st, eos_id=-1)
    with pytest.raises(TypeError, match=r"ModeState.think_end_id: expected an int token id, got float"):
        dataclasses.replace(st, think_end_id=12.0)
    with pytest.raises(TypeError, match=r"ModeState.strict: expected a bool"):
        dataclasses.replace(st, strict=1)
    ok = dataclasses.replace(st, finished=st.finished.clone())  # a valid copy still builds
    assert ok.batch_size == 2


# ---------------------------------------------------------------------------------------------------------------
# sample(check_values=False): rows with nothing to sample are flagged
# ---------------------------------------------------------------------------------------------------------------
def _bad_rows_logits(device):
    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(0))
    logits[1] = float("nan")  # all NaN
    logits[3] = -float("inf")  # all -inf
    logits[4, 7] = float("inf")  # a +inf among finite logits
    return logits.to(device)


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_all_nan_row_is_flagged_by_return_invalid(backend_device):
    """Before: token 0 with a NaN log-prob and nothing else; now ``invalid`` marks the rows (no host sync), the
    log-prob stays NaN there, and valid rows are untouched."""
    backend, device = backend_device
    logits = _bad_rows_logits(device)
    u = torch.rand(5, generator=torch.Generator().manual_seed(1)).to(device)
    tokens, logprobs, invalid = sample(logits, check_values=False, uniforms=u, backend=backend, return_invalid=True)
    assert invalid.dtype == torch.bool and invalid.shape == (5,) and invalid.device == logits.device
    assert invalid.cpu().tolist() == [False, True, False, True, True]
    assert torch.equal(invalid, logprobs.isnan())
    assert tokens[1] == 0 and tokens[3] == 0 and tokens[4] == 7  # the documented placeholders: the first maximum
    plain_tokens, plain_logprobs = sample(logits, check_values=False, uniforms=u, backend=backend)  # 2-tuple kept
    assert torch.equal(plain_tokens, tokens)
    torch.testing.assert_close(plain_logprobs, logprobs, equal_nan=True)


def test_return_invalid_all_valid_and_bad_flag():
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(2))
    out = sample(logits, generator=torch.Generator().manual_seed(0), return_invalid=True)
    assert len(out) == 3 and not out[2].any()
    with pytest.raises(TypeError, match="return_invalid: expected a bool"):
        sample(logits, return_invalid=1)


def test_sample_docstring_documents_the_invalid_rows():
    doc = sample.__doc__
    assert "return_invalid" in doc and "NaN" in doc and "token 0" in doc
