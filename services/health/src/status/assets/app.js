// llmesh status page: long-polls /status/api/state and redraws. No dependencies, no build step.
// Everything is put on the page as text (textContent), never as HTML: nothing the mesh reports
// can become markup. Widths are set through the CSSOM (the page's CSP forbids inline styles).
"use strict";

const HISTORY_MS = 15 * 60 * 1000;
const points = [];
let seq = 0;

// The charts: a title, how to format, and one or two series of the points.
const CHARTS = [
  { title: "requests/s", fmt: num, series: ["requests_per_s"] },
  { title: "error ratio", fmt: pct, series: ["error_ratio"] },
  { title: "latency p50 / p99", fmt: ms, series: ["p50_ms", "p99_ms"] },
  { title: "cache hit ratio (near / service)", fmt: pct, series: ["near_hit_ratio", "service_hit_ratio"] },
  { title: "rate limit: rejected/s / decided locally/s", fmt: num, series: ["ratelimit_rejected_per_s", "ratelimit_local_per_s"] },
  { title: "shed/s / fallbacks/s", fmt: num, series: ["shed_per_s", "fallbacks_per_s"] },
  { title: "queued jobs / dead letters", fmt: num, series: ["queued", "dead_letters"] },
];

function num(v) { return v == null ? "–" : v >= 100 ? v.toFixed(0) : v.toFixed(v >= 10 ? 1 : 2); }
function pct(v) { return v == null ? "–" : (100 * v).toFixed(1) + "%"; }
function ms(v) { return v == null ? "–" : v >= 1000 ? (v / 1000).toFixed(2) + " s" : v.toFixed(0) + " ms"; }
function usd(v) { return v == null ? "–" : "$" + v.toFixed(v >= 100 ? 0 : 4); }

// A DOM element with attributes and children (strings become text nodes).
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  for (const child of children) node.append(child instanceof Node ? child : String(child));
  return node;
}

function setRows(table, rows) {
  const body = document.querySelector(table + " tbody");
  body.replaceChildren(...rows);
}

function state(name) { return el("span", { class: "state", "data-state": name }, name.replace("_", "-")); }

function drawCharts() {
  const box = document.getElementById("charts");
  if (!box.children.length) {
    for (const chart of CHARTS) {
      const legend = chart.series.map((s, i) => el("span", { class: "k" + i, "data-value": s }, "–"));
      const parts = [];
      legend.forEach((span, i) => { if (i) parts.push(" / "); parts.push(span); });
      box.append(el("div", { class: "chart", "data-series": chart.series.join(" ") },
        el("div", { class: "title" }, chart.title), el("div", { class: "value" }, ...parts), svgBox()));
    }
  }
  // The last 15 minutes, or as much of them as there are points for (one minute at least).
  const now = points.length ? points[points.length - 1].t_ms : Date.now();
  const span = Math.min(HISTORY_MS, Math.max(60 * 1000, points.length ? now - points[0].t_ms : 0));
  CHARTS.forEach((chart, index) => {
    const node = box.children[index];
    const values = chart.series.map((s) => points.map((p) => p[s]));
    const max = Math.max(1e-9, ...values.flat().filter((v) => v != null));
    const lines = values.map((series, i) => {
      const xy = [];
      series.forEach((v, j) => {
        if (v == null) return;
        const x = 300 - ((now - points[j].t_ms) / span) * 300;
        xy.push(x.toFixed(1) + "," + (58 - (v / max) * 56).toFixed(1));
      });
      const line = document.createElementNS(SVG_NS, "polyline");
      line.setAttribute("class", "s" + i);
      line.setAttribute("points", xy.join(" "));
      return line;
    });
    node.querySelector("svg").replaceChildren(...lines);
    const last = points[points.length - 1] || {};
    chart.series.forEach((s, i) => { node.querySelectorAll("[data-value]")[i].textContent = chart.fmt(last[s]); });
  });
}

