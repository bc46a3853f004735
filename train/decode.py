"""PyTorch reference decoders: the behaviour the ONNX engine must reproduce token for token.

Shared semantics (the engine implements the same rules):
  * source ids = tokenizer.encode(text) + [EOS]; the target starts with BOS;
  * at most min(int(a * src_len + b), max_positions - 1) generated tokens (EOS included);
  * EOS is forbidden (log-prob -inf) while fewer than min_length tokens were generated;
  * score = log_prob_sum / ((5 + L) / 6) ** length_penalty, L counting EOS when present;
  * greedy takes the argmax (ties -> lowest id);
  * beam search: see `beam_search`;
  * a forced target prefix takes the first steps, unscored (log_prob sums the searched tokens; the
    length in the normalisation counts the whole output), and is part of the output and its budget.

`greedy_decode` and `beam_search` are deliberately uncached (the Annotated Transformer loop:
re-run the decoder over the whole prefix each step), so they check the model's K/V cache
instead of relying on it. `greedy_decode_cached` is the fast batched path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nmt.decoding import DecodeOptions, Hypothesis, check_sources, max_new_tokens, normalised_score
from nmt.pair_tokenizer import BundleTokenizer
from train.model import Transformer


def check_source(model: Transformer, src_ids: list[int]) -> None:
    check_sources([src_ids], model.cfg.max_positions, model.cfg.src_vocab_size, name=lambda _: "the source")


def step_log_probs(logits: Tensor, n_generated: int, opts: DecodeOptions, eos_id: int) -> Tensor:
    """Log-probabilities of the next token (float32), EOS masked while below min_length."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    if n_generated < opts.min_length:
        logp[..., eos_id] = float("-inf")
    return logp


def encode_source(model: Transformer, src_ids: list[int]) -> tuple[Tensor, list]:
    """Encode one source -> (src_mask (1,S), every decoder layer's cross K/V (1,H,S,Dh))."""
    device = next(model.parameters()).device
    src = torch.tensor([src_ids], dtype=torch.long, device=device)  # (1, S)
    src_mask = torch.ones_like(src, dtype=torch.bool)  # (1, S)
    return src_mask, model.cross_kv(model.encode(src, src_mask))


def repeat_source(src_mask: Tensor, cross: list, batch: int) -> tuple[Tensor, list]:
    """The one encoded source shared by `batch` hypotheses (views, no copies)."""
    cross = [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in cross]  # (B, H, S, Dh)
    return src_mask.expand(batch, -1), cross  # (B, S)


def decode_prefixes(model: Transformer, prefixes: Tensor, src_mask: Tensor, cross: list) -> Tensor:
    """Uncached decoder pass over full prefixes (B,T) -> logits of the last position (B,V)."""
    B, T = prefixes.shape
    positions = torch.arange(T, device=prefixes.device).unsqueeze(0).expand(B, T)  # (B, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=prefixes.device).tril()  # (T, T)
    logits, _ = model.decode(prefixes, positions, causal.expand(B, T, T), src_mask, cross,
                             model.empty_past(B, prefixes.device, cross[0][0].dtype))
    return logits[:, -1]  # (B, V)


@torch.inference_mode()
def greedy_decode(model: Transformer, src_ids: list[int], opts: DecodeOptions,
                  target_prefix: list[int] | None = None) -> Hypothesis:
    """Textbook greedy decoding of one source: argmax each step over the whole prefix, after the
    forced target `prefix` (if any)."""
    cfg = model.cfg
    check_source(model, src_ids)
    src_mask, cross = encode_source(model, src_ids)
    device = src_mask.device
    tokens: list[int] = []
    forced = list(target_prefix or [])
    log_prob = torch.zeros((), dtype=torch.float32)  # float32 sum, as the engine accumulates
    ended = False
    for _ in range(max_new_tokens(len(src_ids), opts, cfg.max_positions)):
        if len(tokens) < len(forced):
            tokens.append(forced[len(tokens)])
            continue
        prefix = torch.tensor([[cfg.bos_id] + tokens], dtype=torch.long, device=device)  # (1, T)
        logp = step_log_probs(decode_prefixes(model, prefix, src_mask, cross)[0], len(tokens), opts,
                              cfg.eos_id).cpu()  # (V,)
        token = int(torch.argmax(logp))  # first maximum = lowest id on ties
        log_prob = log_prob + logp[token]
        if token == cfg.eos_id:
            ended = True
            break
        tokens.append(token)
    lp = float(log_prob)
    return Hypothesis(text="", tokens=tokens, log_prob=lp,
                      score=normalised_score(lp, len(tokens) + ended, opts.length_penalty))


