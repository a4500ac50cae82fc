"""A Triton model repository for an exported package (`glm-image-onnx triton-repo PACKAGE OUT`).

- every ONNX graph -> `<graph>/config.pbtxt` + `<graph>/1/<graph>.onnx` (and its external data),
  platform `onnxruntime_onnx`; inputs/outputs from the manifest; dynamic batching where every
  input and output has the leading `batch` axis (the same rule as `glm-image-onnx serve`);
  instance groups and CPU / CUDA / TensorRT accelerator settings by `--kind` and `--tensorrt`.
- `glm_image` -> a Python-backend model (`1/model.py` = server/triton_python_model.py) that embeds
  the onnxruntime pipeline (the module says why embedded rather than BLS) and reads the package from
  `1/package/`.

Configs are built as `model_config_pb2.ModelConfig` messages and written with protobuf's
text_format, so every config.pbtxt parses with tritonclient's model_config_pb2.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from glm_image_onnx.atomic import staged_folder
from glm_image_onnx.manifest import Graph
from glm_image_onnx.runtime.package import Package
from glm_image_onnx.server import glm_image_request as glm
from glm_image_onnx.server.limits import Limits, to_parameters
from glm_image_onnx.server.specs import TensorSpec, graph_specs
from glm_image_onnx.server.tensors import CONFIG_TYPE

PYTHON_MODEL = Path(__file__).with_name("triton_python_model.py")


@dataclass(frozen=True)
class RepoOptions:
    kind: str = "cpu"  # cpu | gpu
    max_batch_size: int = 8
    max_queue_delay_us: int = 100
    instances: int = 1
    tensorrt: bool = False
    fp16: bool = False
    files: str = "link"  # link (hard link, else copy) | copy | symlink
    components: bool = True
    pipeline: bool = True
    provider: str | None = None  # glm_image's provider; default cuda for kind gpu, else cpu
    provider_options: dict[str, str] | None = None
    limits: Limits = Limits()  # glm_image's request bounds (server.limits)
    overwrite: bool = False

    def check(self) -> None:
        if self.kind not in ("cpu", "gpu"):
            raise ValueError(f"kind must be cpu or gpu, got {self.kind!r}")
        if self.max_batch_size < 0 or self.instances < 1 or self.max_queue_delay_us < 0:
            raise ValueError("max_batch_size and max_queue_delay_us must be >= 0 and instances >= 1")
        if self.tensorrt and self.kind != "gpu":
            raise ValueError("tensorrt needs kind gpu")
        if self.fp16 and not self.tensorrt:
            raise ValueError("fp16 applies to the TensorRT accelerator: add tensorrt")
        if self.files not in ("link", "copy", "symlink"):
            raise ValueError(f"files must be link, copy or symlink, got {self.files!r}")
        if not (self.components or self.pipeline):
            raise ValueError("nothing to write: both the components and the pipeline are excluded")


def _add_tensors(cfg: mc.ModelConfig, inputs: list[TensorSpec], outputs: list[TensorSpec], batched: bool) -> None:
    for spec in inputs:
        dims = spec.dims()[1:] if batched else spec.dims()
        cfg.input.add(name=spec.name, data_type=mc.DataType.Value(CONFIG_TYPE[spec.datatype]), dims=dims,
                      optional=spec.optional)
    for spec in outputs:
        dims = spec.dims()[1:] if batched else spec.dims()
        cfg.output.add(name=spec.name, data_type=mc.DataType.Value(CONFIG_TYPE[spec.datatype]), dims=dims)


def _instances(cfg: mc.ModelConfig, options: RepoOptions) -> None:
    kind = mc.ModelInstanceGroup.KIND_GPU if options.kind == "gpu" else mc.ModelInstanceGroup.KIND_CPU
    cfg.instance_group.add(count=options.instances, kind=kind)


def component_config(name: str, graph: Graph, options: RepoOptions) -> mc.ModelConfig:
    inputs, outputs, batchable = graph_specs(graph)
    batched = batchable and options.max_batch_size > 0
    cfg = mc.ModelConfig(name=name, platform="onnxruntime_onnx", backend="onnxruntime",
                         max_batch_size=options.max_batch_size if batched else 0,
                         default_model_filename=Path(graph.file).name)
    _add_tensors(cfg, inputs, outputs, batched)
    if batched and options.max_batch_size > 1:
        cfg.dynamic_batching.max_queue_delay_microseconds = options.max_queue_delay_us
    _instances(cfg, options)
    accelerators = cfg.optimization.execution_accelerators
    if options.kind == "gpu" and options.tensorrt:
        trt = accelerators.gpu_execution_accelerator.add(name="tensorrt")
        trt.parameters["precision_mode"] = "FP16" if options.fp16 else "FP32"
        trt.parameters["max_workspace_size_bytes"] = str(4 << 30)
        trt.parameters["trt_engine_cache_enable"] = "1"
        trt.parameters["trt_engine_cache_path"] = f"/tmp/glm_image_trt_cache/{name}"
    elif options.kind == "gpu":
        cuda = accelerators.gpu_execution_accelerator.add(name="cuda")
        cuda.parameters["cudnn_conv_use_max_workspace"] = "1"
    else:
        # one op at a time on all cores, as the runtime's CPU sessions (chains of large MatMuls)
        cfg.parameters["execution_mode"].string_value = "0"
        cfg.parameters["inter_op_thread_count"].string_value = "1"
    if graph.description:
        cfg.parameters["description"].string_value = graph.description
    return cfg


def pipeline_config(options: RepoOptions) -> mc.ModelConfig:
    cfg = mc.ModelConfig(name="glm_image", backend="python", max_batch_size=0)
    _add_tensors(cfg, glm.INPUTS, glm.OUTPUTS, batched=False)
    _instances(cfg, options)
    provider = options.provider or ("cuda" if options.kind == "gpu" else "cpu")
    params = {"package": "package", "provider": provider,
              "provider_options": json.dumps(options.provider_options or {}), "verify_files": "false",
              **to_parameters(options.limits)}
    for key, value in params.items():
        cfg.parameters[key].string_value = value
    return cfg


def write_config(cfg: mc.ModelConfig, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.pbtxt"
    path.write_text(text_format.MessageToString(cfg))
    return path


def read_config(path: Path) -> mc.ModelConfig:
    return text_format.Parse(Path(path).read_text(), mc.ModelConfig())


def _place(src: Path, dst: Path, how: str) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if how == "symlink":
        dst.symlink_to(src.resolve())
        return
    if how == "link":
        try:
            os.link(src, dst)
            return
        except OSError:
            pass  # another filesystem: copy
    shutil.copy2(src, dst)


def _place_tree(src: Path, dst: Path, how: str) -> None:
    if how == "symlink":
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to(src.resolve(), target_is_directory=True)
        return
    for path in sorted(src.rglob("*")):
        if path.is_file():
            _place(path, dst / path.relative_to(src), how)


def write_repository(package_dir: Path, out: Path, options: RepoOptions = RepoOptions()) -> Path:
    options.check()
    package = Package.open(package_dir)
    out = Path(out)
    if out.exists() and not options.overwrite and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty (use --overwrite)")
    with staged_folder(out) as tmp:  # an existing repository stays as it was until the new one is whole
        if options.components:
            for name, graph in package.graphs.items():
                write_config(component_config(name, graph, options), tmp / name)
                version = tmp / name / "1"
                _place(package.graph_path(name), version / Path(graph.file).name, options.files)
                for extra in graph.external_data:  # relative to the graph file, kept beside it
                    _place(package.file(extra), version / Path(extra).name, options.files)
        if options.pipeline:
            write_config(pipeline_config(options), tmp / "glm_image")
            version = tmp / "glm_image" / "1"
            version.mkdir(parents=True, exist_ok=True)
            shutil.copy2(PYTHON_MODEL, version / "model.py")
            _place_tree(package.root, version / "package", options.files)
    return out
