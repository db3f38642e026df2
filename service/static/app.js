// text2concept web page: plain JS, no build step, no network beyond this server.
"use strict";
const $ = (id) => document.getElementById(id);
const state = { q: "", k: 24, offset: 0, total: 0, blobs: [] };

function apiKey() { return localStorage.getItem("t2c-api-key") || ""; }
function headers(extra) {
  const h = Object.assign({}, extra || {});
  const key = apiKey();
  if (key) h["X-API-Key"] = key;
  return h;
}

async function api(path, opts) {
  opts = opts || {};
  const init = { method: opts.method || "GET", headers: headers(opts.body ? { "Content-Type": "application/json" } : {}) };
  if (opts.body) init.body = JSON.stringify(opts.body);
  const r = await fetch(path, init);
  let data = null;
  try { data = await r.json(); } catch (e) { data = null; }
  if (!r.ok) {
    const err = new Error((data && data.message) || ("HTTP " + r.status));
    err.status = r.status; err.body = data || {};
    throw err;
  }
  return data;
}

function showError(el, err, query) {
  el.className = "status error";
  const b = err.body || {};
  let text = (b.error ? b.error + ": " : "") + err.message;
  if (b.hint) text += "\nhint: " + b.hint;
  if (err.status === 401) text += "\nOpen “API key” at the top right and enter the server's key.";
  if (query != null && typeof b.position === "number") {
    text += "\n  " + query + "\n  " + " ".repeat(b.position) + "^";
  }
  el.textContent = text;
}
function showInfo(el, text) { el.className = "status"; el.textContent = text; }

function freeBlobs() { state.blobs.forEach((u) => URL.revokeObjectURL(u)); state.blobs = []; }

async function loadThumb(img, id) {
  try {
    const r = await fetch("/api/images/" + id + "/thumb", { headers: headers() });
    if (!r.ok) { img.alt = "no thumbnail (" + r.status + ")"; return; }
    const url = URL.createObjectURL(await r.blob());
    state.blobs.push(url);
    img.src = url;
  } catch (e) { img.alt = "no thumbnail"; }
}

function fmt(x, n) { return (typeof x === "number") ? x.toFixed(n == null ? 3 : n) : "–"; }

function explainLines(hit) {
  if (!hit.explanation || !hit.explanation.length) return [];
  return hit.explanation.map((e) => {
    const name = (e.negated ? "NOT " : "") + (e.concept != null ? e.concept : (e.filter || "?"));
    const w = (e.weight != null && e.weight !== 1) ? " ×" + e.weight : "";
    return { ok: !!e.passed, text: (e.passed ? "✓ " : "✗ ") + name + w + ": " + fmt(e.score) + " (threshold " + fmt(e.threshold) + ")" };
  });
}

function renderHits(res) {
  freeBlobs();
  const grid = $("grid");
  grid.innerHTML = "";
  (res.hits || []).forEach((hit, i) => {
    const card = document.createElement("figure");
    card.className = "hit";
    card.dataset.id = hit.id;
    card.setAttribute("data-testid", "hit");
    const img = document.createElement("img");
    img.alt = "image " + hit.id; img.loading = "lazy";
    loadThumb(img, hit.id);
    const cap = document.createElement("figcaption");
    cap.className = "cap";
    const name = (hit.path || "").split("/").pop() || ("#" + hit.id);
    cap.innerHTML = "<span class='rank'></span><span class='name'></span><span class='score'></span>";
    cap.querySelector(".rank").textContent = (state.offset + i + 1) + ".";
    cap.querySelector(".name").textContent = name;
    cap.querySelector(".score").textContent = fmt(hit.score);
    const lines = explainLines(hit);
    card.title = [hit.path || ("id " + hit.id), "score " + fmt(hit.score)].concat(lines.map((l) => l.text)).join("\n");
    const more = document.createElement("button");
    more.type = "button"; more.className = "more-like"; more.textContent = "more like this";
    more.setAttribute("data-testid", "more-like");
    more.addEventListener("click", (e) => { e.stopPropagation(); searchText("like:" + hit.id); });
    card.append(img, cap, more);
    if (lines.length) {
      const ex = document.createElement("div");
      ex.className = "explain";
      lines.forEach((l) => { const d = document.createElement("div"); d.className = l.ok ? "pass" : "fail"; d.textContent = l.text; ex.append(d); });
      card.append(ex);
    }
    card.addEventListener("click", () => openLightbox(hit.id));
    grid.append(card);
  });
}

