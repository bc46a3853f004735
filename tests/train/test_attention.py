"""Attention maps (`nmt attention`) and alignments through the engine and gRPC, on the tiny model."""

from __future__ import annotations

import matplotlib.image
import pytest
from conftest import read_lines

from nmt.cli import run_command
from nmt.decoding import DecodeOptions
from train import attention
from train.attention import attention_maps, cross_figure, encoder_figure, reference_alignment
from train.checkpoint import load_checkpoint, model_from_checkpoint
from train.decode import beam_search, greedy_decode_cached

TEXTS = read_lines("test_2016_flickr", "en", 6)
SENTENCE = "A man is riding a bike down the street."


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_checkpoint):
    return model_from_checkpoint(load_checkpoint(tiny_checkpoint))


@pytest.fixture(scope="module")
def translator(tiny_bundle):
    from serve.engine.translator import EngineConfig, Translator

    return Translator.from_bundle(tiny_bundle, EngineConfig(device="cpu"))


def tick_labels(ax, axis: str) -> list[str]:
    ticks = ax.get_xticklabels() if axis == "x" else ax.get_yticklabels()
    return [t.get_text() for t in ticks]


# -- the maps ---------------------------------------------------------------------------------------
def test_grids_have_a_panel_per_layer_and_head_with_token_axes(model_and_tokenizer):
    model, tok = model_and_tokenizer
    cfg = model.cfg
    maps = attention_maps(model, tok, SENTENCE)
    src_ids = tok.encode(SENTENCE) + [cfg.eos_id]
    hyp = greedy_decode_cached(model, [src_ids], DecodeOptions())[0]
    assert maps.source == tok.pieces(src_ids[:-1]) + ["</s>"]
    assert maps.target[:len(hyp.tokens)] == tok.pieces(hyp.tokens)
    assert maps.cross.shape == (cfg.n_decoder_layers, cfg.n_heads, len(maps.target), len(maps.source))
    assert maps.encoder.shape == (cfg.n_encoder_layers, cfg.n_heads, len(maps.source), len(maps.source))
    # Every query's attention is a distribution over the source.
    assert abs(maps.cross.sum(-1) - 1).max() < 1e-4 and abs(maps.encoder.sum(-1) - 1).max() < 1e-4

    cross = cross_figure(maps)
    assert len(cross.axes) == cfg.n_decoder_layers * cfg.n_heads
    for ax in cross.axes:
        assert tick_labels(ax, "x") == maps.source
        assert tick_labels(ax, "y") == maps.target
    enc = encoder_figure(maps)
    assert len(enc.axes) == cfg.n_encoder_layers * cfg.n_heads
    assert all(tick_labels(ax, "x") == tick_labels(ax, "y") == maps.source for ax in enc.axes)


def test_beam_maps_follow_the_beam_translation(model_and_tokenizer):
    model, tok = model_and_tokenizer
    src_ids = tok.encode(SENTENCE) + [model.cfg.eos_id]
    best = beam_search(model, src_ids, DecodeOptions(beam_size=3))[0]
    maps = attention_maps(model, tok, SENTENCE, beam_size=3)
    assert maps.translation == tok.decode(best.tokens)
    assert maps.target[:len(best.tokens)] == tok.pieces(best.tokens)


def test_cli_writes_both_pngs(tiny_checkpoint, model_and_tokenizer, tmp_path, capsys):
    model, _ = model_and_tokenizer
    cfg = model.cfg
    argv = [str(tiny_checkpoint), SENTENCE, "--out-dir", str(tmp_path / "maps")]
    assert run_command("attention", attention.main, argv) == 0
    for name, layers in (("cross_attention.png", cfg.n_decoder_layers), ("encoder_attention.png",
                                                                        cfg.n_encoder_layers)):
        png = tmp_path / "maps" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        height, width = matplotlib.image.imread(png).shape[:2]
        assert width > 200 * cfg.n_heads and height > 150 * layers  # a readable panel per head and layer
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == ["cross_attention.png",
                                                                      "encoder_attention.png"]
    argv = [str(tiny_checkpoint), SENTENCE, "--out", str(tmp_path / "a.png"), "--beam", "2"]
    assert run_command("attention", attention.main, argv) == 0
    assert (tmp_path / "a.png").stat().st_size > 0 and (tmp_path / "a-encoder.png").stat().st_size > 0


