"""Train the demo GLM-Image (`models/demo/`) from scratch on the signs of `models/demo_scene.py`.

Each stage is a small supervised problem on the real classes of the `demo` preset:

- `vae`: AutoencoderKL learns to reconstruct signs (random 128 px crops: it is fully convolutional),
  then its `latents_mean` / `latents_std` are measured on whole scenes.
- `dit`: GlmImageTransformer2DModel and the ByT5 glyph encoder learn, with flow matching, the
  latents of a sign from its layout tokens (`prior_token_id`) and the quoted text's glyph
  embeddings, with the pipeline's conventions (timestep = 1000 sigma - 1, condition dropped for
  classifier-free guidance: prior tokens dropped and glyph text ""); after DIT_LAYOUT_STEPS the
  letter row's latents weigh LETTER_WEIGHT times as much.
- `ar`: GlmImageForConditionalGeneration's language model learns prompt -> preview grid + target
  grid + end-of-image with teacher forcing, at the mRoPE positions the runtime computes.
- `assemble`: the trained parts in the published diffusers layout, fp32, into the output folder.

`vae` must run before `dit`; `ar` is independent and can run beside them (one thread each).
Every stage is seeded, shows a progress bar, saves its state every few hundred steps and resumes
from it when run again with the same work folder.

    python -m glm_image_onnx.models.demo_train --work train-work --stage all --out models/demo
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

from glm_image_onnx.models import demo_scene as scene
from glm_image_onnx.models.presets import DEMO

STEPS = {"vae": 2000, "dit": 17000, "ar": 3500}
BATCH = {"vae": 8, "dit": 32, "ar": 16}
LR = {"vae": 1e-3, "dit": 1e-3, "ar": 1e-3}
DIT_SCENES = 2048  # scenes encoded once for the DiT; rolled by whole cells for variety
# The AR planner's letter rows are 40 of the 321 tokens it writes: after AR_LAYOUT_STEPS steps of
# plain cross-entropy (where the layout is learnt), they weigh LETTER_WEIGHT times as much, so that
# the spelling is not a rounding error of the loss.
AR_LAYOUT_STEPS, LETTER_WEIGHT = 2000, 10.0
# The same for the DiT: the letter row is 4 of the latent's 32 rows, and after DIT_LAYOUT_STEPS
# steps the wall and band are learnt while the letters are half-formed (README, *The demo model*).
DIT_LAYOUT_STEPS = 5000
SAVE_EVERY = 200
RESOLUTION = (scene.SIZE, scene.SIZE)


def _torch() -> Any:
    import torch

    return torch


def _pixels(images: list[Any]) -> Any:
    torch = _torch()
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def _lr(stage: str, step: int) -> float:
    """Linear warm-up over 100 steps, then cosine down to a tenth."""
    total = STEPS[stage]
    if step < 100:
        return LR[stage] * (step + 1) / 100
    return LR[stage] * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 100) / max(1, total - 100))))


class _State:
    """A stage's model(s), optimizer and step, saved to and resumed from `work/<stage>.pt`."""

    def __init__(self, work: Path, stage: str, modules: dict[str, Any], params: list[Any]) -> None:
        torch = _torch()
        self.path = work / f"{stage}.pt"
        self.stage = stage
        self.modules = modules
        self.opt = torch.optim.AdamW(params, lr=LR[stage], weight_decay=0.01)
        self.step = 0
        if self.path.exists():
            saved = torch.load(self.path, weights_only=False)
            for name, module in modules.items():
                module.load_state_dict(saved["modules"][name])
            self.opt.load_state_dict(saved["opt"])
            self.step = saved["step"]

    def save(self) -> None:
        torch = _torch()
        tmp = self.path.with_suffix(".tmp")
        torch.save({"modules": {n: m.state_dict() for n, m in self.modules.items()},
                    "opt": self.opt.state_dict(), "step": self.step}, tmp)
        tmp.replace(self.path)

    def run(self, loss_at: Callable[[int], Any]) -> None:
        """Train until STEPS[stage]: `loss_at(step)` draws that step's batch (seeded by the step, so a
        resumed run sees the same data) and returns the loss."""
        from tqdm import tqdm

        torch = _torch()
        bar = tqdm(total=STEPS[self.stage], initial=self.step, desc=self.stage, file=sys.stderr,
                   mininterval=5)
        while self.step < STEPS[self.stage]:
            for group in self.opt.param_groups:
                group["lr"] = _lr(self.stage, self.step)
            loss = loss_at(self.step)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in self.opt.param_groups for p in g["params"]], 1.0)
            self.opt.step()
            self.step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            if self.step % SAVE_EVERY == 0 or self.step == STEPS[self.stage]:
                self.save()
        bar.close()


