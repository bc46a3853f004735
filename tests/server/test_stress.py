"""`nmt stress` against a real `nmt serve` process on the tiny bundle: a short seeded run passes and
sees every kind of request, and the tool does fail when the server dies or answers wrongly."""

from __future__ import annotations

import json
import math
import threading
import time

from conftest import read_lines

from bench.stress import run as stress
from bench.stress.run import (
    KINDS,
    AnswerBook,
    Plan,
    ServerProcess,
    StressConfig,
    StressRun,
    Target,
    check_response,
    codes,
    plan_request,
    wait_serving,
)
from nmt.bundle import read_manifest
from nmt.cli import run_command
from nmt.v1 import translator_pb2 as pb

TARGET = Target(max_texts=64, max_chars=2000, max_message_bytes=4 * 2**20, max_source_tokens=128,
                models=[("en-de", "en", "de")])


def test_seeded_run_passes_and_sees_every_kind(tiny_bundle, tmp_path, capsys):
    texts = tmp_path / "texts.en"
    texts.write_text("\n".join(read_lines("test_2016_flickr", "en", 100)) + "\n")
    out = tmp_path / "stress.json"
    argv = ["--model-dir", str(tiny_bundle), "--seed", "7", "--requests", "300", "--seconds", "40",
            "--concurrency", "8", "--auth-token", "s3cret", "--texts", str(texts), "--json", str(out)]
    rc = run_command("stress", stress.main, argv)
    table = capsys.readouterr().out
    assert rc == 0, table
    report = json.loads(out.read_text())
    assert report["passed"] and report["failures"] == [] and report["sent"] == 300
    counts = report["counts"]
    assert set(counts) == set(KINDS)
    expected = {"valid": "OK", "fuzz": "OK", "invalid": "INVALID_ARGUMENT", "garbage": "INVALID_ARGUMENT",
                "deadline": "DEADLINE_EXCEEDED", "cancelled": "CANCELLED", "disconnect": "CANCELLED",
                "unauthenticated": "UNAUTHENTICATED"}
    for kind, code in expected.items():
        assert counts[kind].get(code, 0) > 0, (kind, counts[kind])
    assert not any(code in c for c in counts.values() for code in ("INTERNAL", "UNKNOWN", "UNAVAILABLE"))
    assert report["verified"] >= report["valid_ok"] > 0  # every distinct answer re-checked alone
    assert 0 < report["p50_ms"] <= report["p99_ms"]
    assert report["rss_before_mb"] > 0 and report["rss_after_mb"] > 0 and report["health_checks"] > 0
    assert "PASS" in table and "seed 7: 300 requests" in table


def test_requests_are_planned_from_the_seed_alone():
    texts = read_lines("val", "en", 50)
    first = [plan_request(3, i, TARGET, texts, True) for i in range(200)]
    again = [plan_request(3, i, TARGET, texts, True) for i in reversed(range(200))][::-1]
    other = [plan_request(4, i, TARGET, texts, True) for i in range(200)]
    assert [(p.kind, p.variant, p.payload) for p in first] == [(p.kind, p.variant, p.payload) for p in again]
    assert [p.payload for p in first] != [p.payload for p in other]
    assert not any(p.kind == "unauthenticated" for p in (plan_request(3, i, TARGET, texts, False)
                                                          for i in range(200)))


def test_mixed_up_answers_are_caught():
    request = pb.TranslateRequest(request_id="r1", texts=["a", "b"], options=pb.DecodingOptions(
        beam_size=2, n_best=2, return_scores=True))
    plan = Plan("valid", "beam", codes("OK"), request.SerializeToString(), request=request)

    def hyp(tokens: list[int]) -> pb.Hypothesis:
        return pb.Hypothesis(text=str(tokens), tokens=tokens, score=-1.0, log_prob=-2.0)

    good = [pb.Translation(text="[5]", hypotheses=[hyp([5]), hyp([6])]) for _ in range(2)]
    assert check_response(plan, pb.TranslateResponse(request_id="r1", translations=good)) == []
    wrong_id = pb.TranslateResponse(request_id="r2", translations=good)
    assert "answered as 'r2'" in check_response(plan, wrong_id)[0]
    one_short = pb.TranslateResponse(request_id="r1", translations=good[:1])
    assert "1 translations for 2 texts" in check_response(plan, one_short)[0]
    no_scores = [pb.Translation(text="[5]", hypotheses=[pb.Hypothesis(text="[5]", tokens=[5])] * 2)] * 2
    assert "scores" in check_response(plan, pb.TranslateResponse(request_id="r1", translations=no_scores))[0]

    book = AnswerBook()
    answer = (((5,), "x", -1.0, -2.0),)
    assert book.record("m", "v1", b"", "a", answer) is None
    assert book.record("m", "v1", b"", "a", (((5,), "x", -1.0 + 1e-6, -2.0),)) is None  # float noise is fine
    assert "differ" in book.record("m", "v1", b"", "a", (((6,), "y", -1.0, -2.0),))
    assert book.record("m", "v1", b"\x08\x02", "a", (((7,), "z", math.nan, math.nan),)) is None  # options
    assert book.record("m", "v2", b"", "a", (((6,), "y", -1.0, -2.0),)) is None  # another version may differ
    assert "differ" in book.record("m", "v2", b"", "a", answer)


