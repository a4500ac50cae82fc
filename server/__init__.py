"""Serving: a KServe v2 gRPC server for an exported package (`glm-image-onnx serve`), a client
(`glm-image-onnx client`) and a Triton model repository writer (`glm-image-onnx triton-repo`).

Needs the `[serve]` extra (grpcio, tritonclient[grpc], prometheus-client); never torch.
See server/README.md.
"""