def _rng(seed: int, stage: str, step: int) -> random.Random:
    return random.Random(f"{seed}/{stage}/{step}")


def init_checkpoint(work: Path, seed: int) -> Path:
    from glm_image_onnx.models.checkpoint import write_checkpoint

    init = work / "init"
    if not init.exists():
        write_checkpoint(DEMO, init, seed=seed)
    return init


# ---- vae ----------------------------------------------------------------------------------------

def train_vae(work: Path, seed: int) -> None:
    from diffusers import AutoencoderKL

    torch = _torch()
    torch.manual_seed(seed)
    vae = AutoencoderKL.from_pretrained(init_checkpoint(work, seed) / "vae").train()
    state = _State(work, "vae", {"vae": vae}, list(vae.parameters()))

    def loss_at(step: int) -> Any:
        rng = _rng(seed, "vae", step)
        crops = []
        for _ in range(BATCH["vae"]):
            y, x = rng.randrange(0, 129, 8), rng.randrange(0, 129, 8)
            crops.append(scene.training_example(rng)[1].render().crop((x, y, x + 128, y + 128)))
        pixels = _pixels(crops)
        posterior = vae.encode(pixels).latent_dist
        recon = vae.decode(posterior.sample(generator=torch.Generator().manual_seed(step))).sample
        return (recon - pixels).abs().mean() + (recon - pixels).square().mean() + 1e-6 * posterior.kl().mean()

    state.run(loss_at)
    if not (work / "vae.json").exists():
        _measure_latents(vae.eval(), work, seed)


def _measure_latents(vae: Any, work: Path, seed: int) -> None:
    """Per-channel mean and std of whole scenes' latents: the pipeline decodes `latents * std + mean`."""
    torch = _torch()
    rng = _rng(seed, "vae-stats", 0)
    with torch.no_grad():
        z = torch.cat([vae.encode(_pixels([scene.training_example(rng)[1].render() for _ in range(16)]))
                       .latent_dist.mode() for _ in range(8)])
    stats = {"latents_mean": z.mean(dim=(0, 2, 3)).tolist(), "latents_std": z.std(dim=(0, 2, 3)).tolist()}
    (work / "vae.json").write_text(json.dumps(stats))


def trained_vae(work: Path) -> Any:
    from diffusers import AutoencoderKL

    torch = _torch()
    vae = AutoencoderKL.from_pretrained(work / "init" / "vae")
    vae.load_state_dict(torch.load(work / "vae.pt", weights_only=False)["modules"]["vae"])
    vae.register_to_config(**json.loads((work / "vae.json").read_text()))
    return vae.eval()


# ---- dit + glyph encoder ------------------------------------------------------------------------

def _dit_dataset(work: Path, seed: int) -> dict[str, Any]:
    """DIT_SCENES random signs: their normalised latents, layouts and words (encoded once, cached)."""
    torch = _torch()
    path = work / "dit-data.pt"
    if path.exists():
        return torch.load(path, weights_only=False)
    from tqdm import tqdm

    vae = trained_vae(work)
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1)
    rng = _rng(seed, "dit-data", 0)
    signs = [scene.training_example(rng)[1] for _ in range(DIT_SCENES)]
    latents = []
    with torch.no_grad():
        for i in tqdm(range(0, DIT_SCENES, 32), desc="encode", file=sys.stderr, mininterval=5):
            z = vae.encode(_pixels([s.render() for s in signs[i:i + 32]])).latent_dist.mode()
            latents.append((z - mean) / std)
    data = {"latents": torch.cat(latents), "layouts": torch.from_numpy(np.stack([s.layout() for s in signs])),
            "words": [s.word for s in signs]}
    torch.save(data, path)
    return data


