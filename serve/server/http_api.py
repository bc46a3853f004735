"""LibreTranslate's HTTP API over the server's models: the same registry and schedulers as gRPC.

    POST /translate        q (a string or a list), source (a code or "auto"), target, format text|html,
                           alternatives, api_key; also return_alignments and beam_size (ours)
    GET  /languages        [{code, name, targets}]
    POST /detect           [{language, confidence 0-100}]
    POST /translate_file   multipart: file (.txt, .html), source, target -> {translatedFileUrl}
    GET  /download_file/F  the translated file
    GET  /frontend/settings, GET /health, GET / (the translate page)

Errors are {"error": "..."} with LibreTranslate's codes: 400 bad input or a missing key, 403 an
invalid key, 429 over a limit or a full queue, 503 loading or draining, 500 only for our failures.
Texts are cut into sentences (nmt.sentences; HTML text nodes by serve.server.http_text) and each
sentence is one row of the scheduler.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from nmt.decoding import DecodeOptions, Hypothesis, InvalidRequest, StopSignal
from nmt.files import atomic_write_text
from nmt.sentences import Layout, render, split_text
from serve.server.http_server import Cors, HttpError, read_params, status_response
from serve.server.http_text import Detector, escape_text, language_name, split_html
from serve.server.keys import KeyStore, bearer
from serve.server.metrics import Metrics
from serve.server.registry import ModelRegistry, NotReady, ServedModel
from serve.server.servicer import Limits, check_texts, tokenize_checked

STATIC = Path(__file__).with_name("static")
FILE_FORMATS = {".txt": "text", ".html": "html", ".htm": "html"}
ALTERNATIVES_BEAM = 4  # beam width when alternatives are asked for (at least alternatives + 1)
SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
STORED_FILE = re.compile(r"^[0-9a-f]{32}\.[A-Za-z0-9._-]+$")


@dataclass
class HttpState:
    registry: ModelRegistry
    limits: Limits = Limits()
    keys: KeyStore = field(default_factory=KeyStore)
    metrics: Metrics = field(default_factory=Metrics)
    max_alternatives: int = 8
    detector: Detector = field(default_factory=Detector)
    files: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="nmt-http-files-")))


@dataclass
class Translated:
    model: ServedModel
    layouts: list[Layout]
    sources: list[list[int]]  # per sentence
    hyps: list[list[Hypothesis]]  # per sentence, n-best
    detected: tuple[str, float] | None


# -- the translation path shared by /translate and /translate_file --------------------------------
def pick_model(state: HttpState, source: str, target: str, texts: list[str]) -> tuple[ServedModel, Any]:
    """The model for source->target ("auto": detected among the sources that have one to target)."""
    models = state.registry.models
    if not models:
        raise NotReady("models are still loading; retry shortly")
    to_target = [m for m in models if m.translator.tgt_lang == target]
    if not to_target:
        raise InvalidRequest(f"{target} is not supported")
    detected = None
    if source == "auto":
        allowed = sorted({m.translator.src_lang for m in to_target})
        detected = state.detector.rank("\n".join(texts), allowed)[0]
        source = detected[0]
    elif not any(m.translator.src_lang == source for m in models):
        raise InvalidRequest(f"{source} is not supported")
    return state.registry.resolve("", source, target), detected


def decode(state: HttpState, model: ServedModel, sources: list[list[int]],
           options: DecodeOptions) -> list[list[Hypothesis]]:
    """Blocking: the rows through the model's scheduler, max_texts rows per submission, one submission
    at a time (a long file never holds more of the queue than one request may); a full queue: 429."""
    step, out = state.limits.max_texts, []
    for i in range(0, len(sources), step):
        out += model.scheduler.submit(sources[i:i + step], options, StopSignal()).result()
    return out


async def translate_texts(state: HttpState, texts: list[str], source: str, target: str, fmt: str,
                          options: DecodeOptions) -> Translated:
    model, detected = await run_in_threadpool(pick_model, state, source, target, texts)
    lang, sentences = model.translator.src_lang, list[str]()
    split = split_html if fmt == "html" else split_text
    layouts = [split(t, lang, sentences) for t in texts]
    sources = tokenize_checked(model, sentences)
    hyps = await run_in_threadpool(decode, state, model, sources, options) if sources else []
    return Translated(model, layouts, sources, hyps, detected)


def alignments_of(t: Translated) -> list[dict[str, Any]]:
    """Per sentence: source and target pieces and, per target piece, its most attended source piece."""
    pieces = t.model.translator.tokenizer.pieces
    return [{"source": pieces(s), "target": pieces(h[0].tokens), "alignment": h[0].alignment or []}
            for s, h in zip(t.sources, t.hyps)]


# -- request fields -----------------------------------------------------------------------------------
def required(params: dict[str, Any], name: str) -> Any:
    value = params.get(name)
    if value is None or value == "" or value == []:
        raise InvalidRequest(f"Invalid request: missing {name} parameter")
    return value


def integer(params: dict[str, Any], name: str, default: int) -> int:
    value = params.get(name, default)
    try:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        return int(value)
    except (TypeError, ValueError):
        raise InvalidRequest(f"Invalid request: {name} parameter is not a number") from None


def flag(params: dict[str, Any], name: str) -> bool:
    value = params.get(name, False)
    return value is True or str(value).lower() in ("1", "true", "yes", "on")


def api_key(request: Request, params: dict[str, Any]) -> str | None:
    key = params.get("api_key")
    return key if isinstance(key, str) and key else bearer(request.headers.get("authorization"))


def decode_options(params: dict[str, Any], alternatives: int, align: bool) -> DecodeOptions:
    n_best = alternatives + 1
    beam = integer(params, "beam_size", max(ALTERNATIVES_BEAM, n_best) if alternatives else 1)
    return DecodeOptions(beam_size=beam, n_best=n_best, return_alignments=align).validate()


def check_ready(request: Request) -> None:
    if request.app.state.draining:
        raise NotReady("the server is shutting down")


# -- endpoints ----------------------------------------------------------------------------------------
Handler = Callable[[Request, HttpState], Awaitable[Response]]


def endpoint(path: str, fn: Handler) -> Callable[[Request], Awaitable[Response]]:
    """Errors -> {"error"} answers; every call counted in the server's metrics as method 'HTTP <path>'."""
    async def handle(request: Request) -> Response:
        started, state = time.monotonic(), request.app.state.nmt
        request.state.model = ""
        try:
            response = await fn(request, state)
        except Exception as exc:
            response = status_response(exc)
        state.metrics.request_done(f"HTTP {path}", request.state.model, str(response.status_code),
                                   time.monotonic() - started)
        return response
    return handle


