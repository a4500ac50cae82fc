"""Which execution provider runs each node of a package, read offline from kernel tables.

onnxruntime assigns a node to the first provider in the session's list that has a kernel for its
(domain, op, opset, input/output types), else to the next one, down to the CPU: a node without a
kernel on the requested provider silently runs on the host, with copies in between. This module
predicts that assignment without the device, from the tables in `kernels/` (each names the
onnxruntime or TensorRT source and version it was copied from):

- `cpu.md`, `cuda.md`: excerpts of onnxruntime's `docs/OperatorKernels.md`, which onnxruntime
  generates from its kernel registrations, for the ops GLM-Image graphs use (`tracked:` lists them:
  a tracked op with no row has no kernel there, an op outside the list is *unknown*);
- `cann.json`: the CANN EP's graph-mode whitelist and single-op registry;
- `tensorrt.json`: the ops onnx-tensorrt's parser takes.

An op a table does not know is reported as unknown, never as supported. Types come from the
graph's value_info where the exporter wrote it, else they are propagated through the kernel
signatures; a node whose types cannot be known is checked by op and opset alone (and counted).

Needs `onnx` (the quantize/export extras, or `pip install onnx`) to read the graphs. Build-time
analysis (export, quantize, `glm-image-onnx check`), so it lives here and not in the torch- and
onnx-free runtime a serving host imports; it needs no torch either (export/__init__ imports nothing).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

KERNELS = Path(__file__).parent / "kernels"
ONNX_DOMAIN = "ai.onnx"

# Nodes that need no kernel: onnxruntime turns them into initializers at load.
NO_KERNEL_NEEDED = {(ONNX_DOMAIN, "Constant")}

# provider name -> the onnxruntime name and where a node it cannot take runs instead.
PROVIDERS = {
    "cpu": ("CPUExecutionProvider", None),
    "cuda": ("CUDAExecutionProvider", "cpu"),
    "cann": ("CANNExecutionProvider", "cpu"),
    "tensorrt": ("TensorrtExecutionProvider", "cuda"),  # onnxruntime pairs TensorRT with CUDA, then CPU
}


class PlacementError(ValueError):
    """A package or kernel table that cannot be checked; one readable line."""


# ------------------------------------------------------------------------------------ tables
@dataclass(frozen=True)
class Kernel:
    since: int
    until: int | None
    inputs: tuple[str, ...]  # per position: a type constraint name ("T") or a fixed type ("tensor(int64)")
    outputs: tuple[str, ...]
    types: dict[str, frozenset[str]]  # constraint -> element types ("float16", ...); empty: any

    def covers(self, version: int) -> bool:
        return self.since <= version and (self.until is None or version <= self.until)

    def accepts(self, position: str, index: int, dtype: str | None) -> bool:
        params = self.inputs if position == "in" else self.outputs
        if dtype is None or not params:
            return True
        param = params[min(index, len(params) - 1)]  # variadic inputs repeat the last parameter
        if param.startswith("tensor("):
            return param == f"tensor({_ORT_TYPE_NAMES.get(dtype, dtype)})"
        allowed = self.types.get(param)
        return allowed is None or dtype in allowed


@dataclass
class Table:
    provider: str
    source: str
    kernels: dict[tuple[str, str], list[Kernel]]
    tracked: set[tuple[str, str]]  # ops the table speaks for (a tracked op without kernels has none)
    any_opset_min: int | None = None  # graph-mode whitelists: any opset from here on, any type
    whitelist: set[tuple[str, str]] = field(default_factory=set)
    only_domain: str | None = None  # a parser of one domain's ops (TensorRT: ai.onnx) takes no other

    def knows(self, key: tuple[str, str]) -> bool:
        # A graph-mode whitelist is the provider's whole decision: an op outside it is not taken.
        return self.any_opset_min is not None or key in self.tracked or key in self.kernels


# onnx element type names <-> OperatorKernels.md's tensor(...) names.
_ORT_TYPE_NAMES = {"float32": "float", "float64": "double", "bool": "bool"}
_FROM_ORT = {v: k for k, v in _ORT_TYPE_NAMES.items()}


def _element(ort_name: str) -> str:
    return _FROM_ORT.get(ort_name, ort_name)


def _parse_versions(text: str) -> tuple[int, int | None]:
    text = text.strip()
    if text.endswith("+"):
        return int(text[:-1]), None
    m = re.fullmatch(r"\[(\d+),\s*(\d+)\]", text)
    if m:
        return int(m.group(1)), int(m.group(2))
    return int(text), int(text)


def _parse_params(text: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """`*in* X:**T**<br> *out* Y:**T**` (alternatives joined by `or`: the longest is kept)."""
    best: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())
    for variant in re.split(r"<br>\s*<br>\s*or\s*<br>\s*<br>", text):
        ins = tuple(re.findall(r"\*in\*\s*[\w.]+:\*\*([^*]+)\*\*", variant))
        outs = tuple(re.findall(r"\*out\*\s*[\w.]+:\*\*([^*]+)\*\*", variant))
        if len(ins) + len(outs) > len(best[0]) + len(best[1]):
            best = (ins, outs)
    return best


def _parse_types(text: str) -> dict[str, frozenset[str]]:
    out = {}
    for part in re.split(r"<br\s*/?>", text):
        m = re.match(r"\s*\*\*([^*]+)\*\*\s*=\s*(.*)", part)
        if m:
            out[m.group(1)] = frozenset(_element(t) for t in re.findall(r"tensor\(([\w]+)\)", m.group(2)))
    return out


def parse_operator_kernels(text: str, provider: str) -> Table:
    """An excerpt of onnxruntime's docs/OperatorKernels.md (one provider's section) -> a Table."""
    kernels: dict[tuple[str, str], list[Kernel]] = {}
    tracked: set[tuple[str, str]] = set()
    source = ""
    domain, op, params = ONNX_DOMAIN, None, ((), ())
    for line in text.splitlines():
        if line.startswith("<!-- source:"):
            source = line[len("<!-- source:"):].rstrip("-> ").strip()
        elif line.startswith("<!-- tracked:"):
            for item in line[len("<!-- tracked:"):].rstrip("-> ").split():
                d, _, name = item.rpartition(":")
                tracked.add((d or ONNX_DOMAIN, name))
        if not line.startswith("|") or line.startswith(("| Op Name", "|---")):
            continue
        cells = line.strip()[1:].split("|")  # "|||[6, 12]|..." continues the op above: empty cells
        m = re.match(r"\*\*Operator Domain:\*\*\s*\*([\w.]+)\*", cells[0])
        if m:
            domain = m.group(1)
            continue
        if len(cells) < 4:
            raise PlacementError(f"{provider} kernel table: malformed row {line[:80]!r}")
        name, param_text, versions, types = cells[:4]
        if name:
            op, params = name.strip(), _parse_params(param_text)
        if op is None:
            continue
        since, until = _parse_versions(versions)
        kernels.setdefault((domain, op), []).append(
            Kernel(since, until, params[0], params[1], _parse_types(types)))
    return Table(provider, source, kernels, tracked)


def _load_json_table(path: Path, provider: str) -> Table:
    data = json.loads(path.read_text())
    src = data.get("source", {})
    source = ", ".join(f"{k} {v}" for k, v in src.items() if isinstance(v, (str, int)) and k != "custom_ops")
    if provider == "cann":
        graph = data["graph_mode"]
        kernels: dict[tuple[str, str], list[Kernel]] = {}
        for k in data.get("single_op", []):
            kernels.setdefault((k["domain"], k["op"]), []).append(
                Kernel(int(k["since"]), k["until"], ("T",), ("T",), {"T": frozenset(map(_element, k["types"]))}))
        return Table(provider, source, kernels, set(), any_opset_min=int(graph["min_opset"]),
                     whitelist={(graph["domain"], op) for op in graph["ops"]})
    # tensorrt: ops with the element types the parser takes, ONNX domain, the doc's opset range.
    kernels = {(ONNX_DOMAIN, op): [Kernel(1, None, ("T",), (), {"T": frozenset(map(_element, v["types"]))})]
               for op, v in data["ops"].items()}
    tracked = set(kernels) | {(ONNX_DOMAIN, op) for op in data.get("unsupported", [])}
    # onnx-tensorrt parses ai.onnx ops (plus plugins in "trt.plugins", which our graphs never use).
    return Table(provider, source, kernels, tracked, only_domain=ONNX_DOMAIN)


@lru_cache(maxsize=None)
def load_table(provider: str) -> Table:
    if provider not in PROVIDERS:
        raise PlacementError(f"unknown provider {provider!r}; choose from {', '.join(PROVIDERS)}")
    md, js = KERNELS / f"{provider}.md", KERNELS / f"{provider}.json"
    if md.exists():
        return parse_operator_kernels(md.read_text(), provider)
    if js.exists():
        return _load_json_table(js, provider)
    raise PlacementError(f"no kernel table for {provider} in {KERNELS}")


# ------------------------------------------------------------------------------------ checking
@dataclass
class Verdict:
    node: str
    op: str
    domain: str
    opset: int
    dtypes: list[str]
    status: str  # "ok", "fallback", "unknown"
    runs_on: str  # the provider that runs it (for a fallback: where it lands)
    reason: str = ""


@dataclass
class GraphReport:
    graph: str
    provider: str
    nodes: int
    verdicts: list[Verdict]
    untyped: int  # nodes checked by op and opset only

    @property
    def problems(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.status != "ok"]

    def summary(self) -> str:
        ort_name = PROVIDERS[self.provider][0]
        problems = self.problems
        if not problems:
            head = f"{self.graph}: all {self.nodes} nodes run on {ort_name}"
        else:
            groups: dict[tuple[str, str, str], int] = {}
            for v in problems:
                key = (v.op if v.domain == ONNX_DOMAIN else f"{v.domain}.{v.op}", v.reason, v.runs_on)
                groups[key] = groups.get(key, 0) + 1
            listed = "; ".join(f"{op} x{n} ({reason} -> {runs_on})" for (op, reason, runs_on), n in groups.items())
            head = f"{self.graph}: {len(problems)} of {self.nodes} nodes fall back from {ort_name}: {listed}"
        return head + (f" [{self.untyped} nodes with unknown dtypes checked by op only]" if self.untyped else "")


def _schema_version(op: str, domain: str, opset: int) -> int:
    """The version of the op's schema a model at `opset` uses (what kernels are registered against)."""
    import onnx

    if domain != ONNX_DOMAIN:
        return opset
    try:
        return onnx.defs.get_schema(op, opset, "").since_version
    except onnx.defs.SchemaError:
        return opset