@pytest.mark.parametrize("args, message", [
    (["BUNDLE", "A dog."], "attention maps need the PyTorch checkpoint"),
    (["MISSING", "A dog."], "no such checkpoint file"),
    (["CKPT", "   "], "the source sentence is empty"),
    (["CKPT", "A dog.", "--beam", "0"], "beam_size must be in [1, 16]"),
])
def test_cli_bad_input_is_one_line(args, message, tiny_checkpoint, tiny_bundle, tmp_path, capsys):
    paths = {"BUNDLE": str(tiny_bundle), "MISSING": str(tmp_path / "nope.pt"), "CKPT": str(tiny_checkpoint)}
    argv = [paths.get(a, a) for a in args] + ["--out-dir", str(tmp_path)]
    assert run_command("attention", attention.main, argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not list(tmp_path.glob("*.png"))


# -- alignments -------------------------------------------------------------------------------------
@pytest.mark.parametrize("beam", [1, 4])
def test_engine_alignments_match_the_pytorch_attention(beam, translator, model_and_tokenizer):
    """One index per target token, inside the source, equal to the last layer's head-averaged argmax
    of the PyTorch model over the same tokens (beam: carried through every reorder)."""
    model, _ = model_and_tokenizer
    opts = DecodeOptions(beam_size=beam, n_best=beam, return_alignments=True)
    sources = translator.tokenize(TEXTS)
    results = translator.translate(TEXTS, opts)
    for src, result in zip(sources, results):
        assert len(result.hypotheses) == beam
        for h in result.hypotheses:
            assert len(h.alignment) == len(h.tokens)
            assert all(0 <= a < result.source_tokens for a in h.alignment)
            assert h.alignment == reference_alignment(model, src, h.tokens)


def test_alignments_of_another_layer(tiny_bundle, model_and_tokenizer):
    from serve.engine.translator import EngineConfig, Translator

    model, _ = model_and_tokenizer
    first = Translator.from_bundle(tiny_bundle, EngineConfig(device="cpu", warmup=False, alignment_layer=0))
    src = first.tokenize(TEXTS[:2])
    for s, r in zip(src, first.translate(TEXTS[:2], DecodeOptions(return_alignments=True))):
        assert r.hypotheses[0].alignment == reference_alignment(model, s, r.hypotheses[0].tokens, layer=0)
    with pytest.raises(ValueError, match="alignment_layer"):
        Translator.from_bundle(tiny_bundle, EngineConfig(device="cpu", warmup=False,
                               alignment_layer=model.cfg.n_decoder_layers))


@pytest.mark.parametrize("beam", [1, 3])
def test_alignments_off_changes_nothing(beam, translator, model_and_tokenizer):
    model, _ = model_and_tokenizer
    off = translator.translate(TEXTS, DecodeOptions(beam_size=beam, n_best=beam, return_scores=True))
    on = translator.translate(TEXTS, DecodeOptions(beam_size=beam, n_best=beam, return_scores=True,
                                                   return_alignments=True))
    for a, b in zip(off, on):
        assert [h.tokens for h in a.hypotheses] == [h.tokens for h in b.hypotheses]
        # Without alignments the CPU engine runs the slot decoder, with them the alignment graph: the
        # same decisions, scores equal to float32 rounding (the two attention kernels sum in different
        # orders; the alignment graph equals the plain decoder bit for bit, tests/export/test_fused.py).
        assert [x for h in a.hypotheses for x in (h.score, h.log_prob)] == pytest.approx(
            [x for h in b.hypotheses for x in (h.score, h.log_prob)], abs=1e-4)
        assert all(h.alignment is None for h in a.hypotheses)
    if beam == 1:  # and the output without alignments is still the PyTorch reference's
        ref = greedy_decode_cached(model, translator.tokenize(TEXTS), DecodeOptions())
        assert [r.hypotheses[0].tokens for r in off] == [h.tokens for h in ref]


def test_grpc_returns_alignments(translator):
    from serve.protocol.client import TranslatorClient
    from serve.server.metrics import Metrics
    from serve.server.registry import BatchingConfig, ModelRegistry
    from serve.server.server import ServerConfig, create_server

    registry = ModelRegistry(BatchingConfig(), Metrics())
    server, port = create_server(registry, ServerConfig())
    registry.add(translator)
    server.set_serving()
    client = TranslatorClient(f"127.0.0.1:{port}")
    try:
        for beam in (1, 4):
            opts = DecodeOptions(beam_size=beam, n_best=2 if beam > 1 else 1, return_alignments=True)
            got = client.translate(TEXTS[:4], opts, timeout=30)
            want = translator.translate(TEXTS[:4], opts)
            for g, w in zip(got, want):
                for gh, wh in zip(g.hypotheses, w.hypotheses, strict=True):
                    assert len(gh.alignment) == len(gh.tokens)
                    assert all(0 <= a < g.source_tokens for a in gh.alignment)
                    assert gh.alignment == wh.alignment and gh.tokens == wh.tokens
        plain = client.translate(TEXTS[:2], DecodeOptions(), timeout=30)
        assert all(h.alignment is None for r in plain for h in r.hypotheses)
    finally:
        client.close()
        server.drain(grace=0)


def test_bundle_without_the_output_refuses_alignments_and_decodes_the_same(tiny_bundle, translator, tmp_path):
    """A decoder graph without cross_attention (as exported before alignments) still serves, with the
    same tokens and scores; asking it for alignments is a clear InvalidRequest."""
    from export.pipeline import strip_alignment_output
    from nmt.decoding import InvalidRequest
    from serve.engine.translator import EngineConfig, Translator

    plain = Translator.from_bundle(strip_alignment_output(tiny_bundle, tmp_path / "plain"),
                                   EngineConfig(device="cpu", warmup=False))
    assert not plain.runtime.has_alignments and translator.runtime.has_alignments
    for beam in (1, 3):
        opts = DecodeOptions(beam_size=beam, return_scores=True)
        got, want = plain.translate(TEXTS, opts), translator.translate(TEXTS, opts)
        assert [(h.tokens, h.score) for r in got for h in r.hypotheses] == \
            [(h.tokens, h.score) for r in want for h in r.hypotheses]
    with pytest.raises(InvalidRequest, match="re-export it to get alignments"):
        plain.translate(TEXTS[:1], DecodeOptions(return_alignments=True))
