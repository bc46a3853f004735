"""Corpus reading (clear errors), Multi30k checksum download, token-bucketed resumable batches."""

from __future__ import annotations

import gzip
import hashlib
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from nmt.cli import run_command
from train import cli
from train.data import (
    BatchStream,
    CorpusError,
    bucket_batches,
    download,
    load_multi30k,
    multi30k_file,
    read_parallel,
    read_tsv,
    verify_sha256,
)


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def run_train_cli(capsys, *argv: str) -> tuple[int, list[str]]:
    code = run_command("train", cli.main, list(argv))
    err = capsys.readouterr().err
    return code, [ln for ln in err.splitlines() if ln.strip()]


@pytest.mark.parametrize(
    ("src", "tgt", "message"),
    [
        (b"a\nb\nc\n", b"x\ny\n", r"has 3 lines but .*tgt.txt has 2: .*tgt.txt ends before line 3"),
        (b"", b"", r"src.txt: file is empty"),
        (b"fine\nbad \xff\xfe here\n", b"x\ny\n", r"src.txt:2: not valid UTF-8"),
    ],
)
def test_bad_corpus_gives_one_clear_line_and_nonzero_exit(tmp_path, capsys, src, tgt, message):
    s, t = write(tmp_path / "src.txt", src), write(tmp_path / "tgt.txt", tgt)
    code, lines = run_train_cli(capsys, "--preset", "tiny", "--out", str(tmp_path / "run"),
                                "--train-src", str(s), "--train-tgt", str(t), "--no-progress")
    assert code == 2  # bad input
    assert len(lines) == 1, lines
    assert lines[0].startswith("nmt train: ")
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "run" / "last.pt").exists()


def test_bad_corpus_through_the_console_script_has_no_traceback(tmp_path):
    write(tmp_path / "a.gz", b"one\ntwo\n")
    write(tmp_path / "b.gz", b"eins\n")
    proc = subprocess.run([sys.executable, "-m", "nmt", "train", "--preset", "tiny", "--out",
                           str(tmp_path / "run"), "--train-src", str(tmp_path / "a.gz"),
                           "--train-tgt", str(tmp_path / "b.gz")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "b.gz ends before line 2" in proc.stderr and "Traceback" not in proc.stderr


def test_tsv_errors_name_the_line(tmp_path):
    path = write(tmp_path / "c.tsv.gz", b"a\tb\nc\td\te\n")
    with pytest.raises(CorpusError, match=r"c.tsv.gz:2: expected 2 tab-separated fields, found 3"):
        read_tsv(path)
    ok = write(tmp_path / "ok.tsv", b"Hallo\tHello\nZwei\tTwo\n")
    assert read_tsv(ok) == (["Hallo", "Zwei"], ["Hello", "Two"])


def test_gzip_and_plain_files_read_alike(tmp_path):
    src = write(tmp_path / "s.gz", b"Ein Hund.\nZwei Katzen.\n")
    tgt = write(tmp_path / "t", b"A dog.\nTwo cats.\n")
    assert read_parallel(src, tgt) == (["Ein Hund.", "Zwei Katzen."], ["A dog.", "Two cats."])


def test_config_errors_are_collected_in_one_line(tmp_path, capsys):
    code, lines = run_train_cli(capsys, "--preset", "tiny", "--out", str(tmp_path / "r"),
                                "--set", "d_model=30", "--set", "n_heads=4", "--set", "lr=fast",
                                "--set", "colour=blue", "--src-lang", "xx",
                                "--train-src", str(tmp_path / "none"))
    assert code == 2 and len(lines) == 1
    for part in ("d_model=30 is not divisible by n_heads=4", "lr=fast: expected a float",
                 "colour: unknown config field", "--train-src and --train-tgt go together", "does not exist"):
        assert part in lines[0]


def test_multi30k_local_copy(data_dir, tmp_path):
    src, tgt = load_multi30k("val", "en", "fr", data_dir)
    assert len(src) == len(tgt) == 1014
    # An uncompressed copy is read too.
    (tmp_path / "val.en").write_bytes(gzip.decompress((data_dir / "val.en.gz").read_bytes()))
    assert multi30k_file("val", "en", tmp_path) == tmp_path / "val.en"
    with pytest.raises(CorpusError, match="neither val.de.gz nor val.de"):
        multi30k_file("val", "de", tmp_path)
    with pytest.raises(CorpusError, match="unknown Multi30k language 'xx'"):
        multi30k_file("val", "xx", tmp_path)


def test_download_verifies_checksum_and_writes_atomically(tmp_path):
    payload = gzip.compress(b"A man.\n")
    source = write(tmp_path / "remote.bin", payload)
    good = hashlib.sha256(payload).hexdigest()
    cache = tmp_path / "cache"
    mismatch = r"remote.bin: checksum mismatch \(sha256 [0-9a-f]{64}, expected 0{64}\)"
    with pytest.raises(CorpusError, match=mismatch):
        download(source.as_uri(), cache / "val.en.gz", "0" * 64)
    assert list(cache.iterdir()) == []  # neither the file nor a temp file is left behind
    assert download(source.as_uri(), cache / "val.en.gz", good).read_bytes() == payload
    verify_sha256(cache / "val.en.gz", good)
    with pytest.raises(CorpusError, match="download failed"):
        download((tmp_path / "missing.gz").as_uri(), cache / "x.gz", good)


def random_examples(n: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    return [([5] * rng.randint(1, 40), [6] * rng.randint(1, 40)) for _ in range(n)]


def test_buckets_respect_the_token_budget_and_cover_every_example():
    examples = random_examples(500)
    batches = bucket_batches(examples, 300, random.Random(1))
    assert sorted(i for b in batches for i in b) == list(range(500))
    for b in batches:
        S = max(len(examples[i][0]) for i in b)
        T = max(len(examples[i][1]) for i in b) + 1
        assert len(b) * (S + T) <= 300


def test_batch_stream_resumes_at_the_same_batch_and_shards_by_rank():
    examples = random_examples(300)
    a = BatchStream(examples, 200, seed=7)
    while a.state_dict() != {"epoch": 1, "index": 3}:  # into the second epoch
        next(a)
    state = a.state_dict()
    b = BatchStream(examples, 200, seed=7)
    b.load_state_dict(state)
    for _ in range(5):
        x, y = next(a), next(b)
        assert x.src.equal(y.src) and x.tgt_out.equal(y.tgt_out)
    # Two ranks see disjoint halves of the same epoch.
    r0, r1 = BatchStream(examples, 200, 7, rank=0, world=2), BatchStream(examples, 200, 7, rank=1, world=2)
    assert len(r0._batches) == len(r1._batches)
    assert not {tuple(b) for b in r0._batches} & {tuple(b) for b in r1._batches}
