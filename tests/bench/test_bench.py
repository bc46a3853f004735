"""`nmt bench` on the tiny model: CTranslate2 conversion parity, the whole table, bad input."""

from __future__ import annotations

import json

import pytest
from conftest import read_lines

pytest.importorskip("ctranslate2")


@pytest.fixture(scope="module")
def ct2_model(tmp_path_factory, tiny_checkpoint):
    from bench.ct2 import convert_checkpoint

    return convert_checkpoint(tiny_checkpoint, tmp_path_factory.mktemp("ct2") / "model")


def test_ct2_greedy_equals_pytorch_greedy(tiny_checkpoint, ct2_model):
    """The converted model is our model: token-for-token the PyTorch greedy output, batched or not."""
    from bench.ct2 import CT2Translator
    from nmt.decoding import DecodeOptions
    from train.checkpoint import load_checkpoint, model_from_checkpoint
    from train.decode import greedy_decode_cached, source_ids

    model, tok = model_from_checkpoint(load_checkpoint(tiny_checkpoint))
    texts = read_lines("test_2016_flickr", "en", 40)
    srcs = [source_ids(tok, t, model.cfg.eos_id) for t in texts]
    expected = [h.tokens for h in greedy_decode_cached(model, srcs, DecodeOptions())]
    ct2 = CT2Translator(ct2_model, model.cfg.max_positions, compute_type="float32", threads=1)
    batched = [o.tokens for o in ct2.translate(texts)]
    for i, (want, got) in enumerate(zip(expected, batched)):
        assert got == want, f"sentence {i} {texts[i]!r}: PyTorch {want} vs CTranslate2 {got}"
    assert [ct2.translate([t])[0].tokens for t in texts[:10]] == expected[:10]
    # Outputs of many lengths: the comparison is not one trivial sentence repeated.
    assert len({len(t) for t in expected}) > 3


def test_ct2_length_limit_counts_eos(tiny_checkpoint, ct2_model):
    """max_length_b=3 with a=0: at most 3 generated tokens, EOS included, as in the textbook loop."""
    from bench.ct2 import CT2Translator
    from nmt.decoding import DecodeOptions
    from train.checkpoint import load_checkpoint, model_from_checkpoint
    from train.decode import greedy_decode, source_ids

    model, tok = model_from_checkpoint(load_checkpoint(tiny_checkpoint))
    ct2 = CT2Translator(ct2_model, model.cfg.max_positions, threads=1)
    opts = DecodeOptions(max_length_a=0, max_length_b=3)
    for text in read_lines("test_2016_flickr", "en", 5):
        want = greedy_decode(model, source_ids(tok, text, model.cfg.eos_id), opts).tokens
        got = ct2.translate([text], max_length_a=0, max_length_b=3)[0].tokens
        assert got == want and len(got) <= 3


def test_bench_prints_and_writes_the_table(tiny_checkpoint, tiny_bundle, tiny_bundle_int8, tmp_path, capsys):
    from bench import run
    from nmt.cli import run_command

    out = tmp_path / "results"
    rc = run_command("bench", run.main, ["--checkpoint", str(tiny_checkpoint), "--bundle", str(tiny_bundle),
                   "--bundle-int8", str(tiny_bundle_int8), "--sentences", "12", "--latency-sentences", "2",
                   "--repeats", "1", "--threads", "1", "--out-dir", str(out),
                   "--grpc-requests", "5", "--grpc-duration", "0.5"])
    stdout, stderr = capsys.readouterr()
    assert (out / "latest.json").is_file(), stderr
    report = json.loads((out / "latest.json").read_text())
    assert report["failures"] == [] and rc == 0, report["failures"]
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == [r.name for r in run.ROWS]
    for name, r in rows.items():
        assert r.get("error") is None, name
        assert r["latency_ms"] > 0 and r["tokens_per_s"] > 0 and r["peak_rss_mib"] > 10, name
        assert name in stdout and name in (out / "latest.md").read_text()
        if name != run.UNCACHED:  # the uncached loop only decodes the latency sentences
            assert 0 <= r["bleu"] <= 100, name
    # Same weights, same greedy algorithm: identical tokens, hence identical BLEU.
    for name in (run.UNCACHED, "engine fp32 greedy", "CT2 fp32 greedy"):
        assert rows[name]["same_tokens_pct"] == 100.0, name
    for name in ("engine fp32 greedy", "CT2 fp32 greedy"):
        assert rows[name]["bleu"] == pytest.approx(rows[run.REFERENCE]["bleu"], abs=1e-9)
    assert rows["CT2 fp32 greedy"]["latency_vs_ct2"] == pytest.approx(1.0)
    assert rows[run.UNCACHED]["throughput_vs_torch"] == pytest.approx(1.0)
    # CTranslate2 never loads torch: its RSS is the runtime's own.
    assert rows["CT2 fp32 greedy"]["peak_rss_mib"] < rows[run.UNCACHED]["peak_rss_mib"]
    assert report["meta"]["threads"] == 1 and "ctranslate2" in report["meta"]["versions"]
    grpc = report["grpc"]
    assert grpc["grpc_p50_ms"] > 0 and grpc["engine_p50_ms"] > 0
    rates = grpc["sentences_per_s"]
    assert set(rates) == {"1", "8", "32"} and all(v > 0 for v in rates.values())
    # Profiles at batch 1 and 64: the buckets add up to the measured wall time.
    assert [p["batch"] for p in report["profiles"]] == [1, 64]
    for p in report["profiles"]:
        total_us = sum(c["us_per_step"] for c in p["costs"]) * p["decoder_steps"]
        assert total_us == pytest.approx(1e6 * p["wall_s"], rel=1e-6)
        assert p["costs"][0]["us_per_step"] >= p["costs"][-1]["us_per_step"]
        # the decoder's runs are seen whichever decoder graph ran them (the slot decoder on CPU)
        decoder = next(c for c in p["costs"] if c["cost"] == "decoder session run (ORT)")
        assert decoder["share"] > 0.2
    assert "Three largest costs per step" in stdout


