"""Two SentencePiece models and a piece vocabulary: how Marian (OPUS-MT) models tokenize.

The source model splits a text into pieces, the vocabulary (`vocab.json`, piece -> model id) maps
them to ids, an unknown piece to <unk>; output ids map back to pieces through the target
vocabulary (the same file unless the model has separate vocabularies) and the target model joins
them into text. The SentencePiece models' own ids are never used, so the special ids are whatever
the vocabulary says (Marian: </s> 0, <unk> 1, <pad> last). A leading language code (`>>de<<`,
multilingual models) is one vocabulary entry, kept whole. Torch-free, like nmt.tokenizer.

A bundle records which tokenizer it carries in its manifest (`tokenizer`, see `manifest_entry`);
a bundle without that key carries our own `tokenizer.model`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import sentencepiece as spm

from nmt.bundle import TOKENIZER_FILE, BundleError
from nmt.tokenizer import Tokenizer, piece_offsets

KIND = "sentencepiece_pair"
SOURCE_MODEL, TARGET_MODEL = "source.spm", "target.spm"
SOURCE_VOCAB, TARGET_VOCAB = "vocab.json", "target_vocab.json"
UNK, EOS, PAD = "<unk>", "</s>", "<pad>"
SPIECE_UNDERLINE = "\u2581"


def read_vocab(data: bytes, name: str) -> dict[str, int]:
    """A piece -> id JSON object; ValueError naming the file when it is not one."""
    try:
        vocab = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{name} is not valid JSON ({e})") from None
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise ValueError(f"{name} is not a piece -> id mapping")
    for piece in (UNK, EOS, PAD):
        if piece not in vocab:
            raise ValueError(f"{name} has no {piece} entry")
    return vocab


class PairTokenizer:
    def __init__(self, source_model: bytes, target_model: bytes, source_vocab: bytes,
                 target_vocab: bytes | None = None):
        """Models and vocabularies as their files' bytes (a bundle keeps them byte for byte)."""
        self.source_model, self.target_model = source_model, target_model
        self.source_vocab_json, self.target_vocab_json = source_vocab, target_vocab
        self.src_sp = spm.SentencePieceProcessor(model_proto=source_model)
        self.tgt_sp = spm.SentencePieceProcessor(model_proto=target_model)
        self.source_vocab = read_vocab(source_vocab, SOURCE_VOCAB)
        self.separate = target_vocab is not None
        self.target_vocab = (read_vocab(target_vocab, TARGET_VOCAB) if target_vocab is not None
                             else self.source_vocab)
        self.id_to_piece = {i: p for p, i in self.target_vocab.items()}
        self.unk_id, self.eos_id, self.pad_id = (self.target_vocab[p] for p in (UNK, EOS, PAD))
        self.src_unk_id = self.source_vocab[UNK]
        if self.source_vocab[EOS] != self.eos_id:  # the engine appends one EOS id to every source
            raise ValueError(f"source and target vocabularies put {EOS} at different ids "
                             f"({self.source_vocab[EOS]} and {self.eos_id})")
        self.special = {self.unk_id, self.eos_id, self.pad_id}

    @classmethod
    def from_files(cls, source_model: Path, target_model: Path, source_vocab: Path,
                   target_vocab: Path | None = None) -> PairTokenizer:
        return cls(source_model.read_bytes(), target_model.read_bytes(), source_vocab.read_bytes(),
                   target_vocab.read_bytes() if target_vocab else None)

    @property
    def vocab_size(self) -> int:
        return max(self.target_vocab.values()) + 1

    @property
    def source_vocab_size(self) -> int:
        return max(self.source_vocab.values()) + 1

    def encode(self, text: str) -> list[int]:
        """Model ids of a text, without EOS."""
        code: list[str] = []
        end = text.find("<<")
        if text.startswith(">>") and end != -1:
            code, text = [text[:end + 2]], text[end + 2:]
        pieces = code + self.src_sp.encode(text, out_type=str)
        return [self.source_vocab.get(p, self.src_unk_id) for p in pieces]

    def offsets(self, text: str) -> list[tuple[int, int]]:
        """Per id of `encode(text)`: the code-point range of the text it came from."""
        end = text.find("<<")
        if text.startswith(">>") and end != -1:
            return [(0, end + 2)] + piece_offsets(self.src_sp, text[end + 2:], shift=end + 2)
        return piece_offsets(self.src_sp, text)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of target ids; <unk>, </s> and <pad> are dropped."""
        pieces = [self.id_to_piece.get(int(i), UNK) for i in ids if int(i) not in self.special]
        return self.tgt_sp.decode_pieces(pieces).replace(SPIECE_UNDERLINE, " ").strip()

    def pieces(self, ids: Iterable[int]) -> list[str]:
        return [self.id_to_piece.get(int(i), UNK) for i in ids]

    def files(self) -> dict[str, bytes]:
        out = {SOURCE_MODEL: self.source_model, TARGET_MODEL: self.target_model,
               SOURCE_VOCAB: self.source_vocab_json}
        if self.target_vocab_json is not None:
            out[TARGET_VOCAB] = self.target_vocab_json
        return out

    def save(self, directory: Path) -> list[str]:
        """Write the tokenizer's files into a directory; returns their names."""
        for name, data in self.files().items():
            (directory / name).write_bytes(data)
        return list(self.files())

    def manifest_entry(self) -> dict[str, Any]:
        return {"kind": KIND, "source_model": SOURCE_MODEL, "target_model": TARGET_MODEL,
                "source_vocab": SOURCE_VOCAB, "target_vocab": TARGET_VOCAB if self.separate else SOURCE_VOCAB}

    @classmethod
    def load(cls, directory: Path, entry: dict[str, Any]) -> PairTokenizer:
        d = Path(directory)
        try:
            target = entry["target_vocab"]
            source = entry["source_vocab"]
            return cls.from_files(d / entry["source_model"], d / entry["target_model"], d / source,
                                  None if target == source else d / target)
        except KeyError as e:
            raise BundleError(f"{d}: manifest tokenizer entry lacks {e}") from None
        except (OSError, ValueError, RuntimeError) as e:  # sentencepiece raises RuntimeError on bad protos
            raise BundleError(f"{d}: cannot load the tokenizer ({e})") from None


BundleTokenizer = Tokenizer | PairTokenizer


def load_bundle_tokenizer(directory: str | Path, manifest: dict[str, Any]) -> BundleTokenizer:
    """The tokenizer a bundle's manifest names; bundles without a `tokenizer` entry carry ours."""
    entry = manifest.get("tokenizer")
    if entry is None:
        return Tokenizer.load(Path(directory) / TOKENIZER_FILE)
    if not isinstance(entry, dict) or entry.get("kind") != KIND:
        kind = entry.get("kind") if isinstance(entry, dict) else entry
        raise BundleError(f"{directory}: tokenizer kind {kind!r} is not known to this server")
    return PairTokenizer.load(Path(directory), entry)
