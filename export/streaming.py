"""Low-memory export: trace a weightless model, stream each weight from the checkpoint into the graph.

`export_package(..., ExportOptions(low_memory=True))` (CLI `export --low-memory`) never holds a
component's weights: the model is built with FakeTensor parameters (shapes and dtypes, no storage),
traced with `torch.onnx.export(optimize=False)`, and every fake initializer of the ONNX graph is
replaced by an `onnx_ir.LazyTensor` that reads its one tensor from the safetensors shards (plain
seek + read, converted to the export dtype) when the graph is saved. onnxscript's optimiser and
onnxruntime fusions run as in the plain export, except that nothing over a large initializer is
folded eagerly: Transpose(weight) becomes a transposed LazyTensor instead. The saved graphs equal
the plain export's (ops and initializer contents; tests/test_export_streaming.py).

Peak memory of one graph export is the traced program plus a few tensors in flight, not the
component's weights. See `export.low_memory` for how verification runs at that size.

An fp16 / bf16 export writes no fp32 weights at all: the fp32 graph is saved weightless (every
streamed weight an external reference to a file never written, `export_streamed(weights=...)`), and
precision.convert reads each weight from the checkpoint through its loader while it writes the
converted graph: the checkpoint's tensors go straight into the graph in the export dtype.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from glm_image_onnx.export.precision import FP16_MAX
_ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool}
# Initializers at least this big are never folded by the optimiser (that would load them early and
# keep the folded copy until the save); smaller ones are loaded and folded as in the plain export.
BIG_ELEMENTS = 8192


class ShardReader:
    """The safetensors files of one checkpoint folder (single file or shards with an index);
    `read(key, dtype)` returns one fresh CPU tensor, read with plain file I/O (no mapping kept)."""

    def __init__(self, folder: Path | str) -> None:
        folder = Path(folder)
        self.entries: dict[str, tuple[Path, int, int, torch.dtype, list[int]]] = {}
        shards = sorted(folder.glob("*.safetensors"))
        index = sorted(folder.glob("*.safetensors.index.json"))
        if index:  # only the shards the index names (a folder may hold stale files)
            names = set(json.loads(index[0].read_text())["weight_map"].values())
            shards = [folder / n for n in sorted(names)]
        if not shards:
            raise FileNotFoundError(f"no *.safetensors in {folder}")
        for shard in shards:
            with open(shard, "rb") as f:
                n = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(n))
            for key, e in header.items():
                if key == "__metadata__":
                    continue
                begin, end = e["data_offsets"]
                self.entries[key] = (shard, 8 + n + begin, end - begin, _ST_DTYPES[e["dtype"]], list(e["shape"]))

    def read(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        shard, offset, size, src, shape = self.entries[key]
        if size == 0:
            t = torch.empty(shape, dtype=src)
        else:
            buf = bytearray(size)
            with open(shard, "rb") as f:
                f.seek(offset)
                f.readinto(buf)
            t = torch.frombuffer(buf, dtype=src).reshape(shape)
        if dtype is not None and t.dtype != dtype:
            if dtype == torch.float16 and t.is_floating_point():
                t = t.float().clamp_(-FP16_MAX, FP16_MAX)  # bf16 / fp32 range exceeds fp16's
            t = t.to(dtype)
        return t


# ---------------------------------------------------------------------------------------------
# Weightless models

def _empty_model(build: Callable[[], torch.nn.Module], dtype: torch.dtype) -> torch.nn.Module:
    """`build()` under accelerate's init_empty_weights, then every parameter and persistent buffer a
    FakeTensor of its shape (floating ones in `dtype`). Non-persistent buffers (rotary inv_freq, ...)
    keep their real values from __init__: the checkpoint does not hold them. (torch.device('meta')
    does not do: the model code makes device-less tensors in forward.)"""
    from accelerate import init_empty_weights
    from torch._subclasses.fake_tensor import FakeTensorMode

    with init_empty_weights(include_buffers=False):
        model = build()
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fakes: dict[int, torch.Tensor] = {}  # by the original's identity: tied weights stay tied

    def fake_of(t: torch.Tensor, param: bool) -> torch.Tensor:
        if id(t) not in fakes:
            with mode:
                fake = torch.empty(t.shape, dtype=dtype if t.is_floating_point() else t.dtype, device="cpu")
            fakes[id(t)] = torch.nn.Parameter(fake, requires_grad=False) if param else fake
        return fakes[id(t)]

    originals = []  # alive until the end, so that no id is reused
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                originals.append(p)
                module._parameters[name] = fake_of(p, True)
        skip = getattr(module, "_non_persistent_buffers_set", set())
        for name, b in list(module._buffers.items()):
            if b is not None and name not in skip:
                originals.append(b)
                module._buffers[name] = fake_of(b, False)
    del originals
    if hasattr(model, "tie_weights"):  # transformers: init_empty_weights re-registers, so ties are lost
        model.tie_weights()
    model._glm_fake_mode = mode  # type: ignore[attr-defined]
    return model.eval()


def fake_component(folder: str, path: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The checkpoint component `folder` (see export.components.load_component) without weights."""
    path = Path(path)
    if folder == "vision_language_encoder":
        from transformers import AutoConfig, GlmImageForConditionalGeneration

        config = AutoConfig.from_pretrained(path)
        return _empty_model(lambda: GlmImageForConditionalGeneration(config), dtype)
    if folder == "text_encoder":
        from transformers import AutoConfig, T5EncoderModel

        config = AutoConfig.from_pretrained(path)
        config._attn_implementation = "eager"  # as load_component: sdpa fails at decomposition
        return _empty_model(lambda: T5EncoderModel(config), dtype)
    if folder == "transformer":
        from diffusers import GlmImageTransformer2DModel as cls
    elif folder == "vae":
        from diffusers import AutoencoderKL as cls
    else:
        raise KeyError(folder)
    config = cls.load_config(path)
    return _empty_model(lambda: cls.from_config(config), dtype)


