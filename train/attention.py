"""`nmt attention`: what every head looks at while translating one sentence.

    nmt attention runs/en-de/final.pt "A man is riding a bike." --out-dir maps/

The sentence is translated (greedy, or beam search with --beam), then the translation is fed
back teacher-forced through the model once with the attention probabilities collected:
  * cross_attention.png: per decoder layer (rows) and head (columns), target tokens x source tokens;
  * encoder_attention.png: per encoder layer and head, source tokens x source tokens.
Maps need the PyTorch weights, so the input is a checkpoint; a bundle serves alignments
(DecodeOptions.return_alignments) but not full maps.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import torch

from nmt.decoding import DecodeOptions, check_sources
from nmt.errors import UserError
from nmt.tokenizer import Tokenizer
from train.checkpoint import load_checkpoint, model_from_checkpoint
from train.decode import beam_search, greedy_decode_cached, max_new_tokens, source_ids
from train.model import Transformer
from train.plot import save_figure

matplotlib.use("Agg")  # files only: no display on servers
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

EOS_LABEL = "</s>"


class AttentionError(UserError):
    """Input the maps cannot be drawn from; the message names the problem."""


@dataclass
class AttentionMaps:
    source: list[str]  # source subword pieces, EOS included
    target: list[str]  # target pieces, one per decoder query (EOS included when generated)
    translation: str
    encoder: np.ndarray  # (L_enc, H, S, S) encoder self-attention
    cross: np.ndarray  # (L_dec, H, T, S) decoder encoder-decoder attention


@torch.inference_mode()
def attention_maps(model: Transformer, tokenizer: Tokenizer, text: str, beam_size: int = 1) -> AttentionMaps:
    """Translate `text`, then collect every layer's attention over that translation."""
    cfg = model.cfg
    opts = DecodeOptions(beam_size=beam_size).validate()
    src_ids = source_ids(tokenizer, text, cfg.eos_id)
    check_sources([src_ids], cfg.max_positions, name=lambda _: "the sentence")
    hyp = (greedy_decode_cached(model, [src_ids], opts)[0] if beam_size == 1
           else beam_search(model, src_ids, opts)[0])
    # A hypothesis without EOS used its whole budget; one with EOS stopped before it.
    ended = len(hyp.tokens) < max_new_tokens(len(src_ids), opts, cfg.max_positions)
    encoder, cross = teacher_forced_attention(model, src_ids, hyp.tokens)
    # Query t predicts target token t: keep the EOS row only when EOS was generated.
    cross = cross[:, :, :len(hyp.tokens) + int(ended)]  # (L, H, T, S)
    target = tokenizer.pieces(hyp.tokens) + ([EOS_LABEL] if ended else [])
    return AttentionMaps(source=tokenizer.pieces(src_ids[:-1]) + [EOS_LABEL], target=target,
                         translation=tokenizer.decode(hyp.tokens), encoder=encoder, cross=cross)


@torch.inference_mode()
def teacher_forced_attention(model: Transformer, src_ids: list[int], tokens: list[int]
                             ) -> tuple[np.ndarray, np.ndarray]:
    """One pass over BOS + tokens -> encoder self-attention (L,H,S,S) and cross-attention (L,H,T+1,S).

    Causal masking makes query t see exactly what decoding step t saw, so these are the
    attentions of the incremental decode that produced `tokens`."""
    cfg = model.cfg
    device = next(model.parameters()).device
    src = torch.tensor([src_ids], device=device)  # (1, S)
    src_mask = torch.ones_like(src, dtype=torch.bool)  # (1, S)
    tgt = torch.tensor([[cfg.bos_id] + tokens], device=device)  # (1, T+1)
    T = tgt.size(1)
    enc_attn: list[torch.Tensor] = []
    cross_attn: list[torch.Tensor] = []
    memory = model.encode(src, src_mask, enc_attn)
    positions = torch.arange(T, device=device).unsqueeze(0)  # (1, T+1)
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril().unsqueeze(0)  # (1, T+1, T+1)
    model.decode(tgt, positions, causal, src_mask, model.cross_kv(memory),
                 model.empty_past(1, device, memory.dtype), cross_attn)
    encoder = torch.stack(enc_attn)[:, 0].float().cpu().numpy()  # (L, H, S, S)
    cross = torch.stack(cross_attn)[:, 0].float().cpu().numpy()  # (L, H, T+1, S)
    return encoder, cross


