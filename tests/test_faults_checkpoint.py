"""Every way a save can fail (issue #22 item 3): a full disk, an I/O error, torch's zip writer, at any filesystem step
of a save, leaves a complete checkpoint to resume from and no partial one, and says so in one line naming the folder
and the cause; a folder that cannot hold a run is refused at start in one line."""

from __future__ import annotations

import errno
import io
import os
import sys
from argparse import ArgumentParser
from pathlib import Path

import pytest
import torch
from test_faults_training import _tiny_training  # the same tiny model, AdamW and scheduler

HOOKS = ("_write_file", "_fsync", "_fsync_dir", "_rename", "_remove_tree")
TORCH_ZIP_ERROR = ("[enforce fail at inline_container.cc:626] . unexpected pos 4224 vs 4160\n"
                   "frame #0: c10::ThrowEnforceNotMet(char const*, int, char const*, std::string const&, void const*)")


def _failure(kind: str) -> BaseException:
    if kind == "ENOSPC":
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if kind == "EIO":
        return OSError(errno.EIO, os.strerror(errno.EIO))
    return RuntimeError(TORCH_ZIP_ERROR)


CAUSES = {"ENOSPC": "No space left on device", "EIO": "Input/output error", "torch": "enforce fail at inline_container"}


def _fail_at(common, monkeypatch, kill_at: int, kind: str, log: list) -> None:
    """Make filesystem step ``kill_at`` of the checkpoint code fail with ``kind``; a file write fails midway (half
    of the file's bytes are on disk)."""
    count = [0]
    for name in HOOKS:
        original = getattr(common, name)

        def hooked(*args, _name=name, _original=original, **kwargs):
            count[0] += 1
            log.append(_name)
            if count[0] != kill_at:
                return _original(*args, **kwargs)
            if _name == "_write_file":
                path, fill = args
                buf = io.BytesIO()
                fill(buf)
                with open(path, "wb") as f:
                    f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            raise _failure(kind)

        monkeypatch.setattr(common, name, hooked)


def _steps_of_a_save(tmp_path) -> list[str]:
    import r4b_fast.training.common as common

    _, module, opt, sched = _tiny_training()
    log: list[str] = []
    mp = pytest.MonkeyPatch()
    _fail_at(common, mp, 0, "EIO", log)
    common.save_checkpoint(tmp_path / "probe" / "checkpoint", module, opt, sched, 1)
    log.clear()
    common.save_checkpoint(tmp_path / "probe" / "checkpoint", module, opt, sched, 2)  # a save that rotates
    mp.undo()
    return list(log)


def test_a_save_that_fails_at_any_step_keeps_a_complete_checkpoint_and_says_why_in_one_line(tmp_path):
    """For every filesystem step of a save that rotates a previous checkpoint out, and each of ENOSPC, EIO and
    torch's zip-writer RuntimeError: a :class:`CheckpointError` of one line naming the folder and the cause; no
    partial ``checkpoint.tmp`` left; the newest complete checkpoint (step 1, or step 2 once it was complete) loads
    with the weights of its step; and once the disk is back the next save and a resume work."""
    import r4b_fast.training.common as common

    steps = _steps_of_a_save(tmp_path)
    assert steps.count("_write_file") == 3 and steps.count("_rename") == 2
    failures = []
    for kill_at in range(1, len(steps) + 1):
        for kind in ("ENOSPC", "EIO", "torch"):
            case = tmp_path / f"{kill_at}_{kind}"
            net, module, opt, sched = _tiny_training()
            ckpt = case / "checkpoint"
            common.save_checkpoint(ckpt, module, opt, sched, 1)
            step1 = {k: v.clone() for k, v in net.state_dict().items()}
            with torch.no_grad():
                net.weight.add_(1.0)
            step2 = {k: v.clone() for k, v in net.state_dict().items()}
            mp = pytest.MonkeyPatch()
            _fail_at(common, mp, kill_at, kind, [])
            try:
                common.save_checkpoint(ckpt, module, opt, sched, 2)
                error = None
            except common.CheckpointError as err:
                error = str(err)
            except Exception as err:  # noqa: BLE001 - the point: nothing else may escape
                error = f"not a CheckpointError: {type(err).__name__}: {err}"
            finally:
                mp.undo()
            problem = _check_case(common, case, error, kind, step1, step2)
            if problem:
                failures.append(f"step {kill_at} ({steps[kill_at - 1]}), {kind}: {problem}")
    assert not failures, "\n".join(failures)