# ---------------------------------------------------------------------------------------------
# Where each weight comes from

@dataclass(frozen=True)
class Source:
    """How to make one weight: a checkpoint key, or a concatenation / zeros of such (derived weights
    that wrappers compute once at __init__, e.g. models.ar_wrappers.FusedLinear)."""

    kind: str  # "key" | "cat" | "zeros"
    key: str = ""
    parts: tuple["Source", ...] = ()
    dim: int = 0
    shape: tuple[int, ...] = ()

    def load(self, reader: ShardReader, dtype: torch.dtype) -> torch.Tensor:
        if self.kind == "key":
            return reader.read(self.key, dtype)
        if self.kind == "cat":
            return torch.cat([p.load(reader, dtype) for p in self.parts], dim=self.dim)
        return torch.zeros(self.shape, dtype=dtype)


class Provenance:
    """Tensor identity -> Source, for a model's parameters and buffers and for whatever is derived
    from them while the graph specs are built (`with provenance.recording(): graph_specs(...)`)."""

    def __init__(self, model: torch.nn.Module, reader: ShardReader) -> None:
        self._by_id: dict[int, tuple[torch.Tensor, Source]] = {}
        available = set(reader.entries)
        aliases: dict[int, list[str]] = {}
        tensors: dict[int, torch.Tensor] = {}
        for key, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
            aliases.setdefault(id(t), []).append(key)
            tensors[id(t)] = t
        self.missing: list[str] = []
        fake = _fake_type()
        for i, keys in aliases.items():
            found = [k for k in keys if k in available]
            if found:
                self._by_id[i] = (tensors[i], Source("key", key=found[0]))
            elif isinstance(tensors[i], fake):
                self.missing.append(keys[0])

    def get(self, t: torch.Tensor) -> Source | None:
        hit = self._by_id.get(id(t))
        return hit[1] if hit is not None and hit[0] is t else None

    def recording(self) -> Any:
        from torch.utils._python_dispatch import TorchDispatchMode

        prov = self
        aten = torch.ops.aten

        class _Record(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                src = None
                if func is aten.cat.default:
                    parts = [prov.get(t) for t in args[0]]
                    if parts and all(p is not None for p in parts):
                        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
                        src = Source("cat", parts=tuple(parts), dim=int(dim))
                elif func in (aten.new_zeros.default, aten.zeros.default):
                    src = Source("zeros", shape=tuple(int(s) for s in out.shape))
                elif func in (aten.detach.default, aten.alias.default, aten.clone.default) and torch.is_tensor(args[0]):
                    src = prov.get(args[0])
                if src is not None and torch.is_tensor(out):
                    prov._by_id[id(out)] = (out, src)
                return out

        return _Record()


def _fake_type() -> type:
    from torch._subclasses.fake_tensor import FakeTensor

    return FakeTensor


# ---------------------------------------------------------------------------------------------
# Export

def _torch_tensor(t: torch.Tensor, name: str) -> Any:
    from torch.onnx._internal.exporter._core import TorchTensor

    return TorchTensor(t, name)


def bind_lazy_weights(model: Any, module: torch.nn.Module, prov: Provenance, reader: ShardReader) -> int:
    """Replace every FakeTensor initializer of `model` (named by FQN in `module`) by a LazyTensor."""
    import onnx_ir as ir

    fake = _fake_type()
    by_name = dict([*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)])
    n = 0
    for name, value in model.graph.initializers.items():
        cv = value.const_value
        if not isinstance(getattr(cv, "raw", None), fake):
            continue
        t = by_name.get(name)
        src = prov.get(t) if t is not None else None
        if src is None:
            raise KeyError(f"initializer {name!r} comes from no checkpoint tensor")
        dtype = t.dtype
        value.const_value = ir.LazyTensor(
            (lambda src=src, dtype=dtype, name=name: _torch_tensor(src.load(reader, dtype), name)),
            dtype=cv.dtype, shape=cv.shape, name=name)
        n += 1
    return n


