"""Forced target prefixes: the engine (static and continuous paths) against the PyTorch reference decoders.

Prefixes are the first tokens of the German references, so they differ from what the tiny model would
produce on its own and the forced steps change the rest of the output.
"""

from __future__ import annotations

import math

import pytest
from conftest import read_lines

from nmt.decoding import DecodeOptions, InvalidRequest, StopSignal
from serve.engine.continuous import ContinuousScheduler
from serve.engine.search import scored

TOL = 1e-3
GREEDY, BEAM = DecodeOptions(), DecodeOptions(beam_size=3, n_best=2, min_length=6)
SCORED = DecodeOptions(min_length=4, return_scores=True)


@pytest.fixture(scope="module")
def cases(translator) -> list[tuple[list[int], list[int]]]:
    """(source ids, prefix ids) pairs; prefixes of 0 to 4 tokens of the reference translation."""
    src = translator.tokenize(read_lines("val", "en", 10))
    refs = [translator.tokenizer.encode(t) for t in read_lines("val", "de", 10)]
    return [(s, r[:i % 5]) for i, (s, r) in enumerate(zip(src, refs))]


def assert_same(got, want, opts: DecodeOptions) -> None:
    """The reference's tokens, and its scores where the engine computes them (greedy: on request)."""
    assert [h.tokens for h in got] == [h.tokens for h in want]
    for g, w in zip(got, want):
        if not scored(opts):
            assert math.isnan(g.score) and math.isnan(g.log_prob)
            continue
        assert g.score == pytest.approx(w.score, abs=TOL)
        assert g.log_prob == pytest.approx(w.log_prob, abs=TOL)


def reference_decode(reference, source, prefix, opts):
    from train.decode import beam_search, greedy_decode

    if opts.beam_size == 1:
        return [greedy_decode(reference, source, opts, prefix)]
    return beam_search(reference, source, opts, prefix)


@pytest.mark.parametrize("opts", [GREEDY, SCORED, BEAM], ids=["greedy", "greedy-scores", "beam"])
def test_static_engine_with_prefix_equals_reference(translator, reference, cases, opts):
    sources, prefixes = [s for s, _ in cases], [p for _, p in cases]
    got = translator.translate_ids(sources, opts, prefixes=prefixes)
    changed = 0
    for (src, prefix), hyps in zip(cases, got):
        assert hyps is not None and hyps[0].tokens[:len(prefix)] == prefix
        assert_same(hyps, reference_decode(reference, src, prefix, opts), opts)
        changed += bool(prefix) and hyps[0].tokens != translator.translate_ids([src], opts)[0][0].tokens
        alone = translator.translate_ids([src], opts, prefixes=[prefix])[0]  # batch 1 too
        assert_same(alone, reference_decode(reference, src, prefix, opts), opts)
    assert changed >= 3  # the prefixes really steer the output


@pytest.mark.parametrize("opts", [GREEDY, SCORED, BEAM], ids=["greedy", "greedy-scores", "beam"])
def test_continuous_rows_of_different_ages_with_prefixes_equal_reference(translator, reference, cases, opts):
    """One text joins every other step, so forced and searched steps share the running batch."""
    loop = ContinuousScheduler(translator, thread=False)
    futures = []
    for src, prefix in cases:
        futures.append(loop.submit([src], opts, StopSignal(), prefixes=[prefix]))
        loop.step_once()
        loop.step_once()
    for _ in range(1000):
        if all(f.done() for f in futures):
            break
        loop.step_once()
    for (src, prefix), future in zip(cases, futures):
        assert_same(future.result()[0], reference_decode(reference, src, prefix, opts), opts)


def test_prefix_filling_the_whole_budget_is_the_output(translator, reference, cases):
    src, _ = cases[1]
    opts = DecodeOptions(max_length_a=0, max_length_b=3, return_scores=True)
    prefix = translator.tokenizer.encode("Ein Hund rennt")[:3]
    for o in (opts, DecodeOptions(beam_size=2, max_length_a=0, max_length_b=3)):
        got = translator.translate_ids([src], o, prefixes=[prefix])[0]
        assert got[0].tokens == prefix and got[0].log_prob == 0
        assert_same(got[:1], reference_decode(reference, src, prefix, o)[:1], o)


@pytest.mark.parametrize("prefix, message", [
    ([5] * 40, r"target_prefix 0 is 40 tokens long, longer than the 14 tokens this text may produce"),
    ([5, 3], r"target_prefix 0 has token ids outside the target vocabulary \[4, \d+\).*: \[3\]"),
    ([10 ** 6], r"outside the target vocabulary .*\[1000000\]"),
])
def test_bad_prefix_is_invalid_request(translator, prefix, message):
    src = [[7, 8, 3]]  # 3 ids: a budget of int(1.5 * 3 + 10) = 14 tokens
    assert translator.budget(3, GREEDY) == 14
    with pytest.raises(InvalidRequest, match=message):
        translator.translate_ids(src, GREEDY, prefixes=[prefix])
    loop = ContinuousScheduler(translator, thread=False)
    with pytest.raises(InvalidRequest, match=message):
        loop.submit(src, GREEDY, StopSignal(), prefixes=[prefix])