def glyph_embeds(encoder: Any, tokenizer: Any, texts: list[str]) -> Any:
    """The pipeline's glyph embeddings (`GlmImagePipeline._get_glyph_embeds`, one quoted text per
    prompt): ByT5 ids, the encoder's states, left-padded with zeros to the batch's longest."""
    torch = _torch()
    ids = [tokenizer(t).input_ids for t in texts]
    longest = max(len(i) for i in ids)
    batch = torch.tensor([i + [tokenizer.pad_token_id] * (longest - len(i)) for i in ids])
    mask = torch.tensor([[1] * len(i) + [0] * (longest - len(i)) for i in ids])
    states = encoder(batch, attention_mask=mask).last_hidden_state
    out = torch.zeros_like(states)
    for row, n in enumerate(len(i) for i in ids):  # left padding: each row's states at the end
        out[row, longest - n:] = states[row, :n]
    return out


def train_dit(work: Path, seed: int) -> None:
    from diffusers import GlmImageTransformer2DModel
    from transformers import ByT5Tokenizer, T5EncoderModel

    torch = _torch()
    torch.manual_seed(seed)
    data = _dit_dataset(work, seed)
    init = init_checkpoint(work, seed)
    dit = GlmImageTransformer2DModel.from_pretrained(init / "transformer").train()
    glyph = T5EncoderModel.from_pretrained(init / "text_encoder").train()
    tokenizer = ByT5Tokenizer.from_pretrained(init / "tokenizer")
    ema = _ema_copy(dit)
    state = _State(work, "dit", {"dit": dit, "glyph": glyph, "ema": ema},
                   list(dit.parameters()) + list(glyph.parameters()))
    n, c, h, w = data["latents"].shape
    cells = scene.CELL // 8  # latent pixels per layout cell
    letter_rows = torch.ones(1, 1, h, 1)
    letter_rows[:, :, scene.TEXT_ROW * cells:(scene.TEXT_ROW + 1) * cells] = LETTER_WEIGHT

    def loss_at(step: int) -> Any:
        gen = torch.Generator().manual_seed(seed * 100003 + step)
        pick = torch.randint(0, n, (BATCH["dit"],), generator=gen)
        shift = torch.randint(0, scene.GRID, (BATCH["dit"],), generator=gen)
        x0 = torch.stack([data["latents"][i].roll(int(s) * cells, dims=-1) for i, s in zip(pick, shift)])
        layout = torch.stack([data["layouts"][i].roll(int(s), dims=-1) for i, s in zip(pick, shift)])
        prior = layout.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2).flatten(1)
        drop = torch.rand(BATCH["dit"], generator=gen) < 0.1  # the unconditional branch of CFG
        texts = ["" if d else data["words"][i] for i, d in zip(pick, drop)]
        sigma = torch.sigmoid(torch.randn(BATCH["dit"], generator=gen)).view(-1, 1, 1, 1)
        noise = torch.randn(x0.shape, generator=gen)
        pred = dit(hidden_states=(1 - sigma) * x0 + sigma * noise,
                   encoder_hidden_states=glyph_embeds(glyph, tokenizer, texts),
                   prior_token_id=prior, prior_token_drop=drop.view(-1, 1).expand_as(prior),
                   timestep=sigma.flatten() * 1000 - 1,
                   target_size=torch.tensor([RESOLUTION] * BATCH["dit"], dtype=torch.float32),
                   crop_coords=torch.zeros(BATCH["dit"], 2)).sample
        loss = ((pred - (noise - x0)).square() * (letter_rows if step >= DIT_LAYOUT_STEPS else 1)).mean()
        _ema_update(ema, dit, step)
        return loss

    state.run(loss_at)


def _ema_copy(model: Any) -> Any:
    import copy

    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    return ema


def _ema_update(ema: Any, model: Any, step: int) -> None:
    """Exponential moving average of the weights (decay ramping up to 0.999): the shipped DiT."""
    torch = _torch()
    decay = min(0.999, (1 + step) / (10 + step))
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)


# ---- ar planner ---------------------------------------------------------------------------------

def _ar_example(processor: Any, prompt: str, sign: scene.Sign) -> tuple[list[int], list[list[int]], list[int]]:
    """(input ids, mRoPE positions [3][len], labels) for teacher forcing, as the runtime decodes."""
    from glm_image_onnx.runtime.mrope import text_to_image_positions

    ids = processor.apply_chat_template([[{"role": "user", "content": [{"type": "text", "text": prompt}]}]],
                                        tokenize=True, target_h=scene.SIZE, target_w=scene.SIZE,
                                        return_dict=True)["input_ids"][0]
    generated = sign.ar_tokens().tolist() + [DEMO.ar.codebook_size + 1]  # ... then end of image
    prefill, decode = text_to_image_positions(len(ids), (scene.GRID, scene.GRID), (16, 16))
    positions = np.concatenate([prefill, decode[:, :len(generated) - 1]], axis=1)
    labels = [-100] * (len(ids) - 1) + generated
    return ids + generated[:-1], positions.tolist(), labels


