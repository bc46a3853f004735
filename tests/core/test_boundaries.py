"""Import boundaries: the serving install has no torch, the engine has no grpc, the core has neither.

    nmt (core: tokenizer, decoding rules, bundle format, files)  <- train, export, serve
    serve.engine (numpy + onnxruntime)  <- serve.server, serve.jobs  (serve.protocol: grpc messages)
Nothing under serve/ imports train, export or bench; nothing under train/ or export/ imports serve.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap

from conftest import REPO

# A finder that refuses the training-only packages, as in an install without the `train` extra, and onnx:
# serving uses it only to rewrite the slot decoder for the compiled kernels (serve.engine.native), and
# without it the engine must still run (on the graph as exported).
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


def loaded_after(imports: str) -> set[str]:
    """Top-level package names (and a few submodules) loaded by importing `imports` in a fresh process."""
    out = run_blocked(f"""
        {imports}
        print(" ".join(sorted(sys.modules)))
    """)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


def top_level(modules: set[str]) -> set[str]:
    return {m.split(".")[0] for m in modules}


def test_serving_modules_and_engine_work_without_torch(tiny_bundle):
    out = run_blocked(f"""
        import serve.jobs.job, serve.jobs.backends, serve.server.cli, serve.protocol.client
        import serve.protocol.health, serve.server.server, serve.server.http_api, serve.server.http_server
        from serve.engine.translator import EngineConfig, Translator
        from nmt.decoding import DecodeOptions
        t = Translator.from_bundle({str(tiny_bundle)!r}, EngineConfig(device="cpu"))
        r = t.translate(["A dog runs in the park."], DecodeOptions(beam_size=2))
        assert r[0].text, r
        assert "torch" not in sys.modules
        print("ok", r[0].text)
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok ")


def test_engine_and_server_load_neither_torch_nor_train():
    server = top_level(loaded_after("import serve.server.cli, serve.server.server, serve.protocol.client, "
                                    "serve.jobs.job"))
    assert not server & {"torch", "train", "export", "bench", "onnx"}, server
    engine = top_level(loaded_after("import serve.engine.translator, serve.engine.scheduler"))
    assert "onnxruntime" in engine
    assert not engine & {"torch", "train", "export", "bench", "grpc", "prometheus_client"}, engine


def test_the_core_needs_only_numpy_and_sentencepiece():
    core = top_level(loaded_after("import nmt.tokenizer, nmt.decoding, nmt.bundle, nmt.files, nmt.errors"))
    assert not core & {"torch", "onnxruntime", "grpc", "google", "serve", "train", "export"}, core


def imported_packages(package: str) -> dict[str, set[str]]:
    """Every first-party top-level package each file under `package` imports (static, lazy imports too)."""
    found: dict[str, set[str]] = {}
    for path in sorted((REPO / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(REPO))] = names & {"nmt", "train", "export", "serve", "bench"}
    return found


def test_no_side_imports_the_layer_above_it():
    rules = {"nmt": {"train", "export", "serve", "bench"}, "train": {"serve", "export", "bench"},
             "export": {"serve", "bench"}, "serve": {"train", "export", "bench"}}
    wrong = {f: sorted(names & rules[pkg]) for pkg in rules
             for f, names in imported_packages(pkg).items() if names & rules[pkg]}
    # nmt/cli.py dispatches to every command by module name (strings, not imports).
    assert wrong == {}, wrong


def test_training_commands_say_what_to_install():
    out = run_blocked("""
        from nmt.cli import main
        raise SystemExit(main(["train", "--help"]))
    """)
    assert out.returncode == 2
    assert out.stderr.strip().count("\\n") == 0 and "pip install 'nmt-transformer[train]'" in out.stderr
