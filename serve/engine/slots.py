"""A decoder cache preallocated per row and written in place (the bundle's slot decoder).

DecoderCache (serve.engine.runtime) feeds the past and gets a new, longer present back at every
step: ONNX Runtime copies every row's past into it, every row attends over the oldest row's length
(shorter rows left-padded and masked), and joining or dropping rows copies the whole cache. Here
each layer's self-attention K/V is one buffer (capacity rows, H, capacity length, Dh); row r's
tokens sit in slots 0..lengths[r]-1 and GroupQueryAttention writes the new token's K/V at slot
lengths[r] of the same buffer (past and present are bound to one OrtValue) and attends over that
row's own length only. So a step copies nothing, a row that leaves costs one row's copy (the
continuous loop moves a row from the end into its place), a row that joins copies only its
cross-attention K/V, and a beam reorder copies only the rows that moved, each up to about its length.

Rows are placed, not ordered: the search's row j (a logical row) lives in buffer row perm[j]. A beam
reorder gives every surviving parent's first child the parent's own buffer row, so a parent with
two children costs one copy, not the copies of every beam whose rank changed (about 40% fewer row
copies in beam 4 over Multi30k); step() scatters the tokens and gathers the top-k through perm.

The buffers are host arrays: this is the CPU path (ONNX Runtime's CUDA GroupQueryAttention takes
fp16/bf16 only; CUDA sessions keep DecoderCache and its device-resident reorder graph). Capacity
grows by doubling (rows and length) and is kept while the cache lives. Alignments are not
offered here: texts that want them run on DecoderCache with the alignment graph.
"""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from nmt import bundle as fmt

if TYPE_CHECKING:
    from serve.engine.runtime import Runtime

HOST_ARGMAX_ROWS = 4  # from this many rows greedy steps take their argmax on the host (see step)
HEAD_MAX_K = 2  # greedy asks for 1 best token, 2 below min_length: the steps the greedy head takes
PART_ROWS = 8  # the fewest rows a step is split into parts for (see row_parts)
SHARED = (fmt.TOTAL_SEQUENCE_LENGTH, fmt.TOP_K)  # step inputs every row part binds whole
FIRST_LENGTH = 32  # slots per row at first; doubled when a row needs more (a copy of the filled part)
_sources = itertools.count()  # ids of encoded sources, unique in the process (SlotCache.owner)


def placement(src: np.ndarray, group: int) -> np.ndarray:
    """The buffer row of each new row j whose content is buffer row src[j] (n = len(src) rows, all
    placed in rows 0..n-1): the first new row of each source row stays there when it may (below n;
    group > 1: in its own block of `group` rows, which shares one cross-attention row), the other
    new rows take the rows left free, in order. Each block has as many free rows as rows to place,
    so both sorted lists pair up block by block."""
    n = len(src)
    first = np.unique(src, return_index=True)[1]  # (U,) the first new row holding each source row
    stays = src[first] < n
    if group > 1:
        stays &= src[first] // group == first // group
    first = first[stays]
    rows = np.full(n, -1, dtype=np.int64)  # (n,)
    rows[first] = src[first]
    taken = np.zeros(n, dtype=bool)
    taken[src[first]] = True
    rows[rows < 0] = np.flatnonzero(~taken)
    return rows


def grown(buf: np.ndarray, rows: int, axis_len: int, keep_rows: int, keep_len: int, axis: int,
          row_axis: int = 0) -> np.ndarray:
    """A bigger zeroed buffer (at least `rows` along `row_axis`, `axis_len` along `axis`) holding
    buf's first keep_rows rows and keep_len entries along `axis`."""
    shape = list(buf.shape)
    shape[row_axis], shape[axis] = max(rows, buf.shape[row_axis]), max(axis_len, buf.shape[axis])
    out = np.zeros(shape, buf.dtype)
    part = tuple(slice(0, keep_rows) if a == row_axis else slice(0, keep_len) if a == axis else slice(None)
                 for a in range(buf.ndim))
    out[part] = buf[part]
    return out


Moves = list[tuple[np.ndarray, np.ndarray, int]]  # (new rows, old rows, slots to copy) per group


