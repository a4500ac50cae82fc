"""The flow-matching Euler schedule, exactly as `GlmImagePipeline` drives diffusers'
`FlowMatchEulerDiscreteScheduler` (numpy only, float32 like the scheduler's tensors).

The pipeline passes *both* timesteps and sigmas to `set_timesteps`, so the timesteps it feeds the
DiT are the unshifted `linspace(T, 1, N + 1)[:-1]` truncated to integers, while only the sigmas get
the resolution shift. Every float op below mirrors diffusers' own expression order so the results
are bit-identical, not just close.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, base_shift: float = 0.25,
                    max_shift: float = 0.75) -> float:
    """`mu` of the pipeline (python float64, as in `pipeline_glm_image.calculate_shift`)."""
    return (image_seq_len / base_seq_len) ** 0.5 * max_shift + base_shift


def image_seq_len(height: int, width: int, vae_scale_factor: int = 8, patch_size: int = 2) -> int:
    """The pipeline's `image_seq_len`: DiT tokens of the target latent."""
    return ((height // vae_scale_factor) * (width // vae_scale_factor)) // (patch_size ** 2)


@dataclass(frozen=True)
class FlowMatchSchedule:
    """`FlowMatchEulerDiscreteScheduler` config; defaults are the scheduler class's own.

    Keys missing from a config take the *class* defaults (base_shift 0.5, max_shift 1.15), not the
    pipeline's `.get(..., 0.25/0.75)` fallbacks: diffusers fills every key at load, so those
    fallbacks never fire.
    """

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float | None = 0.5
    max_shift: float | None = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    invert_sigmas: bool = False
    shift_terminal: float | None = None
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    time_shift_type: str = "exponential"
    stochastic_sampling: bool = False

    def __post_init__(self) -> None:
        if self.use_beta_sigmas:
            raise ValueError("scheduler config: use_beta_sigmas needs scipy's beta.ppf; not supported by this runtime")
        if self.use_exponential_sigmas and self.use_karras_sigmas:
            raise ValueError("scheduler config: only one of use_beta/exponential/karras_sigmas can be set")
        if self.time_shift_type not in ("exponential", "linear"):
            raise ValueError(f"scheduler config: time_shift_type {self.time_shift_type!r} is not "
                             "'exponential' or 'linear'")
        if self.use_dynamic_shifting and (self.base_shift is None or self.max_shift is None):
            raise ValueError("scheduler config: use_dynamic_shifting needs base_shift and max_shift")

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "FlowMatchSchedule":
        """From `scheduler/scheduler_config.json` (a dict); unknown keys are ignored, as diffusers does."""
        name = config.get("_class_name", "FlowMatchEulerDiscreteScheduler")
        if name != "FlowMatchEulerDiscreteScheduler":
            raise ValueError(f"scheduler {name!r} is not supported (only FlowMatchEulerDiscreteScheduler)")
        known = {f.name for f in fields(cls) if not f.name.startswith("_")}
        return cls(**{k: v for k, v in config.items() if k in known})

    # ----------------------------------------------------------------------------------- schedule
    def mu(self, seq_len: int) -> float:
        return calculate_shift(seq_len, self.base_image_seq_len, self.base_shift, self.max_shift)

    def timesteps(self, num_inference_steps: int, image_seq_len: int,
                  custom_timesteps: list[float] | None = None,
                  custom_sigmas: list[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(timesteps float32 [N], sigmas float32 [N + 1] ending in the terminal 0 (1 if inverted)).

        `custom_timesteps` / `custom_sigmas` are the pipeline's `timesteps=` / `sigmas=` arguments.
        """
        if num_inference_steps < 1 and custom_timesteps is None:
            raise ValueError("num_inference_steps must be >= 1")
        T = self.num_train_timesteps
        ts = (np.linspace(T, 1.0, num_inference_steps + 1)[:-1] if custom_timesteps is None
              else np.array(custom_timesteps))
        ts = ts.astype(np.int64).astype(np.float32)  # the pipeline truncates to whole timesteps
        sig = ts / T if custom_sigmas is None else custom_sigmas
        if len(sig) != len(ts):
            raise ValueError("`sigmas` and `timesteps` should have the same length")

        # set_timesteps(sigmas=sig, timesteps=ts, mu=mu), step by step
        timesteps = np.array(ts).astype(np.float32)
        sigmas = np.array(sig).astype(np.float32)
        n = len(sigmas)
        if self.use_dynamic_shifting:
            mu = self.mu(image_seq_len)
            if self.time_shift_type == "exponential":
                sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)
            else:
                sigmas = mu / (mu + (1 / sigmas - 1) ** 1.0)
        else:
            sigmas = self.shift * sigmas / (1 + (self.shift - 1) * sigmas)
        if self.shift_terminal:
            one_minus_z = 1 - sigmas
            scale_factor = one_minus_z[-1] / (1 - self.shift_terminal)
            sigmas = 1 - (one_minus_z / scale_factor)
        if self.use_karras_sigmas:
            lo, hi = sigmas[-1].item(), sigmas[0].item()
            rho = 7.0
            ramp = np.linspace(0, 1, n)
            sigmas = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
        elif self.use_exponential_sigmas:
            lo, hi = sigmas[-1].item(), sigmas[0].item()
            sigmas = np.exp(np.linspace(math.log(hi), math.log(lo), n))
        sigmas = np.asarray(sigmas).astype(np.float32)
        if self.invert_sigmas:
            sigmas = (np.float32(1.0) - sigmas).astype(np.float32)
            timesteps = (sigmas * np.float32(T)).astype(np.float32)
            sigmas = np.concatenate([sigmas, np.ones(1, np.float32)])
        else:
            sigmas = np.concatenate([sigmas, np.zeros(1, np.float32)])
        return timesteps, sigmas

    # ---------------------------------------------------------------------------------------- step
    def step(self, model_output: np.ndarray, i: int, sample: np.ndarray, *, sigmas: np.ndarray,
             noise: np.ndarray | None = None) -> np.ndarray:
        """One Euler step from `sigmas[i]` to `sigmas[i + 1]` (the `timesteps()` result), in float32.

        The schedule holds no state: concurrent generations share one object, each with its own
        sigmas. diffusers upcasts `sample` to float32 and the pipeline passes `noise_pred.float()`,
        so both are cast to float32 here and float32 comes back. `noise` is required only for
        `stochastic_sampling` (diffusers draws it with torch's RNG).
        """
        sample = np.asarray(sample, dtype=np.float32)
        model_output = np.asarray(model_output, dtype=np.float32)
        sigma, sigma_next = np.float32(sigmas[i]), np.float32(sigmas[i + 1])
        if self.stochastic_sampling:
            if noise is None:
                raise ValueError("stochastic_sampling needs `noise` (a standard normal array like sample)")
            x0 = sample - sigma * model_output
            return ((np.float32(1.0) - sigma_next) * x0 + sigma_next * np.asarray(noise, np.float32)
                    ).astype(np.float32)
        dt = sigma_next - sigma
        return (sample + dt * model_output).astype(np.float32)


def guidance(noise_cond: np.ndarray, noise_uncond: np.ndarray, scale: float) -> np.ndarray:
    """The pipeline's CFG mix in float32 (`uncond + scale * (cond - uncond)`)."""
    c = np.asarray(noise_cond, np.float32)
    u = np.asarray(noise_uncond, np.float32)
    return u + np.float32(scale) * (c - u)