def lazy_transpose_pass(model: Any, min_elements: int = BIG_ELEMENTS) -> int:
    """Transpose(initializer), where every use of a big initializer is a Transpose with one perm, ->
    one transposed LazyTensor initializer (what the optimiser's folding gives, loaded at save time)."""
    import onnx_ir as ir

    g = model.graph
    n = 0
    for name, src in list(g.initializers.items()):
        inner = src.const_value
        if inner is None or inner.size < min_elements or src.is_graph_input() or src.is_graph_output():
            continue
        users = [u.node for u in src.uses()]
        if not users or any(u.op_type != "Transpose" or u.domain != "" for u in users):
            continue
        shape = list(inner.shape)
        perms = {tuple(u.attributes["perm"].as_ints()) if "perm" in u.attributes
                 else tuple(reversed(range(len(shape)))) for u in users}
        if len(perms) != 1:
            continue
        perm = list(perms.pop())
        new_shape = ir.Shape([shape[i] for i in perm])

        def load(inner: Any = inner, perm: list[int] = perm, name: str = name) -> Any:
            t = inner._evaluate().raw if isinstance(inner, ir.LazyTensor) else torch.from_numpy(inner.numpy())
            return _torch_tensor(t.permute(*perm).contiguous(), name)

        g.initializers.pop(name)  # the transposed weight keeps the parameter's name
        new_val = ir.Value(name=name, shape=new_shape, type=ir.TensorType(inner.dtype),
                           const_value=ir.LazyTensor(load, dtype=inner.dtype, shape=new_shape, name=name))
        for u in users:
            u.outputs[0].replace_all_uses_with(new_val)
            g.remove(u, safe=True)
        g.register_initializer(new_val)
        n += 1
    return n


def _no_big_fold(node: Any) -> bool | None:
    for v in node.inputs:
        if v is not None and v.const_value is not None and v.is_initializer() and v.const_value.size > BIG_ELEMENTS:
            return False
    return None


