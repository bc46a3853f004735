"""The slot decoder's attention on our compiled kernels (serve.engine.native) against ONNX Runtime's.

Each op runs beside the com.microsoft op it replaces (one-node graphs from bench.native_kernels) on
the same inputs: outputs equal to float rounding, caches bit for bit. The rewrite is checked on a real
slot decoder, and the engine must decide exactly as with ONNX Runtime's kernels.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import read_lines
from onnx import TensorProto, helper

from bench.native_kernels import bind, cross_attention, self_attention, top_k
from nmt import bundle as fmt
from nmt.decoding import DecodeOptions
from serve.engine import native
from serve.engine.translator import EngineConfig, Translator

MISSING = "serve.engine._nmt_ops is not built (no C compiler at install): the engine runs ORT's kernels"


@pytest.fixture(scope="module")
def built() -> None:
    if native.library_path() is None:
        pytest.skip(MISSING)


def test_the_library_is_built_where_required():
    """CI installs a compiler (.ci/run sets NMT_REQUIRE_NATIVE): there a library that failed to build
    fails here instead of every other test skipping."""
    if native.library_path() is None and not os.environ.get("NMT_REQUIRE_NATIVE"):
        pytest.skip(MISSING)
    assert native.library_path() is not None, MISSING


@pytest.mark.parametrize("rows,heads,head_dim,slots",
                         [(1, 2, 32, 8), (5, 4, 64, 16), (3, 2, 24, 10), (19, 4, 64, 40)],
                         ids=["one-row", "small-model", "generic-head-dim", "many-rows"])
def test_slot_attention_is_group_query_attention(built, rows, heads, head_dim, slots):
    """Three steps of rows of different lengths, caches bound in place as the slot cache binds them:
    the same outputs (to float rounding) and the same caches (bit for bit) as GroupQueryAttention."""
    D = heads * head_dim
    cache = [rows, heads, slots, head_dim]
    gqa, ours = (self_attention(custom, heads, head_dim) for custom in (False, True))
    rng = np.random.default_rng(rows)
    k0, v0 = (rng.standard_normal(cache, dtype=np.float32) for _ in range(2))
    lengths = rng.integers(0, slots - 3, rows).astype(np.int32)
    caches = {name: (k0.copy(), v0.copy()) for name in ("gqa", "ours")}
    for _ in range(3):
        qkv = rng.standard_normal((rows, 1, 3 * D), dtype=np.float32)
        got = {}
        for name, sess in (("gqa", gqa), ("ours", ours)):
            k, v = caches[name]
            out = np.zeros((rows, 1, D), np.float32)
            feeds = {"qkv": qkv, "k": k, "v": v, "lengths": lengths}
            if name == "gqa":
                feeds["total"] = np.array([lengths.max() + 1], np.int32)
            sess.run_with_iobinding(bind(sess, feeds, {"out": out, "k_out": k, "v_out": v}))
            got[name] = out
        np.testing.assert_allclose(got["ours"], got["gqa"], rtol=1e-5, atol=1e-5)
        for a, b in zip(caches["ours"], caches["gqa"]):
            np.testing.assert_array_equal(a, b)
        lengths = lengths + 1
    # the new tokens landed in the caches: slot lengths[r] - 1 of row r holds that step's k
    assert not np.array_equal(caches["ours"][0], k0)


@pytest.mark.parametrize("sources,group,heads,src_len,head_dim", [(1, 1, 2, 5, 32), (4, 4, 4, 9, 64),
                                                                    (5, 2, 2, 7, 24)],
                         ids=["one-query", "beams", "generic-head-dim"])
def test_cross_attention_is_multi_head_attention(built, sources, group, heads, src_len, head_dim):
    """Prefix masks, padding inside a row and a fully masked row, with `group` queries per source."""
    D = heads * head_dim
    kv = [sources, heads, src_len, head_dim]
    mha, ours = (cross_attention(custom, heads, head_dim) for custom in (False, True))
    rng = np.random.default_rng(sources)
    mask = (np.arange(src_len)[None] < rng.integers(1, src_len + 1, sources)[:, None]).astype(np.int32)
    if sources > 1:
        mask[1] = rng.integers(0, 2, src_len)
        mask[1, 0] = 1  # padding inside the row, not at its end
        mask[-1] = 0  # nothing to attend to: every key, as MultiHeadAttention's constant mask offset does
    feeds = {"q": rng.standard_normal((sources, group, D), dtype=np.float32),
             "k": rng.standard_normal(kv, dtype=np.float32), "v": rng.standard_normal(kv, dtype=np.float32),
             "mask": mask}
    want, = mha.run(None, feeds)
    got, = ours.run(None, feeds)
    live = mask.any(axis=1)
    np.testing.assert_allclose(got[live], want[live], rtol=1e-5, atol=1e-5)
    # MultiHeadAttention adds -10000 to every score of the masked row, which rounds them to ~1e-3
    np.testing.assert_allclose(got[~live], want[~live], atol=2e-3)


@pytest.mark.parametrize("rows,vocab,k", [(1, 500, 3), (4, 8000, 8), (64, 8000, 2), (3, 37, 37), (5, 40, 9)],
                         ids=["greedy-one-row", "beam", "placeholder", "whole-row", "short-row"])
def test_conditional_top_k_is_top_k(built, rows, vocab, k):
    """The slot decoder's conditional TopK (k >= min_k, else a (1, 1) placeholder), with ties: equal
    values come lower id first, as ONNX TopK orders them."""
    rng = np.random.default_rng(vocab)
    x = rng.standard_normal((rows, vocab), dtype=np.float32)
    x[:, 5:9] = x[:, 20:24] = 3.0  # ties among the best
    feeds = {"x": x, "top_k": np.array([k], np.int64)}
    values, ids = top_k(custom=True, min_k=3).run(None, feeds)
    if k < 3:
        assert values.shape == ids.shape == (1, 1)
        return
    want_values, want_ids = top_k(custom=False).run(None, feeds)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(values, want_values)


@pytest.mark.parametrize("rows,vocab,k", [(1, 8000, 1), (4, 8000, 8), (64, 8000, 2), (3, 37, 37), (5, 40, 9)],
                         ids=["greedy-one-row", "beam", "min-length", "whole-row", "short-row"])
def test_log_softmax_top_k_is_log_softmax_then_top_k(built, rows, vocab, k):
    """nmt.LogSoftmaxTopK against LogSoftmax -> TopK: the same ids (ties lower id first), log-probs to
    float rounding (another exp), for every k (it replaces the conditional top-k and its log-softmax)."""
    rng = np.random.default_rng(vocab + k)
    x = (4 * rng.standard_normal((rows, vocab))).astype(np.float32)
    x[:, 5:9] = x[:, 20:24] = x.max() + 1  # ties among the best
    feeds = {"x": x, "top_k": np.array([k], np.int64)}
    values, ids = top_k(custom=True, log_softmax=True).run(None, feeds)
    want_values, want_ids = top_k(custom=False, log_softmax=True).run(None, feeds)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(values, want_values, rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_errors_not_crashes(built):
    ours = self_attention(True, heads=2, head_dim=16)
    cache = np.zeros((2, 2, 4, 16), np.float32)
    feeds = {"qkv": np.zeros((2, 1, 96), np.float32), "k": cache, "v": cache,
             "lengths": np.array([0, 4], np.int32)}
    with pytest.raises(Exception, match="a seqlens_k outside the cache's slots"):
        ours.run(None, feeds)
    feeds.update(lengths=np.array([0, 1], np.int32), v=np.zeros((2, 2, 5, 16), np.float32))  # 5 slots, not 4
    with pytest.raises(Exception, match="disagree"):
        ours.run(None, feeds)


def test_the_slot_decoder_is_rewritten_and_other_forms_are_left_alone(built, tiny_bundle):
    model = onnx.load(str(tiny_bundle / fmt.DECODER_SLOTS_FILE))
    layers = sum(1 for n in model.graph.node if n.op_type == "GroupQueryAttention")
    assert native.rewrite(model) == 2 * layers + 1  # + the conditional top-k
    ops = {(n.domain, n.op_type) for n in model.graph.node}
    assert {("nmt", "SlotAttention"), ("nmt", "CrossAttention"), ("nmt", "ConditionalTopK")} <= ops
    assert not any("Attention" in op for domain, op in ops if domain == "com.microsoft")
    assert not {("", "If"), ("", "Greater")} & ops and ("", "LogSoftmax") in ops
    assert any(o.domain == native.DOMAIN for o in model.opset_import)
    # Forms our kernels do not take stay as they are: a scale other than 1 (the exporter folds it into the
    # query projection), a float16 cache.
    def one_node(scale: float, dtype: int) -> onnx.ModelProto:
        node = helper.make_node("GroupQueryAttention", ["qkv", "", "", "k", "v", "lengths", "total"],
                                ["o", "k2", "v2"], domain="com.microsoft", num_heads=2, kv_num_heads=2,
                                scale=scale)
        cache = [None, 2, None, 16]
        inputs = [helper.make_tensor_value_info("qkv", dtype, [None, 1, 96]),
                  helper.make_tensor_value_info("k", dtype, cache),
                  helper.make_tensor_value_info("v", dtype, cache),
                  helper.make_tensor_value_info("lengths", TensorProto.INT32, [None]),
                  helper.make_tensor_value_info("total", TensorProto.INT32, [1])]
        output = helper.make_tensor_value_info("o", dtype, None)
        return helper.make_model(helper.make_graph([node], "g", inputs, [output]))

    assert native.rewrite(one_node(1.0, TensorProto.FLOAT)) == 1
    assert native.rewrite(one_node(0.5, TensorProto.FLOAT)) == 0
    assert native.rewrite(one_node(1.0, TensorProto.FLOAT16)) == 0


def test_the_loaded_graph_takes_its_top_k_log_probs_without_writing_them(built, tiny_bundle, translator):
    """What the engine loads (native.accelerated): the LogSoftmax and the conditional top-k are one
    nmt.LogSoftmaxTopK and the graph has no log_probs output, so greedy steps read their best tokens
    from the graph (no host argmax)."""
    model = onnx.load_from_string(native.accelerated(tiny_bundle / fmt.DECODER_SLOTS_FILE)[0])
    ops = {(n.domain, n.op_type) for n in model.graph.node}
    assert ("nmt", "LogSoftmaxTopK") in ops and not {("", "LogSoftmax"), ("nmt", "ConditionalTopK")} & ops
    assert fmt.LOG_PROBS not in [o.name for o in model.graph.output]
    assert translator.runtime.native_kernels and not translator.runtime.slot_host_argmax


@pytest.fixture(scope="module")
def stock(tiny_bundle) -> Translator:
    config = EngineConfig(device="cpu", intra_op_threads=1, native_kernels=False)
    return Translator.from_bundle(tiny_bundle, config)


@pytest.mark.parametrize("opts", [DecodeOptions(), DecodeOptions(min_length=12, return_scores=True),
                                  DecodeOptions(beam_size=4, n_best=2)],
                         ids=["greedy", "greedy-scores", "beam4"])
def test_the_engine_decides_as_with_onnx_runtimes_kernels(built, translator, stock, opts):
    assert translator.runtime.native_kernels and not stock.runtime.native_kernels
    sources = translator.tokenize(read_lines("test_2016_flickr", "en", 40))
    got = translator.translate_ids(sources, opts, max_batch_tokens=100_000)
    want = stock.translate_ids(sources, opts, max_batch_tokens=100_000)
    for g, w in zip(got, want):
        assert [h.tokens for h in g] == [h.tokens for h in w]
        assert [h.score for h in g] == pytest.approx([h.score for h in w], abs=1e-4, nan_ok=True)


def test_without_the_library_the_graph_runs_as_exported(tiny_bundle, monkeypatch):
    monkeypatch.setattr(native, "library_path", lambda: None)
    engine = Translator.from_bundle(tiny_bundle, EngineConfig(device="cpu", intra_op_threads=1, warmup=False))
    assert engine.runtime.slot_decoder is not None and not engine.runtime.native_kernels
    assert engine.translate(["A man is riding a bike."])[0].text


def test_a_library_that_does_not_load_leaves_the_graph_as_exported(built, tiny_bundle, monkeypatch, caplog):
    def refuse(options):
        raise RuntimeError("RegisterCustomOps failed")
    monkeypatch.setattr(native, "register", refuse)
    engine = Translator.from_bundle(tiny_bundle, EngineConfig(device="cpu", intra_op_threads=2, warmup=False))
    assert engine.runtime.slot_parts is not None and not engine.runtime.native_kernels
    assert "ONNX Runtime's kernels instead" in caplog.text
    assert engine.translate(["A man is riding a bike."])[0].text


PORTABLE = """
import numpy as np
from bench.native_kernels import bind, cross_attention, self_attention, top_k
rng = np.random.default_rng(0)
R, H, Dh, L, S = 6, 2, 32, 12, 9
k, v = (rng.standard_normal((R, H, L, Dh), dtype=np.float32) for _ in range(2))
qkv = rng.standard_normal((R, 1, 3 * H * Dh), dtype=np.float32)
lengths = np.arange(R, dtype=np.int32)
outs = []
for custom in (False, True):
    sess, kc, vc = self_attention(custom, H, Dh), k.copy(), v.copy()
    feeds = {"qkv": qkv, "k": kc, "v": vc, "lengths": lengths}
    if not custom:
        feeds["total"] = np.array([R], np.int32)
    out = np.zeros((R, 1, H * Dh), np.float32)
    sess.run_with_iobinding(bind(sess, feeds, {"out": out, "k_out": kc, "v_out": vc}))
    outs.append(out)