async def translate(request: Request, state: HttpState) -> Response:
    params, is_json = await read_params(request)
    key = state.keys.check(api_key(request, params))
    check_ready(request)
    q = required(params, "q")
    source, target = str(required(params, "source")), str(required(params, "target"))
    fmt = params.get("format") or "text"
    if fmt not in ("text", "html"):
        raise InvalidRequest(f"{fmt} format is not supported")
    alternatives = max(0, integer(params, "alternatives", 0))
    if alternatives > state.max_alternatives:
        raise InvalidRequest(f"Invalid request: alternatives parameter must be <= {state.max_alternatives}")
    batch = isinstance(q, list)
    texts = q if batch else [q]
    if not all(isinstance(t, str) for t in texts):
        raise InvalidRequest("Invalid request: q must be a string or a list of strings")
    if not is_json:  # form bodies may carry CRLF: count and keep characters as LF, as LibreTranslate
        texts = ["\n".join(t.splitlines()) for t in texts]
    check_texts(texts, state.limits, name="q")
    options = decode_options(params, alternatives, flag(params, "return_alignments") and fmt == "text")
    state.keys.charge(key, sum(map(len, texts)))
    t = await translate_texts(state, texts, source, target, fmt, options)
    request.state.model = t.model.name
    escape = escape_text if fmt == "html" else (lambda s: s)
    best = [render(lay, [h[0].text for h in t.hyps], escape) for lay in t.layouts]
    result: dict[str, Any] = {"translatedText": best if batch else best[0]}
    if t.detected is not None:
        found = {"confidence": t.detected[1], "language": t.detected[0]}
        result["detectedLanguage"] = [found] * len(texts) if batch else found
    if alternatives:
        alts = []
        for lay, main in zip(t.layouts, best):
            seen, these = {main}, []
            for k in range(1, alternatives + 1) if fmt == "text" else ():
                alt = render(lay, [h[min(k, len(h) - 1)].text for h in t.hyps])
                if alt not in seen:
                    seen.add(alt)
                    these.append(alt)
            alts.append(these)
        result["alternatives"] = alts if batch else alts[0]
    if options.return_alignments:
        result["alignments"] = alignments_of(t)
    return JSONResponse(result)


def language_list(state: HttpState) -> list[dict[str, Any]]:
    targets: dict[str, set[str]] = {}
    for m in state.registry.models:
        targets.setdefault(m.translator.src_lang, set()).add(m.translator.tgt_lang)
        targets.setdefault(m.translator.tgt_lang, set())
    return [{"code": c, "name": language_name(c), "targets": sorted(ts)} for c, ts in sorted(targets.items())]


async def languages(request: Request, state: HttpState) -> Response:
    return JSONResponse(language_list(state))


