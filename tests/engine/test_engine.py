"""The ONNX Runtime engine against the PyTorch reference decoders, on a tiny model trained on Multi30k.

Tokens must match exactly; scores agree to float32 rounding (ORT and PyTorch sum in different orders).
"""

from __future__ import annotations

import json
import math
import shutil
import threading
import time
from pathlib import Path

import pytest
from conftest import read_lines

from nmt.bundle import MANIFEST_FILE, TOKENIZER_FILE, BundleError
from nmt.decoding import Cancelled, DecodeOptions, Hypothesis, InvalidRequest, StopSignal
from serve.engine.packing import pack_by_tokens
from serve.engine.runtime import DeviceError, cuda_driver_present
from serve.engine.translator import EngineConfig, Translator

TOL = 1e-3  # float32 log-prob sums over up to ~40 steps


@pytest.fixture(scope="module")
def sources(translator) -> list[list[int]]:
    return translator.tokenize(read_lines("val", "en", 30))


def assert_same(got: list[Hypothesis], want: list[Hypothesis], scores: bool = True) -> None:
    """The same tokens; the same scores, or (scores False: greedy without return_scores) none (NaN)."""
    assert [h.tokens for h in got] == [h.tokens for h in want]
    for g, w in zip(got, want):
        if not scores:
            assert math.isnan(g.score) and math.isnan(g.log_prob)
            continue
        assert g.score == pytest.approx(w.score, abs=TOL)
        assert g.log_prob == pytest.approx(w.log_prob, abs=TOL)


def test_load_reports_bundle_and_provider(translator, tiny_bundle):
    manifest = json.loads((tiny_bundle / MANIFEST_FILE).read_text())
    assert translator.provider == "CPUExecutionProvider" and translator.device == "cpu"
    assert (translator.name, translator.src_lang, translator.tgt_lang) == (manifest["name"], "en", "de")
    assert translator.max_source_tokens == manifest["model"]["max_positions"]
    assert translator.steps > 0  # the warm-up ran


# min_length 15 is longer than several of the plain outputs, so the EOS ban changes results. Without
# return_scores the slot decoder's steps take the greedy head (serve.engine.native), with it the full
# projection and log-softmax: the same tokens either way.
@pytest.mark.parametrize("opts", [
    DecodeOptions(), DecodeOptions(min_length=15, length_penalty=0.6),
    DecodeOptions(return_scores=True), DecodeOptions(min_length=15, length_penalty=0.6, return_scores=True),
], ids=["plain", "min_length", "plain-scores", "min_length-scores"])
def test_greedy_equals_uncached_pytorch_greedy(translator, reference, sources, opts):
    from train.decode import greedy_decode

    got = translator.translate_ids(sources, opts)  # batched, sorted and packed
    for src, hyps in zip(sources, got):
        assert_same(hyps, [greedy_decode(reference, src, opts)], opts.return_scores)
    assert all(len(h[0].tokens) >= opts.min_length for h in got)


@pytest.mark.parametrize("opts", [
    DecodeOptions(beam_size=4, n_best=4),
    DecodeOptions(beam_size=3, n_best=3, length_penalty=0.0, min_length=4, max_length_a=0.5, max_length_b=3),
], ids=["beam4", "short_budget"])
def test_beam_equals_reference_beam_with_nbest_order(translator, reference, sources, opts):
    from train.decode import beam_search

    subset = sources[:12]
    got = translator.translate_ids(subset, opts)
    for src, hyps in zip(subset, got):
        assert_same(hyps, beam_search(reference, src, opts))
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
    for src in subset[:4]:  # one source at a time: the same hypotheses
        assert_same(translator.translate_ids([src], opts)[0], beam_search(reference, src, opts))


@pytest.mark.parametrize("opts", [DecodeOptions(), DecodeOptions(beam_size=4, n_best=2)],
                         ids=["greedy", "beam"])
