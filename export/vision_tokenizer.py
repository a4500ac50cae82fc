"""`vision_tokenizer`: one source image -> VQ codebook ids (GLM-Image vision encoder + VQ).

Image-to-image only: the ids replace the prompt's `<|image|>` placeholders (in order) and, upsampled
2x nearest, become the DiT's condition prior ids.

Input contract (exactly the checkpoint image processor's output for ONE image):
  pixel_values    float32 [num_patches, C*p*p]  resized (smart_resize: the image is halved, then
                                                rounded to multiples of patch*merge), rescaled,
                                                normalised, cut into p x p patches, each flattened
                                                as (C, p, p), patches row-major over the grid
                                                (block-major over merge x merge blocks if merge > 1)
  image_grid_thw  int64   [1, 3]                (1, grid_h, grid_w), grid_h * grid_w = num_patches
Output:
  image_ids       int64   [num_patches]         codebook ids in the same order, equal to
                                                get_image_tokens(get_image_features(...).pooler_output)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.export import Dim

from glm_image_onnx.models.ar_wrappers import BasicVisionTokenizer, VisionTokenizer
from glm_image_onnx.targets import TARGETS, Target
from glm_image_onnx.export.graph import GraphSpec

NAME = "vision_tokenizer"
_EXAMPLE_GRID = (4, 6)  # non-square, both >= 2 so that nothing is specialised


def vision_sizes(model: Any) -> dict[str, Any]:
    vc = model.config.vision_config
    return {
        "patch_size": int(vc.patch_size),
        "in_channels": int(vc.in_channels),
        "patch_dim": int(vc.in_channels * vc.patch_size * vc.patch_size),
        "spatial_merge_size": int(vc.spatial_merge_size),
        "vision_hidden_size": int(vc.hidden_size),
        "codebook_size": int(model.config.vq_config.num_embeddings),
    }


def random_inputs(sizes: dict[str, Any], grid_h: int, grid_w: int, gen: torch.Generator
                  ) -> dict[str, torch.Tensor]:
    n = grid_h * grid_w
    return {
        # Normalised pixels are roughly unit-scale.
        "pixel_values": torch.randn(n, sizes["patch_dim"], generator=gen),
        "image_grid_thw": torch.tensor([[1, grid_h, grid_w]], dtype=torch.long),
    }


def graph_specs(model: Any, checkpoint_dir: Path, target: Target = TARGETS["cpu"]) -> list[GraphSpec]:
    sizes = vision_sizes(model)
    # GridSample and Einsum have no CANN kernel: a static-shapes target gets them as basic ops.
    module = (BasicVisionTokenizer if target.static_shapes else VisionTokenizer)(model).eval()
    m = sizes["spatial_merge_size"]
    example = random_inputs(sizes, _EXAMPLE_GRID[0] * m, _EXAMPLE_GRID[1] * m, torch.Generator().manual_seed(4321))
    dynamic_shapes = {
        "pixel_values": {0: Dim("num_patches", min=1, max=1 << 20)},
        "image_grid_thw": None,
    }

    def verify_inputs(gen: torch.Generator) -> list[dict[str, torch.Tensor]]:
        # Non-square grids in both orientations, a square one and a one-row strip.
        grids = [(6, 10), (14, 4), (8, 8), (1, 6)]
        return [random_inputs(sizes, h * m, w * m, gen) for h, w in grids]

    config = dict(sizes)  # the preprocessing settings are the processor's file (manifest.Layout)
    return [GraphSpec(
        name=NAME,
        module=module,
        example_inputs=example,
        dynamic_shapes=dynamic_shapes,
        output_names=["image_ids"],
        verify_inputs=verify_inputs,
        description=("GLM-Image vision encoder + VQ for one source image: the image processor's "
                     "pixel_values [num_patches, C*p*p] and image_grid_thw [1,3] for that image -> "
                     "codebook ids [num_patches] (grid row-major), as get_image_features + get_image_tokens."),
        config=config,
    )]
