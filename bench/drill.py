"""Fault drill: `nmt serve` replicas behind HAProxy (the shipped deploy/haproxy.cfg) under load and faults.

    python -m bench.drill --model-dir BUNDLE [--replicas 3] [--seed 0] [--json out.json]

Loopback only, bounded (every wait has a timeout), seeded (which replica is hit, which texts are sent).
While concurrent Translate calls and repeated `nmt batch` runs of the test set go through the
balancer, each fault in turn:
  kill     SIGKILL one replica, restart it after --down-seconds
  rolling  SIGTERM (drain) every replica one at a time, each restarted before the next
  stop     SIGSTOP one replica for --stop-seconds, then SIGCONT
Reported per fault: calls sent / succeeded / failed by status code, attempts re-sent by the client's
retry policy and by the balancer, p50/p99 before, during and after, and whether every batch output is
byte-identical to the fault-free run. Exit status 1 when a goal is missed (0 failed calls for
rolling, 0 failed for kill, every batch output identical).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc

from bench.drill_cluster import REPO, Balancer, Replica, free_port
from bench.stress.server import StressError
from nmt.decoding import DecodeOptions
from serve.protocol.client import TranslatorClient

FAULTS = ("kill", "rolling", "stop")
LOAD_AGENT = "nmt-drill-load"  # user agent of the Translate load, told apart in the balancer's log


@dataclass
class Call:
    start: float
    seconds: float
    code: str  # "OK" or the grpc.StatusCode name


@dataclass
class FaultReport:
    fault: str
    sent: int = 0
    succeeded: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    client_resent: int = 0  # attempts beyond the first, from the balancer's log
    balancer_retries: int = 0  # HAProxy's own retries / redispatches
    latency_ms: dict[str, dict[str, float]] = field(default_factory=dict)  # phase -> p50/p99/n
    batch_runs: int = 0
    batch_identical: int = 0
    batch_retries: int = 0
    fault_seconds: float = 0.0

    @property
    def failed_total(self) -> int:
        return sum(self.failed.values())


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


class Load:
    """Threads sending Translate calls of 1-4 test sentences through the balancer until stopped."""

    def __init__(self, target: str, texts: list[str], threads: int, seed: int, timeout: float):
        self.calls: list[Call] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        rngs = [random.Random(seed * 1000 + i) for i in range(threads)]
        self._threads = [threading.Thread(target=self._run, args=(target, texts, rng, timeout), daemon=True)
                         for rng in rngs]
        for t in self._threads:
            t.start()

    def _run(self, target: str, texts: list[str], rng: random.Random, timeout: float) -> None:
        with TranslatorClient(target, user_agent=LOAD_AGENT) as client:
            while not self._stop.is_set():
                batch = rng.sample(texts, rng.randint(1, 4))
                t0 = time.monotonic()
                try:
                    client.translate(batch, DecodeOptions(), timeout=timeout)
                    code = "OK"
                except grpc.RpcError as e:
                    code = e.code().name
                with self._lock:
                    self.calls.append(Call(t0, time.monotonic() - t0, code))

    def stop(self) -> list[Call]:
        self._stop.set()
        for t in self._threads:
            t.join(60)
        return self.calls


class BatchLoop:
    """`nmt batch` of the input through the balancer, again and again until stopped; each output compared
    with the fault-free one."""

    def __init__(self, target: str, input_path: Path, reference: bytes | None, work: Path, tag: str):
        self.runs = self.identical = self.retries = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._args = (target, input_path, reference, work, tag)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        target, input_path, reference, work, tag = self._args
        while True:
            out = work / f"batch-{tag}-{self.runs}.txt"
            data, retries, err = run_batch(target, input_path, out)
            self.runs += 1
            self.retries += retries
            if err:
                self.errors.append(err)
            elif data == reference:
                self.identical += 1
            if self._stop.is_set():
                return  # the last run started before the fault phase ended, so it saw all of it

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(600)


def run_batch(target: str, input_path: Path, out: Path) -> tuple[bytes, int, str]:
    """(output bytes, retries the job reported, error line or "")."""
    cmd = [sys.executable, "-m", "nmt", "batch", "--server", target, str(input_path), str(out), "--restart",
           "--no-progress", "--timeout", "30", "--give-up-after", "60", "--chunk-size", "16",
           "--in-flight", "64"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    m = re.search(r"retries: (\d+)", r.stdout + r.stderr)
    if r.returncode != 0:
        return b"", 0, (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
    return out.read_bytes(), int(m.group(1)) if m else 0, ""


def wait_all_up(replicas: list[Replica], balancer: Balancer, timeout: float = 30.0) -> None:
    """Until HAProxy's health checks report every replica UP."""
    import urllib.request

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{balancer.metrics_port}/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:  # not listening yet
            time.sleep(0.2)
            continue
        pattern = r'^haproxy_server_status\{proxy="[^"]+",server="([^"]+)",state="UP"\} 1'
        up = set(re.findall(pattern, text, re.M))
        if all(r.name in up for r in replicas):
            return
        time.sleep(0.2)
    raise TimeoutError("the balancer never saw every replica UP")


