"""The `nmt` command. Subcommands import lazily, so `nmt serve` works in an install without torch.

Each subcommand is a module with `main(argv: list[str]) -> int` that parses its own flags.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module, one-line help). Modules under train/ and export/ need torch; serve/ ones do not.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("train.cli", "train a Transformer on Multi30k or any parallel corpus"),
    "evaluate": ("train.evaluate", "sacreBLEU of a checkpoint's greedy and beam decoding on a test split"),
    "average": ("train.average", "average the last N checkpoints of a run into one"),
    "export": ("export.cli", "export a checkpoint to a validated ONNX bundle"),
    "serve": ("serve.cli", "run the gRPC translation server on one or more bundles"),
    "translate": ("serve.client", "translate texts through a running server"),
    "health": ("serve.health_cli", "check a server's health (exit 0 when SERVING)"),
    "batch": ("serve.batch", "translate a file through servers or a bundle, resumable"),
    "bench": ("bench.run", "benchmark PyTorch, our engine, CTranslate2 and gRPC side by side"),
    "stress": ("serve.stress", "seeded stress and fuzz run against a server"),
    "attention": ("train.attention", "draw attention maps of a translation as PNG grids"),
    "plot": ("train.plot", "plot a training run's curves"),
    "positional": ("train.plot", "draw the sinusoidal positional encoding"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: nmt COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`nmt COMMAND --help` describes a command's flags."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] == "--version":
        from nmt import __version__
        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"nmt: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name = COMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name in ("torch", "onnx", "onnxscript", "matplotlib", "ctranslate2"):
            print(f"nmt {name}: needs the '{e.name}' package; install the training extra: "
                  f"pip install 'nmt-transformer[train]'", file=sys.stderr)
            return 2
        raise
    entry = getattr(module, f"main_{name}", None) or module.main
    try:
        return int(entry(rest) or 0)
    except KeyboardInterrupt:
        print(f"nmt {name}: interrupted", file=sys.stderr)
        return 130
