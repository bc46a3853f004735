"""Checkpoints: one file that rebuilds its model (config + weights + tokenizer bytes).

Layout (a plain dict, loadable with torch.load(weights_only=True)):
  format: "nmt-checkpoint", format_version: 1
  model_config: dict, train_config: dict, model: state_dict, tokenizer: bytes (SentencePiece proto)
  step: int, meta: dict (languages, val BLEU, tokens seen, ...)
  optional training state for exact resume: optimizer, scheduler, rng, data_state
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from nmt.errors import UserError
from nmt.files import atomic_open
from nmt.tokenizer import Tokenizer
from train.config import ModelConfig, model_config_from_dict
from train.model import Transformer

FORMAT = "nmt-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(UserError):
    """A checkpoint that cannot be read or is not ours: the message names the file and the reason."""


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """Write to a temp file in the same directory, fsync, then rename: readers never see half a file."""
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def make_checkpoint(model: Transformer, tokenizer: Tokenizer, *, train_config: Any = None, step: int = 0,
                    meta: dict[str, Any] | None = None, **training_state: Any) -> dict[str, Any]:
    raw: Transformer = getattr(model, "module", model)  # unwrap DDP
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_config": dataclasses.asdict(raw.cfg),
        "train_config": dataclasses.asdict(train_config) if train_config is not None else {},
        "model": {k: v.detach().cpu() for k, v in raw.state_dict().items()},
        "tokenizer": tokenizer.model_proto,
        "step": step,
        "meta": dict(meta or {}),
        **training_state,
    }


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, or pickles we refuse to run
        # torch's unpickling messages span many lines; the first one names the problem.
        first = (str(e).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {first})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an nmt checkpoint (missing format marker)")
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format_version {ckpt.get('format_version')} "
                              f"is not supported (expected {FORMAT_VERSION})")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any]) -> tuple[Transformer, Tokenizer]:
    """Rebuild the model (eval mode, CPU) and tokenizer stored in a loaded checkpoint."""
    cfg: ModelConfig = model_config_from_dict(ckpt["model_config"])
    model = Transformer(cfg)
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, Tokenizer(ckpt["tokenizer"])