def test_sentence_alone_equals_sentence_in_a_batch(translator, sources, opts):
    by_len = sorted(sources, key=len)
    middle = by_len[len(by_len) // 2]
    batch = [by_len[-1], middle, by_len[0], by_len[-2], by_len[1]]  # longer and shorter around it
    alone = translator.translate_ids([middle], opts)[0]
    inside = translator.translate_ids(batch, opts, max_batch_tokens=100_000)[1]
    assert [h.tokens for h in alone] == [h.tokens for h in inside]
    assert [h.score for h in alone] == pytest.approx([h.score for h in inside], abs=1e-5, nan_ok=True)


def test_results_come_back_in_input_order_across_batches(translator, sources):
    texts = read_lines("val", "en", 10)
    one_by_one = [translator.translate([t])[0].text for t in texts]
    assert [r.text for r in translator.translate(texts)] == one_by_one
    # A budget this small packs a few sentences per batch, sorted by length: order must be restored.
    small = translator.translate_ids(sources[:10], max_batch_tokens=60)
    assert [h[0].text for h in small] == one_by_one
    assert [r.source_tokens for r in translator.translate(texts[:3])] == [len(s) for s in sources[:3]]


@pytest.mark.parametrize("opts", [DecodeOptions(), DecodeOptions(beam_size=3, n_best=3)],
                         ids=["greedy", "beam"])
def test_compaction_on_and_off_give_identical_outputs(tiny_bundle, translator, sources, opts):
    rows_seen: list[int] = []
    runtime_start = translator.runtime.start

    # the real cache, counting each step's rows
    def spying_start(src, mask, alignments=False, capacity=None, single=False):
        cache = runtime_start(src, mask, alignments, capacity, single)
        step = cache.step
        def counted(tokens, k, scores=True):
            rows_seen.append(len(tokens))
            return step(tokens, k, scores)

        cache.step = counted
        return cache

    translator.runtime.start = spying_start
    try:
        with_compaction = translator.translate_ids(sources, opts, max_batch_tokens=100_000)
    finally:
        del translator.runtime.start
    assert rows_seen[-1] < max(rows_seen)  # rows that finished left the running batch
    plain = Translator.from_bundle(tiny_bundle, EngineConfig(device="cpu", intra_op_threads=1,
                                                             compaction=False, warmup=False))
    without = plain.translate_ids(sources, opts, max_batch_tokens=100_000)
    for a, b in zip(with_compaction, without):
        assert [h.tokens for h in a] == [h.tokens for h in b]
        assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=1e-5, nan_ok=True)


LONG = DecodeOptions(min_length=100, max_length_a=0, max_length_b=120)  # forces ~100 steps


class Watched(StopSignal):
    """A real stop signal that also tells the test when the engine has run `after` more steps."""

    def __init__(self, translator: Translator, after: int):
        super().__init__()
        self.translator, self.at, self.reached = translator, translator.steps + after, threading.Event()

    def stopped(self, now: float) -> bool:
        if self.translator.steps >= self.at:
            self.reached.set()
        return super().stopped(now)


def test_stop_signal_set_from_another_thread_stops_within_one_step(translator, sources):
    stop = Watched(translator, 20)
    outcome: list[BaseException] = []

    def work() -> None:
        try:
            opts = DecodeOptions(beam_size=4, min_length=100, max_length_a=0, max_length_b=120)
            translator.translate(read_lines("val", "en", 8), opts, stop)
        except BaseException as e:  # noqa: B036 - the test inspects what the worker raised
            outcome.append(e)

    worker = threading.Thread(target=work)
    worker.start()
    assert stop.reached.wait(timeout=30)  # 20 steps in, at least 80 to go
    stop.set()
    steps_at_stop = translator.steps
    worker.join(timeout=30)
    assert len(outcome) == 1 and isinstance(outcome[0], Cancelled)
    assert translator.steps <= steps_at_stop + 1  # at most the step already in flight


def test_expired_deadline_costs_no_decoder_step(translator):
    before = translator.steps
    with pytest.raises(Cancelled):
        translator.translate(["Two dogs play."], stop=StopSignal(deadline=time.monotonic() - 1))
    assert translator.steps == before


class StopAfter(StopSignal):
    """A stop signal that turns on once the engine has run a given number of steps."""

    def __init__(self, translator: Translator, steps: int):
        super().__init__()
        self.translator, self.at = translator, translator.steps + steps
        self.seen_at: int | None = None

    def stopped(self, now: float) -> bool:
        if self.seen_at is None and self.translator.steps >= self.at:
            self.seen_at = self.translator.steps
        return self.seen_at is not None


