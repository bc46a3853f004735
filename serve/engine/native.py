"""The slot decoder's attention and top-k on our compiled kernels (serve/engine/csrc/nmt_ops.c), on CPU.

At 1 thread ONNX Runtime's CPU GroupQueryAttention and MultiHeadAttention take a third of an int8
slot-decoder step at 32-64 rows (bench/results/attention-share.md): per (row, head) they make two GEMM
calls and a softmax pass for a single query. The library `serve.engine._nmt_ops` (built with the
package; a C compiler is needed at install, see pyproject.toml) registers ops in the domain "nmt"
that do the same arithmetic in one pass per (row, head), and one for the top-k:
  * nmt.SlotAttention(qkv, past_key, past_value, seqlens_k): the slot decoder's GroupQueryAttention
    (as many K/V heads as query heads, scale 1, one token per row, the cache written in place);
  * nmt.CrossAttention(query, key, value, key_padding_mask): its cross-attention MultiHeadAttention
    (scale 1, K/V in (B, H, S, Dh), an int32 (B, S) mask);
  * nmt.ConditionalTopK(log_probs, top_k): its If (top_k > 2: TopK of the log-probs, else a (1, 1)
    placeholder; nmt.bundle.SLOT_HOST_ARGMAX), in one op; the TopK's results exactly.
`accelerated` rewrites a slot decoder's nodes of exactly those forms to these ops, in memory: the
bundle on disk is unchanged, and a node of any other form stays as it is. Without the library (no
compiler at install) or with EngineConfig(native_kernels=False) the graph runs as exported.

The attention results equal ONNX Runtime's to float rounding (another summation order and exp; the
tests compare them within 1e-5, and the engine's tokens with and without); the top-k's are the same.
"""

from __future__ import annotations

import importlib.machinery
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import onnxruntime as ort

if TYPE_CHECKING:  # onnx is imported only where a graph is rewritten (`accelerated`)
    from onnx import GraphProto, ModelProto, NodeProto

log = logging.getLogger(__name__)

DOMAIN = "nmt"
LIBRARY = "_nmt_ops"  # serve/engine/_nmt_ops<extension suffix>
MS = "com.microsoft"


def library_path() -> Path | None:
    """The compiled library next to this module, or None when the package was installed without it."""
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"{LIBRARY}{suffix}"
        if path.is_file():
            return path
    return None


def _attributes(node: NodeProto) -> dict[str, object]:
    from onnx import helper
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _slot_self_attention(node: NodeProto, caches: set[str]) -> list[str] | None:
    """The inputs of nmt.SlotAttention for a GroupQueryAttention node of the slot decoder's form."""
    ins, attrs = list(node.input), _attributes(node)
    plain = {"num_heads", "kv_num_heads", "scale"}
    if (len(ins) != 7 or ins[1] or ins[2] or len(node.output) != 3
            or set(attrs) - plain or attrs.get("num_heads") != attrs.get("kv_num_heads")
            or attrs.get("scale") != 1.0 or not {ins[3], ins[4]} <= caches):
        return None
    return [ins[0], ins[3], ins[4], ins[5]]  # qkv, past key, past value, seqlens_k


def _cross_attention(node: NodeProto, caches: set[str]) -> list[str] | None:
    """The inputs of nmt.CrossAttention for a MultiHeadAttention node on (B, H, S, Dh) cross K/V."""
    ins, attrs = list(node.input), _attributes(node)
    if (len(ins) != 5 or ins[3] or not ins[4] or len(node.output) != 1
            or set(attrs) - {"num_heads", "scale"} or attrs.get("scale") != 1.0
            or not {ins[1], ins[2]} <= caches):
        return None
    return [ins[0], ins[1], ins[2], ins[4]]  # query, key, value, key_padding_mask (int32)


