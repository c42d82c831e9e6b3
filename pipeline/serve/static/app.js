// The page of `pipeline serve`: one client of the JSON API under /api/ (see the README).
"use strict";

const TABS = ["search", "duplicates", "clusters", "probe", "runs"];
const state = { status: null, loaded: {}, dups: null, map: null };

const $ = (id) => document.getElementById(id);
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
const thumb = (id) => "/api/thumb?id=" + encodeURIComponent(id);
const fmt = (x, d = 3) => (x === null || x === undefined ? "–" : Number(x).toFixed(d));

async function api(path, options) {
  const r = await fetch(path, options);
  const body = await r.json().catch(() => ({}));
  if (!r.ok) {
    const d = body.detail;
    throw new Error(Array.isArray(d) ? d.map((x) => `${(x.loc || []).slice(-1)[0]}: ${x.msg}`).join("; ") : d || r.status + " " + r.statusText);
  }
  return body;
}

function setMessage(id, text, error = false) {
  const el = $(id);
  el.textContent = text || "";
  el.classList.toggle("error", error);
}

function tile(row, extra = "") {
  const fig = document.createElement("figure");
  fig.className = "tile";
  fig.dataset.id = row.id;
  if (row.score !== undefined) fig.dataset.score = row.score;
  const score = row.score !== undefined ? `<span class="score">${fmt(row.score)}</span> · ` : "";
  fig.innerHTML = `<img loading="lazy" alt="" src="${thumb(row.id)}"><figcaption>${score}${esc(row.id)}` +
    (row.label ? `<br><span class="muted">${esc(row.label)}</span>` : "") + extra + "</figcaption>";
  fig.title = row.source || row.id;
  fig.addEventListener("click", () => { location.hash = "#search?id=" + encodeURIComponent(row.id); });
  return fig;
}

// ---- routing: #tab or #search?id=...&k=... --------------------------------------------------------------
function route() {
  const [name, query] = (location.hash.slice(1) || "search").split("?");
  const tab = TABS.includes(name) ? name : "search";
  for (const t of TABS) $("tab-" + t).hidden = t !== tab;
  for (const a of document.querySelectorAll("#tabs a")) a.classList.toggle("active", a.dataset.tab === tab);
  if (!state.status) return;
  const params = new URLSearchParams(query || "");
  if (tab === "search") showSearch(params);
  else if (!state.loaded[tab]) { state.loaded[tab] = true; LOADERS[tab](); }
}

// ---- search ------------------------------------------------------------------------------------------------
function showResults(body, queryHtml) {
  $("query").innerHTML = queryHtml;
  const grid = $("results");
  grid.replaceChildren(...body.results.map((r) => tile(r)));
  setMessage("search-message", `${body.results.length} nearest rows in ${body.took_ms} ms` +
    ` (${state.status.search === "index" ? state.status.index.kind + " index" : "exact search"}; score = cosine)`);
}

async function showSearch(params) {
  const id = params.get("id");
  const asked = parseInt(params.get("k"), 10);
  const k = Number.isFinite(asked) ? Math.max(1, Math.min(200, asked)) : 0;
  if (k && ![...$("k").options].some((o) => o.value === String(k))) $("k").add(new Option(String(k)));
  if (k) $("k").value = String(k);
  if (!id) { if (!state.searched) browse(); return; }
  $("query-id").value = id;
  setMessage("search-message", "searching…");
  try {
    const body = await api(`/api/search?id=${encodeURIComponent(id)}&k=${$("k").value}`);
    state.searched = true;
    showResults(body, `<img alt="" src="${thumb(id)}"><div>query <b>${esc(id)}</b>` +
      (body.query.label ? ` · ${esc(body.query.label)}` : "") + "</div>");
  } catch (e) { setMessage("search-message", e.message, true); }
}

async function browse() {
  try {
    const body = await api("/api/rows?limit=24");
    $("query").innerHTML = "";
    $("results").replaceChildren(...body.rows.map((r) => tile(r)));
    setMessage("search-message", `${body.total} rows; the first ${body.rows.length} shown. Drop an image or click one to search.`);
  } catch (e) { setMessage("search-message", e.message, true); }
}