def reference_alignment(model: Transformer, src_ids: list[int], tokens: list[int],
                        layer: int = -1) -> list[int]:
    """Per target token, the source index `layer` attends to most (heads averaged): the PyTorch
    counterpart of the engine's return_alignments."""
    _, cross = teacher_forced_attention(model, src_ids, tokens)
    return cross[layer].mean(axis=0)[:len(tokens)].argmax(axis=-1).tolist()  # (T,)


def grid_figure(maps: np.ndarray, rows: list[str], cols: list[str], title: str, layer_name: str) -> Figure:
    """One heatmap panel per (layer, head) of maps (L, H, Q, K); queries down, keys across."""
    L, H, Q, K = maps.shape
    cell = 0.22  # inches per token, so labels stay legible for long sentences
    panel_w, panel_h = max(2.2, 1.0 + cell * K), max(2.0, 0.8 + cell * Q)
    fig, axes = plt.subplots(L, H, figsize=(panel_w * H, panel_h * L + 0.6), squeeze=False)
    for layer in range(L):
        for head in range(H):
            ax = axes[layer][head]
            ax.imshow(maps[layer, head], cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
            ax.set_xticks(range(K), cols, rotation=90, fontsize=7)
            ax.set_yticks(range(Q), rows, fontsize=7)
            ax.set_title(f"{layer_name} {layer} head {head}", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def cross_figure(m: AttentionMaps) -> Figure:
    title = f"encoder-decoder attention: {m.translation}"
    return grid_figure(m.cross, m.target, m.source, title, "dec layer")


def encoder_figure(m: AttentionMaps) -> Figure:
    return grid_figure(m.encoder, m.source, m.source, "encoder self-attention", "enc layer")


def write_maps(m: AttentionMaps, cross_png: Path, encoder_png: Path) -> None:
    save_figure(cross_figure(m), cross_png)
    save_figure(encoder_figure(m), encoder_png)


def output_paths(out: Path | None, out_dir: Path | None) -> tuple[Path, Path]:
    """--out FILE.png names the cross-attention grid (the encoder one goes next to it)."""
    if out is not None:
        return out, out.with_name(f"{out.stem}-encoder{out.suffix or '.png'}")
    d = out_dir or Path(".")
    return d / "cross_attention.png", d / "encoder_attention.png"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="nmt attention",
                                description="Translate a sentence and draw its attention maps as PNG grids.")
    p.add_argument("checkpoint", type=Path, help="a training checkpoint (.pt)")
    p.add_argument("text", help="the source sentence")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out-dir", type=Path,
                       help="write cross_attention.png and encoder_attention.png here")
    where.add_argument("--out", type=Path,
                       help="cross-attention PNG (the encoder grid goes to FILE-encoder.png)")
    p.add_argument("--beam", type=int, default=1, help="beam size (1 = greedy)")
    args = p.parse_args(argv)
    if (args.checkpoint / "manifest.json").is_file():
        raise AttentionError(f"{args.checkpoint} is an ONNX bundle: attention maps need the PyTorch "
                             f"checkpoint (a bundle gives per-token alignments with return_alignments)")
    if not args.text.strip():
        raise AttentionError("the source sentence is empty")
    model, tokenizer = model_from_checkpoint(load_checkpoint(args.checkpoint))
    maps = attention_maps(model, tokenizer, args.text, args.beam)
    cross_png, encoder_png = output_paths(args.out, args.out_dir)
    write_maps(maps, cross_png, encoder_png)
    print(f"{maps.translation}\nwrote {cross_png} and {encoder_png}")
    return 0
