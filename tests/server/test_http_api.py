"""The LibreTranslate-compatible HTTP API of a real `nmt serve --http-port 0` (tiny bundle), spoken to
by the real `libretranslatepy` client and by plain HTTP, beside gRPC on the same process."""

from __future__ import annotations

import html
import json
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request

import grpc
import pytest
from conftest import read_lines
from libretranslatepy import LibreTranslateAPI
from test_server_process import REPO, ServerProcess

from serve.protocol.client import TranslatorClient
from serve.protocol.errors import TranslatorError

KEYS = {"k-main": {}, "k-slow": {"requests_per_minute": 2}, "k-chars": {"chars_per_minute": 60},
        "k-grpc-slow": {"requests_per_minute": 1}}
TOKEN = "tok-grpc"
TEXTS = read_lines("test_2016_flickr", "en", 6)


@pytest.fixture(scope="module")
def engine(tiny_bundle):
    from serve.engine.translator import EngineConfig, Translator

    return Translator.from_bundle(tiny_bundle, EngineConfig(device="cpu"))


def expected(engine, texts: list[str]) -> list[str]:
    return [r.text for r in engine.translate(texts)]


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.json"
    keys.write_text(json.dumps(KEYS))
    proc = ServerProcess("--model-dir", str(tiny_bundle), "--port", "0", "--http-port", "0",
                         "--metrics-port", "0", "--device", "cpu", "--max-chars", "300",
                         "--keys-file", str(keys), "--auth-token", TOKEN)
    try:
        assert proc.listening.wait(60), proc.stderr
        m = re.search(r"listening on [\d.]+:(\d+), metrics on :(\d+), http on :(\d+)", proc.stderr)
        assert m, proc.stderr
        grpc_port, metrics_port, http_port = map(int, m.groups())
        url = f"http://127.0.0.1:{http_port}"
        client = TranslatorClient(f"127.0.0.1:{grpc_port}", auth_token=TOKEN)
        from test_server_process import wait_serving

        wait_serving(client)
        yield proc, url, client, metrics_port, grpc_port
        client.close()
    finally:
        proc.stop()


def call(url: str, path: str, body: bytes | dict | None = None, method: str = "POST",
         headers: dict | None = None) -> tuple[int, dict, dict]:
    """(status, JSON body, headers) of one request; dict bodies go as JSON."""
    if isinstance(body, dict):
        body = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **(headers or {})}
    req = urllib.request.Request(url + path, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read() or b"null"), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def test_libretranslatepy_translates_lists_languages_detects(server, engine):
    _, url, *_ = server
    lt = LibreTranslateAPI(url, api_key="k-main")
    assert lt.translate(TEXTS[0], "en", "de") == expected(engine, TEXTS[:1])[0]
    assert lt.languages() == [{"code": "de", "name": "German", "targets": []},
                              {"code": "en", "name": "English", "targets": ["de"]}]
    assert lt.detect("Ein Mann fährt mit dem Fahrrad über die Straße.")[0]["language"] == "de"
    best = lt.detect("A man is riding his bicycle down the street.")[0]
    assert best["language"] == "en" and 50 < best["confidence"] <= 100


def test_list_in_json_and_repeated_form_field(server, engine):
    _, url, *_ = server
    want = expected(engine, TEXTS[:3])
    status, body, _ = call(url, "/translate", {"q": TEXTS[:3], "source": "en", "target": "de",
                                               "api_key": "k-main"})
    assert status == 200 and body == {"translatedText": want}
    form = urllib.parse.urlencode([("q", TEXTS[0]), ("q", TEXTS[1]), ("source", "en"), ("target", "de"),
                                   ("api_key", "k-main")]).encode()
    assert call(url, "/translate", form)[1] == {"translatedText": want[:2]}
    query = "/translate?" + urllib.parse.urlencode({"q": TEXTS[0], "source": "en", "target": "de"})
    status, body, _ = call(url, query, b"", headers={"Authorization": "Bearer k-main"})
    assert status == 200 and body == {"translatedText": want[0]}


