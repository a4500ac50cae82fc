"""GLM-Image on onnxruntime: diffusers' `GlmImagePipeline`, step for step, without torch.

`__call__` reads like the algorithm: check inputs, tokenise source images, plan image tokens with
the AR planner, encode glyphs, write the condition K/V, denoise with classifier-free guidance,
decode. Each step is a method that a test can call alone.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnxruntime as ort
from PIL import Image

from glm_image_onnx.manifest import I2I_GRAPHS, T2I_GRAPHS, Generation
from glm_image_onnx.runtime import glyphs, images, mrope
from glm_image_onnx.runtime.ar import ArPlanner, FeedObserver, Feeds, Progress
from glm_image_onnx.runtime.ar_batch import ArBatchEngine, ArBatching
from glm_image_onnx.runtime.package import Package, PackageError, verify_mode
from glm_image_onnx.runtime.prompt import PromptBuilder
from glm_image_onnx.runtime.providers import (ConfigureSession, ProviderRequest, check_target, create_session,
                                              device_of, input_types, release_arena)
from glm_image_onnx.runtime.sampling import TokenSampler, image_seeds, random_seed
from glm_image_onnx.runtime.scheduler import FlowMatchSchedule, guidance as cfg_mix, image_seq_len
from glm_image_onnx.runtime.shapes import ShapeBuckets, pad_right
from glm_image_onnx.runtime.timings import Timings

log = logging.getLogger("glm_image_onnx.runtime")

StepCallback = Callable[[Any, int, float, dict[str, np.ndarray]], Any]
"""callback_on_step_end(pipeline, step_index, timestep, tensors), diffusers' hook, after each
denoising step: tensors["latents"] (the new latents) and tensors["denoised"] (the step's estimate of
the final latents, x0 = latents - sigma * velocity, which `decode` turns into a preview). It
observes: its return value is ignored, and it must not modify the arrays."""

# Largest attention-score buffer (bytes) a batched CFG call may need; above it rows go one by one.
BATCHED_CFG_MAX_SCORES = 1 << 30
VAE_TILING = ("auto", "on", "off")
# How each graph's CPU session allocates (providers.MEMORY_MODES); the others: "pattern". The VAE
# without its arena: a session's first tile of each shape took 40 s instead of 24-26 s (a 512 px
# tile of the published VAE); with it, released after every tile, none did.
MEMORY = {"vae_decoder": "arena", "vae_encoder": "arena", "dit_decoder": "exact", "dit_condition_write": "exact"}
# The CPU's largest default VAE tile (pixels). The published VAE's 1024x1024 decode peaks at 15.2 GB
# on onnxruntime's CPU (its 3x3 convolutions' im2col buffers at 512 channels), a 512 tile at 3.8 GB
# (benchmarks/README.md, bench_scale): the bounded-memory default; --vae-tile-size overrides it.
CPU_VAE_TILE = 512


def _check_vae_tiling(vae_tiling: str, tile_size: int | None = None) -> None:
    if vae_tiling not in VAE_TILING:
        raise ValueError(f"vae_tiling must be one of {', '.join(VAE_TILING)}, got {vae_tiling!r}")
    if tile_size is not None and (tile_size < 64 or tile_size % 64):
        raise ValueError(f"vae_tile_size must be a multiple of 64 (>= 64), got {tile_size}")


@dataclass
class GlmImageOutput:
    images: list[Image.Image]
    tokens: np.ndarray  # every AR token generated, int64 (t2i: preview grid then target grid)
    prior_token_ids: np.ndarray  # the target grid upsampled 2x, int64 [1, N]: what the DiT saw
    timings: Timings = field(default_factory=Timings)
    seed: int | None = None
    seeds: list[int] = field(default_factory=list)  # one per image (a batch); [seed] for one image

    def __post_init__(self) -> None:
        if not self.seeds and self.seed is not None:
            self.seeds = [int(self.seed)]


@dataclass
class ArInputs:
    """What ArPlanner.generate / ArBatchEngine.submit take for one generation, and where its
    target grid lies among the generated tokens."""

    input_ids: np.ndarray  # [1, S]
    prefill_positions: np.ndarray  # [3, 1, S]
    decode_positions: np.ndarray  # [1, 3, L]
    num_tokens: int
    target_grid: tuple[int, int]
    target_offset: int


@dataclass
class _Condition:
    """Image-to-image state: source VQ ids for the prompt and the DiT's condition K/V."""

    grids: list[tuple[int, int]]
    ids: list[np.ndarray]
    keys: np.ndarray | None = None
    values: np.ndarray | None = None


