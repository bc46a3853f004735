"""Validation of exported graphs against the PyTorch model they came from.

Every export runs these checks on a batch of real sentences and fresh random sources, with
batch size and lengths different from the export example (so a baked-in shape shows up):
  * encoder: every output (states and each layer's cross K/V) vs PyTorch;
  * decoder: teacher-forced one token at a time WITH the cache (first step on an empty past)
    vs PyTorch's full-sequence pass: log_probs, top-k and the final present K/V;
  * reorder: the gather equals numpy's take on the batch axis, exactly;
  * slot decoder (when present): the same teacher-forced check with rows of different ages
    (export.validate_slots);
  * greedy: the cached ORT greedy decode equals PyTorch's uncached greedy decode, token for token.
The report (a JSON-able dict) goes into the manifest; `passed` says whether the dtype's tolerance held.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from export.validate_slots import check_slot_decoder
from nmt import bundle as sb
from nmt.decoding import DecodeOptions
from nmt.pair_tokenizer import BundleTokenizer
from train.decode import greedy_decode, max_new_tokens, source_ids
from train.model import Transformer

# Short and long, plain and with punctuation: the lengths differ so the batch is padded.
SENTENCES = [
    "A man in a blue shirt is standing on a ladder cleaning windows.",
    "Two dogs play in the snow.",
    "A little girl climbs into a wooden playhouse while her father watches from the porch.",
    "People wait at a bus stop.",
    "Hello!",
    "A group of young men in red jerseys are playing soccer on a muddy field next to a river.",
]


# The reference greedy decoder is uncached (quadratic in length): a fixed budget keeps validation quick.
GREEDY_OPTIONS = DecodeOptions(max_length_a=0.0, max_length_b=32)


@dataclass(frozen=True)
class Tolerance:
    max_abs_diff: float | None  # bound on every float output; None: reported, not enforced
    min_argmax_agreement: float  # teacher-forced steps whose argmax equals PyTorch's
    min_greedy_identical: float  # share of sentences whose greedy tokens equal PyTorch's


# fp32 must match PyTorch; reduced precision is judged on the decisions it makes.
TOLERANCES = {
    "fp32": Tolerance(max_abs_diff=1e-4, min_argmax_agreement=1.0, min_greedy_identical=1.0),
    "fp16": Tolerance(max_abs_diff=None, min_argmax_agreement=0.95, min_greedy_identical=0.0),
    "int8": Tolerance(max_abs_diff=None, min_argmax_agreement=0.8, min_greedy_identical=0.0),
}


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run PyTorch on n threads for a while: the reference runs tiny batches, where a second
    thread only adds synchronisation (and stalls badly on a busy machine)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def load_sessions(graph_dir: Path, providers: list[str]) -> dict[str, ort.InferenceSession]:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # keep ORT's per-node warnings out of the export log
    opts.intra_op_num_threads = 1  # validation graphs are small; spinning worker threads only cost CPU
    graphs = [("encoder", sb.ENCODER_FILE), ("decoder", sb.DECODER_FILE), ("reorder", sb.REORDER_FILE)]
    optional = (("decoder_alignments", sb.DECODER_ALIGNMENTS_FILE), ("decoder_slots", sb.DECODER_SLOTS_FILE))
    for kind, fname in optional:
        if (graph_dir / fname).exists():  # optional in a bundle
            graphs.append((kind, fname))
    return {g: ort.InferenceSession(str(graph_dir / f), opts, providers=providers) for g, f in graphs}


def np_dtype(session: ort.InferenceSession, name: str) -> type:
    """The numpy dtype a session expects for a float input (float32 or float16)."""
    kind = next(i.type for i in session.get_inputs() if i.name == name)
    return np.float16 if kind == "tensor(float16)" else np.float32


def max_diff(a: np.ndarray, b: torch.Tensor) -> float:
    return float(np.max(np.abs(a.astype(np.float32) - b.float().numpy()))) if a.size else 0.0


def validation_sources(model: Transformer, tokenizer: BundleTokenizer, n_random: int,
                       seed: int) -> list[list[int]]:
    """Source ids (EOS included) of the real sentences plus random-id sources of random lengths."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    srcs = [source_ids(tokenizer, t, cfg.eos_id)[:cfg.max_positions] for t in SENTENCES]
    for _ in range(n_random):
        n = int(torch.randint(1, min(24, cfg.max_positions), (1,), generator=g))
        srcs.append(torch.randint(4, cfg.src_vocab_size, (n,), generator=g).tolist() + [cfg.eos_id])
    return srcs


