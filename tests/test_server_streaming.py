"""ModelStreamInfer with the stock tritonclient (sync callback stream and aio stream_infer):
progress responses, then the image; errors in-band; the stream stays usable."""

from __future__ import annotations

import asyncio
import queue
from pathlib import Path

import numpy as np
import pytest

from _server_helpers import glm_inputs, outputs, tensor, tritonclient_grpc as grpcclient
from glm_image_onnx.runtime import GlmImageOnnxPipeline

SMALL = dict(height=64, width=64, steps=3, seed=99)


@pytest.fixture(scope="module")
def expected(tiny_package: Path) -> np.ndarray:
    pipe = GlmImageOnnxPipeline.from_package(tiny_package, verify_files=False)
    return np.asarray(pipe("a lighthouse", height=64, width=64, num_inference_steps=3, seed=99).images[0])


def _params(result) -> dict:
    out = {}
    for key, p in result.get_response().parameters.items():
        out[key] = getattr(p, p.WhichOneof("parameter_choice"))
    return out


def _collect(responses: queue.Queue, request_id: str, timeout: float = 30) -> tuple[list, object, object]:
    """Progress tuples, then the final result or error, for one request of the stream."""
    progress = []
    while True:
        result, error = responses.get(timeout=timeout)
        if error is not None:
            return progress, None, error
        assert result.get_response().id == request_id
        params = _params(result)
        if params.get("triton_final_response"):
            return progress, result, None
        progress.append((params["progress_stage"], params["progress_done"], params["progress_total"]))


def test_sync_stream_progress_then_image_and_errors_in_band(server, expected):
    responses: queue.Queue = queue.Queue()
    with grpcclient.InferenceServerClient(server.url) as client:
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        client.async_stream_infer("glm_image", glm_inputs(prompt="a lighthouse", **SMALL), request_id="one",
                                  outputs=outputs("image"))
        progress, result, error = _collect(responses, "one")
        assert error is None
        np.testing.assert_array_equal(result.as_numpy("image"), expected)
        ar = [p for p in progress if p[0] == "ar"]
        denoise = [p for p in progress if p[0] == "denoise"]
        assert ar and ar[-1][1] == ar[-1][2] and [d for _, d, _ in ar] == sorted(d for _, d, _ in ar)
        assert denoise == [("denoise", 1, 3), ("denoise", 2, 3), ("denoise", 3, 3)]
        assert progress.index(denoise[0]) > progress.index(ar[-1])

        # a bad request: the error arrives in-band, the stream keeps working
        client.async_stream_infer("glm_image", glm_inputs(height=50), request_id="bad")
        _, _, error = _collect(responses, "bad")
        assert "prompt" in str(error)
        client.async_stream_infer("glm_image", [tensor("prompt", "x"), tensor("height", 48)], request_id="bad2")
        _, _, error = _collect(responses, "bad2")
        assert "multiple of 32" in str(error)
        client.async_stream_infer("nope", glm_inputs(prompt="x"), request_id="bad3")
        _, _, error = _collect(responses, "bad3")
        assert "unknown model 'nope'" in str(error)

        # progress can be turned off; a component model streams one response
        client.async_stream_infer("glm_image", glm_inputs(prompt="a lighthouse", **SMALL), request_id="two",
                                  outputs=outputs("image"), parameters={"progress": False})
        progress, result, _ = _collect(responses, "two")
        assert progress == []
        np.testing.assert_array_equal(result.as_numpy("image"), expected)
        latents = np.zeros((1, 4, 8, 8), np.float32)
        client.async_stream_infer("vae_decoder", [tensor("latents", latents, "FP32")], request_id="vae")
        _, result, _ = _collect(responses, "vae")
        assert result.as_numpy("sample").shape == (1, 3, 64, 64)
        client.stop_stream()
    assert responses.empty()


def test_aio_stream_infer(server, expected):
    import tritonclient.grpc.aio as aioclient

    async def requests():
        yield {"model_name": "glm_image", "inputs": glm_inputs(prompt="a lighthouse", **SMALL),
               "outputs": outputs("image"), "request_id": "good"}
        yield {"model_name": "glm_image", "inputs": glm_inputs(steps=2), "request_id": "bad"}

    async def main():
        final, errors, progress = {}, [], 0
        async with aioclient.InferenceServerClient(server.url) as client:
            async for result, error in client.stream_infer(requests()):
                if error is not None:
                    errors.append(str(error))
                elif _params(result).get("triton_final_response"):
                    final[result.get_response().id] = result.as_numpy("image")
                else:
                    progress += 1
        return final, errors, progress

    final, errors, progress = asyncio.run(main())
    assert list(final) == ["good"] and progress > 3
    np.testing.assert_array_equal(final["good"], expected)
    assert len(errors) == 1 and "prompt" in errors[0]
