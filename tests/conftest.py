"""Test harness: without a GPU, Triton kernels run under the interpreter on CPU tensors.

TRITON_INTERPRET must be set before any @triton.jit kernel is defined, hence here, before r4b_fast's kernels are
imported (they are imported lazily on first use).
"""

import os

import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.pop("R4B_FAST_BACKEND", None)  # tests choose backends explicitly

import pytest  # noqa: E402

DEVICE = "cuda" if HAS_GPU else "cpu"


def kernel_backends() -> list:
    """Backends to check against the reference: each with a skip reason where it cannot run here."""
    from r4b_fast.backends import not_supported_reasons

    params = []
    for backend in ("torch", "triton", "cuda"):
        device = "cpu" if backend == "torch" else DEVICE
        reasons = not_supported_reasons(backend, device)
        marks = [pytest.mark.skip(reason="; ".join(reasons))] if reasons else []
        params.append(pytest.param((backend, device), id=backend, marks=marks))
    return params


def with_logit_bias(model, bias: torch.Tensor):
    """``model`` with its LM head replaced by one that adds ``bias`` [V] to every logit (a model that learned, say,
    to close its think block at once); in place, returned in eval mode."""
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    head.weight.data.copy_(model.lm_head.weight.data)
    head.bias.data.copy_(bias)
    model.lm_head = head
    return model.eval()


@pytest.fixture(scope="module")
def tiny_policy_dir(tmp_path_factory):
    """A random tiny R-4B model saved like an annealed checkpoint (BPO's input), built in seconds; one per test
    module (the loop, the comparison command and the fault tests all start from it)."""
    from r4b_fast.training.task import build_tokenizer
    from r4b_fast.training.tiny_model import build_tiny_r4b

    path = tmp_path_factory.mktemp("policy")
    tok = build_tokenizer()
    build_tiny_r4b(tok, hidden_size=32, layers=1, seed=0).save_pretrained(path)
    tok.save_pretrained(path)
    return path
