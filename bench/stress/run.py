"""`nmt stress`: a seeded, bounded stress and fuzz run against a translation server.

    nmt stress --model-dir bundles/en-de --seed 1 --requests 2000 --seconds 120 --concurrency 16
    nmt stress --server localhost:50051 --server-pid 1234 --json stress.json

Every request is planned from (seed, index) alone, so a run replays request for request whatever the
thread interleaving. Kinds of request, each with the status codes it may get:
  valid       1..max_texts texts, greedy/beam/n-best/scores, every routing style      OK (RESOURCE_EXHAUSTED)
  fuzz        random unicode (astral, control, combining, empty) and extreme options   OK, INVALID_ARGUMENT
  invalid     empty/too many/over-long texts, bad options, unknown or path-like model  INVALID_ARGUMENT
  garbage     raw bytes: random, truncated, flipped, bad UTF-8, huge length prefix, oversized message,
              unknown method                                                       INVALID_ARGUMENT, ...
  deadline    deadlines of 1-30 ms                                                 DEADLINE_EXCEEDED, OK
  cancelled   the client cancels mid-call (future.cancel())                        CANCELLED, OK
  disconnect  the client closes its channel mid-call                               CANCELLED, OK
  unauthenticated  (with --auth-token) a request without the token                 UNAUTHENTICATED
With --model-dir the server is a child `nmt serve --port 0`, stopped with SIGTERM at the end: it must
drain and exit 0 without having logged a traceback. With --reload-bundle DIR (and --auth-token) a thread
reloads the model during the load (bench/stress/reload.py); answers are then kept per model version
(TranslateResponse.model_version), and the run also fails when a good bundle is not taken, the corrupt
copy is not refused, or fewer than two versions answered.

The run fails when the server dies or stops answering health, a code outside a kind's set appears
(INTERNAL and UNKNOWN never are in one), an answer is wrong (request_id, count or n-best mismatch, two
answers of one version to one text differ, or an answer of the version serving at the end differs from
the text sent alone after the load), or the server's RSS grows beyond --max-rss-growth-mb between
warm-up and the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.stress.plan import (
    KINDS,
    PRESETS,
    Answer,
    AnswerBook,
    Plan,
    Target,
    answer_of,
    check_response,
    codes,
    plan_request,
    request_of,
    same_answer,
)
from bench.stress.reload import BundleReloader, ReloadStats, model_versions, summary
from bench.stress.server import ServerProcess, StressError, model_info, rss_mb, wait_serving
from nmt.v1 import translator_pb2 as pb
from serve.protocol.convert import SERVICE

# -- the run ---------------------------------------------------------------------------------------
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 * 2**20), ("grpc.max_send_message_length", -1)]


@dataclass
class StressConfig:
    address: str  # HOST:PORT of the server
    server_pid: int | None = None  # for its RSS
    seed: int = 0
    requests: int = 1000
    seconds: float = 60.0
    concurrency: int = 8
    auth_token: str | None = None
    max_rss_growth_mb: float = 256.0
    verify_max: int = 2000  # answers re-checked alone after the load (a seeded sample beyond this)
    texts: list[str] = field(default_factory=list)  # valid texts (default: generated sentences)
    connect_timeout: float = 10.0
    reload_bundles: list[Path] = field(default_factory=list)  # alternatives the model is reloaded with
    reload_every: float = 5.0  # seconds between reloads
    original_bundle: Path | None = None  # the bundle served at the start (--model-dir), reloaded in turn


@dataclass
class StressReport:
    seed: int
    counts: dict[str, Counter] = field(default_factory=dict)  # kind -> status code name -> requests
    latencies_ms: list[float] = field(default_factory=list)  # valid requests answered OK
    verified: int = 0  # (model, version, options, text) answers compared with the text sent alone
    versions: Counter = field(default_factory=Counter)  # model_version -> OK Translate answers
    reloads: ReloadStats | None = None  # with --reload-bundle
    rss_before_mb: float | None = None
    rss_after_mb: float | None = None
    health_checks: int = 0
    elapsed_s: float = 0.0
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def sent(self) -> int:
        return sum(sum(c.values()) for c in self.counts.values())

    def percentile(self, q: float) -> float | None:
        xs = sorted(self.latencies_ms)
        return xs[min(len(xs) - 1, int(q / 100 * len(xs)))] if xs else None

    def to_json(self) -> dict:
        return {"seed": self.seed, "passed": self.passed, "sent": self.sent, "elapsed_s": self.elapsed_s,
                "counts": {k: dict(c) for k, c in self.counts.items()}, "p50_ms": self.percentile(50),
                "p99_ms": self.percentile(99), "valid_ok": len(self.latencies_ms), "verified": self.verified,
                "rss_before_mb": self.rss_before_mb, "rss_after_mb": self.rss_after_mb,
                "health_checks": self.health_checks, "versions": dict(self.versions),
                "reloads": self.reloads.to_json() if self.reloads else None, "failures": self.failures}

    def table(self) -> str:
        names = sorted({c for counts in self.counts.values() for c in counts}, key=lambda c: (c != "OK", c))
        rows = [["kind", "sent", *names]]
        for kind in KINDS:
            if kind in self.counts:
                c = self.counts[kind]
                rows.append([kind, str(sum(c.values())), *(str(c.get(n, "")) for n in names)])
        rows.append(["total", str(self.sent), *(str(sum(c.get(n, 0) for c in self.counts.values()))
                                                 for n in names)])
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths)))
                 for r in rows]
        p50, p99 = self.percentile(50), self.percentile(99)
        lines.append(f"seed {self.seed}: {self.sent} requests in {self.elapsed_s:.1f}s; valid OK "
                     f"{len(self.latencies_ms)}, latency p50 {fmt(p50)} ms, p99 {fmt(p99)} ms")
        lines.append(f"answers checked against the text sent alone: {self.verified}; "
                     f"health checks: {self.health_checks}")
        before, after = self.rss_before_mb, self.rss_after_mb
        if before is not None and after is not None:
            lines.append(f"server RSS: {before:.1f} MiB after warm-up, {after:.1f} MiB at the end "
                         f"({after - before:+.1f} MiB)")
        lines += summary(self.reloads, self.versions)
        lines += [f"FAIL: {f}" for f in self.failures[:20]]
        if len(self.failures) > 20:
            lines.append(f"... and {len(self.failures) - 20} more failures")
        lines.append("PASS" if self.passed else f"FAIL ({len(self.failures)} problems)")
        return "\n".join(lines)


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


class StressRun:
    """Workers send planned requests until the count or the time is used up; a monitor checks health."""

    def __init__(self, config: StressConfig, server: ServerProcess | None = None):
        self.config, self.server = config, server
        self.channel = grpc.insecure_channel(config.address, CHANNEL_OPTIONS)
        self.metadata = [("authorization", f"Bearer {config.auth_token}")] if config.auth_token else []
        self.report = StressReport(seed=config.seed)
        self.book = AnswerBook()
        self.lock = threading.Lock()
        self.next_index = 0
        self.done = threading.Event()  # load over, or the server is gone

    def fail(self, message: str) -> None:
        with self.lock:
            self.report.failures.append(message)

    def call(self, plan: Plan) -> tuple[str, float, bytes | None]:
        """Send one planned request as raw bytes; (status code name, latency ms, response bytes)."""
        own = plan.kind == "disconnect"
        channel = grpc.insecure_channel(self.config.address, CHANNEL_OPTIONS) if own else self.channel
        rpc = channel.unary_unary(f"/{SERVICE}/{plan.method}")  # no serializers: bytes in, bytes out
        started = time.perf_counter()
        try:
            metadata = self.metadata if plan.auth else []
            future = rpc.future(plan.payload, timeout=plan.timeout, metadata=metadata)
            if plan.kind in ("cancelled", "disconnect"):
                time.sleep(plan.delay)
                future.cancel() if plan.kind == "cancelled" else channel.close()
            try:
                body = future.result()
                return "OK", (time.perf_counter() - started) * 1e3, body
            except grpc.FutureCancelledError:
                return "CANCELLED", (time.perf_counter() - started) * 1e3, None
            except grpc.RpcError as e:
                return e.code().name, (time.perf_counter() - started) * 1e3, None
        finally:
            if own:
                channel.close()

    def observe(self, plan: Plan, code: str, ms: float, body: bytes | None) -> None:
        with self.lock:
            self.report.counts.setdefault(plan.kind, Counter())[code] += 1
        if code not in plan.allowed:
            self.fail(f"{plan.kind} ({plan.variant}): got {code}, expected one of {sorted(plan.allowed)}")
        if code != "OK" or plan.request is None or body is None:
            return
        response = pb.TranslateResponse.FromString(body)
        problems = check_response(plan, response)
        version = response.model_version
        if not version and self.config.reload_bundles:
            problems.append(f"{plan.request.request_id}: no model_version: versions cannot be told apart")
        with self.lock:
            self.report.versions[version] += 1
        options = plan.request.options.SerializeToString()
        for text, t in zip(plan.request.texts, response.translations):
            problem = self.book.record(response.model, version, options, text, answer_of(t))
            if problem:
                problems.append(problem)
        for p in problems:
            self.fail(p)
        if plan.kind == "valid":
            with self.lock:
                self.report.latencies_ms.append(ms)

    def worker(self, target: Target, end: float) -> None:
        while not self.done.is_set() and time.monotonic() < end:
            with self.lock:
                index = self.next_index
                self.next_index += 1
            if index >= self.config.requests:
                return
            c = self.config
            plan = plan_request(c.seed, index, target, c.texts, bool(c.auth_token))
            self.observe(plan, *self.call(plan))

    def health(self) -> str:
        stub = health_pb2_grpc.HealthStub(self.channel)
        try:
            status = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5).status
            return health_pb2.HealthCheckResponse.ServingStatus.Name(status)
        except grpc.RpcError as e:
            return e.code().name

    def monitor(self) -> None:
        while not self.done.wait(0.5):
            status = self.health()
            self.report.health_checks += 1
            if self.server is not None and self.server.proc.poll() is not None:
                self.fail(f"the server died (exit code {self.server.proc.returncode})")
                self.done.set()
            elif status != "SERVING":
                self.fail(f"health answered {status} during the run")
                self.done.set()

    def target(self) -> Target:
        try:
            info = model_info(self.channel, self.metadata, timeout=10)
        except grpc.RpcError as e:
            raise StressError(f"{self.config.address}: GetModelInfo failed: {e.code().name}: "
                              f"{e.details()}") from None
        if not info.models:
            raise StressError(f"{self.config.address}: the server serves no model")
        return Target(max_texts=info.limits.max_texts, max_chars=info.limits.max_chars,
                      max_message_bytes=info.limits.max_message_bytes,
                      max_source_tokens=min(m.max_source_tokens for m in info.models),
                      models=[(m.name, m.source_language, m.target_language) for m in info.models])

    def alone(self, model: str, version: str, options: bytes, text: str) -> Answer | str:
        """The answer of `version` to one text sent alone (or why there is none)."""
        request = pb.TranslateRequest(request_id="alone", texts=[text], model=model,
                                      options=pb.DecodingOptions.FromString(options))
        code, _, body = self.call(Plan("valid", "alone", codes("OK"), request.SerializeToString()))
        if body is None:
            return code
        response = pb.TranslateResponse.FromString(body)
        if response.model_version != version:
            return f"OK from version {response.model_version[:12]}, not {version[:12]}"
        return answer_of(response.translations[0])

    def warm_up(self, target: Target) -> None:
        """Each preset once, so first-use allocations do not count as growth."""
        rng = random.Random(self.config.seed)
        for preset in PRESETS:
            req = request_of(rng, -1, target, self.config.texts, preset, 4)
            code, _, _ = self.call(Plan("valid", preset, codes("OK"), req.SerializeToString()))
            if code != "OK":
                raise StressError(f"{self.config.address}: a warm-up request failed with {code}")

    def verify(self) -> None:
        """Send each text the serving versions answered alone (a seeded sample beyond verify_max) and
        compare the answers; answers of versions replaced by a reload are not sent again."""
        serving = model_versions(self.channel, self.metadata)
        # "": a server that does not name versions (so run without reloads)
        keys = sorted(k for k in self.book.answers if k[1] in (serving.get(k[0]), ""))
        if len(keys) > self.config.verify_max:
            keys = random.Random(self.config.seed).sample(keys, self.config.verify_max)
        for model, version, options, text in keys:
            got, want = self.book.answers[(model, version, options, text)], self.alone(model, version,
                                                                                      options, text)
            if isinstance(want, str):
                self.fail(f"{text[:40]!r} sent alone failed with {want}")
            elif not same_answer(got, want):
                self.fail(f"{text[:40]!r}: answer under load {got} differs from the text alone {want}")
        self.report.verified = len(keys)

    def run(self) -> StressReport:
        c, report = self.config, self.report
        try:
            grpc.channel_ready_future(self.channel).result(timeout=c.connect_timeout)
        except grpc.FutureTimeoutError:
            raise StressError(f"no server answering at {c.address}") from None
        target = self.target()
        self.warm_up(target)
        report.rss_before_mb = rss_mb(c.server_pid)
        started = time.monotonic()
        monitor = threading.Thread(target=self.monitor, daemon=True)
        monitor.start()
        workers = [threading.Thread(target=self.worker, args=(target, started + c.seconds), daemon=True)
                   for _ in range(c.concurrency)]
        reloader = None
        if c.reload_bundles:
            reloader = BundleReloader(self.channel, self.metadata, c.original_bundle, c.reload_bundles,
                                      c.reload_every, self.fail)
            report.reloads = reloader.stats
            reloading = threading.Thread(target=reloader.run, args=(self.done,), daemon=True)
            reloading.start()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        report.elapsed_s = time.monotonic() - started
        alive = not self.done.is_set()
        self.done.set()
        monitor.join()
        if reloader is not None:
            reloading.join()
            for problem in reloader.final_checks(report.versions):
                self.fail(problem)
        if alive:
            time.sleep(0.5)  # cancelled work leaves the engine within a step; let the server settle
            report.rss_after_mb = rss_mb(c.server_pid)
            self.verify()
            if self.health() != "SERVING":
                self.fail(f"health answered {self.health()} after the run")
        growth = (report.rss_after_mb or 0) - (report.rss_before_mb or 0)
        if report.rss_before_mb and report.rss_after_mb and growth > c.max_rss_growth_mb:
            self.fail(f"server RSS grew by {growth:.1f} MiB, over the bound of {c.max_rss_growth_mb} MiB")
        self.channel.close()
        return report


def run_stress(config: StressConfig, model_dir: Path | None = None) -> StressReport:
    """The whole run; with `model_dir` a server is started on port 0 for it and stopped (SIGTERM) after."""
    server = ServerProcess(model_dir, config.auth_token) if model_dir is not None else None
    try:
        if server is not None:
            config.address, config.server_pid = f"127.0.0.1:{server.port}", server.proc.pid
            config.original_bundle = model_dir
            wait_serving(config.address)
        report = StressRun(config, server).run()
    finally:
        exit_code = server.stop() if server is not None else 0
    if server is not None:
        if exit_code != 0:
            report.failures.append(f"the server exited with code {exit_code} on SIGTERM")
        errors = server.tracebacks
        if errors:
            distinct = "; ".join(dict.fromkeys(errors))
            report.failures.append(f"the server logged {len(errors)} traceback(s): {distinct}")
    return report


# -- nmt stress ------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="nmt stress", description="Seeded stress and fuzz run against a server.")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--server", help="HOST:PORT of a running server")
    where.add_argument("--model-dir", type=Path, help="a bundle: start a server for it on port 0")
    p.add_argument("--server-pid", type=int, help="with --server: its process id, to watch its RSS")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--requests", type=int, default=1000, help="requests to send at most")
    p.add_argument("--seconds", type=float, default=60.0, help="time to send them in at most")
    p.add_argument("--concurrency", type=int, default=8, help="clients sending at once")
    p.add_argument("--auth-token", default=os.environ.get("NMT_AUTH_TOKEN"),
                   help="bearer token (default: $NMT_AUTH_TOKEN); also adds requests without it")
    p.add_argument("--max-rss-growth-mb", type=float, default=256.0,
                   help="fail when the server's RSS grows more than this from warm-up to the end")
    p.add_argument("--verify-max", type=int, default=2000, help="answers re-checked alone after the load")
    p.add_argument("--texts", type=Path, help="valid texts, one per line (default: generated sentences)")
    p.add_argument("--connect-timeout", type=float, default=10.0, help="seconds to wait for the server")
    p.add_argument("--reload-bundle", type=Path, action="append", default=[], metavar="DIR",
                   help="during the load, reload the model with this bundle (repeatable), in turn with "
                        "the --model-dir one, and once a corrupt copy; needs --auth-token; server-side paths")
    p.add_argument("--reload-every", type=float, default=5.0, help="seconds between reloads")
    p.add_argument("--json", type=Path, help="also write the report as JSON here")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    for flag in ("requests", "concurrency", "seconds", "reload_every"):
        if getattr(args, flag) <= 0:
            raise StressError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.reload_bundle and not args.auth_token:
        raise StressError("--reload-bundle needs --auth-token: ReloadModel takes the server's token")
    if args.model_dir is not None and not args.model_dir.is_dir():
        raise StressError(f"--model-dir {args.model_dir}: no such directory")
    lines = args.texts.read_text(encoding="utf-8").splitlines() if args.texts else []
    texts = [t for t in lines if t.strip()]
    config = StressConfig(address=args.server or "", server_pid=args.server_pid, seed=args.seed,
                          requests=args.requests, seconds=args.seconds, concurrency=args.concurrency,
                          auth_token=args.auth_token, max_rss_growth_mb=args.max_rss_growth_mb,
                          verify_max=args.verify_max, texts=texts, connect_timeout=args.connect_timeout,
                          reload_bundles=args.reload_bundle, reload_every=args.reload_every)
    report = run_stress(config, args.model_dir)
    print(report.table())
    if args.json is not None:
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(report.to_json(), indent=2) + "\n")
        os.replace(tmp, args.json)
    return 0 if report.passed else 1
