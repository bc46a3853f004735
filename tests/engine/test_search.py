"""Greedy and beam search against a fake step cache: a tiny deterministic 'model' in numpy.

The fake's next-token log-probabilities depend on the row's source and its last token, so the
search's bookkeeping (budgets, min_length, EOS, compaction, reorders, stops) can be checked
against a plain loop without ONNX Runtime or torch.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from nmt.decoding import DecodeOptions, normalised_score
from serve.engine.search import beam_search, candidates, fill_gaps, greedy_search, place

BOS, EOS, V = 2, 3, 12


def log_probs(source: int, last: int) -> np.ndarray:
    """A fixed random distribution per (source, last token), float32 like the engine's."""
    rng = np.random.default_rng(source * 1000 + last)
    logits = rng.normal(size=V).astype(np.float32) * 3
    logits[EOS] += 1.0 if last > 6 else -1.0
    logits[[0, 1, BOS]] = -1e9  # pad, unk and bos are never generated
    return (logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()).astype(np.float32)


class FakeCache:
    """StepCache over the fake model; tracks which source each row belongs to."""

    def __init__(self, sources: list[int]):
        self.source = np.asarray(sources)
        self.rows = len(sources)
        self.alignment = None
        self.steps: list[int] = []  # rows fed at each step
        self.groups: list[int] = []  # the group asked for by each keep()
        self.scored: list[bool] = []  # the scores flag of each step

    def step(self, tokens: np.ndarray, k: int, scores: bool = True) -> tuple[np.ndarray, np.ndarray]:
        assert len(tokens) == self.rows
        self.steps.append(self.rows)
        self.scored.append(scores)
        lp = np.stack([log_probs(int(s), int(t)) for s, t in zip(self.source, tokens)])  # (R, V)
        ids = np.argsort(-lp, axis=1, kind="stable")[:, :k]  # (R, k)
        # Without scores a cache may return any values that rank the same (the greedy head's logits).
        values = np.take_along_axis(lp, ids, axis=1)
        return (values if scores else values + 7.0), ids

    def keep(self, rows: np.ndarray, group: int = 1) -> None:
        self.source = self.source[rows]
        self.rows = len(rows)
        # The grouping promise the cache relies on to share one cross-attention row per group.
        assert len(rows) % group == 0 and (self.source.reshape(-1, group) == self.source[::group, None]).all()
        self.groups.append(group)


def reference_greedy(source: int, budget: int, opts: DecodeOptions) -> tuple[list[int], float]:
    tokens, total, last = [], np.float32(0), BOS
    for step in range(budget):
        lp = log_probs(source, last).copy()
        if step < opts.min_length:
            lp[EOS] = -np.inf
        t = int(np.argmax(lp))
        total = np.float32(total + lp[t])
        if t == EOS:
            return tokens, float(total)
        tokens.append(t)
        last = t
    return tokens, float(total)


@pytest.mark.parametrize("min_length", [0, 4])
@pytest.mark.parametrize("compaction", [True, False])
def test_greedy_equals_a_plain_loop(min_length, compaction):
    sources, budgets = list(range(20)), [3 + (i * 7) % 11 for i in range(20)]
    opts = DecodeOptions(min_length=min_length, return_scores=True)
    found = greedy_search(FakeCache(sources), budgets, opts, BOS, EOS, lambda i: False, compaction)
    for s, b, h in zip(sources, budgets, found):
        tokens, lp = reference_greedy(s, b, opts)
        assert h is not None and h.tokens == tokens
        assert h.log_prob == pytest.approx(lp, abs=1e-5)
        ended = len(tokens) < b
        assert h.score == pytest.approx(normalised_score(lp, len(tokens) + ended, opts.length_penalty))
        assert len(h.tokens) >= min(min_length, b)


@pytest.mark.parametrize("min_length, budget, prefix", [(0, 9, []), (4, 9, []), (0, 0, []), (0, 2, []),
                                                       (2, 9, [5, 6]), (0, 9, [EOS])])
def test_one_row_greedy_equals_the_batched_loop(min_length, budget, prefix):
    """One row takes the scalar loop (greedy_one): the same tokens and float32 sums as that row
    decoded beside another one, for budgets, min_length and forced prefixes."""
    opts = DecodeOptions(min_length=min_length, return_scores=True)
    for source in range(8):
        alone = greedy_search(FakeCache([source]), [budget], opts, BOS, EOS, lambda i: False,
                              prefixes=[prefix])[0]
        batched = greedy_search(FakeCache([source, 99]), [budget, 9], opts, BOS, EOS, lambda i: False,
                                prefixes=[prefix, []])[0]
        assert alone == batched
    stopped = [greedy_search(FakeCache(srcs), [budget] * len(srcs), opts, BOS, EOS, lambda i: True,
                             prefixes=[prefix] * len(srcs))[0] for srcs in ([1], [1, 2])]
    assert stopped[0] == stopped[1] and (stopped[0] is None) == (budget > 0)  # a row with no budget is done


@pytest.mark.parametrize("rows", [1, 5])
def test_greedy_without_scores_asks_for_none_and_reports_none(rows):
    """Greedy without return_scores tells the cache it needs no scores (the slot decoder's greedy head
    then returns logits): the same tokens, and NaN scores rather than sums of whatever came back."""
    sources, budgets = list(range(rows)), [9] * rows
    scored, plain = FakeCache(sources), FakeCache(sources)
    want = greedy_search(scored, budgets, DecodeOptions(min_length=3, return_scores=True), BOS, EOS,
                         lambda i: False)
    got = greedy_search(plain, budgets, DecodeOptions(min_length=3), BOS, EOS, lambda i: False)
    assert all(scored.scored) and not any(plain.scored)
    for g, w in zip(got, want):
        assert g is not None and w is not None and g.tokens == w.tokens
        assert math.isnan(g.score) and math.isnan(g.log_prob) and not math.isnan(w.score)


