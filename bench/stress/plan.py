"""Request planning for `nmt stress`: every request is a pure function of (seed, index); and the
checks of the answers that come back.

Kinds and the status codes each may get are listed in bench/stress/run.py's docstring.
"""

from __future__ import annotations

import math
import random
import threading
from dataclasses import dataclass, field
from typing import Any

from nmt.v1 import translator_pb2 as pb

KINDS = ("valid", "fuzz", "invalid", "garbage", "deadline", "cancelled", "disconnect", "unauthenticated")
WEIGHTS = (40, 12, 15, 12, 8, 7, 6, 4)
# Decoding option presets of valid requests; answers are kept per (model, version, options, text).
PRESETS: dict[str, pb.DecodingOptions] = {
    "greedy": pb.DecodingOptions(),
    "greedy-scores": pb.DecodingOptions(return_scores=True),
    "beam2": pb.DecodingOptions(beam_size=2),
    "beam4-nbest2": pb.DecodingOptions(beam_size=4, n_best=2, return_scores=True),
    "beam3-raw-min3": pb.DecodingOptions(beam_size=3, length_penalty=0.0, min_length=3),
    "short": pb.DecodingOptions(max_length_a=0.0, max_length_b=5),
    "long": pb.DecodingOptions(beam_size=2, min_length=30, max_length_a=0.0, max_length_b=60),
}
INTS = (0, 1, -1, 2, 4, 16, 17, 2**31 - 1, -(2**31))
FLOATS = (0.0, -0.0, 1.0, -1.0, 1e-45, 3e38, math.inf, -math.inf, math.nan)
# Code point ranges for fuzzed text: surrogates (D800-DFFF) excluded, astral planes included.
UNICODE = [(0x20, 0x7E), (0x00, 0x1F), (0x7F, 0x9F), (0xA0, 0x24F), (0x300, 0x36F), (0x590, 0x6FF),
           (0x200B, 0x200F), (0x2028, 0x202E), (0x4E00, 0x4FFF), (0xFEFF, 0xFEFF), (0xFFF0, 0xFFFF),
           (0x1D400, 0x1D7FF), (0x1F300, 0x1FAFF), (0x20000, 0x2A6DF), (0xE0000, 0xE007F),
           (0x10FFFF, 0x10FFFF)]
WORDS = ("man woman child dog girl boy group people street ball bike water beach park car shirt hat "
         "red blue small young old two three running playing sitting standing riding walking holding "
         "in on at with near under through a the of while and").split()


@dataclass
class Plan:
    """One request: what it is, which status codes it may get and how it is sent."""

    kind: str
    variant: str
    allowed: frozenset[str]
    payload: bytes
    method: str = "Translate"
    timeout: float = 60.0
    delay: float = 0.0  # cancelled/disconnect: seconds before the client gives up
    auth: bool = True
    request: pb.TranslateRequest | None = None  # well-formed payloads: their answers are checked


@dataclass
class Target:
    """What the server told us about itself (GetModelInfo), used to plan requests at its limits."""

    max_texts: int
    max_chars: int
    max_message_bytes: int
    max_source_tokens: int
    models: list[tuple[str, str, str]]  # (name, source language, target language)


def codes(*names: str) -> frozenset[str]:
    return frozenset(names)


def sentence(rng: random.Random, texts: list[str]) -> str:
    if texts:
        return rng.choice(texts)
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 14))).capitalize() + "."


def fuzz_text(rng: random.Random) -> str:
    if rng.random() < 0.15:
        return ""
    out = []
    for _ in range(rng.randint(1, 40)):
        lo, hi = rng.choice(UNICODE)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def request_of(rng: random.Random, index: int, target: Target, texts: list[str], preset: str,
               n: int) -> pb.TranslateRequest:
    """A well-formed request of n texts with a random routing style (default, by name, by language)."""
    name, src, tgt = rng.choice(target.models)
    routes: list[dict[str, Any]] = [{}, {"model": name}, {"source_language": src},
                                    {"source_language": src, "target_language": tgt}]
    route = rng.choice(routes)
    return pb.TranslateRequest(request_id=f"stress-{index}", texts=[sentence(rng, texts) for _ in range(n)],
                               options=PRESETS[preset], **route)


