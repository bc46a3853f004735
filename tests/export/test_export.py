"""Export: the bundle's graphs reproduce the PyTorch model, the bundle is self-describing and
refused when damaged, and `nmt export` fails cleanly (one line, nothing left behind)."""

from __future__ import annotations

import json
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import REPO, read_lines

from export import cli as export_cli
from export.pipeline import export_bundle
from export.validate import (
    GREEDY_OPTIONS,
    decoder_step,
    empty_past,
    load_sessions,
    next_past,
    ort_greedy,
    pad_batch,
    real_positions,
    torch_threads,
)
from nmt import bundle as sb
from nmt.cli import run_command
from train.checkpoint import atomic_torch_save, load_checkpoint, model_from_checkpoint
from train.decode import greedy_decode, source_ids


@pytest.fixture(scope="module")
def model_and_tok(tiny_checkpoint):
    return model_from_checkpoint(load_checkpoint(tiny_checkpoint))


def sessions(bundle: Path) -> dict[str, ort.InferenceSession]:
    return load_sessions(bundle, ["CPUExecutionProvider"])


def real_sources(tok, n: int, offset: int = 0) -> list[list[int]]:
    return [source_ids(tok, t, 3) for t in read_lines("val", "en", offset + n)[offset:]]


@pytest.fixture(scope="module")
def greedy_case(model_and_tok):
    """A mixed-length batch of real sentences and PyTorch's uncached greedy tokens for each."""
    model, tok = model_and_tok
    srcs = real_sources(tok, 8, offset=10)
    with torch_threads(1):
        return srcs, [greedy_decode(model, s, GREEDY_OPTIONS).tokens for s in srcs]


def run_encoder(sess, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, np.ndarray]:
    outs = sess.run(None, {sb.INPUT_IDS: ids.numpy(), sb.ATTENTION_MASK: mask.numpy()})
    return dict(zip([o.name for o in sess.get_outputs()], outs))


def cross_of(enc: dict[str, np.ndarray], n_layers: int) -> dict[str, np.ndarray]:
    return {sb.past_name(i, "encoder", w): enc[sb.present_name(i, "encoder", w)]
            for i in range(n_layers) for w in ("key", "value")}


def test_manifest_describes_the_bundle(tiny_bundle, tiny_checkpoint):
    m = sb.read_manifest(tiny_bundle)
    ckpt = load_checkpoint(tiny_checkpoint)
    cfg = ckpt["model_config"]
    assert (m.dtype, m.opset, m.src_lang, m.tgt_lang, m.name) == ("fp32", 17, "en", "de", "en-de")
    assert (m.n_decoder_layers, m.d_model, m.n_heads, m.head_dim, m.vocab_size, m.max_positions) == (
        cfg["n_decoder_layers"], cfg["d_model"], cfg["n_heads"], cfg["d_model"] // cfg["n_heads"],
        cfg["tgt_vocab_size"], cfg["max_positions"])
    assert (m.pad_id, m.unk_id, m.bos_id, m.eos_id) == (0, 1, 2, 3)
    assert set(m.files) == {sb.ENCODER_FILE, sb.DECODER_FILE, sb.DECODER_ALIGNMENTS_FILE, sb.REORDER_FILE,
                            sb.DECODER_SLOTS_FILE, sb.TOKENIZER_FILE}
    assert m.raw["training"]["step"] == 150
    v = m.raw["validation"]
    assert v["passed"] and v["worst"]["max_abs_diff"] <= 1e-4
    assert v["greedy"]["identical"] == v["greedy"]["sentences"] > 0
    assert (tiny_bundle / sb.TOKENIZER_FILE).read_bytes() == ckpt["tokenizer"]
    # The IO recorded in the manifest is the IO of the graphs, named as nmt.bundle says.
    L = m.n_decoder_layers
    expected = {"encoder": ([sb.INPUT_IDS, sb.ATTENTION_MASK], sb.encoder_output_names(L)),
                "decoder": (sb.decoder_input_names(L), sb.decoder_output_names(L)),
                "reorder": (sb.reorder_input_names(L), sb.reorder_output_names(L)),
                # Alignments have their own graph: the normal decoder does not even compute cross_attention.
                "decoder_alignments": (sb.decoder_input_names(L),
                                       sb.decoder_output_names(L, alignments=True)),
                # The slot decoder: per-row lengths instead of a mask, its present bound to its past.
                "decoder_slots": (sb.slot_decoder_input_names(L), sb.decoder_output_names(L))}
    loaded = sessions(tiny_bundle)
    assert set(loaded) == set(expected)
    for graph, sess in loaded.items():
        assert [i.name for i in sess.get_inputs()] == expected[graph][0]
        assert [o.name for o in sess.get_outputs()] == expected[graph][1]
        assert [i["name"] for i in m.raw["io"][graph]["inputs"]] == expected[graph][0]
        onnx.checker.check_model(str(tiny_bundle / f"{graph}.onnx"))


