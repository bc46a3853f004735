"""A small Hugging Face Marian model folder, built here without a network.

SentencePiece models trained on a few thousand Multi30k lines, a shared vocab.json laid out as
OPUS-MT's are (</s> 0, <unk> 1, the pieces of both models, <pad> last), a MarianMTModel of the real
architecture (swish, scaled embeddings, post-norm, sinusoids in halves) trained for a few dozen
steps so it ends its sentences, a random final_logits_bias so that mapping is exercised, and
everything written with save_pretrained.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import sentencepiece as spm
import torch
from conftest import read_lines

from export.validate import torch_threads

VOCAB_PIECES = 400
TRAIN_LINES = 3000


def train_spm(lines: list[str]) -> bytes:
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=VOCAB_PIECES,
                                   model_type="unigram", character_coverage=1.0, hard_vocab_limit=False,
                                   minloglevel=2, num_threads=1)
    return buf.getvalue()


def shared_vocab(*models: bytes) -> dict[str, int]:
    vocab = {"</s>": 0, "<unk>": 1}
    for model in models:
        sp = spm.SentencePieceProcessor(model_proto=model)
        for i in range(sp.get_piece_size()):
            if not (sp.is_control(i) or sp.is_unknown(i)):
                vocab.setdefault(sp.id_to_piece(i), len(vocab))
    vocab["<pad>"] = len(vocab)
    return vocab


def calibrate_eos(model, tok, en: list[str], max_new: int = 40) -> None:  # noqa: ANN001 - transformers'
    """Raise EOS's logit bias until greedy decoding of these sentences mostly ends before `max_new`:
    a briefly trained model then stops at plausible lengths instead of repeating to the budget."""
    batch = tok(en, padding=True, return_tensors="pt")
    eos = model.config.eos_token_id
    for _ in range(20):
        out = model.generate(**batch, max_new_tokens=max_new, num_beams=1, do_sample=False)  # (B, 1 + T)
        # the last position is left out: the saved generation config forces EOS there
        if (out[:, 1:max_new] == eos).any(dim=1).float().mean() >= 0.9:
            return
        model.final_logits_bias[0, eos] += 0.5


def build_marian_folder(work: Path, steps: int = 120, seed: int = 0) -> Path:
    from transformers import MarianConfig, MarianMTModel, MarianTokenizer

    en, de = read_lines("train", "en", TRAIN_LINES), read_lines("train", "de", TRAIN_LINES)
    src, tgt = train_spm(en), train_spm(de)
    vocab = shared_vocab(src, tgt)
    (work / "src.spm").write_bytes(src)
    (work / "tgt.spm").write_bytes(tgt)
    (work / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Recommended: pip install sacremoses"
        tok = MarianTokenizer(str(work / "src.spm"), str(work / "tgt.spm"), str(work / "vocab.json"),
                              source_lang="en", target_lang="de")
    V = len(vocab)
    cfg = MarianConfig(vocab_size=V, decoder_vocab_size=V, d_model=64, encoder_layers=2, decoder_layers=2,
                       encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                       decoder_ffn_dim=128, max_position_embeddings=128, activation_function="swish",
                       scale_embedding=True, pad_token_id=V - 1, eos_token_id=0, decoder_start_token_id=V - 1,
                       dropout=0.0)
    torch.manual_seed(seed)
    model = MarianMTModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    model.train()
    with torch_threads(1):  # tiny batches: more threads only contend on a shared machine
        for step in range(steps):
            i = (step * 32) % TRAIN_LINES
            batch = tok(en[i:i + 32], text_target=de[i:i + 32], padding=True, truncation=True, max_length=48,
                        return_tensors="pt")
            batch["labels"][batch["labels"] == cfg.pad_token_id] = -100
            loss = model(**batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad(), torch_threads(1):
        model.final_logits_bias.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(seed + 1))
        calibrate_eos(model, tok, en[-32:])
    out = work / "opus-mt-en-de"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
