"""Build targets: CUDA packages in fp16 and bf16, the manifest's target and cache contract, the
offline placement check (`glm-image-onnx check`) and the runtime and quantiser reading the target.

No GPU here: CUDA packages are checked against onnxruntime's CUDA kernel table, fp16 ones also run
under the CPU EP; bf16 numerics are for scripts/check_cuda.sh on a GPU."""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from conftest import export_target, manifest_of
from glm_image_onnx.cli import main
from glm_image_onnx.export.package import ExportError, ExportOptions
from glm_image_onnx.export.placement import check_model, check_package, load_table
from glm_image_onnx.manifest import ArPlannerConfig, Manifest, Target
from glm_image_onnx.runtime import GlmImageOnnxPipeline, ProviderError
from glm_image_onnx.runtime.ar import ArPlanner
from glm_image_onnx.runtime.package import Package, PackageError


@pytest.fixture(scope="module")
def cuda_packages(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny checkpoint exported for CUDA in both dtypes, with --verify."""
    return export_target(tiny_checkpoint, tmp_path_factory, "cuda", ("fp16", "bf16"))


@pytest.mark.parametrize("dtype,element", [("fp16", TensorProto.FLOAT16), ("bf16", TensorProto.BFLOAT16)])
def test_cuda_package_states_target_and_feeds_its_cache_straight_to_attention(
        cuda_packages: dict[str, Path], dtype: str, element: int) -> None:
    path = cuda_packages[dtype]
    m = manifest_of(path)
    name = {"fp16": "float16", "bf16": "bfloat16"}[dtype]
    assert m["target"] == {"name": "cuda", "dtype": dtype}
    assert all(g["dtype"] == dtype for g in m["graphs"].values())
    kv = m["graphs"]["ar_planner"]["config"]["kv_cache"]
    assert kv["dtype"] == name and kv["capacity"] == "prompt_tokens + new_tokens"
    inputs = {i["name"]: i["dtype"] for i in m["graphs"]["ar_planner"]["inputs"]}
    assert inputs["past_key_values.0.key"] == name and inputs["input_ids"] == "int64"
    assert {o["name"]: o["dtype"] for o in m["graphs"]["ar_planner"]["outputs"]}["logits"] == "float32"

    model = onnx.load(str(path / "ar_planner.onnx"))
    onnx.checker.check_model(model)
    consumers = {i: n for n in model.graph.node for i in n.input}
    producers = {o: n for n in model.graph.node for o in n.output}
    caches = [i for i in model.graph.input if i.name.startswith("past_key_values.")]
    assert caches and all(i.type.tensor_type.elem_type == element for i in caches)
    for i in caches:  # no Cast between the graph's cache and the op that updates it in place
        assert consumers[i.name].op_type == "GroupQueryAttention", i.name
    for o in model.graph.output:
        if o.name.startswith("present."):
            assert producers[o.name].op_type == "GroupQueryAttention", o.name
    # verification ran on the fp32 graph, and on the fp16 one under the CPU EP; bf16 says why not
    verify = m["graphs"]["dit_decoder"]["verify"]
    if dtype == "fp16":
        assert verify["passed"] and verify["fp32"]["passed"] and verify["max_rel"] <= verify["limit"]
    else:
        assert verify["passed"] and "GPU" in verify["bf16"]


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_check_cuda_finds_no_fallback_in_cuda_packages(cuda_packages: dict[str, Path], dtype: str,
                                                       capsys: pytest.CaptureFixture) -> None:
    for graph in manifest_of(cuda_packages[dtype])["graphs"].values():
        onnx.checker.check_model(str(cuda_packages[dtype] / graph["file"]))
    assert main(["check", str(cuda_packages[dtype]), "--provider", "cuda"]) == 0
    out = capsys.readouterr()
    assert out.out.count("run on CUDAExecutionProvider") == 7
    assert "0 nodes fall back" in out.err


def test_check_cuda_names_group_query_attention_in_a_cpu_package(tiny_package: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    assert main(["check", str(tiny_package), "--provider", "cuda"]) == 1
    lines = capsys.readouterr().out.splitlines()
    ar = next(line for line in lines if line.startswith("ar_planner:"))
    assert "GroupQueryAttention" in ar and "float32" in ar and "-> cpu" in ar
    assert all("all" in line for line in lines if not line.startswith("ar_planner:"))
    assert main(["check", str(tiny_package), "--provider", "cpu"]) == 0


def _model(nodes: list, inputs: list, outputs: list, opsets: dict[str, int]) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()])


def test_check_names_dynamic_quantisation_ops_and_reports_unknown_ops() -> None:
    f, u8 = TensorProto.FLOAT, TensorProto.UINT8
    vi = helper.make_tensor_value_info
    model = _model(
        [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"], name="dql"),
         helper.make_node("MatMulInteger", ["xq", "w", "xz", "wz"], ["y"], name="mmi"),
         helper.make_node("Cast", ["y"], ["yf"], to=f, name="cast"),
         helper.make_node("MadeUpOp", ["yf"], ["z"], domain="com.example", name="made_up")],
        [vi("x", f, [2, 4]), vi("w", u8, [4, 3]), vi("wz", u8, [])], [vi("z", f, [2, 3])],
        {"": 18, "com.example": 1})
    report = check_model(model, "toy", "cuda")
    by_node = {v.node: v for v in report.verdicts}
    assert by_node["dql"].status == "fallback" and by_node["dql"].runs_on == "cpu"
    assert by_node["mmi"].status == "fallback" and by_node["mmi"].runs_on == "cpu"  # CUDA: int8 x int8 only
    assert by_node["cast"].status == "ok"
    assert by_node["made_up"].status == "unknown"  # never "supported"
    assert "DynamicQuantizeLinear" in report.summary() and "MadeUpOp" in report.summary()
    on_cpu = {v.node: v.status for v in check_model(model, "toy", "cpu").verdicts}
    assert on_cpu == {"dql": "ok", "mmi": "ok", "cast": "ok", "made_up": "unknown"}


def test_kernel_tables_name_their_source_and_hold_the_facts_we_build_on() -> None:
    cuda, cpu = load_table("cuda"), load_table("cpu")
    assert "commit" in cuda.source and "commit" in cpu.source
    gqa = cuda.kernels[("com.microsoft", "GroupQueryAttention")]
    assert all("float32" not in k.types["T"] and {"float16", "bfloat16"} <= k.types["T"] for k in gqa)
    assert ("com.microsoft", "DynamicQuantizeMatMul") in cuda.tracked
    assert ("com.microsoft", "DynamicQuantizeMatMul") not in cuda.kernels
    assert ("com.microsoft", "DynamicQuantizeMatMul") in cpu.kernels
    cann = load_table("cann")
    assert ("ai.onnx", "MatMul") in cann.whitelist and ("ai.onnx", "LayerNormalization") not in cann.whitelist
    assert "10." in load_table("tensorrt").source  # the TensorRT version the op list is for


def test_placement_prediction_matches_onnxruntime_on_cpu(cuda_packages: dict[str, Path]) -> None:
    """Real onnxruntime as the referee: a graph the check says the CPU cannot run fails to load there,
    for the predicted reason (no kernel for one of the nodes the check names), and only such graphs."""
    from onnxruntime.capi.onnxruntime_pybind11_state import NotImplemented as OrtNotImplemented

    refused = 0
    for dtype, path in cuda_packages.items():
        for report in check_package(path, "cpu"):
            impossible = [v for v in report.problems if v.runs_on == "none"]
            graph = Package.open(path, verify_files=False).graph_path(report.graph)
            try:
                ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
                error = None
            except OrtNotImplemented as e:  # any other load failure is not the prediction: it propagates
                error = str(e)
            if not impossible:
                assert error is None, (dtype, report.graph, error)
                continue
            refused += 1
            assert error is not None and "Could not find an implementation for" in error, (dtype, report.summary())
            # the node onnxruntime names is one the check predicted
            assert any(f"{v.op}(" in error and f"node with name '{v.node}'" in error for v in impossible), (
                error, [(v.op, v.node) for v in impossible])
    assert refused > 0  # the bf16 package's graphs: the check predicts some, so the comparison is not vacuous


def test_runtime_allocates_the_cache_in_the_manifests_dtype(tiny_package: Path, tmp_path: Path) -> None:
    session = ort.InferenceSession(str(tiny_package / "ar_planner.onnx"), providers=["CPUExecutionProvider"])
    config = Manifest.read(tiny_package).graphs["ar_planner"].config

    def with_cache(**changes: str) -> ArPlannerConfig:
        return replace(config, kv_cache=replace(config.kv_cache, **changes))

    assert ArPlanner(session, config).cache_dtype == "float32"
    for dtype in ("float16", "bfloat16"):
        planner = ArPlanner(session, with_cache(dtype=dtype))
        buffers = planner.new_cache(1, 8).buffers  # numpy arrays where numpy has the dtype, else OrtValues
        assert len(buffers) == 2 * planner.num_layers
        assert {b.data_type() if isinstance(b, ort.OrtValue) else f"tensor({b.dtype})" for b in buffers} == {
            f"tensor({dtype})"}
    with pytest.raises(PackageError, match="kv_cache.dtype 'int8'"):
        ArPlanner(session, with_cache(dtype="int8"))
    with pytest.raises(PackageError, match="kv_cache.capacity"):
        ArPlanner(session, with_cache(capacity="sliding window"))
    with pytest.raises(PackageError, match="position_ids_layout"):
        ArPlanner(session, replace(config, position_ids_layout="[batch, seq, 3]"))


def test_opening_a_package_on_another_provider_says_so(cuda_packages: dict[str, Path], tiny_package: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="glm_image_onnx.runtime"):
        pipe = GlmImageOnnxPipeline.from_package(cuda_packages["fp16"], provider="cpu", verify_files=False)
    lines = [r.getMessage() for r in caplog.records if "built for target" in r.getMessage()]
    assert len(lines) == 1 and "cuda (fp16)" in lines[0] and "--target cpu" in lines[0]
    out = pipe("a sign that says 'OPEN'", height=64, width=64, num_inference_steps=2, seed=0)
    assert np.asarray(out.images[0]).shape == (64, 64, 3)
    with pytest.raises(ProviderError, match="built for target cuda .* export CHECKPOINT PACKAGE --target cpu"):
        GlmImageOnnxPipeline.from_package(cuda_packages["fp16"], provider="cpu", strict=True, verify_files=False)


def test_fp16_cuda_package_on_cpu_matches_fp32_at_fixed_tokens(cuda_packages: dict[str, Path],
                                                              tiny_package: Path) -> None:
    from glm_image_onnx.quantize import quality

    ref = GlmImageOnnxPipeline.from_package(tiny_package, verify_files=False)
    got = GlmImageOnnxPipeline.from_package(cuda_packages["fp16"], verify_files=False)
    prompt = "a poster that says 'HELLO'"
    prior = ref(prompt, height=128, width=128, num_inference_steps=2, seed=3, do_sample=False).prior_token_ids
    report = quality.end_to_end(ref, got, [prompt], [prior], 128, 128, 4, seed=0, free_running=False)
    assert report["fixed_tokens"]["nonfinite"] == 0
    assert report["fixed_tokens"]["psnr_db_min"] >= 35.0, report


def test_export_and_quantize_refuse_what_the_target_cannot_run(cuda_packages: dict[str, Path],
                                                               tiny_checkpoint: Path, tmp_path: Path) -> None:
    from glm_image_onnx.quantize import QuantizeError, QuantizeOptions, quantize_package

    with pytest.raises(ExportError, match="--dtype bf16 is not built for target cpu"):
        ExportOptions(target="cpu", dtype="bf16")
    assert main(["export", str(tiny_checkpoint), str(tmp_path / "x"), "--target", "cuda", "--dtype", "fp32"]) == 2
    assert not (tmp_path / "x").exists()
    for recipe, why in (("int8-dynamic", "no CUDA kernel"), ("fp16", "already half precision")):
        with pytest.raises(QuantizeError, match=f"recipe {recipe} does not run on target cuda: .*{why}"):
            quantize_package(cuda_packages["fp16"], tmp_path / recipe, QuantizeOptions(recipe=recipe),
                             log=lambda _: None)
        assert not (tmp_path / recipe).exists()


def test_int4_on_a_cuda_fp16_package_keeps_every_node_on_cuda(cuda_packages: dict[str, Path], tmp_path: Path) -> None:
    from glm_image_onnx.quantize import QuantizeOptions, quantize_package

    out = tmp_path / "int4"
    m = quantize_package(cuda_packages["fp16"], out, QuantizeOptions(
        recipe="int4-weight", graphs=("ar_planner",), eval_prompts=1, height=64, width=64, steps=2),
        log=lambda _: None)
    assert m.target == Target("cuda", "fp16")
    model = onnx.load(str(out / "ar_planner.onnx"))
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    inits = {t.name: t.data_type for t in model.graph.initializer}
    assert nbits and all(inits[n.input[2]] == TensorProto.FLOAT16 for n in nbits)  # fp16 scales/activations
    assert not check_package(out, "cuda")[0].problems
    shutil.rmtree(out)


def test_onnxruntimes_own_placement_is_read_from_its_session_log(tiny_package: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    """The verbose log of a real CPU session: every node of the graph is reported on the CPU."""
    from glm_image_onnx.export.placement import observe

    counts = observe(tiny_package / "vae_decoder.onnx", "cpu")
    assert set(counts) <= {"CPUExecutionProvider", "CPUExecutionProvider ops"} and counts["CPUExecutionProvider"] > 0
    assert main(["check", str(tiny_package), "--provider", "cpu", "--observed"]) == 0
    assert capsys.readouterr().out.count("observed by onnxruntime") == 7
    # a provider this onnxruntime build lacks: one line, exit 2
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert main(["check", str(tiny_package), "--provider", "cuda", "--observed"]) == 2
        assert "not in this onnxruntime build" in capsys.readouterr().err


# What only building a package needs; a serving host installs none of it (the base install).
BUILD_TIME = ("torch", "transformers", "diffusers", "onnx", "onnxscript",
              "glm_image_onnx.export", "glm_image_onnx.quantize", "glm_image_onnx.models")


def test_runtime_folder_holds_and_imports_nothing_build_time() -> None:
    """Every module in runtime/ (globbed, so a new one is covered) imports nothing build-time, and
    each is one the runtime itself imports: a module only export, quantize or `check` use (as the
    placement check once was, with its kernel tables) belongs with them, not on the serving host."""
    folder = Path(importlib.util.find_spec("glm_image_onnx.runtime").submodule_search_locations[0])
    modules = sorted(f"glm_image_onnx.runtime.{p.stem}" for p in folder.glob("*.py") if p.stem != "__init__")
    code = ("import importlib, json, sys\n"
            "import glm_image_onnx.runtime\n"
            "served = set(sys.modules)\n"
            "modules, build = json.loads(sys.argv[1]), json.loads(sys.argv[2])\n"
            "for m in modules: importlib.import_module(m)\n"
            "print(json.dumps([[m for m in modules if m not in served],\n"
            "                  sorted(m for m in sys.modules if any(m == b or m.startswith(b + '.') for b in build))]))\n")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(modules), json.dumps(BUILD_TIME)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    not_used_by_the_runtime, build_time = json.loads(proc.stdout.splitlines()[-1])
    assert len(modules) > 5 and not not_used_by_the_runtime and not build_time, (not_used_by_the_runtime, build_time)


def test_server_describes_bf16_graphs_it_cannot_carry(cuda_packages: dict[str, Path], tmp_path: Path) -> None:
    """A bf16 package: the Triton repository describes its cache as TYPE_BF16; this server, which has
    no numpy type for BF16 tensors, leaves only those component models out (glm_image runs them)."""
    pytest.importorskip("tritonclient.grpc")
    from glm_image_onnx.server.app import not_carried
    from glm_image_onnx.server.specs import graph_specs

    graphs = Manifest.read(cuda_packages["bf16"]).graphs
    why = not_carried(graphs["ar_planner"])
    assert why and "past_key_values.0.key" in why and "bfloat16" in why
    assert not_carried(graphs["dit_decoder"]) is None  # fp32 I/O: served as before
    inputs, _, _ = graph_specs(graphs["ar_planner"])
    assert {s.datatype for s in inputs if s.name.startswith("past_key_values.")} == {"BF16"}
