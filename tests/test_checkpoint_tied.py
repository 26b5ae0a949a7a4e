"""Checkpoints of tied models (issue #20 item 3): tied parameters stored once, the tie kept through a load, a resume
bit-identical, checkpoints that hold the duplicate still loading, and a save that copies nothing whole in memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib

import torch

VOCAB, DIM = 96, 16


class TiedLM(torch.nn.Module):
    """An embedding table that is also the LM head (``tie_word_embeddings``), a body between them."""

    def __init__(self):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(VOCAB, DIM)
        self.body = torch.nn.Linear(DIM, DIM)
        self.lm_head = torch.nn.Linear(DIM, VOCAB, bias=False)
        self.lm_head.weight = self.embed_tokens.weight

    def forward(self, ids):
        return self.lm_head(torch.tanh(self.body(self.embed_tokens(ids))))


def _loss(model, ids):
    return torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())


def _training(seed=0):
    from r4b_fast.training.common import LossModule

    torch.manual_seed(seed)
    model = TiedLM()
    module = LossModule(model, _loss)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, module, opt, sched


def _train(module, opt, sched, steps):
    for _ in range(steps):
        ids = torch.randint(0, VOCAB, (4, 9))  # the global RNG: restored by a resume
        opt.zero_grad()
        module(ids).backward()
        opt.step()
        sched.step()


def _tied(model) -> bool:
    return model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr()


def test_tied_weights_are_stored_once_and_the_tie_survives_a_load(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from r4b_fast.training.common import load_checkpoint, save_checkpoint

    model, module, opt, sched = _training()
    _train(module, opt, sched, 2)
    ckpt = save_checkpoint(tmp_path / "checkpoint", module, opt, sched, 2)
    path = ckpt / "model.safetensors"
    with safe_open(str(path), "pt") as f:  # the standard reader: one entry, the other name in the metadata
        keys, metadata = set(f.keys()), f.metadata()
    assert keys == {"embed_tokens.weight", "body.weight", "body.bias"}
    assert metadata["lm_head.weight"] == "embed_tokens.weight"
    weight_bytes = sum(p.numel() * 4 for p in model.parameters())  # parameters() yields a tied one once
    assert path.stat().st_size < weight_bytes + 1024  # one copy and a header, not two copies of the table
    assert set(load_file(str(path))) == keys
    model2, module2, opt2, sched2 = _training(seed=1)
    load_checkpoint(ckpt, module2, opt2, sched2)
    assert _tied(model2) and model2.lm_head.weight is model2.embed_tokens.weight
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_transformers_model_with_tied_embeddings_saves_one_table_and_loads_tied(tmp_path):
    """The tiny R-4B-architecture model the annealing loop trains (``tie_word_embeddings=True``)."""
    from safetensors import safe_open

    from r4b_fast.training.common import LossModule, load_checkpoint, save_checkpoint
    from r4b_fast.training.task import build_tokenizer
    from r4b_fast.training.tiny_model import build_tiny_r4b

    tokenizer = build_tokenizer()

    def build(seed):
        m = build_tiny_r4b(tokenizer, hidden_size=32, layers=1, seed=seed)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        return m, LossModule(m, None), opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    model, module, opt, sched = build(0)
    head, table = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert head.data_ptr() == table.data_ptr()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    ckpt = save_checkpoint(tmp_path / "checkpoint", module, opt, sched, 1)
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        stored = [k for k in f.keys() if f.get_slice(k).get_shape() == list(table.shape)]
    assert len(stored) == 1, stored
    model2, module2, opt2, sched2 = build(1)
    load_checkpoint(ckpt, module2, opt2, sched2)
    assert model2.get_output_embeddings().weight.data_ptr() == model2.get_input_embeddings().weight.data_ptr()
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), name


def test_ties_are_found_by_parameter_identity_when_the_gathered_state_copies_each_name(tmp_path, monkeypatch):
    """Under FSDP2 a full state dict gathers every name into its own tensor: a tie no longer shares memory there,
    and is found from the module's parameters instead."""
    from safetensors import safe_open

    import r4b_fast.training.checkpoint as checkpoint
    from r4b_fast.training.common import load_checkpoint, save_checkpoint

    real = checkpoint._gather

    def gathered_like_fsdp2(module, optimizer):
        model_state, optim_state = real(module, optimizer)
        return {k: v.clone() for k, v in model_state.items()}, optim_state

    monkeypatch.setattr(checkpoint, "_gather", gathered_like_fsdp2)
    model, module, opt, sched = _training()
    _train(module, opt, sched, 1)
    ckpt = save_checkpoint(tmp_path / "checkpoint", module, opt, sched, 1)
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == {"embed_tokens.weight", "body.weight", "body.bias"}
        assert f.metadata()["lm_head.weight"] == "embed_tokens.weight"
    model2, module2, opt2, sched2 = _training(seed=1)
    load_checkpoint(ckpt, module2, opt2, sched2)
    assert _tied(model2) and torch.equal(model2.lm_head.weight, model.lm_head.weight)


