"""Nothing lost, nothing silently wrong (issue #12, the training side): checkpoints that survive a kill at any
filesystem step and a full disk, runs that refuse settings that cannot be right, resumes that refuse changed math,
and data loading that reads each row for what it says.

Run as a script, this file is the kill harness (see :func:`_harness`):
``python tests/test_faults_training.py OUT_JSON MODULE BASE_DIR -- LOOP_ARGS...``.
"""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys
import traceback
from argparse import Namespace
from pathlib import Path

import pytest
import torch

HOOKS = ("_write_file", "_fsync", "_fsync_dir", "_rename", "_remove_tree")  # common.py's filesystem steps
KILLED = 137


# -- the kill harness ----------------------------------------------------------------------------------------------
def _install(common, kill_at: int | None, torn: bool, log: list | None) -> None:
    """Count every filesystem step of the checkpoint code; before step ``kill_at`` die as SIGKILL would (no
    cleanup, no flush). ``torn``: that step is a file write, and half of its bytes reach the disk first."""
    count = [0]
    for name in HOOKS:
        original = getattr(common, name)

        def hooked(*args, _name=name, _original=original, **kwargs):
            count[0] += 1
            if log is not None:
                log.append(_name)
            if count[0] == kill_at:
                if torn:
                    path, fill = args
                    buf = io.BytesIO()
                    fill(buf)
                    with open(path, "wb") as f:
                        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                os._exit(KILLED)
            return _original(*args, **kwargs)

        setattr(common, name, hooked)


def _forked(main, argv: list[str], *, kill_at=None, torn=False) -> int:
    """``main(argv)`` in a forked child (the loop is imported once, in the parent); the child's exit status."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            import r4b_fast.training.common as common

            if kill_at is not None:
                _install(common, kill_at, torn, None)
            sys.stdout = open(os.devnull, "w")
            code = main(argv) or 0
        except SystemExit as err:
            code = err.code if isinstance(err.code, int) else 1
            if code:
                print(f"exit: {err.code}", file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _final_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "model" / "model.safetensors"))


def _harness(out_json: str, module: str, base: Path, loop_args: list[str]) -> None:
    """1. A reference run (in this process, which warms every import for the forked cases) records the sequence of
    checkpoint filesystem steps: one per file write, fsync, directory fsync, rename, folder removal.
    2. For every step ``k``: a run killed just before it, and for every file write also one killed halfway through
    it (a torn file). The run is then continued: ``--resume`` when a complete checkpoint is left, else from scratch
    (``--overwrite``). Its final model must equal the reference's bit for bit."""
    import importlib

    import r4b_fast.training.common as common
    from r4b_fast.training.common import find_checkpoint

    loop_main = importlib.import_module(module).main
    ref_dir, ops = base / "reference", []
    _install(common, None, False, ops)
    assert loop_main([*loop_args, "--output-dir", str(ref_dir)]) == 0
    for name in HOOKS:  # unhook: the forked cases install their own
        setattr(common, name, getattr(common, name).__kwdefaults__["_original"])
    reference = _final_weights(ref_dir)
    cases = [(k, False) for k in range(1, len(ops) + 1)]
    cases += [(k, True) for k in range(1, len(ops) + 1) if ops[k - 1] == "_write_file"]
    results = []
    for kill_at, torn in cases:
        run_dir = base / f"kill{kill_at}{'_torn' if torn else ''}"
        argv = [*loop_args, "--output-dir", str(run_dir)]
        killed_rc = _forked(loop_main, argv, kill_at=kill_at, torn=torn)
        found = find_checkpoint(run_dir / "checkpoint")
        resumed_from = None if found is None else f"{found[0].name}@{found[1]['step']}"
        resume_rc = _forked(loop_main, [*argv, "--resume" if found is not None else "--overwrite"])
        identical = False
        if resume_rc == 0:
            final = _final_weights(run_dir)
            identical = final.keys() == reference.keys() and all(torch.equal(final[k], reference[k]) for k in final)
            found = find_checkpoint(run_dir / "checkpoint")  # the newest is in place, the rotation finished
            identical &= found is not None and found[0] == run_dir / "checkpoint"
        results.append({"kill_at": kill_at, "op": ops[kill_at - 1], "torn": torn, "killed_rc": killed_rc,
                        "resumed_from": resumed_from, "resume_rc": resume_rc, "identical": identical})
    Path(out_json).write_text(json.dumps({"ops": ops, "cases": results}, indent=1))


