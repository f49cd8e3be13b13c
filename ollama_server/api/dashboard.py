"""The live dashboard: ``GET /dashboard`` (one self-contained page: inline CSS and JavaScript,
no external assets) and ``GET /dashboard/data`` (the JSON it polls every second).

When the service has API keys, the page asks for one once and keeps it in the tab
(``sessionStorage``, never in the URL), sending it with each poll of ``/dashboard/data``.

The page shows the loaded models (context, size, keep-alive expiry, engine pid and port, GPU
memory or "no GPU", requests waiting in the model's queue), the requests in flight with a
progress bar each (tokens generated against their limit), tokens/s, time to first token, dialect,
model and caller, the recent finished requests with status and latency, the totals, and tokens/s
over the last five minutes as an SVG chart.
"""

from __future__ import annotations

import base64
import hashlib
import time

from flask import Blueprint, Response, jsonify

from ..metrics import CHART_BIN_S, CHART_WINDOW_S, gpu_snapshot, throughput_series
from .handlers import services
from .monitoring import loaded_models_view, request_views

bp = Blueprint("dashboard", __name__)

STARTED_AT = time.time()  # process start, for the uptime shown in the header
RECENT_ROWS = 25


def dashboard_state() -> dict:
    """Everything the dashboard shows, as one JSON-ready dict."""
    svc = services()
    tracker = svc.tracker
    now = time.monotonic()
    gpu = gpu_snapshot()
    active = tracker.active()
    history = tracker.recent(limit=1_000_000)
    try:
        available = [info.name for info in svc.manager.list_models()]
    except Exception:  # noqa: BLE001 - the dashboard shows what it can
        available = []
    totals = tracker.totals_now()
    totals["in_flight"] = len(active)
    queues = svc.manager.queue.snapshot()
    totals["queued"] = sum(q["waiting"] for q in queues.values())
    totals["refused"] = sum(q["refused"] for q in queues.values())
    return {
        "time": time.time(),
        "uptime_s": round(time.time() - STARTED_AT, 1),
        "default_model": svc.manager.default_model_name(),
        "models_available": available,
        "models": loaded_models_view(gpu),
        "queues": queues,
        "max_queue": svc.config.max_queue,
        "gpu": None if gpu is None else gpu.to_dict(),
        "active": request_views(active),
        "recent": [s.to_dict() for s in history[:RECENT_ROWS]],
        "totals": totals,
        "throughput": {"bin_s": CHART_BIN_S, "window_s": CHART_WINDOW_S,
                       "tokens_per_second": throughput_series([*active, *history], now)},
    }


@bp.get("/dashboard/data")
def data() -> Response:
    """The dashboard's state (polled by the page every second)."""
    resp = jsonify(dashboard_state())
    resp.headers["Cache-Control"] = "no-store"
    return resp


