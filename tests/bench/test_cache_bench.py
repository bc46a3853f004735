"""bench/cache_bench.py end to end on the tiny bundle: both runs, the table, identical outputs."""

from __future__ import annotations

import re

from bench import cache_bench


def test_cache_bench_prints_and_writes_the_table(tiny_bundle, data_dir, tmp_path, capsys):
    out = tmp_path / "cache.md"
    assert cache_bench.main(["--model-dir", str(tiny_bundle), "--data-dir", str(data_dir), "--lines", "60",
                             "--pool", "20", "--cache-size", "100", "--in-flight", "2", "--chunk-size", "8",
                             "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    row = r"^\| (no cache|--cache-size 100) \| 60 \| [\d.]+ \| [\d.]+ \| (\d+) \| (\d+) \|"
    rows = re.findall(row, printed, re.M)
    assert [r[0] for r in rows] == ["no cache", "--cache-size 100"]
    assert rows[0][1:] == ("0", "0")
    hits, misses = int(rows[1][1]), int(rows[1][2])
    assert hits + misses == 60 and hits > 0
    assert "outputs identical: yes" in printed and "load average before:" in printed
    assert "| --cache-size 100 |" in out.read_text()


def test_duplicate_rate_normalizes_whitespace():
    assert cache_bench.duplicate_rate(["a b", "a  b ", "c", "d"]) == 0.25
