"""ONNX Runtime's ops against serve.engine.native's compiled ones, alone, on slot-decoder shapes.

    python -m bench.native_kernels [--threads 1] [--heads 4] [--head-dim 64] [--cached 15] [--source 20]
                                     [--vocab 8000] [-k 8]

Per row count, on the same inputs, runs interleaved, best of --repeats:
  * self: GroupQueryAttention against nmt.SlotAttention, one new token per row over --cached tokens,
    the caches bound in place as the slot cache binds them;
  * cross: MultiHeadAttention against nmt.CrossAttention over --source tokens (a tenth of them padding),
    one query per source row, and four (a source's beams) in the `4 per source` rows;
  * top-k: ONNX TopK against nmt.ConditionalTopK, the k best of each row of --vocab log-probs;
  * log-softmax top-k: LogSoftmax -> TopK against nmt.LogSoftmaxTopK on --vocab logits (beam steps);
  * greedy head: the vocabulary projection of (rows, heads x head-dim) states, log-softmax and top-1
    (MatMul, LogSoftmax, TopK) against nmt.ProjectionTopK (random weights and states: about as many
    candidates per row as on the trained model, one or two).
The engine-level effect is `python -m bench.levers --variant stock=B:stock --variant native=B`.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from bench.worker import turned
from serve.engine import native

FLOAT, INT32 = TensorProto.FLOAT, TensorProto.INT32


def session(node: onnx.NodeProto | list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
            outputs: list[str], custom: bool, threads: int = 1, types: dict[str, int] | None = None,
            weights: dict[str, np.ndarray] | None = None) -> ort.InferenceSession:
    """A graph of one node (or a few) on the CPU; outputs are float unless `types` says otherwise;
    weights: its initializers; custom: the "nmt" ops registered."""
    nodes = node if isinstance(node, list) else [node]
    results = [helper.make_tensor_value_info(o, (types or {}).get(o, FLOAT), None) for o in outputs]
    inits = [numpy_helper.from_array(v, name) for name, v in (weights or {}).items()]
    graph = helper.make_graph(nodes, nodes[0].op_type, inputs, results, inits)
    opsets = [helper.make_opsetid(d, v) for d, v in (("", 17), ("com.microsoft", 1), (native.DOMAIN, 1))]
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if custom:
        native.register(options)
    model = helper.make_model(graph, opset_imports=opsets, ir_version=8)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def self_attention(custom: bool, heads: int, head_dim: int, threads: int = 1) -> ort.InferenceSession:
    """GroupQueryAttention as the slot decoder uses it (inputs qkv, k, v, lengths, total; outputs out,
    k_out, v_out), or nmt.SlotAttention (the same without `total`)."""
    D = heads * head_dim
    cache = [None, heads, None, head_dim]
    ins = [helper.make_tensor_value_info("qkv", FLOAT, [None, 1, 3 * D]),
           helper.make_tensor_value_info("k", FLOAT, cache), helper.make_tensor_value_info("v", FLOAT, cache),
           helper.make_tensor_value_info("lengths", INT32, [None]),
           helper.make_tensor_value_info("total", INT32, [1])]
    outs = ["out", "k_out", "v_out"]
    if custom:
        node = helper.make_node("SlotAttention", ["qkv", "k", "v", "lengths"], outs, domain=native.DOMAIN)
        return session(node, ins[:4], outs, True, threads)
    node = helper.make_node("GroupQueryAttention", ["qkv", "", "", "k", "v", "lengths", "total"], outs,
                            domain=native.MS, num_heads=heads, kv_num_heads=heads, scale=1.0)
    return session(node, ins, outs, False, threads)


def cross_attention(custom: bool, heads: int, head_dim: int, threads: int = 1) -> ort.InferenceSession:
    """MultiHeadAttention on (B, H, S, Dh) cross K/V with an int32 mask (inputs q, k, v, mask; output
    out), or nmt.CrossAttention."""
    kv = [None, heads, None, head_dim]
    ins = [helper.make_tensor_value_info("q", FLOAT, [None, None, heads * head_dim]),
           helper.make_tensor_value_info("k", FLOAT, kv), helper.make_tensor_value_info("v", FLOAT, kv),
           helper.make_tensor_value_info("mask", INT32, [None, None])]
    if custom:
        node = helper.make_node("CrossAttention", ["q", "k", "v", "mask"], ["out"], domain=native.DOMAIN)
    else:
        node = helper.make_node("MultiHeadAttention", ["q", "k", "v", "", "mask"], ["out"], domain=native.MS,
                                num_heads=heads, scale=1.0)
    return session(node, ins, ["out"], custom, threads)


def top_k(custom: bool, min_k: int = 3, threads: int = 1, log_softmax: bool = False) -> ort.InferenceSession:
    """nmt.ConditionalTopK (inputs x, top_k; outputs values, ids; a (1, 1) placeholder for top_k < min_k),
    or ONNX TopK; log_softmax: nmt.LogSoftmaxTopK (every k), or LogSoftmax -> TopK."""
    ins = [helper.make_tensor_value_info("x", FLOAT, [None, None]),
           helper.make_tensor_value_info("top_k", TensorProto.INT64, [1])]
    outs = ["values", "ids"]
    if custom and log_softmax:
        nodes = [helper.make_node("LogSoftmaxTopK", ["x", "top_k"], outs, domain=native.DOMAIN)]
    elif custom:
        nodes = [helper.make_node("ConditionalTopK", ["x", "top_k"], outs, domain=native.DOMAIN, min_k=min_k)]
    else:
        first = [helper.make_node("LogSoftmax", ["x"], ["log_probs"], axis=-1)] if log_softmax else []
        scores = "log_probs" if log_softmax else "x"
        nodes = first + [helper.make_node("TopK", [scores, "top_k"], outs, axis=-1)]
    return session(nodes, ins, outs, custom, threads, types={"ids": TensorProto.INT64})


def projection(custom: bool, weight: np.ndarray, bias: np.ndarray | None = None,
               threads: int = 1) -> ort.InferenceSession:
    """The vocabulary projection and top-k of h (R, K) for weight (K, V): nmt.ProjectionTopK on
    native.projection_weights (values: logits), or MatMul [+ bias] -> LogSoftmax -> TopK (values:
    log-probs), the slot decoder's tail. Inputs h, top_k; outputs values, ids."""
    K, V = weight.shape
    ins = [helper.make_tensor_value_info("h", FLOAT, [None, K]),
           helper.make_tensor_value_info("top_k", TensorProto.INT64, [1])]
    if custom:
        weights = native.projection_weights(weight, bias)
        nodes = [helper.make_node("ProjectionTopK", ["h", *weights, "top_k"], ["values", "ids"],
                                  domain=native.DOMAIN)]
    else:
        weights = {"w": weight} if bias is None else {"w": weight, "bias": bias}
        nodes = [helper.make_node("MatMul", ["h", "w"], ["logits" if bias is None else "product"])]
        if bias is not None:
            nodes.append(helper.make_node("Add", ["product", "bias"], ["logits"]))
        nodes += [helper.make_node("LogSoftmax", ["logits"], ["log_probs"], axis=-1),
                  helper.make_node("TopK", ["log_probs", "top_k"], ["values", "ids"], axis=-1)]
    return session(nodes, ins, ["values", "ids"], custom, threads, {"ids": TensorProto.INT64}, weights)