def test_encoder_matches_pytorch_and_ignores_padding(tiny_bundle, model_and_tok):
    model, tok = model_and_tok
    srcs = real_sources(tok, 3)  # batch 3 of mixed lengths: not the export example's shape
    ids, mask = pad_batch(srcs, 0)
    enc = run_encoder(sessions(tiny_bundle)["encoder"], ids, mask)
    with torch.inference_mode():
        memory = model.encode(ids, mask)
        cross = model.cross_kv(memory)
    # Real positions only: padded ones are unspecified (the packed encoder copies the row's last token).
    m = mask.numpy()
    states = real_positions(enc[sb.LAST_HIDDEN_STATE], m)
    assert np.abs(states - real_positions(memory.numpy(), m)).max() < 1e-4
    for i, (k, v) in enumerate(cross):
        for w, ref in (("key", k), ("value", v)):
            got = real_positions(enc[sb.present_name(i, "encoder", w)], m)
            assert np.abs(got - real_positions(ref.numpy(), m)).max() < 1e-4
    # The bool mask hides padding: the shortest row alone gives the same states as padded in the batch.
    short = min(range(3), key=lambda r: len(srcs[r]))
    n = len(srcs[short])
    alone = run_encoder(sessions(tiny_bundle)["encoder"], *pad_batch([srcs[short]], 0))
    assert np.abs(alone[sb.LAST_HIDDEN_STATE][0] - enc[sb.LAST_HIDDEN_STATE][short, :n]).max() < 1e-5


def test_empty_past_chunk_then_cached_steps_match_full_pass(tiny_bundle, model_and_tok):
    """First call on an empty past with 3 new tokens, then one token at a time with the cache,
    against PyTorch's single uncached pass over the whole target."""
    model, tok = model_and_tok
    srcs = real_sources(tok, 5, offset=3)
    ids, mask = pad_batch(srcs, 0)
    B, T = len(srcs), 7
    targets = torch.randint(4, model.cfg.tgt_vocab_size, (B, T), generator=torch.Generator().manual_seed(1))
    targets[:, 0] = 2
    with torch.inference_mode():
        cross = model.cross_kv(model.encode(ids, mask))
        pos = torch.arange(T).expand(B, T)  # (B, T)
        causal = torch.ones(T, T, dtype=torch.bool).tril().expand(B, T, T)  # (B, T, T)
        logits, _ = model.decode(targets, pos, causal, mask, cross, model.empty_past(B))
        ref = torch.log_softmax(logits, -1).numpy()  # (B, T, V)
    s = sessions(tiny_bundle)
    dec = s["decoder"]
    L = model.cfg.n_decoder_layers
    cache = {**cross_of(run_encoder(s["encoder"], ids, mask), L), **empty_past(dec, model, B)}
    feed = {sb.INPUT_IDS: targets[:, :3].numpy(), sb.POSITION_IDS: pos[:, :3].numpy(),
            sb.SELF_ATTENTION_MASK: causal[:, :3, :3].numpy(), sb.ENCODER_ATTENTION_MASK: mask.numpy(),
            sb.TOP_K: np.array([5]), **cache}
    out = dict(zip(sb.decoder_output_names(L), dec.run(None, feed)))
    assert out[sb.LOG_PROBS].shape == (B, 3, model.cfg.tgt_vocab_size)
    assert out[sb.present_name(0, "decoder", "key")].shape == (B, model.cfg.n_heads, 3, model.cfg.head_dim)
    assert np.abs(out[sb.LOG_PROBS] - ref[:, :3]).max() < 1e-4
    top_vals, top_ids = torch.topk(torch.from_numpy(ref[:, 2]), 5)
    assert out[sb.TOPK_INDICES].tolist() == top_ids.tolist()
    assert np.abs(out[sb.TOPK_VALUES] - top_vals.numpy()).max() < 1e-4
    cache.update(next_past(out, L))
    for t in range(3, T):
        out = decoder_step(dec, targets[:, t:t + 1].numpy(), t, mask.numpy(), cache, 1)
        assert np.abs(out[sb.LOG_PROBS][:, 0] - ref[:, t]).max() < 1e-4
        assert out[sb.TOPK_INDICES][:, 0].tolist() == ref[:, t].argmax(-1).tolist()
        cache.update(next_past(out, L))


def test_cached_ort_greedy_equals_pytorch_uncached_greedy(tiny_bundle, model_and_tok, greedy_case):
    model, _ = model_and_tok
    srcs, ref = greedy_case
    assert len({len(s) for s in srcs}) > 1  # one padded, mixed-length batch
    ours = ort_greedy(sessions(tiny_bundle), model, srcs)
    assert ours == ref
    assert sum(map(len, ours)) > 0


