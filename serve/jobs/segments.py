"""Files of a batch job: segment readers (txt / JSON Lines, gzip), output lines, and crash-safe output.

Crash safety rests on one invariant: the state file never records more than what is fsync'd
in the partial output. A commit appends whole lines to `OUTPUT.partial`, fsyncs it, then
replaces `OUTPUT.state.json` atomically (temp + rename) with the new committed line/byte counts.
A SIGKILL anywhere leaves either the old or the new state, and at most some uncommitted bytes
after `committed_bytes`, which a resume truncates away. The finished OUTPUT appears by rename.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, cast

from nmt.errors import EXIT_FAILURE, UserError
from nmt.files import atomic_write_bytes, fsync_dir

STATE_VERSION = 1
GZIP_MAGIC = b"\x1f\x8b"
HEAD_BYTES = 1 << 20  # input identity hashes this much of the file's start (plus size and mtime)


class InputError(UserError):
    """The input (or reference) file cannot be read as asked; the message names file and line."""


class StateError(UserError):
    """A state file that does not belong to this job, or a partial output that does not match it."""


# ----------------------------------------------------------------------------- input


@dataclass
class Segment:
    line: int  # 1-based line number in the input
    text: str
    record: dict[str, Any] | None = None  # the JSONL object (kept whole in the output)


def open_binary(path: str | Path) -> IO[bytes]:
    """The file's bytes, gunzipped when it starts with the gzip magic (whatever its name)."""
    f = open(path, "rb")
    if f.read(2) == GZIP_MAGIC:
        f.close()
        return cast(IO[bytes], gzip.open(path, "rb"))
    f.seek(0)
    return f


def detect_format(path: str | Path, requested: str) -> str:
    """'txt' or 'jsonl'. auto: by name (.jsonl/.ndjson, optionally .gz), else by a first line '{'."""
    if requested != "auto":
        return requested
    name = Path(path).name.lower().removesuffix(".gz")
    if name.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if name.endswith(".txt"):
        return "txt"
    with open_binary(path) as f:
        first = f.readline().lstrip()
    return "jsonl" if first.startswith(b"{") else "txt"


def _decode_line(raw: bytes, path: str | Path, line: int) -> str:
    try:
        return raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: line {line}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


def parse_segment(text_line: str, fmt: str, text_field: str, path: str | Path, line: int) -> Segment:
    if fmt == "txt":
        return Segment(line, text_line)
    try:
        record = json.loads(text_line)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: line {line}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict):
        raise InputError(f"{path}: line {line}: expected a JSON object, got {type(record).__name__}")
    text = record.get(text_field)
    if not isinstance(text, str):
        problem = "missing" if text is None else f"a {type(text).__name__}, not a string"
        raise InputError(f"{path}: line {line}: text field {text_field!r} is {problem}")
    return Segment(line, text, record)


def read_segments(path: str | Path, fmt: str, text_field: str, skip: int = 0) -> Iterator[Segment]:
    """Segments of the input in order, after the first `skip` lines (already committed)."""
    line = 0
    try:
        with open_binary(path) as f:
            for line, raw in enumerate(f, start=1):
                if line > skip:
                    yield parse_segment(_decode_line(raw, path, line), fmt, text_field, path, line)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise InputError(f"{path}: corrupt gzip data after line {line} ({e})") from None


def scan_input(path: str | Path, fmt: str, text_field: str) -> int:
    """Number of segments; checks every line up front so a bad line fails the job before any work."""
    return sum(1 for _ in read_segments(path, fmt, text_field))


def read_text_lines(path: str | Path) -> list[str]:
    """A reference file: one segment per line, gzip accepted."""
    with open_binary(path) as f:
        return [_decode_line(raw, path, i) for i, raw in enumerate(f, start=1)]


# ----------------------------------------------------------------------------- output lines


