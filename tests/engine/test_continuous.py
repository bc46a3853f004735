"""Continuous batching on the tiny model: a text's output does not depend on when it joins the running batch.

The loop runs without its thread (`thread=False`) and the test calls `step_once`, so every interleaving
is chosen here (which texts join at which step), not left to timing. Expected outputs come from each
text decoded alone by the static engine path (`Translator.translate_ids`), itself checked against
the PyTorch reference in test_engine.py.
"""

from __future__ import annotations

import random
import threading
import time

import pytest
from conftest import read_lines

from nmt.decoding import Cancelled, DeadlineExceeded, DecodeOptions, InvalidRequest, StopSignal
from serve.engine.continuous import ContinuousScheduler
from serve.engine.translator import Translator

TOL = 1e-3
GREEDY = DecodeOptions()
# Greedy rows with and without scores share steps: a step then computes log-probs for every row.
MIXED = [DecodeOptions(), DecodeOptions(beam_size=4), DecodeOptions(min_length=12, return_scores=True),
         DecodeOptions(beam_size=2, n_best=2, length_penalty=0.6, return_scores=True),
         DecodeOptions(max_length_a=0.5, max_length_b=3), DecodeOptions(beam_size=3, min_length=8)]


@pytest.fixture(scope="module")
def sources(translator) -> list[list[int]]:
    return translator.tokenize(read_lines("test_2016_flickr", "en", 40))


def alone(translator: Translator, source: list[int], options: DecodeOptions):
    return translator.translate_ids([source], options)[0]


def assert_same(got, want) -> None:
    assert [h.tokens for h in got] == [h.tokens for h in want]
    assert [h.text for h in got] == [h.text for h in want]
    for g, w in zip(got, want):  # NaN on both sides: greedy without return_scores
        assert g.score == pytest.approx(w.score, abs=TOL, nan_ok=True)
        assert g.log_prob == pytest.approx(w.log_prob, abs=TOL, nan_ok=True)


def run_until_done(loop: ContinuousScheduler, futures, limit: int = 10_000) -> None:
    for _ in range(limit):
        if all(f.done() for f in futures):
            return
        loop.step_once()
    raise AssertionError("the loop did not finish")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_texts_joining_at_any_step_decode_as_alone(translator, sources, seed):
    """Greedy and beam texts with different options arrive at seeded steps while others decode."""
    rng = random.Random(seed)
    loop = ContinuousScheduler(translator, max_batch_tokens=100_000, thread=False)
    plan = [(rng.randrange(0, 25), i, MIXED[rng.randrange(len(MIXED))]) for i in range(len(sources))]
    plan.sort(key=lambda p: p[0])
    futures, step, rows_seen = [], 0, set()
    while plan or not all(f.done() for _, _, f in futures):
        while plan and plan[0][0] <= step:
            _, i, opts = plan.pop(0)
            futures.append((i, opts, loop.submit([sources[i]], opts, StopSignal())))
        loop.step_once()
        rows_seen.add(loop.running)
        step += 1
        assert step < 5000
    for i, opts, f in futures:
        assert_same(f.result(0)[0], alone(translator, sources[i], opts))
    assert max(rows_seen) > 4  # rows of different ages really shared steps


def test_a_multi_text_request_keeps_its_order_and_matches_the_static_batch(translator, sources):
    loop = ContinuousScheduler(translator, max_batch_tokens=100_000, thread=False)
    opts = DecodeOptions(beam_size=2)
    first = loop.submit(sources[:5], GREEDY, StopSignal())
    for _ in range(3):
        loop.step_once()
    second = loop.submit(sources[5:12], opts, StopSignal())
    run_until_done(loop, [first, second])
    assert loop.running == 0  # the step that answered the last text let the batch go: the loop can wait
    for got, want in zip(first.result(0), translator.translate_ids(sources[:5], GREEDY)):
        assert_same(got, want)
    for got, want in zip(second.result(0), translator.translate_ids(sources[5:12], opts)):
        assert_same(got, want)