class GlmImageOnnxPipeline:
    def __init__(self, package: Package, provider: ProviderRequest, threads: int | None = None,
                 vae_tiling: str = "auto", vae_tile_size: int | None = None,
                 ar_batching: ArBatching = ArBatching(), configure_session: ConfigureSession | None = None):
        _check_vae_tiling(vae_tiling, vae_tile_size)
        self.vae_tiling = vae_tiling
        self.package = package
        self.provider = provider
        self.config = config = package.pipeline
        wanted = T2I_GRAPHS + tuple(g for g in I2I_GRAPHS if package.has(g))
        self.sessions = {g: create_session(package.graph_path(g), provider, threads, MEMORY.get(g, "pattern"),
                                           configure_session) for g in wanted}
        # Where the provider could not start at all, the fallback report has said so; where it runs,
        # a package built for another target is worth one line.
        if any(provider.ort_name in s.get_providers() for s in self.sessions.values()):
            check_target(package, provider)
        self.supports_image_to_image = all(package.has(g) for g in I2I_GRAPHS)
        try:
            self.buckets = ShapeBuckets.from_manifest(package.manifest.target)
        except ValueError as e:
            raise PackageError(f"{package.root}: {e}") from None
        # The last run of each stage frees its arenas' memory.
        self.release = {g: release_arena(s, *self.io_device(g)) for g, s in self.sessions.items()}
        self.ar = ArPlanner(self.sessions["ar_planner"], package.graphs["ar_planner"].config,
                            *self.io_device("ar_planner"), buckets=self.buckets)
        self.ar_batching = ar_batching
        self.ar_engine = ArBatchEngine(self.ar, ar_batching) if ar_batching.enabled else None
        # The other graphs run one generation at a time: each call already uses every core (or
        # the whole GPU stream), and concurrent CPU calls would only oversubscribe the cores.
        self._compute = threading.Lock()
        self.observer: FeedObserver | None = None
        files = config.tokenizers
        self.grid = config.grid
        self.prompts = PromptBuilder(package.file(files.ar), package.file(files.ar_config),
                                     package.file(files.chat_template), package.file(files.image_processor),
                                     config.tokens, config.grid)
        self.glyph_tokenizer = glyphs.ByteTokenizer.from_dir(package.file(files.glyph))
        self.schedule = FlowMatchSchedule.from_config(config.scheduler)
        self.image_processor = images.ImageProcessor.from_file(package.file(files.image_processor))
        self.tokens = config.tokens
        self.codebook_size = config.tokens.codebook_size
        vae = config.vae
        self.vae_scale = vae.scale_factor  # pixels per latent, the name diffusers' pipelines use
        self.latent_channels = vae.latent_channels
        self.latents_mean = np.asarray(vae.latents_mean, np.float32).reshape(1, -1, 1, 1)
        self.latents_std = np.asarray(vae.latents_std, np.float32).reshape(1, -1, 1, 1)
        # diffusers' tile sizes: tile_sample_min_size = sample_size (1024 in the published VAE config,
        # the default for packages exported before it was recorded), the latent tile that / scale.
        self.vae_tile_sample = vae_tile_size or vae.sample_size
        # A static-shapes (cann) package keeps the VAE's own tile: every new tile shape would compile.
        if vae_tile_size is None and self.io_device("vae_decoder")[0] == "cpu" and not self.buckets.static:
            self.vae_tile_sample = min(self.vae_tile_sample, CPU_VAE_TILE)
        self.vae_tile_latent = int(self.vae_tile_sample / self.vae_scale)
        self.dit = package.graphs["dit_decoder"].config
        self.patch_size = self.dit.patch_size
        # The longest DiT sequence whose batched CFG call stays within BATCHED_CFG_MAX_SCORES.
        self.batched_cfg_max_seq = math.isqrt(BATCHED_CFG_MAX_SCORES // (2 * self.dit.num_heads * 4))
        self.defaults = config.defaults
        self.generation = config.generation

    @classmethod
    def from_package(cls, path: Path | str, provider: str = "cpu", provider_options: dict[str, Any] | None = None,
                     strict: bool = False, verify_files: bool | str = True, threads: int | None = None,
                     vae_tiling: str = "auto", vae_tile_size: int | None = None,
                     ar_batching: ArBatching = ArBatching(),
                     configure_session: ConfigureSession | None = None) -> "GlmImageOnnxPipeline":
        """Open an exported package on "cpu", "cuda" or "cann" (see runtime.providers).

        verify_files: "cached" (or True) checks each file's sha256 once and then trusts an
        unchanged size / mtime / inode (runtime.package); "full" hashes every file; "off" (False) skips.

        vae_tiling: "auto" decodes / encodes in diffusers' VAE tiles when the image is larger than
        one tile (bounded memory at 2048x2048), "on" always, "off" never (whole-image VAE calls,
        as diffusers without `enable_tiling()`). vae_tile_size: the tile side in pixels (diffusers'
        `tile_sample_min_size`); default the VAE's sample_size, at most CPU_VAE_TILE on the CPU.

        ar_batching: concurrent calls (threads, a batch of prompts) share the AR planner's decode
        steps (runtime.ar_batch); `ArBatching(enabled=False)` decodes each generation alone.

        configure_session: adjusts each session's options before it is created
        (runtime.providers.ConfigureSession)."""
        _check_vae_tiling(vae_tiling, vae_tile_size)  # before opening (and verifying) the package
        request = ProviderRequest(provider, dict(provider_options or {}), strict)
        if verify_mode(verify_files) == "off":
            log.warning("%s: file checksums not verified (--no-verify)", path)
        return cls(Package.open(path, verify_files=verify_files), request, threads, vae_tiling, vae_tile_size,
                   ar_batching, configure_session)

    def observe_feeds(self, observer: FeedObserver | None) -> None:
        """Tell `observer` of every graph call from now on, AR steps and denoising steps included
        (None: stop); see runtime.ar.FeedObserver."""
        self.observer = observer
        self.ar.observer = observer

    def _run(self, graph: str, feeds: Feeds) -> list[np.ndarray]:
        """One plain call of a graph's session (its run options free the arena after the last
        call: self.release), seen by the feed observer."""
        if self.observer is not None:
            self.observer(graph, lambda: feeds)
        return self.sessions[graph].run(None, feeds, self.release[graph])

    def io_device(self, graph: str) -> tuple[str, int]:
        """Where a graph's buffers live between calls: on the GPU when CUDA really runs the session
        (the AR cache, the DiT's glyphs, priors and condition K/V stay there), else on the host."""
        return device_of(self.sessions[graph], self.provider)

    def close(self) -> None:
        """Stop the AR batch engine's thread (generations still running fail)."""
        if self.ar_engine is not None:
            self.ar_engine.close()

    @property
    def providers(self) -> list[str]:
        return self.sessions["dit_decoder"].get_providers()

    # ------------------------------------------------------------------------------------ call
    def __call__(self, prompt: str | Sequence[str], *, height: int | None = None, width: int | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 seed: int | Sequence[int] | None = None, latents: np.ndarray | None = None,
                 do_sample: bool | None = None, temperature: float | None = None, top_p: float | None = None,
                 top_k: int | None = None, image: Image.Image | Sequence[Image.Image] | None = None,
                 progress: Progress | None = None, num_images_per_prompt: int = 1,
                 callback_on_step_end: StepCallback | None = None) -> GlmImageOutput:
        """One image per prompt and `num_images_per_prompt` (diffusers' order: each prompt's images
        together). Image i takes seeds[i] (default: `seed` + i), so image 0 of a batch is the image
        the same call gives for one prompt; with AR batching on, the images' AR planning shares its
        decode steps. A batch's `tokens` / `prior_token_ids` are stacked [B, N], `timings` are the
        first image's (`total_s`: the whole call)."""
        t_start = time.perf_counter()
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("prompt: give at least one prompt")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        if isinstance(seed, (list, tuple)):
            if len(seed) != len(prompts):
                raise ValueError(f"seed: {len(seed)} seeds for {len(prompts)} images")
            seeds: list[int | None] = [int(s) for s in seed]
        else:
            seeds = image_seeds(seed, len(prompts))
        if latents is not None and len(prompts) > 1:
            if np.shape(latents)[0] != len(prompts):
                raise ValueError(f"latents: {np.shape(latents)[0]} rows for {len(prompts)} images")
            rows: list[np.ndarray | None] = [latents[i: i + 1] for i in range(len(prompts))]
        else:
            rows = [latents] * len(prompts)
        settings = dict(height=height, width=width, num_inference_steps=num_inference_steps,
                        guidance_scale=guidance_scale, do_sample=do_sample, temperature=temperature, top_p=top_p,
                        top_k=top_k, image=image, progress=progress, callback_on_step_end=callback_on_step_end)
        if len(prompts) == 1:
            return self.generate_one(prompts[0], seed=seeds[0], latents=rows[0], **settings)
        # One thread per image: their AR planning joins the engine's decode steps, then each takes
        # its turn at the DiT and VAE (which already use every core: measured, batching them across
        # images gained nothing on the CPU; benchmarks/README.md).
        workers = len(prompts) if self.ar_engine is not None else 1
        with ThreadPoolExecutor(workers, thread_name_prefix="glm-image-batch") as pool:
            outs = list(pool.map(lambda i: self.generate_one(prompts[i], seed=seeds[i], latents=rows[i], **settings),
                                 range(len(prompts))))
        return GlmImageOutput(images=[im for o in outs for im in o.images],
                              tokens=np.stack([o.tokens for o in outs]),
                              prior_token_ids=np.concatenate([o.prior_token_ids for o in outs]),
                              timings=dataclasses.replace(outs[0].timings, total_s=time.perf_counter() - t_start),
                              seed=outs[0].seed, seeds=[int(o.seed) for o in outs])

    def generate_one(self, prompt: str, *, height: int | None = None, width: int | None = None,
                     num_inference_steps: int | None = None, guidance_scale: float | None = None,
                     seed: int | None = None, latents: np.ndarray | None = None, do_sample: bool | None = None,
                     temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                     image: Image.Image | Sequence[Image.Image] | None = None,
                     progress: Progress | None = None,
                     callback_on_step_end: StepCallback | None = None) -> GlmImageOutput:
        """One image; safe to call from several threads at once (the server does)."""
        t_start = time.perf_counter()
        sources = self._source_images(image)
        height, width = self._size(height, width, sources)
        steps = int(num_inference_steps if num_inference_steps is not None else self.defaults.num_inference_steps)
        scale = float(guidance_scale if guidance_scale is not None else self.defaults.guidance_scale)
        self.check_inputs(prompt, height, width, steps, scale, latents)
        sampling = self._sampling(do_sample, temperature, top_p, top_k)
        if seed is None:
            seed = random_seed()
        ar_seed, latent_seed = np.random.SeedSequence(seed).spawn(2)

        condition, vision_tokenizer_s = None, None
        if sources:
            with self._compute:
                t = time.perf_counter()
                condition = self.tokenize_sources(sources)
                vision_tokenizer_s = time.perf_counter() - t

        tokens, prior_ids, timings = self.generate_prior_tokens(
            prompt, height=height, width=width, sampler=TokenSampler(sampling, self.codebook_size, ar_seed),
            condition=condition, progress=progress)
        timings.vision_tokenizer_s = vision_tokenizer_s

        with self._compute:
            t = time.perf_counter()
            cond_embeds, uncond_embeds = self.encode_glyphs(prompt)
            timings.glyph_s = time.perf_counter() - t

            if condition is not None:
                t = time.perf_counter()
                self.write_condition(sources, condition)
                timings.condition_s = time.perf_counter() - t

            latents = self.prepare_latents(height=height, width=width, latents=latents, seed=latent_seed)
            t = time.perf_counter()
            latents, per_step = self.denoise(
                latents, prompt_embeds=cond_embeds, negative_prompt_embeds=uncond_embeds, prior_token_ids=prior_ids,
                height=height, width=width, num_inference_steps=steps, guidance_scale=scale, condition=condition,
                progress=progress, callback_on_step_end=callback_on_step_end)
            timings.dit_s = time.perf_counter() - t
            timings.dit_per_step_s = float(np.median(per_step)) if per_step else 0.0

            t = time.perf_counter()
            pixels = self.decode(latents)
            timings.vae_s = time.perf_counter() - t
        timings.total_s = time.perf_counter() - t_start
        return GlmImageOutput(images=images.to_pil(pixels), tokens=tokens, prior_token_ids=prior_ids,
                              timings=timings, seed=seed)

    def _sampling(self, do_sample: bool | None, temperature: float | None, top_p: float | None,
                  top_k: int | None) -> Generation:
        """The AR sampling of one call: what it asks, else the package's generation config."""
        gen = self.generation
        return Generation(do_sample=bool(gen.do_sample if do_sample is None else do_sample),
                          temperature=float(gen.temperature if temperature is None else temperature),
                          top_p=float(gen.top_p if top_p is None else top_p),
                          top_k=top_k if top_k is not None else gen.top_k)

    # ---------------------------------------------------------------------------------- checks
    def _source_images(self, image: Any) -> list[Image.Image]:
        if image is None:
            return []
        items = [image] if isinstance(image, (Image.Image, np.ndarray)) else list(image)
        if items and not self.supports_image_to_image:
            raise ValueError(f"image: this package has no image-to-image graphs ({', '.join(I2I_GRAPHS)}); "
                             f"export them to edit images")
        out = []
        for i, item in enumerate(items):
            if isinstance(item, np.ndarray):
                item = Image.fromarray(item)
            if not isinstance(item, Image.Image):
                raise ValueError(f"image[{i}]: expected a PIL image or a uint8 array, got {type(item).__name__}")
            out.append(item.convert("RGB"))
        return out

    def _size(self, height: int | None, width: int | None, sources: list[Image.Image]) -> tuple[int, int]:
        source = (sources[0].height, sources[0].width) if sources else None
        height, width = self.config.image_size(height, width, source)
        return int(height), int(width)

    def check_inputs(self, prompt: str, height: int, width: int, steps: int, scale: float,
                     latents: np.ndarray | None) -> None:
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        for name, value in (("height", height), ("width", width)):
            error = self.grid.side_error(name, value)
            if error:
                raise ValueError(error)
        if steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {steps}")
        if not math.isfinite(scale) or scale < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {scale}")
        if latents is not None:
            shape = (1, self.latent_channels, height // self.vae_scale, width // self.vae_scale)
            if tuple(np.shape(latents)) != shape:
                raise ValueError(f"latents must have shape {shape} for {height}x{width}, got {np.shape(latents)}")

    # ------------------------------------------------------------------------- image-to-image
    def tokenize_sources(self, sources: list[Image.Image]) -> _Condition:
        """Each source image -> its VQ ids (vision tokenizer), one image per call."""
        grids, ids = [], []
        for img in sources:
            pixels, (gh, gw) = self.image_processor.preprocess_one(img)
            out = self._run("vision_tokenizer", {"pixel_values": pixels,
                                                 "image_grid_thw": np.array([[1, gh, gw]], np.int64)})[0]
            grids.append((gh, gw))
            ids.append(out.astype(np.int64).reshape(-1))
        return _Condition(grids=grids, ids=ids)

    def source_error(self, width: int, height: int) -> str | None:
        """Why a source image of this size cannot condition the DiT, or None: the vision tokenizer's
        grid (resized by the processor) must give as many prior tokens as the VAE latent has patches."""
        gh, gw = self.image_processor.grid(height, width)
        prior = gh * gw * self.grid.prior_upsample ** 2
        multiple = self.vae_scale * self.patch_size
        tokens = (height // multiple) * (width // multiple)
        if prior == tokens:
            return None
        return (f"image: a {width}x{height} source gives {prior} prior tokens but {tokens} latent tokens; "
                f"use sides that are multiples of {self.grid.factor}")

    def write_condition(self, sources: list[Image.Image], condition: _Condition) -> None:
        """The DiT's condition K/V: VAE-encode each source, normalise, one write pass per image."""
        keys, values = [], []
        for img, (gh, gw), ids in zip(sources, condition.grids, condition.ids):
            error = self.source_error(img.width, img.height)
            if error:
                raise ValueError(error)
            h, w = images.condition_size(img, self.vae_scale, self.patch_size)
            prior = images.upsample_prior_ids(ids, gh, gw, self.grid.prior_upsample)
            latent = self.encode(images.vae_preprocess(img, h, w, self.vae_scale))
            k, v = self._run("dit_condition_write", {"hidden_states": latent, "prior_token_id": prior,
                                                     "target_size": np.array([[h, w]], np.float32)})
            keys.append(k)
            values.append(v)
        condition.keys = np.concatenate(keys, axis=2)
        condition.values = np.concatenate(values, axis=2)

    # ------------------------------------------------------------------------------- AR planner
    def ar_inputs(self, prompt: str, *, height: int, width: int, condition: _Condition | None = None) -> ArInputs:
        """The AR planner's inputs for one generation: prompt ids, mRoPE positions, token count."""
        built = self.prompts.build(prompt, height, width, condition.grids if condition else None)
        input_ids = built.input_ids
        if condition is not None:
            # The processor's image placeholders become the sources' codebook ids (masked_scatter).
            slots = input_ids[0] == self.tokens.image_token_id
            input_ids = input_ids.copy()
            input_ids[0, slots] = np.concatenate(condition.ids)
        prefill, decode = mrope.rope_index(input_ids, image_start_token_id=self.tokens.image_start_token_id,
                                           image_end_token_id=self.tokens.image_end_token_id,
                                           image_grid_thw=built.image_grid_thw)
        # every grid token; the end token is not needed
        return ArInputs(input_ids, prefill, decode, built.max_new_tokens - 1, built.target_grid, built.target_offset)

    def generate_prior_tokens(self, prompt: str, *, height: int, width: int, sampler: TokenSampler,
                              condition: _Condition | None = None, progress: Progress | None = None
                              ) -> tuple[np.ndarray, np.ndarray, Timings]:
        """AR planning: (all generated tokens, the target grid upsampled [1, N], timings)."""
        a = self.ar_inputs(prompt, height=height, width=width, condition=condition)
        planner = self.ar_engine or self.ar
        result = planner.generate(a.input_ids, a.prefill_positions, a.decode_positions, a.num_tokens, sampler,
                                  progress)
        th, tw = a.target_grid
        target = result.tokens[a.target_offset: a.target_offset + th * tw]
        timings = Timings(ar_prefill_s=result.prefill_s, ar_decode_s=result.decode_s,
                          ar_per_token_s=float(np.median(result.per_token_s)) if result.per_token_s else 0.0,
                          ar_tokens=a.num_tokens, ar_batch_rows=result.batch_rows, ar_queue_s=result.queue_s)
        return result.tokens, images.upsample_prior_ids(target, th, tw, self.grid.prior_upsample), timings

    # ------------------------------------------------------------------------------------ glyphs
    def encode_glyphs(self, prompt: str) -> tuple[np.ndarray, np.ndarray]:
        """(cond, uncond) glyph embeddings [1, T, D]: quoted text of the prompt, and "" for CFG."""

        def encode(texts: list[str]) -> np.ndarray:
            # One text per call. Batched, every text is padded to the longest, and the encoder's
            # attention costs rows x longest^2: thousands of empty quotes beside a long one would
            # ask for hundreds of GB. Unpadded (a static package: padded to its bucket, a few
            # shapes in all), each call's attended rows are what the batched call gives them.
            ids, mask = glyphs.glyph_batch(texts, tokenizer=self.glyph_tokenizer)
            rows = []
            for row_ids, row_mask in zip(ids, mask):
                length = int(row_mask.sum())  # glyph_batch puts each row's tokens first
                width = self.buckets.pad("glyph", ids.shape[1]) if self.buckets.static else length
                padded_ids = np.full((1, width), self.glyph_tokenizer.pad_id, np.int64)
                padded_mask = np.zeros((1, width), np.int64)
                padded_ids[0, :length], padded_mask[0, :length] = row_ids[:length], 1
                hidden = self._run("glyph_encoder", {"input_ids": padded_ids, "attention_mask": padded_mask})[0]
                rows.append(glyphs.gather_rows(hidden, padded_mask))
            return np.concatenate(rows, axis=1).astype(np.float32)

        return encode(glyphs.glyph_texts(prompt)), encode([])

    # --------------------------------------------------------------------------------- denoising
    def prepare_latents(self, *, height: int, width: int, latents: np.ndarray | None,
                        seed: np.random.SeedSequence) -> np.ndarray:
        if latents is not None:
            return np.ascontiguousarray(latents, dtype=np.float32)
        shape = (1, self.latent_channels, height // self.vae_scale, width // self.vae_scale)
        return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)

    def denoise(self, latents: np.ndarray, *, prompt_embeds: np.ndarray, negative_prompt_embeds: np.ndarray,
                prior_token_ids: np.ndarray, height: int, width: int, num_inference_steps: int,
                guidance_scale: float, condition: _Condition | None = None, progress: Progress | None = None,
                callback_on_step_end: StepCallback | None = None) -> tuple[np.ndarray, list[float]]:
        """The flow-matching Euler loop with classifier-free guidance (`guidance_scale > 1`), on the
        glyph embeddings (`encode_glyphs`) and the prior tokens (`generate_prior_tokens`)."""
        cond, uncond, prior_ids = prompt_embeds, negative_prompt_embeds, prior_token_ids
        steps, scale = num_inference_steps, guidance_scale
        timesteps, sigmas = self.schedule.timesteps(
            steps, image_seq_len(height, width, self.vae_scale, self.patch_size))
        use_cfg = scale > 1
        empty = np.zeros((self.dit.num_layers, 1, 0, self.dit.num_heads, self.dit.head_dim), np.float32)
        keys = condition.keys if condition is not None else empty
        values = condition.values if condition is not None else empty
        # Text-to-image runs both CFG branches in one call: the shorter glyph sequence is padded and
        # masked, which gives the unbatched result (the uncond branch never reads condition K/V, so
        # image-to-image keeps two calls). A masked call cannot take the CPU's flash attention
        # (export.attention), so large images call one unpadded row at a time instead.
        seq = image_seq_len(height, width, self.vae_scale, self.patch_size) + max(cond.shape[1], uncond.shape[1])
        batch_cfg = use_cfg and condition is None and (  # [2, heads, S, S] fp32 scores within the bound
            self.buckets.static or cond.shape[1] == uncond.shape[1] or seq <= self.batched_cfg_max_seq)
        session = self.sessions["dit_decoder"]
        device = self.io_device("dit_decoder")
        # A static-shapes package pads the text to a bucket (masked), so each resolution is one shape set.
        def text_rows(rows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
            return pad_right(rows, self.buckets.pad("dit_text", max(r.shape[1] for r in rows)))

        if batch_cfg:
            branches = [_DitCall(session, device, latents.shape, *text_rows([cond, uncond]), prior_ids, [False, True],
                                 height, width, empty, empty, self.observer)]
        else:
            branches = [_DitCall(session, device, latents.shape, *text_rows([cond]), prior_ids, [False], height, width,
                                 keys, values, self.observer)]
            if use_cfg:
                branches.append(_DitCall(session, device, latents.shape, *text_rows([uncond]), prior_ids, [True],
                                         height, width, empty, empty, self.observer))
        per_step = []
        for i, t in enumerate(timesteps):
            t0 = time.perf_counter()
            last = i == len(timesteps) - 1
            release = self.release["dit_decoder"] if last else None
            preds = [branch(latents, t - 1, release) for branch in branches]  # feeds t - 1
            if batch_cfg:
                noise = cfg_mix(preds[0][:1], preds[0][1:], scale)
            elif use_cfg:
                noise = cfg_mix(preds[0], preds[1], scale)
            else:
                noise = preds[0]
            denoised = latents - sigmas[i] * noise if callback_on_step_end is not None else None
            latents = self.schedule.step(noise, i, latents, sigmas=sigmas)
            per_step.append(time.perf_counter() - t0)
            if callback_on_step_end is not None:
                callback_on_step_end(self, i, float(t), {"latents": latents, "denoised": denoised})
            if progress is not None:
                progress("denoise", i + 1, len(timesteps))
        return latents, per_step

    # ------------------------------------------------------------------------------------- VAE
    def _vae_tiles(self, height: int, width: int, tile: int) -> bool:
        # "auto" is diffusers' own test once tiling is enabled: a side larger than one tile
        return self.vae_tiling == "on" or (self.vae_tiling == "auto" and max(height, width) > tile)

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """VAE-encode an image [B, C, H, W] in [-1, 1] -> normalised latents (the mode, (x - mean) / std)."""
        def run(sample: np.ndarray) -> np.ndarray:
            return self._run("vae_encoder", {"sample": sample})[0]

        if self._vae_tiles(pixels.shape[2], pixels.shape[3], self.vae_tile_sample):
            latent = images.tiled_encode(run, pixels, self.vae_tile_sample, self.vae_tile_latent)
        else:
            latent = run(pixels)
        return ((latent - self.latents_mean) / self.latents_std).astype(np.float32)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """De-normalise, VAE-decode -> float images [B, H, W, 3] in [0, 1]."""
        z = (latents * self.latents_std + self.latents_mean).astype(np.float32)

        def run(tile: np.ndarray) -> np.ndarray:
            return self._run("vae_decoder", {"latents": tile})[0]

        if self._vae_tiles(z.shape[2], z.shape[3], self.vae_tile_latent):
            sample = images.tiled_decode(run, z, self.vae_tile_latent, self.vae_tile_sample)
        else:
            sample = run(z)
        return images.vae_postprocess(sample)


class _DitCall:
    """One DiT call signature, reused for every denoising step.

    The inputs that do not change between steps (glyphs, mask, prior ids and drop flags, sizes,
    condition K/V) are copied once to where the session computes (the GPU under CUDA) and bound
    there; each step only rewrites the host latent and timestep buffers in place (on CUDA the
    latents, 1 MB per row at 1024x1024, cross to the device and `noise_pred` back: the Euler step
    and guidance run on the host), and `noise_pred` lands in a preallocated buffer (overwritten by
    the next call: use it before calling again). Rows are CFG branches sharing one call. Every
    buffer takes the dtype the graph declares for it.
    """

    def __init__(self, session: Any, device: tuple[str, int], latent_shape: tuple[int, ...], text: np.ndarray,
                 mask: np.ndarray, prior_ids: np.ndarray, drop_rows: list[bool], height: int, width: int,
                 keys: np.ndarray, values: np.ndarray, observer: FeedObserver | None = None):
        rows, n = len(drop_rows), prior_ids.shape[1]
        self.session = session
        self.observer = observer
        types = input_types(session)
        self.x = np.empty((rows, *latent_shape[1:]), types["hidden_states"])
        self.timestep = np.empty((rows,), types["timestep"])
        self.noise = np.empty_like(self.x)  # noise_pred has the latent's shape
        constant = {
            "encoder_hidden_states": text, "encoder_attention_mask": mask,
            "prior_token_id": np.repeat(prior_ids, rows, axis=0),
            "prior_token_drop": np.repeat(np.array(drop_rows)[:, None], n, axis=1),
            "target_size": np.array([[height, width]] * rows), "crop_coords": np.zeros((rows, 2)),
            "condition_keys": keys, "condition_values": values,
        }
        typed = {k: np.ascontiguousarray(v, types[k]) for k, v in constant.items()}
        self._host = typed if observer is not None else {}  # what the observer sees of them
        # OrtValues on the device: bound once, kept here (the binding holds only their pointers).
        self._bound = {k: ort.OrtValue.ortvalue_from_numpy(v, *device) for k, v in typed.items()}
        self.io = session.io_binding()
        for name, value in self._bound.items():
            self.io.bind_ortvalue_input(name, value)
        for name, arr in (("hidden_states", self.x), ("timestep", self.timestep)):
            self.io.bind_input(name, "cpu", 0, arr.dtype.type, list(arr.shape), arr.ctypes.data)
        self.io.bind_output("noise_pred", "cpu", 0, self.noise.dtype.type, list(self.noise.shape),
                            self.noise.ctypes.data)

    def __call__(self, latents: np.ndarray, timestep: float, run_options: Any = None) -> np.ndarray:
        self.x[:] = latents  # [1, C, h, w] broadcast to every CFG row
        self.timestep[:] = timestep
        if self.observer is not None:
            self.observer("dit_decoder", lambda: {**self._host, "hidden_states": self.x, "timestep": self.timestep})
        self.session.run_with_iobinding(self.io, run_options)
        return self.noise