def _letter_row_mask(prompt_len: int, length: int) -> np.ndarray:
    """True at the label positions of the letter rows, preview and target (see `_ar_example`)."""
    rows = np.zeros((16, 16), dtype=bool)
    rows[2 * scene.TEXT_ROW:2 * scene.TEXT_ROW + 2] = True
    target = np.zeros((scene.GRID, scene.GRID), dtype=bool)
    target[scene.TEXT_ROW] = True
    mask = np.zeros(length, dtype=bool)
    mask[prompt_len - 1:prompt_len - 1 + rows.size + target.size] = np.concatenate([rows.ravel(), target.ravel()])
    return mask


def train_ar(work: Path, seed: int) -> None:
    from transformers import GlmImageForConditionalGeneration, GlmImageProcessor

    torch = _torch()
    torch.manual_seed(seed)
    init = init_checkpoint(work, seed)
    model = GlmImageForConditionalGeneration.from_pretrained(init / "vision_language_encoder").train()
    processor = GlmImageProcessor.from_pretrained(init / "processor")
    lm = model.model.language_model
    state = _State(work, "ar", {"ar": model}, list(lm.parameters()) + list(model.lm_head.parameters()))

    def loss_at(step: int) -> Any:
        rng = _rng(seed, "ar", step)
        rows = [_ar_example(processor, *scene.training_example(rng)) for _ in range(BATCH["ar"])]
        longest = max(len(r[0]) for r in rows)
        pad = longest - np.array([len(r[0]) for r in rows])
        # Right padding: causal attention keeps the padding out of every real position's view.
        ids = torch.tensor([r[0] + [0] * p for r, p in zip(rows, pad)])
        pos = torch.tensor([[axis + [axis[-1]] * p for axis in r[1]] for r, p in zip(rows, pad)]).permute(1, 0, 2)
        labels = torch.tensor([r[2] + [-100] * p for r, p in zip(rows, pad)])
        logits = model.lm_head(lm(input_ids=ids, position_ids=pos).last_hidden_state)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                                 reduction="none").view(labels.shape)
        weight = (labels != -100).float()
        if step >= AR_LAYOUT_STEPS:
            letters = [_letter_row_mask(len(r[0]) - 16 * 16 - scene.GRID ** 2, longest) for r in rows]
            weight = weight * torch.from_numpy(np.where(np.stack(letters), LETTER_WEIGHT, 1.0)).float()
        return (loss * weight).sum() / weight.sum()

    state.run(loss_at)


# ---- assemble -----------------------------------------------------------------------------------

def assemble(work: Path, out: Path) -> None:
    """The trained components over the initial checkpoint, written whole or not at all."""
    from diffusers import GlmImageTransformer2DModel
    from transformers import GlmImageForConditionalGeneration, T5EncoderModel

    from glm_image_onnx.atomic import staged_folder

    torch = _torch()
    init = work / "init"
    dit_state = torch.load(work / "dit.pt", weights_only=False)["modules"]
    parts = {
        "vae": trained_vae(work),
        "transformer": _loaded(GlmImageTransformer2DModel.from_pretrained(init / "transformer"), dit_state["ema"]),
        "text_encoder": _loaded(T5EncoderModel.from_pretrained(init / "text_encoder"), dit_state["glyph"]),
        "vision_language_encoder": _loaded(
            GlmImageForConditionalGeneration.from_pretrained(init / "vision_language_encoder"),
            torch.load(work / "ar.pt", weights_only=False)["modules"]["ar"]),
    }
    if out.exists():
        shutil.rmtree(out)
    with staged_folder(out) as tmp:
        for item in init.iterdir():
            if item.name not in parts:
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        for folder, model in parts.items():
            model.save_pretrained(tmp / folder)
        (tmp / "glm_image_onnx_preset.json").write_text(json.dumps(
            {"preset": DEMO.name, "trained": "python -m glm_image_onnx.models.demo_train",
             "steps": STEPS, "batch": BATCH}, indent=2) + "\n")


