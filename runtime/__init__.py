"""Torch-free runtime: an ONNX package -> images (numpy, onnxruntime, tokenizers, pillow, jinja2)."""

from glm_image_onnx.runtime.ar_batch import ArBatching
from glm_image_onnx.runtime.package import Package, PackageError
from glm_image_onnx.runtime.pipeline import GlmImageOnnxPipeline, GlmImageOutput
from glm_image_onnx.runtime.providers import ProviderError, ProviderRequest

__all__ = ["ArBatching", "GlmImageOnnxPipeline", "GlmImageOutput", "Package", "PackageError", "ProviderError", "ProviderRequest"]