def export_streamed(spec: Any, path: Path, prov: Provenance, reader: ShardReader, opset: int = 18,
                    basic_ops: bool = False, external: bool | None = None,
                    weights: dict[str, Callable[[], Any]] | None = None) -> dict[str, int]:
    """export.graph.export_onnx for a spec of a fake model: the same graph, weights streamed in.

    With `weights` (a dict to fill), the streamed weights are not written: the graph is saved with
    each one as an external reference to `<graph>.unwritten` and its loader put in `weights`
    under the initializer's name, for precision.convert(weights=...)."""
    import gc

    import onnx_ir as ir
    import onnxscript
    from onnxscript.optimizer import _constant_folding, optimize_ir

    from glm_image_onnx.export import graph as graph_mod

    path = Path(path)
    args = tuple(spec.example_inputs.values())
    translations = {**(graph_mod.basic_translations() if basic_ops else {}), **spec.custom_translation_table}
    with torch.no_grad(), graph_mod._registered(spec.custom_schemas), graph_mod._rare_gc():
        program = torch.onnx.export(
            spec.module, args, input_names=list(spec.example_inputs), output_names=spec.output_names,
            dynamic_shapes=spec.dynamic_shapes, opset_version=opset, dynamo=True,
            custom_translation_table=translations or None, external_data=False, optimize=False, verbose=False)
        model = program.model
        del program
        bind_lazy_weights(model, spec.module, prov, reader)
        ir.passes.common.InlinePass()(model)
        lazy_transpose_pass(model)
        saved = _constant_folding._DEFAULT_ALWAYS_FOLD_OPS
        _constant_folding._DEFAULT_ALWAYS_FOLD_OPS = frozenset()  # big Transposes: lazy_transpose_pass
        fusions: dict[str, int] = {}
        try:
            optimize_ir(model, should_fold=_no_big_fold)
            onnxscript.rewriter.onnx_fusions.fuse(model)
            if spec.ort_fusions and not basic_ops:
                from onnxscript.rewriter.ort_fusions import optimize_for_ort

                _, counts = optimize_for_ort(model)
                fusions = {k: v for k, v in counts.items() if v}
        finally:
            _constant_folding._DEFAULT_ALWAYS_FOLD_OPS = saved
        if lazy_transpose_pass(model):  # the ort fusions' Gemm -> MatMul(Transpose(W)) rule
            ir.passes.common.RemoveUnusedNodesPass()(model)
    if external is None:
        weight_bytes = sum(p.numel() * p.element_size() for p in spec.module.parameters())
        weight_bytes += sum(b.numel() * b.element_size() for b in spec.module.buffers())
        external = weight_bytes > graph_mod.EXTERNAL_DATA_THRESHOLD
    if weights is not None:
        for value in model.graph.initializers.values():
            lazy = value.const_value
            if isinstance(lazy, ir.LazyTensor):
                weights[value.name] = lazy.numpy
                value.const_value = ir.ExternalTensor(path.name + ".unwritten", 0, lazy.nbytes, lazy.dtype,
                                                      shape=lazy.shape, name=value.name)
        ir.save(model, str(path))
    elif external:
        ir.save(model, str(path), external_data=path.name + ".data", max_workers=1)
    else:
        ir.save(model, str(path))
    del model
    gc.collect()
    return fusions


def component_specs(folder: str, root: Path, target: str,
                    graph_specs: Callable[[str, Any, Path, str], Any]) -> tuple[list[Any], Provenance, ShardReader]:
    """The GraphSpecs of a weightless `folder` component, with where each of their weights comes from."""
    reader = ShardReader(root / folder)
    model = fake_component(folder, root / folder)
    prov = Provenance(model, reader)
    if prov.missing:
        raise KeyError(f"{folder}: no checkpoint tensor for {', '.join(prov.missing[:5])}"
                       + (f" (+{len(prov.missing) - 5} more)" if len(prov.missing) > 5 else ""))
    with torch.no_grad(), prov.recording():
        specs = list(graph_specs(folder, model, root, target))
    return specs, prov, reader