def test_rounds_merge_into_medians():
    """--rounds: each timing is the median over rounds, RSS the highest, outputs the first round's; a
    failed round fails the row."""
    from bench.run import merge_rounds

    def result(lat: float, tps: float, rss: float) -> dict:
        return {"latency_ms": lat, "latency_p90_ms": 2 * lat, "tokens_per_s": tps, "throughput_s": 1 / tps,
                "peak_rss_mib": rss, "outputs": [([lat], "x")]}

    row = merge_rounds([result(10, 300, 90), result(30, 100, 80), result(20, 200, 85)])
    assert (row["latency_ms"], row["latency_p90_ms"], row["tokens_per_s"]) == (20, 40, 200)
    assert row["peak_rss_mib"] == 90 and row["outputs"] == [([10], "x")]
    assert row["rounds"] == {"latency_ms": [10, 30, 20], "tokens_per_s": [300, 100, 200]}
    assert merge_rounds([result(10, 300, 90), {"error": "worker died"}]) == {"error": "worker died"}
    assert merge_rounds([result(10, 300, 90)])["latency_ms"] == 10


def test_paired_rows_run_interleaved_in_one_worker(tiny_checkpoint, tiny_bundle, tmp_path, capsys):
    """--paired: the engine row and the CT2 row of the same precision and search share one worker, their
    results are each their own (tokens, BLEU), and the matchup table compares exactly those two."""
    from bench import run
    from nmt.cli import run_command

    out = tmp_path / "results"
    rows = "PyTorch cached greedy,engine fp32 greedy,CT2 fp32 greedy,engine fp32 beam 4"
    rc = run_command("bench", run.main, ["--checkpoint", str(tiny_checkpoint), "--bundle", str(tiny_bundle),
                     "--sentences", "10", "--latency-sentences", "2", "--repeats", "1", "--threads", "1",
                     "--rounds", "2", "--paired", "--rows", rows, "--out-dir", str(out), "--skip-grpc",
                     "--skip-profile"])
    report = json.loads((out / "latest.json").read_text())
    assert rc == 0 and report["failures"] == [], report["failures"]
    by_name = {r["name"]: r for r in report["rows"]}
    for name in ("engine fp32 greedy", "CT2 fp32 greedy"):
        r = by_name[name]
        assert r["paired_with"] == ["engine fp32 greedy", "CT2 fp32 greedy"], name
        assert r["peak_rss_mib"] is None and r["same_tokens_pct"] == 100.0, name
        assert len(r["rounds"]["latency_ms"]) == 2 and all(x > 0 for x in r["rounds"]["tokens_per_s"])
    # A row with no CT2 row selected runs alone, in its own process.
    alone = by_name["engine fp32 beam 4"]
    assert "paired_with" not in alone and alone["peak_rss_mib"] > 10
    (matchup,) = report["matchups"]
    ours, theirs = by_name["engine fp32 greedy"], by_name["CT2 fp32 greedy"]
    assert matchup["row"] == "fp32 greedy"
    assert matchup["tokens_per_s"] == pytest.approx(ours["tokens_per_s"] / theirs["tokens_per_s"])
    assert matchup["latency"] == pytest.approx(theirs["latency_ms"] / ours["latency_ms"])
    assert len(matchup["tokens_per_s_rounds"]) == 2
    text = (out / "latest.md").read_text()
    assert "| fp32 greedy |" in text and "--paired:" in text
    capsys.readouterr()