def plan_request(seed: int, index: int, target: Target, texts: list[str], with_token: bool) -> Plan:
    rng = random.Random(f"{seed}:{index}")
    kind = rng.choices(KINDS, WEIGHTS)[0]
    if kind == "unauthenticated" and not with_token:
        kind = "valid"
    size = rng.choice([1, 1, 2, 3, 5, 8, 16, target.max_texts])
    if kind in ("valid", "unauthenticated"):
        preset = rng.choice([p for p in PRESETS if p != "long"])
        req = request_of(rng, index, target, texts, preset, rng.randint(1, size))
        if kind == "unauthenticated":
            return Plan(kind, "no token", codes("UNAUTHENTICATED"), req.SerializeToString(), auth=False)
        return Plan(kind, preset, codes("OK", "RESOURCE_EXHAUSTED"), req.SerializeToString(), request=req)
    if kind == "fuzz":
        return fuzz_plan(rng, index, target)
    if kind == "invalid":
        return invalid_plan(rng, index, target, texts)
    if kind == "garbage":
        return garbage_plan(rng, index, target, texts)
    preset = "beam4-nbest2" if kind == "deadline" else "long"
    req = request_of(rng, index, target, texts, preset, rng.randint(2, 8))
    if kind == "deadline":
        return Plan(kind, "short deadline", codes("DEADLINE_EXCEEDED", "OK"), req.SerializeToString(),
                    timeout=rng.uniform(0.001, 0.03), request=req)
    return Plan(kind, "mid-call", codes("CANCELLED", "OK"), req.SerializeToString(),
                delay=rng.uniform(0.0, 0.05), request=req)


def fuzz_plan(rng: random.Random, index: int, target: Target) -> Plan:
    req = pb.TranslateRequest(request_id=f"stress-{index}",
                              texts=[fuzz_text(rng) for _ in range(rng.randint(1, 4))])
    variant = "unicode"
    if rng.random() < 0.3:  # extreme option values: each is either served or refused, never a crash
        variant = "unicode+options"
        o = req.options
        o.beam_size, o.n_best = rng.choice(INTS), rng.choice(INTS)
        o.min_length, o.max_length_b = rng.choice(INTS), rng.choice(INTS)
        o.length_penalty, o.max_length_a = rng.choice(FLOATS), rng.choice(FLOATS)
    return Plan("fuzz", variant, codes("OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"),
                req.SerializeToString(), request=req)


def invalid_plan(rng: random.Random, index: int, target: Target, texts: list[str]) -> Plan:
    name, src, _ = target.models[0]
    ok = [sentence(rng, texts)]
    long_tokens = " ".join(["x"] * (target.max_source_tokens + 5))  # every "x" is at least one token
    cases: dict[str, dict[str, Any]] = {
        "no texts": dict(texts=[]),
        "too many texts": dict(texts=ok * (target.max_texts + rng.randint(1, 3))),
        "too many characters": dict(texts=ok + ["y" * (target.max_chars + rng.randint(1, 50))]),
        "too many tokens": dict(texts=[long_tokens]),
        "beam_size": dict(texts=ok, options=pb.DecodingOptions(beam_size=rng.choice([0, 17, -3, 2**31 - 1]))),
        "n_best > beam": dict(texts=ok, options=pb.DecodingOptions(beam_size=2, n_best=3)),
        "length_penalty": dict(texts=ok, options=pb.DecodingOptions(
            length_penalty=rng.choice([math.nan, math.inf, -1.0]))),
        "max_length": dict(texts=ok, options=pb.DecodingOptions(max_length_a=-1.0, max_length_b=-1)),
        "min_length": dict(texts=ok, options=pb.DecodingOptions(min_length=-1)),
        "unknown model": dict(texts=ok, model=f"no-such-model-{rng.randint(0, 999)}"),
        "path as model": dict(texts=ok, model=rng.choice(["../../etc/passwd", "/etc/passwd", "./" + name,
                                                          f"{name}/../{name}", "~/" + name])),
        "unknown language": dict(texts=ok, source_language=rng.choice(["xx", "../etc", "\x00"])),
        "model/pair mismatch": dict(texts=ok, model=name, source_language=src + "x"),
    }
    variant = rng.choice(sorted(cases))
    req = pb.TranslateRequest(request_id=f"stress-{index}", **cases[variant])
    return Plan("invalid", variant, codes("INVALID_ARGUMENT"), req.SerializeToString())