def test_reorder_gathers_cache_rows_and_decoding_continues(tiny_bundle, model_and_tok):
    """Reordering after step 0 (as beam search does) then decoding step 1 gives the same
    log-probs as step 1 on the original rows."""
    model, tok = model_and_tok
    s = sessions(tiny_bundle)
    L = model.cfg.n_decoder_layers
    srcs = real_sources(tok, 3, offset=20)
    ids, mask = pad_batch(srcs, 0)
    cache = {**cross_of(run_encoder(s["encoder"], ids, mask), L), **empty_past(s["decoder"], model, 3)}
    step0 = decoder_step(s["decoder"], np.full((3, 1), 2), 0, mask.numpy(), cache, 1)
    cache.update(next_past(step0, L))
    nxt = np.array([[7], [11], [13]])
    step1 = decoder_step(s["decoder"], nxt, 1, mask.numpy(), cache, 1)

    index = np.array([2, 0, 0])  # repeat a row, drop a row, change the order
    names = sb.reorder_input_names(L)[1:]
    feed = {sb.REORDER_INDEX: index, sb.ENCODER_ATTENTION_MASK: mask.numpy(),
            **{n: cache[n] for n in names if n != sb.ENCODER_ATTENTION_MASK}}
    moved = dict(zip(sb.reorder_output_names(L), s["reorder"].run(None, feed)))
    for n in names:
        assert np.array_equal(moved[sb.REORDERED_PREFIX + n], feed[n][index])
    new_cache = {n: moved[sb.REORDERED_PREFIX + n] for n in names if n != sb.ENCODER_ATTENTION_MASK}
    new_mask = moved[sb.REORDERED_PREFIX + sb.ENCODER_ATTENTION_MASK]
    again = decoder_step(s["decoder"], nxt[index], 1, new_mask, new_cache, 1)
    assert np.abs(again[sb.LOG_PROBS] - step1[sb.LOG_PROBS][index]).max() < 1e-5