def test_measure_interleaves_systems_batch_by_batch():
    """Several systems: every batch runs on each back to back and every latency pass on each in turn,
    the first to go turning; each system's outputs are its own."""
    from bench.worker import measure

    calls: list[tuple[str, int]] = []

    def system(name: str):
        def run(texts: list[str]) -> list[tuple[list[int], str]]:
            calls.append((name, len(texts)))
            return [([len(t)], name + t) for t in texts]
        return run

    texts = [f"s{i}" * (i + 1) for i in range(5)]
    got = measure({"a": system("a"), "b": system("b")}, texts, n_latency=2, repeats=2, batch=2)
    timed = calls[4:]  # after two warm-up calls per system
    assert [n for n, _ in timed[:8]] == ["a", "a", "b", "b", "b", "b", "a", "a"]  # 2 repeats of 2 sentences
    batches = timed[8:]
    assert [n for n, _ in batches] == ["a", "b", "b", "a", "a", "b"] + ["b", "a", "a", "b", "b", "a"]
    assert [size for _, size in batches[:6]] == [2, 2, 2, 2, 1, 1]
    assert [o[1] for o in got["b"]["outputs"]] == ["b" + t for t in texts]
    assert got["a"]["generated_tokens"] == 5 and got["a"]["tokens_per_s"] > 0


def test_check_reports_a_conversion_mismatch():
    """A CTranslate2 row whose tokens differ from PyTorch is a failure, named, never hidden."""
    from bench import report, run

    def row(name: str, tokens: list[list[int]], bleu: float) -> dict:
        return {"name": name, "precision": "fp32", "beam": 1, "bleu": bleu,
                "outputs": [(t, " ".join(map(str, t))) for t in tokens]}

    rows = [row(run.REFERENCE, [[5, 6], [7]], 30.0), row("CT2 fp32 greedy", [[5, 6], [8]], 30.5),
            row("engine fp32 greedy", [[5, 6], [7]], 30.0)]
    failures = report.check(rows, ["a", "b"], run.REFERENCE, "CT2 fp32 greedy", 0.1)
    assert any("CTranslate2 conversion: 1 of 2 sentences" in f and "#1 'b'" in f for f in failures)
    assert any(f.startswith("CT2 fp32 greedy: BLEU 30.50") for f in failures)
    assert not any(f.startswith("engine") for f in failures)


@pytest.mark.parametrize("argv, message", [
    (["--sentences", "0"], "--sentences must be at least 1"),
    (["--checkpoint", "CKPT", "--grpc-duration", "0"], "--grpc-duration must be positive"),
    (["--checkpoint", "/nonexistent/best.pt"], "/nonexistent/best.pt"),
    (["--bundle", "/nonexistent/bundle"], "/nonexistent/bundle"),
    (["--test-src", "x.en"], "--test-src and --test-ref go together"),
    ([], "give --checkpoint"),
    (["--checkpoint", "CKPT", "--rows", "GPU magic"], "unknown rows ['GPU magic']"),
])
def test_bad_input_is_one_line(argv, message, tiny_checkpoint, capsys):
    from bench import run
    from nmt.cli import run_command

    argv = [str(tiny_checkpoint) if a == "CKPT" else a for a in argv]
    assert run_command("bench", run.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_ablation_table_reads_finished_runs_and_resumes(tmp_path, data_dir, capsys):
    from bench import ablate

    def finish(name: str, bleu: float, step: int) -> None:
        run = tmp_path / name
        run.mkdir()
        rows = [{"step": step - 50, "time_s": 10.0, "train_loss": 3.0, "lr": 1e-3, "tokens_per_s": 2000.0},
                {"step": step, "time_s": 20.0, "train_loss": 2.5, "lr": 1e-3, "tokens_per_s": 3000.0},
                {"step": step, "time_s": 20.0, "val_loss": 2.0, "val_bleu": bleu}]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    finish("recipe", 30.0, 800)
    finish("d128", 27.5, 1200)
    (tmp_path / "seed").mkdir()  # started, never finished: no final validation line
    (tmp_path / "seed" / "metrics.jsonl").write_text('{"step": 50, "time_s": 9.0, "train_loss": 4.0}\n')
    assert ablate.result(tmp_path / "seed") is None  # would be trained again
    argv = ["--data-dir", str(data_dir), "--out", str(tmp_path), "--table-only", "--only", "d128", "seed"]
    assert ablate.main(argv) == 0
    table = (tmp_path / "ablation.md").read_text()
    assert "| recipe | the small preset as shipped | 800 | 2500 | 2.000 | 30.00 |  |" in table
    assert "| d128 | narrower model: d_model 128, ffn 512 | 1200 | 2500 | 2.000 | 27.50 | -2.50 |" in table
    assert "| seed |" in table and "not run" in table
    assert ablate.main(["--data-dir", str(data_dir), "--out", str(tmp_path), "--only", "d1024"]) == 2
    assert "unknown variants ['d1024']" in capsys.readouterr().err
