"""Greedy and beam search over a batch of sources, on top of a step function.

The search never sees the model: it drives a `StepCache` (serve.engine.runtime.DecoderCache) that
runs one decoder step for every row of the running batch and returns only the top-k of each
row, and that reorders / drops rows on the device. The rules are the shared decoding semantics
of train/decode.py (the reference these functions must match token for token):
float32 log-prob sums, EOS masked below min_length, GNMT length normalisation, and the beam
walk over the 2k best candidates.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from nmt.decoding import DecodeOptions, Hypothesis, normalised_score


class StepCache(Protocol):
    rows: int
    alignment: np.ndarray | None  # (R,) after a step: most attended source index per row, when asked

    # The k best next tokens of each row: values, ids (R, k), best first. values are log-probs; with
    # scores=False they may be any values that rank the same (the slot decoder's greedy head: logits).
    def step(self, tokens: np.ndarray, k: int, scores: bool = True) -> tuple[np.ndarray, np.ndarray]: ...

    def keep(self, rows: np.ndarray, group: int = 1) -> None: ...


def scored(opts: DecodeOptions) -> bool:
    """Whether a search needs log-probs: beam search ranks by them; greedy only reports them, on request
    (without, its steps may skip them (StepCache.step) and its hypotheses' scores are NaN)."""
    return opts.return_scores or opts.beam_size > 1


def hypothesis(tokens: list[int], log_prob: np.float32, ended: bool, opts: DecodeOptions,
               alignment: list[int] | None = None) -> Hypothesis:
    lp = float(log_prob) if scored(opts) else math.nan
    return Hypothesis(text="", tokens=tokens, log_prob=lp, alignment=alignment,
                      score=normalised_score(lp, len(tokens) + int(ended), opts.length_penalty))


def reorder(cache: StepCache, index: list[int], group: int = 1) -> None:
    """Apply a row selection unless it is the identity (then the cache is already right);
    group: the new rows come in equal groups of that many rows of one source each."""
    if len(index) != cache.rows or index != list(range(cache.rows)):
        cache.keep(np.asarray(index, dtype=np.int64), group)


def fill_gaps(live: np.ndarray) -> np.ndarray:
    """The rows to keep (live[r]) as a keep index in which live rows below the new row count stay
    where they are and the last live rows fill the gaps: a cache that copies the rows that move
    (serve.engine.slots) then copies one row per finished row, not every row after it. The layout
    `place` gives one-row groups, vectorized: greedy compacts up to hundreds of rows a step."""
    keep = np.flatnonzero(live)  # (R',) ascending
    n = len(keep)
    index = np.arange(n)  # (R',) new row j = old row index[j]: j itself while row j is live
    gaps = np.flatnonzero(~live[:n])  # rows below n that finished
    index[gaps] = keep[keep >= n]  # as many live rows beyond n as there are gaps below it
    return index


def place(current: list[int | None], sizes: list[int]) -> list[int]:
    """Destination first rows for groups of `sizes` rows (a text's rows) that now start at `current`
    (None: nowhere yet), packed into sum(sizes) rows with as few moves as possible: a group that
    fits where it is stays, the others fill the gaps left to right. Every gather copies the rows
    that change, so compaction then costs the rows moved into gaps, not every row after the first."""
    if len(sizes) == 1:  # one source (batch-1 beam search): nothing to place around
        return [0]
    packed = list(itertools.accumulate(sizes, initial=0))[:-1]
    if current == packed:  # every group where it is (most beam steps): nothing to search
        return packed
    total = sum(sizes)
    free = np.ones(total, dtype=bool)
    start: list[int | None] = [None] * len(sizes)
    for i, (at, size) in enumerate(zip(current, sizes)):
        if at is not None and at + size <= total and free[at:at + size].all():
            free[at:at + size] = False
            start[i] = at
    for i, size in enumerate(sizes):
        if start[i] is not None:
            continue
        gaps = np.flatnonzero(free)
        for g in gaps:
            if g + size <= total and free[g:g + size].all():
                free[g:g + size] = False
                start[i] = int(g)
                break
        else:  # the gaps are fragmented for this group: plain packing in the given order
            return packed
    return [int(s) for s in start if s is not None]


def greedy_pick(values: np.ndarray, ids: np.ndarray, step: int, opts: DecodeOptions, eos: int,
                prefix: list[int]) -> tuple[int, np.float32]:
    """One row's greedy choice at `step` from its top-k values/ids (k): the token and its log-prob.
    Below min_length the second best stands in for a banned EOS (k >= 2 then); inside a forced
    prefix the prefix's token, unscored (0)."""
    if step < len(prefix):
        return prefix[step], np.float32(0)
    col = 1 if step < opts.min_length and ids[0] == eos else 0
    return int(ids[col]), values[col]


def greedy_one(cache: StepCache, budget: int, opts: DecodeOptions, bos: int, eos: int,
               stopped: Callable[[], bool], prefix: list[int]) -> Hypothesis | None:
    """greedy_search for one row, on Python scalars. At batch 1 the vectorized loop's two dozen
    small numpy calls per step, run between decoder steps with cold caches, cost about 8% of a
    sentence's latency; this loop makes the same choices with the same float32 sums."""
    tokens: list[int] = []
    aligns: list[int] = []
    log_prob, ended, feed = np.float32(0), False, np.array([bos], dtype=np.int64)  # feed: (1,)
    while len(tokens) < budget:
        if stopped():
            return None
        step = len(tokens)
        values, ids = cache.step(feed, 2 if step < opts.min_length else 1, scored(opts))  # (1, k)
        token, gained = greedy_pick(values[0], ids[0], step, opts, eos, prefix)
        log_prob = np.float32(log_prob + gained)
        if token == eos:
            ended = True
            break
        tokens.append(token)
        if opts.return_alignments and cache.alignment is not None:
            aligns.append(int(cache.alignment[0]))
        feed = np.array([token], dtype=np.int64)
    return hypothesis(tokens, log_prob, ended, opts, aligns if opts.return_alignments else None)


def greedy_search(cache: StepCache, budgets: list[int], opts: DecodeOptions, bos: int, eos: int,
                  stopped: Callable[[int], bool], compaction: bool = True,
                  prefixes: list[list[int]] | None = None) -> list[Hypothesis | None]:
    """Argmax decoding of every row; a row whose `stopped(i)` turns true gets None.

    `prefixes[i]` are forced tokens: row i's first steps take them instead of the argmax, unscored
    (log_prob sums the searched tokens only), and its hypothesis includes them.

    With compaction, rows that finished (or were stopped) leave the running batch before the
    next step; without it they keep being fed (their outputs unused), which must not change
    anyone's result.
    """
    n = len(budgets)
    if n == 1:
        return [greedy_one(cache, budgets[0], opts, bos, eos, lambda: stopped(0), (prefixes or [[]])[0])]
    budget = np.asarray(budgets, dtype=np.int64)  # (N,)
    out = np.zeros((n, max(budgets, default=0)), dtype=np.int64)  # (N, T) generated ids, EOS excluded
    align = np.zeros_like(out)  # (N, T) most attended source index of each generated id
    length = np.zeros(n, dtype=np.int64)  # (N,)
    log_prob = np.zeros(n, dtype=np.float32)  # (N,) float32 sums, as the reference accumulates
    ended, cancelled = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)  # (N,)
    done = budget <= 0  # (N,)
    rows = np.arange(n)  # (R,) the item held by each cache row
    feed = np.full(n, bos, dtype=np.int64)  # (R,) next input token per cache row
    prefixes = prefixes or [[] for _ in range(n)]
    plen = np.asarray([len(p) for p in prefixes], dtype=np.int64)  # (N,)
    forced_ids = np.zeros((n, int(plen.max(initial=0))), dtype=np.int64)  # (N, P)
    for i, p in enumerate(prefixes):
        forced_ids[i, :len(p)] = p
    step = 0
    while True:
        for i in rows[~done[rows]].tolist():
            if stopped(i):
                done[i] = cancelled[i] = True
        live = ~done[rows]  # (R,)
        if not live.any():
            break
        if compaction and not live.all():
            keep = fill_gaps(live)
            cache.keep(keep)
            rows, feed, live = rows[keep], feed[keep], live[keep]
        eos_banned = step < opts.min_length
        # Below min_length the second best stands in for a banned EOS, so ask for two.
        values, ids = cache.step(feed, 2 if eos_banned else 1, scored(opts))  # (R, k)
        choice = ((ids[:, 0] == eos) & eos_banned).astype(np.int64)  # (R,) column of the pick
        r = np.arange(len(rows))
        picked = ids[r, choice]  # (R,)
        gained = values[r, choice]  # (R,)
        forced = plen[rows] > step  # (R,) rows still inside their prefix
        if forced.any():
            picked[forced], gained[forced] = forced_ids[rows[forced], step], 0
        items, token = rows[live], picked[live]  # rows still decoding (without compaction: a subset)
        log_prob[items] += gained[live]
        is_eos = token == eos
        ended[items[is_eos]] = True
        grow = items[~is_eos]
        out[grow, length[grow]] = token[~is_eos]
        if opts.return_alignments and cache.alignment is not None:
            align[grow, length[grow]] = cache.alignment[live][~is_eos]
        length[grow] += 1
        done[items] = is_eos | (length[items] >= budget[items])
        feed = picked
        step += 1
    return [None if cancelled[i] else hypothesis(
                out[i, :length[i]].tolist(), log_prob[i], ended[i], opts,
                align[i, :length[i]].tolist() if opts.return_alignments else None)
            for i in range(n)]


