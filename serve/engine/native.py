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
    placeholder; nmt.bundle.SLOT_HOST_ARGMAX), in one op; the TopK's results exactly;
  * nmt.LogSoftmaxTopK(logits, top_k): that and the LogSoftmax before it, for every k, without writing
    the (R, V) log-probs the top-k would read again (the graph the engine loads then has no log_probs
    output, and greedy steps read their best tokens from the graph).
`accelerated` rewrites a slot decoder's nodes of exactly those forms to these ops, in memory: the
bundle on disk is unchanged, and a node of any other form stays as it is. Without the library (no
compiler at install) or with EngineConfig(native_kernels=False) the graph runs as exported.

The attention results equal ONNX Runtime's to float rounding (another summation order and exp; the
tests compare them within 1e-5, and the engine's tokens with and without); the top-k's are the same.

The greedy head: a float32 slot decoder spends about 40% of a step in its vocabulary projection (K x V
floats read at every step of a batch-1 search, 40% of the arithmetic at 64 rows), yet a greedy step
that reports no scores needs only the best token (two below min_length). `greedy_head` builds a
second variant of the graph whose MatMul, LogSoftmax and top-k are one
  * nmt.ProjectionTopK(h, w8, scale, sums, bounds, w, bias, top_k): the top_k best float32 logits of
    h . w^T + bias, found from int8 estimates with proven error bounds and computed in float32 only for
    the candidates the bounds leave (about 1.2 per row on the trained model; serve/engine/csrc/
    projection.c): the top-k of the float32 logits whatever the estimates, a quarter of the bytes.
The runtime loads it beside the full graph (Runtime.slot_head) where the CPU has AVX-512 VNNI
(projection_fast); SlotCache.step takes it for steps asked for without scores, and a search that
needs log-probs (beam search, return_scores) takes the full graph. EngineConfig(greedy_head=False)
turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from nmt import bundle as fmt

if TYPE_CHECKING:  # onnx is imported only where a graph is rewritten (`accelerated`)
    from onnx import GraphProto, ModelProto, NodeProto

log = logging.getLogger(__name__)

DOMAIN = "nmt"
LIBRARY = "_nmt_ops"  # serve/engine/_nmt_ops<extension suffix>
MS = "com.microsoft"
PROJECTION_ROUNDING = 2.0 ** -18  # REL_ESTIMATE in serve/engine/csrc/projection.c


def library_path() -> Path | None:
    """The compiled library next to this module, or None when the package was installed without it."""
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"{LIBRARY}{suffix}"
        if path.is_file():
            return path
    return None


@functools.cache
def projection_fast() -> bool:
    """Whether the library's ProjectionTopK estimates run on AVX-512 VNNI here (its portable loops are
    slower than ONNX Runtime's float32 MatMul, so the greedy head is used only where they do)."""
    library = library_path()
    return library is not None and bool(ctypes.CDLL(str(library)).nmt_projection_fast())