@bp.get("/dashboard")
@bp.get("/dashboard/")
def page() -> Response:
    """The dashboard page."""
    resp = Response(PAGE, mimetype="text/html")
    resp.headers["Cache-Control"] = "no-store"
    # Request data (ids, key names, errors) is escaped before it is put in the page; should
    # some ever slip through, the browser still runs no script but the page's own, loads
    # nothing from elsewhere, and no other site can frame the page.
    resp.headers["Content-Security-Policy"] = CSP
    resp.headers["X-Content-Type-Options"] = "nosniff"
    return resp


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>ollama-server dashboard</title>
<style>
:root { --bg:#f4f6f9; --card:#fff; --fg:#1d2430; --muted:#5f6b7a; --line:#e2e6ec;
  --accent:#2563eb; --ok:#15803d; --warn:#b45309; --bad:#b91c1c; --bar:#dbe5f7; }
@media (prefers-color-scheme: dark) {
  :root { --bg:#0f141b; --card:#18202b; --fg:#e6ebf2; --muted:#96a2b3; --line:#2a3544;
    --accent:#60a5fa; --ok:#4ade80; --warn:#fbbf24; --bad:#f87171; --bar:#233247; } }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--fg);
  font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif; }
header { display:flex; flex-wrap:wrap; align-items:center; gap:8px 16px; padding:12px 20px;
  background:var(--card); border-bottom:1px solid var(--line); }
header h1 { font-size:18px; margin:0; }
.pill { padding:2px 10px; border-radius:99px; font-size:12px; font-weight:600;
  background:var(--bar); color:var(--accent); }
.pill.down { background:var(--bad); color:#fff; }
.meta { color:var(--muted); font-size:13px; }
main { padding:16px 20px; display:grid; gap:16px; max-width:1400px; margin:0 auto;
  grid-template-columns: minmax(0,1fr) minmax(0,1fr); }
section { background:var(--card); border:1px solid var(--line); border-radius:10px;
  padding:14px 16px; min-width:0; }
section.wide { grid-column: 1 / -1; }
h2 { font-size:13px; text-transform:uppercase; letter-spacing:.05em; color:var(--muted);
  margin:0 0 10px; }
.totals { display:grid; grid-template-columns:repeat(auto-fit,minmax(120px,1fr)); gap:10px; }
.stat b { display:block; font-size:24px; font-variant-numeric:tabular-nums; }
.stat span { color:var(--muted); font-size:12px; }
.stat.bad b { color:var(--bad); }
table { width:100%; border-collapse:collapse; font-variant-numeric:tabular-nums; }
th { text-align:left; font-weight:600; color:var(--muted); font-size:12px; }
th, td { padding:6px 8px; border-bottom:1px solid var(--line); vertical-align:middle; }
tr:last-child td { border-bottom:0; }
.empty { color:var(--muted); padding:6px 0; }
.mono { font-family:ui-monospace,"DejaVu Sans Mono",monospace; font-size:12px;
  white-space:nowrap; }
.badge { display:inline-block; padding:1px 8px; border-radius:99px; font-size:12px;
  font-weight:600; color:#fff; background:var(--muted); }
.badge.completed { background:var(--ok); } .badge.failed { background:var(--bad); }
.badge.cancelled { background:var(--warn); } .badge.generating { background:var(--accent); }
.req { border:1px solid var(--line); border-radius:8px; padding:10px 12px; margin-bottom:8px; }
.req .top { display:flex; flex-wrap:wrap; gap:4px 12px; align-items:center; }
.req .top .model { font-weight:600; }
.bar { height:12px; background:var(--bar); border-radius:6px; overflow:hidden; margin:8px 0 6px; }
.bar span { display:block; height:100%; background:var(--accent); transition:width .4s; }
.bar.open span { width:100% !important; opacity:.35;
  background:repeating-linear-gradient(45deg,var(--accent) 0 8px,transparent 8px 16px); }
.nums { display:flex; flex-wrap:wrap; gap:4px 16px; color:var(--muted); font-size:13px; }
.nums b { color:var(--fg); font-weight:600; }
.err { color:var(--bad); font-size:12px; overflow-wrap:anywhere; }
svg { width:100%; height:160px; display:block; }
#keyform { display:flex; flex-wrap:wrap; gap:8px; align-items:center; }
#keyform[hidden] { display:none; }
#keyform input { font:inherit; padding:4px 8px; border:1px solid var(--line); border-radius:6px;
  background:var(--bg); color:var(--fg); }
#keyform button { font:inherit; padding:4px 12px; border:0; border-radius:6px;
  background:var(--accent); color:#fff; cursor:pointer; }
.chart-axis { fill:var(--muted); font-size:11px; }
@media (max-width: 860px) {
  main { grid-template-columns: minmax(0,1fr); padding:12px; gap:12px; }
  header { padding:10px 12px; }
  table.cards thead { display:none; }
  table.cards tr { display:block; border:1px solid var(--line); border-radius:8px;
    padding:6px 10px; margin-bottom:8px; }
  table.cards td { display:flex; justify-content:space-between; gap:12px; border:0;
    padding:3px 0; text-align:right; }
  table.cards td::before { content:attr(data-label); color:var(--muted); text-align:left; }
}
</style>
</head>
<body>
<header>
  <h1>ollama-server</h1>
  <span id="conn" class="pill">connecting</span>
  <span class="meta" id="meta"></span>
  <form id="keyform" hidden>
    <label for="apikey">API key</label>
    <input id="apikey" type="password" autocomplete="off" required>
    <button type="submit">Show</button>
    <span class="err" id="keyerr"></span>
  </form>
</header>
<main>
  <section class="wide"><h2>Totals</h2><div class="totals" id="totals"></div></section>
  <section class="wide"><h2>Requests in flight</h2><div id="active"></div></section>
  <section><h2>Tokens per second, last 5 minutes</h2><div id="chart"></div></section>
  <section><h2>Loaded models</h2><div id="models"></div></section>
  <section class="wide"><h2>Recent requests</h2><div id="recent"></div></section>
</main>
<script>
"use strict";
const DATA_URL = location.pathname.replace(/\\/+$/, "") + "/data";
const $ = (id) => document.getElementById(id);
const esc = (v) => String(v ?? "").replace(/[&<>"']/g,
  (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
const num = (v, d = 0) => v == null ? "–" : Number(v).toLocaleString(undefined,
  {maximumFractionDigits: d, minimumFractionDigits: d});
function dur(s) {
  if (s == null) return "–";
  if (s < 1) return Math.round(s * 1000) + " ms";
  if (s < 60) return s.toFixed(1) + " s";
  const m = Math.floor(s / 60), h = Math.floor(m / 60);
  return h ? h + "h " + (m % 60) + "m" : m + "m " + Math.floor(s % 60) + "s";
}
function bytes(n) {
  if (n == null) return "–";
  const u = ["B", "KB", "MB", "GB", "TB"]; let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return n.toFixed(i ? 1 : 0) + " " + u[i];
}
const ms = (v) => v == null ? "–" :
  (v < 1000 ? Math.round(v) + " ms" : (v / 1000).toFixed(2) + " s");
const tps = (v) => v == null ? "–" : num(v, 1) + " tok/s";
function table(cols, rows, attrs) {
  if (!rows.length) return "";
  const head = "<thead><tr>" + cols.map((c) => "<th>" + esc(c[0]) + "</th>").join("") +
    "</tr></thead>";
  const body = rows.map((r, i) => "<tr " + (attrs ? attrs(r) : "") + ">" +
    cols.map((c) => '<td data-label="' + esc(c[0]) + '">' + c[1](r) + "</td>").join("") +
    "</tr>").join("");
  return '<table class="cards">' + head + "<tbody>" + body + "</tbody></table>";
}
function renderTotals(d) {
  const t = d.totals, series = d.throughput.tokens_per_second;
  const live = d.active.reduce((a, r) => a + (r.tokens_per_second || 0), 0);
  const stats = [["Requests", num(t.requests)], ["In flight", num(t.in_flight)],
    ["Queued", num(t.queued)], ["Refused (queue full)", num(t.refused), t.refused ? "bad" : ""],
    ["Generated tokens", num(t.generated_tokens)], ["Prompt tokens", num(t.prompt_tokens)],
    ["Errors", num(t.errors), t.errors ? "bad" : ""],
    ["Tokens/s now", num(live || series[series.length - 1] || 0, 1)]];
  $("totals").innerHTML = stats.map((s) => '<div class="stat ' + (s[2] || "") + '"><b>' +
    s[1] + "</b><span>" + s[0] + "</span></div>").join("");
}
function renderActive(d) {
  if (!d.active.length) { $("active").innerHTML = '<div class="empty">No requests running.</div>';
    return; }
  $("active").innerHTML = d.active.map((r) => {
    const pct = r.progress == null ? null : Math.round(r.progress * 1000) / 10;
    const limit = r.max_tokens ? " / " + num(r.max_tokens) : " (no limit)";
    return '<div class="req" data-request-id="' + esc(r.id) + '" data-state="' + esc(r.state) +
      '" data-tokens="' + r.tokens_generated + '">' +
      '<div class="top"><span class="model">' + esc(r.model) + "</span>" +
      '<span class="badge ' + esc(r.state) + '">' + esc(r.state) + "</span>" +
      "<span>" + esc(r.dialect) + " · " + esc(r.endpoint) + (r.stream ? " · stream" : "") +
      (r.caller ? " · key " + esc(r.caller) : "") +
      (r.queue_position ? " · place " + num(r.queue_position) + " of " + num(r.queue_length) +
        " in line" + (r.priority ? " (priority " + num(r.priority) + ")" : "") : "") +
      '</span><span class="mono">' + esc(r.id) + "</span></div>" +
      '<div class="bar' + (pct == null ? " open" : "") + '"><span style="width:' + (pct || 0) +
      '%"></span></div><div class="nums"><span><b class="tokens">' + num(r.tokens_generated) +
      "</b>" + limit + " tokens" + (pct == null ? "" : " (" + pct + "%)") + "</span>" +
      "<span>speed <b>" + tps(r.tokens_per_second) + "</b></span>" +
      "<span>first token <b>" + ms(r.ttft_ms) + "</b></span>" +
      (r.prompt_tokens ? "<span>prompt <b>" + num(r.prompt_tokens) + "</b></span>" : "") +
      "<span>elapsed <b>" + dur(r.elapsed_s) + "</b></span></div></div>";
  }).join("");
}
function renderModels(d) {
  const gpu = d.gpu ? d.gpu.devices.map((g) => esc(g.name) + " " + num(g.used_mib / 1024, 1) +
    " / " + num(g.total_mib / 1024, 1) + " GiB").join(", ") : "no GPU";
  const rows = table([
    ["Model", (m) => "<b>" + esc(m.name) + "</b>"],
    ["State", (m) => '<span class="badge ' + (m.state === "ready" ? "completed" :
      m.state === "failed" ? "failed" : "") + '">' + esc(m.state) + "</span>"],
    ["Context", (m) => num(m.context_length)],
    ["Size", (m) => bytes(m.size)],
    ["Queue", (m) => { const q = (d.queues || {})[m.name] || {};
      return num(q.waiting || 0) + " / " + num(d.max_queue) +
        (q.refused ? ' <span class="meta">' + num(q.refused) + " refused</span>" : ""); }],
    ["Keep-alive", (m) => m.in_flight ? "in use (" + m.in_flight + ")" :
      m.expires_in_s == null ? "never expires" : "expires in " + dur(m.expires_in_s)],
    ["Engine", (m) => m.pid ? '<span class="mono">pid ' + m.pid + "</span> " +
      '<span class="mono">port ' + m.port + "</span>" : "stopped"],
    ["GPU memory", (m) => m.gpu_memory_mib == null ? "no GPU" :
      num(m.gpu_memory_mib) + " MiB"],
    ["Devices", (m) => (m.devices || []).length ? (m.devices || []).map((v) =>
      '<div class="device" data-device="' + esc(v.endpoint || v.name) + '"><b>' +
      esc(v.name) + "</b>" + (v.endpoint ? ' <span class="mono">' + esc(v.endpoint) +
      "</span>" : "") + " weights " + num(v.weights_mib, 1) + " MiB · KV " +
      num(v.kv_mib, 1) + " MiB · compute " + num(v.compute_mib, 1) + " MiB</div>").join("")
      : "–"],
  ], d.models, (m) => 'data-model="' + esc(m.name) + '"');
  $("models").innerHTML = (rows || '<div class="empty">No model loaded.</div>') +
    '<div class="meta" style="margin-top:8px">GPU: ' + gpu + " · available: " +
    esc(d.models_available.join(", ") || "none") + "</div>";
}
function renderRecent(d) {
  const rows = table([
    ["Status", (r) => '<span class="badge ' + esc(r.state) + '">' + esc(r.state) + "</span>" +
      (r.error ? '<div class="err">' + esc(r.error) + "</div>" : "")],
    ["Model", (r) => esc(r.model)],
    ["API", (r) => esc(r.dialect) + ' <span class="meta">' + esc(r.endpoint) +
      (r.caller ? " · key " + esc(r.caller) : "") +
      (r.queue_position ? " · place " + num(r.queue_position) + " of " + num(r.queue_length) +
        " in line" + (r.priority ? " (priority " + num(r.priority) + ")" : "") : "") + "</span>"],
    ["Tokens", (r) => num(r.prompt_tokens) + " → " + num(r.tokens_generated) +
      (r.finish_reason ? ' <span class="meta">' + esc(r.finish_reason) + "</span>" : "")],
    ["Latency", (r) => dur(r.elapsed_s)],
    ["First token", (r) => ms(r.ttft_ms)],
    ["Speed", (r) => tps(r.tokens_per_second)],
    ["When", (r) => dur(Math.max(0, d.time - r.created - r.elapsed_s)) + " ago"],
    ["Id", (r) => '<span class="mono">' + esc(r.id.slice(0, 12)) + "</span>"],
  ], d.recent, (r) => 'data-request-id="' + esc(r.id) + '" data-state="' + esc(r.state) + '"');
  $("recent").innerHTML = rows || '<div class="empty">No finished requests yet.</div>';
}
function renderChart(d) {
  const s = d.throughput.tokens_per_second, W = 600, H = 160, L = 34, B = 18, T = 8;
  const max = Math.max(10, ...s) * 1.1, n = s.length;
  const x = (i) => L + (W - L - 4) * (n > 1 ? i / (n - 1) : 0);
  const y = (v) => T + (H - T - B) * (1 - v / max);
  const pts = s.map((v, i) => x(i).toFixed(1) + "," + y(v).toFixed(1)).join(" ");
  const grid = [0, 0.5, 1].map((f) => '<line x1="' + L + '" x2="' + (W - 4) + '" y1="' +
    y(max * f) + '" y2="' + y(max * f) + '" stroke="var(--line)"/><text class="chart-axis" x="' +
    (L - 4) + '" y="' + (y(max * f) + 4) + '" text-anchor="end">' + num(max * f) + "</text>");
  $("chart").innerHTML = '<svg viewBox="0 0 ' + W + " " + H + '" preserveAspectRatio="none"' +
    ' role="img" aria-label="tokens per second">' + grid.join("") +
    '<polygon fill="var(--accent)" fill-opacity=".15" points="' + x(0) + "," + y(0) + " " +
    pts + " " + x(n - 1) + "," + y(0) + '"/><polyline fill="none" stroke="var(--accent)"' +
    ' stroke-width="2" vector-effect="non-scaling-stroke" points="' + pts + '"/>' +
    '<text class="chart-axis" x="' + L + '" y="' + (H - 4) + '">-' +
    Math.round(d.throughput.window_s / 60) + ' min</text><text class="chart-axis" x="' +
    (W - 4) + '" y="' + (H - 4) + '" text-anchor="end">now</text></svg>';
}
function render(d) {
  renderTotals(d); renderActive(d); renderModels(d); renderRecent(d); renderChart(d);
  $("meta").textContent = "up " + dur(d.uptime_s) + " · default model " + d.default_model +
    " · updated " + new Date(d.time * 1000).toLocaleTimeString();
}
// The API key, when the service has keys: asked once, kept for this tab only (sessionStorage),
// sent in a header; never put in the URL.
const KEY_ITEM = "ollama-server-api-key";
function askForKey(message) {
  $("conn").textContent = "API key needed"; $("conn").className = "pill down";
  $("keyerr").textContent = message || "";
  $("keyform").hidden = false;
  $("apikey").focus();
}
$("keyform").addEventListener("submit", (ev) => {
  ev.preventDefault();
  sessionStorage.setItem(KEY_ITEM, $("apikey").value.trim());
  $("apikey").value = "";
  $("keyform").hidden = true;
  poll();
});
let timer = null;
async function poll() {
  clearTimeout(timer);
  const key = sessionStorage.getItem(KEY_ITEM);
  const headers = key ? {"Authorization": "Bearer " + key} : {};
  try {
    const resp = await fetch(DATA_URL, {cache: "no-store", headers});
    if (resp.status === 401) {
      sessionStorage.removeItem(KEY_ITEM);
      askForKey(key ? "that key was refused; try again" : "");
      return;  // polling resumes once a key is given
    }
    if (!resp.ok) throw new Error("HTTP " + resp.status);
    render(await resp.json());
    $("conn").textContent = "live"; $("conn").className = "pill";
  } catch (e) {
    $("conn").textContent = "disconnected: " + e.message; $("conn").className = "pill down";
  }
  timer = setTimeout(poll, 1000);
}
poll();
</script>
</body>
</html>
"""


def content_security_policy(page: str) -> str:
    """The page's Content-Security-Policy: its one inline script (by hash), inline styles,
    requests to this service only; nothing else (no images, frames, forms, other scripts).

    Injected markup gets no way to run: inline handlers and other scripts are refused.
    ``'unsafe-eval'`` adds none, as the page's script evaluates no strings; it lets tools that
    drive the page evaluate theirs (browser tests' ``wait_for_function("…")``).
    """
    script = page.split("<script>", 1)[1].split("</script>", 1)[0]
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    return (f"default-src 'none'; script-src 'sha256-{digest}' 'unsafe-eval'; "
            f"style-src 'unsafe-inline'; connect-src 'self'; base-uri 'none'; "
            f"form-action 'none'; frame-ancestors 'none'")


CSP = content_security_policy(PAGE)
