"""`nmt train` end to end on a small real corpus: exact resume, run files, metrics, average, evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sacrebleu
import torch
from conftest import read_lines

from nmt.cli import run_command
from nmt.decoding import DecodeOptions
from train import average, cli, evaluate
from train.checkpoint import load_checkpoint, model_from_checkpoint
from train.decode import translate
from train.trainer import inverse_sqrt

STEPS = 12


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("corpus")
    files = {"train_src": ("train", "en", 800), "train_tgt": ("train", "de", 800),
             "valid_src": ("val", "en", 40), "valid_tgt": ("val", "de", 40),
             "test_src": ("test_2016_flickr", "en", 30), "test_tgt": ("test_2016_flickr", "de", 30)}
    out = {}
    for name, (split, lang, n) in files.items():
        out[name] = d / f"{name}.txt"
        out[name].write_text("\n".join(read_lines(split, lang, n)) + "\n", encoding="utf-8")
    return out


def train_args(corpus: dict[str, Path], out: Path, *extra: str) -> list[str]:
    args = ["--preset", "tiny", "--out", str(out), "--no-progress", "--device", "cpu"]
    for name, path in corpus.items():
        args += [f"--{name.replace('_', '-')}", str(path)]
    # Dropout on, so the resumed run must also restore the RNG to match.
    sets = ["dropout=0.1", "vocab_size=200", "max_tokens=600", "eval_every=6", "save_every=3", "keep_last=2",
            "eval_bleu_sentences=10", "log_every=2", "grad_accum=2", "warmup_steps=4"]
    for s in sets:
        args += ["--set", s]
    return args + list(extra)


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory) -> tuple[Path, Path]:
    """The same run twice: once uninterrupted, once stopped half-way and resumed."""
    root = tmp_path_factory.mktemp("runs")
    full, resumed = root / "full", root / "resumed"
    def train(out: Path, *extra: str) -> int:
        return run_command("train", cli.main, train_args(corpus, out, *extra))

    assert train(full, "--max-steps", str(STEPS)) == 0
    assert train(resumed, "--max-steps", str(STEPS // 2 + 1)) == 0
    assert load_checkpoint(resumed / "last.pt")["step"] == STEPS // 2 + 1
    assert train(resumed, "--max-steps", str(STEPS), "--resume") == 0
    return full, resumed


def test_resumed_run_equals_uninterrupted_run(runs):
    full, resumed = (load_checkpoint(r / "last.pt") for r in runs)
    assert full["step"] == resumed["step"] == STEPS
    assert full["tokenizer"] == resumed["tokenizer"]
    for name, tensor in full["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    assert full["data_state"] == resumed["data_state"]
    assert full["scheduler"]["last_epoch"] == resumed["scheduler"]["last_epoch"] == STEPS
    assert full["meta"]["tokens_seen"] == resumed["meta"]["tokens_seen"] > 0
    # The resumed run's training log reads as one run: same steps, same losses.
    a, b = ([json.loads(ln) for ln in (r / "metrics.jsonl").read_text().splitlines()] for r in runs)
    a, b = ([(m["step"], m["train_loss"]) for m in rows if "train_loss" in m] for rows in (a, b))
    assert a == b


def test_run_directory_layout_and_weights_only_checkpoints(runs):
    run = runs[0]
    names = sorted(p.name for p in run.iterdir())
    assert names == ["best.pt", "final.json", "final.pt", "last.pt", "metrics.jsonl", "step_12.pt",
                     "step_9.pt", "tokenizer.model"]
    for name in ("best.pt", "last.pt", "step_12.pt", "final.pt"):
        ckpt = torch.load(run / name, map_location="cpu", weights_only=True)
        assert ckpt["model_config"]["src_vocab_size"] == ckpt["model_config"]["tgt_vocab_size"] <= 200
        assert ckpt["tokenizer"] == (run / "tokenizer.model").read_bytes()
        assert ckpt["meta"]["src_lang"] == "en" and ckpt["meta"]["tgt_lang"] == "de"
        model, tok = model_from_checkpoint(ckpt)
        assert model.cfg.dropout == 0.1 and tok.vocab_size == model.cfg.src_vocab_size
    assert {"optimizer", "rng", "data_state"} <= set(load_checkpoint(run / "last.pt"))
    assert "optimizer" not in load_checkpoint(run / "best.pt")  # weights only: small files
    best = load_checkpoint(run / "best.pt")["meta"]
    assert best["step"] in (6, 12) and isinstance(best["val_bleu"], float)


def test_metrics_file_has_train_and_eval_lines(runs):
    rows = [json.loads(ln) for ln in (runs[0] / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train_loss" in r]
    eval_rows = [r for r in rows if "val_bleu" in r]
    assert [r["step"] for r in train_rows] == list(range(2, STEPS + 1, 2))
    assert [r["step"] for r in eval_rows] == [6, 12]
    assert all(set(r) == {"step", "time_s", "train_loss", "lr", "tokens_per_s"} for r in train_rows)
    assert all(set(r) == {"step", "time_s", "val_loss", "val_bleu"} for r in eval_rows)
    assert train_rows[-1]["train_loss"] < train_rows[0]["train_loss"]
    assert all(r["tokens_per_s"] > 0 for r in train_rows)


def test_final_weights_are_chosen_on_validation_and_test_is_reported(runs, corpus):
    run = runs[0]
    report = json.loads((run / "final.json").read_text())
    assert report["steps"] == STEPS and report["training_seconds"] > 0
    rows = report["candidates"]
    assert [r["candidate"] for r in rows] == ["last step", "average of last 2"]
    assert rows[1]["checkpoints"] == ["step_9.pt", "step_12.pt"]
    best = max(rows, key=lambda r: r["val_bleu"])
    assert report["final"] == best["candidate"]
    # final.pt holds exactly the chosen weights.
    final = load_checkpoint(run / "final.pt")
    if best["candidate"] == "last step":
        expected = load_checkpoint(run / "last.pt")["model"]
        assert "averaged_from" not in final["meta"]
    else:
        a, b = load_checkpoint(run / "step_9.pt")["model"], load_checkpoint(run / "step_12.pt")["model"]
        expected = {k: (a[k].double() + b[k].double()).div(2).float() for k in a}
        assert final["meta"]["averaged_from"] == ["step_9.pt", "step_12.pt"]
    for name, tensor in final["model"].items():
        assert torch.allclose(tensor, expected[name], atol=1e-6), name
    # The reported test BLEU is that of final.pt, with detokenized cased sacreBLEU.
    test = report["test"]
    assert test["sentences"] == 30 and set(test) >= {"greedy", "beam 4", "signature"}
    assert test["signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp")
    model, tok = model_from_checkpoint(final)
    src = corpus["test_src"].read_text().splitlines()
    ref = corpus["test_tgt"].read_text().splitlines()
    hyps = translate(model, tok, src, DecodeOptions())
    assert round(sacrebleu.corpus_bleu(hyps, [ref]).score, 2) == test["greedy"]["bleu"]


def test_finished_run_resumed_trains_nothing_and_prints_the_report(corpus, runs, capsys):
    run = runs[0]
    assert run_command("train", cli.main, train_args(corpus, run, "--max-steps", str(STEPS), "--resume")) == 0
    out = capsys.readouterr().out
    assert f"step {STEPS}:" in out
    assert "final weights (greedy validation BLEU): last step" in out
    assert "greedy: BLEU = " in out and "beam 4: BLEU = " in out
    assert "signature: nrefs:1|case:mixed|eff:no|tok:13a" in out


def test_time_budget_counts_training_and_carries_over_a_resume(corpus, tmp_path):
    run = tmp_path / "timed"
    budget = ["--max-minutes", "0.0001", "--skip-final"]  # 6 ms: a step or two
    assert run_command("train", cli.main, train_args(corpus, run, *budget)) == 0
    steps = load_checkpoint(run / "last.pt")["step"]
    assert 1 <= steps < STEPS
    assert run_command("train", cli.main, train_args(corpus, run, *budget, "--resume")) == 0
    assert load_checkpoint(run / "last.pt")["step"] == steps  # the budget was spent: no new step
    assert not (run / "final.pt").exists()


def test_test_set_flags_are_checked_before_training(corpus, tmp_path, capsys):
    run = tmp_path / "bad"
    assert run_command("train", cli.main, train_args(corpus, run, "--test-split", "val")) == 2
    assert "a custom corpus takes --test-src/--test-tgt" in capsys.readouterr().err
    argv = [a for a in train_args(corpus, run) if a != str(corpus["test_tgt"]) and a != "--test-tgt"]
    assert run_command("train", cli.main, [*argv, "--final-beam", "0"]) == 2
    err = capsys.readouterr().err
    assert "--test-src and --test-tgt go together" in err and "--final-beam must be >= 1" in err
    assert not run.exists()


def test_inverse_sqrt_schedule():
    f = inverse_sqrt(4)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(15) == pytest.approx(0.5)  # step 16: sqrt(4 / 16)


def test_average_of_last_checkpoints(runs, tmp_path, capsys):
    run = runs[0]
    out = tmp_path / "avg.pt"
    assert run_command("average", average.main, [str(run), "--last", "2", "--out", str(out)]) == 0
    avg = load_checkpoint(out)
    a, b = load_checkpoint(run / "step_9.pt")["model"], load_checkpoint(run / "step_12.pt")["model"]
    for name, tensor in avg["model"].items():
        assert torch.allclose(tensor, (a[name] + b[name]) / 2, atol=1e-6), name
    assert avg["meta"]["averaged_from"] == ["step_9.pt", "step_12.pt"]
    assert run_command("average", average.main, [str(run), "--last", "5", "--out", str(out)]) == 2
    assert "only 2 step_*.pt checkpoints" in capsys.readouterr().err


def test_evaluate_prints_greedy_and_beam_bleu_with_signature(tiny_checkpoint, data_dir, capsys):
    argv = [str(tiny_checkpoint), "--data-dir", str(data_dir), "--limit", "8", "--beam", "2"]
    assert run_command("evaluate", evaluate.main, argv) == 0
    out = capsys.readouterr().out
    assert "greedy: BLEU = " in out and "beam 2: BLEU = " in out
    assert "signature: nrefs:1|case:mixed|eff:no|tok:13a" in out
    assert run_command("evaluate", evaluate.main, [str(tiny_checkpoint.parent / "missing.pt")]) == 2
    assert "no such checkpoint file" in capsys.readouterr().err
