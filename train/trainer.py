"""The training loop: AdamW + inverse-sqrt warmup, label smoothing, clipping, accumulation, AMP on
CUDA, periodic validation (loss + greedy sacreBLEU), atomic checkpoints and exact resume.

Multi-GPU runs go through `torchrun`: the process group comes from its environment variables,
the model is wrapped in DistributedDataParallel, every rank takes its own shard of the batches
and rank 0 alone evaluates and writes files.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import sacrebleu
import torch
import torch.distributed as dist
from tqdm import tqdm

from nmt.decoding import DecodeOptions
from nmt.files import atomic_write_bytes
from nmt.tokenizer import Tokenizer
from train.checkpoint import atomic_torch_save, load_checkpoint, make_checkpoint
from train.config import ModelConfig, TrainConfig
from train.data import Batch, BatchStream, encode_pairs, eval_batches, load_multi30k, read_parallel, read_tsv
from train.decode import translate
from train.model import Transformer


@dataclass(frozen=True)
class RunSpec:
    """Where the data comes from and where the run goes (everything that is not a hyper-parameter)."""

    out: Path
    data_dir: Path | None = None  # Multi30k copy; None -> $NMT_DATA_DIR or the verified download
    train_src: Path | None = None  # any parallel corpus instead of Multi30k
    train_tgt: Path | None = None
    train_tsv: Path | None = None
    valid_src: Path | None = None
    valid_tgt: Path | None = None
    device: str = "auto"  # auto | cpu | cuda
    amp: str = "auto"  # auto (bf16 when supported, else fp16) | bf16 | fp16 | off; CUDA only
    resume: bool = False
    progress: bool = True


def inverse_sqrt(warmup: int) -> Callable[[int], float]:
    """LR factor for optimizer step s (0-based): linear warmup to 1, then sqrt(warmup / step)."""
    def factor(s: int) -> float:
        n = s + 1
        return min(n / warmup, math.sqrt(warmup / n)) if warmup > 0 else 1.0 / math.sqrt(n)
    return factor


def pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def amp_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """Mixed precision only on CUDA; bf16 needs no loss scaling, fp16 does (GradScaler)."""
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


Pairs = tuple[list[str], list[str]]


def load_corpora(spec: RunSpec, tc: TrainConfig) -> tuple[Pairs, Pairs]:
    """(train, valid) sentence pairs; valid may be empty for a custom corpus without --valid-*."""
    if spec.train_tsv:
        train = read_tsv(spec.train_tsv)
    elif spec.train_src and spec.train_tgt:
        train = read_parallel(spec.train_src, spec.train_tgt)
    else:
        train = load_multi30k("train", tc.src_lang, tc.tgt_lang, spec.data_dir)
    if spec.valid_src and spec.valid_tgt:
        valid = read_parallel(spec.valid_src, spec.valid_tgt)
    elif spec.train_tsv or spec.train_src:
        valid = ([], [])
    else:
        valid = load_multi30k("val", tc.src_lang, tc.tgt_lang, spec.data_dir)
    return train, valid


class MetricsLog:
    """RUN_DIR/metrics.jsonl, one JSON object per line; a resumed run drops lines past its step."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        if resume_step is None:
            atomic_write_bytes(path, b"")
        elif path.is_file():
            lines = path.read_text().splitlines()
            keep = [ln for ln in lines if ln and json.loads(ln)["step"] <= resume_step]
            atomic_write_bytes(path, "".join(ln + "\n" for ln in keep).encode())

    def write(self, **row: Any) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    def __init__(self, mc: ModelConfig, tc: TrainConfig, spec: RunSpec):
        self.tc, self.spec = tc, spec
        self.distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if self.distributed and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() and spec.device != "cpu" else "gloo")
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        self.device = pick_device(spec.device, int(os.environ.get("LOCAL_RANK", "0")))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.amp = amp_dtype(self.device, spec.amp)
        self.is_main = self.rank == 0
        spec.out.mkdir(parents=True, exist_ok=True)

        last = spec.out / "last.pt"
        ckpt = load_checkpoint(last) if spec.resume and last.is_file() else None
        (train_src, train_tgt), (val_src, val_tgt) = load_corpora(spec, tc)
        self.tokenizer = (Tokenizer(ckpt["tokenizer"]) if ckpt
                          else self._train_tokenizer(train_src + train_tgt))
        mc = replace(mc, src_vocab_size=self.tokenizer.vocab_size, tgt_vocab_size=self.tokenizer.vocab_size)
        torch.manual_seed(tc.seed)  # identical initial weights on every rank
        self.model = Transformer(mc).to(self.device)
        self.stream = BatchStream(encode_pairs(self.tokenizer, train_src, train_tgt, tc.max_len),
                                  tc.max_tokens, tc.seed, self.rank, self.world)
        self.val_examples = encode_pairs(self.tokenizer, val_src, val_tgt, tc.max_len)
        self.valid = (val_src, val_tgt)  # the whole set: the final weights are chosen on it
        self.val_src = val_src[:tc.eval_bleu_sentences]
        self.val_ref = val_tgt[:tc.eval_bleu_sentences]
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=tc.lr, betas=tc.betas,
                                           weight_decay=tc.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, inverse_sqrt(tc.warmup_steps))
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == torch.float16)
        self.step, self.tokens_seen, self.elapsed, self.best_bleu = 0, 0, 0.0, -1.0
        if ckpt:
            self._restore(ckpt)
        else:
            torch.manual_seed(tc.seed + self.rank)  # dropout differs per rank
        self.metrics = (MetricsLog(spec.out / "metrics.jsonl", self.step if ckpt else None)
                        if self.is_main else None)
        self.ddp = (torch.nn.parallel.DistributedDataParallel(self.model, device_ids=[self.device.index]
                                                              if self.device.type == "cuda" else None)
                    if self.distributed else None)

    # ------------------------------------------------------------------ setup helpers

    def _train_tokenizer(self, sentences: list[str]) -> Tokenizer:
        """Rank 0 trains the joint SentencePiece model and saves it in the run; the others read it."""
        path = self.spec.out / "tokenizer.model"
        if self.is_main:
            tok = Tokenizer.train(sentences, self.tc.vocab_size)
            atomic_write_bytes(path, tok.model_proto)
        if self.distributed:
            dist.barrier()
        return tok if self.is_main else Tokenizer.load(path)

    def _restore(self, ckpt: dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.stream.load_state_dict(ckpt["data_state"])
        state = ckpt["trainer_state"]
        self.step, self.tokens_seen = ckpt["step"], state["tokens_seen"]
        self.elapsed, self.best_bleu = state["elapsed_s"], state["best_bleu"]
        rngs = ckpt["rng"]
        set_rng_state(rngs[self.rank] if self.rank < len(rngs) else rngs[0])

    # ------------------------------------------------------------------ one optimizer step

    def autocast(self):  # noqa: ANN201 - a context manager
        return torch.autocast("cuda", dtype=self.amp) if self.amp else nullcontext()

    def train_step(self) -> tuple[float, int]:
        """grad_accum batches per rank -> one update. Returns (mean loss per target token, target tokens),
        both over all ranks."""
        model = self.ddp or self.model
        batches = [next(self.stream).to(self.device) for _ in range(self.tc.grad_accum)]
        total = self._all_ranks_sum(float(sum(b.n_tokens for b in batches)))
        loss_sum = 0.0
        for i, b in enumerate(batches):
            # Gradients are all-reduced once per update, on the last micro-batch.
            sync = nullcontext() if self.ddp is None or i == len(batches) - 1 else self.ddp.no_sync()
            with sync, self.autocast():
                loss = self._loss(model, b, self.tc.label_smoothing) * (b.n_tokens / total)
            # DDP averages gradients over ranks: times world, the update is the token-weighted mean
            # over every rank's batches, the same as one process accumulating them all.
            self.scaler.scale(loss * self.world).backward()
            loss_sum += float(loss.detach())
        loss_sum = self._all_ranks_sum(loss_sum)
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tc.clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return loss_sum, int(total)

    def _all_ranks_sum(self, value: float) -> float:
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item())

    @staticmethod
    def _loss(model: torch.nn.Module, b: Batch, label_smoothing: float) -> torch.Tensor:
        raw = cast(Transformer, getattr(model, "module", model))  # unwrap DDP
        logits = model(b.src, b.src_mask, b.tgt_in)  # (B, T, V); DDP hooks need the forward call
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), b.tgt_out.flatten(),
                                                 ignore_index=raw.cfg.pad_id, label_smoothing=label_smoothing)

    # ------------------------------------------------------------------ validation and saving

    @torch.no_grad()
    def validate(self) -> tuple[float, float]:
        """(validation loss per token without smoothing, greedy sacreBLEU on the first sentences)."""
        self.model.eval()
        loss_sum, n = 0.0, 0
        for b in eval_batches(self.val_examples, self.tc.max_tokens):
            b = b.to(self.device)
            with self.autocast():
                loss_sum += float(self._loss(self.model, b, 0.0)) * b.n_tokens
            n += b.n_tokens
        hyps = translate(self.model, self.tokenizer, self.val_src, DecodeOptions())
        bleu = sacrebleu.corpus_bleu(hyps, [self.val_ref]).score
        self.model.train()
        return loss_sum / max(n, 1), bleu

    def weights(self, **meta: Any) -> dict[str, Any]:
        """A weights-only checkpoint of the model as it is now (what export and evaluate read)."""
        meta = {"src_lang": self.tc.src_lang, "tgt_lang": self.tc.tgt_lang, "step": self.step,
                "tokens_seen": self.tokens_seen, "elapsed_s": round(self.elapsed, 1), **meta}
        return make_checkpoint(self.model, self.tokenizer, train_config=self.tc, step=self.step, meta=meta)

    def save(self, val_bleu: float | None) -> None:
        rngs: list[Any] = [rng_state()]
        if self.distributed:
            rngs = [None] * self.world
            dist.all_gather_object(rngs, rng_state())
        if not self.is_main:
            return
        out = self.spec.out
        weights = self.weights(val_bleu=val_bleu, best_bleu=self.best_bleu)
        full = {**weights, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "data_state": self.stream.state_dict(), "rng": rngs,
                "trainer_state": {"tokens_seen": self.tokens_seen, "elapsed_s": self.elapsed,
                                  "best_bleu": self.best_bleu}}
        atomic_torch_save(full, out / "last.pt")
        atomic_torch_save(weights, out / f"step_{self.step}.pt")
        steps = sorted(int(p.stem.split("_")[1]) for p in out.glob("step_*.pt"))
        for old in steps[:-self.tc.keep_last] if self.tc.keep_last > 0 else steps:
            (out / f"step_{old}.pt").unlink(missing_ok=True)

    def evaluate_and_save(self) -> None:
        val_bleu = None
        if self.is_main and self.val_examples:
            assert self.metrics is not None  # the main process always logs
            val_loss, val_bleu = self.validate()
            self.metrics.write(step=self.step, time_s=round(self.elapsed, 2), val_loss=val_loss,
                               val_bleu=val_bleu)
            if val_bleu > self.best_bleu:
                self.best_bleu = val_bleu
                atomic_torch_save(self.weights(val_bleu=val_bleu), self.spec.out / "best.pt")
        self.save(val_bleu)

    # ------------------------------------------------------------------ the loop

    def should_stop(self) -> bool:
        # The time budget counts training steps only (validation and saving excluded), over the
        # whole run: a resumed run continues the same budget.
        stop = self.step >= self.tc.max_steps or (
            self.tc.max_minutes > 0 and self.elapsed >= 60 * self.tc.max_minutes)
        if self.distributed:  # every rank must stop at the same step
            flag = torch.tensor([float(stop)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
        return stop

    def fit(self) -> Path:
        """Train until a budget runs out; returns the path of last.pt."""
        self.model.train()
        bar = tqdm(total=self.tc.max_steps, initial=self.step, dynamic_ncols=True, mininterval=1.0,
                   disable=not (self.is_main and self.spec.progress))
        window_tokens, window_time = 0, 0.0  # throughput counts training steps only, not validation
        saved_at = evaluated_at = self.step
        while not self.should_stop():
            t0 = time.monotonic()
            loss, tokens = self.train_step()
            self.step += 1
            self.tokens_seen += tokens
            dt = time.monotonic() - t0
            self.elapsed += dt
            window_tokens, window_time = window_tokens + tokens, window_time + dt
            bar.update(1)
            if self.step % self.tc.log_every == 0:
                tps = window_tokens / max(window_time, 1e-9)
                lr = self.scheduler.get_last_lr()[0]
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:.0f}")
                if self.metrics:
                    self.metrics.write(step=self.step, time_s=round(self.elapsed, 2), train_loss=loss, lr=lr,
                                       tokens_per_s=tps)
                window_tokens, window_time = 0, 0.0
            if self.step % self.tc.eval_every == 0:
                self.evaluate_and_save()
                saved_at = evaluated_at = self.step
            elif self.step % self.tc.save_every == 0:
                self.save(None)
                saved_at = self.step
        if evaluated_at != self.step or not (self.spec.out / "last.pt").is_file():
            self.evaluate_and_save()
        elif saved_at != self.step:
            self.save(None)
        bar.close()
        if self.distributed:
            dist.barrier()
        return self.spec.out / "last.pt"