def test_http_and_grpc_give_the_same_translation(server, engine):
    _, url, client, *_ = server
    grpc_texts = [r.text for r in client.translate(TEXTS, source_language="en", target_language="de")]
    status, body, _ = call(url, "/translate", {"q": TEXTS, "source": "en", "target": "de"},
                           headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and body["translatedText"] == grpc_texts == expected(engine, TEXTS)


def test_sentences_are_split_and_rejoined_with_their_whitespace(server, engine):
    _, url, *_ = server
    a, b, c = TEXTS[:3]
    status, body, _ = call(url, "/translate", {"q": f"{a}  {b}\n\n{c} ", "source": "en", "target": "de",
                                               "api_key": "k-main"})
    ta, tb, tc = expected(engine, [a, b, c])
    assert status == 200 and body["translatedText"] == f"{ta}  {tb}\n\n{tc} "


def test_html_keeps_markup_and_skips_code(server, engine):
    _, url, *_ = server
    q = (f'<p class="lead" id="x">{html.escape(TEXTS[0])}</p><script>var s = "A dog.";</script>'
         '<code>A cat &lt;b&gt;.</code><br/>')
    status, body, _ = call(url, "/translate", {"q": q, "source": "en", "target": "de", "format": "html",
                                               "api_key": "k-main"})
    want = html.escape(expected(engine, TEXTS[:1])[0], quote=False)
    assert status == 200
    assert body["translatedText"] == (f'<p class="lead" id="x">{want}</p><script>var s = "A dog.";</script>'
                                      '<code>A cat &lt;b&gt;.</code><br/>')


def test_auto_alternatives_and_alignments(server, engine):
    _, url, *_ = server
    status, body, _ = call(url, "/translate", {"q": TEXTS[0], "source": "auto", "target": "de",
                                               "alternatives": 2, "return_alignments": True,
                                               "api_key": "k-main"})
    assert status == 200
    assert body["detectedLanguage"] == {"confidence": 100.0, "language": "en"}
    alts = body["alternatives"]
    assert len(alts) <= 2 and len(set(alts)) == len(alts) and body["translatedText"] not in alts
    (a,) = body["alignments"]
    assert a["source"][-1] == "</s>" and len(a["alignment"]) == len(a["target"])
    assert all(0 <= i < len(a["source"]) for i in a["alignment"])
    assert "".join(a["target"]).replace("\u2581", " ").strip() == body["translatedText"]


def test_file_translation_and_download(server, engine):
    _, url, *_ = server
    boundary = "nmt-test-boundary"
    text = f"{TEXTS[0]}\n{TEXTS[1]}\n"
    parts = [("source", "en"), ("target", "de"), ("api_key", "k-main")]
    body = "".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
                   for k, v in parts)
    body += (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="doc.txt"\r\n'
             f"Content-Type: text/plain\r\n\r\n{text}\r\n--{boundary}--\r\n")
    status, answer, _ = call(url, "/translate_file", body.encode(),
                             headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 200, answer
    link = answer["translatedFileUrl"]
    with urllib.request.urlopen(link, timeout=10) as r:
        assert r.read().decode() == "\n".join(expected(engine, TEXTS[:2])) + "\n"
        assert 'filename="doc.txt"' in r.headers["content-disposition"]
    assert call(url, "/download_file/..%2fetc", method="GET")[0] in (400, 404)
    assert call(url, "/download_file/" + "0" * 32 + ".doc.txt", method="GET")[0] == 404
    pdf = body.replace('filename="doc.txt"', 'filename="doc.pdf"')
    status, answer, _ = call(url, "/translate_file", pdf.encode(),
                             headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 400 and "not supported" in answer["error"]


@pytest.mark.parametrize("body, status, message", [
    (b'{"q": "A dog.", "source": "en"', 400, "Invalid JSON format"),
    ({"source": "en", "target": "de", "api_key": "k-main"}, 400, "missing q parameter"),
    ({"q": "A dog.", "source": "en", "target": "xx", "api_key": "k-main"}, 400, "xx is not supported"),
    ({"q": "A dog.", "source": "fr", "target": "de", "api_key": "k-main"}, 400, "fr is not supported"),
    ({"q": "A dog.", "source": "en", "target": "de", "format": "pdf", "api_key": "k-main"}, 400,
     "pdf format"),
    ({"q": "A dog. " * 50, "source": "en", "target": "de", "api_key": "k-main"}, 400, "at most 300"),
    ({"q": "A dog.", "source": "en", "target": "de", "alternatives": "x", "api_key": "k-main"}, 400,
     "not a number"),
    ({"q": "A dog.", "source": "en", "target": "de"}, 400, "API key is required"),
    ({"q": "A dog.", "source": "en", "target": "de", "api_key": "wrong"}, 403, "Invalid API key"),
])
def test_bad_requests_get_their_status_and_an_error(server, body, status, message):
    proc, url, *_ = server
    headers = {"Content-Type": "application/json"} if isinstance(body, bytes) else None
    got, answer, _ = call(url, "/translate", body, headers=headers)
    assert got == status and message in answer["error"], answer
    assert proc.proc.poll() is None


def test_rate_and_character_limits(server):
    proc, url, *_ = server
    slow = {"q": "A dog.", "source": "en", "target": "de", "api_key": "k-slow"}
    assert [call(url, "/translate", slow)[0] for _ in range(2)] == [200, 200]
    status, answer, _ = call(url, "/translate", slow)
    assert status == 429 and answer["error"] == "Slowdown: 2 requests per minute for this key"
    chars = {"q": "A man is riding a bike down the road.", "source": "en", "target": "de",
             "api_key": "k-chars"}
    assert call(url, "/translate", chars)[0] == 200
    status, answer, _ = call(url, "/translate", chars)
    assert status == 429 and "60 characters per minute" in answer["error"]
    assert call(url, "/health", method="GET")[:2] == (200, {"status": "ok"})


def test_grpc_uses_the_same_keys(server):
    *_, grpc_port = server
    with TranslatorClient(f"127.0.0.1:{grpc_port}", auth_token="k-grpc-slow") as c:
        assert len(c.translate(["A dog."])) == 1
        with pytest.raises(TranslatorError) as e:
            c.translate(["A dog."])
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "1 requests per minute" in e.value.details()
    with TranslatorClient(f"127.0.0.1:{grpc_port}", auth_token="nope") as c:
        with pytest.raises(TranslatorError) as e:
            c.translate(["A dog."])
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_cors_settings_health_and_metrics(server):
    _, url, _, metrics_port, _ = server
    preflight = {"Origin": "http://elsewhere", "Access-Control-Request-Method": "POST"}
    req = urllib.request.Request(url + "/translate", method="OPTIONS", headers=preflight)
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == "*"
        assert "POST" in r.headers["Access-Control-Allow-Methods"]
    status, settings, headers = call(url, "/frontend/settings", method="GET")
    assert status == 200 and headers["access-control-allow-origin"] == "*"
    assert settings["charLimit"] == 300 and settings["apiKeys"] and settings["keyRequired"]
    assert settings["language"] == {"source": {"code": "en", "name": "English"},
                                    "target": {"code": "de", "name": "German"}}
    assert call(url, "/nowhere", method="GET")[:2] == (404, {"error": "Not Found"})
    body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    assert re.search(r'nmt_requests_total\{code="200",method="HTTP /translate",model="\S+"\} [1-9]', body)
    assert re.search(r'nmt_requests_total\{code="403",method="HTTP /translate",model=""\} [1-9]', body)


def test_page_and_static_files_are_served(server):
    _, url, *_ = server
    page = urllib.request.urlopen(url + "/", timeout=10).read().decode()
    script = urllib.request.urlopen(url + "/static/app.js", timeout=10).read().decode()
    assert '<script src="/static/app.js">' in page and "return_alignments" in script
    assert "://" not in page + script  # nothing from another origin: no CDN


def test_layouts_keep_whitespace_markup_and_symbols():
    from nmt.sentences import render, split_text
    from serve.server.http_text import escape_text, split_html

    sentences: list[str] = []
    layout = split_text(" Hi there.  -- \n\n42 ok!", "en", sentences)
    assert sentences == ["Hi there.", "42 ok!"]
    assert render(layout, ["A.", "B!"]) == " A.  -- \n\nB!"
    sentences = []
    doc = '<div a="1"><code>x <i>y</i> z</code><style>p{}</style>T &amp; u.<!-- c --></div>'
    layout = split_html(doc, "en", sentences)
    assert sentences == ["T & u."]
    assert render(layout, ["<V>"], escape_text) == (
        '<div a="1"><code>x <i>y</i> z</code><style>p{}</style>&lt;V&gt;<!-- c --></div>')


def test_bad_keys_file_is_a_usage_error(tmp_path, tiny_bundle):
    bad = tmp_path / "keys.json"
    bad.write_text('{"k": {"requests_per_minute": -1}}')
    r = subprocess.run([sys.executable, "-m", "nmt", "serve", "--model-dir", str(tiny_bundle), "--keys-file",
                        str(bad)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"nmt serve: --keys-file: {bad}: key 'k': requests_per_minute must be a positive integer, got -1"]


def test_zz_sigterm_stops_both_ports(server):
    proc, url, *_ = server
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.proc.wait(30) == 0, proc.stderr
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url + "/health", timeout=5)
