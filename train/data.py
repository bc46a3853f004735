"""Parallel corpora: Multi30k (local copy or verified download), text/TSV files, token-bucketed batches.

Reading is strict: a corpus with mismatched line counts, an empty file or bytes that are not
UTF-8 raises CorpusError with one line naming the file and the line, which the CLI prints as is.
"""

from __future__ import annotations

import gzip
import os
import random
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from nmt.errors import UserError
from nmt.files import sha256_file
from nmt.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer

SPLITS = ("train", "val", "test_2016_flickr")
LANGS = ("en", "de", "fr")
MULTI30K_URL = "https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw/{name}"
MULTI30K_SHA256 = {
    "test_2016_flickr.de.gz": "9204244e408ccb38d2a55cfcd344df15005fc42a07a6e55ca6c52b6ababb8cc8",
    "test_2016_flickr.en.gz": "611d361c6334bc7246101d48097c13cf5c4413c5befc793cc629934359d532d9",
    "test_2016_flickr.fr.gz": "6d326e188d259fb1d04ac19eae3af956559b3a0b93d7635e56c90987c40c8b90",
    "train.de.gz": "726e39b2fa9eb9ffb6dc763fb35a179f80fae06ffc5d28b6ace5faa883de28a6",
    "train.en.gz": "d79cfa999dd4c51d2cb42499b6796d5a882c3a8a961923c25a898c90f8bbd56f",
    "train.fr.gz": "622e75069e9f4c577425c4f277116ce66e63a2401c0a2312d90073cb12379a3c",
    "val.de.gz": "f0cba2f995189cf5770f29a8a9a537a3ad3f51657ad873405082ff6863a5e75a",
    "val.en.gz": "14f7d25ddd868909a9213e361768460edcacdd6ab9d1e77b92560dc10c10dc28",
    "val.fr.gz": "ca3106f1a72390591d25f6c45cb4cd39dec4cd3f123e099748a3ce5256c160e9",
}


class CorpusError(UserError):
    """A corpus we cannot use; the message is one line naming the file (and line) at fault."""


# --------------------------------------------------------------------------- reading files


def read_lines(path: str | Path) -> list[str]:
    """All lines of a text file (gzip when the name ends in .gz), strictly UTF-8."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"{path}: no such file")
    opener = gzip.open if path.suffix == ".gz" else open
    lines = []
    try:
        with opener(path, "rb") as f:
            for n, raw in enumerate(f, start=1):
                try:
                    lines.append(raw.decode("utf-8").rstrip("\r\n"))
                except UnicodeDecodeError as e:
                    raise CorpusError(f"{path}:{n}: not valid UTF-8 (byte {e.start} of the line)") from None
    except (OSError, EOFError) as e:  # a broken gzip stream
        raise CorpusError(f"{path}: cannot read ({e})") from None
    if not lines or not any(line.strip() for line in lines):
        raise CorpusError(f"{path}: file is empty")
    return lines


def read_parallel(src_path: str | Path, tgt_path: str | Path) -> tuple[list[str], list[str]]:
    """Two aligned files, one sentence per line."""
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    if len(src) != len(tgt):
        n = min(len(src), len(tgt)) + 1
        short = src_path if len(src) < len(tgt) else tgt_path
        raise CorpusError(f"{src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}: "
                          f"{short} ends before line {n}")
    return src, tgt


def read_tsv(path: str | Path) -> tuple[list[str], list[str]]:
    """A TSV of `source<TAB>target` lines."""
    src, tgt = [], []
    for n, line in enumerate(read_lines(path), start=1):
        fields = line.split("\t")
        if len(fields) != 2:
            raise CorpusError(f"{path}:{n}: expected 2 tab-separated fields, found {len(fields)}")
        src.append(fields[0])
        tgt.append(fields[1])
    return src, tgt


# --------------------------------------------------------------------------- Multi30k


def verify_sha256(path: Path, expected: str, name: str | None = None) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise CorpusError(f"{name or path}: checksum mismatch (sha256 {actual}, expected {expected})")


def download(url: str, dest: Path, sha256: str) -> Path:
    """Fetch url into dest atomically; the file only appears once its checksum is verified."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
            while chunk := resp.read(1 << 20):
                out.write(chunk)
        verify_sha256(Path(tmp), sha256, name=url)
        os.replace(tmp, dest)
    except OSError as e:
        raise CorpusError(f"{url}: download failed ({e})") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    return dest


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nmt" / "multi30k"


def multi30k_file(split: str, lang: str, data_dir: str | Path | None = None,
                  cache_dir: Path | None = None) -> Path:
    """Path of one Multi30k file: from data_dir (or $NMT_DATA_DIR), else the verified download cache."""
    if split not in SPLITS:
        raise CorpusError(f"unknown Multi30k split {split!r}; choose one of {', '.join(SPLITS)}")
    if lang not in LANGS:
        raise CorpusError(f"unknown Multi30k language {lang!r}; choose one of {', '.join(LANGS)}")
    data_dir = data_dir or os.environ.get("NMT_DATA_DIR")
    if data_dir:
        for name in (f"{split}.{lang}.gz", f"{split}.{lang}"):
            if (Path(data_dir) / name).is_file():
                return Path(data_dir) / name
        raise CorpusError(f"{data_dir}: has neither {split}.{lang}.gz nor {split}.{lang}")
    name = f"{split}.{lang}.gz"
    path = (cache_dir or default_cache_dir()) / name
    if not path.is_file():
        download(MULTI30K_URL.format(name=name), path, MULTI30K_SHA256[name])
    return path


