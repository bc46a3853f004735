"""Shared fixtures: a tiny model trained for seconds on real Multi30k data, and its bundle.

Tests read Multi30k from NMT_DATA_DIR (default: ../shared/data/multi30k next to the repo),
never from the network.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("NMT_DATA_DIR", str(REPO.parent / "shared" / "data" / "multi30k"))
DATA_DIR = Path(os.environ["NMT_DATA_DIR"])


def read_lines(split: str, lang: str, limit: int | None = None) -> list[str]:
    with gzip.open(DATA_DIR / f"{split}.{lang}.gz", "rt", encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    return lines[:limit] if limit else lines


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "train.en.gz").is_file():
        pytest.fail(f"Multi30k not found at {DATA_DIR}; set NMT_DATA_DIR")
    return DATA_DIR


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, data_dir) -> Path:
    """A `tiny` preset model trained for a few seconds on 3000 en->de pairs: real, small, varied output."""
    import torch

    from train.checkpoint import atomic_torch_save, make_checkpoint
    from train.config import preset
    from train.model import Transformer
    from train.tokenizer import Tokenizer

    torch.manual_seed(0)
    src, tgt = read_lines("train", "en", 3000), read_lines("train", "de", 3000)
    tok = Tokenizer.train(src + tgt, 500)
    mc, tc = preset("tiny", src_vocab_size=tok.vocab_size, tgt_vocab_size=tok.vocab_size)
    model = Transformer(mc)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    pairs = [(tok.encode(s)[:30], tok.encode(t)[:30]) for s, t in zip(src, tgt)]
    for step in range(150):
        batch = pairs[(step * 32) % len(pairs):][:32]
        S, T = max(len(s) for s, _ in batch), max(len(t) for _, t in batch) + 1
        s_ids = torch.tensor([s + [0] * (S - len(s)) for s, _ in batch])
        t_in = torch.tensor([[2] + t + [0] * (T - 1 - len(t)) for _, t in batch])
        t_out = torch.tensor([t + [3] + [0] * (T - 1 - len(t)) for _, t in batch])
        loss = model.loss(s_ids, s_ids != 0, t_in, t_out)
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("run") / "best.pt"
    atomic_torch_save(make_checkpoint(model.eval(), tok, train_config=tc, step=150,
                                      meta={"src_lang": "en", "tgt_lang": "de"}), path)
    return path


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_checkpoint) -> Path:
    """The fp32 bundle (validated on export) of `tiny_checkpoint`."""
    from export.pipeline import export_bundle

    return export_bundle(tiny_checkpoint, tmp_path_factory.mktemp("bundles") / "tiny-fp32")


@pytest.fixture(scope="session")
def tiny_bundle_int8(tmp_path_factory, tiny_checkpoint) -> Path:
    """The int8 (dynamically quantized) bundle of `tiny_checkpoint`."""
    from export.pipeline import export_bundle

    return export_bundle(tiny_checkpoint, tmp_path_factory.mktemp("bundles") / "tiny-int8", dtype="int8")