@torch.inference_mode()
def beam_search(model: Transformer, src_ids: list[int], opts: DecodeOptions,
                target_prefix: list[int] | None = None) -> list[Hypothesis]:
    """Beam search of one source; returns the n_best finished hypotheses, best first. With a forced
    `target_prefix` the search starts after it, from that single hypothesis (score 0).

    Each step every live hypothesis proposes its top 2k tokens; all candidates are sorted by
    cumulative log-prob (ties: lower live index, then lower token id) and the first 2k walked:
    an EOS candidate at rank < k finishes a hypothesis, later EOS candidates are dropped, other
    candidates become the next live beams until there are k. The search stops as soon as k
    hypotheses are finished (the live ones are then discarded); if the length budget runs out
    first, the live beams are finished as they are, without EOS.
    """
    cfg, k = model.cfg, opts.beam_size
    check_source(model, src_ids)
    device = next(model.parameters()).device
    max_new = max_new_tokens(len(src_ids), opts, cfg.max_positions)
    live: list[list[int]] = [list(target_prefix or [])]  # a single BOS (+ prefix) hypothesis
    live_lp = torch.zeros(1, dtype=torch.float32)  # (N,) cumulative log-probs of the live beams
    finished: list[Hypothesis] = []
    encoded = encode_source(model, src_ids)

    def finish(tokens: list[int], lp: float, length: int) -> None:
        finished.append(Hypothesis(text="", tokens=tokens, log_prob=lp,
                                   score=normalised_score(lp, length, opts.length_penalty)))

    for step in range(len(live[0]), max_new):
        src_mask, cross = repeat_source(*encoded, len(live))
        prefixes = torch.tensor([[cfg.bos_id] + t for t in live], dtype=torch.long, device=device)  # (N, T)
        logp = step_log_probs(decode_prefixes(model, prefixes, src_mask, cross), step, opts,
                              cfg.eos_id).cpu()  # (N, V)
        n_top = min(2 * k, logp.size(-1))
        # Stable descending sort: among equal log-probs the lower token id comes first.
        top_lp, top_ids = torch.sort(logp, dim=-1, descending=True, stable=True)
        cum = live_lp[:, None] + top_lp[:, :n_top]  # (N, 2k)
        candidates = sorted(
            ((float(cum[i, j]), i, int(top_ids[i, j])) for i in range(len(live)) for j in range(n_top)),
            key=lambda c: (-c[0], c[1], c[2]),
        )
        next_live: list[list[int]] = []
        next_lp: list[float] = []  # float32 values held exactly in Python floats
        for rank, (score, i, token) in enumerate(candidates[:2 * k]):
            if token == cfg.eos_id:
                if rank < k:
                    finish(live[i], score, len(live[i]) + 1)
            elif len(next_live) < k:
                next_live.append(live[i] + [token])
                next_lp.append(score)
        if len(finished) >= k:
            break
        live, live_lp = next_live, torch.tensor(next_lp, dtype=torch.float32)
    else:
        for tokens, lp in zip(live, live_lp.tolist()):
            finish(tokens, lp, len(tokens))
    finished.sort(key=lambda h: -h.score)  # stable: earlier finished first among equal scores
    return finished[:opts.n_best]


