"""The slot decoder's greedy head (serve.engine.native.greedy_head, the nmt.ProjectionTopK kernel).

The op must return the top k of the float32 logits h . W + b whatever its int8 estimates say: ties
to the lower id, entries the int8 copy cannot tell apart told apart, rows with NaN survived. The
engine must decide with it exactly as without it (and as PyTorch: tests/engine/test_engine.py).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import read_lines
from onnx import TensorProto, helper

from bench.native_kernels import projection, session
from nmt import bundle as fmt
from nmt.decoding import DecodeOptions
from serve.engine import native, slots
from serve.engine.translator import EngineConfig, Translator

MISSING = "serve.engine._nmt_ops is not built (no C compiler at install): the engine runs ORT's kernels"


@pytest.fixture(scope="module")
def built() -> None:
    if native.library_path() is None:
        pytest.skip(MISSING)


def hard_case(rows: int, dim: int, vocab: int, bias: bool, seed: int):
    """Weights (dim, vocab), bias and states (rows, dim) with exact ties and near ties among the best:
    columns 3 and 9 equal (a tie, 3 first); column 11 is column 7 plus 2e-4 on one input, which its
    int8 copy cannot see (a step of its scale is ~1e-2), and the states lean on both."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((dim, vocab)) / np.sqrt(dim)).astype(np.float32)
    b = (0.1 * rng.standard_normal(vocab)).astype(np.float32) if bias else None
    w[:, 9] = w[:, 3]
    w[:, 11] = w[:, 7]
    w[0, 11] += 2e-4
    h = rng.standard_normal((rows, dim)).astype(np.float32)
    lead = np.zeros(vocab, np.float32)
    if b is not None:
        b[9], b[11] = b[3], b[7]
        lead = b
    for r in range(rows):  # push the tied / nearly tied columns to the top of a third of the rows each
        col = (3, 7, None)[r % 3]
        if col is not None:
            h[r] = 3 * w[:, col] / np.linalg.norm(w[:, col]) * np.sqrt(dim)
            h[r, 0] = abs(h[r, 0]) + 4.0  # h[0] > 0: column 11 beats 7 by 2e-4 * h[0]
    logits = h.astype(np.float64) @ w.astype(np.float64) + lead  # (rows, vocab) exact
    return w, b, h, logits


def expected_ids(logits: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-logits, axis=1, kind="stable")[:, :k]  # ties: the lower id first


@pytest.mark.parametrize("rows,dim,vocab,k,bias", [
    (1, 256, 8000, 1, False), (3, 64, 1000, 2, True), (37, 64, 500, 1, True), (70, 32, 130, 3, False),
    (5, 30, 16, 16, False), (6, 7, 21, 2, True)],
    ids=["greedy-one-row", "min-length", "row-blocks", "two-chunks", "whole-vocab", "padded"])
def test_projection_top_k_is_the_top_k_of_the_float32_logits(built, rows, dim, vocab, k, bias):
    """Shapes that exercise the 4-row blocks, the 32-row chunks and the padding of V to 16 and K to 4."""
    w, b, h, logits = hard_case(rows, dim, vocab, bias, seed=rows)
    values, ids = projection(True, w, b).run(None, {"h": h, "top_k": np.array([k], np.int64)})
    assert ids.shape == values.shape == (rows, k)
    np.testing.assert_array_equal(ids, expected_ids(logits, k))
    np.testing.assert_allclose(values, np.take_along_axis(logits, ids, axis=1), rtol=1e-5, atol=1e-5)
    if vocab > 11:
        nearly = np.flatnonzero(np.arange(rows) % 3 == 1)  # rows led by columns 7 and 11
        assert (ids[nearly, 0] == 11).all()
        tied = np.flatnonzero(np.arange(rows) % 3 == 0)  # rows led by the tie of columns 3 and 9
        assert (ids[tied, 0] == 3).all()


def test_the_greedy_head_picks_what_the_log_softmax_top_k_picks(built):
    """Against the graph it replaces (MatMul, LogSoftmax, TopK on ONNX Runtime): the same ids."""
    w, b, h, _ = hard_case(40, 256, 8000, True, seed=1)
    for k in (1, 2):
        feeds = {"h": h, "top_k": np.array([k], np.int64)}
        got = projection(True, w, b).run(None, feeds)[1]
        want = projection(False, w, b).run(None, feeds)[1]
        np.testing.assert_array_equal(got, want)


def test_rows_with_nan_or_infinity_do_not_disturb_the_others(built):
    w, b, h, logits = hard_case(6, 64, 300, True, seed=2)
    h[1, 5], h[4, 0] = np.nan, np.inf
    values, ids = projection(True, w, b).run(None, {"h": h, "top_k": np.array([2], np.int64)})
    finite = [0, 2, 3, 5]
    np.testing.assert_array_equal(ids[finite], expected_ids(logits, 2)[finite])
    assert ((ids >= 0) & (ids < 300)).all()


def test_bad_inputs_are_errors_not_crashes(built):
    w, b, h, _ = hard_case(2, 64, 100, False, seed=3)
    sess = projection(True, w, b)
    for k, message in ((0, "top_k must be one number in"), (65, "top_k must be one number in"),
                       (101, "top_k must be one number in")):
        with pytest.raises(Exception, match=message):
            sess.run(None, {"h": h, "top_k": np.array([k], np.int64)})
    weights = native.projection_weights(w, b)
    weights["bias"] = weights["bias"][:90]  # a bias shorter than the vocabulary
    node = helper.make_node("ProjectionTopK", ["h", *weights, "top_k"], ["values", "ids"],
                            domain=native.DOMAIN)
    inputs = [helper.make_tensor_value_info("h", TensorProto.FLOAT, [None, 64]),
              helper.make_tensor_value_info("top_k", TensorProto.INT64, [1])]
    bad = session(node, inputs, ["values", "ids"], True, types={"ids": TensorProto.INT64}, weights=weights)
    with pytest.raises(Exception, match="disagree"):
        bad.run(None, {"h": h, "top_k": np.array([1], np.int64)})


