"""--split-sentences of `nmt translate` and `nmt batch`: real engine, real gRPC server, real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, read_lines
from test_batch import batch_main, committed_lines, leftovers, start_server, write_txt

from nmt.decoding import DecodeOptions
from nmt.sentences import SplitTexts, join_results
from serve.jobs.segments import output_paths

SENTENCES = [s.rstrip(" .") + "." for s in read_lines("test_2016_flickr", "en", 40)]
# Lines of one to three sentences with irregular whitespace between them, a blank line, symbols alone.
LINES = [SENTENCES[0] + "  " + SENTENCES[1], SENTENCES[2], "", "--",
         " " + SENTENCES[3] + " " + SENTENCES[4] + "   " + SENTENCES[5] + " "]
LINES += [SENTENCES[i] + " " + SENTENCES[i + 1] for i in range(6, 40, 2)]
NMT = [sys.executable, "-m", "nmt"]


@pytest.fixture(scope="module")
def engine(tiny_bundle):
    from serve.engine.translator import EngineConfig, Translator

    return Translator.from_bundle(tiny_bundle, EngineConfig(device="cpu"))


@pytest.fixture(scope="module")
def server(engine):
    srv, target, _ = start_server(engine)
    yield target
    srv.stop()


def by_sentence(engine, line: str) -> str:
    """The line's sentences translated one by one by the engine, put back in the line's whitespace."""
    split = SplitTexts([line], "en")
    texts = [engine.translate([s], DecodeOptions())[0].text for s in split.sentences]
    out = line
    for source, target in zip(split.sentences, texts):
        head, _, out = out.partition(source)
        out = head + "\0" + target + "\0" + out  # NUL marks what is done; sources never contain it
    return out.replace("\0", "")


def whole(engine, lines: list[str]) -> list[str]:
    return [engine.translate([t], DecodeOptions())[0].text if t.strip() else "" for t in lines]


def test_the_splitter_keeps_whitespace_and_joins_hypotheses():
    split = SplitTexts([LINES[0], LINES[4], "--"], "en")
    assert split.sentences == SENTENCES[:2] + SENTENCES[3:6]
    from nmt.decoding import Hypothesis, TranslationResult

    results = [TranslationResult([Hypothesis(f"T{i}", [i, i], -1.0 * (i + 1), -1.0 * (i + 1)),
                                  Hypothesis(f"U{i}", [i], -9.0, -9.0)], 3) for i in range(5)]
    joined = split.join(results, length_penalty=0.0)
    assert [r.text for r in joined] == ["T0  T1", " T2 T3   T4 ", "--"]
    assert [h.text for h in joined[1].hypotheses] == [" T2 T3   T4 ", " U2 U3   U4 "]
    assert joined[1].hypotheses[0].log_prob == joined[1].hypotheses[0].score == -12.0  # raw sums at 0
    assert joined[1].source_tokens == 9 and joined[2].source_tokens == 0
    assert join_results([0], results, 1.0).hypotheses[0].tokens == [0, 0]


def test_translate_with_the_flag_equals_sentence_by_sentence(engine, server):
    out = subprocess.run([*NMT, "translate", "--server", server, "--split-sentences", LINES[0], LINES[4]],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:-1] == [by_sentence(engine, LINES[0]), by_sentence(engine, LINES[4])]
    assert by_sentence(engine, LINES[0]) != whole(engine, LINES[:1])[0]  # the flag makes a difference


def test_translate_stdin_with_the_flag_keeps_one_line_per_line_and_without_it_is_unchanged(engine, server):
    stdin = "".join(line + "\n" for line in LINES)
    # --chunk 2: chunk ["", "--"] has no sentence at all and is printed without a request, in its place.
    split = subprocess.run([*NMT, "translate", "--server", server, "--chunk", "2", "--split-sentences"],
                           input=stdin, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert split.returncode == 0, split.stderr
    assert split.stdout.split("\n")[:-1] == [by_sentence(engine, line) for line in LINES]
    plain = subprocess.run([*NMT, "translate", "--server", server, "--chunk", "2"], input=stdin, cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert plain.returncode == 0, plain.stderr
    expected = [engine.translate([t], DecodeOptions())[0].text for t in LINES]
    assert plain.stdout.split("\n")[:-1] == expected


def test_batch_with_the_flag_keeps_line_count_and_order(tmp_path, tiny_bundle, engine, server, capsys):
    inp = write_txt(tmp_path / "in.txt", LINES)
    want = [by_sentence(engine, line) for line in LINES]
    local, remote, plain = tmp_path / "local.txt", tmp_path / "remote.txt", tmp_path / "plain.txt"
    flags = ["--chunk-size", "3", "--in-flight", "6", "--no-progress", "--split-sentences"]
    assert batch_main([str(inp), str(local), "--model-dir", str(tiny_bundle), *flags]) == 0
    assert local.read_text(encoding="utf-8").split("\n")[:-1] == want
    # Through a server, the splitting language comes from the server's model info.
    assert batch_main([str(inp), str(remote), "--server", server, *flags]) == 0
    assert remote.read_bytes() == local.read_bytes()
    assert batch_main([str(inp), str(plain), "--model-dir", str(tiny_bundle), *flags[:-1]]) == 0
    assert plain.read_text(encoding="utf-8").split("\n")[:-1] == whole(engine, LINES)
    assert f"segments: {len(LINES)}," in capsys.readouterr().out


def test_batch_jsonl_with_the_flag_keeps_records_and_scores(tmp_path, tiny_bundle, engine):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(LINES[:5])))
    assert batch_main([str(inp), str(out), "--model-dir", str(tiny_bundle), "--no-progress",
                       "--split-sentences", "--split-language", "en", "--scores"]) == 0
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in records] == list(range(5))
    assert [r["translation"] for r in records] == [by_sentence(engine, t) for t in LINES[:5]]
    assert records[3]["score"] == 0.0 and all(r["score"] < 0 for r in records if r["translation"].strip(" -"))


def test_a_line_with_an_invalid_sentence_follows_the_on_error_policy(tmp_path, tiny_bundle, engine, capsys):
    lines = [LINES[0], SENTENCES[6] + " " + "word " * 400, LINES[1]]  # its second sentence is far too long
    inp, out = write_txt(tmp_path / "in.txt", lines), tmp_path / "out.txt"
    assert batch_main([str(inp), str(out), "--model-dir", str(tiny_bundle), "--no-progress",
                       "--split-sentences", "--on-error", "copy-source"]) == 0
    assert out.read_text(encoding="utf-8").split("\n")[:-1] == [
        by_sentence(engine, lines[0]), lines[1], by_sentence(engine, lines[2])]
    assert "line 2: the segment is" in capsys.readouterr().err


def test_split_language_alone_is_a_usage_error(tmp_path, tiny_bundle, capsys):
    inp = write_txt(tmp_path / "in.txt", LINES[:2])
    assert batch_main([str(inp), str(tmp_path / "o.txt"), "--model-dir", str(tiny_bundle),
                       "--split-language", "en"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["nmt batch: --split-language needs --split-sentences and a language code"]


def test_batch_with_the_flag_resumes_after_sigkill_to_identical_output(tmp_path, tiny_bundle, capsys):
    lines = LINES * 4  # long enough to kill halfway
    inp = write_txt(tmp_path / "in.txt", lines)
    out, reference = tmp_path / "out.txt", tmp_path / "uninterrupted.txt"
    flags = ["--model-dir", str(tiny_bundle), "--chunk-size", "2", "--in-flight", "2", "--no-progress",
             "--split-sentences"]
    _, partial, state = output_paths(out)
    job = subprocess.Popen([*NMT, "batch", str(inp), str(out), *flags], cwd=REPO,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while committed_lines(state) < 6 and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(job.pid, signal.SIGKILL)
    job.wait()
    assert not out.exists(), "the job finished before it could be killed"
    done = committed_lines(state)
    assert 6 <= done < len(lines)

    assert batch_main([str(inp), str(out), *flags[:-1]]) == 2  # without the flag: another job
    assert "different options (split_sentences)" in capsys.readouterr().err
    assert batch_main([str(inp), str(out), *flags]) == 0
    assert f"(resumed after {done})" in capsys.readouterr().out
    assert batch_main([str(inp), str(reference), *flags]) == 0
    assert out.read_bytes() == reference.read_bytes()
    assert len(out.read_text(encoding="utf-8").split("\n")) == len(lines) + 1
    assert leftovers(out) == [out]