print(float(np.abs(outs[0] - outs[1]).max()))
feeds = {"q": rng.standard_normal((R, 2, H * Dh), dtype=np.float32), "mask": np.ones((R, S), np.int32),
         "k": rng.standard_normal((R, H, S, Dh), dtype=np.float32),
         "v": rng.standard_normal((R, H, S, Dh), dtype=np.float32)}
feeds["mask"][:, 6:] = 0
a, b = (cross_attention(custom, H, Dh).run(None, feeds)[0] for custom in (False, True))
print(float(np.abs(a - b).max()))
x = rng.standard_normal((R, 1000), dtype=np.float32)
x[:, 10:14] = 4.0
a, b = (top_k(custom).run(None, {"x": x, "top_k": np.array([8])}) for custom in (False, True))
print(int((a[1] != b[1]).sum()), float(np.abs(a[0] - b[0]).max()))
feeds = {"x": x, "top_k": np.array([8])}
a, b = (top_k(custom, log_softmax=True).run(None, feeds) for custom in (False, True))
print(int((a[1] != b[1]).sum()), float(np.abs(a[0] - b[0]).max()))
"""


def test_the_portable_loops_match_too(built):
    """The loops that run where the CPU has no AVX-512, forced on this one (NMT_NATIVE_PORTABLE)."""
    env = {**os.environ, "NMT_NATIVE_PORTABLE": "1"}
    out = subprocess.run([sys.executable, "-c", PORTABLE], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parents[2], timeout=120)
    assert out.returncode == 0, out.stderr
    self_diff, cross_diff, top, log_softmax = out.stdout.split("\n")[:4]
    assert float(self_diff) < 1e-5 and float(cross_diff) < 1e-5
    assert top.split()[0] == "0" and float(top.split()[1]) == 0.0
    assert log_softmax.split()[0] == "0" and float(log_softmax.split()[1]) < 1e-5