@pytest.mark.parametrize("opts", [LONG, DecodeOptions(beam_size=3, min_length=40, max_length_b=60)],
                         ids=["greedy", "beam"])
def test_per_row_stop_drops_only_that_row(translator, sources, opts):
    rows = sources[:3]
    expected = translator.translate_ids(rows, opts, max_batch_tokens=100_000)
    stop = StopAfter(translator, 5)
    got = translator.translate_ids(rows, opts, [None, stop, None], max_batch_tokens=100_000)
    assert got[1] is None and stop.seen_at is not None
    for i in (0, 2):
        assert [h.tokens for h in got[i]] == [h.tokens for h in expected[i]]


def test_too_long_or_bad_input_is_invalid_request_naming_the_index(translator):
    long_text = "a dog " * translator.max_source_tokens
    with pytest.raises(InvalidRequest, match=r"text 1 .*at most 128"):
        translator.translate(["A cat.", long_text])
    with pytest.raises(InvalidRequest, match="source 0 is empty"):
        translator.translate_ids([[]])
    with pytest.raises(InvalidRequest, match="source 1 has token ids outside"):
        translator.translate_ids([[5, 3], [10**6, 3]])
    with pytest.raises(InvalidRequest, match="beam_size"):
        translator.translate(["A cat."], DecodeOptions(beam_size=0))


def copy_bundle(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_bundle_errors_are_clear(tiny_bundle, tmp_path):
    tampered = copy_bundle(tiny_bundle, tmp_path / "tampered")
    with open(tampered / "decoder.onnx", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(BundleError, match="decoder.onnx checksum mismatch"):
        Translator.from_bundle(tampered)

    missing = copy_bundle(tiny_bundle, tmp_path / "missing")
    (missing / TOKENIZER_FILE).unlink()
    with pytest.raises(BundleError, match=f"{TOKENIZER_FILE} missing"):
        Translator.from_bundle(missing)

    future = copy_bundle(tiny_bundle, tmp_path / "future")
    manifest = json.loads((future / MANIFEST_FILE).read_text())
    manifest["format_version"] = 99
    (future / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="format_version 99 is not supported"):
        Translator.from_bundle(future)

    with pytest.raises(BundleError, match="not a model bundle"):
        Translator.from_bundle(tmp_path)


def test_device_choice(tiny_bundle):
    with pytest.raises(DeviceError, match="invalid device 'tpu'"):
        Translator.from_bundle(tiny_bundle, EngineConfig(device="tpu", warmup=False))
    if not cuda_driver_present():
        with pytest.raises(DeviceError, match="could not start CUDA"):
            Translator.from_bundle(tiny_bundle, EngineConfig(device="cuda", warmup=False))
        auto = Translator.from_bundle(tiny_bundle, EngineConfig(warmup=False))
        assert auto.provider == "CPUExecutionProvider"


def test_int8_bundle_translates_close_to_fp32(tiny_bundle_int8, translator):
    int8 = Translator.from_bundle(tiny_bundle_int8, EngineConfig(device="cpu", intra_op_threads=1))
    texts = read_lines("val", "en", 30)
    got = int8.translate(texts, DecodeOptions(beam_size=2, n_best=2))
    assert all(r.text and len(r.hypotheses) == 2 for r in got)
    fp32 = translator.translate(texts, DecodeOptions(beam_size=2, n_best=2))
    assert sum(a.text == b.text for a, b in zip(got, fp32)) >= len(texts) // 3


def test_pack_by_tokens_respects_the_budget_and_sorts_by_length():
    lengths = [5, 40, 3, 12, 12, 7, 90, 1]
    batches = pack_by_tokens(lengths, max_tokens=48, rows_per_source=2)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(lengths)
    for b in batches:
        assert len(b) == 1 or len(b) * 2 * max(lengths[i] for i in b) <= 48
    assert batches[-1] == [6]  # over the budget alone: a batch of its own
    assert pack_by_tokens(lengths, 10**6, max_sources=3)[0] == [7, 2, 0]