def load_multi30k(split: str, src_lang: str, tgt_lang: str,
                  data_dir: str | Path | None = None) -> tuple[list[str], list[str]]:
    return read_parallel(multi30k_file(split, src_lang, data_dir), multi30k_file(split, tgt_lang, data_dir))


# --------------------------------------------------------------------------- examples and batches


@dataclass
class Batch:
    src: Tensor  # (B, S) source ids ending in EOS, padded
    src_mask: Tensor  # (B, S) True on real tokens
    tgt_in: Tensor  # (B, T) BOS + target
    tgt_out: Tensor  # (B, T) target + EOS, the labels
    n_tokens: int  # real target tokens (labels), for tokens/s and loss weighting

    def to(self, device: torch.device) -> Batch:
        return Batch(self.src.to(device), self.src_mask.to(device), self.tgt_in.to(device),
                     self.tgt_out.to(device), self.n_tokens)


Example = tuple[list[int], list[int]]  # (source ids + EOS, target ids without BOS/EOS)


def encode_pairs(tokenizer: Tokenizer, src: list[str], tgt: list[str], max_len: int) -> list[Example]:
    """Tokenize and keep pairs whose sides are non-empty and at most max_len tokens (EOS counted)."""
    s_ids, t_ids = tokenizer.encode_batch(src), tokenizer.encode_batch(tgt)
    return [(s + [EOS_ID], t) for s, t in zip(s_ids, t_ids)
            if s and t and len(s) + 1 <= max_len and len(t) + 1 <= max_len]


def collate(examples: list[Example]) -> Batch:
    S = max(len(s) for s, _ in examples)
    T = max(len(t) for _, t in examples) + 1  # BOS/EOS shift
    src = torch.tensor([s + [PAD_ID] * (S - len(s)) for s, _ in examples])  # (B, S)
    lengths = torch.tensor([len(s) for s, _ in examples])  # (B,)
    tgt_in = torch.tensor([[BOS_ID] + t + [PAD_ID] * (T - 1 - len(t)) for _, t in examples])  # (B, T)
    tgt_out = torch.tensor([t + [EOS_ID] + [PAD_ID] * (T - 1 - len(t)) for _, t in examples])  # (B, T)
    src_mask = torch.arange(S)[None, :] < lengths[:, None]  # (B, S)
    return Batch(src, src_mask, tgt_in, tgt_out, sum(len(t) + 1 for _, t in examples))


def bucket_batches(examples: list[Example], max_tokens: int, rng: random.Random) -> list[list[int]]:
    """Group examples of similar length so that rows * (padded src + padded tgt) <= max_tokens.

    A random order before the stable length sort varies the batches between epochs.
    """
    order = list(range(len(examples)))
    rng.shuffle(order)
    order.sort(key=lambda i: (len(examples[i][0]), len(examples[i][1])))
    batches: list[list[int]] = []
    cur: list[int] = []
    S = T = 0
    for i in order:
        s, t = len(examples[i][0]), len(examples[i][1]) + 1
        if cur and (len(cur) + 1) * (max(S, s) + max(T, t)) > max_tokens:
            batches.append(cur)
            cur, S, T = [], 0, 0
        cur.append(i)
        S, T = max(S, s), max(T, t)
    if cur:
        batches.append(cur)
    return batches


class BatchStream:
    """An endless, seeded stream of training batches with a resumable position (epoch, index).

    Batch composition and order of epoch e depend only on (seed, e), so a run restored from
    (epoch, index) sees exactly the batches an uninterrupted run would. With several processes
    each rank takes every world-th batch of the same list (its shard).
    """

    def __init__(self, examples: list[Example], max_tokens: int, seed: int, rank: int = 0, world: int = 1):
        if not examples:
            raise CorpusError("no training pairs left after length filtering")
        self.examples, self.max_tokens, self.seed = examples, max_tokens, seed
        self.rank, self.world = rank, world
        self.epoch, self.index = 0, 0
        self._batches = self._epoch_batches()

    def _epoch_batches(self) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        batches = bucket_batches(self.examples, self.max_tokens, rng)
        rng.shuffle(batches)
        usable = len(batches) - len(batches) % self.world  # equal steps on every rank
        if usable == 0:
            raise CorpusError(f"only {len(batches)} batches for {self.world} processes; lower max_tokens")
        return batches[:usable][self.rank::self.world]

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> Batch:
        if self.index >= len(self._batches):
            self.epoch, self.index = self.epoch + 1, 0
            self._batches = self._epoch_batches()
        batch = collate([self.examples[i] for i in self._batches[self.index]])
        self.index += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._batches = self._epoch_batches()


def eval_batches(examples: list[Example], max_tokens: int) -> list[Batch]:
    """Fixed validation batches (no shuffling) for the loss."""
    return [collate([examples[i] for i in b]) for b in bucket_batches(examples, max_tokens, random.Random(0))]
