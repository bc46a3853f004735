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
    """A `tiny` preset model trained for a few seconds on 3000 en->de pairs: real, small, varied output.

    Trained by the real trainer (`nmt train` without the CLI); returns the run's best.pt.
    """
    from train.config import preset
    from train.trainer import RunSpec, Trainer

    corpus = tmp_path_factory.mktemp("corpus")
    files = {"train.en": read_lines("train", "en", 3000), "train.de": read_lines("train", "de", 3000),
             "val.en": read_lines("val", "en", 100), "val.de": read_lines("val", "de", 100)}
    for name, lines in files.items():
        (corpus / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    mc, tc = preset("tiny", max_steps=150, eval_every=10_000, save_every=10_000, eval_bleu_sentences=50)
    run = tmp_path_factory.mktemp("run")
    spec = RunSpec(out=run, train_src=corpus / "train.en", train_tgt=corpus / "train.de",
                   valid_src=corpus / "val.en", valid_tgt=corpus / "val.de", device="cpu", progress=False)
    Trainer(mc, tc, spec).fit()
    return run / "best.pt"


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


@pytest.fixture(scope="session")
def tiny_bundle_v2(tmp_path_factory, tiny_checkpoint) -> Path:
    """A second version of `tiny_bundle`: same name, tokenizer and dtype, weights nudged (seeded noise on
    every matrix) so that it translates differently; for reloads and versioned caches."""
    import torch

    from export.pipeline import export_bundle

    ckpt = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    gen = torch.Generator().manual_seed(21)
    ckpt["model"] = {k: v + 0.05 * v.std() * torch.randn(v.shape, generator=gen) if v.dim() == 2 else v
                     for k, v in ckpt["model"].items()}
    path = tmp_path_factory.mktemp("ckpt-v2") / "v2.pt"
    torch.save(ckpt, path)
    return export_bundle(path, tmp_path_factory.mktemp("bundles") / "tiny-fp32-v2")


@pytest.fixture(scope="module")
def translator(tiny_bundle):
    """The engine on the tiny bundle, CPU, one thread (a module may define its own)."""
    from serve.engine.translator import EngineConfig, Translator

    return Translator.from_bundle(tiny_bundle, EngineConfig(device="cpu", intra_op_threads=1))


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    """The tiny checkpoint's PyTorch model, the reference decoders' input."""
    from train.checkpoint import load_checkpoint, model_from_checkpoint

    model, _ = model_from_checkpoint(load_checkpoint(tiny_checkpoint))
    return model