async def detect(request: Request, state: HttpState) -> Response:
    params, _ = await read_params(request)
    key = state.keys.check(api_key(request, params))
    q = required(params, "q")
    text = "\n".join(q) if isinstance(q, list) else str(q)
    check_texts([text], state.limits, name="q")
    state.keys.charge(key, len(text))
    known = [lang["code"] for lang in language_list(state)]
    if not known:
        raise NotReady("models are still loading; retry shortly")
    ranked = await run_in_threadpool(state.detector.rank, text, known)
    return JSONResponse([{"confidence": c, "language": lang} for lang, c in ranked])


async def translate_file(request: Request, state: HttpState) -> Response:
    params, _ = await read_params(request)
    key = state.keys.check(api_key(request, params))
    check_ready(request)
    upload = params.get("file")
    if not isinstance(upload, UploadFile):
        raise InvalidRequest("Invalid request: missing file parameter")
    source, target = str(required(params, "source")), str(required(params, "target"))
    name = SAFE_NAME.sub("_", Path(upload.filename or "").name).strip("._")
    fmt = FILE_FORMATS.get(Path(name).suffix.lower())
    if not name:
        raise InvalidRequest("Invalid request: empty file")
    if fmt is None:
        raise InvalidRequest(f"Invalid request: file format not supported (supported: "
                             f"{', '.join(FILE_FORMATS)})")
    data = await upload.read()
    if len(data) > state.limits.max_message_bytes:
        raise InvalidRequest(f"the file is {len(data)} bytes, at most {state.limits.max_message_bytes}")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InvalidRequest("Invalid request: the file is not UTF-8 text") from None
    state.keys.charge(key, len(text))
    t = await translate_texts(state, [text], source, target, fmt, DecodeOptions())
    request.state.model = t.model.name
    out = render(t.layouts[0], [h[0].text for h in t.hyps], escape_text if fmt == "html" else lambda s: s)
    stored = f"{uuid.uuid4().hex}.{name}"
    atomic_write_text(state.files / stored, out)
    return JSONResponse({"translatedFileUrl": str(request.url_for("download_file", filename=stored))})


async def download_file(request: Request, state: HttpState) -> Response:
    filename = request.path_params["filename"]
    if not STORED_FILE.match(filename):
        raise InvalidRequest("Invalid filename")
    path = state.files / filename
    if not path.is_file():
        raise HttpError(404, f"no translated file {filename!r}")
    return FileResponse(path, filename=filename.split(".", 1)[1], media_type="application/octet-stream")


async def frontend_settings(request: Request, state: HttpState) -> Response:
    models = state.registry.models
    first = models[0].translator if models else None
    src, tgt = (first.src_lang, first.tgt_lang) if first else ("", "")
    return JSONResponse({
        "charLimit": state.limits.max_chars, "frontendTimeout": 500, "apiKeys": state.keys.required,
        "keyRequired": state.keys.required, "suggestions": False, "filesTranslation": True,
        "supportedFilesFormat": list(FILE_FORMATS),
        "language": {"source": {"code": src, "name": language_name(src)},
                     "target": {"code": tgt, "name": language_name(tgt)}},
    })


async def health(request: Request, state: HttpState) -> Response:
    if request.app.state.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    if not state.registry.models:
        return JSONResponse({"status": "loading"}, status_code=503)
    return JSONResponse({"status": "ok"})


async def index(request: Request, state: HttpState) -> Response:
    return FileResponse(STATIC / "index.html", media_type="text/html")


def build_app(state: HttpState) -> Any:
    """The ASGI app (CORS around Starlette); `.state` is the Starlette app's state."""
    routes = [
        Route("/translate", endpoint("/translate", translate), methods=["POST", "GET"]),
        Route("/languages", endpoint("/languages", languages), methods=["GET", "POST"]),
        Route("/detect", endpoint("/detect", detect), methods=["POST"]),
        Route("/translate_file", endpoint("/translate_file", translate_file), methods=["POST"]),
        Route("/download_file/{filename}", endpoint("/download_file", download_file), methods=["GET"],
              name="download_file"),
        Route("/frontend/settings", endpoint("/frontend/settings", frontend_settings), methods=["GET"]),
        Route("/health", endpoint("/health", health), methods=["GET"]),
        Route("/", endpoint("/", index), methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]

    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        return JSONResponse({"error": getattr(exc, "detail", "Not Found")}, status_code=status)

    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})
    app.state.nmt, app.state.draining = state, False
    cors = Cors(app)
    cors.state = app.state  # type: ignore[attr-defined]
    return cors


def remove_files(state: HttpState) -> None:
    shutil.rmtree(state.files, ignore_errors=True)