def bind(sess: ort.InferenceSession, inputs: dict[str, np.ndarray],
         outputs: dict[str, np.ndarray]) -> ort.IOBinding:
    """Every array bound once; an output bound to an input's array is written in place."""
    binding = sess.io_binding()
    values = {id(a): ort.OrtValue.ortvalue_from_numpy(a) for a in [*inputs.values(), *outputs.values()]}
    for name, array in inputs.items():
        binding.bind_ortvalue_input(name, values[id(array)])
    for name, array in outputs.items():
        binding.bind_ortvalue_output(name, values[id(array)])
    return binding


def best_us(runs: dict[str, Callable[[], object]], repeats: int, calls: int = 100) -> dict[str, float]:
    """µs per call of each run, the best of `repeats` passes; the runs take turns, the first changing
    from pass to pass."""
    best = dict.fromkeys(runs, float("inf"))
    for rep in range(repeats):
        for name in turned(list(runs), rep):
            start = time.perf_counter()
            for _ in range(calls):
                runs[name]()
            best[name] = min(best[name], (time.perf_counter() - start) / calls)
    return {name: b * 1e6 for name, b in best.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.native_kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--cached", type=int, default=15, help="tokens in each row's self-attention cache")
    p.add_argument("--source", type=int, default=20, help="source tokens of each cross-attention row")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    p.add_argument("--vocab", type=int, default=8000, help="row length of the top-k (the vocabulary)")
    p.add_argument("-k", type=int, default=8, help="the top-k's k (beam 4 asks for 8)")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    if native.library_path() is None:
        print("bench.native_kernels: serve.engine._nmt_ops is not built (no C compiler at install)",
              file=sys.stderr)
        return 2
    H, Dh, S = args.heads, args.head_dim, args.source
    D, slots = H * Dh, 2 * args.cached
    rng = np.random.default_rng(0)
    pairs = {kind: [make(custom, H, Dh, args.threads) for custom in (False, True)]
             for kind, make in (("self", self_attention), ("cross", cross_attention))}
    pairs["top-k"] = [top_k(custom, threads=args.threads) for custom in (False, True)]
    pairs["log-softmax"] = [top_k(custom, threads=args.threads, log_softmax=True) for custom in (False, True)]
    weight = (rng.standard_normal((D, args.vocab)) / np.sqrt(D)).astype(np.float32)  # (D, V)
    pairs["head"] = [projection(custom, weight, threads=args.threads) for custom in (False, True)]
    print(f"threads {args.threads}, {H} heads x {Dh}, {args.cached} cached tokens, {S} source tokens; "
          f"best of {args.repeats}; load average before {os.getloadavg()[0]:.2f}")
    print("| kernel | rows | ONNX Runtime µs | nmt µs | speed-up |")
    print("|---|---|---|---|---|")
    for rows in args.rows:
        for kind, group in (("self", 1), ("cross", 1), ("cross", 4), ("top-k", 1), ("log-softmax", 1),
                            ("head", 1)):
            if rows % group:
                continue
            runs: dict[str, Callable[[], object]] = {}
            for custom, sess in enumerate(pairs[kind]):
                if kind == "self":
                    k, v = (rng.standard_normal((rows, H, slots, Dh), dtype=np.float32) for _ in range(2))
                    lengths = np.full(rows, args.cached, np.int32)
                    inputs = {"qkv": rng.standard_normal((rows, 1, 3 * D), dtype=np.float32), "k": k, "v": v,
                              "lengths": lengths}
                    if not custom:
                        inputs["total"] = np.array([args.cached + 1], np.int32)
                    outputs = {"out": np.zeros((rows, 1, D), np.float32), "k_out": k, "v_out": v}
                elif kind == "head":
                    inputs = {"h": rng.standard_normal((rows, D), dtype=np.float32),
                              "top_k": np.array([1], np.int64)}
                    outputs = {"values": np.zeros((rows, 1), np.float32),
                               "ids": np.zeros((rows, 1), np.int64)}
                elif kind in ("top-k", "log-softmax"):
                    x = rng.standard_normal((rows, args.vocab), dtype=np.float32)
                    inputs = {"x": x, "top_k": np.array([args.k], np.int64)}
                    outputs = {"values": np.zeros((rows, args.k), np.float32),
                               "ids": np.zeros((rows, args.k), np.int64)}
                else:
                    B = rows // group
                    mask = np.ones((B, S), np.int32)
                    mask[:, S - max(1, S // 10):] = 0
                    inputs = {"q": rng.standard_normal((B, group, D), dtype=np.float32), "mask": mask,
                              "k": rng.standard_normal((B, H, S, Dh), dtype=np.float32),
                              "v": rng.standard_normal((B, H, S, Dh), dtype=np.float32)}
                    outputs = {"out": np.zeros((B, group, D), np.float32)}
                runs["nmt" if custom else "ort"] = functools.partial(sess.run_with_iobinding,
                                                                     bind(sess, inputs, outputs))
            times = best_us(runs, args.repeats)
            label = {1: kind, 4: f"{kind}, 4 per source"}[group]
            label = f"top-{args.k} of {args.vocab}" if kind == "top-k" else label
            label = f"log-softmax top-{args.k} of {args.vocab}" if kind == "log-softmax" else label
            label = f"greedy head, {D} x {args.vocab}" if kind == "head" else label
            ort_us, nmt_us = times["ort"], times["nmt"]
            print(f"| {label} | {rows} | {ort_us:.1f} | {nmt_us:.1f} | {ort_us / nmt_us:.2f}× |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