PORTABLE = """
import numpy as np
import sys
sys.path.insert(0, "tests/engine")
from test_greedy_head import expected_ids, hard_case
from onnx import TensorProto, helper

from bench.native_kernels import projection, session
from serve.engine import native
w, b, h, logits = hard_case(37, 64, 500, True, seed=4)
values, ids = projection(True, w, b).run(None, {"h": h, "top_k": np.array([2], np.int64)})
print(native.projection_fast(), int((ids != expected_ids(logits, 2)).sum()))
"""


def test_the_portable_loops_match_too(built):
    """The loops that run where the CPU has no AVX-512 VNNI, forced on this one (NMT_NATIVE_PORTABLE);
    the engine does not use the head there (native.projection_fast), the op stays exact."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "NMT_NATIVE_PORTABLE": "1", "PYTHONPATH": str(root / "tests")}
    out = subprocess.run([sys.executable, "-c", PORTABLE], capture_output=True, text=True, env=env, cwd=root,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "0"]


def test_the_head_replaces_the_projection_log_softmax_and_top_k(built, tiny_bundle, tiny_bundle_int8):
    model = onnx.load(str(tiny_bundle / fmt.DECODER_SLOTS_FILE))
    native.rewrite(model)
    head = native.greedy_head(model)
    assert head is not None
    ops = [n.op_type for n in head.graph.node]
    assert ops.count("ProjectionTopK") == 1 and not {"LogSoftmax", "ConditionalTopK", "TopK"} & set(ops)
    assert ops.count("MatMul") == [n.op_type for n in model.graph.node].count("MatMul") - 1  # the generator's
    outputs = [o.name for o in head.graph.output]
    assert outputs == [o.name for o in model.graph.output if o.name != fmt.LOG_PROBS]
    read = {i for n in head.graph.node for i in n.input}
    assert all(t.name in read for t in head.graph.initializer)  # the float32 (K, V) copy is gone
    # An int8 bundle's projection is quantized: no float32 MatMul to replace, the graph is left alone.
    int8 = onnx.load(str(tiny_bundle_int8 / fmt.DECODER_SLOTS_FILE))
    native.rewrite(int8)
    assert native.greedy_head(int8) is None


@pytest.fixture(scope="module")
def full(tiny_bundle) -> Translator:
    config = EngineConfig(device="cpu", intra_op_threads=1, greedy_head=False)
    return Translator.from_bundle(tiny_bundle, config)


@pytest.mark.parametrize("threads", [1, 2], ids=["one-thread", "row-parts"])
@pytest.mark.parametrize("opts", [DecodeOptions(), DecodeOptions(min_length=12)],
                         ids=["greedy", "min_length"])
def test_the_engine_decides_with_the_head_as_without(built, tiny_bundle, full, threads, opts, monkeypatch):
    if not native.projection_fast():
        pytest.skip("this CPU has no AVX-512 VNNI: the engine leaves the greedy head off")
    engine = Translator.from_bundle(tiny_bundle, EngineConfig(device="cpu", intra_op_threads=threads,
                                                              shards=False))
    assert engine.runtime.slot_head is not None and full.runtime.slot_head is None
    heads = []
    made = slots.StepBinding.__init__

    def spying(self, cache, k, parts, head=False):
        heads.append((head, len(parts)))
        made(self, cache, k, parts, head)

    monkeypatch.setattr(slots.StepBinding, "__init__", spying)
    sources = engine.tokenize(read_lines("test_2016_flickr", "en", 40))
    got = engine.translate_ids(sources, opts, max_batch_tokens=100_000)
    assert heads and all(head for head, _ in heads)  # every greedy step without scores took the head
    assert threads == 1 or max(parts for _, parts in heads) == 2
    want = full.translate_ids(sources, opts, max_batch_tokens=100_000)
    assert [h[0].tokens for h in got] == [h[0].tokens for h in want]
    before = len(heads)
    scored = engine.translate_ids(sources[:5], dataclasses.replace(opts, return_scores=True))  # the full tail
    assert heads[before:] and not any(head for head, _ in heads[before:])
    assert [h[0].tokens for h in scored] == [h[0].tokens for h in want[:5]]


def test_a_head_that_does_not_load_leaves_the_full_projection(built, tiny_bundle, monkeypatch, caplog):
    def broken(model):
        head = onnx.ModelProto()
        head.CopyFrom(model)
        head.graph.node.add(op_type="ProjectionTopK", domain=native.DOMAIN, input=["nowhere"], output=["x"])
        return head

    monkeypatch.setattr(native, "greedy_head", broken)
    monkeypatch.setattr(native, "projection_fast", lambda: True)
    with caplog.at_level(logging.WARNING):
        config = EngineConfig(device="cpu", intra_op_threads=1, warmup=False)
        engine = Translator.from_bundle(tiny_bundle, config)
    assert engine.runtime.native_kernels and engine.runtime.slot_head is None
    assert "greedy head did not load" in caplog.text
    assert engine.translate(["A man is riding a bike."])[0].text
