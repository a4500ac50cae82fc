"""Quantisation of an exported package: int8 (dynamic, static QDQ), int4 weight-only, fp16.

Torch-free (onnx + onnxruntime's quantisation tools); see `quantize.package.quantize_package`.
"""

from glm_image_onnx.quantize.package import RECIPES, QuantizeError, QuantizeOptions, quantize_package
from glm_image_onnx.quantize.quality import Thresholds

__all__ = ["RECIPES", "QuantizeError", "QuantizeOptions", "Thresholds", "quantize_package"]
