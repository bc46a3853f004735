// The translate page: plain browser JavaScript against this server's own HTTP API.
"use strict";

const $ = (id) => document.getElementById(id);
let languages = [];

function option(code, name) {
  const o = document.createElement("option");
  o.value = code;
  o.textContent = name ? `${name} (${code})` : code;
  return o;
}

function fillTargets() {
  const src = $("source").value;
  const found = languages.find((l) => l.code === src);
  const targets = src === "auto"
    ? [...new Set(languages.flatMap((l) => l.targets))]
    : (found ? found.targets : []);
  $("target").replaceChildren(...targets.map((t) => {
    const l = languages.find((x) => x.code === t);
    return option(t, l ? l.name : t);
  }));
}

async function loadLanguages() {
  const r = await fetch("/languages");
  languages = await r.json();
  const sources = languages.filter((l) => l.targets.length);
  $("source").replaceChildren(option("auto", "Detect"), ...sources.map((l) => option(l.code, l.name)));
  if (sources.length) $("source").value = sources[0].code;
  fillTargets();
}

// SentencePiece pieces -> words: a piece starting with U+2581 begins a new word.
function words(pieces) {
  const out = [];
  pieces.forEach((p, i) => {
    if (p === "</s>") return;
    const starts = p.startsWith("\u2581") || out.length === 0;
    const text = p.replace(/^\u2581/, "");
    if (starts) out.push({ text, pieces: [i] });
    else { out[out.length - 1].text += text; out[out.length - 1].pieces.push(i); }
  });
  return out;
}

function showAlignment(alignments) {
  const box = $("alignment");
  box.replaceChildren();
  alignments.forEach((a) => {
    const src = words(a.source), tgt = words(a.target);
    const srcWordOf = {};
    src.forEach((w, wi) => w.pieces.forEach((p) => { srcWordOf[p] = wi; }));
    const row = document.createElement("div");
    row.className = "sentence";
    const left = document.createElement("div"), right = document.createElement("div");
    left.className = "src"; right.className = "tgt";
    const srcSpans = src.map((w, wi) => {
      const s = document.createElement("span");
      s.className = "word"; s.textContent = w.text; s.dataset.index = wi;
      return s;
    });
    srcSpans.forEach((s) => { left.append(s, " "); });
    tgt.forEach((w) => {
      const s = document.createElement("span");
      s.className = "word"; s.textContent = w.text;
      const linked = [...new Set(w.pieces.map((p) => srcWordOf[a.alignment[p]]).filter((x) => x !== undefined))];
      s.dataset.source = linked.join(" ");
      s.addEventListener("mouseenter", () => linked.forEach((i) => srcSpans[i].classList.add("hl")));
      s.addEventListener("mouseleave", () => srcSpans.forEach((x) => x.classList.remove("hl")));
      right.append(s, " ");
    });
    row.append(left, right);
    box.append(row);
  });
  $("alignment-box").hidden = alignments.length === 0;
}

async function translate() {
  $("translate").disabled = true;
  $("status").textContent = "";
  const body = {
    q: $("text").value, source: $("source").value, target: $("target").value, format: "text",
    alternatives: Number($("alternatives").value) || 0, return_alignments: true,
  };
  if ($("api-key").value) body.api_key = $("api-key").value;
  try {
    const r = await fetch("/translate", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    const data = await r.json();
    if (!r.ok) throw new Error(data.error || r.statusText);
    $("result").textContent = data.translatedText;
    if (data.detectedLanguage) {
      $("status").textContent = `detected ${data.detectedLanguage.language} (${data.detectedLanguage.confidence}%)`;
    }
    const alts = data.alternatives || [];
    $("alternatives-list").replaceChildren(...alts.map((t) => {
      const li = document.createElement("li"); li.textContent = t; return li;
    }));
    $("alternatives-box").hidden = alts.length === 0;
    showAlignment(data.alignments || []);
  } catch (e) {
    $("status").textContent = e.message;
  } finally {
    $("translate").disabled = false;
  }
}

$("source").addEventListener("change", fillTargets);
$("translate").addEventListener("click", translate);
loadLanguages().catch((e) => { $("status").textContent = `cannot load languages: ${e.message}`; });
