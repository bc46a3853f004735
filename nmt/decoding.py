"""Decoding options and results, and the rules every decoder shares (torch-free core).

The PyTorch reference decoders (train/decode.py), the engine (serve/engine) and every front door
(gRPC, CLI) validate with the functions here, so one rule has one check and one message.
Plain dataclasses: no protobuf, no torch.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from nmt.errors import UserError


class InvalidRequest(UserError, ValueError):
    """Input the caller must fix (maps to INVALID_ARGUMENT); the message names the problem."""


class Cancelled(Exception):
    """Decoding stopped because the request's stop signal was set (cancelled or deadline passed)."""


class DeadlineExceeded(Cancelled):
    """Decoding stopped because the request's deadline passed (not because the caller cancelled)."""


MAX_LENGTH_PENALTY = 10.0


@dataclass(frozen=True)
class DecodeOptions:
    beam_size: int = 1  # 1 = greedy
    length_penalty: float = 1.0  # GNMT-style ((5+len)/6)^alpha; 0 = raw log-prob sum
    n_best: int = 1  # hypotheses returned per text (<= beam_size)
    max_length_a: float = 1.5  # max output tokens = a * source_tokens + b (capped by the model)
    max_length_b: int = 10
    min_length: int = 0  # EOS is forbidden before this many tokens
    return_scores: bool = False
    return_alignments: bool = False

    def errors(self) -> list[str]:
        errs = []
        if not 1 <= self.beam_size <= 16:
            errs.append(f"beam_size must be in [1, 16], got {self.beam_size}")
        if not 1 <= self.n_best <= max(1, self.beam_size):
            errs.append(f"n_best must be in [1, beam_size={self.beam_size}], got {self.n_best}")
        # ((5+len)/6)^alpha overflows a float for huge alpha; useful values are 0..2.
        if not 0 <= self.length_penalty <= MAX_LENGTH_PENALTY:
            errs.append(f"length_penalty must be in [0, {MAX_LENGTH_PENALTY:g}], got {self.length_penalty}")
        if self.max_length_a < 0 or self.max_length_b < 0:
            errs.append("max_length_a and max_length_b must be >= 0")
        if self.min_length < 0:
            errs.append(f"min_length must be >= 0, got {self.min_length}")
        # NaN passes every comparison above; options parsed from a wire message can carry it.
        errs += [f"{name} must be a finite number" for name in ("length_penalty", "max_length_a")
                 if not math.isfinite(getattr(self, name))]
        return errs

    def validate(self) -> DecodeOptions:
        errs = self.errors()
        if errs:
            raise InvalidRequest("invalid options: " + "; ".join(errs))
        return self


# The decoding rules every decoder shares (the PyTorch reference and the engine must agree).
def check_sources(sources: Sequence[Sequence[int]], max_tokens: int, vocab_size: int | None = None, *,
                  name: Callable[[int], str] = "source {}".format, model: str = "") -> None:
    """The one check of source ids (EOS included): not empty, at most `max_tokens` long, inside the
    vocabulary. `name(i)` says how the caller knows source i (e.g. `texts[i]`); InvalidRequest if bad."""
    who = f"model {model!r}" if model else "the model"
    for i, ids in enumerate(sources):
        if not ids:
            raise InvalidRequest(f"{name(i)} is empty: expected at least the EOS id")
        if len(ids) > max_tokens:
            raise InvalidRequest(f"{name(i)} is {len(ids)} tokens long (end of sentence included), "
                                 f"{who} accepts at most {max_tokens}")
        if vocab_size is not None:
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise InvalidRequest(f"{name(i)} has token ids outside the vocabulary [0, {vocab_size}): "
                                     f"{bad[:5]}")


def check_prefixes(prefixes: Sequence[Sequence[int]], budgets: Sequence[int], vocab_size: int, *,
                   name: Callable[[int], str] = "target_prefix {}".format, special: int = 4) -> None:
    """The one check of forced target prefixes (target ids, no BOS/EOS): inside the vocabulary, no
    special id (ids below `special`: pad, unk, bos, eos) and at most the text's length budget
    (`budgets[i]`, see max_new_tokens: the prefix is part of the output). InvalidRequest if bad."""
    for i, (ids, budget) in enumerate(zip(prefixes, budgets)):
        bad = [t for t in ids if not special <= t < vocab_size]
        if bad:
            raise InvalidRequest(f"{name(i)} has token ids outside the target vocabulary [{special}, "
                                 f"{vocab_size}) (special ids are not allowed): {bad[:5]}")
        if len(ids) > budget:
            raise InvalidRequest(f"{name(i)} is {len(ids)} tokens long, longer than the {budget} tokens "
                                 f"this text may produce (max_length_a * source_tokens + max_length_b, "
                                 f"capped by the model)")


def max_new_tokens(src_len: int, opts: DecodeOptions, max_positions: int) -> int:
    """Generation budget (EOS included) for a source of src_len ids (its EOS counted)."""
    return min(int(opts.max_length_a * src_len + opts.max_length_b), max_positions - 1)


def normalised_score(log_prob: float, length: int, length_penalty: float) -> float:
    """GNMT length normalisation; length counts the EOS when the hypothesis has one."""
    if length_penalty == 0:
        return log_prob
    return log_prob / ((5 + length) / 6) ** length_penalty


@dataclass
class Hypothesis:
    text: str
    tokens: list[int]  # target ids, without bos/eos
    score: float  # length-normalised log-probability used for ranking
    log_prob: float  # raw sum of token log-probabilities
    alignment: list[int] | None = None  # per target token: index of the source token attended most


@dataclass
class TranslationResult:
    hypotheses: list[Hypothesis]  # best first, n_best of them
    source_tokens: int

    @property
    def text(self) -> str:
        return self.hypotheses[0].text


@dataclass
class StopSignal:
    """Checked by the decoding loop every step: set it (or pass a deadline) and decoding stops."""

    event: threading.Event = field(default_factory=threading.Event)
    deadline: float | None = None  # time.monotonic() value

    def set(self) -> None:
        self.event.set()

    def stopped(self, now: float) -> bool:
        return self.event.is_set() or (self.deadline is not None and now >= self.deadline)

    def error(self, now: float) -> Cancelled:
        """Why a stopped request stopped: its deadline passing wins over the RPC's termination callback."""
        if self.deadline is not None and now >= self.deadline:
            return DeadlineExceeded("deadline exceeded before the translation finished")
        return Cancelled("request cancelled by the caller")