def test_greedy_compaction_drops_finished_rows():
    cache = FakeCache(list(range(16)))
    greedy_search(cache, [2 + i for i in range(16)], DecodeOptions(), BOS, EOS, lambda i: False)
    assert cache.steps[-1] < cache.steps[0]


def test_a_stopped_row_gets_none_and_the_others_are_unchanged():
    sources, budgets = list(range(6)), [12] * 6
    stopped = {2}
    found = greedy_search(FakeCache(sources), budgets, DecodeOptions(), BOS, EOS, lambda i: i in stopped)
    assert found[2] is None
    for i in (0, 1, 3, 4, 5):
        assert found[i] is not None and found[i].tokens == reference_greedy(i, 12, DecodeOptions())[0]


@pytest.mark.parametrize("compaction", [True, False])
def test_beam_of_one_source_is_batch_invariant_and_ranked(compaction):
    opts = DecodeOptions(beam_size=4, n_best=3, min_length=1)
    alone = [beam_search(FakeCache([s]), [10], opts, BOS, EOS, V, lambda i: False, compaction)[0]
             for s in range(8)]
    cache = FakeCache(list(range(8)))
    together = beam_search(cache, [10] * 8, opts, BOS, EOS, V, lambda i: False, compaction)
    # A source's 4 beams share one cross-attention row whenever every source has its 4 rows.
    assert cache.groups[0] == 4 and (4 in cache.groups[1:] if compaction else set(cache.groups) == {4})
    for a, t in zip(alone, together):
        assert a is not None and t is not None
        assert [h.tokens for h in a] == [h.tokens for h in t]
        assert len(t) == 3 and [h.score for h in t] == sorted((h.score for h in t), reverse=True)
        assert all(len(h.tokens) >= 1 and EOS not in h.tokens for h in t)


@pytest.mark.parametrize("banned", [False, True])
def test_candidates_of_many_sources_rank_as_one_sort_each(banned):
    """Rows' top-k with tied values (ids ascending among ties, as ONNX TopK gives them) and EOS in some
    rows: every source's 2k best are those of sorting its (-sum, row, token) tuples."""
    rng = np.random.default_rng(int(banned))
    S, n, k = 5, 3, 3
    K = 2 * k + banned
    rows = []
    for _ in range(S * n):
        vals = np.round(rng.normal(size=V) * 2) / 2  # half steps: many ties
        order = sorted(range(V), key=lambda t: (-vals[t], t))[:K]
        rows.append((vals[order], order))
    values = np.array([v for v, _ in rows], dtype=np.float32)  # (S*n, K)
    ids = np.array([t for _, t in rows], dtype=np.int64)
    live_lp = (np.round(rng.normal(size=S * n) * 2) / 2).astype(np.float32)
    for s, (sums, parents, tokens) in enumerate(candidates(values, ids, live_lp, n, k, EOS, banned)):
        entries = []
        for row in range(n):
            r = s * n + row
            pairs = [(np.float32(live_lp[r] + v), int(t)) for v, t in zip(values[r], ids[r])
                     if not (banned and t == EOS)][:2 * k]
            entries += [(-float(c), row, t) for c, t in pairs]
        want = sorted(entries)[:2 * k]
        assert list(zip([-c for c in sums], parents, tokens)) == want


def test_beam_finds_at_least_the_greedy_score():
    opts = DecodeOptions(beam_size=5, length_penalty=0.0)
    beams = beam_search(FakeCache(list(range(10))), [9] * 10, opts, BOS, EOS, V, lambda i: False)
    greedy = greedy_search(FakeCache(list(range(10))), [9] * 10, opts, BOS, EOS, lambda i: False)
    for b, g in zip(beams, greedy):
        assert b is not None and g is not None
        assert b[0].score >= g.score - 1e-5


def test_compaction_fills_gaps_with_the_last_rows():
    """Finished rows' places go to the last live rows; the rows before stay (a slot cache copies
    only rows that move)."""
    live = np.array([1, 0, 1, 1, 0, 1, 1], dtype=bool)
    assert fill_gaps(live).tolist() == [0, 5, 2, 3, 6]
    assert fill_gaps(np.array([0, 0, 1], dtype=bool)).tolist() == [2]
    assert fill_gaps(np.array([1, 1, 0], dtype=bool)).tolist() == [0, 1]
    keep = fill_gaps(np.array([0, 1, 1, 0, 1, 1, 1, 0], dtype=bool))
    assert sorted(keep.tolist()) == [1, 2, 4, 5, 6] and int((keep != np.arange(len(keep))).sum()) == 2


def test_fill_gaps_is_place_for_one_row_groups():
    rng = np.random.default_rng(0)
    for _ in range(500):
        live = rng.random(int(rng.integers(1, 40))) < 0.7
        if not live.any():
            continue
        rows = np.flatnonzero(live)
        index = np.empty(len(rows), dtype=np.int64)
        index[place(rows.tolist(), [1] * len(rows))] = rows  # new row place(...)[i] holds old row rows[i]
        assert fill_gaps(live).tolist() == index.tolist()