def projection_weights(weight: np.ndarray, bias: np.ndarray | None) -> dict[str, np.ndarray]:
    """ProjectionTopK's inputs after h for a vocabulary projection h @ weight + bias, weight (K, V):
    w8 (Vp/16, Kp/4, 16, 4) int8 (each vocabulary row quantized on its own scale), scale and sums (Vp,),
    bounds (3, Vp) (the norms of each row's quantization error and of its int8 copy, a rounding allowance
    for its bias), w (V, K), bias (V,).
    Vp, Kp: V, K rounded up to 16 and 4, the padding zero (serve/engine/csrc/projection.c)."""
    w = np.ascontiguousarray(weight.T, dtype=np.float32)  # (V, K)
    V, K = w.shape
    Vp, Kp = -(-V // 16) * 16, -(-K // 4) * 4
    peak = np.abs(w).max(axis=1)  # (V,)
    scale = np.where(peak > 0, peak / 127, 1).astype(np.float32)  # (V,)
    q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)  # (V, K)
    copy = q.astype(np.float64) * scale[:, None]  # (V, K) the int8 copy's values, exactly
    b = np.zeros(V, np.float32) if bias is None else np.asarray(bias, np.float32).reshape(V)
    bounds = np.zeros((3, Vp), np.float32)
    bounds[0, :V] = np.linalg.norm(w - copy, axis=1)
    bounds[1, :V] = np.linalg.norm(copy, axis=1)
    bounds[2, :V] = 2 * PROJECTION_ROUNDING * np.abs(b)  # the estimate's rounding, its bias part
    padded = np.zeros((Vp, Kp), np.int8)
    padded[:V, :K] = q
    w8 = padded.reshape(Vp // 16, 16, Kp // 4, 4).transpose(0, 2, 1, 3)  # (Vp/16, Kp/4, 16, 4)
    w8 = np.ascontiguousarray(w8)
    sums = np.zeros(Vp, np.int32)
    sums[:V] = q.sum(axis=1, dtype=np.int32)
    return {"w8": w8, "scale": np.pad(scale, (0, Vp - V)), "sums": sums, "bounds": bounds, "w": w, "bias": b}


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


def _log_softmax_top_k(graph: GraphProto) -> int:
    """Replace LogSoftmax -> log_probs -> nmt.ConditionalTopK by nmt.LogSoftmaxTopK on the logits, and
    drop the log_probs output: the top-k's log-probs without writing every row's (R x V floats, which
    the top-k then read again); 1 if it did, else 0. Greedy steps then read their best tokens from the
    graph too (no SLOT_HOST_ARGMAX: serve.engine.runtime checks for the output)."""
    from onnx import helper
    made = {o: n for n in graph.node for o in n.output}
    softmax = made.get(fmt.LOG_PROBS)
    users = [n for n in graph.node if fmt.LOG_PROBS in n.input]
    if softmax is None or softmax.op_type != "LogSoftmax" or len(users) != 1:
        return 0
    top_k = users[0]
    if (top_k.op_type != "ConditionalTopK" or top_k.domain != DOMAIN or top_k.input[0] != fmt.LOG_PROBS
            or _attributes(softmax).get("axis", -1) not in (-1, 1)):
        return 0
    fused = helper.make_node("LogSoftmaxTopK", [softmax.input[0], top_k.input[1]], list(top_k.output),
                             domain=DOMAIN)
    at = list(graph.node).index(top_k)
    graph.node.remove(top_k)
    graph.node.insert(at, fused)
    graph.node.remove(softmax)
    outputs = [o for o in graph.output if o.name != fmt.LOG_PROBS]
    del graph.output[:]
    graph.output.extend(outputs)
    return 1


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


def greedy_head(model: ModelProto) -> ModelProto | None:
    """A copy of the slot decoder whose vocabulary projection, log-softmax and top-k are one
    nmt.ProjectionTopK: its topk_values are float32 logits (not log-probs) and it has no log_probs
    output. For steps that need no scores (greedy without return_scores); None when the graph's tail is
    not MatMul(h, W) [+ bias] -> LogSoftmax -> log_probs -> nmt.ConditionalTopK(log_probs, top_k) (as
    `rewrite` leaves it), W a float32 initializer."""
    from onnx import ModelProto, TensorProto, helper, numpy_helper
    graph = model.graph
    made = {o: n for n in graph.node for o in n.output}
    consts = {t.name: t for t in graph.initializer}
    softmax, top_k = made.get(fmt.LOG_PROBS), made.get(fmt.TOPK_VALUES)
    if made.get(fmt.TOPK_INDICES) is not top_k or softmax is None or top_k is None:
        return None
    form = ("ConditionalTopK", DOMAIN, [fmt.LOG_PROBS, fmt.TOP_K])
    if (top_k.op_type, top_k.domain, list(top_k.input)) != form:
        return None  # ProjectionTopK's top-k is the log-probs' only where the top-k reads them
    if softmax.op_type != "LogSoftmax" or _attributes(softmax).get("axis", -1) not in (-1, 1):
        return None
    logits = made.get(softmax.input[0])
    bias = None
    if logits is not None and logits.op_type == "Add":  # MatMul + bias
        matmul = next((made.get(i) for i in logits.input if i in made), None)
        bias = next((consts.get(i) for i in logits.input if i in consts), None)
        if bias is None or len(bias.dims) != 1:
            return None
    else:
        matmul = logits
    if matmul is None or matmul.op_type != "MatMul" or matmul.input[1] not in consts:
        return None
    weight = consts[matmul.input[1]]
    if len(weight.dims) != 2 or weight.data_type != TensorProto.FLOAT:
        return None
    tail = [matmul, softmax, top_k] + ([logits] if bias is not None else [])
    users = {i for n in graph.node if all(n is not t for t in tail) for i in n.input}
    if {o for t in tail for o in t.output if o not in (fmt.TOPK_VALUES, fmt.TOPK_INDICES)} & users:
        return None  # something else reads the logits or log-probs
    inputs = projection_weights(numpy_helper.to_array(weight),
                                None if bias is None else numpy_helper.to_array(bias))
    drop = [i for i, n in enumerate(graph.node) if any(n is t for t in tail)]  # positions: names may be empty
    head = ModelProto()
    head.CopyFrom(model)
    g = head.graph
    names = [matmul.input[0], *(f"projection.{n}" for n in inputs), fmt.TOP_K]  # h, the weights, k
    fused = helper.make_node("ProjectionTopK", names, [fmt.TOPK_VALUES, fmt.TOPK_INDICES], domain=DOMAIN)
    keep = [n for i, n in enumerate(g.node) if i not in drop]
    at = next(i for i, n in enumerate(graph.node) if n is matmul)
    keep.insert(at - sum(i < at for i in drop), fused)  # where the MatMul was: after h is made
    del g.node[:]
    g.node.extend(keep)
    read = {i for n in g.node for i in n.input}
    kept = [t for t in g.initializer if t.name in read]
    del g.initializer[:]
    g.initializer.extend(kept)
    g.initializer.extend(numpy_helper.from_array(v, f"projection.{n}") for n, v in inputs.items())
    outputs = [o for o in g.output if o.name != fmt.LOG_PROBS]
    del g.output[:]
    g.output.extend(outputs)
    if not any(o.domain == DOMAIN for o in head.opset_import):
        head.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return head


def accelerated(path: Path, head: bool = True) -> tuple[bytes, bytes | None] | None:
    """The slot decoder at `path` with its attention, log-softmax and top-k on the compiled kernels
    (rewrite, then LogSoftmaxTopK: no log_probs output), serialized, and (head, where the CPU runs
    ProjectionTopK fast: projection_fast) its greedy_head variant; None (the graph runs as exported)
    without the library or a node to rewrite. Sessions of them need `register(options)`."""
    if library_path() is None:
        log.info("serve.engine._nmt_ops is not built: the slot decoder runs on ONNX Runtime's kernels")
        return None
    try:  # only here: a server without the library never loads it
        import onnx
    except ImportError:  # a base install has it; an environment without it runs the graph as exported
        log.info("onnx is not installed: the slot decoder runs on ONNX Runtime's kernels")
        return None
    model = onnx.load(str(path))
    if not rewrite(model):
        return None
    variant = greedy_head(model) if head and projection_fast() else None  # from the LogSoftmax form
    _log_softmax_top_k(model.graph)
    return model.SerializeToString(), None if variant is None else variant.SerializeToString()


def register(options: ort.SessionOptions) -> None:
    """Make the "nmt" ops known to sessions made with `options` (the library must exist)."""
    library = library_path()
    if library is None:
        raise RuntimeError("serve.engine._nmt_ops is not built")
    options.register_custom_ops_library(str(library))
