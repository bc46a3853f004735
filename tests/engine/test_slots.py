"""The slot decoder (a per-row cache written in place) against the concatenating decoder it replaces on CPU.

Both graphs come from the same weights; every decision the search makes must be the same: tokens
exactly, scores to float32 rounding (the two attention kernels sum in different orders).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import read_lines

from nmt import bundle as fmt
from nmt.decoding import DecodeOptions, StopSignal
from serve.engine.continuous import ContinuousScheduler
from serve.engine.runtime import DecoderCache
from serve.engine.search import place
from serve.engine.slots import (
    FIRST_LENGTH,
    HOST_ARGMAX_ROWS,
    SlotCache,
    best_of,
    copy_groups,
    copy_rows,
    length_groups,
    row_parts,
)
from serve.engine.translator import SHARD_ROWS, EngineConfig, Translator, shards


@pytest.fixture(scope="module")
def concat(tiny_bundle) -> Translator:
    config = EngineConfig(device="cpu", intra_op_threads=1, slot_cache=False)
    return Translator.from_bundle(tiny_bundle, config)


@pytest.fixture(scope="module")
def sources(translator) -> list[list[int]]:
    return translator.tokenize(read_lines("test_2016_flickr", "en", 40))


def test_bundle_carries_the_slot_decoder_and_cpu_uses_it(tiny_bundle, translator, concat):
    manifest = json.loads((tiny_bundle / fmt.MANIFEST_FILE).read_text())
    assert fmt.SLOT_CACHE in manifest["optimizations"] and fmt.DECODER_SLOTS_FILE in manifest["files"]
    assert manifest["validation"]["max_abs_diff"]["decoder_slots.log_probs"] < 1e-4  # vs PyTorch
    assert isinstance(translator.encode([[5, 6, 2]]), SlotCache)
    assert isinstance(translator.encode([[5, 6, 2]], alignments=True), DecoderCache)  # the alignment graph
    assert isinstance(concat.encode([[5, 6, 2]]), DecoderCache)


@pytest.mark.parametrize("opts", [
    DecodeOptions(), DecodeOptions(min_length=12), DecodeOptions(beam_size=4, n_best=4),
    DecodeOptions(beam_size=3, n_best=2, length_penalty=0.0, min_length=3),
], ids=["greedy", "min_length", "beam4", "beam3"])
def test_slot_decoder_decides_as_the_concatenating_one(translator, concat, sources, opts):
    got = translator.translate_ids(sources, opts, max_batch_tokens=100_000)  # one batch: compaction, reorders
    want = concat.translate_ids(sources, opts, max_batch_tokens=100_000)
    for g, w in zip(got, want):
        assert [h.tokens for h in g] == [h.tokens for h in w]
        assert [h.score for h in g] == pytest.approx([h.score for h in w], abs=1e-4, nan_ok=True)


def test_rows_longer_than_the_first_capacity_grow_the_buffers(translator, concat, sources):
    """A running batch (no capacity known) starts at FIRST_LENGTH slots and grows; a static batch is
    sized for its longest budget at once. Both decode as the concatenating engine."""
    opts = DecodeOptions(min_length=3 * FIRST_LENGTH, max_length_a=0, max_length_b=3 * FIRST_LENGTH + 5)
    want = concat.translate_ids(sources[:3], opts)
    assert all(len(h[0].tokens) >= 3 * FIRST_LENGTH for h in want)
    loop = ContinuousScheduler(translator, thread=False)
    future = loop.submit(sources[:3], opts, StopSignal())
    while not future.done():
        loop.step_once()
    assert [h[0].tokens for h in future.result()] == [h[0].tokens for h in want]
    assert translator.encode(sources[:3]).kv.shape[3] == FIRST_LENGTH
    static = translator.encode(sources[:3], capacity=(12, 3 * FIRST_LENGTH + 6))
    assert static.kv.shape[1] == 12 and static.kv.shape[3] == 3 * FIRST_LENGTH + 6
    got = translator.translate_ids(sources[:3], opts)
    assert [h[0].tokens for h in got] == [h[0].tokens for h in want]


def test_forced_prefixes_and_joins_in_the_running_batch(translator, concat, sources):
    """Texts joining a running slot batch at several steps, some with forced prefixes, some beam:
    each as the concatenating engine decodes it alone."""
    loop = ContinuousScheduler(translator, thread=False)
    prefixes = [[], sources[1][:2], [], sources[3][:1]]
    futures = []
    for i, src in enumerate(sources[:8]):
        opts = DecodeOptions(beam_size=1 + 2 * (i % 2))
        futures.append((src, opts, i % 4, loop.submit([src], opts, StopSignal(), prefixes=[prefixes[i % 4]])))
        for _ in range(i):
            loop.step_once()
    while not all(f.done() for *_, f in futures):
        loop.step_once()
    for src, opts, p, future in futures:
        alone = concat.translate_ids([src], opts, prefixes=[prefixes[p]])[0]
        assert [h.tokens for h in future.result()[0]] == [h.tokens for h in alone]


def test_keep_copies_only_rows_that_move(translator):
    cache = translator.encode([[5, 6, 7, 2], [8, 2], [9, 10, 2]])
    assert isinstance(cache, SlotCache)
    cache.step(np.array([1, 1, 1]), 1)
    cache.step(np.array([11, 12, 13]), 1)
    before = {n: b[:3, :, :2].copy() for n, b in cache.past.items()}
    cache.keep(np.array([0, 2]))  # the middle row left: row 2 moves to row 1, row 0 stays
    assert cache.rows == 2 and cache.lengths.tolist() == [2, 2]
    for n, b in cache.past.items():
        assert np.array_equal(b[0, :, :2], before[n][0]) and np.array_equal(b[1, :, :2], before[n][2])
    assert np.array_equal(cache.mask[:2], [[True] * 4, [True, True, True, False]])


@pytest.mark.parametrize("most", [2, 6, 50])
def test_rows_of_many_lengths_move_as_one_gather_would(most):
    """A running batch's reorder: rows of different lengths, duplicated, moved onto each other's
    places. Each group is copied up to its own longest row; every filled slot ends as one gather."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(most)
    kv = rng.standard_normal((4, 24, 2, 12, 3)).astype(np.float32)  # (2L, R, H, L, Dh)
    lengths = rng.integers(0, 13, 24)
    for _ in range(5):
        index = rng.integers(0, 24, 20)  # (R',) duplicates, drops, rows that are source and destination
        want = kv[:, index].copy()
        to = np.flatnonzero(index != np.arange(len(index)))  # (moved,) new rows that do not hold row j
        moves = length_groups(to, index[to], lengths[index[to]], most)
        assert len(moves) <= most
        one, split = kv.copy(), kv.copy()
        copy_groups(one, moves, row_axis=1)
        with ThreadPoolExecutor(1) as pool:
            copy_rows(split, moves, pool, 2)
        for got in (one, split):
            for j, n in enumerate(lengths[index]):
                assert np.array_equal(got[:, j, :, :n], want[:, j, :, :n])
        kv, lengths = one, np.concatenate([lengths[index], lengths[20:]])  # rows 20.. stay as they were


