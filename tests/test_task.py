"""The embedded task, its tokenizer, the tiny R-4B model and the annealing batch encoding."""

import math

import pytest
import torch

from r4b_fast.modes import Mode
from r4b_fast.training.annealing import cosine_with_warmup, encode_sft_batch, sft_loss
from r4b_fast.training.rewards import accuracy_reward
from r4b_fast.training.task import (
    CELL,
    MODE_PREFIX,
    PALETTE,
    Item,
    annealing_labels,
    annealing_mix,
    build_dataset,
    build_tokenizer,
    prompt_text,
    sample_items,
    target_text,
)
from r4b_fast.training.tiny_model import build_tiny_r4b, num_image_tokens, parameter_groups, pixel_inputs


def test_items_answers_and_steps():
    hard = Item((3, 5, 7, 2), True)
    assert hard.answer == "29" and hard.steps == "3*5=15, 7*2=14, 15+14=29"
    easy = Item((3, 5, 7, 2), False)
    assert easy.answer == "3"
    assert target_text(hard, Mode.THINK) == "<think>\n3*5=15, 7*2=14, 15+14=29\n</think>\n\n29"
    assert target_text(hard, Mode.NO_THINK) == "<think>\n\n</think>\n\n29"
    # the targets earn full reward from the rule-based reward
    assert accuracy_reward(target_text(hard, Mode.THINK), hard.answer) == 1.0


def test_image_encodes_the_digits():
    item = Item((0, 9, 4, 7), True)
    img = item.image(noise=0.05, generator=torch.Generator().manual_seed(0))
    assert img.shape == (3, 2 * CELL, 2 * CELL)
    decoded = []
    for r in range(2):
        for c in range(2):
            cell = img[:, r * CELL : (r + 1) * CELL, c * CELL : (c + 1) * CELL].mean((1, 2))
            decoded.append(int(((PALETTE - cell) ** 2).sum(1).argmin()))
    assert tuple(decoded) == item.digits


def test_labels_follow_r4b_proportions():
    items = sample_items(6000, seed=3)
    labels = annealing_labels(items, seed=3)
    assert all(m == Mode.NO_THINK for it, m in zip(items, labels) if not it.hard)
    think_share = sum(m == Mode.THINK for m in labels) / len(labels)
    assert abs(think_share - 0.315) < 0.03  # about two thirds non-thinking
    hard_think = [m == Mode.THINK for it, m in zip(items, labels) if it.hard]
    assert 0.4 < sum(hard_think) / len(hard_think) < 0.5  # most hard items are labelled non-thinking


def test_annealing_mix_kinds_and_proportions():
    """Auto examples (share auto_fraction) think on hard items with probability auto_think_prob_hard and never on
    easy ones, forced ones with think_prob_hard / think_prob_easy; a function of the seed."""
    items = sample_items(20000, seed=4)
    kw = dict(think_prob_hard=0.6, auto_fraction=0.25, auto_think_prob_hard=0.1, think_prob_easy=0.2)
    modes, auto = annealing_mix(items, 4, **kw)
    assert (modes, auto) == annealing_mix(items, 4, **kw)
    assert abs(sum(auto) / len(auto) - 0.25) < 0.015
    for hard, kind, p in ((True, True, 0.1), (True, False, 0.6), (False, True, 0.0), (False, False, 0.2)):
        sel = [m == Mode.THINK for it, m, a in zip(items, modes, auto) if it.hard == hard and a == kind]
        assert abs(sum(sel) / len(sel) - p) < 0.03, (hard, kind, sum(sel) / len(sel))
    assert annealing_mix(items[:50], 4, auto_fraction=0.0)[1] == [False] * 50
    with pytest.raises(ValueError, match="auto_fraction: expected a probability in"):
        annealing_mix(items[:5], 0, auto_fraction=1.5)


def test_forced_examples_leave_the_mode_prefix_unsupervised():
    """A forced example (auto=False) supervises what follows its mode prefix (MODE_PREFIX: what a forced-mode prompt
    is given), an auto example the whole turn from <think> on."""
    tok = build_tokenizer()
    items = [Item((3, 5, 7, 2), True)] * 4
    modes = [Mode.THINK, Mode.NO_THINK, Mode.THINK, Mode.NO_THINK]
    _, _, labels, _ = encode_sft_batch(tok, items, modes, n_image_tokens=4, auto=[False, False, True, True])
    for row, mode in enumerate(modes):
        supervised = tok.decode(labels[row][labels[row] != -100].tolist())
        full = target_text(items[row], mode) + tok.eos_token
        assert supervised == (full if row >= 2 else full.removeprefix(MODE_PREFIX[mode])), row


