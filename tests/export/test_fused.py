"""The fused encoder/decoder (export/fused.py): what the manifest records, how old and unknown
manifests are read, and the grouped cross-attention contract the decoder claims."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export.pipeline import export_bundle
from export.validate import check_grouped_cross, pad_batch, validation_sources
from nmt import bundle as sb
from train.checkpoint import load_checkpoint, model_from_checkpoint


def decoder_session(bundle, file: str = sb.DECODER_FILE) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(bundle / file), opts, providers=["CPUExecutionProvider"])


def op_types(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def test_default_bundle_is_fused_and_says_so(tiny_bundle):
    m = sb.read_manifest(tiny_bundle)
    assert m.optimizations == {sb.FUSED_ATTENTION, sb.GROUPED_CROSS_KV, sb.SLOT_CACHE, sb.PACKED_ENCODER,
                               sb.SLOT_HOST_ARGMAX, sb.KEY_MASK_COLUMN}
    assert "GroupQueryAttention" in op_types(tiny_bundle / sb.DECODER_SLOTS_FILE)
    assert "NonZero" in op_types(tiny_bundle / sb.ENCODER_FILE)  # the real tokens, padding removed
    # The encoder's attention has no mask or bias input (the mask is a key column): ORT's CPU
    # MultiHeadAttention runs its flash kernel only then (test_export checks padding stays hidden).
    encoder_mha = [n for n in onnx.load(str(tiny_bundle / sb.ENCODER_FILE)).graph.node
                   if n.op_type == "MultiHeadAttention"]
    assert encoder_mha and all(len([i for i in n.input if i]) == 3 for n in encoder_mha)
    for f in (sb.ENCODER_FILE, sb.DECODER_FILE, sb.DECODER_SLOTS_FILE):
        ops = op_types(tiny_bundle / f)
        # fused attention; plain Add + LayerNormalization (faster than ORT's SkipLayerNormalization on CPU)
        assert "MultiHeadAttention" in ops and "LayerNormalization" in ops
        assert "SkipLayerNormalization" not in ops
    # The alignment graph is the fused decoder plus the probabilities beside MHA, validated too.
    assert "MultiHeadAttention" in op_types(tiny_bundle / sb.DECODER_ALIGNMENTS_FILE)
    v = m.raw["validation"]
    assert v["passed"] and v["greedy"]["identical"] == v["greedy"]["sentences"]
    assert v["max_abs_diff"]["decoder.grouped_cross_kv.log_probs"] < 1e-4
    assert v["max_abs_diff"]["decoder_alignments.cross_attention"] < 1e-4
    assert v["max_abs_diff"]["decoder_alignments.log_probs"] < 1e-4


@pytest.fixture(scope="module")
def traced_bundle(tiny_checkpoint, tmp_path_factory):
    return export_bundle(tiny_checkpoint, tmp_path_factory.mktemp("traced") / "b", graphs="traced")


def test_traced_bundle_records_no_optimizations(traced_bundle):
    assert sb.read_manifest(traced_bundle).optimizations == frozenset()
    for f in (sb.DECODER_FILE, sb.DECODER_ALIGNMENTS_FILE):
        assert "MultiHeadAttention" not in op_types(traced_bundle / f)


def test_alignment_graph_gives_the_plain_decoders_numbers(tiny_bundle, tiny_checkpoint):
    """Asking for alignments must not change a translation: the same log-probs and K/V, bit for bit."""
    model, tok = model_from_checkpoint(load_checkpoint(tiny_checkpoint))
    srcs = validation_sources(model, tok, 2, 0)
    ids, mask = pad_batch(srcs, model.cfg.pad_id)
    with torch.inference_mode():
        cross = model.cross_kv(model.encode(ids, mask))
    plain = decoder_session(tiny_bundle)
    aligned = decoder_session(tiny_bundle, sb.DECODER_ALIGNMENTS_FILE)
    B, L = len(srcs), model.cfg.n_decoder_layers
    feed = {sb.INPUT_IDS: np.full((B, 1), model.cfg.bos_id, np.int64),
            sb.POSITION_IDS: np.zeros((B, 1), np.int64),
            sb.SELF_ATTENTION_MASK: np.ones((B, 1, 1), bool), sb.ENCODER_ATTENTION_MASK: mask.numpy(),
            sb.TOP_K: np.array([4], np.int64)}
    for i, kv in enumerate(cross):
        for w, t in zip(("key", "value"), kv):
            feed[sb.past_name(i, "encoder", w)] = t.numpy()
            empty = np.zeros((B, model.cfg.n_heads, 0, model.cfg.head_dim), np.float32)  # (B, H, 0, Dh)
            feed[sb.past_name(i, "decoder", w)] = empty
    a = dict(zip([o.name for o in aligned.get_outputs()], aligned.run(None, feed)))
    p = dict(zip([o.name for o in plain.get_outputs()], plain.run(None, feed)))
    assert set(a) - set(p) == {sb.CROSS_ATTENTION}
    for name, value in p.items():
        assert np.array_equal(value, a[name]), name
    probs = a[sb.CROSS_ATTENTION]  # (B, L, 1, S): distributions over the real source tokens only
    assert probs.shape == (B, L, 1, mask.shape[1])
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    assert (probs[~np.broadcast_to(mask.numpy()[:, None, None, :], probs.shape)] == 0).all()


def test_manifest_without_the_field_loads_and_unknown_ones_are_refused(tiny_bundle, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    raw = json.loads((b / sb.MANIFEST_FILE).read_text())
    del raw["optimizations"]  # a bundle written before the field existed
    (b / sb.MANIFEST_FILE).write_text(json.dumps(raw))
    assert sb.read_manifest(b).optimizations == frozenset()
    raw["optimizations"] = ["fused_attention", "paged_cache"]
    (b / sb.MANIFEST_FILE).write_text(json.dumps(raw))
    refused = r"format_version 1 bundle lists optimizations \['paged_cache'\]"
    with pytest.raises(sb.BundleError, match=refused):
        sb.read_manifest(b)


def test_grouped_cross_kv_equals_repeated_kv_and_catches_a_wrong_graph(tiny_bundle, tiny_checkpoint,
                                                                       traced_bundle):
    model, tok = model_from_checkpoint(load_checkpoint(tiny_checkpoint))
    srcs = validation_sources(model, tok, 1, 0)[:4]
    ids, mask = pad_batch(srcs, model.cfg.pad_id)
    with torch.inference_mode():
        cross = model.cross_kv(model.encode(ids, mask))
    targets = torch.randint(4, model.cfg.tgt_vocab_size, (len(srcs), 4))
    targets[:, 0] = model.cfg.bos_id
    assert check_grouped_cross(model, decoder_session(tiny_bundle), mask, cross, targets, 4) < 1e-4
    # The traced decoder cannot take fewer cross rows than queries: the check must not pass it.
    traced = decoder_session(traced_bundle)
    with pytest.raises(Exception):  # noqa: B017 - ORT raises its own shape error types
        check_grouped_cross(model, traced, mask, cross, targets, 4)


def test_sort_nodes_counts_what_a_branch_reads():
    """The int8 quantizer re-sorts nodes by explicit inputs only; sort_nodes puts an If after the
    producer of a value its branch reads, so the quantized slot decoder stays a valid graph."""
    from onnx import TensorProto, helper

    from export.fused import sort_nodes

    branch = helper.make_graph([helper.make_node("Identity", ["y"], ["z"])], "b", [],
                               [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("If", ["c"], ["out"], then_branch=branch, else_branch=branch),  # reads y
             helper.make_node("Relu", ["x"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1]),
                                           helper.make_tensor_value_info("c", TensorProto.BOOL, [1])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1])])
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(helper.make_model(graph))
    sort_nodes(graph)
    assert [n.op_type for n in graph.node] == ["Relu", "If"]
    onnx.checker.check_model(helper.make_model(graph))