def test_a_beam_reorder_copies_no_cross_rows(translator):
    """Rows that stay with their source keep their cross K/V where they are; a row taking another
    source's place gets that source's. The search's row j lives in buffer row perm[j]."""
    cache = translator.encode([[5, 6, 7, 2], [9, 10, 2]])
    assert isinstance(cache, SlotCache)
    cache.step(np.array([1, 1]), 1)
    first = {n: b[0].copy() for n, b in cache.cross.items()}
    cache.keep(np.array([0, 0, 1]))  # source 0 now has two beams: the second gets source 0's cross K/V
    assert sorted(cache.perm.tolist()) == [0, 1, 2] and cache.perm[[0, 2]].tolist() == [0, 1]  # stayed
    for n, b in cache.cross.items():
        assert np.array_equal(b[cache.perm[1]], first[n])
    assert np.array_equal(cache.mask[cache.perm[1]], cache.mask[0])
    for b in cache.cross.values():
        b[:3, 0, 0, 0] = [100.0, 101.0, 102.0]  # marks: a row is rewritten only if a copy lands there
    kv = cache.kv.copy()
    cache.keep(np.array([1, 0, 2]))  # the two beams of source 0 swap: no copy at all
    cache.keep(np.array([2, 1]))  # source 1 first, source 0's second beam after it: still none
    assert all(b[:3, 0, 0, 0].tolist() == [100, 101, 102] for b in cache.cross.values())
    assert np.array_equal(cache.kv, kv)
    assert cache.mask[cache.perm[0]].tolist() == [True, True, True, False]  # source 1's
    assert cache.mask[cache.perm[1]].tolist() == [True] * 4
    cache.keep(np.array([0]))  # source 1 alone: it must be in buffer row 0, so it is copied there
    assert cache.perm.tolist() == [0] and cache.mask[0].tolist() == [True, True, True, False]
    assert all(b[0, 0, 0, 0] == 101.0 for b in cache.cross.values())  # buffer row 1's


