"""Hugging Face Marian (OPUS-MT) model folders -> our Transformer, checked against transformers itself.

A folder is what `MarianMTModel.save_pretrained` and `MarianTokenizer.save_pretrained` write:
config.json, model.safetensors (or pytorch_model.bin), source.spm, target.spm, vocab.json (and
target_vocab.json when the vocabularies are separate). Marian is our Transformer with options our
presets leave off (train/config.py): post-norm layers without a final LayerNorm, the swish (or
gelu) activation, sinusoids laid out in halves, embeddings scaled by sqrt(d) only when
`scale_embedding`, a final_logits_bias, and decoding that starts from the pad id.

`transformers` is imported only here (the `marian` extra); nothing else of the project needs it.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nmt.decoding import DecodeOptions
from nmt.errors import UserError
from nmt.pair_tokenizer import EOS, PAD, SOURCE_MODEL, SOURCE_VOCAB, TARGET_MODEL, TARGET_VOCAB, PairTokenizer
from train.config import ModelConfig
from train.decode import greedy_decode_cached
from train.model import Transformer

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
ACTIVATIONS = {"swish": "swish", "silu": "swish", "gelu": "gelu", "relu": "relu"}


class MarianImportError(UserError):
    """A folder that is not an importable Marian model; the message names the file and the problem."""


@dataclass
class MarianFolder:
    path: Path
    config: dict[str, Any]
    tokenizer_config: dict[str, Any]
    separate_vocabs: bool


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MarianImportError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise MarianImportError(f"{path}: expected a JSON object")
    return data


def check_folder(path: Path) -> MarianFolder:
    """Everything an import needs is there and is Marian, before anything slow is loaded."""
    if not path.is_dir():
        raise MarianImportError(f"{path}: not a directory (expected a Hugging Face Marian model folder)")
    if not (path / "config.json").is_file():
        raise MarianImportError(f"{path}: config.json missing (not a Hugging Face model folder)")
    config = read_json(path / "config.json")
    if config.get("model_type") != "marian":
        kind = config.get("model_type")
        raise MarianImportError(f"{path}/config.json: model_type {kind!r} is not 'marian'")
    tok_path = path / "tokenizer_config.json"
    tok_config = read_json(tok_path) if tok_path.is_file() else {}
    separate = bool(tok_config.get("separate_vocabs", False))
    needed = [SOURCE_MODEL, TARGET_MODEL, SOURCE_VOCAB] + ([TARGET_VOCAB] if separate else [])
    missing = [f for f in needed if not (path / f).is_file()]
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        missing.append(" or ".join(WEIGHT_FILES))
    if missing:
        raise MarianImportError(f"{path}: missing {', '.join(missing)}")
    return MarianFolder(path, config, tok_config, separate)


def load_tokenizer(folder: MarianFolder) -> PairTokenizer:
    p = folder.path
    try:
        return PairTokenizer.from_files(p / SOURCE_MODEL, p / TARGET_MODEL, p / SOURCE_VOCAB,
                                        p / TARGET_VOCAB if folder.separate_vocabs else None)
    except (ValueError, RuntimeError, OSError) as e:  # sentencepiece raises RuntimeError on a bad model
        raise MarianImportError(f"{p}: cannot read the tokenizer ({str(e).splitlines()[0]})") from None


def model_config(folder: MarianFolder, tokenizer: PairTokenizer) -> ModelConfig:
    """Our config for a Marian config.json; MarianImportError for what our model cannot express."""
    c = folder.config
    problems = []
    if c.get("encoder_attention_heads") != c.get("decoder_attention_heads"):
        problems.append("encoder and decoder head counts differ")
    if c.get("encoder_ffn_dim") != c.get("decoder_ffn_dim"):
        problems.append("encoder and decoder feed-forward widths differ")
    act = c.get("activation_function", "gelu")
    if act not in ACTIVATIONS:
        problems.append(f"activation {act!r} (supported: {', '.join(ACTIVATIONS)})")
    vocab = c.get("vocab_size", 58101)
    decoder_vocab = c.get("decoder_vocab_size") or vocab
    shared = bool(c.get("share_encoder_decoder_embeddings", True))
    pad, eos = c.get("pad_token_id"), c.get("eos_token_id")
    start = c.get("decoder_start_token_id")
    if start is None:
        start = tokenizer.pad_id
    if isinstance(eos, list):
        eos = eos[0] if len(eos) == 1 else None
    if (pad, eos) != (tokenizer.pad_id, tokenizer.eos_id):
        problems.append(f"pad/eos ids {pad}/{eos} differ from the vocabulary's {PAD} {tokenizer.pad_id} / "
                        f"{EOS} {tokenizer.eos_id}")
    if tokenizer.vocab_size > (vocab if shared else decoder_vocab):
        problems.append(f"the vocabulary has {tokenizer.vocab_size} entries, the model {decoder_vocab}")
    if problems:
        raise MarianImportError(f"{folder.path}/config.json: cannot import: " + "; ".join(problems))
    try:
        return ModelConfig(
            src_vocab_size=vocab, tgt_vocab_size=vocab if shared else decoder_vocab, d_model=c["d_model"],
            n_heads=c["encoder_attention_heads"], n_encoder_layers=c["encoder_layers"],
            n_decoder_layers=c["decoder_layers"], d_ff=c["encoder_ffn_dim"], dropout=0.0,
            max_positions=c.get("max_position_embeddings", 1024), pre_norm=False, share_embeddings=shared,
            tie_output=bool(c.get("tie_word_embeddings", True)), activation=ACTIVATIONS[act],
            embed_scale=bool(c.get("scale_embedding", False)), position_layout="halves", output_bias=True,
            pad_id=tokenizer.pad_id, unk_id=tokenizer.unk_id, bos_id=int(start), eos_id=tokenizer.eos_id,
        ).validate()
    except KeyError as e:
        raise MarianImportError(f"{folder.path}/config.json: missing {e}") from None
    except ValueError as e:
        raise MarianImportError(f"{folder.path}/config.json: {e}") from None


def load_reference(folder: MarianFolder) -> Any:
    """The transformers MarianMTModel of the folder (eval mode, float32)."""
    try:
        import transformers
        from transformers import MarianMTModel
    except ImportError:
        raise MarianImportError("importing Marian models needs transformers: "
                                "pip install 'nmt-transformer[marian]'") from None
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = MarianMTModel.from_pretrained(str(folder.path))
    except Exception as e:  # truncated or foreign weights: transformers raises many types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        reason = f"{type(e).__name__}: {first}"
        raise MarianImportError(f"{folder.path}: cannot load the weights ({reason})") from None
    return hf.eval()


def copy_linear(dst: nn.Linear, src: nn.Linear) -> None:
    dst.weight.copy_(src.weight)
    dst.bias.copy_(src.bias)


def copy_attention(dst: Any, src: Any) -> None:
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        copy_linear(getattr(dst, name), getattr(src, name))


def copy_ff(dst: Any, layer: Any) -> None:
    copy_linear(dst.net[0], layer.fc1)
    copy_linear(dst.net[3], layer.fc2)


@torch.no_grad()
def transfer_weights(hf: Any, cfg: ModelConfig) -> Transformer:
    """Our Transformer with the Marian weights (every parameter and the logits bias copied)."""
    model = Transformer(cfg)
    m = hf.model
    model.src_embed.weight.copy_(m.encoder.embed_tokens.weight)
    if not cfg.share_embeddings:
        model.tgt_embed.weight.copy_(m.decoder.embed_tokens.weight)
    if not cfg.tie_output:
        model.generator.weight.copy_(hf.lm_head.weight)
    model.generator.bias.copy_(hf.final_logits_bias.reshape(-1))
    ours_enc: list[Any] = list(model.encoder_layers)
    ours_dec: list[Any] = list(model.decoder_layers)
    for ours, theirs in zip(ours_enc, m.encoder.layers):
        copy_attention(ours.self_attn, theirs.self_attn)
        copy_ff(ours.ff, theirs)
        ours.res_attn.norm.load_state_dict(theirs.self_attn_layer_norm.state_dict())
        ours.res_ff.norm.load_state_dict(theirs.final_layer_norm.state_dict())
    for ours, theirs in zip(ours_dec, m.decoder.layers):
        copy_attention(ours.self_attn, theirs.self_attn)
        copy_attention(ours.cross_attn, theirs.encoder_attn)
        copy_ff(ours.ff, theirs)
        ours.res_self.norm.load_state_dict(theirs.self_attn_layer_norm.state_dict())
        ours.res_cross.norm.load_state_dict(theirs.encoder_attn_layer_norm.state_dict())
        ours.res_ff.norm.load_state_dict(theirs.final_layer_norm.state_dict())
    return model.eval()


def plain_generation(hf: Any, cfg: ModelConfig) -> None:
    """Make `hf.generate` search as our engine does: no banned or forced tokens, no minimum length
    (hf_generate adds the beam settings: length_penalty 0, stop at k finished hypotheses)."""
    from transformers import GenerationConfig

    hf.generation_config = GenerationConfig(
        decoder_start_token_id=cfg.bos_id, pad_token_id=cfg.pad_id, eos_token_id=cfg.eos_id,
        forced_eos_token_id=None, bad_words_ids=None, do_sample=False, num_beams=1)


@torch.inference_mode()
def hf_generate(hf: Any, cfg: ModelConfig, sources: list[list[int]], num_beams: int,
                max_new_tokens: int) -> list[list[int]]:
    """transformers' translation of source ids (EOS included): the generated ids without the start
    token, EOS and padding. `plain_generation` must have been applied to hf."""
    S = max(map(len, sources))
    ids = torch.tensor([s + [cfg.pad_id] * (S - len(s)) for s in sources])  # (B, S)
    mask = torch.tensor([[1] * len(s) + [0] * (S - len(s)) for s in sources])  # (B, S)
    beam = dict(num_beams=num_beams, length_penalty=0.0, early_stopping=True) if num_beams > 1 else {}
    out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                      **beam)  # (B, 1 + T)
    result = []
    for row in out[:, 1:].tolist():
        result.append(row[:row.index(cfg.eos_id)] if cfg.eos_id in row else row)
    return result


@torch.inference_mode()
def compare_with_reference(model: Transformer, hf: Any, tokenizer: PairTokenizer, sentences: list[str],
                           max_new_tokens: int = 24, seed: int = 0) -> dict[str, Any]:
    """Our module against transformers on the same inputs: encoder states, teacher-forced log-probs
    (padded batch), and greedy tokens. Returns a JSON-able report with `passed`."""
    cfg = model.cfg
    sources = [tokenizer.encode(s)[:cfg.max_positions - 1] + [cfg.eos_id] for s in sentences]
    S = max(map(len, sources))
    ids = torch.tensor([s + [cfg.pad_id] * (S - len(s)) for s in sources])  # (B, S)
    mask = torch.tensor([[True] * len(s) + [False] * (S - len(s)) for s in sources])  # (B, S)
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, cfg.tgt_vocab_size, (len(sources), 10), generator=g)  # (B, T)
    targets[:, 0] = cfg.bos_id
    ours_memory = model.encode(ids, mask)
    theirs = hf(input_ids=ids, attention_mask=mask.long(), decoder_input_ids=targets)
    ours_lp = torch.log_softmax(model(ids, mask, targets).float(), dim=-1)  # (B, T, V)
    theirs_lp = torch.log_softmax(theirs.logits.float(), dim=-1)
    theirs_memory = theirs.encoder_last_hidden_state
    enc_diff = float((ours_memory - theirs_memory)[mask].abs().max())
    lp_diff = float((ours_lp - theirs_lp).abs().max())
    plain_generation(hf, cfg)
    hf_tokens = hf_generate(hf, cfg, sources, 1, max_new_tokens)
    ours = greedy_decode_cached(model, sources, DecodeOptions(max_length_a=0, max_length_b=max_new_tokens))
    identical = sum(h.tokens == t for h, t in zip(ours, hf_tokens))
    failures = []
    if max(enc_diff, lp_diff) > 1e-4:
        failures.append(f"outputs differ from transformers (encoder {enc_diff:.2g}, log_probs {lp_diff:.2g})")
    if identical != len(sources):
        failures.append(f"greedy tokens identical to transformers on {identical}/{len(sources)} sentences")
    return {"passed": not failures, "failures": failures, "sentences": len(sources),
            "max_abs_diff": {"encoder.last_hidden_state": enc_diff, "decoder.log_probs": lp_diff},
            "greedy": {"identical": identical, "max_new_tokens": max_new_tokens}}


def languages(folder: MarianFolder) -> tuple[str, str]:
    """Source and target language: tokenizer_config.json, else an `opus-mt-SRC-TGT` folder name."""
    t = folder.tokenizer_config
    if t.get("source_lang") and t.get("target_lang"):
        return str(t["source_lang"]), str(t["target_lang"])
    parts = folder.path.resolve().name.split("-")
    if len(parts) == 4 and parts[:2] == ["opus", "mt"]:
        return parts[2], parts[3]
    return "", ""