def test_annealing_rejects_bad_mix_flags(tmp_path):
    for flag, value in (("--auto-fraction", "1.5"), ("--think-prob-hard", "-0.1"), ("--min-think-tokens", "-2")):
        proc = _annealing(tmp_path / "x", flag, value)
        assert proc.returncode == 2 and flag in proc.stderr, proc.stderr
        assert not (tmp_path / "x").exists()


def test_tokenizer_round_trip_and_special_tokens():
    tok = build_tokenizer()
    text = target_text(Item((4, 9, 3, 0), True), Mode.THINK)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    for special in ("<think>", "</think>", "<image>", "<|im_end|>"):
        assert tok(special, add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids(special)]
    assert tok.unk_token_id not in ids


def test_tokenizer_merges_double_newlines_so_thinking_is_not_a_prefix_of_non_thinking():
    """As BPE tokenizers (Qwen's) do, "\n\n" is one token: the thinking prefix "<think>\n" is then not a token prefix
    of the non-thinking block, whose ids are exactly <think> \n\n </think> \n\n."""
    tok = build_tokenizer()
    ids = {m: tok(MODE_PREFIX[m], add_special_tokens=False)["input_ids"] for m in (Mode.THINK, Mode.NO_THINK)}
    nl, nl2 = tok.convert_tokens_to_ids("\n"), tok.convert_tokens_to_ids("\n\n")
    start, end = tok.convert_tokens_to_ids("<think>"), tok.convert_tokens_to_ids("</think>")
    assert nl2 != tok.unk_token_id and nl != nl2
    assert ids[Mode.THINK] == [start, nl] and ids[Mode.NO_THINK] == [start, nl2, end, nl2]
    assert ids[Mode.NO_THINK][: len(ids[Mode.THINK])] != ids[Mode.THINK]
    assert tok("a\n\n\nb", add_special_tokens=False)["input_ids"][1:3] == [nl2, nl]  # longest match first
    assert tok.decode(tok("x\n\ny\nz", add_special_tokens=False)["input_ids"]) == "x\n\ny\nz"


def test_dataset_columns():
    ds = build_dataset(8, seed=0)
    assert set(ds.column_names) >= {"question", "answer", "image", "mode", "hard"}
    assert torch.tensor(ds[0]["image"]).shape == (3, 2 * CELL, 2 * CELL)


def test_sft_batch_masks_everything_but_the_assistant_turn():
    tok = build_tokenizer()
    items = [Item((1, 2, 3, 4), True), Item((5, 6, 7, 8), False)]
    modes = [Mode.THINK, Mode.NO_THINK]
    input_ids, mask, labels, images = encode_sft_batch(tok, items, modes, n_image_tokens=10)
    for row, (item, mode) in enumerate(zip(items, modes)):
        supervised = labels[row][labels[row] != -100].tolist()
        assert tok.decode(supervised) == target_text(item, mode) + tok.eos_token
        assert mask[row].sum() == (input_ids[row] != tok.pad_token_id).sum()
    assert len(images) == 2 and all(img.shape == (3, 2 * CELL, 2 * CELL) for img in images)


def test_tiny_model_forward_and_loss():
    tok = build_tokenizer()
    model = build_tiny_r4b(tok, hidden_size=32, layers=1)
    n_img = num_image_tokens(model)
    batch = encode_sft_batch(tok, sample_items(3, 0), [Mode.THINK, Mode.NO_THINK, Mode.THINK], n_img)
    loss, n_tokens = sft_loss(model, *batch)
    assert math.isfinite(loss.item()) and abs(loss.item() - math.log(len(tok))) < 1.0  # near uniform at init
    # independent reference: the model's own padded forward with pixel values, eager cross-entropy on logits
    input_ids, mask, labels, images = batch
    pixel_values, image_sizes = pixel_inputs(torch.stack(images))
    logits = model(input_ids=input_ids, attention_mask=mask, pixel_values=pixel_values, image_sizes=image_sizes).logits
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    assert n_tokens == int((labels[:, 1:] != -100).sum())
    loss.backward()
    names = {g["name"] for g in parameter_groups(model, 1e-4, 1e-3, 1e-3)}
    assert names == {"vision", "projector", "llm"}
    assert model.model.vision_tower.embeddings.patch_embedding.weight.grad is not None


