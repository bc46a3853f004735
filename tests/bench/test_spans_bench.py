"""bench/spans_bench.py: the automatic spans and the table, on the tiny bundle."""

from __future__ import annotations

from bench.spans_bench import auto_spans, main


def test_auto_spans_pick_digits_and_names_after_the_first_word():
    text = 'A Boston Terrier and "Max" chase 3 balls in the USA.'
    assert [text[s.start:s.end] for s in auto_spans(text)] == ["Boston Terrier", "Max", "3", "USA"]
    assert auto_spans("Two dogs play in the snow.") == []


def test_the_bench_table_one_row_per_style(tiny_bundle, data_dir, tmp_path, capsys):
    out = tmp_path / "spans.md"
    assert main(["--bundle", str(tiny_bundle), "--data-dir", str(data_dir), "--limit", "120",
                 "--out", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "---" not in line][1:]
    methods = ["| alignment", "| placeholder: number", "| placeholder: name", "| placeholder: token"]
    assert [r.split(" | ")[0] for r in rows] == methods
    for r in rows:
        cells = r.strip("| ").split(" | ")
        assert cells[1] == "+0.00" and cells[2].split("/")[0] == cells[2].split("/")[1]  # identical
        assert cells[4] == "100.0"  # every span verbatim
    assert capsys.readouterr().out.strip() == out.read_text().strip()