def copy_bundle(bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(bundle, dst)
    return dst


def test_tampered_graph_is_refused(tiny_bundle, tmp_path):
    b = copy_bundle(tiny_bundle, tmp_path)
    data = bytearray((b / sb.DECODER_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (b / sb.DECODER_FILE).write_bytes(bytes(data))
    with pytest.raises(sb.BundleError, match="decoder.onnx checksum mismatch"):
        sb.read_manifest(b)


def test_missing_file_is_refused(tiny_bundle, tmp_path):
    b = copy_bundle(tiny_bundle, tmp_path)
    (b / sb.REORDER_FILE).unlink()
    with pytest.raises(sb.BundleError, match="reorder.onnx missing"):
        sb.read_manifest(b)
    (b / sb.MANIFEST_FILE).unlink()
    with pytest.raises(sb.BundleError, match="not a model bundle"):
        sb.read_manifest(b)


def test_int8_bundle_is_quantized_and_translates(tiny_bundle_int8, tiny_bundle, model_and_tok, greedy_case):
    model, tok = model_and_tok
    m = sb.read_manifest(tiny_bundle_int8)
    assert m.dtype == "int8" and m.raw["io_dtypes"]["cache"] == "float32"
    ops = {n.op_type for n in onnx.load(str(tiny_bundle_int8 / sb.DECODER_FILE)).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    fp32_bytes = sb.read_manifest(tiny_bundle).files[sb.DECODER_FILE]["bytes"]
    assert m.files[sb.DECODER_FILE]["bytes"] < 0.7 * fp32_bytes
    v = m.raw["validation"]
    assert v["passed"] and v["argmax_agreement"] >= 0.8
    srcs, ref = greedy_case
    ours = ort_greedy(sessions(tiny_bundle_int8), model, srcs)
    # Quantization may flip near-ties; the first tokens of most sentences still agree.
    agree = sum(a[:3] == b[:3] for a, b in zip(ours, ref))
    assert agree >= 6, (ours, ref)
    assert all(tok.decode(t) for t in ours)


def test_fp16_bundle_records_its_dtypes(tiny_checkpoint, tmp_path):
    out = export_bundle(tiny_checkpoint, tmp_path / "fp16", dtype="fp16")
    m = sb.read_manifest(out)
    assert m.dtype == "fp16" and m.raw["io_dtypes"]["cache"] == "float16"
    dec_in = {i["name"]: i["dtype"] for i in m.raw["io"]["decoder"]["inputs"]}
    assert dec_in[sb.past_name(0, "decoder", "key")] == "float16" and dec_in[sb.INPUT_IDS] == "int64"
    v = m.raw["validation"]
    # Either it ran here (then it must agree) or the manifest says why not.
    assert (v["passed"] and v["argmax_agreement"] >= 0.95) or (v.get("skipped") and "CUDA" in v["reason"])


def run_cli(args: list[str], capsys) -> tuple[int, list[str]]:
    rc = run_command("export", export_cli.main, args)
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir()) if parent.exists() else []


def test_cli_missing_and_corrupt_checkpoint(tmp_path, capsys):
    rc, err = run_cli([str(tmp_path / "nope.pt"), "--out", str(tmp_path / "b")], capsys)
    assert rc == 2 and len(err) == 1 and "no such checkpoint" in err[0]
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    rc, err = run_cli([str(bad), "--out", str(tmp_path / "b")], capsys)
    assert rc == 2 and len(err) == 1 and "not a readable checkpoint" in err[0]
    assert leftovers(tmp_path) == ["bad.pt"]


def test_cli_checkpoint_whose_weights_do_not_fit_its_config(tiny_checkpoint, tmp_path, capsys):
    ckpt = load_checkpoint(tiny_checkpoint)
    ckpt["model_config"] = {**ckpt["model_config"], "d_model": 96}
    path = tmp_path / "mismatch.pt"
    atomic_torch_save(ckpt, path)
    rc, err = run_cli([str(path), "--out", str(tmp_path / "b")], capsys)
    assert rc == 2 and len(err) == 1 and "cannot rebuild the model" in err[0]
    assert leftovers(tmp_path) == ["mismatch.pt"]


def test_cli_usage_errors_are_one_line(tiny_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        export_cli.main([str(tiny_checkpoint), "--out", str(tmp_path / "b"), "--dtype", "int4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "int4" in err[0]
    rc, err = run_cli([str(tiny_checkpoint), "--out", str(tmp_path / "b"), "--opset", "9"], capsys)
    assert rc == 1 and len(err) == 1 and "opset 9" in err[0]
    assert leftovers(tmp_path) == []


def test_cli_refuses_existing_target_and_unwritable_path(tiny_checkpoint, tmp_path, capsys):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    rc, err = run_cli([str(tiny_checkpoint), "--out", str(existing)], capsys)
    assert rc == 1 and len(err) == 1 and "already exists" in err[0] and "--force" in err[0]
    assert leftovers(existing) == ["keep.txt"]
    afile = tmp_path / "afile"
    afile.write_text("x")
    rc, err = run_cli([str(tiny_checkpoint), "--out", str(afile / "bundle")], capsys)
    assert rc == 1 and len(err) == 1 and "cannot write" in err[0]
    assert leftovers(tmp_path) == ["afile", "existing"]


def test_failed_validation_leaves_nothing(tiny_checkpoint, tmp_path, capsys):
    """A checkpoint whose training diverged (NaN weights) fails validation: exit 1, no bundle, no temp dir."""
    ckpt = load_checkpoint(tiny_checkpoint)
    ckpt["model"] = {k: v.clone() for k, v in ckpt["model"].items()}
    ckpt["model"]["decoder_layers.0.ff.net.0.weight"][0, 0] = float("nan")
    path = tmp_path / "nan.pt"
    atomic_torch_save(ckpt, path)
    out = tmp_path / "out" / "bundle"
    rc, err = run_cli([str(path), "--out", str(out)], capsys)
    assert rc == 1 and len(err) == 1 and "validation failed" in err[0] and "non-finite" in err[0]
    assert leftovers(tmp_path / "out") == []


def limit_file_size() -> None:
    """In the child: files may not grow past 200 kB (the graphs are bigger), as on a full disk."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of being killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))


def test_write_failure_mid_export_leaves_nothing(tiny_checkpoint, tmp_path):
    out = tmp_path / "out" / "bundle"
    cmd = [sys.executable, "-m", "nmt", "export", str(tiny_checkpoint), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                          preexec_fn=limit_file_size)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(err) == 1 and "cannot write bundle" in err[0], proc.stderr
    assert leftovers(tmp_path / "out") == []


def test_cli_force_replaces_bundle_and_console_script_works(tiny_checkpoint, tiny_bundle, tmp_path):
    out = tmp_path / "b"
    shutil.copytree(tiny_bundle, out)
    (out / "stale.txt").write_text("from an older export")
    cmd = [sys.executable, "-m", "nmt", "export", str(tiny_checkpoint), "--out", str(out), "--force",
           "--name", "tiny"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "validated" in proc.stdout
    assert sb.read_manifest(out).name == "tiny"
    assert not (out / "stale.txt").exists()
    assert leftovers(tmp_path) == ["b"]
    manifest = json.loads((out / sb.MANIFEST_FILE).read_text())
    assert manifest["validation"]["passed"] and manifest["exporter"]["onnxruntime"] == ort.__version__