def _check_case(common, case: Path, error: str | None, kind: str, step1: dict, step2: dict) -> str | None:
    ckpt = case / "checkpoint"
    if error is None:
        return "no error raised"
    if "\n" in error or str(ckpt) not in error or CAUSES[kind] not in error:
        return f"message is not one line naming {ckpt} and {CAUSES[kind]!r}: {error!r}"
    tmp = case / "checkpoint.tmp"
    if tmp.exists() and common._read_manifest(tmp) is None:
        return "a partial checkpoint.tmp was left"
    found = common.find_checkpoint(ckpt)
    if found is None:
        return "no complete checkpoint left"
    net2, module2, opt2, sched2 = _tiny_training(seed=1)
    loaded = common.load_checkpoint(ckpt, module2, opt2, sched2)
    expected = {1: step1, 2: step2}[loaded["step"]]
    if any(not torch.equal(v, expected[k]) for k, v in net2.state_dict().items()):
        return f"the checkpoint of step {loaded['step']} does not hold that step's weights"
    common.save_checkpoint(ckpt, module2, opt2, sched2, 3)  # the disk is back
    if common.load_checkpoint(ckpt, *_tiny_training(seed=2)[1:])["step"] != 3:
        return "the next save after the failure did not resume"
    return None


def test_torch_zip_writer_failing_midway_removes_the_partial_copy(tmp_path, monkeypatch):
    """``torch.save`` raising its ``RuntimeError: [enforce fail at inline_container.cc:...]`` after writing part of
    ``trainer_state.pt`` (the issue: the handler caught only OSError and left ``checkpoint.tmp`` behind)."""
    import r4b_fast.training.common as common

    _, module, opt, sched = _tiny_training()
    ckpt = tmp_path / "checkpoint"
    common.save_checkpoint(ckpt, module, opt, sched, 1)
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        f.write(buf.getvalue()[:100])
        raise RuntimeError(TORCH_ZIP_ERROR)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(common.CheckpointError) as exc:
        common.save_checkpoint(ckpt, module, opt, sched, 2)
    monkeypatch.undo()
    message = str(exc.value)
    assert "\n" not in message and "enforce fail at inline_container.cc" in message, message
    assert f"saving step 2 into {tmp_path / 'checkpoint.tmp'}" in message
    assert "previous checkpoint" in message and "(step 1) is intact" in message
    assert not (tmp_path / "checkpoint.tmp").exists()
    assert common.load_checkpoint(ckpt, *_tiny_training(seed=1)[1:])["step"] == 1


def test_a_resume_that_cannot_move_the_newest_checkpoint_into_place_says_so_in_one_line(tmp_path, monkeypatch):
    """A kill left the newest complete checkpoint in ``checkpoint.tmp``; the resume reads it, then the rename that
    puts it in place fails (EIO): a :class:`CheckpointError`, and the checkpoint is still there for the next try."""
    import shutil

    import r4b_fast.training.common as common

    _, module, opt, sched = _tiny_training()
    ckpt = tmp_path / "checkpoint"
    common.save_checkpoint(ckpt, module, opt, sched, 1)
    common.save_checkpoint(tmp_path / "newer" / "checkpoint", module, opt, sched, 2)
    shutil.move(tmp_path / "newer" / "checkpoint", tmp_path / "checkpoint.tmp")

    def eio(src, dst):
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(src))

    monkeypatch.setattr(common, "_rename", eio)
    with pytest.raises(common.CheckpointError) as exc:
        common.load_checkpoint(ckpt, *_tiny_training(seed=1)[1:])
    monkeypatch.undo()
    message = str(exc.value)
    assert "\n" not in message and "Input/output error" in message and str(ckpt) in message, message
    assert common.load_checkpoint(ckpt, *_tiny_training(seed=1)[1:])["step"] == 2
    assert common.find_checkpoint(ckpt)[0] == ckpt


