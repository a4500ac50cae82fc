"""Image pre/post-processing without torch.

- `ImageProcessor`: transformers' GLM-Image image processor for the AR model's source images.
  Without torchvision, transformers itself falls back to the PIL backend (`GlmImageImageProcessorPil`),
  which is the one reproduced here (PIL resize on uint8, then float64 rescale, float32 normalize).
- `vae_preprocess` / `vae_postprocess` / `to_pil`: diffusers' `VaeImageProcessor` as the pipeline
  builds it (`VaeImageProcessor(vae_scale_factor=...)`: lanczos resize, no RGB conversion, [-1, 1]).
- `upsample_prior_ids`: the pipeline's `_upsample_token_ids` (nearest on the token grid).
- `tiled_decode` / `tiled_encode`: diffusers' `AutoencoderKL` tiled VAE, around a one-tile session call.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

# OpenAI CLIP mean/std: the GLM-Image image processor's class defaults.
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def smart_resize(height: int, width: int, factor: int = 16, min_pixels: int = 512 * 512,
                 max_pixels: int = 2048 * 2048) -> tuple[int, int]:
    """transformers' GLM-Image `smart_resize`, verbatim: note it halves both sides before rounding
    to `factor`, so a source image is encoded at about half its resolution."""
    if height < factor or width < factor:
        raise ValueError(f"height:{height} or width:{width} must be larger than factor:{factor}")
    if max(height, width) / min(height, width) > 4:
        raise ValueError(f"absolute aspect ratio must be smaller than 4, got {max(height, width) / min(height, width)}")
    shortest_edge = int(round(math.sqrt(min_pixels)))
    longest_edge = int(round(math.sqrt(max_pixels)))
    min_side, max_side = min(height, width), max(height, width)
    scale = 1.0
    if min_side < shortest_edge:
        scale = shortest_edge / min_side
    if max_side * scale > longest_edge:
        scale = longest_edge / max_side
    height, width = height // 2, width // 2
    h_bar = max(factor, int(round(height * scale / factor)) * factor)  # python round: half to even
    w_bar = max(factor, int(round(width * scale / factor)) * factor)
    if max(h_bar, w_bar) > longest_edge:
        beta = max(h_bar, w_bar) / longest_edge
        h_bar = max(factor, int(math.floor((h_bar / beta) / factor)) * factor)
        w_bar = max(factor, int(math.floor((w_bar / beta) / factor)) * factor)
    return h_bar, w_bar


def _to_rgb(image: Image.Image) -> Image.Image:
    # transformers composites transparency onto white (diffusers' VAE path does not: see vae_preprocess)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


@dataclass(frozen=True)
class ImageProcessor:
    """`GlmImageImageProcessorPil` with the processor config's settings."""

    do_convert_rgb: bool = True
    do_resize: bool = True
    resample: int = 3  # PIL bicubic
    min_pixels: int = 56 * 56  # `size["shortest_edge"]`: despite the name, a pixel count
    max_pixels: int = 28 * 28 * 1280  # `size["longest_edge"]`
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = _CLIP_MEAN
    image_std: tuple[float, ...] = _CLIP_STD
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "ImageProcessor":
        """From `processor_config.json` (or its `image_processor` entry / a preprocessor_config.json)."""
        cfg = cfg.get("image_processor", cfg)
        size = dict(cfg.get("size") or {})
        kw: dict[str, Any] = {k: cfg[k] for k in ("do_convert_rgb", "do_resize", "resample", "do_rescale",
                                                   "rescale_factor", "do_normalize", "patch_size",
                                                   "temporal_patch_size", "merge_size") if cfg.get(k) is not None}
        for name, key in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
            value = cfg.get(name, size.get(key, size.get(name)))
            if value is not None:
                kw[name] = int(value)
        for name in ("image_mean", "image_std"):
            if cfg.get(name) is not None:
                v = cfg[name]
                kw[name] = tuple(v) if isinstance(v, (list, tuple)) else (float(v),) * 3
        return cls(**kw)

    @classmethod
    def from_file(cls, path: Path | str) -> "ImageProcessor":
        """From a processor_config.json (a package's: manifest `Layout.image_processor`)."""
        return cls.from_config(json.loads(Path(path).read_text()))

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """(grid_h, grid_w) in patches for an input of this pixel size."""
        if self.do_resize:
            height, width = smart_resize(height, width, self.patch_size * self.merge_size,
                                         self.min_pixels, self.max_pixels)
        return height // self.patch_size, width // self.patch_size

    def preprocess_one(self, image: Image.Image) -> tuple[np.ndarray, tuple[int, int]]:
        """One image -> (patches float32 [grid_h * grid_w, C * t * p * p], (grid_h, grid_w))."""
        if self.do_convert_rgb:
            image = _to_rgb(image)
        if self.do_resize:
            h, w = smart_resize(image.height, image.width, self.patch_size * self.merge_size,
                                self.min_pixels, self.max_pixels)
            image = image.resize((w, h), resample=self.resample)  # on uint8, like transformers' PIL path
        arr = np.array(image)
        arr = arr[None] if arr.ndim == 2 else np.moveaxis(arr, -1, 0)  # CHW
        if self.do_rescale:
            arr = (arr.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            if not np.issubdtype(arr.dtype, np.floating):
                arr = arr.astype(np.float32)
            mean = np.array(self.image_mean, dtype=arr.dtype)
            std = np.array(self.image_std, dtype=arr.dtype)
            arr = ((arr.T - mean) / std).T
        return self._patchify(np.asarray(arr, dtype=np.float32))

    def _patchify(self, image: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        c, h, w = image.shape
        gh, gw = h // p, w // p
        patches = image.reshape(c, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
        # a still image repeats itself over the temporal patch
        patches = np.broadcast_to(patches[:, :, :, :, :, None], (*patches.shape[:5], t, *patches.shape[5:]))
        return patches.reshape(gh * gw, c * t * p * p), (gh, gw)

    def __call__(self, images: list[Image.Image]) -> dict[str, np.ndarray]:
        """{"pixel_values": float32 [sum of patches, C*t*p*p], "image_grid_thw": int64 [n, 3]}."""
        out = [self.preprocess_one(im) for im in images]
        return {"pixel_values": np.concatenate([o[0] for o in out], axis=0),
                "image_grid_thw": np.array([[1, gh, gw] for _, (gh, gw) in out], dtype=np.int64)}


# ---------------------------------------------------------------------------------- VAE side
_RESAMPLE = {"linear": Image.Resampling.BILINEAR, "bilinear": Image.Resampling.BILINEAR,
             "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
             "nearest": Image.Resampling.NEAREST}


def condition_size(image: Image.Image, vae_scale_factor: int = 8, patch_size: int = 2) -> tuple[int, int]:
    """The pipeline's size for a condition image: (h, w) floored to vae_scale_factor * patch_size."""
    multiple = vae_scale_factor * patch_size
    return (image.height // multiple) * multiple, (image.width // multiple) * multiple


def vae_preprocess(image: Image.Image, height: int, width: int, vae_scale_factor: int = 8,
                   resample: str = "lanczos") -> np.ndarray:
    """`VaeImageProcessor(vae_scale_factor).preprocess(image, height, width)` -> float32 [1, C, H, W] in [-1, 1].

    As the pipeline builds it, the processor does not convert to RGB: an RGBA or L image keeps its
    4 or 1 channels (convert it first if the VAE wants 3).
    """
    height, width = height - height % vae_scale_factor, width - width % vae_scale_factor
    image = image.resize((width, height), resample=_RESAMPLE[resample], reducing_gap=None)
    arr = np.array(image).astype(np.float32) / 255.0
    arr = arr[..., None] if arr.ndim == 2 else arr
    return 2.0 * arr.transpose(2, 0, 1)[None] - 1.0


def vae_postprocess(decoded: np.ndarray) -> np.ndarray:
    """The VAE output [B, C, H, W] -> float32 [B, H, W, C] in [0, 1] (`postprocess(output_type="np")`).

    Denormalises in the input's dtype, then casts to float32, as diffusers does.
    """
    decoded = np.asarray(decoded)
    images = np.clip(decoded * 0.5 + 0.5, 0, 1)
    return images.transpose(0, 2, 3, 1).astype(np.float32)


def to_pil(images: np.ndarray) -> list[Image.Image]:
    """`VaeImageProcessor.numpy_to_pil`: [B, H, W, C] (or [H, W, C]) in [0, 1] -> uint8 PIL images."""
    images = images[None] if images.ndim == 3 else images
    images = (images * 255).round().astype("uint8")
    if images.shape[-1] == 1:
        return [Image.fromarray(im[..., 0]) for im in images]  # 2-D uint8 -> mode "L"
    return [Image.fromarray(im) for im in images]


def upsample_prior_ids(ids: np.ndarray, h: int, w: int, factor: int) -> np.ndarray:
    """`_upsample_token_ids`: an h*w token grid -> int64 [1, factor^2*h*w], each token repeated
    factor x factor (GLM-Image: 2, manifest `Grid.prior_upsample`).

    The pipeline goes through float32 (exact for ids < 2**24, i.e. any codebook index).
    """
    grid = np.asarray(ids, dtype=np.int64).reshape(h, w)
    return grid.repeat(factor, axis=0).repeat(factor, axis=1).reshape(1, -1)


# ------------------------------------------------------------------------------ tiled VAE
TileRun = Callable[[np.ndarray], np.ndarray]
"""run(tile) -> the graph's output for that tile (one session call)."""


def _blend(a: np.ndarray, b: np.ndarray, extent: int, axis: int) -> None:
    """diffusers' `blend_v` (axis 2) / `blend_h` (axis 3), in place on `b`: b's first rows (cols)
    ramp linearly from a's last ones to b's own. The weights are y / k in double, then float32, as
    torch does with a python scalar, so each element is the same float32 sum as diffusers'."""
    k = min(a.shape[axis], b.shape[axis], extent)
    if k <= 0:
        return
    ramp = np.arange(k) / k
    shape = [1] * b.ndim
    shape[axis] = k
    w_b, w_a = ramp.astype(np.float32).reshape(shape), (1 - ramp).astype(np.float32).reshape(shape)
    head = [slice(None)] * b.ndim
    tail = list(head)
    head[axis], tail[axis] = slice(0, k), slice(a.shape[axis] - k, None)
    b[tuple(head)] = a[tuple(tail)] * w_a + b[tuple(head)] * w_b


def _tiled(run: TileRun, x: np.ndarray, tile_in: int, tile_out: int, overlap: float) -> np.ndarray:
    """The loop shared by diffusers' `tiled_decode` and `_tiled_encode`.

    Input tiles of `tile_in` start every `tile_in * (1 - overlap)`; each output tile is blended with
    its (already blended) upper and left neighbours over `tile_out * overlap` rows / cols, then
    cropped to `tile_out - extent` and concatenated. diffusers keeps every tile until the end; the
    blend only ever reads the neighbours' last `extent` rows / cols, so only those strips are kept
    (one row of bottom strips, one right strip): the result is the same, the memory one tile row.
    """
    stride = int(tile_in * (1 - overlap))
    extent = int(tile_out * overlap)
    limit = tile_out - extent
    above: list[np.ndarray] = []  # the previous tile row's bottom strips, by column
    rows = []
    for i in range(0, x.shape[2], stride):
        bottoms, pieces, left = [], [], None
        for col, j in enumerate(range(0, x.shape[3], stride)):
            tile_x = np.ascontiguousarray(x[:, :, i:i + tile_in, j:j + tile_in])
            tile = np.array(run(tile_x), dtype=np.float32)  # a copy: blended in place below
            if above:
                _blend(above[col], tile, extent, axis=2)
            if left is not None:
                _blend(left, tile, extent, axis=3)
            bottoms.append(tile[:, :, tile.shape[2] - extent:].copy())
            left = tile[:, :, :, tile.shape[3] - extent:].copy()
            pieces.append(tile[:, :, :limit, :limit])
        rows.append(np.concatenate(pieces, axis=3))
        above = bottoms
    return np.concatenate(rows, axis=2)


def tiled_decode(run: TileRun, z: np.ndarray, tile_latent: int, tile_sample: int,
                 overlap: float = 0.25) -> np.ndarray:
    """diffusers' `AutoencoderKL.tiled_decode`: de-normalised latents [B, C, h, w] -> float32 image.

    `run` decodes one latent tile (the vae_decoder graph: post_quant_conv + decoder, as diffusers
    runs per tile). Mirrored op for op so that a package decodes as `vae.enable_tiling()` does, with
    peak memory set by the tile size (`sample_size`) instead of the image: a 2048x2048 image decodes
    in 1024x1024 tiles.
    """
    return _tiled(run, z, tile_latent, tile_sample, overlap)


def tiled_encode(run: TileRun, x: np.ndarray, tile_sample: int, tile_latent: int,
                 overlap: float = 0.25) -> np.ndarray:
    """diffusers' `AutoencoderKL._tiled_encode`: image [B, C, H, W] in [-1, 1] -> float32 latents.

    diffusers tiles the moments (mean and logvar, after quant_conv) and takes the mode afterwards;
    the vae_encoder graph returns the mode (the mean channels) per tile. The blend is per channel
    and elementwise, so blending the means is exactly the mean of the blended moments.
    """
    return _tiled(run, x, tile_sample, tile_latent, overlap)