def inject(fault: str, replicas: list[Replica], balancer: Balancer, rng: random.Random, args) -> None:
    if fault == "kill":
        victim = rng.choice(replicas)
        victim.signal(signal.SIGKILL)
        victim.wait_exit(10)
        time.sleep(args.down_seconds)
        victim.start()
    elif fault == "rolling":
        for r in replicas:
            r.signal(signal.SIGTERM)
            r.wait_exit(args.drain_seconds + 15)
            r.start()
            wait_all_up(replicas, balancer)  # the next one goes down only when this one takes traffic
    elif fault == "stop":
        victim = rng.choice(replicas)
        victim.signal(signal.SIGSTOP)
        time.sleep(args.stop_seconds)
        victim.signal(signal.SIGCONT)
    wait_all_up(replicas, balancer)


def log_attempts(log_path: Path, offset: int) -> tuple[int, int, int]:
    """(load attempts, balancer retries on them, end offset) from the balancer's access log after
    `offset`: every attempt of a Translate call is one line; HAProxy's retries are the last of the
    connection counters after the termination state, e.g. `---- 1/1/1/1/+1` (+: redispatched)."""
    text = log_path.read_text(encoding="utf-8", errors="replace")
    attempts = retries = 0
    for line in text[offset:].splitlines():
        if "/nmt.v1.Translator/Translate " not in line or LOAD_AGENT not in line:
            continue
        attempts += 1
        m = re.search(r" [-A-Za-z]{4} \d+/\d+/\d+/\d+/\+?(\d+) ", line)
        retries += int(m.group(1)) if m else 0
    return attempts, retries, len(text)


def drill(args) -> list[FaultReport]:
    rng = random.Random(args.seed)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    texts = read_input(args.input, args.lines)
    input_path = work / "input.en"
    input_path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    replicas = [Replica(f"r{i + 1}", Path(args.model_dir), free_port(), args.drain_seconds, work)
                for i in range(args.replicas)]
    balancer = None
    try:
        with ThreadPoolExecutor(len(replicas)) as pool:  # in parallel: loading the model takes seconds
            list(pool.map(lambda r: r.start(), replicas))
        balancer = Balancer([(r.name, r.port) for r in replicas], work, access_log=True)
        wait_all_up(replicas, balancer)
        reference, _, err = run_batch(balancer.address, input_path, work / "batch-reference.txt")
        if err:
            raise RuntimeError(f"the fault-free batch failed: {err}")
        reports = []
        for fault in args.faults:
            reports.append(one_fault(fault, replicas, balancer, texts, reference, input_path, rng, args))
        return reports
    finally:
        for r in replicas:
            r.stop()
        if balancer is not None:
            balancer.stop()


