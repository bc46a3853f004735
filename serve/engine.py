"""The translation engine: a bundle on ONNX Runtime, greedy and beam search, batched.

    translator = Translator.from_bundle("bundles/en-de", device="auto")
    translator.translate(["A man is riding a bike."], DecodeOptions(beam_size=4))

Requests are tokenized, sorted by length and packed into batches under a token budget; each
batch is encoded once and decoded step by step with the cache on the device (serve.session),
finished and stopped rows leaving the running batch as they end. Results come back in input
order. Plain dataclasses in and out (serve.types): no protobuf, no torch.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from serve.batching import pack_by_tokens
from serve.bundle import TOKENIZER_FILE, Manifest, read_manifest
from serve.search import beam_search, greedy_search
from serve.session import Runtime
from serve.types import (
    Cancelled,
    DecodeOptions,
    Hypothesis,
    InvalidRequest,
    StopSignal,
    TranslationResult,
    max_new_tokens,
)
from train.tokenizer import Tokenizer

DEFAULT_MAX_BATCH_TOKENS = 8192
GREEDY = DecodeOptions()


class Translator:
    """One loaded bundle. Thread-safe: stop signals may be set from any thread while a worker
    thread runs `translate_ids`; sessions are shared, all decoding state is per call."""

    def __init__(self, runtime: Runtime, manifest: Manifest, tokenizer: Tokenizer,
                 max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS, compaction: bool = True,
                 alignment_layer: int = -1):
        if max_batch_tokens <= 0:
            raise ValueError(f"max_batch_tokens must be positive, got {max_batch_tokens}")
        n = manifest.n_decoder_layers
        if not -n <= alignment_layer < n:
            raise ValueError(f"alignment_layer must be in [{-n}, {n}) for {n} decoder layers, "
                             f"got {alignment_layer}")
        # The decoder layer whose head-averaged cross-attention gives alignments (-1: the last).
        self.alignment_layer = alignment_layer
        self.runtime, self.manifest, self.tokenizer = runtime, manifest, tokenizer
        self.max_batch_tokens = max_batch_tokens
        self.compaction = compaction  # off only to check that dropping rows changes no result

    @classmethod
    def from_bundle(cls, path: str | Path, device: str = "auto", intra_op_threads: int | None = None,
                    inter_op_threads: int | None = None, graph_optimization: str = "all", warmup: bool = True,
                    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS, compaction: bool = True,
                    alignment_layer: int = -1) -> Translator:
        """Verify the bundle (format version, files, checksums: BundleError otherwise) and load it."""
        path = Path(path)
        manifest = read_manifest(path)
        runtime = Runtime(path, manifest, device, intra_op_threads, inter_op_threads, graph_optimization)
        tokenizer = Tokenizer.load(path / TOKENIZER_FILE)
        translator = cls(runtime, manifest, tokenizer, max_batch_tokens, compaction, alignment_layer)
        if warmup:
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

    def check_sources(self, sources: list[list[int]]) -> None:
        vocab = self.manifest.vocab_size
        for i, ids in enumerate(sources):
            if not ids:
                raise InvalidRequest(f"source {i} is empty: expected at least the EOS id")
            if len(ids) > self.max_source_tokens:
                raise InvalidRequest(f"source {i} has {len(ids)} tokens, the model accepts at most "
                                     f"{self.max_source_tokens}")
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise InvalidRequest(f"source {i} has token ids outside the vocabulary [0, {vocab}): "
                                     f"{bad[:5]}")

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
        for i, ids in enumerate(sources):
            if len(ids) > self.max_source_tokens:
                raise InvalidRequest(f"text {i} is {len(ids)} tokens long (EOS included), the model accepts "
                                     f"at most {self.max_source_tokens}")
        results = []
        for h, s in zip(self.translate_ids(sources, options, [stop] * len(sources)), sources):
            if h is None:
                raise Cancelled("translation stopped before it finished")
            results.append(TranslationResult(hypotheses=h, source_tokens=len(s)))
        return results

    def translate_ids(self, sources: list[list[int]], options: DecodeOptions = GREEDY,
                      stops: list[StopSignal | None] | None = None,
                      max_batch_tokens: int | None = None) -> list[list[Hypothesis] | None]:
        """Token-level entry: n_best hypotheses per source (with text), or None for a source whose
        stop signal was set (it leaves the running batch at the next step, the others go on)."""
        options.validate()
        if options.return_alignments and not self.runtime.has_alignments:
            raise InvalidRequest(f"model {self.name!r} was exported without the cross_attention output: "
                                 f"re-export it to get alignments")
        self.check_sources(sources)
        stops = list(stops) if stops is not None else [None] * len(sources)
        if len(stops) != len(sources):
            raise InvalidRequest(f"{len(stops)} stop signals for {len(sources)} sources")
        budget = max_batch_tokens or self.max_batch_tokens
        results: list[list[Hypothesis] | None] = [None] * len(sources)
        for batch in pack_by_tokens([len(s) for s in sources], budget, options.beam_size):
            for i, hyps in zip(batch, self.decode_batch([sources[i] for i in batch], options,
                                                        [stops[i] for i in batch])):
                results[i] = hyps
        return results

    def decode_batch(self, sources: list[list[int]], options: DecodeOptions,
                     stops: list[StopSignal | None]) -> list[list[Hypothesis] | None]:
        """Encode one packed batch and search it; sources already stopped cost nothing."""
        def stopped(i: int) -> bool:
            s = stops[i]
            return s is not None and s.stopped(time.monotonic())

        live = [i for i in range(len(sources)) if not stopped(i)]
        out: list[list[Hypothesis] | None] = [None] * len(sources)
        if not live:
            return out
        m = self.manifest
        lengths = np.array([len(sources[i]) for i in live])  # (B,)
        S = int(lengths.max())
        src = np.full((len(live), S), m.pad_id, dtype=np.int64)  # (B, S)
        for r, i in enumerate(live):
            src[r, :len(sources[i])] = sources[i]
        src_mask = np.arange(S)[None, :] < lengths[:, None]  # (B, S)
        cache = self.runtime.start(src, src_mask)
        if options.return_alignments:
            cache.alignment_layer = self.alignment_layer
        budgets = [max_new_tokens(int(n), options, m.max_positions) for n in lengths]
        row_stopped = lambda r: stopped(live[r])  # noqa: E731 - search rows -> batch indices
        if options.beam_size == 1:
            found = [None if h is None else [h] for h in greedy_search(
                cache, budgets, options, m.bos_id, m.eos_id, row_stopped, self.compaction)]
        else:
            found = beam_search(cache, budgets, options, m.bos_id, m.eos_id, m.vocab_size, row_stopped,
                                self.compaction)
        for r, hyps in enumerate(found):
            if hyps is not None:
                for h in hyps:
                    h.text = self.tokenizer.decode(h.tokens)
            out[live[r]] = hyps
        return out
