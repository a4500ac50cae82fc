"""GraphSpec for the glyph encoder (ByT5 `T5EncoderModel`): glyph_encoder.

The host tokenises the quoted text (ByT5: bytes + 3, eos 1, pad 0), runs this graph, and keeps
the rows' unpadded positions (`last_hidden_state[attention_mask.bool()]`), as the pipeline does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.export import Dim

from glm_image_onnx.models.dit_wrappers import GlyphEncoder
from glm_image_onnx.targets import TARGETS, Target
from glm_image_onnx.export.graph import GraphSpec

# (batch, sequence length): none is the export example's (2, 7).
_VERIFY_SHAPES = [(1, 1), (2, 12), (1, 33), (3, 5)]


def _ids_and_mask(batch: int, seq: int, vocab: int, pad_id: int,
                  gen: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Random byte ids; rows after the first are right-padded to a random length >= 1."""
    ids = torch.randint(3, min(vocab, 259), (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    for b in range(1, batch):
        keep = int(torch.randint(1, seq + 1, (1,), generator=gen))
        mask[b, keep:] = 0
    ids = ids.masked_fill(mask == 0, pad_id)
    return {"input_ids": ids, "attention_mask": mask}


def graph_specs(model: Any, checkpoint_dir: Path, target: Target = TARGETS["cpu"]) -> list[GraphSpec]:
    """Spec for the loaded T5EncoderModel (fp32, eval).

    sdpa attention fails at dynamo decomposition; if the model was not loaded with
    `attn_implementation="eager"`, this switches the (shared) model to eager in place.
    """
    model = model.eval()
    if model.config._attn_implementation != "eager":
        model.set_attn_implementation("eager")
    c = model.config
    pad_id = int(c.pad_token_id if c.pad_token_id is not None else 0)
    cfg = {
        "d_model": int(c.d_model),
        "num_layers": int(c.num_layers),
        "vocab_size": int(c.vocab_size),
        "pad_token_id": pad_id,
        "eos_token_id": int(c.eos_token_id) if c.eos_token_id is not None else 1,
    }
    batch, seq = Dim("batch"), Dim("seq")
    return [GraphSpec(
        name="glyph_encoder",
        module=GlyphEncoder(model).eval(),
        example_inputs=_ids_and_mask(2, 7, cfg["vocab_size"], pad_id, torch.Generator().manual_seed(0)),
        dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
        output_names=["last_hidden_state"],
        verify_inputs=lambda gen: [_ids_and_mask(b, s, cfg["vocab_size"], pad_id, gen)
                                   for b, s in _VERIFY_SHAPES],
        description="ByT5 glyph encoder: byte ids + attention mask -> last_hidden_state; keep the "
                    "positions where attention_mask is 1.",
        config=cfg,
    )]
