"""Models and prompts of the generation benchmarks (bench/test_generation.py, bench/generation_side_by_side.py).

A Qwen2.5-VL from transformers' config classes (nothing downloaded), random weights: text hidden 512, 8 layers,
8 heads (2 KV heads), MLP 2560, vocabulary 151936, tied embeddings: 114M parameters, of which the LM head / embedding
is 78M (as small Qwen models: decoding is LM-head bound). Prompts of ~110 tokens: text around a 224x224 image's
64 merged patch tokens (14-pixel patches, 2x2 merge), with Qwen2.5-VL's M-RoPE positions (the image's tokens on a
(t, h, w) grid); the image features are random vectors in place of the vision tower's (the engine does not run it).

A random model never samples eos from a 151936-token vocabulary, so the LM head gets a bias on eos (``eos_bias``):
rollouts end after a geometric number of tokens, as a task's answers do (BPO's non-thinking half much sooner than
its thinking half, whose ``min_think_tokens`` bans eos inside the block).
"""

from __future__ import annotations

import torch

VOCAB = 151936
EOS, PAD, IMAGE = 151645, 151643, 151655  # Qwen2.5-VL's <|im_end|>, <|endoftext|>, <|image_pad|>
THINK_START, THINK_END = 151667, 151668  # <think>, </think> (Qwen3's ids; any unused ids would do)
NL, NL2 = 198, 271  # "\n", "\n\n"
OPEN, NO_THINK, CLOSE = [THINK_START, NL], [THINK_START, NL2, THINK_END, NL2], [NL, THINK_END, NL2]
IMAGE_TOKENS = 64  # 224x224, 14-pixel patches (16x16), 2x2 merge: an 8x8 grid


def qwen25_vl(hidden=512, layers=8, heads=8, kv_heads=2, intermediate=2560, vocab=VOCAB, eos_bias=0.0, seed=0):
    """The benchmark's Qwen2.5-VL (eval mode, fp32); ``eos_bias`` > 0 adds that logit to eos (a biased LM head
    sharing the tied weight)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    half = hidden // heads // 2  # M-RoPE sections (t, h, w) over the head's rotary half
    mrope = {"type": "mrope", "mrope_section": [half // 2, half // 4, half // 4]}
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=4096, rope_scaling=mrope),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[0]),
        tie_word_embeddings=True, image_token_id=IMAGE, eos_token_id=EOS, pad_token_id=PAD,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    if eos_bias:
        head = torch.nn.Linear(hidden, vocab, bias=True)
        head.weight = model.lm_head.weight  # shared: the same GEMM
        with torch.no_grad():
            head.bias.zero_()
            head.bias[EOS] = eos_bias
        model.lm_head = head
    model.generation_config.eos_token_id = EOS
    model.generation_config.pad_token_id = PAD
    return model


def prompts(n: int, length: int = 110, image: bool = True, seed: int = 0) -> list[list[int]]:
    """``n`` prompts of ``length +- 8`` token ids: text (ids below 150000), then an image's 64 placeholders, then
    text (without an image: text only)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = length + int(torch.randint(-8, 9, (1,), generator=g))
        ids = torch.randint(0, 150000, (k,), generator=g).tolist()
        if image:
            ids[8 : 8 + IMAGE_TOKENS] = [IMAGE] * IMAGE_TOKENS
        out.append(ids)
    return out


def prompt_inputs(model, prompt_ids: list[list[int]], seed: int = 0):
    """``PromptInputs`` for the engine: token embeddings with random image features over the placeholders, and
    Qwen2.5-VL's M-RoPE positions (text: t = h = w; the image: an 8x8 (h, w) grid after the text before it)."""
    from r4b_fast.training.rollout import PromptInputs

    g = torch.Generator().manual_seed(seed)
    embed = model.get_input_embeddings()
    side = int(IMAGE_TOKENS**0.5)
    embeds, positions = [], []
    with torch.no_grad():
        for ids in prompt_ids:
            t = torch.tensor(ids)
            e = embed(t).clone()
            img = t == IMAGE
            e[img] = torch.randn(int(img.sum()), e.shape[1], generator=g) * 0.02
            pos = torch.zeros(3, len(ids), dtype=torch.int64)
            nxt, i = 0, 0
            while i < len(ids):
                if ids[i] == IMAGE:
                    k = torch.arange(IMAGE_TOKENS)
                    pos[0, i : i + IMAGE_TOKENS] = nxt
                    pos[1, i : i + IMAGE_TOKENS] = nxt + k // side
                    pos[2, i : i + IMAGE_TOKENS] = nxt + k % side
                    nxt += side
                    i += IMAGE_TOKENS
                else:
                    pos[:, i] = nxt
                    nxt += 1
                    i += 1
            embeds.append(e)
            positions.append(pos)
    return PromptInputs(embeds, positions=positions)


def engine_kwargs(max_new_tokens: int, strict: bool, temperature: float = 1.0) -> dict:
    """``generate_rollouts``' mode arguments (BPO's strict modes when ``strict``: min_think_tokens 16, no_reopen,
    strict_auto)."""
    kw = dict(think_open_ids=OPEN, no_think_ids=NO_THINK, think_close_ids=CLOSE, auto_ids=[THINK_START],
              eos_id=EOS, pad_id=PAD, think_start_id=THINK_START, think_end_id=THINK_END,
              max_new_tokens=max_new_tokens, temperature=temperature)  # fmt: skip
    if strict:
        kw.update(min_think_tokens=16, no_reopen=True, strict_auto=True)
    return kw


def generate_call(model, ids: list[list[int]], N: int, per_prompt: int = 8):
    """``fn() -> emitted tokens``: transformers' ``model.generate`` sampling ``per_prompt`` sequences per prompt
    (temperature 1, no top-k / top-p), left-padded prompts."""
    L = max(map(len, ids))
    input_ids = torch.tensor([[PAD] * (L - len(p)) + p for p in ids])
    attn = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in ids])

    @torch.no_grad()
    def fn():
        torch.manual_seed(0)
        out = model.generate(input_ids=input_ids, attention_mask=attn, do_sample=True, temperature=1.0, top_k=0,
                             top_p=1.0, max_new_tokens=N, num_return_sequences=per_prompt)  # fmt: skip
        return int((out[:, L:] != PAD).sum())

    return fn
