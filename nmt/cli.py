"""The `nmt` command. Subcommands import lazily, so `nmt serve` works in an install without torch.

Each subcommand is a module with `main(argv: list[str]) -> int` that parses its own flags and raises
UserError (nmt.errors) for anything the user should read; errors are caught here, once, for every
command: one line on stderr and the documented exit code (0 ok, 1 runtime failure, 2 bad usage/input).
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Callable

from nmt.errors import EXIT_FAILURE, EXIT_USAGE, UserError

# name -> (module, one-line help). Modules under train/ and export/ need torch; serve/ ones do not.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("train.cli", "train a Transformer on Multi30k or any parallel corpus"),
    "evaluate": ("train.evaluate", "sacreBLEU of a checkpoint's greedy and beam decoding on a test split"),
    "average": ("train.average", "average the last N checkpoints of a run into one"),
    "export": ("export.cli", "export a checkpoint to a validated ONNX bundle"),
    "import-marian": ("export.marian_cli", "import a Hugging Face Marian (OPUS-MT) model folder as a bundle"),
    "serve": ("serve.server.cli", "run the gRPC translation server on one or more bundles"),
    "translate": ("serve.protocol.client", "translate texts through a running server"),
    "health": ("serve.protocol.health", "check a server's health (exit 0 when SERVING)"),
    "batch": ("serve.jobs.job", "translate a file through servers or a bundle, resumable"),
    "bench": ("bench.run", "benchmark PyTorch, our engine, CTranslate2 and gRPC side by side"),
    "stress": ("bench.stress.run", "seeded stress and fuzz run against a server"),
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
        return EXIT_USAGE
    module_name = COMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == "transformers":
            print(f"nmt {name}: needs the 'transformers' package; install the marian extra: "
                  f"pip install 'nmt-transformer[train,marian]'", file=sys.stderr)
            return EXIT_USAGE
        if e.name in ("torch", "onnx", "onnxscript", "matplotlib", "ctranslate2"):
            print(f"nmt {name}: needs the '{e.name}' package; install the training extra: "
                  f"pip install 'nmt-transformer[train]'", file=sys.stderr)
            return EXIT_USAGE
        if e.name and e.name.split(".")[0] in ("train", "export", "bench"):  # the serving image lacks them
            print(f"nmt {name}: not part of this install (it has the serving commands only)", file=sys.stderr)
            return EXIT_USAGE
        raise
    entry = getattr(module, f"main_{name}", None) or module.main
    return run_command(name, entry, rest)


def one_line(text: str) -> str:
    lines = str(text).strip().splitlines()
    return lines[0] if lines else ""


def run_command(name: str, entry: Callable[[list[str]], int | None], argv: list[str]) -> int:
    """Run a command's entry point, turning every error into one line on stderr and an exit code."""
    try:
        return int(entry(argv) or 0)
    except KeyboardInterrupt:
        print(f"nmt {name}: interrupted", file=sys.stderr)
        return 130
    except UserError as e:
        print(f"nmt {name}: {one_line(str(e))}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # a file or a port: the message names it
        where = f"{e.filename}: " if e.filename else ""
        print(f"nmt {name}: {where}{one_line(e.strerror or str(e))}", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as e:  # a bug, not bad input: still one line, with the type to search for
        logging.getLogger("nmt").debug("%s failed", name, exc_info=True)
        print(f"nmt {name}: internal error ({type(e).__name__}): {one_line(str(e))}", file=sys.stderr)
        return EXIT_FAILURE
