"""The main job, end to end on Multi30k en->de, through the same `nmt` commands a user types.

    make demo                                      # = .venv/bin/python scripts/demo.py
    make demo DEMO_ARGS="--minutes 2"              # a shorter training budget
    .venv/bin/python scripts/demo.py --fresh       # redo every stage

Stages: data -> train (`small` preset, time budget) -> evaluate (PyTorch, test2016) -> export
(validated ONNX bundle) -> serve (gRPC on a free port, wait for health) -> translate examples through
gRPC -> translate the test set with `nmt batch --reference` (test BLEU) -> stop the server (SIGTERM,
graceful drain, exit code checked).

Every stage leaves its output in the work dir (default work/demo) and a re-run reuses the stages
whose outputs are complete. A failing stage stops the demo with one line naming it and a non-zero
exit; the server is stopped whatever happens.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script: import the project's packages from the checkout

from nmt.bundle import BundleError, read_manifest  # noqa: E402

STAGES = ("data", "train", "evaluate", "export", "serve", "translate", "test-set", "stop")
TRAIN_DONE = "demo-train.json"  # written into the run dir once `nmt train` has exited 0
EXAMPLES = [
    "A man in an orange hat is looking at something.",
    "Two young children are playing in the sand at the beach.",
    "A woman is riding a bicycle down the street.",
    "A group of people are standing in front of a building.",
]


class StageFailed(Exception):
    """A stage could not finish; the message says what to look at."""


@dataclass
class Demo:
    args: argparse.Namespace
    work: Path
    timings: list[tuple[str, str, float]] = field(default_factory=list)
    server: subprocess.Popen[bytes] | None = None
    address: str = ""

    @property
    def run_dir(self) -> Path:
        return self.work / "run"

    @property
    def checkpoint(self) -> Path:
        return self.run_dir / "final.pt"  # chosen on validation at the end of `nmt train`

    @property
    def bundle(self) -> Path:
        return self.work / "bundle"

    @property
    def server_log(self) -> Path:
        return self.work / "server.log"


# --------------------------------------------------------------------------- helpers


def nmt_command() -> list[str]:
    """The `nmt` console script of this interpreter's environment (python -m nmt when not installed)."""
    script = Path(sys.executable).with_name("nmt")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "nmt"]


