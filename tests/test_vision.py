"""ImageEncoder: the fixed-size path equals the tiny model's own, and with a checkpoint's image processor
(AnyRes at native size) the placeholder counts are the model's own feature counts: transformers' padded forward
accepts the prompts (it checks placeholders against features) and the packed SFT loss equals it."""

import json
import subprocess
import sys

import pytest
import torch

from r4b_fast.modes import Mode
from r4b_fast.training.annealing import encode_sft_batch, sft_loss
from r4b_fast.training.task import IMAGE_TOKEN, build_tokenizer, sample_items
from r4b_fast.training.tiny_model import build_tiny_r4b, image_embeddings, num_image_tokens
from r4b_fast.training.vision import ImageEncoder

PINPOINTS = [[16, 16], [16, 32], [32, 16], [32, 32]]


@pytest.fixture(scope="module")
def anyres_dir(tmp_path_factory):
    """A tiny LLaVA-OneVision + Qwen3 with four AnyRes grids and a saved image processor (normalising, tiling)."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen3Config,
        SiglipVisionConfig,
    )
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    tok = build_tokenizer()
    text = Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                       tie_word_embeddings=True, pad_token_id=tok.pad_token_id)  # fmt: skip
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=16, patch_size=8)  # fmt: skip
    config = LlavaOnevisionConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                  image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
                                  vision_feature_select_strategy="full", vision_feature_layer=-1,
                                  image_grid_pinpoints=PINPOINTS, vision_aspect_ratio="anyres_max_9",
                                  tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration(config)
    processor = LlavaOnevisionImageProcessorPil(size={"height": 16, "width": 16}, image_grid_pinpoints=PINPOINTS,
                                                do_pad=True)  # fmt: skip
    path = tmp_path_factory.mktemp("anyres")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def test_fixed_size_path_is_the_tiny_models_own():
    tok = build_tokenizer()
    model = build_tiny_r4b(tok, hidden_size=32, layers=1)
    enc = ImageEncoder.for_model(model, None)
    items = sample_items(3, 0)
    got = torch.cat(enc.features(model, [it.image() for it in items]))
    torch.testing.assert_close(got, image_embeddings(model, torch.stack([it.image() for it in items])))
    assert enc.count(model, items[0]) == num_image_tokens(model)
    big = torch.rand(3, 40, 24)  # any size is resized to the tower's 16x16
    assert enc.features(model, [big])[0].shape[0] == num_image_tokens(model)


def test_image_processor_counts_are_the_models_and_the_packed_loss_equals_hf(anyres_dir):
    from transformers import AutoTokenizer, LlavaOnevisionForConditionalGeneration

    model = LlavaOnevisionForConditionalGeneration.from_pretrained(str(anyres_dir))
    tok = AutoTokenizer.from_pretrained(str(anyres_dir))
    enc = ImageEncoder.for_model(model, anyres_dir)
    assert enc.image_processor is not None

    class Row:  # a data row: question, answer, steps, image() at its own size
        def __init__(self, item, image):
            self.question, self.answer, self.steps, self._image = item.question, item.answer, item.steps, image

        def image(self):
            return self._image

    gen = torch.Generator().manual_seed(1)
    sizes = [(16, 16), (20, 40), (40, 18), (32, 32)]
    rows = [Row(it, torch.rand(3, h, w, generator=gen)) for it, (h, w) in zip(sample_items(4, 0), sizes)]
    counts = [enc.count(model, r) for r in rows]
    assert len(set(counts)) >= 3, counts  # AnyRes: the count depends on the image size
    assert counts == [f.shape[0] for f in enc.features(model, [r.image() for r in rows])]

    modes = [Mode.THINK, Mode.NO_THINK, Mode.THINK, Mode.NO_THINK]
    input_ids, mask, labels, images = encode_sft_batch(tok, rows, modes, counts)
    assert ((input_ids == model.config.image_token_index).sum(1)).tolist() == counts
    loss, n_tokens = sft_loss(model, input_ids, mask, labels, images, encoder=enc)
    # transformers' own padded forward on the processor's pixels: raises if placeholders and features disagree
    pixel_values, image_sizes = enc.pixel_inputs(images, "cpu", torch.float32)
    logits = model(input_ids=input_ids, attention_mask=mask, pixel_values=pixel_values, image_sizes=image_sizes).logits
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    assert n_tokens == int((labels[:, 1:] != -100).sum())


def test_loops_on_a_checkpoint_with_an_image_processor(anyres_dir, tmp_path):
    """Annealing then BPO on own rows of mixed image sizes, from a folder with an image processor: both run, and
    the processor is saved with the trained model."""
    from PIL import Image

    rows = []
    for i, it in enumerate(sample_items(10, seed=5, hard_fraction=0.5)):
        h, w = [(16, 16), (20, 40), (40, 18), (32, 32), (24, 24)][i % 5]
        img = (it.image()[None] * 255).round().to(torch.uint8)
        img = torch.nn.functional.interpolate(img.float(), size=(h, w)).round().to(torch.uint8)[0]
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(tmp_path / f"img{i}.png")
        row = {"image": f"img{i}.png", "question": it.question, "answer": it.answer, "hard": it.hard,
               "mode": "think" if it.hard else "no_think"}  # fmt: skip
        if it.hard:
            row["thought"] = it.steps
        rows.append(row)
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def run(module, *args):
        return subprocess.run([sys.executable, "-m", f"r4b_fast.training.{module}", *args], capture_output=True,
                              text=True, timeout=600)  # fmt: skip

    sft = run("annealing", "--model", str(anyres_dir), "--dataset", str(tmp_path / "rows.jsonl"), "--steps", "2",
              "--batch-size", "4", "--eval-items", "0", "--warmup", "1", "--output-dir", str(tmp_path / "sft"))
    assert sft.returncode == 0, sft.stderr[-3000:]
    annealed = tmp_path / "sft" / "model"
    assert (annealed / "preprocessor_config.json").exists()
    rl = run("bpo", "--model", str(annealed), "--dataset", str(tmp_path / "rows.jsonl"), "--steps", "1",
             "--prompts", "2", "--g", "1", "--max-new-tokens", "8", "--output-dir", str(tmp_path / "bpo"))
    assert rl.returncode == 0, rl.stderr[-3000:]
    assert (tmp_path / "bpo" / "model" / "preprocessor_config.json").exists()