def _dtype_name(element_type: int) -> str:
    """An ONNX element type as the tables name it ("float32", "float16", "bfloat16", "int64", ...)."""
    import numpy as np
    from onnx import helper

    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(element_type)).name
    except (KeyError, TypeError, ValueError):
        return str(element_type)


def _cast_type(node: Any) -> str | None:
    for a in node.attribute:
        if a.name == "to":
            return _dtype_name(a.i)
        if a.name == "value" and a.t is not None:
            return _dtype_name(a.t.data_type)
    return "float32" if node.op_type == "ConstantOfShape" else None


def _infer_outputs(node: Any, kernel: Kernel | None, in_types: list[str | None]) -> list[str | None]:
    """Output element types from the kernel's signature: an output shares the type of the inputs
    with the same constraint; a fixed type is itself; else the first float input's."""
    if node.op_type in ("Cast", "Constant", "ConstantOfShape"):
        return [_cast_type(node)] * len(node.output)
    out: list[str | None] = []
    for j in range(len(node.output)):
        dtype = None
        if kernel is not None and kernel.outputs:
            param = kernel.outputs[min(j, len(kernel.outputs) - 1)]
            if param.startswith("tensor("):
                dtype = _element(param[len("tensor("):-1])
            elif len(kernel.types.get(param, ())) == 1:  # a constraint that allows one type is that type
                dtype = next(iter(kernel.types[param]))
            else:
                for i, t in enumerate(in_types):
                    if t is not None and kernel.inputs and kernel.inputs[min(i, len(kernel.inputs) - 1)] == param:
                        dtype = t
                        break
        if dtype is None and node.op_type == "DequantizeLinear" and len(in_types) > 1:
            dtype = in_types[1]  # the scale's type
        if dtype is None:
            dtype = next((t for t in in_types if t in ("float32", "float16", "bfloat16")), None)
        out.append(dtype)
    return out