async function runSearch() {
  const st = $("search-status");
  if (!state.q.trim()) { showInfo(st, "Type a query."); return; }
  showInfo(st, "Searching…");
  location.hash = "q=" + encodeURIComponent(state.q) + "&offset=" + state.offset + "&k=" + state.k;
  try {
    const params = new URLSearchParams({ q: state.q, k: state.k, offset: state.offset, explain: "true" });
    const res = await api("/api/search?" + params.toString());
    state.total = res.total || 0;
    renderHits(res);
    const n = (res.hits || []).length;
    showInfo(st, state.total + " matching image" + (state.total === 1 ? "" : "s") +
      (n ? " — showing " + (state.offset + 1) + "–" + (state.offset + n) : "") +
      (res.took_ms != null ? " (" + fmt(res.took_ms, 1) + " ms)" : "") + estimateText(res.estimate));
    $("pager").hidden = state.total <= state.k && state.offset === 0;
    $("prev").disabled = state.offset === 0;
    $("next").disabled = state.offset + state.k >= state.total;
    $("page-info").textContent = "page " + (Math.floor(state.offset / state.k) + 1) + " of " + Math.max(1, Math.ceil(state.total / state.k));
  } catch (err) {
    freeBlobs(); $("grid").innerHTML = ""; $("pager").hidden = true;
    showError(st, err, state.q);
  }
}

function estimateText(est) {
  // the engine's own estimate of the answer's precision and recall (from the calibration fits, no labels)
  if (!est || est.precision == null || est.recall == null) return "";
  return " — estimated precision " + fmt(est.precision, 2) + ", recall " + fmt(est.recall, 2);
}

function searchText(q) {
  state.q = q; state.offset = 0; $("q").value = q; switchView("search"); runSearch();
}

