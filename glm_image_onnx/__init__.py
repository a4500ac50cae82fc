"""glm-image-onnx: GLM-Image as ONNX graphs, quantised and served.

Subpackages live in the repository's top-level folders (see pyproject's package-dir):
models -> export -> quantize -> runtime -> server, data flowing one way.
"""

__version__ = "0.1.0"