def one_fault(fault: str, replicas: list[Replica], balancer: Balancer, texts: list[str], reference: bytes,
              input_path: Path, rng: random.Random, args) -> FaultReport:
    offset = balancer.log_path.stat().st_size
    load = Load(balancer.address, texts, args.load_threads, rng.randrange(1 << 30), args.timeout)
    batches = BatchLoop(balancer.address, input_path, reference, Path(args.work_dir), fault)
    time.sleep(args.phase_seconds)
    t_fault = time.monotonic()
    inject(fault, replicas, balancer, rng, args)
    t_back = time.monotonic()
    time.sleep(args.phase_seconds)
    batches.stop()
    calls = load.stop()
    time.sleep(0.5)  # the balancer writes its last log lines
    attempts, balancer_retries, _ = log_attempts(balancer.log_path, offset)
    rep = FaultReport(fault, sent=len(calls), succeeded=sum(c.code == "OK" for c in calls),
                      client_resent=max(attempts - len(calls), 0), balancer_retries=balancer_retries,
                      batch_runs=batches.runs, batch_identical=batches.identical,
                      batch_retries=batches.retries,
                      fault_seconds=round(t_back - t_fault, 2))
    for c in calls:
        if c.code != "OK":
            rep.failed[c.code] = rep.failed.get(c.code, 0) + 1
    for e in batches.errors:
        rep.failed[f"batch: {e}"] = rep.failed.get(f"batch: {e}", 0) + 1
    phases = {"before": lambda t: t < t_fault, "during": lambda t: t_fault <= t < t_back,
              "after": lambda t: t >= t_back}
    for name, inside in phases.items():
        ms = [c.seconds * 1000 for c in calls if inside(c.start) and c.code == "OK"]
        rep.latency_ms[name] = {"p50": round(percentile(ms, 0.5), 1), "p99": round(percentile(ms, 0.99), 1),
                                "n": len(ms)}
    return rep


def read_input(path: str | None, limit: int | None) -> list[str]:
    if path is None:
        data_dir = Path(os.environ.get("NMT_DATA_DIR", REPO.parent / "shared" / "data" / "multi30k"))
        path = str(data_dir / "test_2016_flickr.en.gz")
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    return lines[:limit] if limit else lines


def goals_missed(reports: list[FaultReport]) -> list[str]:
    missed = []
    for r in reports:
        if r.batch_identical != r.batch_runs:
            missed.append(f"{r.fault}: {r.batch_runs - r.batch_identical} batch outputs differ or failed")
        if r.fault in ("rolling", "kill") and r.failed_total:
            missed.append(f"{r.fault}: {r.failed_total} failed calls {r.failed}")
    return missed


def table(reports: list[FaultReport]) -> str:
    head = ("| fault | sent | ok | failed | client re-sent | balancer retries | p50/p99 ms before | during "
            "| after | batch runs identical | batch retries |")
    rows = [head, "|" + "---|" * 11]
    for r in reports:
        lat = [f"{r.latency_ms[p]['p50']:.0f} / {r.latency_ms[p]['p99']:.0f}" for p in ("before", "during",
                                                                                         "after")]
        failed = ", ".join(f"{k} {v}" for k, v in r.failed.items()) or "0"
        rows.append(f"| {r.fault} ({r.fault_seconds:.1f} s) | {r.sent} | {r.succeeded} | {failed} "
                    f"| {r.client_resent} | {r.balancer_retries} | {' | '.join(lat)} "
                    f"| {r.batch_identical}/{r.batch_runs} | {r.batch_retries} |")
    return "\n".join(rows)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.drill", description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", required=True, help="bundle every replica serves")
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--faults", nargs="+", choices=FAULTS, default=list(FAULTS))
    p.add_argument("--input", help="source text (default: Multi30k test2016 English from $NMT_DATA_DIR)")
    p.add_argument("--lines", type=int, help="only the first N lines of the input")
    p.add_argument("--load-threads", type=int, default=4, help="concurrent Translate callers")
    p.add_argument("--phase-seconds", type=float, default=5.0, help="load before and after each fault")
    p.add_argument("--down-seconds", type=float, default=3.0, help="kill: time before the restart")
    p.add_argument("--stop-seconds", type=float, default=4.0, help="stop: time between SIGSTOP and SIGCONT")
    p.add_argument("--drain-seconds", type=float, default=10.0, help="each replica's --drain-seconds")
    p.add_argument("--timeout", type=float, default=30.0, help="deadline of one Translate call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default="bench/results/drill", help="logs, configs and batch outputs")
    p.add_argument("--json", help="write the reports here")
    args = p.parse_args(argv)
    if args.replicas < 2:
        p.error("--replicas must be at least 2 (one fault at a time must leave a server)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        reports = drill(args)
    except (RuntimeError, TimeoutError, OSError, StressError) as e:
        print(f"drill: {e}", file=sys.stderr)
        return 1
    print(table(reports))
    if args.json:
        text = json.dumps([asdict(r) for r in reports], indent=2) + "\n"
        Path(args.json).write_text(text, encoding="utf-8")
    missed = goals_missed(reports)
    for m in missed:
        print(f"goal missed: {m}", file=sys.stderr)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