// An example image (chosen or dropped) goes up once; the answer's q (like:"sha256:..." AND the text box) pages on.
async function searchImage(file) {
  const st = $("search-status");
  if (!file) return;
  showInfo(st, "Uploading " + file.name + "…");
  const form = new FormData();
  form.append("image", file, file.name);
  if ($("q").value.trim() && !/like:"sha256:/.test($("q").value)) form.append("q", $("q").value);
  form.append("k", $("k").value); form.append("explain", "true");
  try {
    const r = await fetch("/api/search", { method: "POST", headers: headers(), body: form });
    const data = await r.json().catch(() => null);
    if (!r.ok) { const err = new Error((data && data.message) || ("HTTP " + r.status)); err.status = r.status; err.body = data || {}; throw err; }
    searchText(data.q);
  } catch (err) { showError(st, err, null); }
  finally { $("image").value = ""; }
}

async function runDuplicates() {
  const st = $("dups-status"), out = $("dups-results");
  showInfo(st, "Looking for duplicates…");
  try {
    const res = await api("/api/duplicates");
    out.innerHTML = "";
    (res.groups || []).forEach((g) => {
      const row = document.createElement("div");
      row.className = "dup-group"; row.setAttribute("data-testid", "dup-group");
      const head = document.createElement("div"); head.className = "nums";
      head.textContent = g.kind + " · " + g.ids.length + " images · similarity ≥ " + fmt(g.min_similarity);
      row.append(head);
      g.ids.forEach((id, j) => {
        const img = document.createElement("img"); img.alt = "image " + id; img.title = (g.paths || [])[j] || ("id " + id);
        img.addEventListener("click", () => openLightbox(id)); loadThumb(img, id); row.append(img);
      });
      out.append(row);
    });
    showInfo(st, (res.n_groups || 0) + " groups of duplicates (" + (res.n_duplicates || 0) + " extra copies) among " +
      res.n + " images · candidate threshold " + fmt(res.threshold, 4) + " (" + res.method + ")");
  } catch (err) { out.innerHTML = ""; showError(st, err, null); }
}

function splitConcepts(text) {
  return text.split(/[\n,]/).map((s) => s.trim()).filter((s) => s.length);
}

function pct(x) { return (typeof x === "number") ? (100 * x).toFixed(1) + "%" : "–"; }

async function runAudit() {
  const st = $("audit-status"), out = $("audit-results");
  const concepts = splitConcepts($("concepts").value);
  if (!concepts.length) { showInfo(st, "Enter at least one concept."); return; }
  showInfo(st, "Auditing…");
  try {
    const res = await api("/api/audit", { method: "POST", body: { concepts: concepts, top: parseInt($("top").value || "6", 10) } });
    out.innerHTML = "";
    const rows = res.concepts || res.results || [];
    rows.forEach((c) => {
      const row = document.createElement("div");
      row.className = "audit-row"; row.setAttribute("data-testid", "audit-row");
      const name = document.createElement("div"); name.className = "name"; name.textContent = c.concept;
      const bar = document.createElement("div"); bar.className = "bar";
      bar.title = "prevalence " + pct(c.prevalence) + " (95% CI " + pct(c.ci_low) + " – " + pct(c.ci_high) + ")";
      const fill = document.createElement("div"); fill.className = "fill"; fill.style.width = Math.min(100, 100 * (c.prevalence || 0)) + "%";
      const ci = document.createElement("div"); ci.className = "ci";
      ci.style.left = (100 * (c.ci_low || 0)) + "%"; ci.style.width = Math.max(0, 100 * ((c.ci_high || 0) - (c.ci_low || 0))) + "%";
      bar.append(fill, ci);
      const nums = document.createElement("div"); nums.className = "nums";
      nums.textContent = pct(c.prevalence) + " [" + pct(c.ci_low) + ", " + pct(c.ci_high) + "] · " + (c.count != null ? c.count : "?") + " images · thr " + fmt(c.threshold);
      const ex = document.createElement("div"); ex.className = "examples";
      (c.examples || []).forEach((id) => {
        const img = document.createElement("img"); img.alt = "image " + id; img.title = "id " + id;
        img.addEventListener("click", () => openLightbox(id));
        loadThumb(img, id); ex.append(img);
      });
      row.append(name, bar, nums, ex);
      out.append(row);
    });
    if (res.drift) {
      const d = document.createElement("pre"); d.textContent = "drift: " + JSON.stringify(res.drift, null, 2); out.append(d);
    }
    showInfo(st, rows.length + " concept" + (rows.length === 1 ? "" : "s") + " audited" + (res.n != null ? " over " + res.n + " images" : ""));
  } catch (err) {
    out.innerHTML = "";
    if (err.status === 501) { showInfo(st, "Audit is not available on this server: " + err.message); return; }
    showError(st, err, null);
  }
}

async function openLightbox(id) {
  const lb = $("lightbox");
  lb.hidden = false;
  $("lb-img").removeAttribute("src");
  loadThumb($("lb-img"), id);
  $("lb-meta").textContent = "loading…";
  try { $("lb-meta").textContent = JSON.stringify(await api("/api/images/" + id), null, 2); }
  catch (err) { $("lb-meta").textContent = err.message; }
}

async function loadInfo() {
  try {
    const info = await api("/api/info");
    $("store-info").textContent = info.count + " images · " + info.encoder + " · snapshot " + info.snapshot;
    if (info.columns) $("columns").textContent = "Filterable columns: " + Object.keys(info.columns).join(", ");
  } catch (err) {
    $("store-info").textContent = err.status === 401 ? "API key needed" : "";
    if (err.status === 401) $("key-box").open = true;
  }
}

function switchView(view) {
  document.querySelectorAll(".tab").forEach((t) => t.classList.toggle("active", t.dataset.view === view));
  $("view-search").hidden = view !== "search";
  $("view-audit").hidden = view !== "audit";
  $("view-dups").hidden = view !== "dups";
}

function init() {
  $("api-key").value = apiKey();
  $("save-key").addEventListener("click", () => {
    localStorage.setItem("t2c-api-key", $("api-key").value.trim());
    $("key-box").open = false; loadInfo(); if (state.q) runSearch();
  });
  document.querySelectorAll(".tab").forEach((t) => t.addEventListener("click", () => switchView(t.dataset.view)));
  $("search-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.q = $("q").value; state.k = parseInt($("k").value, 10); state.offset = 0; runSearch();
  });
  $("prev").addEventListener("click", () => { state.offset = Math.max(0, state.offset - state.k); runSearch(); });
  $("next").addEventListener("click", () => { state.offset += state.k; runSearch(); });
  $("audit-form").addEventListener("submit", (e) => { e.preventDefault(); runAudit(); });
  $("image").addEventListener("change", () => searchImage($("image").files[0]));
  const form = $("search-form");
  form.addEventListener("dragover", (e) => { e.preventDefault(); form.classList.add("drop"); });
  form.addEventListener("dragleave", () => form.classList.remove("drop"));
  form.addEventListener("drop", (e) => {
    e.preventDefault(); form.classList.remove("drop");
    const f = [...(e.dataTransfer.files || [])].find((x) => x.type.startsWith("image/")) || (e.dataTransfer.files || [])[0];
    if (f) searchImage(f);
  });
  $("run-dups").addEventListener("click", runDuplicates);
  $("lb-close").addEventListener("click", () => { $("lightbox").hidden = true; });
  $("lightbox").addEventListener("click", (e) => { if (e.target.id === "lightbox") $("lightbox").hidden = true; });
  const h = new URLSearchParams(location.hash.slice(1));
  if (h.get("q")) {
    state.q = h.get("q"); state.offset = parseInt(h.get("offset") || "0", 10) || 0;
    state.k = parseInt(h.get("k") || "24", 10) || 24;
    $("q").value = state.q; runSearch();
  }
  loadInfo();
}
document.addEventListener("DOMContentLoaded", init);
