"""What attention costs in a slot-decoder step, measured without ONNX Runtime's profiler.

    python -m bench.step_share --bundle bundles/en-de --rows 1,4,32,64 --threads 1

The profiler's per-node timers add a few µs to every node, which inflates the many small ops of a
decoder step (a LogSoftmax it put at 4-8% of a batch-64 step cost nothing measurable when removed).
So this times the bundle's decoder_slots.onnx as it is and a copy whose attention nodes are stand-ins
of the same output shapes (GroupQueryAttention: the query columns of its packed input, its past as
its present; MultiHeadAttention: its query), both with every input bound once and the K/V buffers
written in place, runs interleaved; the difference is what the attention kernels cost. The stand-in
graph computes nothing meaningful: only its time is used.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from bench.worker import turned
from nmt import bundle as sb
from serve.engine.slots import FIRST_LENGTH


def without_attention(model: onnx.ModelProto, d_model: int) -> onnx.ModelProto:
    """A copy of the slot decoder with its attention nodes replaced by shape-preserving stand-ins."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    nodes = []
    for n in graph.node:
        if n.op_type == "GroupQueryAttention":  # inputs: packed qkv (R, 1, 3D), _, _, past key, past value
            nodes.append(helper.make_node("Slice", [n.input[0], "share.zero", "share.width", "share.axis"],
                                          [n.output[0]]))  # (R, 1, D)
            nodes += [helper.make_node("Identity", [n.input[i]], [n.output[j]]) for i, j in ((3, 1), (4, 2))]
        elif n.op_type == "MultiHeadAttention":  # cross-attention: the output has the query's shape
            nodes.append(helper.make_node("Identity", [n.input[0]], [n.output[0]]))
        else:
            nodes.append(n)
    del graph.node[:]
    graph.node.extend(nodes)
    for name, value in (("share.zero", 0), ("share.width", d_model), ("share.axis", 2)):
        graph.initializer.append(numpy_helper.from_array(np.array([value], np.int64), name))
    return out


def session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.log_severity_level = 3  # the stand-ins leave unused initializers (a warning per name)
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def bound(sess: ort.InferenceSession, rows: int, cached: int, src_len: int, capacity: int,
          rng: np.random.Generator) -> tuple[ort.IOBinding, list[ort.OrtValue]]:
    """Every input of one step of `rows` rows, each holding `cached` tokens, bound once (the K/V
    buffers as input and output, as SlotCache binds them); greedy steps (top_k 1) from 4 rows."""
    small = {sb.INPUT_IDS: np.full((rows, 1), 5, np.int64),
             sb.POSITION_IDS: np.full((rows, 1), cached, np.int64),
             sb.SEQLENS_K: np.full(rows, cached, np.int32),
             sb.TOTAL_SEQUENCE_LENGTH: np.array([cached + 1], np.int32),
             sb.ENCODER_ATTENTION_MASK: np.ones((rows, src_len), bool),
             sb.TOP_K: np.array([1 if rows >= 4 else 3], np.int64)}
    io, keep = sess.io_binding(), []
    for i in sess.get_inputs():
        if i.name in small:
            array = small[i.name]
        else:  # past_key_values.{i}.{encoder,decoder}.{key,value}: (R, H, S or capacity, Dh)
            heads, head_dim = i.shape[1], i.shape[3]
            length = src_len if ".encoder." in i.name else capacity
            array = rng.standard_normal((rows, heads, length, head_dim), dtype=np.float32)
        value = ort.OrtValue.ortvalue_from_numpy(array)
        keep.append(value)
        io.bind_ortvalue_input(i.name, value)
        if ".decoder." in i.name:
            io.bind_ortvalue_output(i.name.replace("past_key_values", "present"), value)
    for o in sess.get_outputs():
        if not o.name.startswith("present"):
            io.bind_output(o.name, "cpu")
    return io, keep


def measure(bundle: Path, rows_list: list[int], cached: int, src_len: int, threads: int, repeats: int
            ) -> list[tuple[int, float, float]]:
    """(rows, µs per step, µs per step without attention) for each row count."""
    m = sb.read_manifest(bundle)
    if not (bundle / sb.DECODER_SLOTS_FILE).exists():
        raise sb.BundleError(f"{bundle} has no {sb.DECODER_SLOTS_FILE}: export it with fused graphs "
                             "(fp32 or int8)")
    model = onnx.load(str(bundle / sb.DECODER_SLOTS_FILE))
    graphs = {"full": session(model, threads), "bare": session(without_attention(model, m.d_model), threads)}
    capacity = max(FIRST_LENGTH, cached + 1)  # slots per row, as a SlotCache allocates them
    rng = np.random.default_rng(0)
    results = []
    for rows in rows_list:
        bindings = {name: bound(sess, rows, cached, src_len, capacity, rng) for name, sess in graphs.items()}
        runs = max(20, 2000 // rows)
        times: dict[str, list[float]] = {name: [] for name in graphs}
        for rep in range(repeats):
            for name in turned(list(graphs), rep):
                sess, io = graphs[name], bindings[name][0]
                for _ in range(3):
                    sess.run_with_iobinding(io)
                start = time.perf_counter()
                for _ in range(runs):
                    sess.run_with_iobinding(io)
                times[name].append(1e6 * (time.perf_counter() - start) / runs)
        results.append((rows, statistics.median(times["full"]), statistics.median(times["bare"])))
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--rows", default="1,4,32,64", help="row counts, comma-separated")
    p.add_argument("--cached", type=int, default=15, help="tokens already in every row's cache")
    p.add_argument("--source-len", type=int, default=20, help="source tokens per row (cross-attention)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    load = os.getloadavg()
    try:
        results = measure(args.bundle, [int(r) for r in args.rows.split(",")], args.cached, args.source_len,
                          args.threads, args.repeats)
    except sb.BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.bundle}: {args.threads} thread(s), {args.cached} cached tokens, {args.source_len} source "
          f"tokens, medians of {args.repeats}; load average before {load[0]:.2f}")
    print("| rows | step µs | without attention µs | attention µs | attention share |")
    print("|---|---|---|---|---|")
    for rows, step, bare in results:
        print(f"| {rows} | {step:.1f} | {bare:.1f} | {step - bare:.0f} | {100 * (step - bare) / step:.1f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