@dataclass
class Outcome:
    """What became of one segment: a translation, or an error handled by the --on-error policy."""

    translation: str | None = None
    score: float | None = None
    error: str | None = None


def format_line(seg: Segment, out: Outcome, fmt: str, with_scores: bool) -> str:
    """One output line (with its newline). txt: `translation` or `score<TAB>translation`;
    jsonl: the input object plus "translation" (and "score"), or plus "error" for a skipped segment."""
    if fmt == "jsonl":
        record = dict(seg.record or {})
        if out.translation is not None:
            record["translation"] = out.translation
            if with_scores and out.score is not None:
                record["score"] = round(out.score, 4)
        if out.error is not None:
            record["error"] = out.error
        return json.dumps(record, ensure_ascii=False) + "\n"
    # A translation never spans lines in txt: the line numbers of input and output must agree.
    text = " ".join((out.translation or "").splitlines())
    if with_scores:
        text = f"{out.score if out.score is not None else float('nan'):.4f}\t{text}"
    return text + "\n"


def hypothesis_of_line(line: str, fmt: str, with_scores: bool) -> str:
    """The translation written on an output line (for scoring against a reference)."""
    line = line.rstrip("\n")
    if fmt == "jsonl":
        return json.loads(line).get("translation") or ""
    return line.split("\t", 1)[1] if with_scores else line


# ----------------------------------------------------------------------------- identity and state


def input_identity(path: str | Path) -> dict[str, Any]:
    """What makes an input 'the same file' for a resume: path, size, mtime and a hash of its start."""
    p = Path(path).resolve()
    st = p.stat()
    with open(p, "rb") as f:
        head = hashlib.sha256(f.read(HEAD_BYTES)).hexdigest()
    return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "head_sha256": head}


@dataclass
class JobState:
    input: dict[str, Any]
    options: dict[str, Any]
    committed_lines: int = 0
    committed_bytes: int = 0
    version: int = STATE_VERSION


def load_state(path: Path) -> JobState | None:
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return JobState(**raw)
    except (ValueError, TypeError) as e:
        raise StateError(f"{path}: unreadable state file ({e}); remove it or pass --restart") from None


def write_state(path: Path, state: JobState) -> None:
    atomic_write_bytes(path, (json.dumps(asdict(state), indent=1, sort_keys=True) + "\n").encode())


# ----------------------------------------------------------------------------- ordered, crash-safe output


def output_paths(output: str | Path) -> tuple[Path, Path, Path]:
    """(final OUTPUT, OUTPUT.partial, OUTPUT.state.json), all in OUTPUT's directory."""
    out = Path(output)
    return out, out.with_name(out.name + ".partial"), out.with_name(out.name + ".state.json")


def lock_exclusively(file: IO[bytes], final: Path) -> None:
    """One job per OUTPUT: a second one would interleave its chunks with the first one's."""
    import fcntl  # POSIX only, like the rest of the crash-safety (fsync of directories)

    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise StateError(f"{final}: another nmt batch job is writing it", EXIT_FAILURE) from None


def check_resumable(state: JobState, identity: dict[str, Any], options: dict[str, Any], partial: Path,
                    state_path: Path) -> None:
    if state.version != STATE_VERSION or state.input != identity:
        raise StateError(f"{state_path} belongs to a different input file (or the input changed); "
                         "pass --restart to discard it")
    if state.options != options:
        keys = state.options.keys() | options.keys()
        changed = sorted(k for k in keys if state.options.get(k) != options.get(k))
        raise StateError(f"{state_path} was written with different options ({', '.join(changed)}); "
                         "rerun with the same options or pass --restart")
    if partial.stat().st_size < state.committed_bytes:
        raise StateError(f"{partial} is shorter than its state records; pass --restart")