async function searchFile(file) {
  if (!file) return;
  setMessage("search-message", `embedding ${file.name}…`);
  try {
    const body = await api(`/api/search?k=${$("k").value}&name=${encodeURIComponent(file.name)}`,
      { method: "POST", body: file, headers: { "Content-Type": "application/octet-stream" } });
    state.searched = true;
    if (location.hash.includes("id=")) history.replaceState(null, "", "#search");
    showResults(body, `<img alt="" src="${URL.createObjectURL(file)}"><div>query <b>${esc(file.name)}</b> (uploaded)</div>`);
  } catch (e) { setMessage("search-message", e.message, true); }
}

function wireSearch() {
  $("upload").addEventListener("change", (e) => searchFile(e.target.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); searchFile(e.dataTransfer.files[0]); });
  $("by-id").addEventListener("submit", (e) => {
    e.preventDefault();
    const id = $("query-id").value.trim();
    if (id) location.hash = `#search?id=${encodeURIComponent(id)}&k=${$("k").value}`;
  });
}

// ---- duplicates ------------------------------------------------------------------------------------------
async function loadDuplicates() {
  try {
    state.dups = await api("/api/duplicates");
    const t = state.dups.threshold || 0.8;
    const keys = Object.keys(state.dups.by_threshold || {}).map(Number);
    $("threshold").min = Math.min(t, ...keys, 0.8);
    $("threshold").value = t;
    drawDuplicates();
  } catch (e) { setMessage("dup-message", e.message, true); }
}

function drawDuplicates() {
  const t = Number($("threshold").value);
  $("threshold-value").textContent = t.toFixed(3);
  const groups = state.dups.groups.map((g) => ({ kept: g.kept, removed: g.removed.filter((r) => r.similarity >= t) }))
    .filter((g) => g.removed.length);
  const removed = groups.reduce((n, g) => n + g.removed.length, 0);
  const curve = state.dups.by_threshold || {};
  const near = Object.keys(curve).map(Number).sort((a, b) => Math.abs(a - t) - Math.abs(b - t))[0];
  const stored = near !== undefined && curve[String(near)] ?
    ` · dedup at ${near}: ${curve[String(near)].groups} groups, ${curve[String(near)].removed} removed` : "";
  $("dup-counts").textContent = `${groups.length} groups, ${removed} copies removed of ${state.dups.rows} rows${stored}`;
  setMessage("dup-message", `each group: the kept row (${state.dups.keep_rule || "keep rule"}) and its removed copies with their cosine`);
  $("groups").replaceChildren(...groups.map((g) => {
    const box = document.createElement("div");
    box.className = "group";
    const grid = document.createElement("div");
    grid.className = "grid";
    const kept = tile({ id: g.kept }, ' <span class="badge">kept</span>');
    kept.classList.add("kept");
    grid.append(kept, ...g.removed.map((r) => tile({ id: r.id, score: r.similarity })));
    box.innerHTML = `<div class="muted">${g.removed.length} cop${g.removed.length === 1 ? "y" : "ies"} of <b>${esc(g.kept)}</b></div>`;
    box.append(grid);
    return box;
  }));
}

// ---- clusters --------------------------------------------------------------------------------------------
function colour(key) {
  if (key === null || key === undefined) return "#9ca3af";
  let h = Number.isInteger(key) ? key : 0;
  if (!Number.isInteger(key)) for (const c of String(key)) h = (h * 31 + c.charCodeAt(0)) >>> 0;
  return `hsl(${(h * 137.508) % 360} 70% ${h % 2 ? 40 : 55}%)`;  // golden-angle hues: neighbours differ
}

async function loadClusters() {
  try {
    state.map = await api("/api/clusters");
    $("map-about").textContent = `${state.map.method.toUpperCase()} of ${state.map.shown} of ${state.map.rows} rows; hover for the image, click to search from it`;
    drawMap();
    drawOutliers();
    if (!state.map.outliers.length) setMessage("cluster-message", "no outlier scores: run `pipeline dedup` on this output (it writes clusters.parquet)");
  } catch (e) { setMessage("cluster-message", e.message, true); }
}

function drawOutliers() {
  const by = $("outlier-by").value;
  $("outliers").replaceChildren(...(state.map[by] || []).slice(0, 24).map((r) => tile({ id: r.id, label: r.label },
    `<br>outlier score <b>${fmt(r.outlier_score)}</b> · to centre <b>${fmt(r.distance_to_centroid)}</b> · cluster ${esc(r.cluster)}`)));
}