def test_a_beam_reorder_keeps_each_parents_first_child_in_place(translator, sources):
    """Beam 4 of two sources (one cross row per source): a parent with several children keeps one in
    its buffer row, the others take the rows of parents without children, inside the same block.
    Every row then decodes as one gather of the old rows would (placement is invisible)."""
    cache = translator.encode(sources[:2])
    assert isinstance(cache, SlotCache)
    cache.step(np.array([1, 1]), 1)
    cache.keep(np.array([0, 0, 0, 0, 1, 1, 1, 1]), group=4)
    reorders = ([0, 0, 1, 2, 4, 5, 6, 7], [1, 1, 3, 0, 7, 7, 7, 7], [2, 2, 2, 2, 4, 5, 6, 7])
    for step, index in enumerate(reorders):
        cache.step(np.arange(8) + 5 + step, 1)
        logical = cache.kv[:, cache.perm].copy()  # (2L, R, H, L, Dh) in the search's order
        src = cache.perm[index]
        cache.keep(np.array(index), group=4)
        assert cache.group == 4 and (cache.perm // 4 == np.arange(8) // 4).all()  # blocks stay blocks
        assert (cache.perm != src).sum() == len(index) - len(set(index))  # one copy per extra child
        n = int(cache.lengths.max())
        assert np.array_equal(cache.kv[:, cache.perm, :, :n], logical[:, index, :, :n])
    concat = cache.step(np.arange(8) + 9, 4)
    assert concat[0].shape == (8, 4)


def test_the_beams_of_one_text_are_gathered_in_order(translator, sources):
    """Batch-1 beam search: a reorder of one text's beams (one cross row) puts every beam in its own
    buffer row, in order, each holding exactly what its parent held."""
    cache = translator.encode(sources[:1])
    assert isinstance(cache, SlotCache)
    cache.step(np.array([1]), 1)
    cache.keep(np.array([0, 0, 0, 0]), group=4)
    for step, index in enumerate(([0, 0, 1, 2], [3, 3, 3, 3], [1, 0, 3, 2])):
        cache.step(np.arange(4) + 5 + step, 1)
        before = cache.kv.copy()
        cache.keep(np.array(index), group=4)
        assert cache.in_order and cache.perm.tolist() == [0, 1, 2, 3] and cache.group == 4
        n = int(cache.lengths.max())
        assert np.array_equal(cache.kv[:, :4, :, :n], before[:, index, :, :n])
    assert cache.step(np.arange(4) + 9, 4)[0].shape == (4, 4)


def test_steps_reuse_one_io_binding_until_the_rows_change(translator, sources):
    cache = translator.encode(sources[:3])
    assert isinstance(cache, SlotCache)
    cache.step(np.array([1, 1, 1]), 2)
    io = cache._io
    cache.keep(np.array([2, 0, 0]))  # a reorder: same rows, same buffers
    values, ids = cache.step(np.array([5, 6, 7]), 2)
    assert cache._io is io and values.shape == ids.shape == (3, 2)
    cache.step(np.array([5, 6, 7]), 4)  # another k: other outputs
    assert cache._io is not io
    io = cache._io
    cache.keep(np.array([0, 1]))
    cache.step(np.array([8, 9]), 1)
    assert cache._io is not io and cache._io.rows == 2
    # the outputs handed back are the caller's: the next step does not overwrite them
    first, _ = cache.step(np.array([8, 9]), 1)
    kept = first.copy()
    cache.step(np.array([10, 11]), 1)
    assert np.array_equal(first, kept)


def test_best_of_orders_as_onnx_topk():
    """Greedy steps of many rows take their k <= 2 best from log_probs on the host: best first, the
    lowest id first among equal values (TopK's order), the second best never the first again."""
    rng = np.random.default_rng(0)
    lp = rng.integers(-4, 0, size=(50, 12)).astype(np.float32)  # few distinct values: many ties
    want = np.argsort(-lp, axis=1, kind="stable")[:, :2]  # (R, 2)
    for k in (1, 2):
        values, ids = best_of(lp.copy(), k)
        assert ids.shape == values.shape == (50, k)
        assert np.array_equal(ids, want[:, :k])
        assert np.array_equal(values, np.take_along_axis(lp, want[:, :k], axis=1))


def test_greedy_rows_on_the_host_argmax_equal_the_graph_top_k(tiny_bundle, sources):
    """The same step of HOST_ARGMAX_ROWS rows or more: host argmax and the graph's TopK agree. (On ONNX
    Runtime's kernels: on serve.engine.native's the graph has no log_probs, its top-k takes every k.)"""
    config = EngineConfig(device="cpu", intra_op_threads=1, native_kernels=False, warmup=False)
    translator = Translator.from_bundle(tiny_bundle, config)
    assert translator.runtime.slot_host_argmax and len(sources) >= HOST_ARGMAX_ROWS
    tokens = np.arange(5, 5 + len(sources))
    for k in (1, 2):
        caches = [translator.encode(sources) for _ in range(2)]
        host = caches[0].step(tokens, k)
        assert caches[0]._io.log_probs is not None  # the host path
        graph = caches[1].step(tokens, 3)  # the graph's TopK
        assert np.array_equal(host[1], graph[1][:, :k])
        assert np.allclose(host[0], graph[0][:, :k], atol=1e-6)


def test_place_keeps_texts_where_they_are_and_fills_gaps():
    # rows 0..5 held six one-row texts; texts at rows 1 and 3 finished: the last two fill the gaps
    assert place([0, 2, 4, 5], [1, 1, 1, 1]) == [0, 2, 1, 3]
    # a beam text growing from 1 to 3 rows stays where it fits; a newcomer takes the gap after it
    assert place([0, 1, None], [1, 3, 2]) == [0, 1, 4]
    # ... and where it does not fit, the one-row text behind it moves out of the way
    assert place([0, 1], [3, 1]) == [0, 3]
    # fragmented gaps for a 2-row text: plain packing in the given order
    assert place([1, 3], [1, 2]) == [0, 1]


def test_a_bundle_without_the_slot_decoder_still_serves(tiny_bundle, tmp_path, concat, sources):
    old = tmp_path / "old"
    shutil.copytree(tiny_bundle, old)
    (old / fmt.DECODER_SLOTS_FILE).unlink()
    manifest = json.loads((old / fmt.MANIFEST_FILE).read_text())
    del manifest["files"][fmt.DECODER_SLOTS_FILE]
    manifest["optimizations"].remove(fmt.SLOT_CACHE)
    (old / fmt.MANIFEST_FILE).write_text(json.dumps(manifest))
    plain = Translator.from_bundle(old, EngineConfig(device="cpu", intra_op_threads=1))
    assert plain.runtime.slot_decoder is None
    assert [h[0].tokens for h in plain.translate_ids(sources[:5])] == [
        h[0].tokens for h in concat.translate_ids(sources[:5])]


def test_row_parts_split_whole_blocks_of_enough_rows():
    assert row_parts(256, 4, 2) == [(0, 128), (128, 256)]
    assert row_parts(12, 4, 2) == [(0, 12)]  # parts of fewer than PART_ROWS rows: one run
    assert row_parts(20, 4, 2) == [(0, 8), (8, 20)]  # five blocks of 4: never a block cut in two
    assert row_parts(30, 1, 3) == [(0, 10), (10, 20), (20, 30)]
    assert row_parts(300, 1, 1) == [(0, 300)]
    assert row_parts(4, 4, 8) == [(0, 4)]


@pytest.mark.parametrize("opts", [DecodeOptions(), DecodeOptions(beam_size=4, n_best=2, min_length=2)],
                         ids=["greedy", "beam4"])
def test_steps_split_into_row_parts_decide_as_one_run(tiny_bundle, translator, sources, opts):
    """Two threads: steps of many rows run as two one-thread parts side by side. Every token and
    score is the one-thread engine's (each row is computed by the same kernels either way)."""
    two = Translator.from_bundle(tiny_bundle, EngineConfig(device="cpu", intra_op_threads=2, shards=False))
    assert two.runtime.slot_parts is not None
    parts_seen = []
    step = SlotCache.step

    def spying(self, tokens, k, scores=True):
        out = step(self, tokens, k, scores)
        parts_seen.append(len(self._io.parts))
        return out

    SlotCache.step = spying
    try:
        got = two.translate_ids(sources, opts, max_batch_tokens=100_000)
    finally:
        SlotCache.step = step
    assert max(parts_seen) == 2 and min(parts_seen) == 1  # split while many rows ran, whole at the end
    want = translator.translate_ids(sources, opts, max_batch_tokens=100_000)
    for g, w in zip(got, want):
        assert [h.tokens for h in g] == [h.tokens for h in w]
        np.testing.assert_array_equal([h.score for h in g], [h.score for h in w])  # NaN: greedy, no scores


def test_shards_take_every_other_source_and_enough_rows():
    assert SHARD_ROWS == 16
    assert shards(64, 4, 2) == [list(range(0, 64, 2)), list(range(1, 64, 2))]
    assert shards(32, 1, 2) == [list(range(0, 32, 2)), list(range(1, 32, 2))]
    assert shards(31, 1, 2) == [list(range(31))]  # 15 rows for one shard: the batch stays whole
    assert shards(12, 4, 3) == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]]
    assert shards(64, 4, 1) == [list(range(64))]
    assert shards(0, 4, 2) == [[]]


