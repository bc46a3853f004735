"""Generate the Python gRPC code of protos/ into nmt/v1/: the one code-generation entry point.

    .venv/bin/python scripts/gen_protos.py            # regenerate in place
    .venv/bin/python scripts/gen_protos.py --out DIR  # generate under DIR (tests compare with the repo)

The proto lives at protos/nmt/v1/translator.proto and protos/ is the include root, so the generated
import reads `from nmt.v1 import translator_pb2` and matches the package as is: nothing is patched.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROTO_ROOT = REPO / "protos"
PROTOS = ["nmt/v1/translator.proto"]
# What the generator writes per proto (tests compare exactly these files).
GENERATED_SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")


def generated_files(out: Path) -> list[Path]:
    return [out / p.replace(".proto", s) for p in PROTOS for s in GENERATED_SUFFIXES]


def generate(out: Path) -> list[Path]:
    """Run grpc_tools.protoc on every proto into `out`; returns the files written."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto
    out.mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{well_known}", f"--python_out={out}",
            f"--grpc_python_out={out}", f"--pyi_out={out}", *PROTOS]
    # protoc resolves PROTOS against the include root: run with relative names for stable output.
    code = protoc.main(args)
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code}")
    return generated_files(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO, help="output root (default: the repository)")
    args = p.parse_args(argv)
    for path in generate(args.out):
        print(path.relative_to(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