function drawMap() {
  const canvas = $("map"), ctx = canvas.getContext("2d"), pts = state.map.points;
  const by = $("colour-by").value, pad = 20;
  const xs = pts.map((p) => p.x), ys = pts.map((p) => p.y);
  const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  const sx = (x) => pad + (x - x0) / ((x1 - x0) || 1) * (canvas.width - 2 * pad);
  const sy = (y) => canvas.height - pad - (y - y0) / ((y1 - y0) || 1) * (canvas.height - 2 * pad);
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  state.screen = pts.map((p) => ({ p, x: sx(p.x), y: sy(p.y) }));
  for (const s of state.screen) {
    ctx.fillStyle = colour(by === "label" ? s.p.label : s.p.cluster);
    ctx.beginPath(); ctx.arc(s.x, s.y, 4, 0, 2 * Math.PI); ctx.fill();
  }
}

function nearestPoint(e) {
  const canvas = $("map"), r = canvas.getBoundingClientRect();
  const x = (e.clientX - r.left) * canvas.width / r.width, y = (e.clientY - r.top) * canvas.height / r.height;
  let best = null, bd = 100;
  for (const s of state.screen || []) { const d = (s.x - x) ** 2 + (s.y - y) ** 2; if (d < bd) { bd = d; best = s; } }
  return best;
}

function wireMap() {
  const canvas = $("map"), hover = $("hover");
  canvas.addEventListener("mousemove", (e) => {
    const s = nearestPoint(e);
    if (!s) { hover.hidden = true; return; }
    hover.hidden = false;
    hover.style.left = (e.offsetX + 12) + "px"; hover.style.top = (e.offsetY + 12) + "px";
    if (hover.dataset.id !== s.p.id) {
      hover.dataset.id = s.p.id;
      hover.innerHTML = `<img alt="" src="${thumb(s.p.id)}">${esc(s.p.id)}<br>${esc(s.p.label ?? "")} cluster ${esc(s.p.cluster ?? "–")}`;
    }
  });
  canvas.addEventListener("mouseleave", () => { hover.hidden = true; });
  canvas.addEventListener("click", (e) => { const s = nearestPoint(e); if (s) location.hash = "#search?id=" + encodeURIComponent(s.p.id); });
  $("colour-by").addEventListener("change", () => state.map && drawMap());
  $("outlier-by").addEventListener("change", () => state.map && drawOutliers());
}

// ---- probe and heads -------------------------------------------------------------------------------------
async function loadProbe() {
  try {
    const { probe, head } = await api("/api/probe");
    if (!probe && !head) setMessage("probe-message", "no probe or head beside this output: pass --probe URI (a `pipeline probe` output) or --head URI");
    if (probe) {
      const best = probe.best || {};
      const rows = probe.results.map((r) => `<tr class="${r.model === best.model && r.layer === best.layer ? "best" : ""}">` +
        `<td>${esc(r.model)}</td><td>${esc(r.layer)}</td><td class="num">${esc(r.dim)}</td><td class="num">${fmt(r.accuracy)}</td>` +
        `<td class="num">${fmt(r.macro_f1)}</td><td class="num">${fmt(r.forward_ms_per_image, 1)}</td></tr>`).join("");
      $("probe").innerHTML = `<h2>Probe: which cut is best (linear head per cut; best: ${esc(best.model)} @ ${esc(best.layer)})</h2>` +
        `<table><tr><th>model</th><th>layer</th><th>dim</th><th>val accuracy</th><th>macro-F1</th><th>ms / image</th></tr>${rows}</table>` +
        `<img class="chart" alt="probe chart" src="/api/probe.png">`;
    }
    if (head) $("head").innerHTML = headHtml(head);
  } catch (e) { setMessage("probe-message", e.message, true); }
}