def _run_harness(tmp_path, module, *loop_args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = tmp_path / "kills.json"
    proc = subprocess.run([sys.executable, __file__, str(out), module, str(tmp_path), "--", *loop_args],
                          capture_output=True, text=True, timeout=900, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def _check_kills(result: dict, saves: int) -> None:
    cases = result["cases"]
    failed = [c for c in cases if not (c["killed_rc"] == KILLED and c["resume_rc"] == 0 and c["identical"])]
    assert not failed, failed
    ops = result["ops"]
    # every kind of step of every save was a kill point: writes (3 files per save), fsyncs, renames, removals
    assert ops.count("_write_file") == 3 * saves and ops.count("_fsync") == 3 * saves
    assert ops.count("_rename") == 2 * saves - 1 and ops.count("_fsync_dir") == 3 * saves - 1
    assert len(cases) == len(ops) + ops.count("_write_file")
    # the kill of the issue: after the first save's files, before its rename -> resumed from checkpoint.tmp
    assert any(c["resumed_from"] == "checkpoint.tmp@2" for c in cases)
    assert any(c["resumed_from"] is None for c in cases)  # killed before the first checkpoint was complete
    print(f"{len(cases)} kill points ({len(ops)} filesystem steps + {ops.count('_write_file')} torn writes), "
          f"all resumed bit-identically")


def test_bpo_killed_at_every_filesystem_step_of_a_save_resumes_bit_identically(tmp_path, tiny_policy_dir):
    """Item 1: both saves of a 4-step run (the first into an empty folder, the second rotating the first out)."""
    result = _run_harness(tmp_path, "r4b_fast.training.bpo", "--model", str(tiny_policy_dir), "--steps", "4",
                          "--prompts", "2", "--g", "2", "--eval-items", "0", "--save-every", "2",
                          "--max-new-tokens", "6")  # fmt: skip
    _check_kills(result, saves=2)


def test_annealing_killed_at_every_filesystem_step_of_a_save_resumes_bit_identically(tmp_path):
    result = _run_harness(tmp_path, "r4b_fast.training.annealing", "--steps", "4", "--batch-size", "4",
                          "--hidden-size", "32", "--layers", "1", "--eval-items", "0", "--save-every", "2",
                          "--warmup", "2")  # fmt: skip
    _check_kills(result, saves=2)


# -- checkpoints, in process ----------------------------------------------------------------------------------------
def _tiny_training(seed=0):
    from r4b_fast.training.common import LossModule

    torch.manual_seed(seed)
    net = torch.nn.Linear(4, 3)
    module = LossModule(net, lambda m, x: m(x).square().mean())
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    module(torch.ones(2, 4)).backward()
    opt.step()
    return net, module, opt, sched


def test_full_disk_fails_the_save_clearly_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import r4b_fast.training.common as common

    net, module, opt, sched = _tiny_training()
    ckpt = tmp_path / "checkpoint"
    common.save_checkpoint(ckpt, module, opt, sched, 1)
    saved = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        net.weight.add_(1.0)
    real = common._write_file

    def full_disk(path, fill):
        if path.name == "trainer_state.pt":  # the second file: the first one already took space
            if os.path.exists("/dev/full"):  # a real ENOSPC from the kernel, raised inside torch.save's writes
                return real(Path("/dev/full"), fill)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, fill)

    monkeypatch.setattr(common, "_write_file", full_disk)
    with pytest.raises(common.CheckpointError, match=r"saving step 2 .*No space left on device.*"
                                                     r"previous checkpoint .*checkpoint \(step 1\) is intact"):
        common.save_checkpoint(ckpt, module, opt, sched, 2)
    monkeypatch.undo()
    assert not (tmp_path / "checkpoint.tmp").exists()  # no partial copy for a resume to trip over
    net2, module2, opt2, sched2 = _tiny_training(seed=1)
    loaded = common.load_checkpoint(ckpt, module2, opt2, sched2)
    assert loaded["step"] == 1 and loaded["path"] == ckpt
    for k, v in net2.state_dict().items():
        assert torch.equal(v, saved[k]), k


def test_torn_or_partial_tmp_never_breaks_resume(tmp_path):
    """A torn ``checkpoint.tmp/trainer_state.pt`` (the issue: raw torch errors, never recovering) is ignored; a
    complete ``.tmp`` newer than ``checkpoint`` is taken, said so, and moved into place."""
    import r4b_fast.training.common as common

    _, module, opt, sched = _tiny_training()
    ckpt = tmp_path / "checkpoint"
    common.save_checkpoint(ckpt, module, opt, sched, 1)
    tmp = tmp_path / "checkpoint.tmp"
    import shutil

    shutil.copytree(ckpt, tmp)
    data = (tmp / "trainer_state.pt").read_bytes()
    (tmp / "trainer_state.pt").write_bytes(data[: len(data) // 2])
    assert common.find_checkpoint(ckpt)[0] == ckpt
    _, module2, opt2, sched2 = _tiny_training(seed=1)
    assert common.load_checkpoint(ckpt, module2, opt2, sched2)["step"] == 1
    # same size, other bytes: the manifest's CRC catches it when the file is read
    shutil.rmtree(tmp)
    common.save_checkpoint(ckpt, module, opt, sched, 2)
    raw = bytearray((ckpt / "trainer_state.pt").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (ckpt / "trainer_state.pt").write_bytes(bytes(raw))
    with pytest.raises(common.CheckpointError, match="does not match its manifest"):
        common.load_checkpoint(ckpt, module2, opt2, sched2)
    # a complete .tmp newer than checkpoint (killed between the manifest and the rename): taken and put in place
    common.save_checkpoint(ckpt, module, opt, sched, 3)
    shutil.copytree(ckpt, tmp_path / "step3")
    common.save_checkpoint(ckpt, module, opt, sched, 4)
    ckpt.rename(tmp)
    (tmp_path / "step3").rename(ckpt)
    loaded = common.load_checkpoint(ckpt, module2, opt2, sched2)
    assert loaded["step"] == 4 and loaded["path"] == tmp
    assert common.find_checkpoint(ckpt)[0] == ckpt and not tmp.exists()  # rotated into place after reading


def test_load_reads_into_memory_so_a_later_save_cannot_pull_the_file_away(tmp_path):
    """The issue's SIGBUS: resume mapped ``checkpoint.tmp/trainer_state.pt`` and the next save truncated it. Now the
    loaded tensors survive the files being rewritten and removed."""
    import r4b_fast.training.common as common

    _, module, opt, sched = _tiny_training()
    ckpt = tmp_path / "checkpoint"
    common.save_checkpoint(ckpt, module, opt, sched, 1)
    _, module2, opt2, sched2 = _tiny_training(seed=1)
    common.load_checkpoint(ckpt, module2, opt2, sched2)
    state = {k: v["exp_avg"].clone() for k, v in opt2.state_dict()["state"].items()}
    for f in ckpt.iterdir():  # truncate under whatever might still reference them
        f.write_bytes(b"")
    for k, v in opt2.state_dict()["state"].items():
        assert torch.equal(v["exp_avg"], state[k])
    common.save_checkpoint(ckpt, module2, opt2, sched2, 2)
    assert common.find_checkpoint(ckpt)[1]["step"] == 2


def test_nonfinite_weights_are_never_saved(tmp_path):
    import r4b_fast.training.common as common

    net, module, opt, sched = _tiny_training()
    with torch.no_grad():
        net.bias[1] = float("nan")
    with pytest.raises(common.NonFiniteError, match="step 7: non-finite weights in 1 tensor.*bias"):
        common.save_checkpoint(tmp_path / "checkpoint", module, opt, sched, 7)
    assert not any(tmp_path.iterdir())
    with pytest.raises(common.NonFiniteError, match="step 3: loss nan"):
        common.check_finite_step(3, float("nan"), 1.0)
    with pytest.raises(common.NonFiniteError, match="step 4: .*gradient norm inf"):
        common.check_finite_step(4, 1.0, float("inf"))


def test_annealing_that_diverges_stops_naming_the_step_before_saving(tmp_path):
    """A finite but absurd learning rate: the loss turns non-finite; the run stops at that step, before the
    optimizer applies it, and nothing non-finite is on disk."""
    from safetensors.torch import load_file

    from r4b_fast.training import annealing

    out = tmp_path / "run"
    # caught at the loss, or (issue #22 item 5) already at the update that made the weights explode
    with pytest.raises(SystemExit, match=r"annealing: (step \d+: loss .* not finite|the update at step \d+ made the "
                                         r"weights (explode|non-finite))"):
        annealing.main(["--steps", "6", "--batch-size", "4", "--hidden-size", "32", "--layers", "1",
                        "--eval-items", "0", "--save-every", "1", "--warmup", "1", "--lr-llm", "1e36",
                        "--output-dir", str(out)])  # fmt: skip
    assert not (out / "model").exists()
    if (out / "checkpoint").exists():
        assert all(torch.isfinite(t).all() for t in load_file(str(out / "checkpoint" / "model.safetensors")).values())


# -- settings, before the model loads -------------------------------------------------------------------------------
def _no_model_load(monkeypatch):
    from r4b_fast.training import annealing, bpo

    def refuse(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr(bpo, "load_model", refuse)
    monkeypatch.setattr(annealing, "load_model", refuse)
    monkeypatch.setattr(annealing, "build_tiny_r4b", refuse)


@pytest.mark.parametrize("flag, value", [
    ("--lr", "inf"), ("--lr", "nan"), ("--lr", "-1"), ("--lr", "0"), ("--temperature", "nan"),
    ("--temperature", "1e-39"), ("--temperature", "-1"), ("--clip", "nan"), ("--clip", "1.5"), ("--clip", "0"),
    ("--beta", "-0.1"), ("--beta", "inf"), ("--hard-fraction", "1.5"), ("--hard-fraction", "nan"),
    ("--eval-items", "-1"), ("--seed", "-1"), ("--seed", str(2**64)), ("--max-prompt-tokens", "0"),
])  # fmt: skip
def test_bpo_rejects_bad_values_naming_the_flag(tmp_path, monkeypatch, capsys, tiny_policy_dir, flag, value):
    from r4b_fast.training import bpo

    _no_model_load(monkeypatch)
    with pytest.raises(SystemExit) as exc:
        bpo.main(["--model", str(tiny_policy_dir), "--output-dir", str(tmp_path / "run"), f"{flag}={value}"])
    assert exc.value.code == 2
    assert f"{flag}" in capsys.readouterr().err.splitlines()[-1]


@pytest.mark.parametrize("flag, value", [
    ("--lr-llm", "nan"), ("--lr-vision", "-1"), ("--lr-projector", "inf"), ("--eval-items", "-1"),
    ("--warmup", "-1"), ("--save-every", "-1"), ("--seed", "-5"),
])  # fmt: skip
def test_annealing_rejects_bad_values_naming_the_flag(tmp_path, monkeypatch, capsys, flag, value):
    from r4b_fast.training import annealing

    _no_model_load(monkeypatch)
    with pytest.raises(SystemExit) as exc:
        annealing.main(["--output-dir", str(tmp_path / "run"), f"{flag}={value}"])
    assert exc.value.code == 2
    assert f"{flag}" in capsys.readouterr().err.splitlines()[-1]


def _anneal_args(out, *extra):
    return ["--steps", "4", "--batch-size", "4", "--hidden-size", "32", "--layers", "1", "--eval-items", "0",
            "--save-every", "2", "--warmup", "1", "--output-dir", str(out), *extra]


def test_resume_refuses_changed_math_unless_allowed_and_then_uses_the_new_values(tmp_path, capsys):
    from r4b_fast.training import annealing
    from r4b_fast.training.common import read_metrics

    out = tmp_path / "run"
    assert annealing.main([*_anneal_args(out), "--steps", "4"]) == 0
    for flag, value in (("--lr-llm", "0.05"), ("--batch-size", "2"), ("--seed", "3"), ("--warmup", "2"),
                        ("--steps", "6")):  # fmt: skip
        with pytest.raises(SystemExit):
            annealing.main([*_anneal_args(out, "--resume"), flag, value])
        err = capsys.readouterr().err
        assert "settings differ from the checkpoint's" in err and f"{flag}: checkpoint" in err, err
    # --steps below the checkpoint's step: an error, not a silent exit 0 having done nothing
    with pytest.raises(SystemExit):
        annealing.main([*_anneal_args(out, "--resume"), "--steps", "2"])
    assert "the checkpoint is already at step 4; nothing to train" in capsys.readouterr().err
    # allowed: logged, and the new learning rate is the one used (not the checkpoint's 2e-3)
    assert annealing.main([*_anneal_args(out, "--resume", "--allow-changed-settings"), "--steps", "6",
                           "--lr-llm", "0.05"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "resume: changed setting --lr-llm: checkpoint 0.002, now 0.05" in printed
    assert "resume: changed setting --steps: checkpoint 4, now 6" in printed
    from r4b_fast.training.annealing import cosine_with_warmup

    lr5 = read_metrics(out / "metrics.jsonl")[4]["lr_llm"]
    assert lr5 == pytest.approx(0.05 * cosine_with_warmup(5, 6, 1))


def test_bpo_resume_refuses_each_changed_setting(tmp_path, monkeypatch, capsys, tiny_policy_dir):
    """The issue's list (--lr, --g, --prompts, --algo, --beta, --temperature, --seed), checked against a checkpoint
    that recorded the default settings, before any model loads."""
    import r4b_fast.training.common as common
    from r4b_fast.training import bpo

    out = tmp_path / "run"
    base = ["--model", str(tiny_policy_dir), "--output-dir", str(out), "--device", "cpu"]
    settings = bpo.parse_args(base).settings
    _, module, opt, sched = _tiny_training()
    common.save_checkpoint(out / "checkpoint", module, opt, sched, 30, settings=settings)
    _no_model_load(monkeypatch)
    for flag, value in (("--lr", "0.05"), ("--g", "2"), ("--prompts", "4"), ("--algo", "grpo"), ("--beta", "0.1"),
                        ("--temperature", "0.7"), ("--seed", "1"), ("--clip", "0.3")):  # fmt: skip
        with pytest.raises(SystemExit):
            bpo.parse_args([*base, "--resume", flag, value])
        assert f"{flag}: checkpoint" in capsys.readouterr().err
    args = bpo.parse_args([*base, "--resume", "--allow-changed-settings", "--lr", "0.05"])
    assert args.changed_settings == ["--lr: checkpoint 0.0001, now 0.05"]
    with pytest.raises(SystemExit):
        bpo.parse_args([*base, "--resume", "--steps", "29"])
    assert "already at step 30" in capsys.readouterr().err
    # a previous run is never replaced without --resume or --overwrite
    with pytest.raises(SystemExit):
        bpo.parse_args(base)
    assert "holds a previous run (checkpoint)" in capsys.readouterr().err
    bpo.parse_args([*base, "--overwrite"])
    assert not (out / "checkpoint").exists()
    with pytest.raises(SystemExit):
        bpo.parse_args([*base, "--resume"])
    assert "--resume: no complete checkpoint" in capsys.readouterr().err


def test_rerun_into_a_finished_folder_is_refused_and_its_metrics_kept(tmp_path, capsys):
    from r4b_fast.training import annealing

    out = tmp_path / "run"
    assert annealing.main(_anneal_args(out)) == 0
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit):
        annealing.main(_anneal_args(out))
    assert "holds a previous run (metrics.jsonl, checkpoint, model)" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == before
    # the resumed run at the final step: says so, exits 0, leaves the log as it was
    assert annealing.main(_anneal_args(out, "--resume")) == 0
    assert "nothing left to train" in capsys.readouterr().out
    assert (out / "metrics.jsonl").read_text() == before


# -- metrics ---------------------------------------------------------------------------------------------------------
def test_metrics_survive_a_torn_last_line(tmp_path, capsys):
    from r4b_fast.training.common import MetricsLogger, read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n{"step": 3, "lo')
    assert read_metrics(path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]
    assert "dropped a torn last line (3" in capsys.readouterr().err
    logger = MetricsLogger(tmp_path, tensorboard=False, resume_step=2)  # what --resume does
    logger.log(3, {"loss": 0.25})
    logger.close()
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    path.write_text('{"step": 1}\n{"ste\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        read_metrics(path)


@pytest.mark.parametrize("writer_counter", [None, 9], ids=["any", "counter-9-to-10"])
def test_tensorboard_shows_no_duplicated_steps_after_a_resume(tmp_path, monkeypatch, writer_counter):
    """``counter-9-to-10``: the two event files' names differ only in TensorBoard's per-process writer counter (9, then
    10, which sorts first by name) unless the resumed writer waits for the next second: the purge was lost (this test
    failed when enough writers had been created earlier in the process)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.summary.writer import event_file_writer

    from r4b_fast.training.common import MetricsLogger

    if writer_counter is not None:
        monkeypatch.setattr(event_file_writer, "_global_uid", event_file_writer.AtomicCounter(writer_counter))
    logger = MetricsLogger(tmp_path)
    for step in range(1, 5):
        logger.log(step, {"loss": float(step)})
    logger.close()
    logger = MetricsLogger(tmp_path, resume_step=2)
    for step in range(3, 6):
        logger.log(step, {"loss": 10.0 + step})
    logger.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    points = [(e.step, e.value) for e in acc.Scalars("loss")]
    assert points == [(1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0), (5, 15.0)]


# -- data (item 7) ---------------------------------------------------------------------------------------------------
def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (255, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def _jsonl_dir(tmp_path, rows: list, n_images=1) -> Path:
    (tmp_path / "img.png").write_bytes(_png())
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"".join(r if isinstance(r, bytes) else json.dumps(r).encode() + b"\n" for r in rows))
    return path


def _row(**kw):
    return {"image": "img.png", "question": "What is the first digit?", "answer": "3", **kw}


def test_hard_is_read_by_its_meaning(tmp_path):
    from r4b_fast.training.data import BadRowError, load_rows

    values = [True, False, "false", "False", "true", "0", "1", 0, 1, None]
    path = _jsonl_dir(tmp_path, [_row(hard=v) for v in values])
    rows, bad = load_rows(path)
    assert [r.hard for r in rows] == [True, False, False, False, True, False, True, False, True, None] and not bad
    path = _jsonl_dir(tmp_path, [_row(hard="maybe")])
    with pytest.raises(BadRowError, match="row 0: hard: expected true/false"):
        load_rows(path)


def test_parquet_nan_answer_is_a_bad_row_not_the_answer_nan(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from r4b_fast.training.data import BadRowError, load_rows

    png = _png()
    table = pa.table({"image": [png, png, png], "question": ["q?", "q?", "q?"], "answer": [3.0, float("nan"), 5.0]})
    pq.write_table(table, tmp_path / "rows.parquet")
    rows, bad = load_rows(tmp_path / "rows.parquet", on_bad_row="skip")
    assert [r.answer for r in rows] == ["3.0", "5.0"]
    assert bad[0][0] == 1 and "answer: expected a string or a finite number, got nan" in bad[0][1]
    with pytest.raises(BadRowError, match="row 1: answer"):
        load_rows(tmp_path / "rows.parquet")


def test_one_malformed_or_non_utf8_line_is_one_bad_row(tmp_path):
    from r4b_fast.training.data import BadRowError, load_rows

    path = _jsonl_dir(tmp_path, [_row(), b'{"image": "img.png", "question": \n', _row(answer="4"),
                                 b'{"image": "img.png", "question": "caf\xe9?", "answer": "1"}\n', b"\n", _row()])
    rows, bad = load_rows(path, on_bad_row="skip")
    assert [r.row for r in rows] == [0, 2, 4] and [r.answer for r in rows] == ["3", "4", "3"]
    assert [b[0] for b in bad] == [1, 3]
    assert "not JSON" in bad[0][1] and "not UTF-8" in bad[1][1]
    with pytest.raises(BadRowError, match="rows.jsonl, row 1: not JSON"):
        load_rows(path)


def test_empty_file_is_a_clear_error(tmp_path):
    from r4b_fast.training.data import load_rows

    for name in ("empty.jsonl", "empty.json"):
        (tmp_path / name).write_bytes(b"")
        with pytest.raises(ValueError, match="has no rows"):
            load_rows(tmp_path / name)
    (tmp_path / "empty.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match="cannot read .* as parquet"):
        load_rows(tmp_path / "empty.parquet")


def test_fewer_than_ten_rows_says_that_evaluation_is_off(tmp_path, capsys):
    from r4b_fast.training.bpo import _data
    from r4b_fast.training.task import build_tokenizer

    path = _jsonl_dir(tmp_path, [_row() for _ in range(5)])
    args = Namespace(dataset=path, eval_dataset=None, max_prompt_tokens=1024, on_bad_row="raise", eval_items=8)
    train, evaluation = _data(args, build_tokenizer(), lambda row: 4)
    assert len(train) == 5 and evaluation == []
    assert "evaluation: off: --dataset has 5 usable rows" in capsys.readouterr().err
    args.eval_items = 0  # asked for none: nothing to say
    _data(args, build_tokenizer(), lambda row: 4)
    assert "evaluation" not in capsys.readouterr().err


if __name__ == "__main__":
    sep = sys.argv.index("--")
    _harness(sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[sep + 1 :])