@pytest.mark.parametrize("opts", [DecodeOptions(), DecodeOptions(beam_size=4, n_best=2, min_length=2)],
                         ids=["greedy", "beam4"])
def test_a_batch_searched_as_shards_decides_as_one_run(tiny_bundle, translator, sources, opts):
    """Two threads: a big batch runs as two shards side by side, each with its own one-thread cache.
    Every token and score is the one-thread engine's, results come back in input order, and a source
    stopped before it started is None in its shard without touching the others."""
    import threading

    two = Translator.from_bundle(tiny_bundle, EngineConfig(device="cpu", intra_op_threads=2))
    seen = set()
    step = SlotCache.step

    def spying(self, tokens, k, scores=True):
        out = step(self, tokens, k, scores)
        seen.add((self.single, len(self._io.parts), threading.current_thread().name))
        return out

    SlotCache.step = spying
    stops = [None] * len(sources)
    stops[3] = StopSignal()
    stops[3].set()
    try:
        got = two.translate_ids(sources, opts, stops, max_batch_tokens=100_000)
    finally:
        SlotCache.step = step
    assert {single for single, _, _ in seen} == {True} and {parts for _, parts, _ in seen} == {1}
    assert len({thread for _, _, thread in seen}) == 2  # both shards stepped, each on its own thread
    want = translator.translate_ids(sources, opts, max_batch_tokens=100_000)
    assert got[3] is None
    for i, (g, w) in enumerate(zip(got, want)):
        if i != 3:
            assert [h.tokens for h in g] == [h.tokens for h in w], i
            np.testing.assert_array_equal([h.score for h in g], [h.score for h in w], err_msg=str(i))
            assert [h.text for h in g] == [h.text for h in w], i