def pad_batch(srcs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    S = max(map(len, srcs))
    ids = torch.tensor([s + [pad_id] * (S - len(s)) for s in srcs])  # (B, S)
    mask = torch.arange(S)[None, :] < torch.tensor([len(s) for s in srcs])[:, None]  # (B, S)
    return ids, mask


def run_encoder(sess: ort.InferenceSession, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, np.ndarray]:
    names = [o.name for o in sess.get_outputs()]
    outs = sess.run(None, {sb.INPUT_IDS: ids.numpy(), sb.ATTENTION_MASK: mask.numpy()})
    return dict(zip(names, outs))


def cross_feed(enc_out: dict[str, np.ndarray], n_layers: int) -> dict[str, np.ndarray]:
    """The encoder's present.{i}.encoder.* outputs renamed to the decoder's past_key_values inputs."""
    return {sb.past_name(i, "encoder", w): enc_out[sb.present_name(i, "encoder", w)]
            for i in range(n_layers) for w in ("key", "value")}


def empty_past(sess: ort.InferenceSession, model: Transformer, batch: int) -> dict[str, np.ndarray]:
    cfg = model.cfg
    return {sb.past_name(i, "decoder", w): np.zeros((batch, cfg.n_heads, 0, cfg.head_dim),
                                                      np_dtype(sess, sb.past_name(i, "decoder", w)))
            for i in range(cfg.n_decoder_layers) for w in ("key", "value")}


def decoder_step(sess: ort.InferenceSession, ids: np.ndarray, step: int, src_mask: np.ndarray,
                 cache: dict[str, np.ndarray], top_k: int) -> dict[str, np.ndarray]:
    """Feed one new token per row at position `step` over a past of `step` tokens."""
    B = ids.shape[0]
    feed = {sb.INPUT_IDS: ids, sb.POSITION_IDS: np.full((B, 1), step, np.int64),
            sb.SELF_ATTENTION_MASK: np.ones((B, 1, step + 1), bool), sb.ENCODER_ATTENTION_MASK: src_mask,
            sb.TOP_K: np.array([top_k], np.int64), **cache}
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))


def next_past(out: dict[str, np.ndarray], n_layers: int) -> dict[str, np.ndarray]:
    return {sb.past_name(i, "decoder", w): out[sb.present_name(i, "decoder", w)]
            for i in range(n_layers) for w in ("key", "value")}


def check_encoder(model: Transformer, sess: ort.InferenceSession, ids: torch.Tensor,
                  mask: torch.Tensor) -> tuple[dict[str, float], list]:
    """Max abs diff of every encoder output; also returns PyTorch's cross K/V for the decoder check."""
    with torch.inference_mode():
        memory = model.encode(ids, mask)  # (B, S, D)
        cross = model.cross_kv(memory)
    out = run_encoder(sess, ids, mask)
    names = sb.encoder_output_names(model.cfg.n_decoder_layers)
    ref = [memory] + [t for kv in cross for t in kv]
    # Real positions only: padded ones are masked everywhere downstream, and an encoder that removes
    # padding (nmt.bundle.PACKED_ENCODER) leaves copies of the row's last token there.
    m = mask.numpy()
    return {f"encoder.{n}": max_diff(real_positions(out[n], m),
                                     torch.from_numpy(real_positions(r.numpy(), m)))
            for n, r in zip(names, ref)}, cross