def check_model(model: Any, graph_name: str, provider: str) -> GraphReport:
    """Predict where every node of an onnx.ModelProto runs when a session asks for `provider`."""
    table = load_table(provider)
    fallback = PROVIDERS[provider][1]
    opsets = {(o.domain or ONNX_DOMAIN): o.version for o in model.opset_import}
    g = model.graph
    types: dict[str, str | None] = {}
    for v in (*g.input, *g.output, *g.value_info):
        if v.type.tensor_type.elem_type:
            types[v.name] = _dtype_name(v.type.tensor_type.elem_type)
    for t in g.initializer:
        types[t.name] = _dtype_name(t.data_type)

    verdicts, untyped = [], 0
    for node in g.node:
        domain = node.domain or ONNX_DOMAIN
        opset = opsets.get(domain, 1)
        in_types = [types.get(n) if n else None for n in node.input]
        key = (domain, node.op_type)
        kernel = None
        if key in NO_KERNEL_NEEDED:
            status, reason = "ok", ""
        else:
            status, reason, kernel = _decide(table, key, node, opset, in_types, types)
        runs_on = provider
        if status == "fallback":  # (the CPU itself may still take a float16 node as float32)
            runs_on = _where_instead("cpu" if provider == "cpu" else fallback, key, node, opset, in_types, types)
        elif status == "unknown":
            runs_on = "unknown"
        # Output types for the nodes downstream, from any signature of the op (the CPU's is the fullest).
        signature = kernel or _any_kernel(table, key, opset) or _any_kernel(load_table("cpu"), key, opset)
        for name, t in zip(node.output, _infer_outputs(node, signature, in_types)):
            if name and types.get(name) is None:
                types[name] = t
        out_types = [types.get(n) for n in node.output if n]
        if all(t is None for t in in_types + out_types):
            untyped += 1
        dtypes = sorted({t for t in in_types if t})
        verdicts.append(Verdict(node.name, node.op_type, domain, opset, dtypes, status, runs_on, reason))
    return GraphReport(graph_name, provider, len(g.node), verdicts, untyped)