def test_alignments_run_in_their_own_lane_and_match(translator, sources):
    loop = ContinuousScheduler(translator, max_batch_tokens=100_000, thread=False)
    with_align = DecodeOptions(return_alignments=True)
    fs = [loop.submit([s], with_align if i % 2 else GREEDY, StopSignal()) for i, s in enumerate(sources[:8])]
    run_until_done(loop, fs)
    for i, (s, f) in enumerate(zip(sources, fs)):
        want = alone(translator, s, with_align if i % 2 else GREEDY)
        assert_same(f.result(0)[0], want)
        assert [h.alignment for h in f.result(0)[0]] == [h.alignment for h in want]


def test_the_budget_admits_oldest_first_and_a_short_text_waits_at_most_for_room(translator, sources):
    longest = max(sources, key=len)
    cost = len(longest) + translator.budget(len(longest), GREEDY)
    loop = ContinuousScheduler(translator, max_batch_tokens=2 * cost, thread=False)
    fs = [loop.submit([longest], GREEDY, StopSignal()) for _ in range(3)]
    loop.step_once()
    assert loop.running == 2 and loop.queued == 1  # the budget holds two such rows
    run_until_done(loop, fs)
    for f in fs:
        assert_same(f.result(0)[0], alone(translator, longest, GREEDY))


def test_a_cancelled_or_expired_text_leaves_within_one_step(translator, sources):
    loop = ContinuousScheduler(translator, max_batch_tokens=100_000, thread=False)
    cancel, expire = StopSignal(), StopSignal(deadline=time.monotonic() + 3600)
    kept = loop.submit([sources[0]], GREEDY, StopSignal())
    dropped = loop.submit([sources[1]], DecodeOptions(beam_size=4), cancel)
    late = loop.submit([sources[2]], GREEDY, expire)
    loop.step_once()
    assert loop.running == 3
    cancel.set()
    expire.deadline = time.monotonic() - 1
    loop.step_once()
    assert loop.running == 1  # both left at the next step boundary
    with pytest.raises(Cancelled) as e:
        dropped.result(0)
    assert not isinstance(e.value, DeadlineExceeded)
    with pytest.raises(DeadlineExceeded):
        late.result(0)
    run_until_done(loop, [kept])
    assert_same(kept.result(0)[0], alone(translator, sources[0], GREEDY))


def test_bad_requests_are_refused_at_submit(translator, sources):
    loop = ContinuousScheduler(translator, max_queue=4, thread=False)
    with pytest.raises(InvalidRequest, match="beam_size"):
        loop.submit([sources[0]], DecodeOptions(beam_size=0), StopSignal())
    with pytest.raises(InvalidRequest, match="accepts at most"):
        loop.submit([[5] * 10_000], GREEDY, StopSignal())
    from serve.engine.scheduler import QueueFull

    with pytest.raises(QueueFull):
        loop.submit(sources[:5], GREEDY, StopSignal())


def test_the_loop_thread_serves_concurrent_requests_and_drains_on_close(translator, sources):
    loop = ContinuousScheduler(translator, max_batch_tokens=4096)
    fs = [(i, loop.submit([sources[i]], MIXED[i % len(MIXED)], StopSignal())) for i in range(16)]
    loop.close(60)
    for i, f in fs:
        assert_same(f.result(0)[0], alone(translator, sources[i], MIXED[i % len(MIXED)]))