def length_groups(to: np.ndarray, src: np.ndarray, lengths: np.ndarray, most: int = 6) -> Moves:
    """The moved rows (new `to`, old `src`, `lengths` slots held) in at most `most` groups of similar
    length, each copied up to its own longest. A running batch holds rows of many ages: copying all
    to the longest moved row's length copied 2.6 times the filled slots (beam 4, continuous loop)."""
    distinct = np.unique(lengths)
    if len(distinct) <= most:
        parts = [np.flatnonzero(lengths == n) for n in distinct]
    else:
        parts = np.array_split(np.argsort(lengths, kind="stable"), most)
    return [(to[p], src[p], int(lengths[p].max())) for p in parts if len(p) and lengths[p].max() > 0]


def copy_groups(buf: np.ndarray, moves: Moves, row_axis: int = 0) -> None:
    """buf[to, :, :n] = buf[src, :, :n] for every group of rows along `row_axis` (then heads, slots):
    every group is read before any is written, as one gather would (a row may be a source and a
    destination at once)."""
    lead = (slice(None),) * row_axis
    taken = [buf[lead + (src, slice(None), slice(0, n))] for _, src, n in moves]  # copies
    for (to, _, n), part in zip(moves, taken):
        buf[lead + (to, slice(None), slice(0, n))] = part


def copy_rows(buffers: np.ndarray, moves: Moves, pool: ThreadPoolExecutor | None, threads: int) -> None:
    """copy_groups on every (R, H, L, Dh) buffer buffers[j], the buffers split between this thread
    and the pool's (threads in all; pool None: all here)."""
    def copy(part: list[int]) -> None:
        for j in part:
            copy_groups(buffers[j], moves)  # buffers[j]: a view

    every = list(range(len(buffers)))
    shares = [every[i::threads] for i in range(threads)] if pool else [every]
    futures = [pool.submit(copy, share) for share in shares[1:] if share] if pool else []
    copy(shares[0])
    for future in futures:
        future.result()


