"""`nmt import-marian`: a Hugging Face Marian folder (the real architecture, small and briefly trained,
no network) becomes a bundle whose translations are transformers' own, token for token, through
the engine and through gRPC; bad folders fail with one line and exit 2."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from conftest import read_lines
from marian_folder import build_marian_folder

pytest.importorskip("transformers", reason="the marian extra (transformers) is not installed")

from export.marian import hf_generate, plain_generation  # noqa: E402
from export.validate import torch_threads  # noqa: E402
from nmt import bundle as sb  # noqa: E402
from nmt.cli import main as nmt_main  # noqa: E402
from nmt.decoding import DecodeOptions  # noqa: E402
from nmt.pair_tokenizer import PairTokenizer  # noqa: E402
from train.config import ModelConfig  # noqa: E402

TEXTS = read_lines("test_2016_flickr", "en", 20)
MAX_NEW = 40
# Our engine's budget a * source_len + b with a = 0 is transformers' max_new_tokens. Beam scores: ours
# divide by ((5 + len) / 6) ** lp, transformers' by len ** lp; at length_penalty 0 both rank raw sums.
GREEDY = DecodeOptions(max_length_a=0, max_length_b=MAX_NEW)
BEAM = DecodeOptions(beam_size=4, length_penalty=0.0, max_length_a=0, max_length_b=MAX_NEW)


@pytest.fixture(scope="module")
def marian_dir(tmp_path_factory, data_dir):
    return build_marian_folder(tmp_path_factory.mktemp("marian"))


@pytest.fixture(scope="module")
def reference(marian_dir):
    from transformers import MarianMTModel, MarianTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = MarianMTModel.from_pretrained(str(marian_dir)).eval()
        tok = MarianTokenizer.from_pretrained(str(marian_dir))
    c = hf.config
    cfg = ModelConfig(src_vocab_size=c.vocab_size, tgt_vocab_size=c.vocab_size, pad_id=c.pad_token_id,
                      unk_id=1, bos_id=c.decoder_start_token_id, eos_id=c.eos_token_id)
    plain_generation(hf, cfg)
    sources = [tok(t)["input_ids"] for t in TEXTS]
    with torch_threads(1):
        greedy = hf_generate(hf, cfg, sources, 1, MAX_NEW)
        beam = hf_generate(hf, cfg, sources, 4, MAX_NEW)
    texts = [tok.decode(t, skip_special_tokens=True, use_source_tokenizer=False) for t in greedy]
    return {"sources": sources, "greedy": greedy, "beam": beam, "texts": texts}


@pytest.fixture(scope="module")
def marian_bundle(marian_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "marian"
    assert nmt_main(["import-marian", str(marian_dir), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def translator(marian_bundle):
    from serve.engine.translator import EngineConfig, Translator

    return Translator.from_bundle(marian_bundle, EngineConfig(device="cpu"))


def test_sinusoids_in_halves_are_marians():
    from transformers.models.marian.modeling_marian import MarianSinusoidalPositionalEmbedding

    from train.model import sinusoid_table

    for d in (64, 6):
        theirs = MarianSinusoidalPositionalEmbedding(50, d).create_weight()
        assert torch.equal(sinusoid_table(50, d, "halves"), theirs)


def test_the_model_is_meaningful(reference):
    """Most sentences end with EOS before the budget, and beam search changes some: the comparisons
    below are about real decisions, not max-length noise."""
    ended = sum(len(t) < MAX_NEW for t in reference["greedy"])
    assert ended >= len(TEXTS) * 3 // 4
    assert reference["beam"] != reference["greedy"]


def test_manifest_records_origin_and_tokenizer_pair(marian_bundle, marian_dir):
    m = sb.read_manifest(marian_bundle)
    config = json.loads((marian_dir / "config.json").read_text())
    assert m.name == "en-de" and (m.src_lang, m.tgt_lang) == ("en", "de")
    assert (m.pad_id, m.eos_id, m.bos_id, m.unk_id) == (config["pad_token_id"], 0, config["pad_token_id"], 1)
    assert m.vocab_size == config["vocab_size"]
    origin = m.raw["origin"]
    assert origin["format"] == "marian" and origin["model_dir"] == "opus-mt-en-de"
    assert origin["reference"]["passed"] and origin["reference"]["tokenization_identical"]
    assert origin["model_options"] == {"activation": "swish", "embed_scale": True,
                                       "position_layout": "halves", "output_bias": True, "pre_norm": False}
    assert m.raw["tokenizer"]["kind"] == "sentencepiece_pair"
    assert {"source.spm", "target.spm", "vocab.json"} <= set(m.files) and sb.TOKENIZER_FILE not in m.files
    assert m.optimizations == frozenset()  # post-norm: --graphs auto wrote the traced graphs
    assert m.raw["validation"]["passed"]
    for name in ("source.spm", "target.spm", "vocab.json"):
        assert (marian_bundle / name).read_bytes() == (marian_dir / name).read_bytes()


def test_engine_tokenizes_like_marian_tokenizer(translator, reference):
    assert isinstance(translator.tokenizer, PairTokenizer)
    assert translator.tokenize(TEXTS) == reference["sources"]


def test_engine_greedy_is_transformers_greedy(translator, reference):
    results = translator.translate(TEXTS, GREEDY)
    assert [r.hypotheses[0].tokens for r in results] == reference["greedy"]
    assert [r.text for r in results] == reference["texts"]
    aligned = translator.translate(TEXTS[:3], DecodeOptions(max_length_a=0, max_length_b=MAX_NEW,
                                                            return_alignments=True))
    for r, src in zip(aligned, reference["sources"]):
        h = r.hypotheses[0]
        assert len(h.alignment) == len(h.tokens) and all(0 <= a < len(src) for a in h.alignment)


def test_engine_beam_is_transformers_beam(translator, reference):
    results = translator.translate(TEXTS, BEAM)
    assert [r.hypotheses[0].tokens for r in results] == reference["beam"]


def test_grpc_serves_transformers_translations(translator, reference):
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
        greedy = client.translate(TEXTS[:8], GREEDY, timeout=60, model="en-de")
        beam = client.translate(TEXTS[8:16], BEAM, timeout=60)
    finally:
        client.close()
        server.drain(grace=0)
    assert [r.hypotheses[0].tokens for r in greedy] == reference["greedy"][:8]
    assert [r.text for r in greedy] == reference["texts"][:8]
    assert [r.hypotheses[0].tokens for r in beam] == reference["beam"][8:16]


def test_int8_import_validates_and_serves(marian_dir, tmp_path, reference):
    from serve.engine.translator import EngineConfig, Translator

    out = tmp_path / "int8"
    assert nmt_main(["import-marian", str(marian_dir), "--out", str(out), "--dtype", "int8"]) == 0
    m = sb.read_manifest(out)
    assert m.dtype == "int8" and m.raw["validation"]["passed"]
    results = Translator.from_bundle(out, EngineConfig(device="cpu")).translate(TEXTS, GREEDY)
    same = sum(r.hypotheses[0].tokens == t for r, t in zip(results, reference["greedy"]))
    assert same >= len(TEXTS) // 2  # quantized: close to, not equal to, the float model


def broken(marian_dir, tmp_path, remove=(), config=None):
    d = tmp_path / "opus-mt-xx-yy"
    shutil.copytree(marian_dir, d)
    for name in remove:
        (d / name).unlink()
    if config is not None:
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(config)
        (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("case, expected", [
    (dict(remove=["config.json"]), "config.json missing"),
    (dict(remove=["source.spm", "vocab.json"]), "missing source.spm, vocab.json"),
    (dict(remove=["model.safetensors"]), "missing model.safetensors or pytorch_model.bin"),
    (dict(config={"model_type": "bart"}), "model_type 'bart' is not 'marian'"),
    (dict(config={"activation_function": "tanh"}), "activation 'tanh'"),
    (dict(config={"decoder_attention_heads": 2}), "encoder and decoder head counts differ"),
])
def test_bad_folders_fail_with_one_line(marian_dir, tmp_path, capsys, case, expected):
    d = broken(marian_dir, tmp_path, **case)
    out = tmp_path / "bundle"
    assert nmt_main(["import-marian", str(d), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nmt import-marian: ") and expected in err and "\n" not in err
    assert not out.exists()


def test_not_a_folder_and_fused_graphs_are_refused(marian_dir, tmp_path, capsys):
    assert nmt_main(["import-marian", str(tmp_path / "nothing"), "--out", str(tmp_path / "b")]) == 2
    assert "not a directory" in capsys.readouterr().err
    fused = ["import-marian", str(marian_dir), "--out", str(tmp_path / "b"), "--graphs", "fused"]
    assert nmt_main(fused) == 2
    err = capsys.readouterr().err
    assert "--graphs fused cannot write this model (post-norm layers, swish activation" in err
    assert not (tmp_path / "b").exists()