// The SVG namespace, spelled without a scheme so that the page names no other place.
const SVG_NS = ["http:", "", "www.w3.org", "2000", "svg"].join("/");
function svgBox() {
  const svg = document.createElementNS(SVG_NS, "svg");
  svg.setAttribute("viewBox", "0 0 300 60");
  svg.setAttribute("preserveAspectRatio", "none");
  return svg;
}

function drawTables(s) {
  const mesh = document.getElementById("mesh");
  mesh.textContent = s.mesh;
  mesh.dataset.status = s.mesh;
  setRows("#components", s.components.map((c) =>
    el("tr", { "data-component": c.name, "data-status": c.status },
      el("td", {}, c.name), el("td", { class: "detail" }, c.address),
      el("td", {}, el("span", { class: "pill", "data-status": c.status }, c.status)),
      el("td", {}, ms(c.latency_ms)), el("td", { class: "detail" }, c.detail))));
  setRows("#models", s.models.map((m) =>
    el("tr", { "data-model": m.model, "data-breaker": m.breaker },
      el("td", {}, m.model), el("td", { class: "detail" }, m.providers.join(", ")), el("td", {}, num(m.calls_per_s)), el("td", {}, pct(m.error_ratio)),
      el("td", {}, ms(m.p50_ms)), el("td", {}, ms(m.p99_ms)), el("td", {}, state(m.breaker)))));
  setRows("#replicas", s.replicas.map((r) =>
    el("tr", { "data-replica": r.endpoint, "data-breaker": r.breaker },
      el("td", {}, r.endpoint), el("td", {}, state(r.breaker)))));

  const budgets = document.getElementById("budgets");
  budgets.replaceChildren(...s.budgets.map((b) => {
    const share = b.limit_usd ? b.spent_usd / b.limit_usd : null;
    const fill = el("span");
    fill.style.width = share == null ? "0" : Math.min(100, 100 * share).toFixed(1) + "%";
    const level = share == null ? "none" : share >= 1 ? "over" : share >= 0.8 ? "warn" : "ok";
    return el("div", { class: "budget", "data-scope": b.scope, "data-name": b.name, "data-share": share == null ? "" : share.toFixed(4), "data-level": level },
      el("div", {}, el("strong", {}, b.scope + " " + b.name), " ", usd(b.spent_usd), " of ", usd(b.limit_usd),
        el("span", { class: "muted" }, share == null ? " (no limit)" : " (" + pct(share) + ")")),
      el("div", { class: "bar" }, fill));
  }));
  if (!s.budgets.length) budgets.replaceChildren(el("p", { class: "muted" }, "no budgets reported"));

  const queue = Object.entries(s.queue);
  document.getElementById("queue").replaceChildren(queue.length
    ? el("p", {}, ...queue.flatMap(([k, v]) => [el("strong", { "data-queue": k }, v.toFixed(0)), " " + k.replace("_", " ") + "  "]))
    : el("p", { class: "muted" }, "no queue reported"));
  document.getElementById("sources").replaceChildren(el("p", {}, ...s.sources.flatMap((src) =>
    [el("span", { class: "pill", "data-status": src.up ? "SERVING" : "NOT_SERVING" }, src.service), " "]),
    el("span", { class: "muted" }, " in flight: " + num(s.active_requests))));
}

async function poll() {
  const error = document.getElementById("error");
  for (;;) {
    try {
      const response = await fetch("/status/api/state?after=" + seq, { cache: "no-store" });
      if (!response.ok) throw new Error("the mesh answered " + response.status);
      const s = await response.json();
      if (s.seq < seq) points.length = 0; // the health service restarted
      for (const p of s.points) points.push(p);
      while (points.length && points[points.length - 1].t_ms - points[0].t_ms > HISTORY_MS) points.shift();
      seq = s.seq;
      drawTables(s);
      drawCharts();
      const updated = document.getElementById("updated");
      updated.dataset.seq = String(seq);
      updated.textContent = "updated " + new Date().toLocaleTimeString() + " · every " + s.interval_ms + " ms";
      error.hidden = true;
    } catch (e) {
      error.textContent = String(e.message || e);
      error.hidden = false;
      await new Promise((resolve) => setTimeout(resolve, 1000));
    }
  }
}

poll();