@dataclass
class OrderedOutput:
    """Appends chunks to OUTPUT.partial strictly in input order and records each commit in the state.

    Chunks may be handed in any order (keyed by their first line); a chunk is written once every
    line before it is. OUTPUT names ending in .gz get one gzip member per commit (gzip readers
    concatenate members), so truncating to a committed length still leaves a valid file.
    """

    final: Path
    partial: Path
    state_path: Path
    state: JobState
    gzip_output: bool
    _file: IO[bytes] | None = None
    _waiting: dict[int, list[str]] = field(default_factory=dict)  # first line (1-based) -> lines

    @classmethod
    def open(cls, output: str | Path, identity: dict[str, Any], options: dict[str, Any],
             restart: bool = False) -> OrderedOutput:
        """Start a job's output, or resume one whose state matches this input and these options."""
        final, partial, state_path = output_paths(output)
        if final.is_dir():
            raise IsADirectoryError(errno.EISDIR, "Is a directory", str(final))
        existed = partial.exists()  # no partial: any state is from a finished (renamed) run, start afresh
        file = open(partial, "ab")  # append mode, never truncating here: another job may own the file
        try:
            lock_exclusively(file, final)
            state = None if restart or not existed else load_state(state_path)
            if state is not None:
                check_resumable(state, identity, options, partial, state_path)
        except BaseException:
            file.close()
            if not existed:
                partial.unlink(missing_ok=True)
            raise
        out = cls(final, partial, state_path, state or JobState(identity, options),
                  gzip_output=final.name.lower().endswith(".gz"), _file=file)
        try:
            if os.fstat(file.fileno()).st_size > out.state.committed_bytes:
                file.truncate(out.state.committed_bytes)  # drop bytes appended after the last commit
            write_state(state_path, out.state)
        except OSError:
            if state is None:
                out.discard()  # nothing of a fresh job may be left behind
            raise
        return out

    @property
    def committed_lines(self) -> int:
        return self.state.committed_lines

    @property
    def waiting(self) -> int:
        """Finished chunks held back until an earlier chunk is committed."""
        return len(self._waiting)

    def add(self, first_line: int, lines: list[str]) -> int:
        """Hand in a finished chunk; writes every chunk now in order. Returns lines committed by this call."""
        self._waiting[first_line] = lines
        before = self.state.committed_lines
        while self.state.committed_lines + 1 in self._waiting:
            self._commit(self._waiting.pop(self.state.committed_lines + 1))
        return self.state.committed_lines - before

    def _commit(self, lines: list[str]) -> None:
        assert self._file is not None
        data = "".join(lines).encode("utf-8")
        if self.gzip_output and data:
            data = gzip.compress(data, mtime=0)  # mtime=0: identical bytes on every run
        try:
            self._file.write(data)
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as e:  # name the file: "No space left on device" alone does not say where
            raise OSError(e.errno, e.strerror, str(self.partial)) from None
        self.state.committed_lines += len(lines)
        self.state.committed_bytes += len(data)
        write_state(self.state_path, self.state)

    def finish(self) -> None:
        """Publish OUTPUT atomically; the state goes last, so a kill in between merely redoes the job."""
        assert self._file is not None and not self._waiting, "finish() with uncommitted chunks"
        self._file.close()
        self._file = None
        os.replace(self.partial, self.final)
        fsync_dir(self.final.parent)
        self.state_path.unlink(missing_ok=True)

    def close(self) -> None:
        """Stop writing but keep partial + state so the same command resumes."""
        if self._file is not None:
            f, self._file = self._file, None
            f.close()

    def discard(self) -> None:
        """Remove every trace of the job (failed for good, or the disk is full)."""
        try:
            self.close()
        except OSError:
            pass  # closing flushes what a full disk refused; that tail is being removed anyway
        self.partial.unlink(missing_ok=True)
        self.state_path.unlink(missing_ok=True)


def read_output_lines(path: str | Path) -> list[str]:
    """The lines of a finished output (gzip members concatenated)."""
    with open_binary(path) as f:
        return io.TextIOWrapper(f, encoding="utf-8", newline="\n").readlines()