def _any_kernel(table: Table, key: tuple[str, str], opset: int) -> Kernel | None:
    for k in table.kernels.get(key, []):
        if k.covers(opset):
            return k
    return None


def _decide(table: Table, key: tuple[str, str], node: Any, opset: int, in_types: list[str | None],
            types: dict[str, str | None]) -> tuple[str, str, Kernel | None]:
    domain, op = key
    if table.any_opset_min is not None and key in table.whitelist:
        if opset >= table.any_opset_min:
            return "ok", "", None
        return "fallback", f"graph mode needs opset >= {table.any_opset_min}", None
    if table.any_opset_min is not None:
        return "fallback", "not in graph mode's whitelist", None
    if table.only_domain is not None and domain != table.only_domain:
        return "fallback", f"{table.provider} takes {table.only_domain} ops only", None
    if not table.knows(key):
        return "unknown", f"not in the {table.provider} kernel table", None
    kernels = table.kernels.get(key, [])
    if not kernels:
        return "fallback", "no kernel", None
    version = _schema_version(op, domain, opset)
    in_range = [k for k in kernels if k.covers(version)]
    if not in_range:
        return "fallback", f"no kernel for opset {version}", None
    out_types = [types.get(n) for n in node.output]
    for k in in_range:
        if all(k.accepts("in", i, t) for i, t in enumerate(in_types) if node.input[i]) and \
                all(k.accepts("out", j, t) for j, t in enumerate(out_types) if node.output[j]):
            return "ok", "", k
    dtypes = "/".join(sorted({t for t in in_types + out_types if t})) or "these types"
    return "fallback", f"no {dtypes} kernel", in_range[0]


