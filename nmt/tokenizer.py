"""SentencePiece subword tokenizer with fixed special ids (pad=0, unk=1, bos=2, eos=3).

Part of the torch-free core: training, export and the engine all load the same class (the model
travels as bytes inside the checkpoint and as `tokenizer.model` inside a bundle).
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

# Special ids are fixed for every tokenizer we train, so graphs and engines can rely on them.
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class Tokenizer:
    def __init__(self, model_proto: bytes):
        self.model_proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        ids = (self.sp.pad_id(), self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id())
        if ids != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
            raise ValueError(f"tokenizer special ids {ids} differ from the fixed (pad, unk, bos, eos) = 0..3")

    @classmethod
    def train(cls, sentences: Iterable[str], vocab_size: int, *, max_sentences: int = 300_000,
              character_coverage: float = 1.0) -> Tokenizer:
        """Train a unigram SentencePiece model on the given sentences (both languages for joint)."""
        buf = io.BytesIO()
        sents = [s for s in sentences if s.strip()]
        if not sents:
            raise ValueError("cannot train a tokenizer on an empty corpus")
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sents), model_writer=buf, vocab_size=vocab_size,
            model_type="unigram", character_coverage=character_coverage,
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            input_sentence_size=max_sentences, shuffle_input_sentence=True,
            # A small corpus may not support the requested size; take what it supports.
            hard_vocab_limit=False, minloglevel=2, num_threads=2,
        )
        return cls(buf.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        return cls(Path(path).read_bytes())

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.model_proto)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        """Subword ids of a text, without bos/eos."""
        return self.sp.encode(text, out_type=int)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts, out_type=int)

    def decode(self, ids: Iterable[int]) -> str:
        """Detokenized text; special ids are dropped."""
        return self.sp.decode([i for i in ids if i > EOS_ID])

    def pieces(self, ids: Iterable[int]) -> list[str]:
        return [self.sp.id_to_piece(int(i)) for i in ids]

    def offsets(self, text: str) -> list[tuple[int, int]]:
        """Per id of `encode(text)`: the code-point range of the text it came from."""
        return piece_offsets(self.sp, text)


def piece_offsets(sp: spm.SentencePieceProcessor, text: str, shift: int = 0) -> list[tuple[int, int]]:
    """Code-point ranges of the pieces SentencePiece cuts `text` into, moved by `shift`, each without
    the whitespace it absorbed (SentencePiece reports byte offsets into the original text)."""
    at = [i for i, ch in enumerate(text) for _ in ch.encode()] + [len(text)]  # byte -> code point
    out = []
    for piece in sp.encode(text, out_type="proto").pieces:
        start, end = at[piece.begin], at[piece.end]
        while start < end and text[start].isspace():
            start += 1
        out.append((start + shift, end + shift))
    return out
