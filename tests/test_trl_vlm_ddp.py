"""BPOTrainer on a tiny Qwen2.5-VL with images in two processes (``accelerate launch --multi_gpu --num_processes 2``
on a machine without GPUs: torchrun, gloo on the CPU; accelerate 1.16's ``--cpu`` launcher is single-process or
mpirun): each group's ``2g`` rollouts keep their ``g + g`` split across the ranks (one group of 4 per step: rank 0
the thinking half, rank 1 the other), and the advantages, decision targets, logged losses and updated weights (2 SGD
steps) equal a one-process run on the same data.

Generation is replaced by a replay of fixed completions (a function of each rollout's global position), so both
runs train on the same rollouts; everything else (TRL's sampler and split over ranks, reward gathering, BPO's
mixed-group advantages and decision targets, DDP's gradient averaging, the fused loss with images) is the real path.
This file is also the worker: ``python tests/test_trl_vlm_ddp.py OUT`` (one process) or under ``accelerate launch``.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(out: Path, processes: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{HERE}"}
    if processes == 1:
        cmd = [sys.executable, str(Path(__file__)), str(out)]
    else:
        # accelerate 1.16 sends "--cpu" to its single-process launcher (multi-CPU there means mpirun): "--multi_gpu"
        # is its torchrun launcher, which on a machine without GPUs (and use_cpu=True) runs gloo on the CPU
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), str(Path(__file__)), str(out)]  # fmt: skip
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


@pytest.mark.skipif(os.environ.get("R4B_FAST_SKIP_MULTIPROCESS") == "1", reason="R4B_FAST_SKIP_MULTIPROCESS=1")
def test_two_processes_equal_one(tmp_path):
    pytest.importorskip("trl")
    pytest.importorskip("accelerate")
    _run(tmp_path / "one", 1)
    _run(tmp_path / "two", 2)
    one = torch.load(tmp_path / "one" / "rank0.pt")
    two = [torch.load(tmp_path / "two" / f"rank{r}.pt") for r in range(2)]
    # TRL lays each group of 2g = 4 out over the ranks in a row: rank 0 holds the thinking half, rank 1 the other
    assert one["modes"] == ["think", "think", "no_think", "no_think"] * 2  # two steps of one group
    assert two[0]["modes"] == ["think", "think"] * 2 and two[1]["modes"] == ["no_think", "no_think"] * 2
    assert one["world"] == 1 and two[0]["world"] == two[1]["world"] == 2
    def merged(key):  # per step: rank 0's two rows, then rank 1's
        return torch.cat([torch.cat([two[0][key][2 * s : 2 * s + 2], two[1][key][2 * s : 2 * s + 2]])
                          for s in range(2)])  # fmt: skip

    torch.testing.assert_close(merged("advantages"), one["advantages"])
    assert (one["advantages"] != 0).any()
    torch.testing.assert_close(merged("decision_target"), one["decision_target"])
    assert two[0]["losses"] == pytest.approx(one["losses"], rel=1e-4, abs=1e-6)
    assert one["changed"] and set(one["changed"]) == set(two[0]["changed"])
    for name, p in one["weights"].items():
        torch.testing.assert_close(two[0]["weights"][name], p, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
        torch.testing.assert_close(two[1]["weights"][name], p, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------------- worker
def _worker(out: Path) -> None:
    from test_models import write_qwen25_vl
    from test_trl_vlm import SETTINGS, reward_fn, vlm_dataset

    from r4b_fast.integrations.trl import BPOConfig, BPOTrainer
    from r4b_fast.models import processor_for

    world = int(os.environ.get("WORLD_SIZE", "1"))
    model, tok, image_processor = write_qwen25_vl(None)  # seeded: the same weights on every rank
    model.generation_config.eos_token_id = tok.eos_token_id
    processor = processor_for(model.config, tokenizer=tok, image_processor=image_processor)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    record = {"modes": [], "advantages": [], "decision_target": []}

    class Replay(BPOTrainer):
        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
            offset = self.accelerator.process_index * len(prompt_ids)
            out = []
            for i in range(len(prompt_ids)):  # a function of the rollout's global position only
                gen = torch.Generator().manual_seed(1000 + offset + i)
                out.append(torch.randint(20, 200, (3 + (offset + i) % 4,), generator=gen).tolist())
            return out, None

        def _generate_and_score_completions(self, inputs):
            output = super()._generate_and_score_completions(inputs)
            record["modes"] += [x["bpo_mode"] for x in self._last_inputs]
            record["advantages"].append(output["advantages"].detach().clone())
            record["decision_target"].append(output["bpo_decision_target"].detach().clone())
            return output

        def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
            self._last_inputs = inputs
            return super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)

    # one group of 2g = 4 per step, straddling the ranks with 2 processes; SGD: the update is the averaged gradient
    # (Adam's g / sqrt(v) would magnify fp32 reduction-order noise in near-zero gradients)
    settings = dict(SETTINGS, output_dir=str(out / "run"), per_device_train_batch_size=4 // world, max_steps=2,
                    learning_rate=0.1, optim="sgd")  # fmt: skip
    trainer = Replay(model=model, reward_funcs=reward_fn(), args=BPOConfig(**settings),
                     train_dataset=vlm_dataset("qwen2_5_vl"), processing_class=processor)  # fmt: skip
    trainer.train()
    rank = trainer.accelerator.process_index
    trained = trainer.accelerator.unwrap_model(trainer.model)
    weights = {n: p.detach().clone() for n, p in trained.named_parameters()}
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"world": world, "modes": record["modes"], "advantages": torch.cat(record["advantages"]),
                "decision_target": torch.cat(record["decision_target"]), "losses": losses, "weights": weights,
                "changed": sorted(n for n in weights if not torch.equal(weights[n], before[n]))},
               out / f"rank{rank}.pt")  # fmt: skip


if __name__ == "__main__":
    sys.path[:0] = [str(ROOT), str(HERE)]
    _worker(Path(sys.argv[1]))
