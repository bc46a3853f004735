"""`nmt plot` and `nmt positional`: PNGs are written, readable, and bad input is a one-line error."""

from __future__ import annotations

import json

import matplotlib.image as mpimg
import numpy as np
import pytest

from nmt.cli import main
from train.model import sinusoid_table
from train.plot import read_metrics, series


def write_metrics(run, torn_tail: bool = False):
    run.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"step": s, "time_s": s * 0.1, "train_loss": 5.0 / s, "lr": 1e-3,
                         "tokens_per_s": 900.0})
             for s in range(1, 41)]
    lines += [json.dumps({"step": s, "time_s": s * 0.1, "val_loss": 4.0 / s, "val_bleu": float(s)})
              for s in (10, 20, 30, 40)]
    text = "\n".join(lines) + "\n" + ('{"step": 41, "train_lo' if torn_tail else "")
    (run / "metrics.jsonl").write_text(text)


def test_plot_draws_every_logged_curve(tmp_path, capsys):
    run = tmp_path / "run"
    write_metrics(run, torn_tail=True)  # a run killed mid-write still plots
    assert main(["plot", str(run)]) == 0
    out = capsys.readouterr().out
    for title in ("training loss", "validation loss", "learning rate", "validation BLEU", "tokens / s"):
        assert title in out
    img = mpimg.imread(run / "curves.png")
    assert img.shape[1] > 2.5 * img.shape[0]  # five panels side by side


def test_plot_against_training_minutes(tmp_path, capsys):
    run = tmp_path / "run"
    write_metrics(run)
    assert series(read_metrics(run), "val_bleu", "minutes") == (
        [pytest.approx(s * 0.1 / 60) for s in (10, 20, 30, 40)], [10.0, 20.0, 30.0, 40.0])
    assert main(["plot", str(run), "--x", "minutes", "--out", str(tmp_path / "m.png")]) == 0
    assert mpimg.imread(tmp_path / "m.png").shape[1] > 0


def test_plot_missing_metrics_is_one_line_error(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "metrics.jsonl" in err


def test_positional_heatmap(tmp_path):
    out = tmp_path / "pe.png"
    assert main(["positional", "--dim", "32", "--length", "40", "--out", str(out)]) == 0
    img = mpimg.imread(out)
    assert img.ndim == 3 and img.shape[0] > 100 and img.std() > 0.05  # a real picture, not blank


def test_positional_similarity_depends_on_distance_only():
    pe = sinusoid_table(60, 64).numpy()
    sim = pe @ pe.T  # (L, L)
    # Every diagonal of the similarity matrix is constant: PE(p).PE(q) = f(|p - q|).
    for k in range(0, 20):
        assert np.ptp(np.diagonal(sim, k)) < 1e-3


@pytest.mark.parametrize("args", [["--dim", "3"], ["--dim", "0"], ["--length", "0"]])
def test_positional_bad_args(args, tmp_path, capsys):
    assert main(["positional", *args, "--out", str(tmp_path / "x.png")]) == 2
    assert "must be" in capsys.readouterr().err
