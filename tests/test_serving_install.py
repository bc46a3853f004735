"""The serving install has no torch: everything under serve/ must run with torch unimportable."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A finder that refuses the training-only packages, as in an install without the `train` extra.
BLOCK = textwrap.dedent("""
    import importlib.abc, sys
    class NoTraining(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "onnx", "onnxscript", "matplotlib"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    sys.meta_path.insert(0, NoTraining())
""")


def run_blocked(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + textwrap.dedent(code)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_serving_modules_and_engine_work_without_torch(tiny_bundle):
    out = run_blocked(f"""
        import serve.batch, serve.batch_backends, serve.cli, serve.client, serve.health_cli
        import serve.server, serve.stress, serve.http_api, serve.http_server, serve.keys
        from serve.engine import Translator
        from serve.types import DecodeOptions
        t = Translator.from_bundle({str(tiny_bundle)!r}, device="cpu")
        r = t.translate(["A dog runs in the park."], DecodeOptions(beam_size=2))
        assert r[0].text, r
        assert "torch" not in sys.modules
        print("ok", r[0].text)
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok ")


def test_training_commands_say_what_to_install():
    out = run_blocked("""
        from nmt.cli import main
        raise SystemExit(main(["train", "--help"]))
    """)
    assert out.returncode == 2
    assert out.stderr.strip().count("\\n") == 0 and "pip install 'nmt-transformer[train]'" in out.stderr
