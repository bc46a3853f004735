"""The fused encoder/decoder (export/fused.py): what the manifest records, how old and unknown
manifests are read, and the grouped cross-attention contract the decoder claims."""

from __future__ import annotations

import json
import shutil

import onnx
import onnxruntime as ort
import pytest
import torch

from export.pipeline import export_bundle
from export.validate import check_grouped_cross, pad_batch, validation_sources
from nmt import bundle as sb
from train.checkpoint import load_checkpoint, model_from_checkpoint


def decoder_session(bundle) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(bundle / sb.DECODER_FILE), opts, providers=["CPUExecutionProvider"])


def op_types(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def test_default_bundle_is_fused_and_says_so(tiny_bundle):
    m = sb.read_manifest(tiny_bundle)
    assert m.optimizations == {sb.FUSED_ATTENTION, sb.GROUPED_CROSS_KV}
    for f in (sb.ENCODER_FILE, sb.DECODER_FILE):
        assert {"MultiHeadAttention", "SkipLayerNormalization"} <= op_types(tiny_bundle / f)
    # Alignments keep the traced decoder (it has the cross_attention output); the contract is the same.
    assert "MultiHeadAttention" not in op_types(tiny_bundle / sb.DECODER_ALIGNMENTS_FILE)
    v = m.raw["validation"]
    assert v["passed"] and v["greedy"]["identical"] == v["greedy"]["sentences"]
    assert v["max_abs_diff"]["decoder.grouped_cross_kv.log_probs"] < 1e-4


def test_traced_bundle_records_no_optimizations(tiny_checkpoint, tmp_path):
    out = export_bundle(tiny_checkpoint, tmp_path / "traced", graphs="traced")
    assert sb.read_manifest(out).optimizations == frozenset()
    assert "MultiHeadAttention" not in op_types(out / sb.DECODER_FILE)


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


def test_grouped_cross_kv_equals_repeated_kv_and_catches_a_wrong_graph(tiny_bundle, tiny_checkpoint):
    model, tok = model_from_checkpoint(load_checkpoint(tiny_checkpoint))
    srcs = validation_sources(model, tok, 1, 0)[:4]
    ids, mask = pad_batch(srcs, model.cfg.pad_id)
    with torch.inference_mode():
        cross = model.cross_kv(model.encode(ids, mask))
    targets = torch.randint(4, model.cfg.tgt_vocab_size, (len(srcs), 4))
    targets[:, 0] = model.cfg.bos_id
    assert check_grouped_cross(model, decoder_session(tiny_bundle), mask, cross, targets, 4) < 1e-4
    # The traced decoder cannot take fewer cross rows than queries: the check must not pass it.
    traced = ort.InferenceSession(str(tiny_bundle / sb.DECODER_ALIGNMENTS_FILE),
                                  providers=["CPUExecutionProvider"])
    with pytest.raises(Exception):  # noqa: B017 - ORT raises its own shape error types
        check_grouped_cross(model, traced, mask, cross, targets, 4)
