"""One RL step, our BPO loop vs TRL's GRPOTrainer, on the same random Qwen2.5-VL and the same image prompts.

    python bench/step_vs_trl.py --size 114m --out bench/results/step-vs-trl-cpu.md     # the issue's shape (slow)
    python bench/step_vs_trl.py --size tiny                                             # a smoke run (a minute)

Builds everything here (no download): a byte-level BPE tokenizer with Qwen2.5-VL's special tokens and chat template,
a random ``Qwen2_5_VLForConditionalGeneration`` (114m: text hidden 512, 8 layers, vocab 151,936, tied embeddings;
224x224 images = 64 image tokens), and a folder of PNG prompts. Each side runs in its own process (its own peak RSS),
``--steps`` steps with the same settings: 4 prompts x 8 rollouts, ``--new-tokens`` new tokens, T=1, 8 rollouts per
micro-batch x 4 accumulation, lr 1e-4, beta 0, fp32. Per step it records CPU-seconds (``time.process_time``, all
threads) split into generation (incl. reward), scoring (old/ref log-probs) and update, and the process's peak RSS.
Ours also saves a checkpoint after the last step (its peak includes it); TRL does not save.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = {  # text hidden, layers, heads, kv heads, intermediate, vocab, image side, vision depth / hidden
    "114m": dict(hidden=512, layers=8, heads=8, kv=2, inter=1536, vocab=151936, image=224, vdepth=4, vhidden=256),
    "tiny": dict(hidden=64, layers=2, heads=4, kv=2, inter=128, vocab=4096, image=56, vdepth=1, vhidden=32),
}


def build(folder: Path, size: str, prompts: int) -> None:
    """Write the model, tokenizer, image processor and a jsonl of ``prompts * 4`` image prompts into ``folder``."""
    import torch
    from PIL import Image
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    sys.path.insert(0, str(ROOT / "tests"))
    from test_models import QWEN25_VL_TEMPLATE, QWEN_SPECIAL, _qwen_ids, bpe_tokenizer  # the tests' tokenizer

    from r4b_fast.training.task import sample_items

    s = SIZES[size]
    tok = bpe_tokenizer(QWEN_SPECIAL, QWEN25_VL_TEMPLATE)
    text = dict(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["inter"],
                num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv"],
                max_position_embeddings=4096,
                rope_scaling={"type": "mrope", "mrope_section": _mrope_section(s["hidden"] // s["heads"])})  # fmt: skip
    vision = dict(depth=s["vdepth"], hidden_size=s["vhidden"], intermediate_size=2 * s["vhidden"], num_heads=4,
                  out_hidden_size=s["hidden"], patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                  window_size=112, fullatt_block_indexes=[s["vdepth"] - 1])  # fmt: skip
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **_qwen_ids(tok))
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    side = s["image"]
    Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2,
                             size={"shortest_edge": side * side, "longest_edge": side * side}).save_pretrained(folder)
    rows = []
    for i, it in enumerate(sample_items(prompts * 4, 0)):
        img = torch.nn.functional.interpolate(it.image()[None], size=(side, side), mode="nearest")[0]
        Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(folder / f"{i}.png")
        rows.append({"image": f"{i}.png", "question": it.question, "answer": it.answer, "hard": it.hard})
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    n = sum(p.numel() for p in model.parameters())
    (folder / "size.json").write_text(json.dumps({"parameters": n, **s}))


def _mrope_section(head_dim: int) -> list[int]:
    """Qwen2.5-VL's split of the rotary half (t, h, w): [16, 24, 24] of 64 at head_dim 128, scaled."""
    t = head_dim // 8
    return [t, (head_dim // 2 - t) // 2, head_dim // 2 - t - (head_dim // 2 - t) // 2]


class CpuClock:
    """CPU-seconds of this process per named phase of each step."""

    def __init__(self):
        self.steps: list[dict[str, float]] = []

    def wrap(self, obj, name: str, phase: str):
        inner = getattr(obj, name)

        def timed(*args, **kwargs):
            t0 = time.process_time()
            try:
                return inner(*args, **kwargs)
            finally:
                if not self.steps:
                    self.steps.append({})
                self.steps[-1][phase] = self.steps[-1].get(phase, 0.0) + time.process_time() - t0
                self.steps[-1][f"peak_gib_after_{name}"] = _peak_gib()  # where the process's peak RSS is set

        setattr(obj, name, timed)


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_ours(folder: Path, steps: int, new_tokens: int, out: Path) -> dict:
    import torch

    from r4b_fast.training import bpo, bpo_step

    clock = CpuClock()
    for name, phase in (("generate", "generation"), ("score", "generation"), ("old_logprobs", "scoring"),
                        ("update", "update")):  # fmt: skip
        clock.wrap(bpo_step, name, phase)
    step_fn = bpo_step.train_step

    def step(*args, **kwargs):
        clock.steps.append({})
        t0 = time.process_time()
        result = step_fn(*args, **kwargs)
        clock.steps[-1]["total"] = time.process_time() - t0
        return result

    bpo_step.train_step = step
    if hasattr(bpo, "train_step"):  # imported by name
        bpo.train_step = step
    argv = ["--model", str(folder), "--dataset", str(folder / "train.jsonl"), "--algo", "bpo", "--steps", str(steps),
            "--prompts", "4", "--g", "4", "--max-new-tokens", str(new_tokens), "--temperature", "1",
            "--grad-accum", "4", "--lr", "1e-4", "--eval-items", "0", "--save-every", str(steps),
            "--max-prompt-tokens", "4096", "--device", "cpu", "--output-dir", str(out), "--log-every", "1",
            "--threads", str(torch.get_num_threads())]  # fmt: skip
    t0 = time.process_time()
    code = bpo.main(argv)
    if code != 0:
        raise SystemExit(f"our loop exited {code}")
    ckpt = sum(p.stat().st_size for p in (out / "checkpoint").rglob("*") if p.is_file())
    return {"steps": clock.steps, "process_cpu_s": time.process_time() - t0, "peak_rss_gib": _peak_gib(),
            "checkpoint_bytes": ckpt}  # fmt: skip


def run_trl(folder: Path, steps: int, new_tokens: int, out: Path) -> dict:
    from datasets import Dataset
    from PIL import Image
    from transformers import Qwen2_5_VLForConditionalGeneration, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from r4b_fast.models import processor_for
    from r4b_fast.training.rewards import accuracy_reward

    rows = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
    data = Dataset.from_dict({
        "prompt": [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["question"]}]}]
                   for r in rows],
        "image": [Image.open(folder / r["image"]).convert("RGB") for r in rows],
        "answer": [r["answer"] for r in rows]})  # fmt: skip

    def reward(completions, answer, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [accuracy_reward(t, a) for t, a in zip(texts, answer)]

    clock = CpuClock()

    class Steps(TrainerCallback):
        def on_step_begin(self, *a, **k):
            clock.steps.append({"_t0": time.process_time()})

        def on_step_end(self, *a, **k):
            clock.steps[-1]["total"] = time.process_time() - clock.steps[-1].pop("_t0")

    args = GRPOConfig(output_dir=str(out), num_generations=8, per_device_train_batch_size=8,
                      gradient_accumulation_steps=4, max_completion_length=new_tokens, temperature=1.0,
                      learning_rate=1e-4, beta=0.0, loss_type="grpo", max_steps=steps, logging_steps=1,
                      save_strategy="no", report_to="none", use_cpu=True, bf16=False, seed=0,
                      dataloader_num_workers=0)  # fmt: skip
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype="float32")
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data,
                          processing_class=processor_for(folder), callbacks=[Steps()])  # fmt: skip
    clock.wrap(trainer, "_generate_and_score_completions", "generation")
    t0 = time.process_time()
    trainer.train()
    for s in clock.steps:
        s["update"] = s["total"] - s.get("generation", 0.0)
    return {"steps": clock.steps, "process_cpu_s": time.process_time() - t0, "peak_rss_gib": _peak_gib()}


