"""HTTP overhead, measured: one sentence through the in-process engine, gRPC and the HTTP API.

    .venv/bin/python -m bench.http_bench --model-dir bundles/en-de [--device cpu] [--requests 300]

One `nmt serve --http-port` process serves both ports (the same scheduler); the engine runs in this
process. Sentences go one at a time, in blocks that alternate engine / gRPC / HTTP so a shared
machine's load drift hits all three alike (as bench.grpc_bench). HTTP keeps its connection open, as
LibreTranslate clients with a session do; a JSON POST to /translate per sentence, with the source
language named and with `auto` (language detection).
"""

from __future__ import annotations

import argparse
import http.client
import json
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench.grpc_bench import REPO, percentiles, start_server
from serve.protocol.client import TranslatorClient


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def interleaved(fns: list[Callable[[str], object]], texts: list[str], n: int,
                block: int = 25) -> list[list[float]]:
    for text in texts[:10]:  # warm-up
        for fn in fns:
            fn(text)
    out: list[list[float]] = [[] for _ in fns]
    for first in range(0, n, block):
        chunk = [texts[i % len(texts)] for i in range(first, min(n, first + block))]
        for fn, times in zip(fns, out):
            for text in chunk:
                start = time.perf_counter()
                fn(text)
                times.append(time.perf_counter() - start)
    return out


def measure(bundle: Path, texts: list[str], device: str = "cpu", requests: int = 300) -> dict[str, float]:
    from serve.engine.translator import EngineConfig, Translator

    port = free_port()
    proc, target = start_server(bundle, device, ["--http-port", str(port)])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def via_http(text: str, source: str = "") -> str:
        conn.request("POST", "/translate", json.dumps({"q": text, "source": source or src, "target": tgt}),
                     {"Content-Type": "application/json"})
        r = conn.getresponse()
        body = json.loads(r.read())
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {body}")
        return body["translatedText"]

    try:
        engine = Translator.from_bundle(bundle, EngineConfig(device=device))
        src, tgt = engine.src_lang, engine.tgt_lang
        with TranslatorClient(target) as client:
            mismatch = [t for t in texts[:20] if via_http(t) != client.translate([t])[0].text]
            if mismatch:  # a sentence the splitter cuts in two is not the same request: say so
                print(f"note: {len(mismatch)} of 20 sentences differ between HTTP and gRPC", file=sys.stderr)
            lat = interleaved([lambda t: engine.translate([t]), lambda t: client.translate([t], timeout=60),
                               via_http, lambda t: via_http(t, "auto")], texts, requests)
    finally:
        conn.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    names = ("engine", "grpc", "http", "http_auto")
    result = {"requests": float(requests)}
    for name, times in zip(names, lat):
        result[f"{name}_p50_ms"], result[f"{name}_p99_ms"] = percentiles(times)
    return result


def markdown(r: dict[str, float]) -> str:
    rows = ["| one sentence via | p50 ms | p99 ms | p50 vs engine |", "|---|---|---|---|"]
    for name, label in (("engine", "engine in-process"), ("grpc", "gRPC Translate"),
                        ("http", "HTTP POST /translate (JSON)"),
                        ("http_auto", "HTTP POST /translate (JSON, source auto)")):
        rows.append(f"| {label} | {r[name + '_p50_ms']:.2f} | {r[name + '_p99_ms']:.2f} | "
                    f"{r[name + '_p50_ms'] / r['engine_p50_ms']:.2f}x |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu")
    p.add_argument("--requests", type=int, default=300, help="sequential requests per row")
    args = p.parse_args(argv)
    import gzip
    import os

    data = Path(os.environ.get("NMT_DATA_DIR", REPO.parent / "shared" / "data" / "multi30k"))
    with gzip.open(data / "test_2016_flickr.en.gz", "rt", encoding="utf-8") as f:
        texts = [line.strip() for line in f if line.strip()]
    print(markdown(measure(args.model_dir, texts, args.device, args.requests)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