def test_resume_of_a_tied_model_is_bit_identical(tmp_path):
    from r4b_fast.training.common import load_checkpoint, save_checkpoint

    torch.manual_seed(123)
    model, module, opt, sched = _training()
    _train(module, opt, sched, 3)
    ckpt = save_checkpoint(tmp_path / "checkpoint", module, opt, sched, 3)
    assert (ckpt / "model.safetensors").stat().st_size < sum(p.numel() * 4 for p in model.parameters()) + 1024
    _train(module, opt, sched, 3)  # the uninterrupted run
    model2, module2, opt2, sched2 = _training(seed=7)
    assert load_checkpoint(ckpt, module2, opt2, sched2)["step"] == 3
    _train(module2, opt2, sched2, 3)  # the resumed run
    assert _tied(model2)
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), name
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys()
    for k in s1:
        for field in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s1[k][field], s2[k][field]), (k, field)


def test_old_checkpoints_that_hold_the_tied_weight_twice_still_load(tmp_path):
    """The format written before tied weights were stored once: both names, two copies, no metadata."""
    from safetensors.torch import save_file

    from r4b_fast.training.common import MANIFEST, load_checkpoint, save_checkpoint

    model, module, opt, sched = _training()
    _train(module, opt, sched, 2)
    ckpt = save_checkpoint(tmp_path / "checkpoint", module, opt, sched, 2)
    path = ckpt / "model.safetensors"
    save_file({k: v.clone() for k, v in model.state_dict().items()}, str(path))  # as the old save wrote it
    manifest = json.loads((ckpt / MANIFEST).read_text())
    data = path.read_bytes()
    manifest["files"]["model.safetensors"] = {"bytes": len(data), "crc32": zlib.crc32(data)}
    (ckpt / MANIFEST).write_text(json.dumps(manifest))
    model2, module2, opt2, sched2 = _training(seed=1)
    assert load_checkpoint(ckpt, module2, opt2, sched2)["step"] == 2
    assert _tied(model2)
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), name


_PEAK_SCRIPT = r"""
import gc, json, sys, torch
from pathlib import Path
from r4b_fast.training.common import LossModule, save_checkpoint
torch.manual_seed(0)
emb = torch.nn.Embedding(8192, 1024)          # 32 MiB, tied to the head
head = torch.nn.Linear(1024, 8192, bias=False)
head.weight = emb.weight
model = torch.nn.ModuleDict({"embed_tokens": emb, "body": torch.nn.Linear(1024, 1024), "lm_head": head})
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
for p in model.parameters():
    p.grad = torch.ones_like(p)
opt.step()
opt.zero_grad(set_to_none=True)
save_checkpoint(Path(sys.argv[1]), LossModule(model, None), opt, sched, 1)  # imports, first-use caches
gc.collect()
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
before = status("VmRSS")
save_checkpoint(Path(sys.argv[1]), LossModule(model, None), opt, sched, 2)  # the next save, as a run makes
print(json.dumps({"before": before, "peak": status("VmHWM"),
                  "weights": sum(p.numel() * 4 for p in model.parameters())}))
"""


def test_a_save_copies_nothing_whole_in_memory(tmp_path):
    """Peak RSS of a save against the process before it (the issue: +40% at 114M parameters, a clone of every
    tensor plus the whole safetensors file as bytes). Allowed: a quarter of the weights' size (the tensors
    themselves are written from the parameters and the optimizer's moments). Measured on a run's second save:
    the first one imports torch.distributed.checkpoint (about 30 MiB, once)."""
    if not os.path.exists("/proc/self/clear_refs"):
        import pytest

        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(tmp_path / "checkpoint")], capture_output=True,
                          text=True, timeout=300, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    growth = m["peak"] - m["before"]
    mib = 2**20
    assert growth < m["weights"] // 4, f"a save grew RSS by {growth / mib:.0f} MiB (weights {m['weights'] / mib:.0f})"
