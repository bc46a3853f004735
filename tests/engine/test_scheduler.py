"""The batch scheduler against a fake translator: batching, budgets, queue bounds, stops, failures.

No model and no ONNX Runtime: the fake answers each source with tokens derived from it, so every
result can be checked exactly, and it records the batches the scheduler formed.
"""

from __future__ import annotations

import threading
import time

import pytest

from nmt.decoding import Cancelled, DeadlineExceeded, DecodeOptions, Hypothesis, StopSignal
from serve.engine.packing import batch_cost
from serve.engine.scheduler import BatchScheduler, QueueFull

GREEDY = DecodeOptions()


class FakeTranslator:
    name = "fake"

    def __init__(self, delay: float = 0.0, fail_on: int | None = None):
        self.batches: list[tuple[list[list[int]], DecodeOptions]] = []
        self.delay, self.fail_on = delay, fail_on
        self.release = threading.Event()
        self.release.set()

    def translate_ids(self, sources, options=GREEDY, stops=None, max_batch_tokens=None):
        self.batches.append(([list(s) for s in sources], options))
        self.release.wait(5)
        time.sleep(self.delay)
        if self.fail_on is not None and any(self.fail_on in s for s in sources):
            raise ValueError(f"source contains {self.fail_on}")
        out: list[list[Hypothesis] | None] = []
        for s, stop in zip(sources, stops or [None] * len(sources)):
            if stop is not None and stop.stopped(time.monotonic()):
                out.append(None)
                continue
            tokens = [t * 10 + options.beam_size for t in s]
            out.append([Hypothesis(text=" ".join(map(str, tokens)), tokens=tokens, score=0.0, log_prob=0.0)])
        return out


def expected(source: list[int], options: DecodeOptions = GREEDY) -> list[int]:
    return [t * 10 + options.beam_size for t in source]


def test_concurrent_requests_share_batches_and_each_gets_its_own_results():
    fake = FakeTranslator()
    fake.release.clear()  # hold the first batch so the others queue up behind it
    sched = BatchScheduler(fake, max_batch_tokens=10_000, max_delay=0.05, always_wait=True)
    requests = [[[i, i + 1], [i + 2]] for i in range(1, 9)]
    futures = [sched.submit(r, DecodeOptions(), StopSignal()) for r in requests]
    fake.release.set()
    for r, f in zip(requests, futures):
        assert [h[0].tokens for h in f.result(5)] == [expected(s) for s in r]
    assert len(fake.batches) < len(requests)  # some requests ran together
    sched.close(5)


def test_rows_with_other_options_never_share_a_batch():
    fake = FakeTranslator()
    fake.release.clear()
    sched = BatchScheduler(fake, max_batch_tokens=10_000, max_delay=0.05, always_wait=True)
    greedy, beam = DecodeOptions(), DecodeOptions(beam_size=2)
    fs = [sched.submit([[i]], greedy if i % 2 else beam, StopSignal()) for i in range(1, 7)]
    fake.release.set()
    for i, f in enumerate(fs, start=1):
        assert f.result(5)[0][0].tokens == expected([i], greedy if i % 2 else beam)
    for sources, options in fake.batches:  # every row of a batch was submitted with the batch's options
        assert {1 if s[0] % 2 else 2 for s in sources} == {options.beam_size}
    assert {o.beam_size for _, o in fake.batches} == {1, 2}
    sched.close(5)


def test_every_batch_respects_the_padded_token_budget():
    fake = FakeTranslator()
    fake.release.clear()
    budget = 24
    sched = BatchScheduler(fake, max_batch_tokens=budget, max_delay=0.05, always_wait=True)
    options = DecodeOptions(beam_size=2)
    lengths = [3, 5, 2, 6, 1, 4, 2, 3]
    fs = [sched.submit([list(range(1, n + 1))], options, StopSignal()) for n in lengths]
    fake.release.set()
    for n, f in zip(lengths, fs):
        assert f.result(5)[0][0].tokens == expected(list(range(1, n + 1)), options)
    for sources, o in fake.batches:
        if len(sources) > 1:  # one source over the budget still runs alone
            assert batch_cost(len(sources), max(map(len, sources)), o.beam_size) <= budget
    sched.close(5)


