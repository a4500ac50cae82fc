"""`glm_image` on Triton's Python backend (copied by `glm-image-onnx triton-repo` as glm_image/1/model.py).

Embedded runtime, not BLS: this model runs `GlmImageOnnxPipeline` (onnxruntime) inside the
backend's stub process. Through BLS every AR token would be a separate Triton request to the
`ar_planner` model carrying the whole KV cache in and out (for the published model, 40 layers x
2 x [1, 2, ~4k, 128] fp32: hundreds of MB per token, ~4k tokens per image) and every denoising
step a round trip through shared memory; embedded, the cache stays in onnxruntime between tokens
(on the GPU through IO binding), exactly as in `glm-image-onnx serve`. The cost: these sessions are
the model's own, so a repository that also serves the component models holds the weights twice;
write it with `--no-components` when only `glm_image` is needed.

The contract (inputs, parameters, limits, error messages) is the gRPC server's, from
`glm_image_onnx.server.glm_image_request`. Needs `glm-image-onnx` (base install: numpy,
onnxruntime or onnxruntime-gpu, tokenizers, pillow, jinja2) in the Python the stub runs.
"""

import json
import os
import site
import sys
import traceback

# The stub's embedded interpreter ignores PYTHONPATH: apply it (ahead of the system paths, .pth
# files included) so that a virtual environment holding glm_image_onnx can be pointed at.
_system_path = list(sys.path)
for _entry in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    if _entry:
        site.addsitedir(_entry)
sys.path[:] = [p for p in sys.path if p not in _system_path] + _system_path

import triton_python_backend_utils as pb_utils  # noqa: E402

_ERROR_CODES = {"INVALID_ARGUMENT": "INVALID_ARG", "NOT_FOUND": "NOT_FOUND", "UNAVAILABLE": "UNAVAILABLE",
                "CANCELLED": "CANCELLED", "UNIMPLEMENTED": "UNSUPPORTED", "RESOURCE_EXHAUSTED": "UNAVAILABLE",
                "DEADLINE_EXCEEDED": "CANCELLED", "INTERNAL": "INTERNAL"}


def _triton_error(code, message):
    try:
        return pb_utils.TritonError(message, getattr(pb_utils.TritonError, _ERROR_CODES.get(code, "INTERNAL")))
    except (AttributeError, TypeError):  # an older backend without error codes
        return pb_utils.TritonError(message)


class TritonPythonModel:
    def initialize(self, args):
        from glm_image_onnx.runtime import GlmImageOnnxPipeline
        from glm_image_onnx.server import errors, glm_image_request as glm
        from glm_image_onnx.server.limits import Limits, from_parameters

        self.glm, self.errors = glm, errors
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        package = params.get("package", "package")
        if not os.path.isabs(package):
            package = os.path.join(args["model_repository"], args["model_version"], package)
        provider = params.get("provider", "cpu")
        options = json.loads(params.get("provider_options") or "{}")
        if provider != "cpu" and args.get("model_instance_kind") == "GPU":
            options.setdefault("device_id", args.get("model_instance_device_id", "0"))
        threads = int(params["threads"]) if params.get("threads") else None
        self.pipeline = GlmImageOnnxPipeline.from_package(package, provider=provider, provider_options=options,
                                                          strict=params.get("strict") == "true",
                                                          verify_files=params.get("verify_files") == "true",
                                                          threads=threads)
        # Size bounds not set in the model config come from the package's processor config.
        self.limits = from_parameters(Limits, params).for_package(self.pipeline.image_processor, self.pipeline.grid)

    def execute(self, requests):
        return [self._one(request) for request in requests]

    def _one(self, request):
        glm = self.glm
        try:
            inputs = {}
            for name in glm.FIELDS:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    inputs[name] = tensor.as_numpy()
            params = json.loads(request.parameters() or "{}")
            outputs = glm.requested_outputs(list(request.requested_output_names()))
            parsed = glm.parse(inputs, params, self.limits, self.pipeline.supports_image_to_image)
            is_cancelled = getattr(request, "is_cancelled", None)

            def progress(stage, done, total):
                if is_cancelled is not None and is_cancelled():
                    raise self.errors.cancelled()

            result = glm.run(self.pipeline, parsed, outputs, self.limits, progress)
            tensors = [pb_utils.Tensor(name, array) for name, array, _ in result.outputs]
            return pb_utils.InferenceResponse(output_tensors=tensors)
        except self.errors.RequestError as e:
            return pb_utils.InferenceResponse(error=_triton_error(e.code, e.message))
        except Exception:  # the model stays loaded; the client is told no internals, Triton's log has them
            traceback.print_exc()
            return pb_utils.InferenceResponse(error=_triton_error("INTERNAL", "internal error (see the server log)"))

    def finalize(self):
        self.pipeline = None
