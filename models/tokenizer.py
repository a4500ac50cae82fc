"""Offline tokenizers and processor for a random checkpoint.

The real GLM-Image tokenizer is a 168k GLM vocabulary; a random checkpoint gets one built with
`tokenizers` alone (no hub access): `<|dit_token_N|>` for every image-vocabulary id N (so N is both
the token id and the codebook index), byte-level tokens for any text, and the chat/grid specials the
processor expects. A `published_layout` preset gets the published ids as well: the GLM-4 specials
shifted by the image vocabulary (`<|endoftext|>` 167841 ... `<|image|>` 167855) in a 168064-token
vocabulary, the gaps filled with unreachable placeholder tokens.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from glm_image_onnx.models.presets import Preset

SPECIAL_TOKENS = ["<|endoftext|>", "[gMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                  "<|assistant|>", "<|image|>"]


# The published specials in id order, from <|endoftext|> = 167841 (real-configs.md).
PUBLISHED_SPECIALS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>",
                      "<|user|>", "<|assistant|>", "<|observation|>", "<|begin_of_image|>",
                      "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>", "<|image|>", "<|video|>"]
PUBLISHED_ENDOFTEXT_ID = 167841


def chat_template(preset: Preset) -> str:
    """GLM-style chat template. A source image is `<image start><|image|><image end>`, the start/end
    being the image-vocabulary tokens `image_start_token_id`/`image_end_token_id`: that is how
    `get_rope_index` finds complete source images (and gives them 2D positions)."""
    start = f"<|dit_token_{preset.ar.codebook_size}|>"
    end = f"<|dit_token_{preset.ar.codebook_size + 1}|>"
    if preset.published_layout:  # the published template adds no role tokens
        return (
            "{% for message in messages %}"
            "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
            "{% for item in message['content'] %}"
            f"{{% if item['type'] == 'image' %}}{start}<|image|>{end}"
            "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
            "{% endfor %}{% endif %}{% endfor %}"
        )
    return (
        "[gMASK]<sop>{% for message in messages %}<|{{ message['role'] }}|>\n"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for item in message['content'] %}"
        f"{{% if item['type'] == 'image' %}}{start}<|image|>{end}"
        "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
        "{% endfor %}{% endif %}{% endfor %}"
        "{% if add_generation_prompt is not defined or add_generation_prompt %}<|assistant|>\n{% endif %}"
    )


def _byte_alphabet() -> list[str]:
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


@lru_cache(maxsize=8)
def _vocabulary(vision_vocab_size: int, published_size: int) -> tuple[tuple[str, int], ...]:
    tokens = [f"<|dit_token_{i}|>" for i in range(vision_vocab_size)] + _byte_alphabet()
    if not published_size:
        return tuple((t, i) for i, t in enumerate(tokens + SPECIAL_TOKENS))
    # Placeholders are multi-character tokens with no merges: no text ever encodes to them.
    tokens += [f"<|unused_{i}|>" for i in range(len(tokens), PUBLISHED_ENDOFTEXT_ID)] + PUBLISHED_SPECIALS
    tokens += [f"<|unused_{i}|>" for i in range(len(tokens), published_size)]
    return tuple((t, i) for i, t in enumerate(tokens))


def special_tokens(preset: Preset) -> list[str]:
    return PUBLISHED_SPECIALS if preset.published_layout else SPECIAL_TOKENS


def vocabulary(preset: Preset) -> dict[str, int]:
    published = preset.ar.vision_vocab_size + preset.ar.text_vocab_extra if preset.published_layout else 0
    return dict(_vocabulary(preset.ar.vision_vocab_size, published))


def build_ar_tokenizer(preset: Preset) -> Any:
    """A `PreTrainedTokenizerFast` with the GLM-Image special-token attributes."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = vocabulary(preset)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    specials = [t for t in vocab if t.startswith("<|dit_token_")] + special_tokens(preset)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    start = f"<|dit_token_{preset.ar.codebook_size}|>"
    end = f"<|dit_token_{preset.ar.codebook_size + 1}|>"
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=start,
        eos_token=end,
        pad_token="<|endoftext|>",
        padding_side="left",
        extra_special_tokens={"image_token": "<|image|>", "grid_bos_token": "<sop>",
                              "grid_eos_token": "<eop>"},
        chat_template=chat_template(preset),
    )


def build_processor(preset: Preset) -> Any:
    from transformers import GlmImageImageProcessor, GlmImageProcessor

    image_processor = GlmImageImageProcessor(
        patch_size=preset.ar.vision_patch,
        temporal_patch_size=1,
        merge_size=1,
        # The published processor: 512x512 .. 2048x2048, mean = std = 0.5. The toy presets go lower.
        min_pixels=512 * 512 if preset.published_layout else 32 * 32,
        max_pixels=2048 * 2048,
        **({"image_mean": [0.5] * 3, "image_std": [0.5] * 3} if preset.published_layout else {}),
    )
    return GlmImageProcessor(image_processor=image_processor, tokenizer=build_ar_tokenizer(preset),
                             chat_template=chat_template(preset))


def build_glyph_tokenizer() -> Any:
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer()


def save_tokenizers(preset: Preset, root: Path) -> None:
    build_processor(preset).save_pretrained(root / "processor")
    build_glyph_tokenizer().save_pretrained(root / "tokenizer")
