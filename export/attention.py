"""Attention that stays within memory at 16K tokens on onnxruntime's CPU.

onnxruntime's CPU `MultiHeadAttention` has two paths: a flash kernel (MLAS, fp32) that never holds
the scores, and the plain one, which materialises every head's [queries x keys] scores at once: for
the DiT at 2048x2048 (16384 image tokens, 32 heads) that is 2 x 32 x 16.6K^2 x 4 B = 70 GB per
layer with both CFG rows. The kernel takes the flash path only when no attention bias is given
(contrib_ops/cpu/bert/multihead_attention.cc), and the DiT always passes one: it masks padded text
keys so that CFG rows with different glyph lengths can share a batch.

`flash_when_unmasked` rewrites each biased `MultiHeadAttention` into an `If`: when the graph's mask
marks every key real (the bias is then all zeros) the same node runs without the bias, else with it.
The result is identical either way; the runtime calls large images one unpadded CFG row at a time
(`runtime.pipeline`), so at real sizes every call takes the flash path.

The bias reaches the node expanded to [batch, 1, queries, keys]: 1.1 GB per layer at 16K tokens,
the largest single tensor of a 2048x2048 step. Where that `Expand` feeds only the attention it
moves into the masked branch, so the flash path never builds it (measured: benchmarks/README.md).
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import helper

from glm_image_onnx.export.onnx_info import outer_inputs

MS_DOMAIN = "com.microsoft"
ATTENTION_BIAS = 5  # MultiHeadAttention's input index of attention_bias


def flash_when_unmasked(path: Path, mask_input: str) -> int:
    """Rewrite the graph at `path` in place (weights untouched); returns the nodes rewritten."""
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    masks = [i for i in graph.input if i.name == mask_input]
    biased = {i for i, n in enumerate(graph.node) if n.op_type == "MultiHeadAttention" and n.domain == MS_DOMAIN
              and len(n.input) > ATTENTION_BIAS and n.input[ATTENTION_BIAS]}
    if not masks or not biased:
        return 0
    mask_type = masks[0].type.tensor_type.elem_type
    # all keys real <=> sum(1 - mask) == 0 (also true for an empty text: the sum of nothing is 0)
    one = helper.make_tensor("flash_one", mask_type, [], [1])
    zero = helper.make_tensor("flash_zero", mask_type, [], [0])
    graph.initializer.extend([one, zero])
    prologue = [
        helper.make_node("Sub", ["flash_one", mask_input], ["flash_padding"], name="flash_padding"),
        helper.make_node("ReduceSum", ["flash_padding"], ["flash_padded"], name="flash_padded", keepdims=0),
        helper.make_node("Equal", ["flash_padded", "flash_zero"], ["flash_unmasked"], name="flash_unmasked"),
    ]
    out_type = onnx.TensorProto.FLOAT  # the CPU flash kernel is fp32 only; so are cpu packages
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    readers = {o.name: 1 for o in graph.output}
    for n in graph.node:
        for name in outer_inputs(n):
            readers[name] = readers.get(name, 0) + 1
    # the bias Expand of each biased attention that nothing else reads: built in its masked branch
    own_expand = {}
    for i in biased:
        j = producer.get(graph.node[i].input[ATTENTION_BIAS])
        if j is not None and graph.node[j].op_type == "Expand" and readers[graph.node[j].output[0]] == 1:
            own_expand[i] = j
    moved = set(own_expand.values())
    nodes = list(prologue)
    for i, node in enumerate(graph.node):
        if i in moved:
            continue
        if i not in biased:
            nodes.append(node)
            continue
        if any(node.output[1:]):
            raise ValueError(f"{node.name}: MultiHeadAttention with present key/value outputs is not rewritten")
        attrs = list(node.attribute)

        def branch(name: str, inputs: list[str], before: list[onnx.NodeProto]) -> onnx.GraphProto:
            out = f"{node.output[0]}_{name}"
            mha = helper.make_node("MultiHeadAttention", inputs, [out], name=f"{node.name}_{name}",
                                   domain=MS_DOMAIN)
            mha.attribute.extend(attrs)
            return helper.make_graph([*before, mha], f"{node.name}_{name}", [],
                                     [helper.make_tensor_value_info(out, out_type, None)])

        expand = [graph.node[own_expand[i]]] if i in own_expand else []
        nodes.append(helper.make_node(
            "If", ["flash_unmasked"], [node.output[0]], name=f"{node.name}_if_unmasked",
            then_branch=branch("flash", list(node.input[:ATTENTION_BIAS]), []),
            else_branch=branch("masked", list(node.input), expand)))
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, str(path))
    return len(biased)


def restore_node_order(path: Path) -> bool:
    """Re-sort the graph at `path` so that each `If` follows the producers of what its branches read.

    onnxruntime's quantisers sort nodes by their declared inputs only, which puts the rewritten
    attention's `If` (declared input: the mask test) before its query/key/value. Stable: nodes keep
    their order where it is already valid. Returns whether anything moved."""
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    needs = [{producer[x] for x in outer_inputs(n) if x in producer} for n in graph.node]
    done: set[int] = set()
    order: list[int] = []
    pending = list(range(len(graph.node)))
    while pending:
        rest = []
        for i in pending:
            if needs[i] <= done:
                done.add(i)
                order.append(i)
            else:
                rest.append(i)
        if len(rest) == len(pending):
            raise ValueError(f"{Path(path).name}: the graph has a cycle")
        pending = rest
    if order == list(range(len(graph.node))):
        return False
    nodes = [graph.node[i] for i in order]
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, str(path))
    return True