def test_a_server_that_dies_mid_run_fails_the_run(tiny_bundle):
    server = ServerProcess(tiny_bundle, None)
    try:
        wait_serving(f"127.0.0.1:{server.port}")
        config = StressConfig(address=f"127.0.0.1:{server.port}", server_pid=server.proc.pid, seed=1,
                              requests=100_000, seconds=60, concurrency=4)
        run = StressRun(config, server)
        killer = threading.Thread(target=lambda: (wait_for(lambda: run.next_index > 20), server.proc.kill()))
        killer.start()
        report = run.run()
        killer.join()
    finally:
        server.stop(0)
    assert not report.passed and report.sent < 100_000
    assert any("died" in f or "health answered" in f for f in report.failures), report.failures


def wait_for(condition, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not condition() and time.monotonic() < end:
        time.sleep(0.01)


def test_bad_flags_and_no_server_are_one_line(capsys, tmp_path):
    argv = ["--server", "127.0.0.1:1", "--requests", "5", "--connect-timeout", "1"]
    assert run_command("stress", stress.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["nmt stress: no server answering at 127.0.0.1:1"]
    assert run_command("stress", stress.main, ["--model-dir", str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"nmt stress: --model-dir {tmp_path / 'none'}: "
                                                            "no such directory"]
    assert run_command("stress", stress.main, ["--server", "127.0.0.1:1", "--concurrency", "0"]) == 2
    assert "--concurrency must be positive" in capsys.readouterr().err


def test_reloads_under_load_fail_no_request_and_a_corrupt_bundle_is_refused(tiny_bundle, tiny_bundle_v2,
                                                                            tmp_path, capsys):
    texts = tmp_path / "texts.en"
    texts.write_text("\n".join(read_lines("test_2016_flickr", "en", 60)) + "\n")
    out = tmp_path / "stress.json"
    argv = ["--model-dir", str(tiny_bundle), "--seed", "11", "--requests", "100000", "--seconds", "7",
            "--concurrency", "4", "--auth-token", "s3cret", "--texts", str(texts), "--verify-max", "60",
            "--reload-bundle", str(tiny_bundle_v2), "--reload-every", "1.2", "--json", str(out),
            # the default memory bound holds too: a replaced version's sessions are released
            "--max-rss-growth-mb", "256"]
    rc = run_command("stress", stress.main, argv)
    table = capsys.readouterr().out
    print(table)
    assert rc == 0, table
    report = json.loads(out.read_text())
    assert report["passed"] and report["failures"] == []
    allowed = {kind: set() for kind in KINDS}
    for i in range(2000):  # the codes each kind may get, from the plans themselves
        plan = plan_request(0, i, TARGET, [], True)
        allowed[plan.kind] |= plan.allowed
    for kind, counts in report["counts"].items():
        assert set(counts) <= allowed[kind], (kind, counts)
    unexpected = ("INTERNAL", "UNKNOWN", "UNAVAILABLE")
    assert not any(code in c for c in report["counts"].values() for code in unexpected)
    assert report["counts"]["valid"].get("OK", 0) > 0
    old, new = read_manifest(tiny_bundle).checksum, read_manifest(tiny_bundle_v2).checksum
    assert set(report["versions"]) == {old, new} and min(report["versions"].values()) > 0
    reloads = report["reloads"]
    assert reloads["corrupt_tried"] == reloads["refused"] == 1
    assert reloads["done"] >= 1 and reloads["done"] + reloads["unchanged"] >= 2, reloads
    assert report["verified"] > 0
    assert "corrupt copy refused 1 of 1" in table and old[:12] in table and new[:12] in table


def test_a_run_without_a_reload_in_it_fails(tiny_bundle, tiny_bundle_v2):
    server = ServerProcess(tiny_bundle, "s3cret")
    try:
        wait_serving(f"127.0.0.1:{server.port}")
        config = StressConfig(address=f"127.0.0.1:{server.port}", seed=2, requests=20, seconds=30,
                              concurrency=2, auth_token="s3cret", reload_bundles=[tiny_bundle_v2],
                              reload_every=300, original_bundle=tiny_bundle)
        report = StressRun(config, server).run()
    finally:
        server.stop(0)
    assert not report.passed and report.reloads is not None and report.reloads.tried_corrupt == 0
    assert any("no reload was tried" in f for f in report.failures), report.failures
    assert any("1 version(s) answered" in f for f in report.failures), report.failures


def test_reload_flags_are_checked(capsys, tmp_path, tiny_bundle):
    argv = ["--server", "127.0.0.1:1", "--reload-bundle", str(tiny_bundle)]
    assert run_command("stress", stress.main, argv) == 2
    assert "--reload-bundle needs --auth-token" in capsys.readouterr().err
    assert run_command("stress", stress.main, argv + ["--auth-token", "t", "--reload-every", "0"]) == 2
    assert "--reload-every must be positive" in capsys.readouterr().err
