"""`nmt batch`: ordered, crash-safe file translation through the real engine and real gRPC servers."""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import sacrebleu
from conftest import REPO, read_lines

from nmt.cli import run_command
from nmt.decoding import DecodeOptions
from serve.jobs import job as batch
from serve.jobs.segments import output_paths

SRC = read_lines("test_2016_flickr", "en", 300)
REF = read_lines("test_2016_flickr", "de", 300)
TOO_LONG = "word " * 400  # far beyond the tiny model's max_positions


def batch_main(argv: list[str], backend=None) -> int:
    """`nmt batch ARGV` as the console script runs it (errors -> one line and the exit code)."""
    return run_command("batch", lambda a: batch.main(a, backend), argv)


@pytest.fixture(scope="module")
def engine(tiny_bundle):
    from serve.engine.translator import EngineConfig, Translator

    return Translator.from_bundle(tiny_bundle, EngineConfig(device="cpu"))


def expected(engine, texts: list[str], beam: int = 1) -> list[str]:
    """The engine's own translations, in one call."""
    return [r.text for r in engine.translate(texts, DecodeOptions(beam_size=beam))]


def write_txt(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def leftovers(output: Path) -> list[Path]:
    """Job files of OUTPUT that exist (final, partial, state) plus stray temp files."""
    return [p for p in output_paths(output) if p.exists()] + list(output.parent.glob(".*.tmp"))


class FirstChunkLast:
    """The real engine, except that the first chunk is held until three later chunks have finished:
    completions arrive out of order on purpose."""

    retries = 0

    def __init__(self, translator, first_text: str):
        self.translator, self.first_text = translator, first_text
        self.completed: list[str] = []  # first text of each chunk, in completion order
        self.others_done = threading.Semaphore(0)

    def translate(self, texts, options):
        if texts[0] == self.first_text:
            for _ in range(3):
                assert self.others_done.acquire(timeout=30), "later chunks never finished"
        results = self.translator.translate(texts, options)
        self.completed.append(texts[0])
        if texts[0] != self.first_text:
            self.others_done.release()
        return results

    def report(self):
        return []

    def close(self):
        pass


def test_txt_round_trip_in_input_order_when_chunks_finish_out_of_order(tmp_path, tiny_bundle, engine, capsys):
    inp, out = write_txt(tmp_path / "in.txt", SRC[:40]), tmp_path / "out.txt"
    backend = FirstChunkLast(engine, SRC[0])
    rc = batch_main([str(inp), str(out), "--model-dir", str(tiny_bundle), "--chunk-size", "5",
                     "--in-flight", "20", "--no-progress"], backend=backend)
    assert rc == 0
    assert backend.completed[0] != SRC[0] and SRC[0] in backend.completed[3:]  # really reordered
    assert out.read_text(encoding="utf-8").splitlines() == expected(engine, SRC[:40])
    assert leftovers(out) == [out]
    assert "segments: 40, errors: 0" in capsys.readouterr().out


def test_jsonl_gzip_keeps_ids_and_fields_adds_scores_and_metrics(tmp_path, tiny_bundle, engine, capsys):
    texts = SRC[:30]
    records = [{"id": f"seg-{i}" if i % 2 else i, "text": t, "meta": {"n": i}} for i, t in enumerate(texts)]
    inp, out, ref = tmp_path / "in.jsonl.gz", tmp_path / "out.jsonl.gz", tmp_path / "ref.de.gz"
    with gzip.open(inp, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    with gzip.open(ref, "wt", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in REF[:30])
    rc = batch_main([str(inp), str(out), "--model-dir", str(tiny_bundle), "--beam-size", "2", "--scores",
                     "--length-penalty", "0.6", "--chunk-size", "4", "--reference", str(ref),
                     "--no-progress"])
    assert rc == 0
    with gzip.open(out, "rt", encoding="utf-8") as f:
        got = [json.loads(line) for line in f]
    want = engine.translate(texts, DecodeOptions(beam_size=2, length_penalty=0.6))
    assert [{k: g[k] for k in ("id", "text", "meta")} for g in got] == records
    assert [g["translation"] for g in got] == [w.text for w in want]
    assert [g["score"] for g in got] == pytest.approx([w.hypotheses[0].score for w in want], abs=2e-4)
    printed = capsys.readouterr().out
    hyps = [w.text for w in want]
    assert str(sacrebleu.corpus_bleu(hyps, [REF[:30]])) in printed
    assert str(sacrebleu.corpus_chrf(hyps, [REF[:30]])) in printed


@pytest.mark.parametrize("policy", ["fail", "skip", "copy-source"])
def test_invalid_segment_follows_the_on_error_policy(tmp_path, tiny_bundle, engine, capsys, policy):
    lines = [SRC[0], SRC[1], TOO_LONG, SRC[3], "", SRC[5]]
    inp, out = write_txt(tmp_path / "in.txt", lines), tmp_path / "out.txt"
    rc = batch_main([str(inp), str(out), "--model-dir", str(tiny_bundle), "--chunk-size", "2",
                     "--on-error", policy, "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "line 3" in err[0] and "tokens" in err[0]
    if policy == "fail":
        assert rc == 2 and leftovers(out) == []  # an invalid input line is bad input
        return
    assert rc == 0
    good = expected(engine, [SRC[0], SRC[1], SRC[3], SRC[5]])
    third = "" if policy == "skip" else TOO_LONG
    assert out.read_text(encoding="utf-8").split("\n") == good[:2] + [third, good[2], "", good[3], ""]


def test_jsonl_skip_marks_the_record_with_an_error(tmp_path, tiny_bundle, engine):
    records = [{"id": "a", "text": SRC[0]}, {"id": "b", "text": TOO_LONG}, {"id": "c", "text": SRC[2]}]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert batch_main([str(inp), str(out), "--model-dir", str(tiny_bundle), "--on-error", "skip",
                       "--no-progress"]) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["id"] for g in got] == ["a", "b", "c"]
    assert "translation" not in got[1] and "tokens" in got[1]["error"]
    assert [got[0]["translation"], got[2]["translation"]] == expected(engine, [SRC[0], SRC[2]])


@pytest.mark.parametrize("fmt", ["txt", "jsonl"])
def test_empty_input_gives_empty_output(tmp_path, tiny_bundle, fmt):
    inp, out = tmp_path / f"in.{fmt}", tmp_path / f"out.{fmt}"
    inp.write_bytes(b"")
    assert batch_main([str(inp), str(out), "--model-dir", str(tiny_bundle), "--no-progress"]) == 0
    assert out.read_bytes() == b"" and leftovers(out) == [out]


@pytest.mark.parametrize("where", ["missing-dir/out.txt", "is-a-dir"])
def test_unwritable_output_is_one_error_line_and_leaves_nothing(tmp_path, tiny_bundle, capsys, where):
    (tmp_path / "is-a-dir").mkdir()
    inp, out = write_txt(tmp_path / "in.txt", SRC[:3]), tmp_path / where
    rc = batch_main([str(inp), str(out), "--model-dir", str(tiny_bundle), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and str(out) in err[0]
    assert not list(tmp_path.glob("**/*.partial")) and not list(tmp_path.glob("**/*.state.json"))


def test_full_disk_is_one_error_line_and_leaves_nothing(tmp_path, tiny_bundle, capsys):
    inp, out = write_txt(tmp_path / "in.txt", SRC[:3]), tmp_path / "out.txt"
    _, partial, _ = output_paths(out)
    partial.symlink_to("/dev/full")  # every write to it fails with ENOSPC
    rc = batch_main([str(inp), str(out), "--model-dir", str(tiny_bundle), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "No space left on device" in err[0]
    assert leftovers(out) == [] and not partial.is_symlink()


def test_malformed_jsonl_names_the_line(tmp_path, tiny_bundle, capsys):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text('{"id": 1, "text": "A dog."}\n{"id": 2, "txt": "typo"}\n')
    assert batch_main([str(inp), str(out), "--model-dir", str(tiny_bundle), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "line 2" in err[0] and "'text'" in err[0]
    assert leftovers(out) == []


def committed_lines(state: Path) -> int:
    try:
        return json.loads(state.read_text())["committed_lines"]
    except (OSError, ValueError):
        return 0


def test_sigkill_then_rerun_resumes_to_byte_identical_output(tmp_path, tiny_bundle, capsys):
    inp = write_txt(tmp_path / "in.txt", SRC)
    out, reference = tmp_path / "out.txt", tmp_path / "uninterrupted.txt"
    flags = ["--model-dir", str(tiny_bundle), "--chunk-size", "2", "--in-flight", "2", "--no-progress"]
    _, partial, state = output_paths(out)
    job = subprocess.Popen([sys.executable, "-m", "nmt", "batch", str(inp), str(out), *flags], cwd=REPO,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while committed_lines(state) < 10 and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(job.pid, signal.SIGKILL)
    job.wait()
    assert not out.exists(), "the job finished before it could be killed"
    done = committed_lines(state)
    assert 10 <= done < len(SRC)
    assert partial.stat().st_size >= json.loads(state.read_text())["committed_bytes"]
    with open(partial, "ab") as f:  # as if killed halfway through appending a chunk after its last commit
        f.write(b"Ein halber Satz ohne Zeilenen")

    assert batch_main([str(inp), str(out), *flags, "--beam-size", "2"]) == 2  # other options: refused
    assert "different options (beam_size)" in capsys.readouterr().err
    assert batch_main([str(inp), str(out), *flags, "--length-penalty", "0.5"]) == 2
    assert "different options (length_penalty)" in capsys.readouterr().err
    assert batch_main([str(inp), str(out), *flags]) == 0  # the same command resumes
    assert f"(resumed after {done})" in capsys.readouterr().out
    assert batch_main([str(inp), str(reference), *flags]) == 0
    assert out.read_bytes() == reference.read_bytes()
    assert leftovers(out) == [out]


def test_state_of_another_input_is_refused_unless_restart(tmp_path, tiny_bundle, capsys):
    inp, out = write_txt(tmp_path / "in.txt", SRC[:4]), tmp_path / "out.txt"
    _, partial, state = output_paths(out)
    flags = ["--model-dir", str(tiny_bundle), "--no-progress"]
    identity = {"path": str(inp.resolve()), "size": 1, "mtime_ns": 0, "head_sha256": "0"}
    state.write_text(json.dumps({"input": identity, "options": {}, "committed_lines": 1, "committed_bytes": 0,
                                 "version": 1}))
    partial.write_bytes(b"")
    assert batch_main([str(inp), str(out), *flags]) == 2
    assert "different input file" in capsys.readouterr().err
    assert batch_main([str(inp), str(out), *flags, "--restart"]) == 0
    assert len(out.read_text().splitlines()) == 4 and leftovers(out) == [out]


def test_a_second_job_on_the_same_output_is_refused_while_the_first_runs(tmp_path, tiny_bundle, capsys):
    import fcntl

    inp, out = write_txt(tmp_path / "in.txt", SRC[:4]), tmp_path / "out.txt"
    _, partial, _ = output_paths(out)
    with open(partial, "ab") as running:  # holds the lock as a running job does
        fcntl.flock(running.fileno(), fcntl.LOCK_EX)
        running.write(b"first job's line\n")
        running.flush()
        assert batch_main([str(inp), str(out), "--model-dir", str(tiny_bundle), "--no-progress"]) == 1
    assert "another nmt batch job is writing it" in capsys.readouterr().err
    assert partial.read_bytes() == b"first job's line\n" and not out.exists()


# ----------------------------------------------------------------------------- real gRPC servers


def start_server(translator, max_queue: int = 1024, port: int = 0, auth_token: str | None = None):
    from serve.server.metrics import Metrics
    from serve.server.registry import BatchingConfig, ModelRegistry
    from serve.server.server import ServerConfig, create_server

    metrics = Metrics()
    registry = ModelRegistry(BatchingConfig(max_queue=max_queue), metrics=metrics)
    server, port = create_server(registry, ServerConfig(port=port, auth_token=auth_token), metrics)
    registry.add(translator)
    server.set_serving()
    return server, f"127.0.0.1:{port}", metrics


def answered(metrics) -> int:
    """Translate RPCs the server answered OK, from its own Prometheus counters."""
    return int(sum(s.value for m in metrics.requests.collect() for s in m.samples
                   if s.name.endswith("_total") and s.labels["code"] == "OK"))


def test_two_servers_share_the_work_and_the_job_survives_one_stopping(tmp_path, engine, capsys):
    (a, target_a, metrics_a), (b, target_b, metrics_b) = start_server(engine), start_server(engine)
    texts = SRC[:200]
    inp, out = write_txt(tmp_path / "in.txt", texts), tmp_path / "out.txt"
    _, _, state = output_paths(out)
    rc: list[int] = []
    job = threading.Thread(target=lambda: rc.append(batch_main(
        [str(inp), str(out), "--server", target_a, "--server", target_b, "--chunk-size", "4",
         "--in-flight", "8", "--give-up-after", "30", "--no-progress"])))
    try:
        job.start()
        while committed_lines(state) < 16 and job.is_alive():
            time.sleep(0.005)
        assert job.is_alive(), "the job finished before a server could be stopped"
        # The endpoint goes away at once (calls in flight are cancelled); its scheduler is closed
        # only after the job, so no handler thread is left waiting on a closed one.
        b.grpc_server.stop(0).wait()
        job.join(timeout=120)
    finally:
        a.stop()
        b.stop()
    assert rc == [0]
    assert answered(metrics_a) > 0 and answered(metrics_b) > 0
    assert out.read_text(encoding="utf-8").splitlines() == expected(engine, texts)
    report = capsys.readouterr().out
    line_b = next(line for line in report.splitlines() if line.startswith(f"server {target_b}:"))
    assert " 0 unavailable" not in line_b  # b was set aside after it stopped


def test_an_overloaded_server_is_retried_until_every_chunk_is_in(tmp_path, engine, capsys):
    server, target, _ = start_server(engine, max_queue=4)  # room for one chunk: the others RESOURCE_EXHAUSTED
    texts = SRC[:48]
    inp, out = write_txt(tmp_path / "in.txt", texts), tmp_path / "out.txt"
    try:
        rc = batch_main([str(inp), str(out), "--server", target, "--chunk-size", "4", "--in-flight", "32",
                         "--retries", "100", "--no-progress"])
    finally:
        server.stop()
    assert rc == 0
    assert int(re.search(r"retries: (\d+)", capsys.readouterr().out).group(1)) > 0
    assert out.read_text(encoding="utf-8").splitlines() == expected(engine, texts)


def test_no_server_answering_fails_after_give_up_time_and_leaves_nothing(tmp_path, capsys):
    inp, out = write_txt(tmp_path / "in.txt", SRC[:3]), tmp_path / "out.txt"
    start = time.monotonic()
    rc = batch_main([str(inp), str(out), "--server", "127.0.0.1:1", "--give-up-after", "1", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "no server answered for 1s" in err[0]
    assert time.monotonic() - start < 20 and leftovers(out) == []


def test_a_server_that_comes_up_late_is_retried_and_the_job_completes(tmp_path, engine, capsys):
    with socket.socket() as probe:  # a free port, with nothing listening on it yet
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    inp, out = write_txt(tmp_path / "in.txt", SRC[:12]), tmp_path / "out.txt"
    rc: list[int] = []
    job = threading.Thread(target=lambda: rc.append(batch_main(
        [str(inp), str(out), "--server", f"127.0.0.1:{port}", "--chunk-size", "4", "--give-up-after", "60",
         "--no-progress"])))
    job.start()
    time.sleep(1.5)
    server = None
    try:
        assert job.is_alive()  # waiting for a server, not failed
        server, _, _ = start_server(engine, port=port)
        job.join(timeout=60)
    finally:
        if server is not None:
            server.stop()
    assert rc == [0]
    assert int(re.search(r"retries: (\d+)", capsys.readouterr().out).group(1)) > 0
    assert out.read_text(encoding="utf-8").splitlines() == expected(engine, SRC[:12])


def test_auth_token_is_sent_and_a_refusal_is_one_error_line(tmp_path, engine, capsys):
    server, target, _ = start_server(engine, auth_token="s3cret")
    inp, out = write_txt(tmp_path / "in.txt", SRC[:4]), tmp_path / "out.txt"
    flags = ["--server", target, "--no-progress"]
    try:
        assert batch_main([str(inp), str(out), *flags, "--auth-token", "wrong"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "UNAUTHENTICATED" in err[0] and leftovers(out) == []
        assert batch_main([str(inp), str(out), *flags, "--auth-token", "s3cret"]) == 0
    finally:
        server.stop()
    assert out.read_text(encoding="utf-8").splitlines() == expected(engine, SRC[:4])
