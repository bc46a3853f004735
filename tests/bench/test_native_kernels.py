"""bench/native_kernels.py: a row per kernel and row count with both timings, and one readable line
and exit 2 where the library is not built."""

from __future__ import annotations

import re

import pytest

from bench import native_kernels
from serve.engine import native


def test_table_has_a_row_per_kernel_and_row_count(capsys):
    if native.library_path() is None:
        pytest.skip("serve.engine._nmt_ops is not built")
    args = ["--rows", "1", "4", "--repeats", "1", "--cached", "3", "--source", "5",
            "--vocab", "50", "-k", "3"]
    assert native_kernels.main(args) == 0
    printed = capsys.readouterr().out
    rows = re.findall(r"^\| ([a-z ,0-9-]+) \| (\d+) \| ([\d.]+) \| ([\d.]+) \| [\d.]+× \|$", printed, re.M)
    head = "greedy head, 256 x 50"  # 4 heads x 64
    lsm = "log-softmax top-3 of 50"
    assert [(kind, n) for kind, n, _, _ in rows] == [
        ("self", "1"), ("cross", "1"), ("top-3 of 50", "1"), (lsm, "1"), (head, "1"),
        ("self", "4"), ("cross", "4"), ("cross, 4 per source", "4"), ("top-3 of 50", "4"), (lsm, "4"),
        (head, "4")]
    assert all(float(stock) > 0 and float(ours) > 0 for _, _, stock, ours in rows)


def test_without_the_library_one_line_and_exit_2(capsys, monkeypatch):
    monkeypatch.setattr(native, "library_path", lambda: None)
    assert native_kernels.main([]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
