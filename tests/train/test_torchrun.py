"""DDP for real: `torchrun --nproc-per-node 2` on CPU (gloo ranks) against one process accumulating
the same global batch (grad_accum 2), on the tiny preset (no dropout, so both see the same function).

Tolerance: the per-step training losses and the final weights agree to 1e-4 (relative / absolute);
what differs is only the order of float additions (all-reduce vs accumulation). NCCL is not run here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import read_lines

REPO = Path(__file__).resolve().parents[2]
STEPS = 4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, data_dir) -> Path:
    d = tmp_path_factory.mktemp("ddp-corpus")
    for split, n in (("train", 800), ("val", 20)):
        for lang in ("en", "de"):
            (d / f"{split}.{lang}").write_text("\n".join(read_lines(split, lang, n)) + "\n", encoding="utf-8")
    return d


def train(corpus: Path, out: Path, nproc: int, grad_accum: int, max_steps: int = STEPS,
          resume: bool = False) -> None:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    launcher = torchrun + ["-m", "nmt"] if nproc > 1 else [sys.executable, "-m", "nmt"]
    cmd = launcher + ["train", "--preset", "tiny", "--out", str(out), "--device", "cpu", "--no-progress",
                      "--train-src", str(corpus / "train.en"), "--train-tgt", str(corpus / "train.de"),
                      "--valid-src", str(corpus / "val.en"), "--valid-tgt", str(corpus / "val.de"),
                      "--max-steps", str(max_steps), "--skip-final", "--test-split", "none",
                      "--set", "log_every=1", "--set", "eval_every=1000", "--set", "save_every=2",
                      "--set", f"grad_accum={grad_accum}"] + (["--resume"] if resume else [])
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "train_loss" in r]
    assert len(steps) == len(set(steps)), "a step logged twice: more than one rank writes"
    return {r["step"]: r["train_loss"] for r in rows if "train_loss" in r}


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "last.pt", map_location="cpu", weights_only=False)["model"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert worst < 1e-4, worst


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ddp-runs")
    out = {"ddp": root / "ddp", "single": root / "single", "resumed": root / "resumed"}
    train(corpus, out["ddp"], nproc=2, grad_accum=1)
    train(corpus, out["single"], nproc=1, grad_accum=2)
    train(corpus, out["resumed"], nproc=2, grad_accum=1, max_steps=STEPS // 2)
    train(corpus, out["resumed"], nproc=2, grad_accum=1, resume=True)
    return out


def test_two_ranks_match_one_process_with_accumulation(runs):
    ddp, single = losses(runs["ddp"]), losses(runs["single"])
    assert sorted(ddp) == sorted(single) == list(range(1, STEPS + 1))
    for step in ddp:
        assert ddp[step] == pytest.approx(single[step], rel=1e-4), step
    assert_same_weights(runs["ddp"], runs["single"])
    a, b = (torch.load(runs[k] / "last.pt", map_location="cpu", weights_only=False)
            for k in ("ddp", "single"))
    assert a["trainer_state"]["tokens_seen"] == b["trainer_state"]["tokens_seen"]  # the same global batches


def test_rank_zero_writes_the_checkpoint_once(runs):
    run = runs["ddp"]
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "last.pt", "metrics.jsonl", "step_2.pt",
                                                     "step_4.pt", "tokenizer.model"]  # no temporary files
    ckpt = torch.load(run / "last.pt", map_location="cpu", weights_only=False)
    assert ckpt["step"] == STEPS and len(ckpt["rng"]) == 2  # every rank's RNG state, gathered to rank 0


def test_resume_from_a_ddp_checkpoint_continues_exactly(runs):
    assert_same_weights(runs["ddp"], runs["resumed"])
    resumed, straight = losses(runs["resumed"]), losses(runs["ddp"])
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in straight:
        assert resumed[step] == pytest.approx(straight[step], rel=1e-4), step


def test_each_rank_takes_a_disjoint_shard(runs):
    """The ranks' batch lists of an epoch are disjoint and, interleaved, the batches one process takes
    (this is why the losses above agree)."""
    from nmt.tokenizer import Tokenizer
    from train.config import preset
    from train.data import BatchStream, encode_pairs

    _, tc = preset("tiny")
    tok = Tokenizer.load(runs["ddp"] / "tokenizer.model")
    examples = encode_pairs(tok, read_lines("train", "en", 800), read_lines("train", "de", 800), tc.max_len)
    single = BatchStream(examples, tc.max_tokens, tc.seed)._batches
    shards = [BatchStream(examples, tc.max_tokens, tc.seed, rank=r, world=2)._batches for r in (0, 1)]
    seen = [{i for b in shard for i in b} for shard in shards]
    assert seen[0] and not seen[0] & seen[1]
    interleaved = [b for pair in zip(*shards) for b in pair]
    assert interleaved == single[:len(interleaved)] and len(interleaved) >= len(single) - 1
