"""Benchmark results: quality columns, checks, one markdown table and one JSON file (atomic).

A report is a plain dict: {"meta": {...}, "rows": [...], "grpc": {...} | None, "profiles": [...],
"failures": [...], "notes": [...]}. Workers measure; BLEU, token agreement, the checks and the
ratio columns are derived here from the rows' outputs and figures.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

from nmt.files import atomic_write_text

# Column header -> row key. Ratios are speed-ups: > 1 means faster than the baseline.
COLUMNS = [
    ("row", "name"),
    ("batch-1 latency ms (median)", "latency_ms"),
    ("batch-64 tokens/s", "tokens_per_s"),
    ("peak RSS MiB", "peak_rss_mib"),
    ("BLEU", "bleu"),
    ("same tokens as PyTorch", "same_tokens_pct"),
    ("latency vs CT2 fp32", "latency_vs_ct2"),
    ("tokens/s vs CT2 fp32", "throughput_vs_ct2"),
    ("latency vs PyTorch uncached", "latency_vs_torch"),
    ("tokens/s vs PyTorch uncached", "throughput_vs_torch"),
]


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "onnxruntime-gpu", "onnxruntime", "ctranslate2", "grpcio", "sacrebleu"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def machine() -> str:
    return f"{cpu_name()}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def score(rows: list[dict[str, Any]], refs: list[str], reference: str) -> None:
    """BLEU (sacreBLEU, detokenized, cased) of every row, and token agreement with the reference."""
    import sacrebleu

    ref_row = next((r for r in rows if r["name"] == reference and r.get("outputs")), None)
    for r in rows:
        if not r.get("outputs"):
            continue
        if len(r["outputs"]) == len(refs):  # a row that decoded a subset has no comparable BLEU
            r["bleu"] = sacrebleu.corpus_bleu([o[1] for o in r["outputs"]], [refs]).score
        if ref_row is not None and r is not ref_row and r["beam"] == 1:
            pairs = list(zip(r["outputs"], ref_row["outputs"]))  # a subset row: its first sentences
            r["same_tokens_pct"] = 100.0 * sum(a[0] == b[0] for a, b in pairs) / len(pairs)


def check(rows: list[dict[str, Any]], texts: list[str], reference: str, ct2_name: str,
          tolerance: float) -> list[str]:
    """Failures: rows that crashed, a CTranslate2 conversion that changes greedy tokens, and
    fp32 greedy rows whose BLEU differs from the PyTorch reference by more than the tolerance."""
    failures = [f"{r['name']}: {r['error']}" for r in rows if r.get("error")]
    by_name = {r["name"]: r for r in rows if r.get("outputs")}
    ref = by_name.get(reference)
    if ref is None:
        return failures
    ct2 = by_name.get(ct2_name)
    if ct2 is not None:
        diff = [i for i, (a, b) in enumerate(zip(ct2["outputs"], ref["outputs"])) if a[0] != b[0]]
        if diff:
            i = diff[0]
            failures.append(f"CTranslate2 conversion: {len(diff)} of {len(texts)} sentences differ from "
                            f"PyTorch greedy; first #{i} {texts[i]!r}: PyTorch {ref['outputs'][i][0]} "
                            f"vs CT2 {ct2['outputs'][i][0]}")
    for r in by_name.values():
        if r["precision"] != "fp32" or r["beam"] != 1 or r.get("bleu") is None:
            continue
        if abs(r["bleu"] - ref["bleu"]) > tolerance:
            failures.append(f"{r['name']}: BLEU {r['bleu']:.2f} differs from {reference} {ref['bleu']:.2f} "
                            f"by more than {tolerance}")
    return failures


def method_notes(uncached: str, reference: str, paired: bool = False) -> list[str]:
    """How to read the table: what each figure counts and where rows are not like for like."""
    notes = [
        f"{uncached} (the textbook loop) decodes one source at a time: it runs once over the latency "
        "sentences only, its tokens/s is sequential, and its BLEU is not computed (a subset); "
        f"'same tokens' compares greedy rows with {reference} (on that subset for the uncached row)",
        "tokens/s counts generated tokens without EOS; latency includes tokenization and detokenization",
        "peak RSS: VmHWM of a fresh process running only that row (interpreter, imports, model, decoding)",
        "beam rows are compared with the CT2 beam row; CTranslate2 normalises beam scores by length^penalty, "
        "we by ((5+L)/6)^penalty, so beam outputs may differ; int8 rows quantize differently per runtime",
    ]
    if paired:
        notes.append("--paired: each engine row ran in one process with the CT2 row of the same precision "
                     "and search, every batch on both back to back and every latency pass on both in turn "
                     "(the order turning), so both saw the same host speed; their peak RSS is not given "
                     "(one process held both)")
    return notes


def _speedup(baseline: float | None, value: float | None, higher_is_better: bool) -> float | None:
    if not baseline or not value:
        return None
    return value / baseline if higher_is_better else baseline / value


def add_ratios(rows: list[dict[str, Any]], ct2_baselines: dict[int, str], torch_baseline: str) -> None:
    """Fill the ratio columns in place.

    ct2_baselines maps a beam size to the CTranslate2 fp32 row of that beam size, so beam rows
    are compared with beam rows; every row is compared with the one PyTorch uncached (greedy) row.
    """
    by_name = {r["name"]: r for r in rows}
    torch_row = by_name.get(torch_baseline)
    for r in rows:
        ct2_row = by_name.get(ct2_baselines.get(r.get("beam", 1), ""))
        for base, prefix in ((ct2_row, "vs_ct2"), (torch_row, "vs_torch")):
            base = base or {}
            r[f"latency_{prefix}"] = _speedup(base.get("latency_ms"), r.get("latency_ms"), False)
            r[f"throughput_{prefix}"] = _speedup(base.get("tokens_per_s"), r.get("tokens_per_s"), True)


def matchups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each engine row against the CT2 row of the same precision and search: speed-ups (> 1: the engine
    is faster), overall and per round when the rows ran in rounds."""
    ct2 = {(r["precision"], r["beam"]): r for r in rows if r["system"] == "ct2" and not r.get("error")}
    out = []
    for r in rows:
        theirs = ct2.get((r["precision"], r["beam"]))
        if r["system"] != "engine" or r.get("error") or theirs is None:
            continue
        search = "greedy" if r["beam"] == 1 else f"beam {r['beam']}"
        m: dict[str, Any] = {
            "row": f"{r['precision']} {search}", "engine": r["name"], "ct2": theirs["name"],
            "latency": _speedup(theirs.get("latency_ms"), r.get("latency_ms"), False),
            "tokens_per_s": _speedup(theirs.get("tokens_per_s"), r.get("tokens_per_s"), True)}
        if r.get("rounds") and theirs.get("rounds"):
            for key, higher in (("latency_ms", False), ("tokens_per_s", True)):
                pairs = zip(theirs["rounds"][key], r["rounds"][key])
                m[f"{key}_rounds"] = [_speedup(base, ours, higher) for base, ours in pairs]
        out.append(m)
    return out