def test_cosine_schedule():
    assert cosine_with_warmup(0, 100, 10) == 0.1
    assert cosine_with_warmup(9, 100, 10) == 1.0
    assert abs(cosine_with_warmup(55, 100, 10) - 0.5) < 1e-9
    assert cosine_with_warmup(100, 100, 10) == 0.0
    assert MODE_PREFIX[Mode.NO_THINK] == "<think>\n\n</think>\n\n"


def _annealing(tmp_path, *extra):
    import subprocess
    import sys

    args = ["--steps", "6", "--batch-size", "4", "--hidden-size", "32", "--layers", "1", "--eval-items", "0",
            "--save-every", "2", "--warmup", "2", "--output-dir", str(tmp_path), *extra]
    return subprocess.run([sys.executable, "-m", "r4b_fast.training.annealing", *args], capture_output=True, text=True,
                          timeout=600)


def test_annealing_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path):
    from safetensors.torch import load_file

    from r4b_fast.training.common import read_metrics

    full = _annealing(tmp_path / "full")
    assert full.returncode == 0, full.stderr
    killed = _annealing(tmp_path / "killed", "--stop-after", "5")  # dies after step 5; last checkpoint: step 4
    assert killed.returncode == 3
    resumed = _annealing(tmp_path / "killed", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "at step 4" in resumed.stdout
    a = load_file(str(tmp_path / "full" / "checkpoint" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "checkpoint" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    losses_full = [r["loss"] for r in read_metrics(tmp_path / "full" / "metrics.jsonl")]
    resumed_log = read_metrics(tmp_path / "killed" / "metrics.jsonl")
    # steps 5 and 6 of the resumed run reproduce the uninterrupted run's losses exactly
    assert [r["loss"] for r in resumed_log if r["step"] >= 5][-2:] == losses_full[4:6]


def test_plot_draws_the_logged_curves(tmp_path):
    from r4b_fast.training.common import MetricsLogger, read_metrics
    from r4b_fast.training.plot import plot_panels, plot_run

    logger = MetricsLogger(tmp_path, tensorboard=False)
    for step in range(1, 6):
        logger.log(step, {"reward/think_hard": 0.1 * step, "reward/no_think_easy": 0.05 * step, "loss": 1e-9,
                          "eval/think_rate_hard": 0.2, "kl": 0.01, "entropy_mean": 1.5, "clip_frac_low": 0.0,
                          "length/think": 20.0})  # fmt: skip
    logger.close()
    panels = plot_panels(read_metrics(tmp_path / "metrics.jsonl"))
    # an RL run: reward per mode and difficulty, think rate, length, KL, entropy, clip fraction; not its ~0 loss
    assert list(panels) == ["rollout reward per mode and difficulty", "held-out auto-mode think rate",
                            "rollout length per mode (tokens)", "KL to the reference (--beta > 0)",
                            "policy entropy (nats/token)", "clip fraction"]  # fmt: skip
    assert panels["rollout reward per mode and difficulty"]["reward/think_hard"][2] == (3, 0.1 * 3)
    assert list(plot_panels([{"step": 1, "loss": 2.0}])) == ["SFT loss (annealing)"]  # an annealing run
    out = plot_run(tmp_path)
    assert out.exists() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    empty = tmp_path / "empty"
    MetricsLogger(empty, tensorboard=False).close()
    with pytest.raises(ValueError, match="none of the plotted metrics"):
        plot_run(empty)


def test_annealing_bf16_autocast_tracks_fp32(tmp_path):
    """--precision bf16 (autocast; here on CPU, the same code path as on a GPU): the first loss (before any
    update) within bf16 rounding of fp32's, and it trains."""
    from r4b_fast.training.common import read_metrics

    runs = {}
    for precision in ("fp32", "bf16"):
        proc = _annealing(tmp_path / precision, "--precision", precision, "--device", "cpu", "--save-every", "0")
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert f"cpu, {precision}" in proc.stdout
        runs[precision] = [r["loss"] for r in read_metrics(tmp_path / precision / "metrics.jsonl") if "loss" in r]
    fp32, bf16 = runs["fp32"], runs["bf16"]
    assert fp32[0] != bf16[0]  # the forward really ran in bf16
    assert abs(bf16[0] - fp32[0]) < 0.02 * fp32[0]
    assert bf16[-1] < bf16[0]


def test_annealing_final_evaluation_with_the_rollout_engine(tmp_path):
    """The end-of-annealing evaluation (greedy completions of the rollout engine in each mode) is logged per mode and
    difficulty; the values are fractions of the items."""
    from r4b_fast.training.common import read_metrics

    proc = _annealing(tmp_path, "--steps", "2", "--eval-items", "8", "--save-every", "0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = read_metrics(tmp_path / "metrics.jsonl")[-1]
    for mode in ("think", "no_think", "auto"):
        for level in ("easy", "hard"):
            value = record[f"eval/acc_{mode}_{level}"]
            assert 0 <= value <= 1
    assert 0 <= record["eval/think_rate_hard"] <= 1
    assert "eval: acc_auto_easy" in proc.stdout


def test_greedy_evaluation_completions_equal_transformers_generate():
    """The evaluation's greedy completions (the project's rollout engine, forced prefixes, KV cache, image features
    written into the prompt) are transformers' own greedy ``generate`` on the shipped annealed model, in every mode."""
    from r4b_fast.training.bpo import DEFAULT_MODEL
    from r4b_fast.training.common import load_model
    from r4b_fast.training.evaluation import ModeTokens, mode_completions
    from r4b_fast.training.vision import ImageEncoder

    model, tok = load_model(DEFAULT_MODEL, "cpu")
    enc = ImageEncoder.for_model(model, DEFAULT_MODEL)
    items = sample_items(12, 10_000, split="eval")
    tokens = ModeTokens.from_tokenizer(tok)
    for mode in (Mode.THINK, Mode.NO_THINK, Mode.AUTO):
        ours = mode_completions(model, tok, tokens, items, mode, enc, max_new_tokens=30)
        prompts = [prompt_text(it, enc.count(model, it)) + MODE_PREFIX[mode] for it in items]
        tok.padding_side = "left"
        batch = tok(prompts, padding=True, return_tensors="pt", add_special_tokens=False)
        tok.padding_side = "right"
        pixel_values, image_sizes = pixel_inputs(torch.stack([it.image() for it in items]))
        out = model.generate(**batch, pixel_values=pixel_values, image_sizes=image_sizes, do_sample=False,
                             max_new_tokens=30 - len(tokens.think_open if mode == Mode.THINK else
                                                     tokens.no_think if mode == Mode.NO_THINK else tokens.auto),
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
        texts = tok.batch_decode(out[:, batch.input_ids.shape[1] :])
        theirs = [MODE_PREFIX[mode] + t.split(tok.eos_token)[0].replace(tok.pad_token, "") for t in texts]
        assert ours == theirs, mode


def test_shipped_checkpoint_reproduces_its_recorded_evaluation():
    """training/assets/annealed_eval_quick.json holds the shipped checkpoint's evaluation on a few held-out items
    (written by the command in training/assets/README.md): re-evaluated here, the same numbers, greedy to the item;
    sampled within one item per difficulty (another thread count can change the last bits of a probability)."""
    import json

    from r4b_fast.training.bpo import DEFAULT_MODEL
    from r4b_fast.training.common import load_model
    from r4b_fast.training.evaluation import evaluate_held_out
    from r4b_fast.training.vision import ImageEncoder

    recorded = json.loads((DEFAULT_MODEL.parent / "annealed_eval_quick.json").read_text())
    model, tok = load_model(DEFAULT_MODEL, "cpu")
    model.eval()
    metrics = evaluate_held_out(model, tok, ImageEncoder.for_model(model, DEFAULT_MODEL), recorded["items"],
                                seed=recorded["seed"], min_think_tokens=recorded["min_think_tokens"],
                                no_reopen=recorded["no_reopen"], strict_auto=recorded.get("strict_auto", False))
    held_out = sample_items(recorded["items"], recorded["seed"] + 10_000, hard_fraction=0.5, split="eval")
    per_level = min(sum(it.hard for it in held_out), sum(not it.hard for it in held_out))
    checked = 0
    for key, value in recorded["metrics"].items():
        if "/acc_" in key or "/think_rate_" in key:
            tolerance = 1e-9 if key.startswith("eval/") else 1 / per_level + 1e-9
            assert abs(metrics[key] - value) <= tolerance, (key, metrics[key], value)
            checked += 1
    assert checked == 2 * (3 * 2 + 2)  # two temperatures x (three modes x easy/hard + two think rates)
