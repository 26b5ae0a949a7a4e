"""R-4B's chat format: its special tokens, the chat template with the ``thinking_mode`` switch
(``apply_chat_template(..., thinking_mode="auto" | "long" | "short")``), what each mode puts after the assistant
header, and :func:`template_mode_prefixes` (those prefixes rendered from a tokenizer's own template). No transformers
import: the integrations read these names cheaply."""

from __future__ import annotations

from r4b_fast.modes import Mode

IMAGE_TOKEN, THINK_OPEN, THINK_CLOSE = "<image>", "<think>", "</think>"
IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
ASSISTANT_HEADER = f"{IM_START}assistant\n"

# What R-4B's template puts after the assistant header for each ``thinking_mode`` (R-4B's documented strings).
THINKING_MODE_PREFIX = {
    "long": f"{THINK_OPEN}\n",  # thinking: the model writes its steps, then "\n</think>\n\n" and the answer
    "short": f"{THINK_OPEN}\n\n{THINK_CLOSE}\n\n",  # non-thinking: an empty think block, then the answer
    "auto": THINK_OPEN,  # the model decides: "\n" (think) or "\n\n</think>\n\n" (answer at once)
}
THINKING_MODES = tuple(THINKING_MODE_PREFIX)
THINKING_MODE_OF = {Mode.THINK: "long", Mode.NO_THINK: "short", Mode.AUTO: "auto"}
THINK_CLOSE_SEQUENCE = f"\n{THINK_CLOSE}\n\n"

# Written from R-4B's documented behaviour (the published file was not reachable here): Qwen3's ChatML turns,
# images as "<image>" placeholders (one per image item, expanded to the crop's tokens by the caller), and the
# generation prompt ends with the prefix of ``thinking_mode`` (default "auto"); an unknown mode is an error.
R4B_CHAT_TEMPLATE = (
    "{%- set mode = thinking_mode if thinking_mode is defined else 'auto' -%}"
    "{%- if mode not in ['auto', 'long', 'short'] -%}"
    "{{- raise_exception('thinking_mode must be auto, long or short, got ' ~ mode) -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{- '<image>\\n' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if mode == 'long' -%}{{- '<think>\\n' -}}"
    "{%- elif mode == 'short' -%}{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- else -%}{{- '<think>' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)



def template_mode_prefixes(tokenizer) -> dict[str, str]:
    """What the tokenizer's chat template writes after the assistant header for each ``thinking_mode``:
    ``{"auto": ..., "long": ..., "short": ...}``, rendered from the template itself (not hard-coded).

    Example:
        >>> template_mode_prefixes(tok)["short"]   # doctest: +SKIP
        '<think>\\n\\n</think>\\n\\n'
    """
    probe = [{"role": "user", "content": "x"}]
    base = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=False)
    out = {}
    for mode in THINKING_MODES:
        text = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True, thinking_mode=mode)
        head = base + ASSISTANT_HEADER
        if not text.startswith(head):
            raise ValueError(f"tokenizer: its chat template does not open the assistant turn with {head!r}")
        out[mode] = text[len(head) :]
    return out