# com.microsoft op -> (our op, its inputs for a node of the form our kernel takes, else None)
ATTENTION_FORMS = {"GroupQueryAttention": ("SlotAttention", _slot_self_attention),
                   "MultiHeadAttention": ("CrossAttention", _cross_attention)}


def _conditional_top_k(graph: GraphProto) -> int:
    """Replace the slot decoder's conditional TopK (an If on top_k > threshold: TopK of the log-probs,
    else a (1, 1) placeholder; nmt.bundle.SLOT_HOST_ARGMAX) by nmt.ConditionalTopK; 1 if it did, else 0."""
    from onnx import helper, numpy_helper
    made = {o: n for n in graph.node for o in n.output}
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type != "If" or node.domain or len(node.output) != 2:
            continue
        branches = {a.name: a.g for a in node.attribute}
        then, otherwise = branches.get("then_branch"), branches.get("else_branch")
        if then is None or otherwise is None or len(then.node) != 1 or then.node[0].op_type != "TopK":
            continue
        top_k = then.node[0]
        if _attributes(top_k) != {"axis": -1}:
            continue  # largest and sorted at their defaults (1): any other setting is not our op's
        greater = made.get(node.input[0])
        if greater is None or greater.op_type != "Greater" or greater.input[0] != top_k.input[1]:
            continue
        threshold = consts.get(greater.input[1])
        if threshold is None or threshold.size != 1 or any(n.op_type != "Constant" for n in otherwise.node):
            continue
        fused = helper.make_node("ConditionalTopK", list(top_k.input), list(node.output), domain=DOMAIN,
                                 min_k=int(threshold.reshape(-1)[0]) + 1)
        users = [i for n in graph.node if n is not greater and n is not node for i in n.input]
        at = list(graph.node).index(node)
        graph.node.remove(node)
        graph.node.insert(at, fused)
        if greater.output[0] not in users:
            graph.node.remove(greater)
        return 1
    return 0


def rewrite(model: ModelProto) -> int:
    """Point the slot decoder's attention nodes, and its conditional top-k, at the "nmt" ops, in place;
    returns how many nodes now run on them."""
    from onnx import TensorProto, helper
    graph = model.graph
    # The graph inputs our kernels can take as K/V: 4-D float32 (an fp16 cache stays on ORT's kernels).
    caches = {v.name for v in graph.input
              if len(v.type.tensor_type.shape.dim) == 4 and v.type.tensor_type.elem_type == TensorProto.FLOAT}
    count = 0
    for node in graph.node:
        if node.domain != MS:
            continue
        form = ATTENTION_FORMS.get(node.op_type)
        inputs = form[1](node, caches) if form else None
        if form is None or inputs is None:
            continue
        node.op_type, node.domain = form[0], DOMAIN
        del node.input[:]
        node.input.extend(inputs)
        del node.attribute[:]
        count += 1
    if count:  # the top-k on our kernel too: only in graphs whose attention already is
        count += _conditional_top_k(graph)
    if count and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return count


def accelerated(path: Path) -> bytes | None:
    """The slot decoder at `path` with its attention and top-k on the compiled kernels, serialized; None
    (the graph runs as exported) without the library or a node to rewrite. Sessions of it need
    `register(options)`."""
    if library_path() is None:
        log.info("serve.engine._nmt_ops is not built: the slot decoder runs on ONNX Runtime's kernels")
        return None
    try:  # only here: a server without the library never loads it
        import onnx
    except ImportError:  # a base install has it; an environment without it runs the graph as exported
        log.info("onnx is not installed: the slot decoder runs on ONNX Runtime's kernels")
        return None
    model = onnx.load(str(path))
    return model.SerializeToString() if rewrite(model) else None


def register(options: ort.SessionOptions) -> None:
    """Make the "nmt" ops known to sessions made with `options` (the library must exist)."""
    library = library_path()
    if library is None:
        raise RuntimeError("serve.engine._nmt_ops is not built")
    options.register_custom_ops_library(str(library))
