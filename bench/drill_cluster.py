"""The processes of `python -m bench.drill`: `nmt serve` replicas on fixed loopback ports and HAProxy
running the shipped deploy/haproxy.cfg with only its addresses substituted.

A replica keeps its port across restarts (the balancer's config names it), so the drill picks the
ports up front. Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from bench.stress.server import StressError, wait_serving

REPO = Path(__file__).resolve().parents[1]
HAPROXY_CFG = REPO / "deploy" / "haproxy.cfg"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Replica:
    """One `nmt serve` on 127.0.0.1:port; start() waits until it reports SERVING."""

    def __init__(self, name: str, model_dir: Path, port: int, drain_seconds: float, log_dir: Path,
                 http_port: int | None = None):
        self.name, self.model_dir, self.port, self.http_port = name, model_dir, port, http_port
        self.drain_seconds = drain_seconds
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        env.pop("NMT_AUTH_TOKEN", None)
        cmd = [sys.executable, "-m", "nmt", "serve", "--model-dir", str(self.model_dir), "--host",
               "127.0.0.1", "--port", str(self.port), "--intra-op-threads", "1",
               "--drain-seconds", str(self.drain_seconds), "--log-level", "warning"]
        cmd += ["--http-port", str(self.http_port)] if self.http_port is not None else []
        with open(self.log_path, "a", encoding="utf-8") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         env=env)
        end = time.monotonic() + timeout
        while True:
            try:
                wait_serving(self.address, timeout=min(5.0, max(end - time.monotonic(), 0.1)))
                return
            except StressError:
                if self.proc.poll() is not None or time.monotonic() > end:
                    raise StressError(f"replica {self.name} did not start; see {self.log_path}") from None

    def signal(self, sig: signal.Signals) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait_exit(self, timeout: float) -> int | None:
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def stop(self) -> None:
        self.signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
        self.signal(signal.SIGTERM)
        self.wait_exit(self.drain_seconds + 15)


HTTP_SECTIONS = ("frontend http_api", "backend nmt_http")  # the HTTP API's part of the config


def local_config(text: str, listen_port: int, metrics_port: int, servers: list[tuple[str, int]],
                 access_log: bool = False, http_port: int | None = None,
                 http_servers: list[tuple[str, int]] | None = None) -> str:
    """deploy/haproxy.cfg for loopback: the listeners on the given ports, the DNS-resolved `server` /
    `server-template` lines replaced by one `server` line per replica, the Docker resolvers dropped.
    The HTTP API's frontend and backend listen on `http_port` and balance `http_servers`; without
    http_port they are left out (replicas without --http-port).
    access_log: log every request with its user agent (the drill counts attempts from it).
    Health checks, retries, timeouts and error replies stay exactly as shipped."""
    out, section = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not line[0].isspace() and not stripped.startswith("#"):
            section = stripped
        http = section in HTTP_SECTIONS
        if section.startswith("resolvers ") or (http and http_port is None):
            continue
        if re.match(r"bind :(8080|8081)\b", stripped):
            port = http_port if http else listen_port
            line = re.sub(r"bind :\d+", f"bind 127.0.0.1:{port}", line)
            if access_log and not http:
                out += [line, "    capture request header User-Agent len 48"]
                continue
        elif access_log and re.match(r"log stderr .* warning$", stripped):
            line = line.replace(" warning", " info")
        elif re.match(r"bind :8404\b", stripped):
            line = line.replace("bind :8404", f"bind 127.0.0.1:{metrics_port}")
        elif stripped.startswith("server-template "):
            continue
        elif stripped.startswith("server "):
            indent = line[: len(line) - len(line.lstrip())]
            out += [f"{indent}server {name} 127.0.0.1:{port}" for name, port in
                    ((http_servers or []) if http else servers)]
            continue
        out.append(line)
    result = "\n".join(out) + "\n"
    musts = [f"127.0.0.1:{listen_port}", f"127.0.0.1:{metrics_port}", "tcp-check expect"]
    musts += [f"127.0.0.1:{http_port}", "http-check expect"] if http_port is not None else []
    for must in musts:
        if must not in result:
            raise ValueError(f"deploy/haproxy.cfg changed shape: {must!r} not in the substituted config")
    return result


class Balancer:
    """HAProxy in the foreground (-db) on the substituted shipped config."""

    def __init__(self, servers: list[tuple[str, int]], work_dir: Path, binary: str = "haproxy",
                 access_log: bool = False, http_servers: list[tuple[str, int]] | None = None):
        """http_servers: (name, --http-port) of replicas whose HTTP API to balance on `http_port`."""
        found = shutil.which(binary)
        if found is None:
            raise StressError(f"no {binary} binary (Debian: apt-get install haproxy)")
        self.port, self.metrics_port = free_port(), free_port()
        self.http_port = free_port() if http_servers else None
        self.config_path = work_dir / "haproxy.cfg"
        self.config_path.write_text(local_config(HAPROXY_CFG.read_text(encoding="utf-8"), self.port,
                                                 self.metrics_port, servers, access_log, self.http_port,
                                                 http_servers), encoding="utf-8")
        self.log_path = work_dir / "haproxy.log"
        check = subprocess.run([found, "-c", "-q", "-f", str(self.config_path)], capture_output=True,
                               text=True)
        if check.returncode != 0:
            raise StressError(f"haproxy rejects the config: {check.stderr.strip()}")
        with open(self.log_path, "w", encoding="utf-8") as log:
            self.proc = subprocess.Popen([found, "-db", "-f", str(self.config_path)],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_serving(self, timeout: float = 30.0) -> None:
        """Until a call through the balancer's health-checked backend answers SERVING."""
        wait_serving(self.address, timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