def _ratios(values: list[float | None] | None) -> str:
    return ", ".join("—" if v is None else f"{v:.2f}" for v in values) if values else "—"


def _matchup_table(found: list[dict[str, Any]]) -> list[str]:
    body = [[m["row"], _cell("latency_vs", m["latency"]), _cell("throughput_vs", m["tokens_per_s"]),
             _ratios(m.get("latency_ms_rounds")), _ratios(m.get("tokens_per_s_rounds"))] for m in found]
    header = ["engine vs CT2, same precision and search", "batch-1 latency", "batch-64 tokens/s",
              "latency per round", "tokens/s per round"]
    return ["", "Engine against the CTranslate2 row of the same precision and search (> 1: the engine is "
            "faster):", ""] + _table(header, body)


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "—"
    if key.startswith(("latency_vs", "throughput_vs")):
        return f"{value:.2f}x"
    if key == "same_tokens_pct":
        return f"{value:.1f}%"
    if key in ("latency_ms", "bleu"):
        return f"{value:.2f}"
    if isinstance(value, float):
        return f"{value:.0f}"
    return str(value)


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(cells) + " |" for cells in body]


def markdown(report: dict[str, Any]) -> str:
    meta = report["meta"]
    out = [f"## Benchmark {meta['date']}", "",
           f"Machine: {meta['machine']} (load average {meta.get('load_average')} at start); "
           f"threads per runtime: {meta['threads']}; "
           f"sentences: {meta['sentences']} ({meta['test_src']}), latency over the first "
           f"{meta['latency_sentences']}; repeats: {meta['repeats']} (medians, warm-up excluded)"
           + (f"; rounds: {meta['rounds']} (every row run that many times round-robin, medians)"
              if meta.get("rounds", 1) > 1 else "")
           + ("; paired (engine and CT2 rows interleaved in one process)" if meta.get("paired") else "")
           + ".",
           "",
           "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()), ""]
    body = []
    for r in report["rows"]:
        name = r["name"] if not r.get("error") else f"{r['name']} (FAILED: {r['error']})"
        body.append([_cell(key, name if key == "name" else r.get(key)) for _, key in COLUMNS])
    out += _table([h for h, _ in COLUMNS], body)
    if report.get("matchups"):
        out += _matchup_table(report["matchups"])
    grpc = report.get("grpc")
    if grpc and not grpc.get("error"):
        from bench.grpc_bench import markdown as grpc_markdown

        out += ["", "gRPC (fp32 greedy bundle, one sentence per request, `nmt serve` in its own process):",
                "",
                grpc_markdown(grpc)]
    for p in report.get("profiles") or []:
        if not p.get("error"):
            from bench.profile_engine import render

            out += ["", render(p)]
    if report.get("notes"):
        out += ["", "Notes:"] + [f"- {n}" for n in report["notes"]]
    failures = report.get("failures") or []
    out += ["", "Failures:" if failures else "Failures: none"] + [f"- FAIL: {f}" for f in failures]
    return "\n".join(out) + "\n"


def write_report(report: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write latest.md and latest.json under out_dir; returns their paths."""
    out = Path(out_dir)
    md, js = out / "latest.md", out / "latest.json"
    atomic_write_text(js, json.dumps(report, indent=2, sort_keys=False) + "\n")
    atomic_write_text(md, markdown(report))
    return md, js
