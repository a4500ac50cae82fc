"""`glm_image`: the whole text-to-image / image-editing pipeline as one served model.

The request contract (inputs, parameters, outputs, limits) lives in `glm_image_request`, shared
with the Triton Python-backend model; this class adds the server's side: metadata, scheduling on a
worker, and the pipeline's progress callback, which checks for cancellation between AR tokens and
denoising steps.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from glm_image_onnx.server import glm_image_request as glm
from glm_image_onnx.server.admission import Admission
from glm_image_onnx.server.context import RequestContext
from glm_image_onnx.server.limits import Limits, to_parameters
from glm_image_onnx.server.memory import Cost
from glm_image_onnx.server.metrics import Metrics
from glm_image_onnx.server.models import Decoded, Model, Prepared, Progress, Result

__all__ = ["GlmImageModel", "Limits"]


class GlmImageModel(Model):
    name = "glm_image"
    platform = "glm_image_onnx"
    backend = "glm_image_onnx"

    def __init__(self, pipeline: Any, limits: Limits = Limits(), metrics: Metrics | None = None):
        super().__init__()
        self.pipeline = pipeline
        self.metrics = metrics
        # With AR batching, up to max_rows generations run at once (their AR steps shared, the other
        # graphs one at a time: GlmImageOnnxPipeline), each on a worker of this pool; admission
        # (max-concurrency + max-queue) still counts them. Without it they take the server's workers.
        self.batching = pipeline.ar_batching
        self.executor: ThreadPoolExecutor | None = None
        if pipeline.ar_engine is not None:
            self.executor = ThreadPoolExecutor(self.batching.max_rows, thread_name_prefix="glm-image-generation")
            if metrics is not None:
                pipeline.ar_engine.on_step = metrics.ar_call
        self.limits = limits.for_package(pipeline.image_processor, pipeline.grid)
        self.ar_cost: Cost | None = None  # the AR planner's, for long prompts (server.memory)
        self.inputs = list(glm.INPUTS)
        self.outputs = list(glm.OUTPUTS)
        self.instance_kind = "KIND_CPU" if pipeline.providers[0] == "CPUExecutionProvider" else "KIND_GPU"
        # The recipe that made the package (`glm-image-onnx quantize`); "none" for an exported fp32 one.
        manifest = pipeline.package.manifest
        self.quantization = (manifest.quantization or {}).get("recipe", "none")
        self.target = f"{manifest.target.name} {manifest.target.dtype}"  # what the package was built for (glm_image_onnx.targets)

    def parameters(self) -> dict[str, str]:
        return {
            "streaming_progress": "ModelStreamInfer sends progress responses (parameter progress_stage) "
                                  "before the image",
            "providers": ",".join(self.pipeline.providers), "quantization": self.quantization, "target": self.target,
            **to_parameters(self.limits),  # every bound of a request
            # ar_enabled, ar_max_rows, ar_join_wait_ms
            **{f"ar_{k}": str(v).lower() for k, v in dataclasses.asdict(self.batching).items()},
        }

    def parse(self, inputs: dict[str, np.ndarray], params: dict[str, Any]) -> glm.GlmImageRequest:
        """A checked request from tensors and parameters (INVALID_ARGUMENT naming the field)."""
        return glm.parse(inputs, params, self.limits, self.pipeline.supports_image_to_image)

    def prepare(self, decoded: Decoded) -> Prepared:
        request = decoded.request or self.parse(decoded.inputs, decoded.parameters)
        prepared = Prepared({}, self.output_names(decoded.outputs), request=request)
        if self.cost is not None:
            prepared.memory = self.estimate(request)
        return prepared

    def estimate(self, r: glm.GlmImageRequest) -> int:
        """Peak bytes of a generation (server.memory): the measured cost at its size, or its AR
        prefill's where a long prompt makes that the larger ([prompt x cache] scores per head)."""
        pipe = self.pipeline
        source = r.images[0].size[::-1] if r.images else None
        height, width = pipe.config.image_size(r.height, r.width, source)
        peak = self.cost(height * width)
        if self.ar_cost is not None and pipe.prompts.prompt_error(r.prompt) is None:
            grids = [pipe.image_processor.grid(im.height, im.width) for im in r.images]
            built = pipe.prompts.build(r.prompt, height, width, grids)
            prompt = built.input_ids.shape[1]
            peak = max(peak, self.ar_cost(prompt * (prompt + built.max_new_tokens)))
        return peak

    def submit(self, prepared: Prepared, ctx: RequestContext, admission: Admission,
               progress: Progress | None = None) -> Future:
        def on_progress(stage: str, done: int, total: int) -> None:
            ctx.check()  # raising here stops the pipeline between AR tokens / denoising steps
            if progress is not None:
                progress(stage, done, total)

        def work() -> Result:
            out = glm.run(self.pipeline, prepared.request, prepared.outputs, self.limits, on_progress)
            t = out.timings
            self.stats.execution_done(1, t.total_s)
            ctx.ar_rows = t.ar_batch_rows
            if self.metrics is not None:
                self.metrics.ar_queue_seconds.observe(t.ar_queue_s)
                if self.pipeline.ar_engine is None:  # the engine reports each of its calls itself
                    self.metrics.ar_call("alone", t.ar_tokens, t.ar_prefill_s + t.ar_decode_s)
            return out

        return admission.run(ctx, work, self.executor)

    def close(self) -> None:
        self.pipeline.close()
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
