"""`nmt export CHECKPOINT --out DIR [--dtype fp32|fp16|int8] [--opset N] [--name NAME] [--force]`."""

from __future__ import annotations

import argparse
import time
from typing import NoReturn

from export.pipeline import DEFAULT_OPSET, DTYPES, GRAPH_STYLES, ExportError, export_bundle
from nmt.bundle import read_manifest
from nmt.errors import UserError


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line on stderr (exit 2), like every other error of the command."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = OneLineParser(prog="nmt export", description="Export a checkpoint to a validated ONNX bundle.")
    p.add_argument("checkpoint", help="checkpoint file written by `nmt train` (or `nmt average`)")
    p.add_argument("--out", required=True, help="bundle directory to create")
    p.add_argument("--dtype", choices=DTYPES, default="fp32",
                   help="fp32 (default), fp16 (CUDA) or int8 (dynamic quantization, CPU)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--name", help="model name served under (default: SRC-TGT from the checkpoint)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle directory")
    p.add_argument("--graphs", choices=GRAPH_STYLES, default="auto",
                   help="fused: encoder/decoder written with ONNX Runtime's fused attention ops; traced: "
                        "the PyTorch trace; auto (default): fused for pre-norm fp32/int8 models")
    return p.parse_args(argv)


def one_line(e: BaseException) -> str:
    """The first line of an error (torch's unpickling errors run over many lines)."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        out = export_bundle(args.checkpoint, args.out, args.dtype, opset=args.opset, name=args.name,
                            force=args.force, graphs=args.graphs)
    except UserError:
        raise
    except Exception as e:  # exporter/converter failures: still one line, the bundle was not written
        raise ExportError(f"export failed ({type(e).__name__}: {one_line(e)})") from e
    m = read_manifest(out)
    v = m.raw["validation"]
    size = sum(f["bytes"] for f in m.files.values())
    if v.get("skipped"):
        check = f"not validated: {v['reason']}"
    else:
        check = (f"validated: worst {v['worst']['output']} diff {v['worst']['max_abs_diff']:.2g}, "
                 f"greedy {v['greedy']['identical']}/{v['greedy']['sentences']} identical")
    graphs = "fused" if m.optimizations else "traced"
    print(f"{out}: {m.name} {m.dtype} {graphs} opset {m.opset}, {size / 1e6:.1f} MB in "
          f"{time.perf_counter() - start:.1f}s; {check}")
    return 0