def row_parts(rows: int, group: int, threads: int) -> list[tuple[int, int]]:
    """The row ranges [lo, hi) a step runs as, one per thread, each a whole number of `group`-row
    blocks (a block shares one cross-attention row) and at least PART_ROWS rows; one range when
    that leaves a single part.

    Why: ONNX Runtime splits each op of a step over its threads, and most ops of a decoder step are
    small (GEMMs of a few hundred rows, attention per row and head, layer norms): at 2 threads a
    batch-64 beam-4 step ran 1.7x faster than at 1, with LayerNormalization and Add slower than at
    1. The same step as two half-batch runs, each on one thread of a one-thread session, ran 12-20%
    faster than one run on two threads (bench/results/row-parts.md): each op then runs whole on its
    core, and the threads meet once per step instead of once per op. Measured at 2 threads only:
    every part reads all the weights, so with many threads small parts may cost more than they save."""
    blocks = rows // group
    parts = min(threads, rows // PART_ROWS, blocks)
    if parts <= 1:
        return [(0, rows)]
    edges = [group * (blocks * i // parts) for i in range(parts + 1)]
    return list(zip(edges[:-1], edges[1:]))


def best_of(log_probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k <= 2 best tokens of each row of log_probs (R, V): values, ids (R, k), best first and the
    lowest id first among equal values, as ONNX TopK orders them (argmax returns the first maximum)."""
    rows = np.arange(len(log_probs))
    ids = log_probs.argmax(axis=1)  # (R,)
    values = log_probs[rows, ids]  # (R,)
    if k == 1:
        return values[:, None], ids[:, None]
    log_probs[rows, ids] = -np.inf  # the buffer is rewritten by the next step
    second = log_probs.argmax(axis=1)  # (R,)
    return np.stack([values, log_probs[rows, second]], axis=1), np.stack([ids, second], axis=1)


class SlotCache:
    """The running batch's decoder state on the slot decoder; the same interface as DecoderCache."""

    def __init__(self, runtime: Runtime, cross: dict[str, np.ndarray], mask: np.ndarray,
                 keepalive: list[ort.OrtValue], capacity: tuple[int, int] | None = None,
                 single: bool = False):
        rt = self.runtime = runtime
        # single: the cache of one shard of a batch searched as shards side by side (see
        # serve.engine.translator.shards): its steps run whole on the one-thread session and its
        # reorders copy on this thread, the other threads being busy with the other shards.
        # Otherwise steps and copies use all the runtime's threads.
        self.single = single and rt.slot_parts is not None
        self.pool, self.threads = (None, 1) if self.single else (rt.copy_pool, rt.copy_threads)
        self.rows = rows = mask.shape[0]
        self.group = 1  # rows per cross-attention row (a source's beams share one), as DecoderCache
        self.lengths = np.zeros(rows, dtype=np.int64)  # (R,) tokens each buffer row holds
        self.perm = np.arange(rows)  # (R,) the buffer row of each of the search's rows (module doc)
        self.in_order = True  # perm is the identity: step() writes and reads the buffers as they are
        self.alignment_layer: int | None = None  # alignments need DecoderCache (see the module doc)
        self.alignment: np.ndarray | None = None
        self.cross, self.mask = cross, mask  # (Rc, H, S, Dh) per name, (Rc, S): the first cross_rows used
        # (Rc,) which encoded source each cross row holds (-1: none). A gather copies only the rows whose
        # source changes: a beam reorder moves rows inside a text's block, whose cross K/V are all alike.
        self.owner = np.array([next(_sources) for _ in range(mask.shape[0])], dtype=np.int64)
        self._keepalive = keepalive  # the encoder's OrtValues the first cross arrays are views of
        n = runtime.n_layers
        self.self_pairs = [(fmt.present_name(i, "decoder", w), fmt.past_name(i, "decoder", w))
                           for i in range(n) for w in ("key", "value")]
        # Every layer's self-attention K and V in one array, so a reorder is one copy, not 2L.
        # capacity (rows, slots) when known (a static batch: sources x beam, the longest budget):
        # growing copies every row, and a batch-64 beam-4 cache grew twice (64 to 256 rows, 32 to 64).
        cap_rows, cap_len = capacity or (rows, FIRST_LENGTH)
        shape = (2 * n, max(rows, cap_rows), rt.n_heads, max(cap_len, 1), rt.head_dim)  # (2L, R, H, L, Dh)
        self.kv = np.zeros(shape, rt.cache_dtype)
        self.past = self._views()
        # The step's IO binding: kept while the buffers stay (a resize drops it) and the rows and k
        # are the ones it was made for (gathers and joins write into the same buffers).
        self._io: StepBinding | None = None
        self._log_probs: np.ndarray | None = None  # (rows, V) greedy steps' log_probs (SLOT_HOST_ARGMAX)

    @property
    def position(self) -> int:
        """The longest row's length (DecoderCache's `position`: 0 while nothing was fed)."""
        return int(self.lengths.max()) if self.rows else 0

    @property
    def cross_rows(self) -> int:
        return self.rows // self.group

    def step(self, tokens: np.ndarray, k: int, scores: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Feed one token per row (R,) and return the k best next tokens: values, ids (R, k). The values
        are log-probs; without scores, where the runtime has the greedy head (k <= HEAD_MAX_K), logits."""
        if self.alignment_layer is not None:
            raise ValueError("the slot decoder has no alignment output: use the alignment graph's cache")
        R, total = self.rows, self.position + 1
        capacity = self.kv.shape[3]
        if total > capacity:
            self._resize(R, max(total, 2 * capacity))
        # SLOT_HOST_ARGMAX graphs leave top-k to the host for k <= 2; below HOST_ARGMAX_ROWS rows the
        # graph's TopK (asked for 3) costs less than numpy's calls between two runs.
        rt = self.runtime
        head = not scores and rt.slot_head is not None and k <= HEAD_MAX_K
        host = rt.slot_host_argmax and k <= 2 and not head
        graph_k = 3 if host and R < HOST_ARGMAX_ROWS else k
        parts = [(0, R)] if rt.slot_parts is None else row_parts(R, self.group, self.threads)
        io = self._io
        wanted = (graph_k, R, self.cross_rows, parts, head)
        if io is None or (io.k, io.rows, io.cross_rows, io.parts, io.head) != wanted:
            io = self._io = StepBinding(self, graph_k, parts, head)
        if self.in_order:
            io.small[fmt.INPUT_IDS][:, 0] = tokens  # (R, 1)
        else:
            io.small[fmt.INPUT_IDS][self.perm, 0] = tokens  # (R, 1) each token in its row's buffer row
        io.small[fmt.POSITION_IDS][:, 0] = self.lengths  # (R, 1) each row's own position
        io.small[fmt.SEQLENS_K][:] = self.lengths  # (R,) the new token's slot per row
        io.small[fmt.TOTAL_SEQUENCE_LENGTH][0] = total
        io.run(self.pool)
        rt.count_step()
        self.lengths = self.lengths + 1
        if io.log_probs is not None:  # greedy on SLOT_HOST_ARGMAX graphs: the best k <= 2 here
            values, ids = best_of(io.log_probs, k)
        elif self.in_order:  # copies: the buffers are the next step's outputs too
            return io.values[:, :k].copy(), io.ids[:, :k].copy()
        else:
            values, ids = io.values[:, :k], io.ids[:, :k]
        return (values, ids) if self.in_order else (values[self.perm], ids[self.perm])  # (R, k) copies

    def keep(self, rows: np.ndarray, group: int = 1) -> None:
        """New row j = old row rows[j] (beam reorder, duplicates, finished rows dropped): only the rows
        that move are copied (see `placement`), each up to about its own length (`length_groups`)."""
        src = self.perm[rows]  # (R',) the buffer row each new row's content is in
        cross = src // self.group  # (R',) the cross row every new row reads
        new_group = 1
        if group > 1 and self.runtime.grouped_cross and len(src) % group == 0:
            per = cross.reshape(-1, group)  # (R'/g, g)
            if (per == per[:, :1]).all():
                new_group = group
        n = len(src)
        if n > self.kv.shape[1]:
            self._resize(n, 0)
        # The beams of one text (batch-1 beam search): every row in order, one copy up to the longest
        # moved row. placement and length_groups cost about 40 µs of numpy calls a step, 5% of an int8
        # beam-4 step at batch 1, for copies of a few rows that take less.
        one_text = new_group == n
        at = np.arange(n) if one_text else placement(src, new_group)  # (R',) the buffer row of each new row
        to = np.flatnonzero(at != src)
        if one_text:
            longest = int(self.lengths[src[to]].max()) if len(to) else 0
            moves = [(to, src[to], longest)] if longest else []
        else:
            moves = length_groups(at[to], src[to], self.lengths[src[to]]) if len(to) else []
        if moves:
            # A few rows (beam search of one text): one call for every layer, numpy's per-call cost
            # dominates. Many rows: per (R, H, L, Dh) buffer, where numpy's row-first gather copies
            # about 10% faster.
            if len(to) <= 16:
                copy_groups(self.kv, moves, row_axis=1)  # (2L, R, H, L, Dh)
            else:
                copy_rows(self.kv, moves, self.pool, self.threads)
        if new_group > 1:
            self._gather_cross(cross.reshape(-1, new_group)[:, 0])  # blocks stay blocks (`placement`)
        else:
            by_row = np.empty(n, dtype=np.int64)
            by_row[at] = cross  # (R',) the cross row each buffer row reads
            self._gather_cross(by_row)
        lengths = np.empty(n, dtype=np.int64)
        lengths[at] = self.lengths[src]
        self.rows, self.group, self.lengths, self.perm = n, new_group, lengths, at
        self.in_order = bool((at == np.arange(n)).all())

    def _gather_cross(self, index: np.ndarray) -> None:
        """New cross row j = old row index[j]; copies only the rows whose source changes."""
        n = len(index)
        if n > self.mask.shape[0]:
            self._resize_cross(n, self.mask.shape[1])
        wanted = self.owner[index]  # (n,)
        to = np.flatnonzero(wanted != self.owner[:n])
        if len(to):
            for buf in self.cross.values():
                buf[to] = buf[index[to]]  # (moved, H, S, Dh), read before written
            self.mask[to] = self.mask[index[to]]
        self.owner[:n] = wanted

    def join(self, other: SlotCache) -> None:
        """Append `other`'s rows (just encoded, nothing fed yet) after this batch's rows: their
        cross K/V and mask are copied in (padded to the longer source, masked); their self-attention
        slots are simply the next rows' (whatever a row there held is overwritten from slot 0)."""
        if other.position != 0:
            raise ValueError("only rows that have not been fed yet can join a running batch")
        if self.group != 1 or other.group != 1:
            raise ValueError("grouped cross-attention rows cannot join a running batch")
        if self.rows == 0:
            self.__dict__.update(other.__dict__)
            return
        r, extra = self.rows, other.rows
        src = max(self.mask.shape[1], other.mask.shape[1])
        if r + extra > self.mask.shape[0] or src > self.mask.shape[1]:
            self._resize_cross(r + extra, src)
        s = other.mask.shape[1]
        for name, buf in self.cross.items():
            buf[r:r + extra, :, :s] = other.cross[name][:extra]
        self.mask[r:r + extra] = False
        self.mask[r:r + extra, :s] = other.mask[:extra]
        self.owner[r:r + extra] = other.owner[:extra]
        if r + extra > self.kv.shape[1]:
            self._resize(r + extra, 0)
        self.rows += extra
        self.lengths = np.concatenate([self.lengths, other.lengths])
        self.perm = np.concatenate([self.perm, np.arange(r, r + extra)])  # newcomers: the rows after r

    def trim(self) -> int:
        """Nothing to trim: no row is padded to another's length (DecoderCache's interface)."""
        return 0

    def _resize(self, rows: int, length: int) -> None:
        """Self-attention buffers of at least `rows` rows (doubling) and `length` slots."""
        cap = self.kv.shape[1]
        rows = max(rows, 2 * cap) if rows > cap else cap
        filled = self.position
        self.kv = grown(self.kv, rows, length, self.rows, filled, axis=3, row_axis=1)  # (2L, R', H, L', Dh)
        self.past = self._views()
        self._io = None

    def log_probs_buffer(self, rows: int) -> np.ndarray:
        """A (rows, V) view of a buffer kept while the cache lives (grown by doubling)."""
        if self._log_probs is None or self._log_probs.shape[0] < rows:
            have = 0 if self._log_probs is None else self._log_probs.shape[0]
            self._log_probs = np.zeros((max(rows, 2 * have), self.runtime.vocab_size), np.float32)
        return self._log_probs[:rows]

    def _views(self) -> dict[str, np.ndarray]:
        """Each past_key_values.{i}.decoder.* buffer: a contiguous (R, H, L, Dh) view of self.kv."""
        return {past: self.kv[j] for j, (_, past) in enumerate(self.self_pairs)}

    def _resize_cross(self, rows: int, src_len: int) -> None:
        cap = self.mask.shape[0]
        rows = max(rows, 2 * cap) if rows > cap else cap
        used, s = self.cross_rows, self.mask.shape[1]
        self.cross = {n: grown(b, rows, src_len, used, s, axis=2) for n, b in self.cross.items()}
        self.mask = grown(self.mask, rows, src_len, used, s, axis=1)
        self._io = None
        owner = np.full(rows, -1, dtype=np.int64)  # (rows,) rows past the used ones hold nothing yet
        owner[:used] = self.owner[:used]
        self.owner = owner
        self._keepalive = []


class StepBinding:
    """The IO bindings of the slot decoder over a SlotCache's buffers, reused step after step.

    Everything a step reads or writes is bound once: the self-attention buffers (past and present
    are one OrtValue: GroupQueryAttention writes in place), the cross K/V and mask, small input arrays
    a step overwrites in place (OrtValues made from host arrays share their memory on CPU) and the
    top-k outputs. A step then costs one run (per row part): building the feeds and binding every input
    and output anew took about a tenth of a batch-1 step. Made again when the rows, buffers, k or
    parts change.

    parts: row ranges (row_parts); with more than one, part j binds rows lo:hi of every array (all
    are row-major, so each is a view) to the one-thread session and the parts run side by side."""

    def __init__(self, cache: SlotCache, k: int, parts: list[tuple[int, int]], head: bool = False):
        rt = cache.runtime
        whole = len(parts) == 1 and not cache.single
        if head:  # the greedy head (Runtime.slot_head): top-k logits, no log_probs output
            graph = rt.slot_head if whole else rt.slot_head_parts
        else:
            graph = rt.slot_decoder if whole else rt.slot_parts
        assert graph is not None
        R, rc, g = cache.rows, cache.cross_rows, cache.group
        self.rows, self.cross_rows, self.k, self.parts, self.head = R, rc, k, parts, head
        self.session = graph.session
        self.small: dict[str, np.ndarray] = {  # (R, ...) filled by SlotCache.step; shared by the parts
            fmt.INPUT_IDS: np.zeros((R, 1), np.int64), fmt.POSITION_IDS: np.zeros((R, 1), np.int64),
            fmt.SEQLENS_K: np.zeros(R, np.int32), fmt.TOTAL_SEQUENCE_LENGTH: np.zeros(1, np.int32),
            fmt.TOP_K: np.array([k], np.int64)}
        by_row = {name: buf[:rc] for name, buf in cache.cross.items()}  # (Rc, H, S, Dh)
        by_row[fmt.ENCODER_ATTENTION_MASK] = cache.mask[:rc]  # (Rc, S)
        # Graphs with SLOT_HOST_ARGMAX compute top-k for k > 2 only: greedy steps bind log_probs
        # (R, V) to the cache's buffer and take their best tokens on the host (best_of).
        # (Bound for every k: ONNX Runtime writes log_probs anyway, into a fresh buffer if unbound.)
        self.log_probs: np.ndarray | None = None
        log_probs = cache.log_probs_buffer(R) if rt.slot_host_argmax and not head else None  # (R, V)
        if log_probs is not None and k <= 2:
            self.log_probs = log_probs
        shape = (1, 1) if self.log_probs is not None else (R, k)  # (1, 1): the graph's placeholder
        self.values = np.zeros(shape, np.float32)  # (R, k) top-k log-probs, written by every run
        self.ids = np.zeros(shape, np.int64)  # (R, k)
        self.bindings: list[ort.IOBinding] = []
        for lo, hi in parts:
            b = self.session.io_binding()
            for present, past in cache.self_pairs:
                value = ort.OrtValue.ortvalue_from_numpy(cache.past[past][lo:hi])  # (hi-lo, H, L, Dh)
                b.bind_ortvalue_input(past, value)
                b.bind_ortvalue_output(present, value)
            inputs = {name: buf[lo // g:hi // g] for name, buf in by_row.items()}  # the parts' cross rows
            inputs.update({name: buf if name in SHARED else buf[lo:hi] for name, buf in self.small.items()})
            for name, array in inputs.items():
                b.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array))
            outputs: dict[str, np.ndarray] = {fmt.TOPK_VALUES: self.values, fmt.TOPK_INDICES: self.ids}
            if self.log_probs is not None:  # each part its own placeholder: the parts run at once
                outputs = {name: np.zeros((1, 1), buf.dtype) for name, buf in outputs.items()}
            else:
                outputs = {name: buf[lo:hi] for name, buf in outputs.items()}
            if log_probs is not None:
                outputs[fmt.LOG_PROBS] = log_probs[lo:hi]
            for name, array in outputs.items():
                b.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(array))
            self.bindings.append(b)

    def run(self, pool: ThreadPoolExecutor | None) -> None:
        """One step: the parts side by side, the first on this thread (ONNX Runtime releases the GIL)."""
        first, *rest = self.bindings
        if rest and pool is None:
            raise RuntimeError("a step split into parts needs the runtime's thread pool")
        futures = [pool.submit(self.session.run_with_iobinding, b) for b in rest] if pool else []
        self.session.run_with_iobinding(first)
        for future in futures:
            future.result()