def _side(side: str, folder: Path, steps: int, new_tokens: int, threads: int) -> dict:
    """Run one side in a fresh process and read its JSON result."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--side", side, "--folder", str(folder), "--steps", str(steps),
               "--new-tokens", str(new_tokens), "--threads", str(threads), "--result", str(result)]  # fmt: skip
        subprocess.run(cmd, check=True)
        return json.loads(result.read_text())


def _table(size: dict, ours: dict, trl: dict, args) -> str:
    def row(name, d, key):
        return f"| {name} | " + " | ".join(f"{s.get(key, 0.0):.1f}" for s in d["steps"]) + " |"

    lines = [f"# One RL step: ours (BPO) vs TRL GRPOTrainer, CPU ({time.strftime('%Y-%m-%d %H:%M')})", "",
             f"Machine: {platform.machine()}, {_cpus()} CPUs; torch threads {args.threads}; "
             f"model: random Qwen2.5-VL, {size['parameters'] / 1e6:.1f}M parameters (text hidden {size['hidden']}, "
             f"{size['layers']} layers, vocab {size['vocab']}, tied), {size['image']}x{size['image']} images; "
             f"4 prompts x 8 rollouts, {args.new_tokens} new tokens, T=1, 8 x 4 accumulation, fp32. "
             f"Command: `python bench/step_vs_trl.py --size {args.size} --steps {args.steps} "
             f"--new-tokens {args.new_tokens} --threads {args.threads}`. Other load: {args.load}.", "",
             "CPU-seconds per step (columns: steps 1..n)", "", "| phase | " + " | ".join(
                 f"step {i + 1}" for i in range(len(ours["steps"]))) + " |",
             "|---|" + "---|" * len(ours["steps"])]  # fmt: skip
    for phase in ("generation", "scoring", "update", "total"):
        lines.append(row(f"ours {phase}", ours, phase))
    for phase in ("generation", "update", "total"):
        lines.append(row(f"TRL {phase}", trl, phase))
    last = lambda d: d["steps"][-1]["total"]  # noqa: E731
    lines += ["", f"Last step: ours / TRL CPU-seconds = **{last(ours) / last(trl):.2f}x**; peak RSS ours "
              f"{ours['peak_rss_gib']:.2f} GiB (with the checkpoint save) vs TRL {trl['peak_rss_gib']:.2f} GiB "
              f"= **{ours['peak_rss_gib'] / trl['peak_rss_gib']:.2f}x**; our checkpoint "
              f"{ours['checkpoint_bytes'] / 2**20:.0f} MiB."]  # fmt: skip
    return "\n".join(lines) + "\n"


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=tuple(SIZES), default="tiny")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--load", default="none stated", help="what else ran (for the table)")
    p.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    p.add_argument("--side", choices=("ours", "trl"), help=argparse.SUPPRESS)
    p.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        import torch

        torch.set_num_threads(args.threads)
        with tempfile.TemporaryDirectory() as tmp:
            run = run_ours if args.side == "ours" else run_trl
            args.result.write_text(json.dumps(run(args.folder, args.steps, args.new_tokens, Path(tmp) / "out")))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        folder.mkdir()
        build(folder, args.size, 4)
        size = json.loads((folder / "size.json").read_text())
        ours = _side("ours", folder, args.steps, args.new_tokens, args.threads)
        trl = _side("trl", folder, args.steps, args.new_tokens, args.threads)
    table = _table(size, ours, trl, args)
    print(table)
    if args.out:
        args.out.write_text(table)


if __name__ == "__main__":
    main()