@torch.inference_mode()
def greedy_decode_cached(model: Transformer, batch_src: list[list[int]],
                         opts: DecodeOptions) -> list[Hypothesis]:
    """Batched greedy decoding with the K/V cache: one new token per row per step.

    Gives the same tokens as `greedy_decode`; padding never changes a row's result because the
    source mask hides the padding from every attention.
    """
    cfg = model.cfg
    for src_ids in batch_src:
        check_source(model, src_ids)
    device = next(model.parameters()).device
    B, S = len(batch_src), max(len(s) for s in batch_src)
    src = torch.tensor([s + [cfg.pad_id] * (S - len(s)) for s in batch_src], device=device)  # (B, S)
    lengths = torch.tensor([len(s) for s in batch_src], device=device)  # (B,)
    src_mask = torch.arange(S, device=device)[None, :] < lengths[:, None]  # (B, S)
    cross = model.cross_kv(model.encode(src, src_mask))
    past = model.empty_past(B, device, cross[0][0].dtype)
    budget = torch.tensor([max_new_tokens(len(s), opts, cfg.max_positions) for s in batch_src])  # (B,)
    tokens: list[list[int]] = [[] for _ in range(B)]
    log_prob = torch.zeros(B, dtype=torch.float32)  # (B,)
    done = budget <= 0  # (B,)
    ended = torch.zeros(B, dtype=torch.bool)  # (B,) finished with EOS
    step_ids = torch.full((B, 1), cfg.bos_id, dtype=torch.long, device=device)  # (B, 1)
    for step in range(int(budget.max())):
        if bool(done.all()):
            break
        positions = torch.full((B, 1), step, dtype=torch.long, device=device)  # (B, 1)
        self_mask = torch.ones(B, 1, step + 1, dtype=torch.bool, device=device)  # (B, 1, P+1)
        logits, past = model.decode(step_ids, positions, self_mask, src_mask, cross, past)
        logp = step_log_probs(logits[:, -1], step, opts, cfg.eos_id).cpu()  # (B, V)
        next_ids = torch.argmax(logp, dim=-1)  # (B,)
        active = ~done
        log_prob = torch.where(active, log_prob + logp.gather(1, next_ids[:, None])[:, 0], log_prob)
        is_eos = active & (next_ids == cfg.eos_id)
        ended |= is_eos
        for row in torch.nonzero(active & ~is_eos)[:, 0].tolist():
            tokens[row].append(int(next_ids[row]))
        done |= is_eos | (step + 1 >= budget)
        step_ids = next_ids[:, None].to(device)  # (B, 1) finished rows keep decoding, unused
    return [
        Hypothesis(text="", tokens=tokens[r], log_prob=float(log_prob[r]),
                   score=normalised_score(float(log_prob[r]), len(tokens[r]) + int(ended[r]),
                                          opts.length_penalty))
        for r in range(B)
    ]


def source_ids(tokenizer: BundleTokenizer, text: str, eos_id: int) -> list[int]:
    return tokenizer.encode(text) + [eos_id]


@torch.inference_mode()
def translate(model: Transformer, tokenizer: BundleTokenizer, texts: list[str], opts: DecodeOptions,
              batch_size: int = 64) -> list[str]:
    """Best translation of each text: batched cached greedy for beam 1, beam search otherwise."""
    opts.validate()
    srcs = [source_ids(tokenizer, t, model.cfg.eos_id) for t in texts]
    out: list[str] = []
    if opts.beam_size == 1:
        # Sorting by length keeps padding (wasted compute) small inside each batch.
        order = sorted(range(len(srcs)), key=lambda i: len(srcs[i]))
        result: dict[int, str] = {}
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            for i, hyp in zip(idx, greedy_decode_cached(model, [srcs[i] for i in idx], opts)):
                result[i] = tokenizer.decode(hyp.tokens)
        out = [result[i] for i in range(len(srcs))]
    else:
        out = [tokenizer.decode(beam_search(model, s, opts)[0].tokens) for s in srcs]
    return out