def run(demo: Demo, args: list[str], log_name: str | None = None) -> list[str]:
    """Run `nmt ARGS`, echoing the command, streaming its output, returning its stdout lines.

    stderr (progress bars) goes straight to the terminal; stdout is also kept in work/LOG_NAME.
    """
    print(f"$ nmt {' '.join(_quote(a) for a in args)}", flush=True)
    proc = subprocess.Popen(nmt_command() + args, stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout is not None
    lines = []
    try:
        for line in proc.stdout:
            print(line, end="", flush=True)
            lines.append(line.rstrip("\n"))
        rc = proc.wait()
    finally:  # interrupted: the command must not outlive the demo
        if proc.poll() is None:
            proc.terminate()
            proc.wait()
    if log_name:
        _write_atomic(demo.work / log_name, "\n".join(lines) + "\n")
    if rc != 0:
        raise StageFailed(f"`nmt {args[0]}` exited with code {rc} (its message is above)")
    return lines


def _quote(arg: str) -> str:
    return f'"{arg}"' if " " in arg else arg


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gpu_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


# --------------------------------------------------------------------------- stages


def stage_data(demo: Demo) -> bool:
    """Find (or download, SHA-256 checked) Multi30k and write the plain-text test files."""
    from train.data import multi30k_file

    data_dir = demo.args.data_dir or os.environ.get("NMT_DATA_DIR")
    cache = demo.work / "data"
    wanted = [(split, lang) for split in ("train", "val", "test_2016_flickr") for lang in ("en", "de")]
    reused = data_dir is not None or all((cache / f"{s}.{lang}.gz").is_file() for s, lang in wanted)
    paths = {}
    for split, lang in wanted:
        try:
            paths[split, lang] = multi30k_file(split, lang, data_dir=data_dir, cache_dir=cache)
        except Exception as e:  # CorpusError or a network error: one readable line either way
            raise StageFailed(str(e)) from None
    demo.args.data_dir = str(paths["train", "en"].parent)
    print(f"Multi30k from {demo.args.data_dir}")
    for lang in ("en", "de"):  # plain text for `nmt batch` and its --reference
        with gzip.open(paths["test_2016_flickr", lang], "rt", encoding="utf-8") as f:
            lines = f.read().splitlines()
        lines = lines[:demo.args.test_lines or len(lines)]
        _write_atomic(demo.work / f"test.{lang}", "\n".join(lines) + "\n")
        print(f"test.{lang}: {len(lines)} sentences")
    return reused


def stage_train(demo: Demo) -> bool:
    done = demo.run_dir / TRAIN_DONE
    if done.is_file() and demo.checkpoint.is_file():
        info = json.loads(done.read_text(encoding="utf-8"))
        print(f"reusing {demo.checkpoint} ({info['preset']} preset, {info['minutes']} min budget); "
              f"--fresh retrains")
        return True
    args = ["train", "--preset", demo.args.preset, "--data-dir", demo.args.data_dir,
            "--out", str(demo.run_dir), "--max-minutes", str(demo.args.minutes),
            "--test-split", "none"]  # the evaluate stage reports the test set (with --eval-limit)
    if demo.args.max_steps:
        args += ["--max-steps", str(demo.args.max_steps)]
    if (demo.run_dir / "last.pt").is_file():
        args.append("--resume")  # an interrupted earlier run: continue it
    run(demo, args)
    if not demo.checkpoint.is_file():
        raise StageFailed(f"`nmt train` finished without writing {demo.checkpoint}")
    info = {"preset": demo.args.preset, "minutes": demo.args.minutes, "max_steps": demo.args.max_steps}
    _write_atomic(done, json.dumps(info) + "\n")
    return False


def stage_evaluate(demo: Demo) -> bool:
    """PyTorch's own greedy and beam BLEU: the reference the exported bundle is served against."""
    log = evaluate_log(demo)
    out = demo.work / log
    if out.is_file() and out.stat().st_mtime >= demo.checkpoint.stat().st_mtime:
        print(out.read_text(encoding="utf-8"), end="")
        print(f"(reused {log})")
        return True
    args = ["evaluate", str(demo.checkpoint), "--data-dir", demo.args.data_dir, "--split", "test_2016_flickr",
            "--beam", str(demo.args.beam)]
    if demo.args.eval_limit:
        args += ["--limit", str(demo.args.eval_limit)]
    run(demo, args, log_name=log)
    return False


def evaluate_log(demo: Demo) -> str:
    return f"evaluate-beam{demo.args.beam}-limit{demo.args.eval_limit or 'all'}.txt"


def stage_export(demo: Demo) -> bool:
    manifest = demo.bundle / "manifest.json"
    if manifest.is_file() and manifest.stat().st_mtime >= demo.checkpoint.stat().st_mtime:
        try:
            m = read_manifest(demo.bundle)
            print(f"reusing {demo.bundle} ({m.name}, {m.dtype}, checksums verified)")
            return True
        except BundleError as e:
            print(f"re-exporting: {e}")
    run(demo, ["export", str(demo.checkpoint), "--out", str(demo.bundle), "--dtype", demo.args.dtype,
               "--force"])
    try:
        read_manifest(demo.bundle)
    except BundleError as e:
        raise StageFailed(str(e)) from None
    return False


def stage_serve(demo: Demo) -> bool:
    port, metrics_port = free_port(), free_port()
    demo.address = f"127.0.0.1:{port}"
    args = ["serve", "--model-dir", str(demo.bundle), "--host", "127.0.0.1", "--port", str(port),
            "--metrics-port", str(metrics_port), "--device", demo.args.device,
            "--drain-seconds", str(demo.args.drain_seconds)]
    print(f"$ nmt {' '.join(args)}  (log: {demo.server_log})", flush=True)
    with open(demo.server_log, "wb") as log:
        demo.server = subprocess.Popen(nmt_command() + args, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.monotonic() + demo.args.serve_timeout
    while time.monotonic() < deadline:
        if demo.server.poll() is not None:
            raise StageFailed(f"the server exited with code {demo.server.returncode} while starting:\n"
                              + _tail(demo.server_log))
        health = subprocess.run(nmt_command() + ["health", "--server", demo.address],
                                capture_output=True, text=True, cwd=REPO)
        if health.returncode == 0:
            print(f"SERVING on {demo.address} (metrics on http://127.0.0.1:{metrics_port}/metrics)")
            return False
        time.sleep(0.5)
    raise StageFailed(f"the server did not report SERVING within {demo.args.serve_timeout:.0f} s:\n"
                      + _tail(demo.server_log))


def _tail(path: Path, n: int = 15) -> str:
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()[-n:]
    return "\n".join("    " + line for line in lines)


def stage_translate(demo: Demo) -> bool:
    lines = run(demo, ["translate", "--server", demo.address, "--beam-size", str(demo.args.beam)] + EXAMPLES)
    if len(lines) != len(EXAMPLES):
        raise StageFailed(f"expected {len(EXAMPLES)} translations, got {len(lines)}")
    return False


def stage_test_set(demo: Demo) -> bool:
    """The test set through the server with `nmt batch`, which prints sacreBLEU against the reference."""
    lines = run(demo, ["batch", str(demo.work / "test.en"), str(demo.work / "test.hyp.de"),
                       "--server", demo.address, "--beam-size", str(demo.args.beam),
                       "--reference", str(demo.work / "test.de"), "--restart"], log_name="test-set.txt")
    if not any("BLEU" in line for line in lines):
        raise StageFailed("`nmt batch --reference` printed no BLEU score")
    return False


def stage_stop(demo: Demo) -> bool:
    rc = stop_server(demo)
    if rc != 0:
        raise StageFailed(f"the server exited with code {rc} after SIGTERM:\n" + _tail(demo.server_log))
    print("the server drained and exited with code 0")
    return False


def stop_server(demo: Demo) -> int | None:
    """SIGTERM, wait for the drain; SIGKILL if it overstays. Never leaves a server behind."""
    proc, demo.server = demo.server, None
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=demo.args.drain_seconds + 15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise StageFailed(f"the server did not exit within {demo.args.drain_seconds + 15} s of SIGTERM; "
                              "killed") from None
    return proc.returncode


# --------------------------------------------------------------------------- main

STAGE_FUNCS = {"data": stage_data, "train": stage_train, "evaluate": stage_evaluate, "export": stage_export,
               "serve": stage_serve, "translate": stage_translate, "test-set": stage_test_set,
               "stop": stage_stop}


def run_stages(demo: Demo) -> None:
    for i, name in enumerate(STAGES, 1):
        if name == "evaluate" and demo.args.skip_evaluate:
            demo.timings.append((name, "skipped", 0.0))
            continue
        print(f"\n==> [{i}/{len(STAGES)}] {name}", flush=True)
        t0 = time.monotonic()
        try:
            reused = STAGE_FUNCS[name](demo)
        except StageFailed as e:
            raise StageFailed(f"stage '{name}' failed: {e}") from None
        dt = time.monotonic() - t0
        demo.timings.append((name, "reused" if reused else "done", dt))
        print(f"<== {name}: {'reused' if reused else 'done'} in {dt:.1f} s", flush=True)


def print_summary(demo: Demo) -> None:
    print("\n==> summary")
    for name, status, dt in demo.timings:
        print(f"  {name:<10} {status:<8} {dt:8.1f} s")
    for label, log in (("evaluate (PyTorch)", evaluate_log(demo)), ("test set (gRPC)", "test-set.txt")):
        path = demo.work / log
        if path.is_file() and not (label.startswith("evaluate") and demo.args.skip_evaluate):
            for line in path.read_text(encoding="utf-8").splitlines():
                if "BLEU" in line:
                    print(f"  {label}: {line.strip()}")
    print(f"  outputs in {demo.work}/ (run/, bundle/, test.hyp.de, server.log)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", default=str(REPO / "work" / "demo"), help="outputs of every stage")
    p.add_argument("--data-dir", help="local Multi30k copy (default: $NMT_DATA_DIR, else download)")
    p.add_argument("--minutes", type=float, default=None,
                   help="training budget in minutes (default: 5 on CPU, 30 on a GPU)")
    p.add_argument("--max-steps", type=int, default=0, help="also stop training after this many steps")
    p.add_argument("--preset", default="small", help="model preset (default: small)")
    p.add_argument("--beam", type=int, default=4, help="beam size for evaluation and translation")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "int8"], help="bundle dtype")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="server device")
    p.add_argument("--test-lines", type=int, default=0, help="translate only the first N test sentences")
    p.add_argument("--eval-limit", type=int, default=100,
                   help="test sentences decoded by the PyTorch evaluation (0: all; it is slow on CPU)")
    p.add_argument("--skip-evaluate", action="store_true", help="skip the PyTorch evaluation stage")
    p.add_argument("--drain-seconds", type=int, default=10, help="the server's graceful drain on SIGTERM")
    p.add_argument("--serve-timeout", type=float, default=180.0, help="seconds to wait for SERVING")
    p.add_argument("--fresh", action="store_true", help="discard earlier outputs and redo every stage")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.minutes is None:
        args.minutes = 30.0 if gpu_available() else 5.0
    if args.minutes <= 0 or args.beam < 1 or args.test_lines < 0 or args.eval_limit < 0:
        print("demo: --minutes and --beam must be positive, --test-lines and --eval-limit >= 0",
              file=sys.stderr)
        return 2
    work = Path(args.work_dir).resolve()
    if args.fresh:
        for name in ("run", "bundle", "test.en", "test.de", "test.hyp.de", "test-set.txt"):
            _remove(work / name)
        for log in work.glob("evaluate-*.txt"):
            _remove(log)
    work.mkdir(parents=True, exist_ok=True)
    demo = Demo(args=args, work=work)
    # `kill` of the demo must still stop the server: turn SIGTERM into an exception that unwinds.
    signal.signal(signal.SIGTERM, _interrupt)
    t0 = time.monotonic()
    try:
        run_stages(demo)
    except StageFailed as e:
        print(f"\ndemo: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ndemo: interrupted", file=sys.stderr)
        return 130
    finally:
        try:
            stop_server(demo)
        except StageFailed as e:
            print(f"demo: {e}", file=sys.stderr)
    print_summary(demo)
    print(f"\ndemo finished in {time.monotonic() - t0:.0f} s")
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _remove(path: Path) -> None:
    if path.is_dir():
        import shutil

        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


if __name__ == "__main__":
    sys.exit(main())