@dataclass
class Beam:
    """One source's beam search state: live hypotheses (prefixes + float32 sums) and finished ones."""

    budget: int
    live: list[list[int]] = field(default_factory=lambda: [[]])  # step 0: a single BOS hypothesis
    live_align: list[list[int]] = field(default_factory=lambda: [[]])  # alignments of the live prefixes
    live_lp: np.ndarray = field(default_factory=lambda: np.zeros(1, dtype=np.float32))  # (N,)
    parents: list[int] = field(default_factory=list)  # cache rows the live beams continue from
    finished: list[Hypothesis] = field(default_factory=list)
    done: bool = False
    cancelled: bool = False


Candidates = tuple[list[float], list[int], list[int]]  # one source's 2k best: sums, live indices, tokens


def candidates(values: np.ndarray, ids: np.ndarray, live_lp: np.ndarray, n: int, k: int, eos: int,
               eos_banned: bool) -> list[Candidates]:
    """The 2k best (cumulative log-prob, live index, token) of each of S sources of n rows each, best
    first; values/ids (S*n, K) and live_lp (S*n,) in the sources' row order.

    Rows come best first (lower id first among equal values, as ONNX TopK orders them); each row
    contributes its 2k best tokens, EOS excluded while it is banned. Ties between sums go to the
    lower row, then the lower token: a stable sort of the rows' entries in order, as the reference.
    One numpy pass for every source of a batch: ranking them one by one in Python was a tenth of a
    batch-64 beam step."""
    R, K = ids.shape
    n_top = min(2 * k, K - eos_banned)
    if eos_banned:  # the first n_top entries of each row that are not EOS: a stable sort moves EOS last
        keep = np.argsort(ids == eos, axis=1, kind="stable")[:, :n_top]  # (R, n_top)
        values, ids = along(values, keep), along(ids, keep)
    else:
        values, ids = values[:, :n_top], ids[:, :n_top]
    sums = (live_lp[:, None] + values).reshape(R // n, n * n_top)  # (S, n * n_top) float32, exact
    best = np.argsort(-sums, axis=1, kind="stable")[:, :2 * k]  # (S, 2k)
    top = along(sums, best).tolist()
    tokens = along(ids.reshape(R // n, n * n_top), best).tolist()
    return list(zip(top, (best // n_top).tolist(), tokens))


def along(a: np.ndarray, index: np.ndarray) -> np.ndarray:
    """a[r, index[r, j]] for every row r: np.take_along_axis(a, index, 1) without its per-call
    index building, which cost more than the gather at the few rows of a batch-1 beam step."""
    return a[np.arange(len(a))[:, None], index]


def advance(beam: Beam, found: Candidates, first_row: int, step: int, opts: DecodeOptions, eos: int,
            aligns: np.ndarray | None = None) -> None:
    """One beam step of one source from its 2k best candidates (first_row = its first cache row);
    aligns (N,), when alignments are on, is each row's most attended source index."""
    k = opts.beam_size
    next_live: list[list[int]] = []
    next_align: list[list[int]] = []
    next_lp: list[float] = []
    parents: list[int] = []
    for rank, (score, i, token) in enumerate(zip(*found)):
        if token == eos:
            if rank < k:
                beam.finished.append(hypothesis(beam.live[i], np.float32(score), True, opts,
                                                alignment_of(beam, i, opts)))
        elif len(next_live) < k:
            next_live.append(beam.live[i] + [token])
            if aligns is not None:
                next_align.append(beam.live_align[i] + [int(aligns[i])])
            next_lp.append(score)
            parents.append(first_row + i)
    if len(beam.finished) >= k:
        beam.done = True  # k finished: the live beams are discarded
        return
    beam.live, beam.live_lp, beam.parents = next_live, np.array(next_lp, dtype=np.float32), parents
    beam.live_align = next_align
    if step + 1 >= beam.budget:
        finish_live(beam, opts)


def force(beam: Beam, token: int, first_row: int, step: int, opts: DecodeOptions,
          align: int | None = None) -> None:
    """One forced step of a beam still inside its target prefix: its single hypothesis takes `token`,
    unscored (beam search proper starts after the prefix, from one hypothesis, as at BOS)."""
    beam.live = [beam.live[0] + [token]]
    if align is not None:
        beam.live_align = [beam.live_align[0] + [align]]
    beam.parents = [first_row]
    if step + 1 >= beam.budget:
        finish_live(beam, opts)


def finish_live(beam: Beam, opts: DecodeOptions) -> None:
    """Length budget spent: the live beams are finished as they are, without EOS."""
    for i, (tokens, lp) in enumerate(zip(beam.live, beam.live_lp)):
        beam.finished.append(hypothesis(tokens, lp, False, opts, alignment_of(beam, i, opts)))
    beam.done = True


def alignment_of(beam: Beam, i: int, opts: DecodeOptions) -> list[int] | None:
    return list(beam.live_align[i]) if opts.return_alignments else None


def rank_sources(beams: list[Beam], spans: dict[int, tuple[int, int]], items: list[int],
                 values: np.ndarray, ids: np.ndarray, k: int, eos: int, banned: bool
                 ) -> dict[int, Candidates]:
    """`candidates` of the given sources (beams[i], rows spans[i] = (first, count)), in one call per
    row count: every source of a batch has k rows but at the first step and inside forced prefixes."""
    out: dict[int, Candidates] = {}
    for n in sorted({spans[i][1] for i in items}):
        group = [i for i in items if spans[i][1] == n]
        first = spans[group[0]][0]
        if all(spans[i][0] == first + j * n for j, i in enumerate(group)):  # side by side: a view
            v, t = values[first:first + n * len(group)], ids[first:first + n * len(group)]
        else:
            rows = np.concatenate([np.arange(spans[i][0], spans[i][0] + n) for i in group])  # (S*n,)
            v, t = values[rows], ids[rows]
        live_lp = np.concatenate([beams[i].live_lp for i in group])  # (S*n,)
        out.update(zip(group, candidates(v, t, live_lp, n, k, eos, banned)))
    return out


def beam_search(cache: StepCache, budgets: list[int], opts: DecodeOptions, bos: int, eos: int, vocab: int,
                stopped: Callable[[int], bool], compaction: bool = True,
                prefixes: list[list[int]] | None = None) -> list[list[Hypothesis] | None]:
    """Beam search of every source of the batch at once; each source's beams are contiguous rows.
    A source with a forced prefix (`prefixes[i]`) is stepped through it first (see `force`).

    Every step ends with one reorder of the cache that both moves beams to their parents' rows
    and (with compaction) drops the rows of finished or stopped sources.
    """
    k = opts.beam_size
    beams = [Beam(budget=b, parents=[i]) for i, b in enumerate(budgets)]
    for beam in beams:
        if beam.budget <= 0:
            finish_live(beam, opts)
    spans = {i: (i, 1) for i in range(len(beams))}  # item -> (first row, rows) in the cache now
    step = 0
    while True:
        for i, beam in enumerate(beams):
            if not beam.done and stopped(i):
                beam.done = beam.cancelled = True
        active = [i for i in spans if not beams[i].done]
        if not active:
            break
        # The next layout: each live source's beams continue from their parents' rows; without
        # compaction finished sources keep their rows (fed, results unused).
        kept = [i for i in spans if compaction is False or not beams[i].done]
        src_rows = {i: beams[i].parents if not beams[i].done else list(range(spans[i][0], sum(spans[i])))
                    for i in kept}
        # Sources that fit where they are keep their rows; the last ones fill finished sources' places
        # (a slot cache copies only the rows that move).
        starts = place([spans[i][0] for i in kept], [len(src_rows[i]) for i in kept])
        index: list[int] = []
        feed: list[int] = []
        new_spans = {}
        for _, i in sorted(zip(starts, kept)):
            beam = beams[i]
            new_spans[i] = (len(index), len(src_rows[i]))
            index += src_rows[i]
            feed += [eos] * len(src_rows[i]) if beam.done else [t[-1] if t else bos for t in beam.live]
        counts = {count for _, count in new_spans.values()}
        # Every source with the same number of rows (k beams each, or 1 at the first step): the
        # cache may keep one cross-attention row per source.
        reorder(cache, index, counts.pop() if len(counts) == 1 else 1)
        spans = new_spans
        banned = step < opts.min_length
        values, ids = cache.step(np.asarray(feed, dtype=np.int64), min(2 * k + banned, vocab))  # (R, K)
        searched = [i for i in active if not (prefixes and step < len(prefixes[i]))]
        found = rank_sources(beams, spans, searched, values, ids, k, eos, banned)
        for i in active:
            start, count = spans[i]
            aligns = (cache.alignment[start:start + count]  # (count,)
                      if opts.return_alignments and cache.alignment is not None else None)
            if i in found:
                advance(beams[i], found[i], start, step, opts, eos, aligns)
            else:
                assert prefixes is not None  # still inside its forced prefix
                align = None if aligns is None else int(aligns[0])
                force(beams[i], prefixes[i][step], start, step, opts, align)
        step += 1
    results: list[list[Hypothesis] | None] = []
    for beam in beams:
        if beam.cancelled:
            results.append(None)
            continue
        ranked = sorted(beam.finished, key=lambda h: -h.score)  # stable: earlier finished first on ties
        results.append(ranked[:opts.n_best])
    return results