function headHtml(head) {
  const val = (head.metrics || {}).validation || {};
  const classes = head.classes || [], cm = val.confusion || [];
  const peak = Math.max(1, ...cm.flat().map(Number).filter(Number.isFinite));
  const cells = cm.map((row, i) => `<tr><th>${esc(classes[i])}</th>` + row.map((n) =>
    `<td style="background: rgba(37,99,235,${(Number(n) / peak * 0.8 || 0).toFixed(2)}); color: ${Number(n) / peak > 0.5 ? "#fff" : "inherit"}">${esc(n)}</td>`).join("") + "</tr>").join("");
  return `<h2>Head: ${esc((head.head || {}).type)} over ${esc((head.head || {}).input_dim)} features, ${classes.length} classes</h2>` +
    `<p>validation accuracy <b>${fmt(val.accuracy)}</b>, macro-F1 <b>${fmt(val.macro_f1)}</b> on ${esc(val.rows ?? "–")} rows</p>` +
    (cm.length ? `<table class="confusion"><tr><th>true \\ predicted</th>${classes.map((c) => `<th>${esc(c)}</th>`).join("")}</tr>${cells}</table>` : "");
}

// ---- runs ------------------------------------------------------------------------------------------------
async function loadRuns() {
  try {
    const { runs } = await api("/api/runs");
    const rows = runs.map((r, i) => {
      const c = r.counts || {}, kinds = Object.entries(r.error_kinds || {}).map(([k, v]) => `${esc(k)}=${esc(v)}`).join(", ");
      const plan = r.plan || {}, settings = plan.settings || {};
      return `<tr class="clickable" data-run="${i}"><td>${esc((r.started_at || "").slice(0, 19).replace("T", " "))}</td><td>${esc(r.kind)}</td>` +
        `<td>${esc(r.run_date ?? "")}</td><td class="num">${esc(c.inputs ?? "–")}</td><td class="num">${esc(c.embedded ?? "–")}</td>` +
        `<td class="num">${esc(c.failed ?? "–")}</td><td>${kinds}</td><td class="num">${fmt(r.images_per_s, 1)}</td>` +
        `<td>${esc(plan.precision ?? "")} ${settings.actors ? esc(settings.actors) + " actors" : ""}</td></tr>`;
    }).join("");
    $("runs").innerHTML = runs.length ? `<table><tr><th>started (UTC)</th><th>kind</th><th>run date</th><th>inputs</th><th>embedded</th>` +
      `<th>failed</th><th>failed by kind</th><th>images/s</th><th>plan</th></tr>${rows}</table>` : '<p class="muted">no runs recorded under _runs/</p>';
    for (const tr of document.querySelectorAll("#runs tr[data-run]")) tr.addEventListener("click", () => loadErrors(runs[Number(tr.dataset.run)]));
    if (runs.length) loadErrors(runs[0]);
  } catch (e) { $("runs").innerHTML = `<p class="message error">${esc(e.message)}</p>`; }
}

async function loadErrors(run) {
  const body = await api("/api/errors" + (run.run_date ? "?run_date=" + encodeURIComponent(run.run_date) : ""));
  $("errors-title").hidden = false;
  $("errors-title").textContent = `Error rows${run.run_date ? " of " + run.run_date : ""} (${Number(body.rows)})`;
  $("errors").innerHTML = body.rows ? `<table><tr><th>id</th><th>kind</th><th>message</th><th>source</th></tr>` +
    body.shown.map((r) => `<tr><td>${esc(r.id)}</td><td>${esc(r.error_kind)}</td><td>${esc(r.error_message)}</td><td>${esc(r.source)}</td></tr>`).join("") +
    "</table>" : '<p class="muted">no error rows: every image of the snapshot was embedded</p>';
}

const LOADERS = { duplicates: loadDuplicates, clusters: loadClusters, probe: loadProbe, runs: loadRuns };

async function start() {
  wireSearch();
  wireMap();
  $("threshold").addEventListener("input", () => state.dups && drawDuplicates());
  window.addEventListener("hashchange", route);
  route();
  for (let i = 0; i < 120 && !state.status; i++) {
    try { state.status = await api("/api/status"); } catch (e) {
      $("about").textContent = e.message;
      await new Promise((r) => setTimeout(r, 1000));
    }
  }
  const s = state.status;
  if (!s) return;
  $("about").textContent = `${s.output} · ${s.rows} rows · ${s.model ?? "?"} @ ${s.layer ?? "?"} (${s.pool ?? "?"}, ${s.dim}-d) · ` +
    (s.index ? `${s.index.kind} index of ${s.index.vectors} vectors` : "exact search") +
    (s.index_note ? ` (${s.index_note})` : "") +
    (s.upload.available ? "" : ` · search by image unavailable: ${s.upload.reason}`);
  route();
}

start();
