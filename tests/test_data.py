"""Own data for the loops: jsonl/parquet rows, every bad row reported with its index, never trained on."""

import io
import json
import subprocess
import sys

import pytest
import torch

from r4b_fast.training.data import BadRowError, load_rows
from r4b_fast.training.task import IMAGE_SIZE, sample_items


def _png(item) -> bytes:
    from PIL import Image

    arr = (item.image() * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()
    buf = io.BytesIO()
    Image.frombytes("RGB", (IMAGE_SIZE, IMAGE_SIZE), arr.numpy().tobytes()).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture()
def data_dir(tmp_path):
    """12 good rows (file paths and one inline PNG), one without answer, one with a corrupt image."""
    items = sample_items(12, seed=7, hard_fraction=0.5)
    rows = []
    for i, it in enumerate(items):
        (tmp_path / f"img{i}.png").write_bytes(_png(it))
        rows.append({"image": f"img{i}.png", "question": it.question, "answer": it.answer, "hard": it.hard})
    rows.insert(3, {"image": "img0.png", "question": "What is the first digit?"})  # no answer
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows.insert(5, {"image": "broken.png", "question": "What is the first digit?", "answer": "1"})
    with (tmp_path / "train.jsonl").open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return tmp_path, items


def test_rows_decode_to_the_same_pixels(data_dir):
    path, items = data_dir
    good, bad = load_rows(path / "train.jsonl", on_bad_row="skip")
    assert [b[0] for b in bad] == [3, 5]
    assert "answer: missing" in bad[0][1] and "image: cannot be decoded" in bad[1][1]
    assert len(good) == 12
    for row, item in zip(good, items):
        assert row.question == item.question and row.answer == item.answer and row.hard == item.hard
        assert (row.image() - item.image()).abs().max() <= 1 / 255 + 1e-6  # 8-bit PNG round trip


def test_bad_row_raises_with_its_index(data_dir):
    path, _ = data_dir
    with pytest.raises(BadRowError, match="train.jsonl, row 3: answer: missing"):
        load_rows(path / "train.jsonl")


def test_parquet_with_inline_bytes(tmp_path):
    import datasets

    items = sample_items(3, seed=1)
    datasets.Dataset.from_dict({"image": [_png(it) for it in items], "question": [it.question for it in items],
                                "answer": [int(it.answer) for it in items]}).to_parquet(str(tmp_path / "d.parquet"))
    good, bad = load_rows(tmp_path / "d.parquet")
    assert not bad and [r.answer for r in good] == [it.answer for it in items] and good[0].hard is None


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_rows(tmp_path / "nope.jsonl")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="expected a .jsonl, .json or .parquet"):
        load_rows(tmp_path / "d.csv")


def test_bpo_trains_on_a_dataset_and_reports_skipped_rows(data_dir, tmp_path):
    from r4b_fast.training.common import read_metrics
    from r4b_fast.training.task import build_tokenizer
    from r4b_fast.training.tiny_model import build_tiny_r4b

    path, _ = data_dir
    model_dir = tmp_path / "policy"
    tok = build_tokenizer()
    build_tiny_r4b(tok, hidden_size=32, layers=1).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    args = [sys.executable, "-m", "r4b_fast.training.bpo", "--model", str(model_dir), "--dataset",
            str(path / "train.jsonl"), "--steps", "2", "--prompts", "2", "--g", "1", "--max-new-tokens", "6",
            "--output-dir", str(tmp_path / "run")]
    proc = subprocess.run([*args, "--on-bad-row", "skip"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "skipped train.jsonl row 3: answer: missing" in proc.stderr
    assert "skipped train.jsonl row 5: image: cannot be decoded" in proc.stderr
    log = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert log[-1]["step"] == 2 and any(k.startswith("eval/acc_auto_") for k in log[0])
    # the same folder again: --overwrite (a previous run is never replaced without it)
    proc = subprocess.run([*args, "--overwrite"], capture_output=True, text=True, timeout=600)  # raise at the first
    assert proc.returncode != 0 and "row 3: answer: missing" in proc.stderr
    proc = subprocess.run([*args, "--overwrite", "--on-bad-row", "skip", "--max-prompt-tokens", "5"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "no usable rows" in proc.stderr and "exceeds --max-prompt-tokens 5" in proc.stderr


def test_annealing_on_own_rows_with_mode_labels(tmp_path):
    """``annealing --dataset``: rows carry ``mode`` and, for thinking rows, ``thought``; the thinking target is built
    from the row's thought; a row without a label, or a think row without thought, is reported with its index and
    raised or skipped, never trained on."""
    from r4b_fast.modes import Mode
    from r4b_fast.training.data import annealing_row_problem
    from r4b_fast.training.task import target_text

    items = sample_items(8, seed=3, hard_fraction=0.5)
    rows = []
    for i, it in enumerate(items):
        (tmp_path / f"img{i}.png").write_bytes(_png(it))
        row = {"image": f"img{i}.png", "question": it.question, "answer": it.answer, "mode": "no_think"}
        if it.hard:
            row.update(mode="think", thought=it.steps)
        rows.append(row)
    rows.insert(2, {"image": "img0.png", "question": items[0].question, "answer": items[0].answer})  # no mode
    rows.insert(4, {"image": "img1.png", "question": "q?", "answer": "1", "mode": "think"})  # think, no thought
    rows.insert(0, {"image": "img1.png", "question": "q?", "mode": "no_think"})  # no answer: reported as row 0
    with (tmp_path / "sft.jsonl").open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")

    good, _ = load_rows(tmp_path / "sft.jsonl", on_bad_row="skip")
    assert [r.row for r in good[:5]] == [1, 2, 3, 4, 5]  # file rows, not positions among the kept ones
    problems = [annealing_row_problem(r) for r in good]
    assert [i for i, p in enumerate(problems) if p] == [2, 4]
    assert "mode: missing" in problems[2] and "thought: missing" in problems[4]
    hard = next(r for r in good if r.mode == Mode.THINK and r.thought)
    assert target_text(hard, Mode.THINK) == f"<think>\n{hard.thought}\n</think>\n\n{hard.answer}"
    assert target_text(good[0], Mode.NO_THINK) == f"<think>\n\n</think>\n\n{good[0].answer}"

    def anneal(*extra):
        args = ["--dataset", str(tmp_path / "sft.jsonl"), "--steps", "3", "--batch-size", "4", "--hidden-size", "32",
                "--layers", "1", "--eval-items", "0", "--warmup", "1", "--output-dir", str(tmp_path / "run"), *extra]
        return subprocess.run([sys.executable, "-m", "r4b_fast.training.annealing", *args], capture_output=True,
                              text=True, timeout=600)  # fmt: skip

    strict = anneal()
    assert strict.returncode != 0 and "sft.jsonl, row 0: answer: missing" in strict.stderr
    lenient = anneal("--on-bad-row", "skip")
    assert lenient.returncode == 0, lenient.stderr[-2000:]
    assert "skipped sft.jsonl row 0: answer: missing" in lenient.stderr
    assert "skipped sft.jsonl row 3: mode: missing" in lenient.stderr
    assert "skipped sft.jsonl row 5: thought: missing" in lenient.stderr
    n_think = sum(it.hard for it in items)
    assert f"{round(100 * n_think / len(items))}% thinking labels" in lenient.stdout
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()