def _where_instead(provider: str | None, key: tuple[str, str], node: Any, opset: int,
                   in_types: list[str | None], types: dict[str, str | None]) -> str:
    """The next provider in onnxruntime's list that has a kernel (or "none": the session fails)."""
    while provider is not None:
        table = load_table(provider)
        status, _, _ = _decide(table, key, node, opset, in_types, types)
        if status == "ok":
            return provider
        if provider == "cpu" and "float16" in in_types:
            # onnxruntime's CPU EP runs a float16 node it has no kernel for in float32, between Casts.
            as_fp32 = ["float32" if t == "float16" else t for t in in_types]
            as_fp32_types = {k: ("float32" if v == "float16" else v) for k, v in types.items()}
            if _decide(table, key, node, opset, as_fp32, as_fp32_types)[0] == "ok":
                return "cpu (as float32)"
        provider = PROVIDERS[provider][1]
    return "none"


def check_package(root: Path | str, provider: str) -> list[GraphReport]:
    """Every graph of a package (manifest order) checked for `provider`."""
    import onnx

    from glm_image_onnx.runtime.package import Package

    package = Package.open(root, verify_files=False)
    reports = []
    for name in package.graphs:
        model = onnx.load(str(package.graph_path(name)), load_external_data=False)
        reports.append(check_model(model, name, provider))
    return reports


_PLACED = re.compile(r"(?:Node\(s\)|All nodes) placed on \[(\w+)\]\. Number of nodes: (\d+)")
_NODE = re.compile(r"VerifyEachNodeIsAssignedToAnEp\]\s{3}(\w+) \(")


def placement_from_log(text: str) -> dict[str, Any]:
    """onnxruntime's own node placement, read from a session log at verbose severity
    (`log_severity_level = 0`): nodes per provider after its graph optimisations, and the op types it
    put on the CPU (under "CPUExecutionProvider ops"; shape computations land there on purpose)."""
    counts: dict[str, Any] = {}
    current = None
    for line in text.splitlines():
        m = _PLACED.search(line)
        if m:
            current = m.group(1)
            counts[current] = counts.get(current, 0) + int(m.group(2))
            continue
        n = _NODE.search(line)
        if n and current == "CPUExecutionProvider":
            counts.setdefault("CPUExecutionProvider ops", []).append(n.group(1))
    return counts


# The providers a session asks for, in onnxruntime's order, to observe a placement.
SESSION_PROVIDERS = {"cpu": ["CPUExecutionProvider"],
                     "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
                     "cann": ["CANNExecutionProvider", "CPUExecutionProvider"],
                     "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]}


def observe(graph: Path | str, provider: str, timeout_s: float = 600) -> dict[str, Any]:
    """onnxruntime's own placement of one graph on this machine: a session is created in a child
    process at verbose log severity (the log goes to its stderr) and its placement lines are read."""
    import subprocess
    import sys

    code = ("import json, sys, onnxruntime as o; so = o.SessionOptions(); so.log_severity_level = 0; "
            "o.InferenceSession(sys.argv[1], so, providers=json.loads(sys.argv[2]))")
    proc = subprocess.run([sys.executable, "-c", code, str(graph), json.dumps(SESSION_PROVIDERS[provider])],
                          capture_output=True, text=True, timeout=timeout_s)
    counts = placement_from_log(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not counts:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        counts["error"] = lines[-1][-300:] if lines else f"exit code {proc.returncode}, no placement in the log"
    return counts
