"""The translation engine: a bundle on ONNX Runtime, greedy and beam search, batched.

    translator = Translator.from_bundle("bundles/en-de", EngineConfig(device="auto"))
    translator.translate(["A man is riding a bike."], DecodeOptions(beam_size=4))

Requests are tokenized, sorted by length and packed into batches under a token budget; each
batch is encoded once and decoded step by step with the cache on the device (serve.engine.runtime),
finished and stopped rows leaving the running batch as they end. Results come back in input
order. Plain dataclasses in and out (nmt.decoding): no protobuf, no torch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nmt.bundle import Manifest, read_manifest
from nmt.decoding import (
    Cancelled,
    DecodeOptions,
    Hypothesis,
    InvalidRequest,
    StopSignal,
    TranslationResult,
    check_prefixes,
    check_sources,
    max_new_tokens,
)
from nmt.pair_tokenizer import BundleTokenizer, load_bundle_tokenizer
from serve.engine.packing import DEFAULT_MAX_BATCH_TOKENS, pack_by_tokens
from serve.engine.runtime import DecoderCache, Runtime
from serve.engine.search import beam_search, greedy_search
from serve.engine.slots import SlotCache

GREEDY = DecodeOptions()
SHARD_ROWS = 16  # the fewest rows (sources x beam) a shard of a batch searches (see shards)


@dataclass(frozen=True)
class EngineConfig:
    """How a bundle is loaded and run; the defaults suit a server."""

    device: str = "auto"  # auto: CUDA when a GPU is usable, else CPU; or "cpu" / "cuda"
    intra_op_threads: int | None = None  # ONNX Runtime's default: one per physical core
    inter_op_threads: int | None = None
    graph_optimization: str = "all"  # disable | basic | extended | all (ORT optimizer levels)
    warmup: bool = True  # one short decode at load, so the first request pays no allocations
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS  # padded source tokens x beam per batch
    compaction: bool = True  # drop finished rows from the running batch (off only to test that it is exact)
    alignment_layer: int = -1  # decoder layer whose head-averaged cross-attention gives alignments
    slot_cache: bool = True  # the bundle's slot decoder on CPU when it has one (off: to compare the two)
    native_kernels: bool = True  # its attention and top-k on serve.engine.native's kernels (off: ORT's)
    greedy_head: bool = True  # greedy steps without scores: int8-bounded vocabulary projection (native)
    shards: bool = True  # big batches searched as shards side by side on the CPU threads (off: to compare)

    def errors(self, n_decoder_layers: int) -> list[str]:
        errs = []
        if self.max_batch_tokens <= 0:
            errs.append(f"max_batch_tokens must be positive, got {self.max_batch_tokens}")
        n = n_decoder_layers
        if not -n <= self.alignment_layer < n:
            errs.append(f"alignment_layer must be in [{-n}, {n}) for {n} decoder layers, "
                        f"got {self.alignment_layer}")
        return errs


class Translator:
    """One loaded bundle. Thread-safe: stop signals may be set from any thread while a worker
    thread runs `translate_ids`; sessions are shared, all decoding state is per call."""

    def __init__(self, runtime: Runtime, manifest: Manifest, tokenizer: BundleTokenizer,
                 config: EngineConfig = EngineConfig()):
        errs = config.errors(manifest.n_decoder_layers)
        if errs:
            raise ValueError("; ".join(errs))
        self.config = config
        self.alignment_layer = config.alignment_layer
        self.runtime, self.manifest, self.tokenizer = runtime, manifest, tokenizer
        self.max_batch_tokens = config.max_batch_tokens
        self.compaction = config.compaction

    @classmethod
    def from_bundle(cls, path: str | Path, config: EngineConfig = EngineConfig()) -> Translator:
        """Verify the bundle (format version, files, checksums: BundleError otherwise) and load it."""
        path = Path(path)
        manifest = read_manifest(path)
        c = config
        runtime = Runtime(path, manifest, c.device, c.intra_op_threads, c.inter_op_threads,
                          c.graph_optimization, slot_cache=c.slot_cache, native_kernels=c.native_kernels,
                          greedy_head=c.greedy_head)
        # Our own tokenizer.model, or the source/target pair the manifest names (imported models).
        translator = cls(runtime, manifest, load_bundle_tokenizer(path, manifest.raw), config)
        if c.warmup:
            translator.warmup()
        return translator

    # -- what the bundle is -------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def src_lang(self) -> str:
        return self.manifest.src_lang

    @property
    def tgt_lang(self) -> str:
        return self.manifest.tgt_lang

    @property
    def provider(self) -> str:
        """The ONNX Runtime provider the graphs run on, e.g. CUDAExecutionProvider."""
        return self.runtime.provider

    @property
    def device(self) -> str:
        return self.runtime.device.type

    @property
    def max_source_tokens(self) -> int:
        """Longest accepted source, its EOS included."""
        return self.manifest.max_positions

    @property
    def steps(self) -> int:
        """Decoder steps run so far (warm-up included): one per token position per running batch."""
        return self.runtime.steps

    def warmup(self) -> None:
        """One short greedy and beam decode, so the first request does not pay for allocations."""
        eos = self.manifest.eos_id
        self.translate_ids([[eos]], DecodeOptions(max_length_a=0, max_length_b=2))
        self.translate_ids([[eos]], DecodeOptions(beam_size=2, max_length_a=0, max_length_b=2))

    # -- requests -----------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Source ids of each text, EOS appended (the model's input convention)."""
        # One call per text: SentencePiece's batch call starts a thread pool each time, which
        # costs more than encoding a request's few sentences.
        return [self.tokenizer.encode(text) + [self.manifest.eos_id] for text in texts]

    def check(self, sources: list[list[int]], options: DecodeOptions,
              prefixes: list[list[int]] | None = None) -> None:
        """InvalidRequest unless the options are valid and this model can decode these sources (with
        these forced target prefixes) with them."""
        options.validate()
        if options.return_alignments and not self.runtime.has_alignments:
            raise InvalidRequest(f"model {self.name!r} was exported without the cross_attention output: "
                                 f"re-export it to get alignments")
        check_sources(sources, self.max_source_tokens, self.manifest.vocab_size, model=self.name)
        if prefixes is not None:
            if len(prefixes) != len(sources):
                raise InvalidRequest(f"{len(prefixes)} target prefixes for {len(sources)} sources")
            budgets = [self.budget(len(s), options) for s in sources]
            check_prefixes(prefixes, budgets, self.manifest.vocab_size)

    def translate(self, texts: list[str], options: DecodeOptions = GREEDY,
                  stop: StopSignal | None = None) -> list[TranslationResult]:
        """Translate texts (input order kept); raises Cancelled when `stop` is set mid-way."""
        options.validate()
        if isinstance(texts, str):
            raise InvalidRequest("texts must be a list of strings, not one string")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise InvalidRequest(f"text {i} is {type(text).__name__}, expected str")
        sources = self.tokenize(texts)
        check_sources(sources, self.max_source_tokens, model=self.name, name="text {}".format)
        results = []
        for h, s in zip(self.translate_ids(sources, options, [stop] * len(sources)), sources):
            if h is None:
                raise Cancelled("translation stopped before it finished")
            results.append(TranslationResult(hypotheses=h, source_tokens=len(s)))
        return results

    def translate_ids(self, sources: list[list[int]], options: DecodeOptions = GREEDY,
                      stops: list[StopSignal | None] | None = None,
                      max_batch_tokens: int | None = None, prefixes: list[list[int]] | None = None
                      ) -> list[list[Hypothesis] | None]:
        """Token-level entry: n_best hypotheses per source (with text), or None for a source whose
        stop signal was set (it leaves the running batch at the next step, the others go on).
        `prefixes[i]`: target ids source i's output starts with (forced, included in the result)."""
        self.check(sources, options, prefixes)
        stops = list(stops) if stops is not None else [None] * len(sources)
        if len(stops) != len(sources):
            raise InvalidRequest(f"{len(stops)} stop signals for {len(sources)} sources")
        budget = max_batch_tokens or self.max_batch_tokens
        results: list[list[Hypothesis] | None] = [None] * len(sources)
        for batch in pack_by_tokens([len(s) for s in sources], budget, options.beam_size):
            forced = None if prefixes is None else [prefixes[i] for i in batch]
            for i, hyps in zip(batch, self.decode_batch([sources[i] for i in batch], options,
                                                        [stops[i] for i in batch], forced)):
                results[i] = hyps
        return results

    def encode(self, sources: list[list[int]], alignments: bool = False,
               capacity: tuple[int, int] | None = None, single: bool = False) -> DecoderCache | SlotCache:
        """Encode sources as one padded batch: the decoder state of their rows, nothing fed yet
        (alignments: a state that can step with the alignment graph; capacity, single: Runtime.start)."""
        lengths = np.array([len(s) for s in sources])  # (B,)
        S = int(lengths.max())
        src = np.full((len(sources), S), self.manifest.pad_id, dtype=np.int64)  # (B, S)
        for r, ids in enumerate(sources):
            src[r, :len(ids)] = ids
        src_mask = np.arange(S)[None, :] < lengths[:, None]  # (B, S)
        return self.runtime.start(src, src_mask, alignments, capacity, single)

    def budget(self, source_tokens: int, options: DecodeOptions) -> int:
        """Tokens a source of this length may generate (EOS included)."""
        return max_new_tokens(source_tokens, options, self.manifest.max_positions)

    def decode_batch(self, sources: list[list[int]], options: DecodeOptions,
                     stops: list[StopSignal | None], prefixes: list[list[int]] | None = None
                     ) -> list[list[Hypothesis] | None]:
        """Encode one packed batch and search it (as shards side by side when it is big enough, see
        `shards`); sources already stopped cost nothing."""
        live = [i for i in range(len(sources)) if not is_stopped(stops[i])]
        out: list[list[Hypothesis] | None] = [None] * len(sources)
        rt = self.runtime
        sharded = self.config.shards and rt.slot_parts is not None and not options.return_alignments
        pool = rt.copy_pool if sharded else None
        groups = [[live[j] for j in shard]
                  for shard in shards(len(live), options.beam_size, rt.copy_threads if pool else 1)]
        single = len(groups) > 1
        futures = [pool.submit(self.search, group, sources, options, stops, prefixes, single)
                   for group in groups[1:]] if pool and single else []
        found = self.search(groups[0], sources, options, stops, prefixes, single)
        for future in futures:
            found.update(future.result())
        for i, hyps in found.items():
            for h in hyps or []:
                h.text = self.tokenizer.decode(h.tokens)
            out[i] = hyps
        return out

    def search(self, batch: list[int], sources: list[list[int]], options: DecodeOptions,
               stops: list[StopSignal | None], prefixes: list[list[int]] | None, single: bool
               ) -> dict[int, list[Hypothesis] | None]:
        """Encode sources[i] for i in batch as one padded batch and search it: hypotheses by source index
        (None: stopped). single: a shard of a bigger batch, run on one thread (SlotCache)."""
        if not batch:
            return {}
        m = self.manifest
        budgets = [self.budget(len(sources[i]), options) for i in batch]
        capacity = (len(batch) * options.beam_size, max(budgets) + 1)  # rows, tokens fed at most
        cache = self.encode([sources[i] for i in batch], options.return_alignments, capacity, single)
        if options.return_alignments:
            cache.alignment_layer = self.alignment_layer
        row_stopped = lambda r: is_stopped(stops[batch[r]])  # noqa: E731 - search rows -> batch indices
        forced = None if prefixes is None else [prefixes[i] for i in batch]
        if options.beam_size == 1:
            found = [None if h is None else [h] for h in greedy_search(
                cache, budgets, options, m.bos_id, m.eos_id, row_stopped, self.compaction, forced)]
        else:
            found = beam_search(cache, budgets, options, m.bos_id, m.eos_id, m.vocab_size, row_stopped,
                                self.compaction, forced)
        return dict(zip(batch, found))


def is_stopped(stop: StopSignal | None) -> bool:
    return stop is not None and stop.stopped(time.monotonic())


def shards(n: int, beam: int, threads: int) -> list[list[int]]:
    """Which of a batch's n sources each shard searches, when the batch runs as shards side by side,
    one per thread, each with its own cache stepped on one thread: source i goes to shard i % count
    (a packed batch is sorted by length, so every shard gets short and long sources alike and the
    shards end at about the same step), each shard holding at least SHARD_ROWS rows (sources x beam).
    One shard: the batch is searched whole, its steps split by rows (serve.engine.slots.row_parts).

    Why: between two decoder runs the search works on the host (beam bookkeeping, reorder copies,
    about a sixth of a batch-64 beam-4 step at 2 threads) on one core while the other idles. With
    shards, one shard's host work overlaps the other's decoder run."""
    count = min(threads, n * beam // SHARD_ROWS, n)
    if count <= 1:
        return [list(range(n))]
    return [list(range(j, n, count)) for j in range(count)]