def test_a_full_queue_refuses_at_once():
    fake = FakeTranslator()
    fake.release.clear()
    sched = BatchScheduler(fake, max_batch_tokens=10_000, max_queue=3, max_delay=0.0)
    first: list = []
    blocker = threading.Thread(target=lambda: first.append(sched.submit([[1]], GREEDY, StopSignal())))
    blocker.start()  # a lone request runs inline on its thread, held inside the fake
    while not fake.batches:
        time.sleep(0.01)
    held = sched.submit([[2], [3]], DecodeOptions(), StopSignal())  # queued behind it
    assert sched.queued == 2
    with pytest.raises(QueueFull, match="full"):
        sched.submit([[4], [5]], DecodeOptions(), StopSignal())
    with pytest.raises(QueueFull, match="exceed the queue"):
        sched.submit([[i] for i in range(4)], DecodeOptions(), StopSignal())
    fake.release.set()
    blocker.join(5)
    assert first[0].result(5)[0][0].tokens == expected([1])
    assert [h[0].tokens for h in held.result(5)] == [expected([2]), expected([3])]
    sched.close(5)


def test_queued_rows_of_a_stopped_request_fail_with_the_right_reason():
    fake = FakeTranslator()
    fake.release.clear()
    sched = BatchScheduler(fake, max_batch_tokens=10_000, max_delay=0.0)
    blocker = threading.Thread(target=lambda: sched.submit([[1]], DecodeOptions(), StopSignal()))
    blocker.start()  # occupies the model (inline), so the next ones queue
    time.sleep(0.1)
    cancelled, expired, alive = StopSignal(), StopSignal(deadline=time.monotonic() + 0.05), StopSignal()
    f_cancel = sched.submit([[2]], DecodeOptions(), cancelled)
    f_expire = sched.submit([[3]], DecodeOptions(), expired)
    f_alive = sched.submit([[4]], DecodeOptions(), alive)
    cancelled.set()
    time.sleep(0.1)
    fake.release.set()
    with pytest.raises(Cancelled) as e:
        f_cancel.result(5)
    assert not isinstance(e.value, DeadlineExceeded)
    with pytest.raises(DeadlineExceeded):
        f_expire.result(5)
    assert f_alive.result(5)[0][0].tokens == expected([4])
    blocker.join(5)
    ran = [s for batch, _ in fake.batches for s in batch]
    assert [2] not in ran and [3] not in ran  # stopped rows never reached the engine
    sched.close(5)


def test_a_failing_batch_fails_only_the_request_that_caused_it():
    fake = FakeTranslator(fail_on=99)
    fake.release.clear()
    sched = BatchScheduler(fake, max_batch_tokens=10_000, max_delay=0.05, always_wait=True)
    good = sched.submit([[1], [2]], DecodeOptions(), StopSignal())
    bad = sched.submit([[99]], DecodeOptions(), StopSignal())
    other = sched.submit([[3]], DecodeOptions(), StopSignal())
    fake.release.set()
    with pytest.raises(ValueError, match="99"):
        bad.result(5)
    assert [h[0].tokens for h in good.result(5)] == [expected([1]), expected([2])]
    assert other.result(5)[0][0].tokens == expected([3])
    sched.close(5)


def test_close_finishes_queued_work_then_refuses_new_work():
    fake = FakeTranslator(delay=0.01)
    sched = BatchScheduler(fake, max_batch_tokens=10_000, max_delay=0.0, always_wait=True)
    fs = [sched.submit([[i]], DecodeOptions(), StopSignal()) for i in range(1, 6)]
    sched.close(5)
    assert [f.result(0)[0][0].tokens for f in fs] == [expected([i]) for i in range(1, 6)]
    with pytest.raises(QueueFull, match="shutting down"):
        sched.submit([[1]], DecodeOptions(), StopSignal())