def garbage_plan(rng: random.Random, index: int, target: Target, texts: list[str]) -> Plan:
    valid = request_of(rng, index, target, texts, "greedy", 2).SerializeToString()
    texts_tag = bytes([pb.TranslateRequest.DESCRIPTOR.fields_by_name["texts"].number << 3 | 2])
    bad = codes("INVALID_ARGUMENT", "OK", "RESOURCE_EXHAUSTED")  # random bytes may parse as a request
    variant = rng.choice(["random", "truncated", "flipped", "bad utf-8", "huge length", "empty",
                          "model info", "unknown method", "oversized"])
    if variant == "random":
        return Plan("garbage", variant, bad, rng.randbytes(rng.randint(1, 300)))
    if variant == "truncated":
        return Plan("garbage", variant, bad, valid[:rng.randint(1, len(valid) - 1)])
    if variant == "flipped":
        data = bytearray(valid)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        return Plan("garbage", variant, bad, bytes(data))
    if variant == "bad utf-8":
        return Plan("garbage", variant, codes("INVALID_ARGUMENT"), texts_tag + b"\x02\xc3\x28")
    if variant == "huge length":
        return Plan("garbage", variant, codes("INVALID_ARGUMENT"), texts_tag + b"\xff\xff\xff\xff\x07abc")
    if variant == "empty":  # the empty message: a request without texts
        return Plan("garbage", variant, codes("INVALID_ARGUMENT"), b"")
    if variant == "model info":
        return Plan("garbage", variant, codes("OK", "INVALID_ARGUMENT"), rng.randbytes(rng.randint(1, 64)),
                    method="GetModelInfo")
    if variant == "unknown method":
        return Plan("garbage", variant, codes("UNIMPLEMENTED"), valid, method="Nope")
    return Plan("garbage", variant, codes("RESOURCE_EXHAUSTED"), b"\x00" * (target.max_message_bytes + 1))


# -- checking answers -----------------------------------------------------------------------------
Answer = tuple[tuple[tuple[int, ...], str, float, float], ...]  # per hypothesis: tokens, text, score, lp


def answer_of(t: pb.Translation) -> Answer:
    return tuple((tuple(h.tokens), h.text, h.score if h.HasField("score") else math.nan,
                  h.log_prob if h.HasField("log_prob") else math.nan) for h in t.hypotheses)


def same_answer(a: Answer, b: Answer, tol: float = 1e-3) -> bool:
    def close(x: float, y: float) -> bool:
        return (math.isnan(x) and math.isnan(y)) or abs(x - y) <= tol * max(1.0, abs(y))

    return len(a) == len(b) and all(
        ta == tb and xa == xb and close(sa, sb) and close(la, lb)
        for (ta, xa, sa, la), (tb, xb, sb, lb) in zip(a, b))


def check_response(plan: Plan, response: pb.TranslateResponse) -> list[str]:
    """Structural problems of an OK answer: request id, one translation per text, n-best, scores."""
    req, errs = plan.request, []
    assert req is not None
    if response.request_id != req.request_id:
        errs.append(f"{req.request_id}: answered as {response.request_id!r}")
    if len(response.translations) != len(req.texts):
        errs.append(f"{req.request_id}: {len(response.translations)} translations for {len(req.texts)} texts")
    o = req.options
    n_best = o.n_best if o.HasField("n_best") else 1
    for i, t in enumerate(response.translations):
        if len(t.hypotheses) != n_best:
            errs.append(f"{req.request_id}: text {i} has {len(t.hypotheses)} hypotheses, n_best {n_best}")
        elif t.hypotheses and t.text != t.hypotheses[0].text:
            errs.append(f"{req.request_id}: text {i}: translation text is not the best hypothesis")
        if any(h.HasField("score") != o.return_scores for h in t.hypotheses):
            errs.append(f"{req.request_id}: text {i}: scores asked={o.return_scores}, not so returned")
    return errs


@dataclass
class AnswerBook:
    """Answers per (model, model version, serialized options, text); a second, different answer to one
    key is a mix-up. The version is part of the key: a reload may change every answer."""

    answers: dict[tuple[str, str, bytes, str], Answer] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, model: str, version: str, options: bytes, text: str, answer: Answer) -> str | None:
        with self.lock:
            first = self.answers.setdefault((model, version, options, text), answer)
        if not same_answer(answer, first):
            return f"two answers of version {version[:12]} to {text[:40]!r} differ: {first} vs {answer}"
        return None
