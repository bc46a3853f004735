"""Pictures of training: `nmt plot RUN_DIR` (curves) and `nmt positional` (the sinusoid table).

Reads RUN_DIR/metrics.jsonl as the trainer writes it: train lines {"step", "time_s",
"train_loss", "lr", "tokens_per_s"} and eval lines {"step", "time_s", "val_loss", "val_bleu"}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

from nmt.errors import UserError

matplotlib.use("Agg")  # files only: no display on servers
import matplotlib.pyplot as plt  # noqa: E402

# (metric key, panel title); a panel is drawn only when the run logged that metric.
CURVES = [
    ("train_loss", "training loss"),
    ("val_loss", "validation loss"),
    ("lr", "learning rate"),
    ("val_bleu", "validation BLEU"),
    ("tokens_per_s", "tokens / s"),
]


class PlotError(UserError):
    pass


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{path}: no metrics file (is {run_dir} a training run directory?)")
    rows = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            # A run killed mid-write leaves a torn last line; anything earlier is corruption.
            if n == len(lines):
                break
            raise PlotError(f"{path}:{n}: not a JSON line") from None
    if not rows:
        raise PlotError(f"{path}: empty")
    return rows


# x axes: optimizer steps, or minutes of training (time_s counts training steps, not validation).
X_AXES = {"step": ("step", lambda r: r["step"]), "minutes": ("training minutes", lambda r: r["time_s"] / 60)}


def series(rows: list[dict], key: str, x: str = "step") -> tuple[list[float], list[float]]:
    pick = X_AXES[x][1]
    pts = [(pick(r), r[key]) for r in rows if key in r and r[key] is not None and "step" in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_run(run_dir: Path, out: Path, x: str = "step") -> list[str]:
    """Draw one panel per logged metric against steps or minutes; returns the panel titles drawn."""
    rows = read_metrics(run_dir)
    panels = [(k, t) for k, t in CURVES if series(rows, k)[0]]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        xs, ys = series(rows, key, x)
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3)
        ax.set_title(title)
        ax.set_xlabel(X_AXES[x][0])
        ax.grid(alpha=0.3)
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    save_figure(fig, out)
    return [t for _, t in panels]


def positional_figure(dim: int, length: int, out: Path) -> None:
    """The encoding matrix as a heatmap, and PE(p) . PE(q): similarity depends on |p - q| only."""
    from train.model import sinusoid_table

    pe = sinusoid_table(length, dim).numpy()  # (L, D)
    sim = pe @ pe.T  # (L, L)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    im = a.imshow(pe, aspect="auto", cmap="RdBu", vmin=-1, vmax=1)
    a.set_title(f"sinusoidal positional encoding (d={dim})")
    a.set_xlabel("dimension")
    a.set_ylabel("position")
    fig.colorbar(im, ax=a)
    im = b.imshow(sim, cmap="viridis")
    b.set_title("PE(p) · PE(q): depends on the distance |p - q|")
    b.set_xlabel("position q")
    b.set_ylabel("position p")
    fig.colorbar(im, ax=b)
    fig.tight_layout()
    save_figure(fig, out)


def save_figure(fig, out: Path) -> None:  # noqa: ANN001 - a matplotlib Figure
    """Write the PNG atomically: a reader never sees half a picture."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=110)
        tmp.replace(out)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def main_plot(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="nmt plot", description="Plot a run's loss, lr, BLEU and tokens/s.")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, help="PNG path (default RUN_DIR/curves.png)")
    p.add_argument("--x", choices=tuple(X_AXES), default="step",
                   help="x axis: optimizer steps or training minutes")
    args = p.parse_args(argv)
    out = args.out or args.run_dir / "curves.png"
    panels = plot_run(args.run_dir, out, args.x)
    print(f"wrote {out} ({', '.join(panels)})")
    return 0


def main_positional(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="nmt positional", description="Draw the sinusoidal positional encoding.")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--length", type=int, default=100)
    p.add_argument("--out", type=Path, default=Path("positional.png"))
    args = p.parse_args(argv)
    if args.dim <= 0 or args.dim % 2 or args.length <= 0:
        raise PlotError("--dim must be a positive even number and --length positive")
    positional_figure(args.dim, args.length, args.out)
    print(f"wrote {args.out}")
    return 0


def main(argv: list[str]) -> int:
    return main_plot(argv)


__all__ = ["main_plot", "main_positional", "plot_run", "positional_figure", "read_metrics"]
