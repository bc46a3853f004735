"""nmt.v1 messages <-> the engine's dataclasses (nmt.decoding), for the server and the client alike.

Requests are parsed with `lenient` rather than by grpc, so a malformed message becomes an
INVALID_ARGUMENT naming the problem (grpc's own parser would answer INTERNAL).
"""

from __future__ import annotations

import math
from typing import Any

from google.protobuf.message import DecodeError

from nmt.decoding import DecodeOptions, Hypothesis, TranslationResult
from nmt.v1 import translator_pb2 as pb

SERVICE = "nmt.v1.Translator"


def options_from_proto(o: pb.DecodingOptions) -> DecodeOptions:
    """DecodingOptions -> DecodeOptions; unset fields take DecodeOptions' defaults. InvalidRequest if bad."""
    d = DecodeOptions()
    beam = o.beam_size if o.HasField("beam_size") else d.beam_size
    opts = DecodeOptions(
        beam_size=beam,
        length_penalty=o.length_penalty if o.HasField("length_penalty") else d.length_penalty,
        n_best=o.n_best if o.HasField("n_best") else d.n_best,
        max_length_a=o.max_length_a if o.HasField("max_length_a") else d.max_length_a,
        max_length_b=o.max_length_b if o.HasField("max_length_b") else d.max_length_b,
        min_length=o.min_length if o.HasField("min_length") else d.min_length,
        return_scores=o.return_scores, return_alignments=o.return_alignments)
    return opts.validate()


def options_to_proto(o: DecodeOptions) -> pb.DecodingOptions:
    return pb.DecodingOptions(beam_size=o.beam_size, length_penalty=o.length_penalty, n_best=o.n_best,
                              max_length_a=o.max_length_a, max_length_b=o.max_length_b,
                              min_length=o.min_length, return_scores=o.return_scores,
                              return_alignments=o.return_alignments)


def hypothesis_to_proto(h: Hypothesis, options: DecodeOptions) -> pb.Hypothesis:
    msg = pb.Hypothesis(text=h.text, tokens=h.tokens)
    if options.return_scores:
        msg.score, msg.log_prob = h.score, h.log_prob
    if options.return_alignments and h.alignment:
        msg.alignment.extend(h.alignment)
    return msg


def result_from_proto(t: pb.Translation) -> TranslationResult:
    """Translation -> TranslationResult; scores not returned by the server are NaN."""
    hyps = [Hypothesis(text=h.text, tokens=list(h.tokens),
                       score=h.score if h.HasField("score") else math.nan,
                       log_prob=h.log_prob if h.HasField("log_prob") else math.nan,
                       alignment=list(h.alignment) or None) for h in t.hypotheses]
    return TranslationResult(hypotheses=hyps, source_tokens=t.source_tokens)


class Malformed:
    """What the lenient deserializer hands over for bytes that are not a valid message."""

    def __init__(self, error: str):
        self.error = error


def lenient(message_cls: Any):
    def parse(data: bytes) -> Any:
        try:
            return message_cls.FromString(data)
        except (DecodeError, ValueError) as e:
            return Malformed(f"request is not a valid {message_cls.DESCRIPTOR.full_name}: {e}")
    return parse