def real_positions(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The unpadded positions of an encoder output: (B, S, D) or (B, H, S, Dh) -> (N, ...)."""
    if x.ndim == 4:
        x = x.transpose(0, 2, 1, 3)  # (B, S, H, Dh)
    return x[mask]


def check_decoder(model: Transformer, sess: ort.InferenceSession, src_mask: torch.Tensor, cross: list,
                  targets: torch.Tensor, top_k: int) -> dict[str, Any]:
    """Teacher-forced decoding one token at a time through the cache vs one uncached PyTorch pass.

    The ORT decoder gets PyTorch's cross K/V, so the figures measure this graph alone.
    """
    cfg = model.cfg
    B, T = targets.shape
    with torch.inference_mode():
        positions = torch.arange(T).unsqueeze(0).expand(B, T)  # (B, T)
        causal = torch.ones(T, T, dtype=torch.bool).tril().expand(B, T, T)  # (B, T, T)
        probs: list[torch.Tensor] = []  # per layer (B, H, T, S)
        logits, present = model.decode(targets, positions, causal, src_mask, cross, model.empty_past(B),
                                       probs)
        ref_lp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
        ref_align = torch.stack([p.mean(dim=1) for p in probs], dim=1)  # (B, L, T, S)
    aligns = sb.CROSS_ATTENTION in {o.name for o in sess.get_outputs()}
    cache = empty_past(sess, model, B)
    for i, kv in enumerate(cross):
        for w, t in zip(("key", "value"), kv):
            name = sb.past_name(i, "encoder", w)
            cache[name] = t.numpy().astype(np_dtype(sess, name))
    lp_diff = val_diff = align_diff = 0.0
    agree = topk_agree = 0
    for t in range(T):
        out = decoder_step(sess, targets[:, t:t + 1].numpy(), t, src_mask.numpy(), cache, top_k)
        ref_vals, ref_idx = torch.topk(ref_lp[:, t], top_k, dim=-1)  # (B, k)
        lp_diff = max(lp_diff, max_diff(out[sb.LOG_PROBS][:, -1], ref_lp[:, t]))
        val_diff = max(val_diff, max_diff(out[sb.TOPK_VALUES], ref_vals))
        agree += int((out[sb.LOG_PROBS][:, -1].argmax(-1) == ref_lp[:, t].argmax(-1).numpy()).sum())
        topk_agree += int((out[sb.TOPK_INDICES] == ref_idx.numpy()).all(-1).sum())
        if aligns:
            align_diff = max(align_diff, max_diff(out[sb.CROSS_ATTENTION][:, :, -1], ref_align[:, :, t]))
        cache.update(next_past(out, cfg.n_decoder_layers))
    diffs = {f"decoder.{sb.LOG_PROBS}": lp_diff, f"decoder.{sb.TOPK_VALUES}": val_diff}
    if aligns:
        diffs[f"decoder.{sb.CROSS_ATTENTION}"] = align_diff
    for i, kv in enumerate(present):
        for w, ref in zip(("key", "value"), kv):
            name = sb.present_name(i, "decoder", w)
            diffs[f"decoder.{name}"] = max_diff(out[name], ref)
    return {"max_abs_diff": diffs, "argmax_agreement": agree / (B * T),
            "topk_index_agreement": topk_agree / (B * T)}


def check_grouped_cross(model: Transformer, sess: ort.InferenceSession, src_mask: torch.Tensor, cross: list,
                        targets: torch.Tensor, top_k: int, group: int = 3) -> float:
    """A decoder that takes cross K/V once per source (nmt.bundle.GROUPED_CROSS_KV): `group` rows per
    source fed with one cross row each must give what the same rows give with the K/V repeated."""
    B, T = targets.shape
    rows = torch.arange(B).repeat_interleave(group)  # (B*g,) the source of every row
    tokens = targets[rows].numpy().copy()  # (B*g, T)
    tokens[1::group] = np.roll(tokens[1::group], 1, axis=1)  # the beams of a source differ
    grouped, expanded = {}, {}
    for i, kv in enumerate(cross):
        for w, t in zip(("key", "value"), kv):
            name = sb.past_name(i, "encoder", w)
            grouped[name] = t.numpy().astype(np_dtype(sess, name))
            expanded[name] = grouped[name][rows.numpy()]
    caches = [{**empty_past(sess, model, B * group), **c} for c in (grouped, expanded)]
    masks = [src_mask.numpy(), src_mask.numpy()[rows.numpy()]]
    diff = 0.0
    for t in range(T):
        outs = [decoder_step(sess, tokens[:, t:t + 1], t, m, c, top_k) for m, c in zip(masks, caches)]
        diff = max(diff, float(np.max(np.abs(outs[0][sb.LOG_PROBS] - outs[1][sb.LOG_PROBS]))))
        if not np.array_equal(outs[0][sb.TOPK_INDICES], outs[1][sb.TOPK_INDICES]):
            diff = max(diff, float("inf"))
        n_layers = len(cross)
        for c, o in zip(caches, outs):
            c.update(next_past(o, n_layers))
    return diff


def check_reorder(sess: ort.InferenceSession, rng: np.random.Generator, batch: int) -> bool:
    """Gather rows (repeated, reordered, some dropped) of random tensors shaped like the inputs."""
    index = np.array([batch - 1, 0, 0, batch // 2], np.int64)  # (B',)
    feed: dict[str, np.ndarray] = {sb.REORDER_INDEX: index}
    for i in sess.get_inputs()[1:]:
        shape = [batch] + [d if isinstance(d, int) else 3 for d in i.shape[1:]]
        feed[i.name] = (rng.random(shape) > 0.5 if i.type == "tensor(bool)"
                        else rng.standard_normal(shape).astype(np_dtype(sess, i.name)))
    outs = sess.run(None, feed)
    return all(np.array_equal(o, np.take(feed[i.name], index, axis=0))
               for o, i in zip(outs, sess.get_inputs()[1:]))


def ort_greedy(sessions: dict[str, ort.InferenceSession], model: Transformer, srcs: list[list[int]],
               opts: DecodeOptions = GREEDY_OPTIONS) -> list[list[int]]:
    """Batched greedy decoding through the bundle graphs with the cache (tokens without EOS)."""
    cfg = model.cfg
    ids, mask = pad_batch(srcs, cfg.pad_id)
    enc = run_encoder(sessions["encoder"], ids, mask)
    dec = sessions["decoder"]
    B = len(srcs)
    cache = {**cross_feed(enc, cfg.n_decoder_layers), **empty_past(dec, model, B)}
    budgets = [max_new_tokens(len(s), opts, cfg.max_positions) for s in srcs]
    tokens: list[list[int]] = [[] for _ in srcs]
    done = [b <= 0 for b in budgets]
    step_ids = np.full((B, 1), cfg.bos_id, np.int64)  # (B, 1)
    for step in range(max(budgets)):
        if all(done):
            break
        out = decoder_step(dec, step_ids, step, mask.numpy(), cache, 1)
        step_ids = out[sb.TOPK_INDICES][:, :1]  # (B, 1) the argmax; TopK puts the lowest id first on ties
        for r in range(B):
            if done[r]:
                continue
            token = int(step_ids[r, 0])
            if token == cfg.eos_id:
                done[r] = True
            else:
                tokens[r].append(token)
                done[r] = len(tokens[r]) >= budgets[r]
        cache.update(next_past(out, cfg.n_decoder_layers))
    return tokens


def validate_graphs(model: Transformer, tokenizer: BundleTokenizer, graph_dir: Path, dtype: str,
                    providers: list[str] | None = None, n_random: int = 2, target_len: int = 12,
                    top_k: int = 4, seed: int = 0, grouped_cross: bool = False) -> dict[str, Any]:
    """Run every check; the returned report has `passed` and, when it failed, `failures`.
    grouped_cross: the decoder claims GROUPED_CROSS_KV, which is checked too."""
    with torch_threads(1):
        return run_checks(model, tokenizer, graph_dir, dtype, providers, n_random, target_len, top_k, seed,
                          grouped_cross)


def run_checks(model: Transformer, tokenizer: BundleTokenizer, graph_dir: Path, dtype: str,
               providers: list[str] | None, n_random: int, target_len: int, top_k: int,
               seed: int, grouped_cross: bool = False) -> dict[str, Any]:
    providers = providers or ["CPUExecutionProvider"]
    tol = TOLERANCES[dtype]
    sessions = load_sessions(graph_dir, providers)
    cfg = model.cfg
    srcs = validation_sources(model, tokenizer, n_random, seed)
    ids, mask = pad_batch(srcs, cfg.pad_id)
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(4, cfg.tgt_vocab_size, (len(srcs), target_len), generator=g)  # (B, T)
    targets[:, 0] = cfg.bos_id

    enc_diffs, cross = check_encoder(model, sessions["encoder"], ids, mask)
    dec = check_decoder(model, sessions["decoder"], mask, cross, targets, top_k)
    reorder_ok = check_reorder(sessions["reorder"], np.random.default_rng(seed), len(srcs))
    diffs = {**enc_diffs, **dec["max_abs_diff"]}
    if "decoder_alignments" in sessions:  # its own pass: the graph is a separate file
        aligned = check_decoder(model, sessions["decoder_alignments"], mask, cross, targets, top_k)
        for key, value in aligned["max_abs_diff"].items():
            diffs[f"decoder_alignments.{key.split('.', 1)[1]}"] = value
    slot_agreement = 1.0
    if "decoder_slots" in sessions:
        slots = check_slot_decoder(model, sessions["decoder_slots"], mask, cross, targets, top_k)
        diffs.update(slots["max_abs_diff"])
        slot_agreement = slots["argmax_agreement"]
    if grouped_cross:  # against the same graph with repeated K/V: any difference is the grouping's
        diffs["decoder.grouped_cross_kv.log_probs"] = check_grouped_cross(
            model, sessions["decoder"], mask, cross, targets[:, :4], top_k)
    failures = []
    if not all(np.isfinite(v) for v in diffs.values()):
        failures.append("non-finite outputs (NaN/inf in the weights or an overflow)")
        diffs = {k: (v if np.isfinite(v) else float("inf")) for k, v in diffs.items()}  # JSON-safe
    worst = max(diffs, key=diffs.__getitem__)
    # Decoding a broken graph says nothing more (and a NaN model never stops): greedy only when sane.
    real = srcs[:len(SENTENCES)]
    ours = ort_greedy(sessions, model, real) if not failures else []
    ref = [greedy_decode(model, s, GREEDY_OPTIONS).tokens for s in real] if not failures else []
    identical = sum(a == b for a, b in zip(ours, ref))
    if tol.max_abs_diff is not None and diffs[worst] > tol.max_abs_diff:
        failures.append(f"{worst} differs from PyTorch by {diffs[worst]:.3g} "
                        f"(tolerance {tol.max_abs_diff:g})")
    for graph, agreement in (("decoder", dec["argmax_agreement"]), ("decoder_slots", slot_agreement)):
        if agreement < tol.min_argmax_agreement:
            failures.append(f"{graph}: teacher-forced argmax agreement {agreement:.3f} "
                            f"< {tol.min_argmax_agreement}")
    if ref and identical / len(ref) < tol.min_greedy_identical:
        failures.append(f"greedy decode identical to PyTorch on {identical}/{len(ref)} sentences")
    if not reorder_ok:
        failures.append("reorder graph output differs from a gather on the batch axis")
    return {
        "passed": not failures, "failures": failures, "providers": providers, "tolerance": asdict(tol),
        "inputs": {"sentences": len(SENTENCES), "random_sources": n_random, "batch": len(srcs),
                   "src_lens": [len(s) for s in srcs], "target_len": target_len, "top_k": top_k},
        "max_abs_diff": diffs, "worst": {"output": worst, "max_abs_diff": diffs[worst]},
        "argmax_agreement": dec["argmax_agreement"], "topk_index_agreement": dec["topk_index_agreement"],
        "reorder_exact": reorder_ok,
        "greedy": {"sentences": len(ref), "identical": identical,
                   "max_new_tokens": GREEDY_OPTIONS.max_length_b},
    }
