"""Torch-free runtime: an ONNX package -> images (numpy, onnxruntime, tokenizers, pillow, jinja2)."""

from .ar_batch import ArBatching
from .package import Package, PackageError
from .pipeline import GlmImageOnnxPipeline, GlmImageOutput
from .providers import ProviderError, ProviderRequest

__all__ = ["ArBatching", "GlmImageOnnxPipeline", "GlmImageOutput", "Package", "PackageError", "ProviderError", "ProviderRequest"]