@pytest.mark.parametrize("kind", ["ENOSPC", "torch"])
def test_annealing_ends_cleanly_on_a_failed_save_and_resumes_once_the_disk_is_back(tmp_path, monkeypatch, capsys,
                                                                                   kind):  # fmt: skip
    """The step-4 save fails while writing ``trainer_state.pt`` (``torch``: the RuntimeError torch's zip writer
    raises on a full disk, ``unexpected pos``): the loop exits with one line, the partial copy is gone, and
    ``--resume`` finishes the run."""
    import r4b_fast.training.common as common
    from r4b_fast.training import annealing

    out = tmp_path / "run"
    args = ["--steps", "4", "--batch-size", "4", "--hidden-size", "32", "--layers", "1", "--eval-items", "0",
            "--save-every", "2", "--warmup", "1", "--device", "cpu", "--output-dir", str(out)]  # fmt: skip
    real = common._write_file

    def full_at_step_4(path, fill):
        if path.name == "trainer_state.pt" and common.find_checkpoint(out / "checkpoint") is not None:
            def partial(f):
                f.write(b"PK" + b"\0" * 62)
                raise _failure(kind)

            return real(path, partial)
        return real(path, fill)

    monkeypatch.setattr(common, "_write_file", full_at_step_4)
    with pytest.raises(SystemExit) as exc:
        annealing.main(args)
    monkeypatch.undo()
    message = str(exc.value.code)
    assert message.startswith("annealing: ") and "\n" not in message, message
    assert "saving step 4" in message and CAUSES[kind] in message and "(step 2) is intact" in message
    assert not (out / "checkpoint.tmp").exists()
    assert common.find_checkpoint(out / "checkpoint")[1]["step"] == 2
    assert annealing.main([*args, "--resume"]) == 0
    assert common.find_checkpoint(out / "checkpoint")[1]["step"] == 4 and (out / "model").exists()
    assert "resumed from" in capsys.readouterr().out


def _parser(out: Path, *flags: str):
    from r4b_fast.training.common import add_run_arguments

    parser = ArgumentParser(prog="loop")
    parser.add_argument("--output-dir", type=Path)
    add_run_arguments(parser)
    return parser, parser.parse_args(["--output-dir", str(out), *flags])


def _refused(out: Path, capsys, *flags: str) -> str:
    from r4b_fast.training.common import prepare_output_dir

    parser, args = _parser(out, *flags)
    with pytest.raises(SystemExit) as exc:
        prepare_output_dir(parser, args)
    assert exc.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_an_output_dir_that_cannot_be_written_is_refused_at_start_in_one_line(tmp_path, capsys):
    """A path under a file (what a read-only folder does as root, where chmod does not stop writes); with chmod
    too when not running as root."""
    (tmp_path / "file").write_text("x")
    line = _refused(tmp_path / "file" / "run", capsys)
    assert "--output-dir: cannot write to" in line and str(tmp_path / "file") in line and "Not a directory" in line
    if os.geteuid() != 0 and sys.platform != "win32":
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            line = _refused(ro, capsys)
            assert "--output-dir: cannot write to" in line and "Permission denied" in line, line
        finally:
            ro.chmod(0o755)


def test_metrics_jsonl_that_is_a_directory_is_refused_in_one_line(tmp_path, capsys):
    from r4b_fast.training.common import CheckpointError, MetricsLogger, save_checkpoint

    out = tmp_path / "run"
    (out / "metrics.jsonl").mkdir(parents=True)
    _, module, opt, sched = _tiny_training()
    save_checkpoint(out / "checkpoint", module, opt, sched, 2)
    for flags in ((), ("--resume",)):
        line = _refused(out, capsys, *flags)
        assert f"{out / 'metrics.jsonl'} is a directory" in line, line
    with pytest.raises(CheckpointError, match=r"metrics: .*metrics.jsonl is a directory"):
        MetricsLogger(out, tensorboard=False, resume_step=2)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match=r"metrics: cannot write .*Not a directory"):
        MetricsLogger(tmp_path / "file" / "run", tensorboard=False)


def test_a_metrics_write_that_fails_midrun_is_one_line(tmp_path):
    from r4b_fast.training.common import CheckpointError, MetricsLogger

    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.log(1, {"loss": 1.0})
    real = logger._file

    class FullDisk:
        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def close(self):
            real.close()

    logger._file = FullDisk()
    with pytest.raises(CheckpointError, match=r"metrics: writing step 2 to .*metrics.jsonl failed \(No space left"):
        logger.log(2, {"loss": 0.5})
    logger.close()
