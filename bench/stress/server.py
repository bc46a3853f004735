"""The server under test of `nmt stress`: a child `nmt serve` process, its memory and its health."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nmt.errors import UserError
from nmt.v1 import translator_pb2 as pb
from serve.protocol.convert import SERVICE


class StressError(UserError):
    """The run could not start (no server, bad flags): one line for the user."""


def rss_mb(pid: int | None) -> float | None:
    """Resident memory of a process in MiB (Linux /proc), None when unknown."""
    try:
        status = Path(f"/proc/{pid}/status").read_text() if pid else ""
    except OSError:
        return None
    m = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    return int(m.group(1)) / 1024 if m else None


class ServerProcess:
    """`nmt serve --port 0` on a bundle in a child process, so its RSS is the server's alone."""

    def __init__(self, model_dir: Path, auth_token: str | None, timeout: float = 120.0):
        env = dict(os.environ)
        env.pop("NMT_AUTH_TOKEN", None)
        if auth_token:
            env["NMT_AUTH_TOKEN"] = auth_token  # not a flag: flags show in `ps`
        cmd = [sys.executable, "-m", "nmt", "serve", "--model-dir", str(model_dir), "--port", "0",
               "--log-level", "warning"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []  # the server's log (warnings name each refused request)
        self.port = 0
        self._listening = threading.Event()
        threading.Thread(target=self._collect, daemon=True).start()
        end = time.monotonic() + timeout
        while not self._listening.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > end:
                self.stop(0)
                last = self.lines[-1] if self.lines else "no output"
                raise StressError(f"the server did not start: {last}")

    def _collect(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            m = re.match(r"nmt serve: listening on \S+:(\d+)", line)
            if m:
                self.port = int(m.group(1))
                self._listening.set()

    @property
    def tracebacks(self) -> list[str]:
        """The exception line ending each traceback the server logged, e.g. "OverflowError: ..."."""
        found, inside = [], False
        for line in self.lines:
            if line.startswith("Traceback"):
                inside = True
            elif inside and line and not line[0].isspace():
                found.append(line)
                inside = False
        return found

    def stop(self, grace: float = 30.0) -> int:
        """SIGTERM (the server drains), SIGKILL after `grace` + 30 s; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace + 30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def model_info(channel: grpc.Channel, metadata: list[tuple[str, str]], timeout: float
               ) -> pb.GetModelInfoResponse:
    """GetModelInfo: the served models (name, languages, version) and the server's limits."""
    rpc = channel.unary_unary(f"/{SERVICE}/GetModelInfo",
                              request_serializer=pb.GetModelInfoRequest.SerializeToString,
                              response_deserializer=pb.GetModelInfoResponse.FromString)
    return rpc(pb.GetModelInfoRequest(), timeout=timeout, metadata=metadata)


def wait_serving(address: str, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < end:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise StressError(f"the server at {address} never became SERVING")
