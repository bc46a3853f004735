"""Reloads during `nmt stress --reload-bundle DIR`: a thread calls ReloadModel every --reload-every
seconds while the load runs. First a corrupt copy of the first alternative (its encoder graph cut
short, in a temporary directory), which the server must refuse with FAILED_PRECONDITION while the
version it serves stays; then the alternatives and the bundle served at the start, in turn.

A good bundle must be taken (its manifest checksum is then the version served); any failure of one is
a failure of the run, as is a corrupt copy that is not refused.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from bench.stress.server import StressError, model_info
from nmt.bundle import ENCODER_FILE, BundleError, read_manifest
from nmt.v1 import translator_pb2 as pb
from serve.protocol.convert import SERVICE

RELOAD_TIMEOUT = 120.0  # seconds for one ReloadModel: the server verifies, loads and warms the bundle up


@dataclass
class ReloadStats:
    done: int = 0  # good bundles now serving
    unchanged: int = 0  # a good bundle whose version was already served
    refused: int = 0  # corrupt copies refused with FAILED_PRECONDITION
    tried_corrupt: int = 0

    def to_json(self) -> dict:
        return {"done": self.done, "unchanged": self.unchanged, "refused": self.refused,
                "corrupt_tried": self.tried_corrupt}


def summary(stats: ReloadStats | None, versions: dict[str, int]) -> list[str]:
    """The report's lines on reloads and on the versions that answered."""
    lines = [] if stats is None else [f"reloads: {stats.done} done, {stats.unchanged} unchanged, corrupt "
                                      f"copy refused {stats.refused} of {stats.tried_corrupt}"]
    answered = ", ".join(f"{v[:12] or '(unnamed)'} {n}" for v, n in sorted(versions.items()))
    return lines + [f"versions answering (OK responses): {answered or '-'}"]


@dataclass(frozen=True)
class Bundle:
    path: Path
    name: str  # the model it reloads
    version: str  # its manifest checksum, the version the server reports once it serves it


def bundle_of(path: Path) -> Bundle:
    """A bundle given to --reload-bundle (or served at the start); StressError when it is none."""
    try:
        m = read_manifest(path, verify_checksums=False)  # the server checks the files itself
    except BundleError as e:
        raise StressError(f"--reload-bundle: {e}") from None
    return Bundle(path.resolve(), m.name, m.checksum)


def corrupt_copy(bundle: Path, out: Path) -> Path:
    """A copy of `bundle` with its encoder graph cut to 1000 bytes: its checksum no longer matches."""
    shutil.copytree(bundle, out)
    encoder = out / ENCODER_FILE
    encoder.write_bytes(encoder.read_bytes()[:1000])
    return out


def model_versions(channel: grpc.Channel, metadata: list[tuple[str, str]]) -> dict[str, str]:
    """Model name -> the version the server serves now (GetModelInfo)."""
    return {m.name: m.version for m in model_info(channel, metadata, timeout=30).models}


class BundleReloader:
    """The reloading thread of one run; `fail` records a failure of the run."""

    def __init__(self, channel: grpc.Channel, metadata: list[tuple[str, str]], original: Path | None,
                 alternatives: list[Path], every: float, fail: Callable[[str], None]):
        self.channel, self.metadata, self.every, self.fail = channel, metadata, every, fail
        self.cycle = [bundle_of(p) for p in alternatives] + ([bundle_of(original)] if original else [])
        self.stats = ReloadStats()
        self._rpc = channel.unary_unary(f"/{SERVICE}/ReloadModel",
                                        request_serializer=pb.ReloadModelRequest.SerializeToString,
                                        response_deserializer=pb.ReloadModelResponse.FromString)
        self._tmp = tempfile.TemporaryDirectory(prefix="nmt-stress-corrupt-")
        self.corrupt = corrupt_copy(self.cycle[0].path, Path(self._tmp.name) / "corrupt")

    def run(self, stop: threading.Event) -> None:
        """Until `stop`: the corrupt copy first, then the good bundles in turn, one every `every` s."""
        step = 0
        try:
            while not stop.wait(self.every):
                try:
                    if step == 0:
                        self.reload_corrupt()
                    else:
                        self.reload_good(self.cycle[(step - 1) % len(self.cycle)])
                except grpc.RpcError as e:  # GetModelInfo around the corrupt copy
                    self.fail(f"GetModelInfo failed during a reload: {e.code().name}: {e.details()}")
                step += 1
        finally:
            self._tmp.cleanup()

    def reload(self, name: str, path: Path) -> pb.ReloadModelResponse:
        return self._rpc(pb.ReloadModelRequest(name=name, path=str(path)), timeout=RELOAD_TIMEOUT,
                         metadata=self.metadata)

    def reload_good(self, b: Bundle) -> None:
        try:
            r = self.reload(b.name, b.path)
        except grpc.RpcError as e:
            self.fail(f"reload of {b.path} failed: {e.code().name}: {e.details()}")
            return
        if r.version != b.version:
            self.fail(f"reload of {b.path}: the server serves version {r.version[:12]}, "
                      f"the bundle is {b.version[:12]}")
        elif r.reloaded:
            self.stats.done += 1
        else:
            self.stats.unchanged += 1

    def reload_corrupt(self) -> None:
        name = self.cycle[0].name
        self.stats.tried_corrupt += 1
        before = model_versions(self.channel, self.metadata).get(name)
        try:
            r = self.reload(name, self.corrupt)
            self.fail(f"the corrupt copy of {self.cycle[0].path} was taken (version {r.version[:12]})")
            return
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.FAILED_PRECONDITION:
                self.fail(f"the corrupt copy got {e.code().name} ({e.details()}), not FAILED_PRECONDITION")
                return
        after = model_versions(self.channel, self.metadata).get(name)
        if after != before:
            self.fail(f"after the corrupt copy was refused {name} serves {str(after)[:12]}, "
                      f"not {str(before)[:12]}")
            return
        self.stats.refused += 1

    def final_checks(self, versions: dict[str, int]) -> list[str]:
        """Failures of the run as a whole: the corrupt copy never tried, or one version answering alone."""
        problems = []
        if not self.stats.tried_corrupt:
            problems.append("no reload was tried: the load ended before --reload-every seconds")
        answered = [v for v in versions if v]
        if len(answered) < 2:
            problems.append(f"{len(answered)} version(s) answered under reloads, not at least 2 "
                            "(make --seconds longer than twice --reload-every)")
        return problems