@pytest.mark.parametrize("seed", [0, 1])
def test_texts_encoded_ahead_join_at_a_later_step_and_decode_as_alone(translator, sources, seed):
    """Newcomers' sources are encoded on the encoder thread while the batch steps; each joins at the
    first boundary after its encoding ends (here: waited for, or not, at seeded steps)."""
    rng = random.Random(seed)
    loop = ContinuousScheduler(translator, max_batch_tokens=100_000, thread=False, encode_ahead=True)
    lane = loop.lanes[0]
    futures = [(0, GREEDY, loop.submit([sources[0]], GREEDY, StopSignal()))]
    loop.step_once()
    assert loop.running == 1 and not lane.encoding  # nothing to overlap with: encoded inline
    ahead = 0
    for i in range(1, 16):
        opts = MIXED[rng.randrange(len(MIXED))]
        futures.append((i, opts, loop.submit([sources[i]], opts, StopSignal())))
        loop.step_once()
        if lane.encoding:  # taken off the queue, not in the batch yet: the batch stepped without it
            ahead += 1
            assert loop.queued == 0 and all(t.job.future is not futures[-1][2] for t in lane.texts)
            if rng.random() < 0.5:
                lane.encoding[-1][1].result()
        for _ in range(rng.randrange(3)):
            loop.step_once()
    run_until_done(loop, [f for _, _, f in futures])
    assert ahead >= 5
    for i, opts, f in futures:
        assert_same(f.result(0)[0], alone(translator, sources[i], opts))
    loop.close()


def test_a_failed_or_cancelled_encoding_fails_its_request_only(translator, sources, monkeypatch):
    loop = ContinuousScheduler(translator, max_batch_tokens=100_000, thread=False, encode_ahead=True)
    encode = translator.encode

    def failing(batch, alignments=False, capacity=None, single=False):
        if sources[1] in batch:
            raise RuntimeError("encoder broke")
        return encode(batch, alignments, capacity, single)

    monkeypatch.setattr(translator, "encode", failing)
    kept = loop.submit([sources[0]], GREEDY, StopSignal())
    loop.step_once()
    broken = loop.submit([sources[1]], GREEDY, StopSignal())
    loop.step_once()
    assert loop.lanes[0].encoding
    loop.lanes[0].encoding[0][1].exception()
    loop.step_once()
    with pytest.raises(RuntimeError, match="encoder broke"):
        broken.result(0)
    cancel = StopSignal()
    cancelled = loop.submit([sources[2]], DecodeOptions(beam_size=3), cancel)
    loop.step_once()
    assert loop.lanes[0].encoding and loop.running == 1
    cancel.set()  # while its sources are being encoded
    loop.lanes[0].encoding[0][1].result()
    loop.step_once()
    with pytest.raises(Cancelled):
        cancelled.result(0)
    assert loop.running == 1  # the cancelled text joined and left at the same boundary
    run_until_done(loop, [kept])
    assert_same(kept.result(0)[0], alone(translator, sources[0], GREEDY))
    loop.close()


class StepHook:
    """Metrics that record which thread ran each step and call `on_step(n)` after the n-th."""

    def __init__(self, on_step):
        self.on_step, self.threads = on_step, []

    def step_done(self, model, *, rows, seconds, generated):
        self.threads.append(threading.current_thread().name)
        self.on_step(len(self.threads))

    def admitted(self, model, *, texts, tokens, queue_seconds): ...

    def first_step(self, model, seconds): ...

    def set_queue_depth(self, model, texts): ...

    def batch_done(self, model, **kwargs): ...


def test_a_lone_request_decodes_on_its_own_thread_and_hands_the_rest_to_the_loop(translator, sources):
    """On an idle model the caller's thread runs the steps (no hand-off); a text that comes meanwhile
    joins the batch, and when the caller's text is done the loop thread carries it on."""
    short, long_ = min(sources, key=len), max(sources, key=len)
    later: list = []
    hook = StepHook(lambda n: later.append(loop.submit([long_], GREEDY, StopSignal())) if n == 2 else None)
    loop = ContinuousScheduler(translator, max_batch_tokens=100_000, metrics=hook)
    first = loop.submit([short], GREEDY, StopSignal())
    assert first.done()  # decoded before submit returned
    caller = threading.current_thread().name
    assert hook.threads[0] == caller and len(later) == 1
    assert_same(later[0].result(60)[0], alone(translator, long_, GREEDY))
    assert hook.threads[-1] == f"decoder-{translator.name}"  # the loop thread finished the long text
    assert_same(first.result(0)[0], alone(translator, short, GREEDY))
    loop.close(60)