def _loaded(model: Any, state: dict[str, Any]) -> Any:
    model.load_state_dict(state)
    return model.eval()


# ---- eval: each trained stage judged alone, on held-out words ---------------------------------

def evaluate(work: Path, seed: int, n: int = 12) -> dict[str, float]:
    """What each stage trained so far gives on `n` benchmark prompts: OCR exact words on the VAE's
    reconstructions of the true signs; OCR exact words and characters on diffusers' pipeline fed
    the true layout tokens (DiT + glyph encoder + VAE, 20 steps); the AR planner's greedy target grids equal to the
    true layout."""
    import torch
    from diffusers import GlmImagePipeline

    bench = scene.benchmark_set(n)
    signs = [s for _, s in bench]
    pipe = GlmImagePipeline.from_pretrained(work / "init")
    pipe.set_progress_bar_config(disable=True)
    out: dict[str, float] = {}

    if (work / "vae.json").exists():
        pipe.vae = trained_vae(work)
        with torch.no_grad():
            x = _pixels([s.render() for s in signs])
            recon = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mode()).sample
        recon_images = pipe.image_processor.postprocess(recon, output_type="pil")
        out["vae_recon_exact_pct"] = scene.score(recon_images, signs)["exact_pct"]
    if (work / "dit.pt").exists() and "vae_recon_exact_pct" in out:
        saved = torch.load(work / "dit.pt", weights_only=False)
        _loaded(pipe.transformer, saved["modules"]["ema"])
        _loaded(pipe.text_encoder, saved["modules"]["glyph"])
        images = [pipe(p, prior_token_ids=torch.from_numpy(s.prior_tokens()), height=scene.SIZE,
                       width=scene.SIZE, num_inference_steps=20,
                       generator=torch.Generator().manual_seed(i)).images[0] for i, (p, s) in enumerate(bench)]
        ocr = scene.score(images, signs)
        out["dit_at_true_layout_exact_pct"], out["dit_at_true_layout_chars_pct"] = ocr["exact_pct"], ocr["char_pct"]
        out["dit_step"] = saved["step"]
    if (work / "ar.pt").exists():
        saved = torch.load(work / "ar.pt", weights_only=False)
        _loaded(pipe.vision_language_encoder, saved["modules"]["ar"])
        grids = [_greedy_target(pipe, p) for p, _ in bench]
        out["ar_greedy_layout_exact_pct"] = 100 * float(np.mean(
            [np.array_equal(g, s.layout().ravel()) for g, (_, s) in zip(grids, bench)]))
        out["ar_step"] = saved["step"]
    return out


def _greedy_target(pipe: Any, prompt: str) -> np.ndarray:
    """The AR planner's greedy target grid for `prompt`, as diffusers' pipeline prompts it."""
    import torch

    inputs = pipe.processor.apply_chat_template(
        [[{"role": "user", "content": [{"type": "text", "text": prompt}]}]], tokenize=True,
        target_h=scene.SIZE, target_w=scene.SIZE, return_dict=True, return_tensors="pt")
    preview = 16 * 16
    with torch.no_grad():
        out = pipe.vision_language_encoder.generate(**inputs, max_new_tokens=preview + scene.GRID ** 2 + 1,
                                                    do_sample=False)
    return out[0, inputs["input_ids"].shape[1] + preview:][:scene.GRID ** 2].numpy()


STAGES: dict[str, Callable[[Path, int], None]] = {"vae": train_vae, "dit": train_dit, "ar": train_ar}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="state folder (resumed when it exists)")
    parser.add_argument("--stage", choices=[*STAGES, "assemble", "eval", "all"], default="all",
                        help="eval: OCR and layout accuracy of what is trained so far")
    parser.add_argument("--out", type=Path, default=Path("models/demo"), help="the trained checkpoint (assemble, all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    torch = _torch()
    import transformers

    transformers.logging.set_verbosity_error()  # the processor's per-call deprecation notes
    if args.threads:
        torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    init_checkpoint(args.work, args.seed)
    if args.stage == "eval":
        print(json.dumps(evaluate(args.work, args.seed)))
        return 0
    for name in (STAGES if args.stage == "all" else [args.stage] if args.stage != "assemble" else []):
        STAGES[name](args.work, args.seed)
    if args.stage in ("assemble", "all"):
        assemble(args.work, args.out)
        print(f"wrote the demo checkpoint to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
