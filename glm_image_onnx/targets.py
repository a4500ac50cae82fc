"""Build targets: the execution provider a package is built for, and in which dtype.

One graph set cannot serve every provider (see `export/kernels/`): onnxruntime's CUDA
GroupQueryAttention exists for fp16/bf16 only, the int8-dynamic ops exist on CPU only, and the CANN
EP implements no com.microsoft op at all and recompiles for every new set of input shapes. So a
package is built for one target; its manifest says which (`target`), and the runtime, the server,
the quantiser and `glm-image-onnx check` read it from there. Each fact about a target lives here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Target:
    name: str
    provider: str  # the runtime's provider name that runs it (runtime.providers.PROVIDERS)
    dtypes: tuple[str, ...]  # first = default
    recipes: tuple[str, ...]  # quantisation recipes whose ops this target's provider runs
    why_not: dict[str, str]  # recipe -> why it is refused on this target
    # Graphs of basic ai.onnx ops only (no onnxruntime contrib op, no fusions) with input shapes that
    # stay put between calls: the padded lengths in SHAPE_BUCKETS, a fixed-capacity AR cache.
    static_shapes: bool = False

    @property
    def default_dtype(self) -> str:
        return self.dtypes[0]


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("cpu", "cpu", ("fp32",), ("int8-dynamic", "int8-static", "int4-weight", "fp16"), {}),
    # GLM-Image ships in bfloat16: bf16 is CUDA's default; fp16 is the other choice (overflow reported).
    Target("cuda", "cuda", ("bf16", "fp16"), ("int4-weight",), {
        "int8-dynamic": "DynamicQuantizeMatMul / MatMulInteger + DynamicQuantizeLinear have no CUDA kernel "
                        "(they would run on the CPU)",
        "int8-static": "onnxruntime's static quantiser works on fp32 graphs only, and a cuda package is "
                       "already half precision",
        "fp16": "a cuda package is already half precision: export it with --dtype fp16",
    }),
    # Ascend computes in fp16 unless told otherwise (precision_mode force_fp16): fp16 is the default.
    Target("cann", "cann", ("fp16", "fp32"), (), {
        **{r: "the CANN EP has no quantisation kernels (no QuantizeLinear/DequantizeLinear, MatMulInteger "
              "or MatMulNBits)" for r in ("int8-dynamic", "int8-static", "int4-weight")},
        "fp16": "export the cann package with --dtype fp16 instead",
    }, static_shapes=True),
)}
# The runtime's provider names (`--provider`), one per target's provider; runtime.providers maps them
# to onnxruntime's.
PROVIDER_NAMES = tuple(dict.fromkeys(t.provider for t in TARGETS.values()))

# Padded lengths of a static-shapes package (recorded in its manifest, where the runtime reads them):
# each call is padded up to the smallest bucket that holds it, so a graph sees at most one input-shape
# set per bucket (CANN graph mode compiles once per set). Powers of two: at most 2x padding.
#   prompt: AR prefill lengths; a longer prompt (image-to-image carries its sources' tokens: 4096 per
#     1024 px source) is prefilled in chunks of the largest, which also bounds the attention scores
#   capacity: AR cache positions (prompt bucket + new tokens; 2048x2048 text-to-image needs 4353 new)
#   glyph: ByT5 tokens per quoted text (the pipeline truncates at 2048, plus one pad)
#   dit_text: glyph tokens of one prompt, all texts together, as the DiT reads them
SHAPE_BUCKETS: dict[str, list[int]] = {
    "prompt": [64, 128, 256, 512],
    "capacity": [2 ** i for i in range(9, 17)],  # 512 .. 65536
    "glyph": [2 ** i for i in range(4, 13)],  # 16 .. 4096
    "dit_text": [2 ** i for i in range(4, 15)],  # 16 .. 16384
}

# dtype names (CLI, manifest) -> element type names (onnx_info.DTYPES, manifest signatures).
ELEMENT_TYPE = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; choose from {', '.join(TARGETS)}")
    return TARGETS[name]


def check_dtype(target: Target, dtype: str | None) -> str:
    """The dtype to build (the target's default when None); a clear error for a combination it lacks."""
    dtype = dtype or target.default_dtype
    if dtype not in target.dtypes:
        raise ValueError(f"--dtype {dtype} is not built for target {target.name} "
                         f"(choose from {', '.join(target.dtypes)})")
    return dtype


def build_command(target: str, dtype: str | None = None) -> str:
    """The command that builds a package for `target`, as a user would type it."""
    t = get_target(target)
    flags = f" --target {t.name}" + ("" if t.name == "cpu" else f" --dtype {dtype or t.default_dtype}")
    return f"glm-image-onnx export CHECKPOINT PACKAGE{flags}"


# (built for, opened on) -> what goes wrong, in a few words.
MISMATCH = {
    ("cpu", "cuda"): "GroupQueryAttention has no fp32 CUDA kernel, so the AR planner's attention runs on the CPU "
                     "with the cache copied across every layer and token",
    ("cpu", "cann"): "the CANN EP implements no com.microsoft op (GroupQueryAttention, RotaryEmbedding, "
                     "MultiHeadAttention, ...), so those run on the CPU",
    ("cuda", "cpu"): "half-precision graphs run slower on the CPU than fp32 (bfloat16 ones not at all)",
    ("cuda", "cann"): "the CANN EP implements no com.microsoft op and no bfloat16",
    ("cann", "cpu"): "its attention and norms are unfused basic ops and every call is padded to a bucket, "
                     "slower on the CPU than a cpu package",
    ("cann", "cuda"): "its attention and norms are unfused basic ops and every call is padded to a bucket, "
                      "slower on CUDA than a cuda package",
}


def mismatch(target: Any, provider: str, provider_name: str, package: Any) -> str:
    """The line for a package built for `target` (manifest.Target) opened on `provider`: what goes
    wrong, what to build."""
    fix = (build_command(provider) if provider in TARGETS
           else f"glm-image-onnx check {package} --provider {provider} lists what falls back")
    return (f"built for target {target.name} ({target.dtype}) but opened on {provider_name}: "
            f"{MISMATCH.get((target.name, provider), 'its graphs are not shaped for it')}; "
            f"build one for {provider}: {fix}")


def recipe_refusal(target_name: str, recipe: str) -> str | None:
    """Why `recipe` cannot build on a `target_name` package, or None if it can."""
    t = get_target(target_name)
    if recipe in t.recipes:
        return None
    return (f"recipe {recipe} does not run on target {t.name}: "
            f"{t.why_not.get(recipe, 'its ops fall back to the CPU there')}; "
            f"recipes for {t.name}: {', '.join(t.recipes) or 'none'}")
