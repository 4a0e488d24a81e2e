// ComfyUI-DRaFT frontend: a live reward chart on every DRaFT Trainer node.
//
// Data: the trainer sends websocket events (nodes/progress_events.py)
//   draft.started  {node, run, total, rewards, heldout?}  -> a new run: the chart is cleared
//   draft.progress {node, run, iteration, total, reward, reward_ma, skipped, sec_per_iter, eta_s, saved}
//   draft.heldout  {node, run, iteration, figures: {key: number|null}, series: [{key, label, kind}],
//                   ranking, best_iteration, stop_reason}     -> one held-out evaluation
//   draft.finished {node, run, status, saved, stop_reason?}
// (heldout: null or {series, ranking, evaluations: [{iteration, figures}], best_iteration, best,
// keep, stop_reason}, a resumed run's held-out history; runs without the held-out check send none.)
// and GET /draft/status returns the latest state of every trainer node, fetched on page load (so
// a reload during training redraws the chart), after a websocket reconnect, and whenever an
// event shows that points were missed. States are kept per node id (the execution id the server
// reports, String(node.id) for nodes on the root graph); each node draws only its own.
//
// The chart is a canvas-drawn widget (drawn by LiteGraph with the node, so it scales with zoom
// and shows in canvas screenshots). node.draftChart exposes the data: rewards, ma, iteration, ...,
// heldout. Held-out figures are drawn over the same update axis, each series scaled to its own
// range (their units differ: PickScore, the training reward, a cosine similarity).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const TRAINER = "DRaFTTrainer";
const MA_WINDOW = 10; // same trailing window as training/plot.py:moving_average
const CHART_WIDGET = "draft_reward_chart";
const COLORS = { reward: "#5fa8ff", ma: "#ffa64d", skip: "#ff5c5c" };
// Held-out series by key (apart from the reward, mean and skip colours); unknown keys cycle EXTRA.
const HELDOUT_COLORS = {
  judge1: "#4be38a", judge2: "#c18cff", judge3: "#ff6fcf", reward: "#2ad4d4", similarity: "#e8d84a",
};
const HELDOUT_EXTRA = ["#a0e060", "#ff9e9e", "#9ec1ff"];

// ------------------------------------------------------------------------------------------
// Run states, per trainer node id
// ------------------------------------------------------------------------------------------
const runs = new Map();
let version = 0; // bumped on every change (tests and redraws)

function freshState(node, run) {
  return {
    node, run, status: "running", iteration: 0, total: 0, rewards: [], skipped: 0,
    sec_per_iter: null, eta_s: null, saved: null,
    heldout: null, // {series, ranking, evaluations: [{iteration, figures}] (by iteration), best_iteration, ...}
    stop_reason: "",
    restored: 0, // points that came from /draft/status
    live: 0, // draft.progress events received for this run since the page loaded
    updated: Date.now(), _ma: null,
  };
}

function finite(v) {
  return typeof v === "number" && Number.isFinite(v);
}

function movingAverage(values, window = MA_WINDOW) {
  const out = [];
  const buf = [];
  let sum = 0;
  for (const v of values) {
    if (finite(v)) {
      buf.push(v);
      sum += v;
      if (buf.length > window) sum -= buf.shift();
    }
    out.push(buf.length ? sum / buf.length : null);
  }
  return out;
}

function maOf(state) {
  if (!state._ma || state._ma.n !== state.rewards.length || state._ma.v !== state.version) {
    state._ma = { n: state.rewards.length, v: state.version, values: movingAverage(state.rewards) };
  }
  return state._ma.values;
}

// -- held-out evaluations ------------------------------------------------------------------------
function cleanSeries(list) {
  return (Array.isArray(list) ? list : [])
    .filter((s) => s && typeof s.key === "string")
    .map((s) => ({ key: s.key, label: String(s.label ?? s.key), kind: String(s.kind ?? "") }));
}

function cleanFigures(figures) {
  const out = {};
  for (const [k, v] of Object.entries(figures ?? {})) out[k] = finite(v) ? v : null;
  return out;
}

function ensureHeldout(state) {
  state.heldout ??= { series: [], ranking: null, evaluations: [], best_iteration: null, best: null,
                      keep: null, stop_reason: "" };
  return state.heldout;
}

/** Puts the evaluation of update `iteration` in place (evaluations stay sorted by iteration);
 * an existing one is replaced only when `replace`. */
function putEvaluation(h, iteration, figures, replace) {
  if (!finite(iteration)) return;
  const evs = h.evaluations;
  let i = evs.length;
  while (i > 0 && evs[i - 1].iteration > iteration) i--;
  if (i > 0 && evs[i - 1].iteration === iteration) {
    if (replace) evs[i - 1] = { iteration, figures: cleanFigures(figures) };
    return;
  }
  evs.splice(i, 0, { iteration, figures: cleanFigures(figures) });
}

function lastIteration(evaluations) {
  let last = -1;
  for (const e of evaluations ?? []) if (finite(e?.iteration) && e.iteration > last) last = e.iteration;
  return last;
}

/** A held-out summary (draft.started, /draft/status) merged into `state`: its evaluations fill in
 * the ones missing; its series, best and stop reason count when it is at least as recent. */
function mergeHeldout(state, summary) {
  if (!summary || typeof summary !== "object") return;
  const h = ensureHeldout(state);
  const evaluations = Array.isArray(summary.evaluations) ? summary.evaluations : [];
  const newer = lastIteration(evaluations) >= lastIteration(h.evaluations);
  const series = cleanSeries(summary.series);
  if (series.length && (newer || !h.series.length)) h.series = series;
  if (summary.ranking && (newer || !h.ranking)) h.ranking = String(summary.ranking);
  for (const e of evaluations) if (e) putEvaluation(h, e.iteration, e.figures, false);
  if (newer) {
    if ("best_iteration" in summary) h.best_iteration = finite(summary.best_iteration) ? summary.best_iteration : null;
    if ("best" in summary) h.best = summary.best ?? null;
    if ("keep" in summary) h.keep = summary.keep ?? null;
    if (summary.stop_reason) h.stop_reason = String(summary.stop_reason);
  }
}

/** The series to draw: the server's list, or (without one) the keys the figures carry. */
function seriesOf(h) {
  if (!h) return [];
  if (h.series.length) return h.series;
  const keys = new Set();
  for (const e of h.evaluations) for (const k of Object.keys(e.figures)) keys.add(k);
  return [...keys].sort().map((key) => ({
    key, label: key, kind: key === "similarity" ? "similarity" : key.startsWith("judge") ? "judge" : "reward",
  }));
}

function stopReasonOf(state) {
  return state?.stop_reason || state?.heldout?.stop_reason || "";
}

function touch(state) {
  state.updated = Date.now();
  state.version = ++version;
  redraw();
}

let redrawQueued = false;
function redraw() {
  if (redrawQueued) return;
  redrawQueued = true;
  requestAnimationFrame(() => {
    redrawQueued = false;
    app.canvas?.setDirty(true, false);
  });
}

// -- /draft/status -----------------------------------------------------------------------------
let fetching = null;
let refetchWanted = false;

async function fetchStatus() {
  if (fetching) {
    refetchWanted = true;
    return fetching;
  }
  const started = Date.now();
  fetching = (async () => {
    try {
      const resp = await api.fetchApi("/draft/status", { cache: "no-store" });
      if (!resp.ok) return;
      const all = await resp.json();
      for (const [node, entry] of Object.entries(all ?? {})) mergeStatus(node, entry, started);
    } catch (err) {
      console.warn("[DRaFT] could not fetch /draft/status:", err);
    } finally {
      fetching = null;
      if (refetchWanted) {
        refetchWanted = false;
        fetchStatus();
      }
    }
  })();
  return fetching;
}

function mergeStatus(node, entry, fetchStarted) {
  if (!entry || typeof entry !== "object" || !entry.run) return;
  let state = runs.get(node);
  if (state && state.run !== entry.run) {
    // A live event of another run arrived after this request left: that run is newer.
    if (state.updated > fetchStarted && state.live > 0) return;
    state = null;
  }
  if (!state) {
    state = freshState(node, entry.run);
    runs.set(node, state);
  }
  const rewards = Array.isArray(entry.rewards) ? entry.rewards : [];
  for (let i = 0; i < rewards.length; i++) {
    if (state.rewards[i] === undefined) {
      state.rewards[i] = finite(rewards[i]) ? rewards[i] : null;
      state.restored++;
    }
  }
  if ((entry.iteration ?? 0) >= state.iteration) {
    state.iteration = entry.iteration ?? state.iteration;
    state.total = entry.total ?? state.total;
    state.skipped = entry.skipped ?? state.skipped;
    state.sec_per_iter = entry.sec_per_iter ?? state.sec_per_iter;
    state.eta_s = entry.eta_s ?? state.eta_s;
  }
  if (entry.saved) state.saved = entry.saved;
  if (entry.text) state.text = entry.text; // the trainer's result line, for reloaded pages
  if (entry.heldout) mergeHeldout(state, entry.heldout);
  if (entry.stop_reason) state.stop_reason = String(entry.stop_reason);
  // The server's status only moves from "running" to "finished"/"interrupted".
  if (entry.status && entry.status !== "running") state.status = entry.status;
  touch(state);
}

// -- websocket events ----------------------------------------------------------------------------
function onStarted({ detail }) {
  if (!detail?.node) return;
  const state = freshState(String(detail.node), detail.run);
  state.total = detail.total ?? 0;
  state.rewards = (detail.rewards ?? []).map((v) => (finite(v) ? v : null));
  state.iteration = state.rewards.length;
  if (detail.heldout) mergeHeldout(state, detail.heldout);
  runs.set(state.node, state);
  touch(state);
}

// The state of the run an event belongs to; a run we did not see start gets a fresh one (its
// history is filled in from the server: fetchStatus).
function runOf(detail) {
  const node = String(detail.node);
  let state = runs.get(node);
  const fresh = !state || state.run !== detail.run;
  if (fresh) {
    state = freshState(node, detail.run);
    runs.set(node, state);
  }
  return { state, fresh };
}

function onProgress({ detail }) {
  if (!detail?.node) return;
  const { state } = runOf(detail);
  const i = (detail.iteration ?? state.rewards.length + 1) - 1;
  if (i > state.rewards.length) {
    for (let j = state.rewards.length; j < i; j++) state.rewards[j] = undefined;
    fetchStatus(); // events were missed (page opened mid-run, reconnect): get the history
  }
  state.rewards[i] = finite(detail.reward) ? detail.reward : null;
  state.iteration = detail.iteration ?? i + 1;
  state.total = detail.total ?? state.total;
  state.skipped = detail.skipped ?? state.skipped;
  state.sec_per_iter = detail.sec_per_iter ?? null;
  state.eta_s = detail.eta_s ?? null;
  if (detail.saved) state.saved = detail.saved;
  state.status = "running";
  state.live++;
  touch(state);
}

function onHeldout({ detail }) {
  if (!detail?.node) return;
  const { state, fresh } = runOf(detail);
  if (fresh) fetchStatus();
  const h = ensureHeldout(state);
  const series = cleanSeries(detail.series);
  if (series.length) h.series = series;
  if (detail.ranking) h.ranking = String(detail.ranking);
  putEvaluation(h, detail.iteration, detail.figures, true);
  if ("best_iteration" in detail) h.best_iteration = finite(detail.best_iteration) ? detail.best_iteration : null;
  if (detail.stop_reason) h.stop_reason = String(detail.stop_reason);
  touch(state);
}

function onFinished({ detail }) {
  if (!detail?.node) return;
  const state = runs.get(String(detail.node));
  if (!state || state.run !== detail.run) {
    fetchStatus();
    return;
  }
  state.status = detail.status ?? "finished";
  if (detail.saved) state.saved = detail.saved;
  if (detail.stop_reason) state.stop_reason = String(detail.stop_reason);
  state.eta_s = 0;
  touch(state);
}

// Registered at import time, before the websocket delivers anything (unregistered custom event
// types are reported as "Unknown message type" by the frontend).
api.addEventListener("draft.started", onStarted);
api.addEventListener("draft.progress", onProgress);
api.addEventListener("draft.heldout", onHeldout);
api.addEventListener("draft.finished", onFinished);
api.addEventListener("reconnected", () => fetchStatus());

// ------------------------------------------------------------------------------------------
// Which state belongs to a node
// ------------------------------------------------------------------------------------------
function stateKey(node) {
  if (node?.id == null || node.id === -1) return null;
  const id = String(node.id);
  const root = app.graph?.rootGraph ?? app.graph;
  if (!node.graph || !root || node.graph === root) return id;
  // Inside a subgraph the server reports "<subgraph node id>:...:<id>": the execution ids of every
  // instance of this subgraph; the one with the newest state wins.
  const keys = [];
  const walk = (graph, prefix, depth) => {
    for (const n of graph?.nodes ?? []) {
      if (!n.subgraph) continue;
      if (n.subgraph === node.graph) keys.push(`${prefix}${n.id}:${id}`);
      if (depth < 8) walk(n.subgraph, `${prefix}${n.id}:`, depth + 1);
    }
  };
  walk(root, "", 0);
  let best = keys[0] ?? id;
  for (const key of keys) {
    if ((runs.get(key)?.updated ?? -1) > (runs.get(best)?.updated ?? -1)) best = key;
  }
  return best;
}

function stateFor(node) {
  const key = stateKey(node);
  return key == null ? null : runs.get(key) ?? null;
}

/** What a trainer node shows; tests read it as node.draftChart. */
class DraftChart {
  constructor(node) {
    this.node = node;
    this._text = { text: "", run: null }; // the trainer's UI text (onExecuted), for one run
  }
  /** The trainer's UI text, while the run it came from is the one shown. */
  get text() {
    if (this._text.run === this.run && this._text.text) return this._text.text;
    return this.state?.text ?? "";
  }
  set text(value) { this._text = { text: value ?? "", run: this.run }; }
  get key() { return stateKey(this.node); }
  get state() { return stateFor(this.node); }
  get run() { return this.state?.run ?? null; }
  get status() { return this.state?.status ?? null; }
  get rewards() { return this.state ? Array.from(this.state.rewards, (v) => (v === undefined ? null : v)) : []; }
  get ma() { return this.state ? maOf(this.state).slice() : []; }
  get iteration() { return this.state?.iteration ?? 0; }
  get total() { return this.state?.total ?? 0; }
  get skipped() { return this.state?.skipped ?? 0; }
  get secPerIter() { return this.state?.sec_per_iter ?? null; }
  get etaS() { return this.state?.eta_s ?? null; }
  get saved() { return this.state?.saved ?? null; }
  get restored() { return this.state?.restored ?? 0; }
  get live() { return this.state?.live ?? 0; }
  get lines() { return infoLines(this.state, this.text); }
  /** The held-out check's data, or null for a run without one. */
  get heldout() {
    const h = this.state?.heldout;
    if (!h) return null;
    return {
      series: seriesOf(h).map((s) => ({ ...s })), ranking: h.ranking,
      evaluations: h.evaluations.map((e) => ({ iteration: e.iteration, figures: { ...e.figures } })),
      best_iteration: h.best_iteration, best: h.best, keep: h.keep, stop_reason: stopReasonOf(this.state),
    };
  }
  get stopReason() { return stopReasonOf(this.state); }
  /** Where the last draw put things (node coordinates): {plot: {l, r, t, b}, legend, best_x, ...}. */
  get layout() { return this._layout ?? null; }
}

// ------------------------------------------------------------------------------------------
// Drawing
// ------------------------------------------------------------------------------------------
function fmtDuration(s) {
  if (!finite(s)) return "?";
  s = Math.max(0, Math.round(s));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const sec = s % 60;
  if (h) return `${h}h ${String(m).padStart(2, "0")}m`;
  if (m) return `${m}m ${String(sec).padStart(2, "0")}s`;
  return `${sec}s`;
}

function fmtSpi(s) {
  if (!finite(s)) return "? s/it";
  return s >= 10 ? `${s.toFixed(0)} s/it` : s >= 1 ? `${s.toFixed(2)} s/it` : `${(1 / s).toFixed(2)} it/s`;
}

function fmtNum(v, step) {
  if (!finite(v)) return "-";
  if (v !== 0 && (Math.abs(v) >= 1e5 || Math.abs(v) < 1e-4)) return v.toExponential(1);
  // Enough decimals for `step` (axis ticks: 1, 2 or 5 x 10^k) or, without one, 4 significant digits.
  const digits = step
    ? Math.max(0, Math.min(6, -Math.floor(Math.log10(step) + 1e-9)))
    : Math.max(0, Math.min(6, 3 - Math.floor(Math.log10(Math.abs(v) || 1))));
  return v.toFixed(digits);
}

function shortPath(p) {
  // Absolute paths from the server: show them from models/loras on (the end is what matters).
  const parts = String(p).split(/[\\/]models[\\/]loras[\\/]/);
  return parts.length > 1 ? "models/loras/" + parts[parts.length - 1] : String(p);
}

function infoLines(state, text) {
  const lines = [];
  if (state) {
    const last = state.rewards.length ? state.rewards[state.rewards.length - 1] : null;
    const ma = maOf(state);
    const lastMa = ma.length ? ma[ma.length - 1] : null;
    let l1 = `iteration ${state.iteration} / ${state.total || "?"}`;
    if (state.status === "running" && !finite(state.sec_per_iter)) l1 += "  ·  starting";
    else if (state.status === "running") l1 += `  ·  ${fmtSpi(state.sec_per_iter)}  ·  ${fmtDuration(state.eta_s)} left`;
    else l1 += `  ·  ${state.status}${finite(state.sec_per_iter) ? "  ·  " + fmtSpi(state.sec_per_iter) : ""}`;
    lines.push(l1);
    lines.push(`reward ${fmtNum(last)}  ·  mean of ${MA_WINDOW} ${fmtNum(lastMa)}  ·  skipped (NaN) ${state.skipped}`);
    lines.push(state.saved ? `saved: ${shortPath(state.saved)}`
      : state.status === "running" ? "saved: not yet (save_every of DRaFT Save & Preview, or Cancel)"
      : "saved: no file from the trainer (DRaFT Save LoRA writes the result)");
    const stop = stopReasonOf(state);
    if (stop) lines.push(`stopped: ${stop}`);
  }
  else {
    lines.push("iteration - / -  ·  no run yet");
    lines.push(`reward -  ·  mean of ${MA_WINDOW} -  ·  skipped (NaN) -`);
    lines.push("saved: -");
  }
  if (text) lines.push(text);
  return lines;
}

/** Per pixel column of the finite values: {first, i (last index), lo, hi, last}, or null. */
function columns(values, cols) {
  const n = values.length;
  const out = new Array(cols).fill(null);
  for (let i = 0; i < n; i++) {
    const v = values[i];
    if (!finite(v)) continue;
    const c = Math.min(cols - 1, Math.floor((i * cols) / n));
    const o = out[c];
    if (!o) out[c] = { first: i, i, lo: v, hi: v, last: v };
    else {
      if (v < o.lo) o.lo = v;
      if (v > o.hi) o.hi = v;
      o.last = v;
      o.i = i;
    }
  }
  return out;
}

function niceStep(range, count) {
  const raw = range / Math.max(1, count);
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const norm = raw / mag;
  return (norm < 1.5 ? 1 : norm < 3.5 ? 2 : norm < 7.5 ? 5 : 10) * mag;
}

function ellipsize(ctx, text, width) {
  if (ctx.measureText(text).width <= width) return text;
  let lo = 0;
  let hi = text.length;
  while (lo < hi) { // keep the end of the text (file names end with the interesting part)
    const mid = (lo + hi) >> 1;
    if (ctx.measureText("…" + text.slice(text.length - mid)).width <= width) lo = mid + 1;
    else hi = mid;
  }
  return "…" + text.slice(text.length - Math.max(0, lo - 1));
}

const LINE_H = 15;
const HEADER_H = 20;
const AXIS_H = 28;
const MIN_PLOT_H = 130;
const LEGEND_H = 14; // a held-out legend row
const BEST_LABEL_H = 13; // the strip above the plot for "best: update N"

function heldoutColor(key, index) {
  return HELDOUT_COLORS[key] ?? HELDOUT_EXTRA[index % HELDOUT_EXTRA.length];
}

/** Rows of the held-out legend: a heading and one per series (0 without a held-out check). */
function legendRows(state) {
  const n = seriesOf(state?.heldout).length;
  return n ? n + 1 : 0;
}

let measureCtx = null;
function measuring(font) {
  measureCtx ??= document.createElement("canvas").getContext("2d");
  measureCtx.font = font;
  return measureCtx;
}

/** The footer's rows: the info lines, a long stop reason wrapped over two rows (its start says
 * what fell, its end which update was kept); other long lines are ellipsized when drawn. */
function footerRows(ctx, lines, width) {
  const rows = [];
  for (const raw of lines) {
    const l = String(raw).replace(/\s*\n\s*/g, "  ");
    if (!l.startsWith("stopped: ") || ctx.measureText(l).width <= width) {
      rows.push(l);
      continue;
    }
    const words = l.split(" ");
    let first = words[0];
    let k = 1;
    while (k < words.length && ctx.measureText(first + " " + words[k]).width <= width) first += " " + words[k++];
    rows.push(first, "  " + words.slice(k).join(" "));
  }
  return rows;
}

/** Ellipsizes the end of `text` to `width` (labels: their start says what they are). */
function clipEnd(ctx, text, width) {
  if (ctx.measureText(text).width <= width) return text;
  let lo = 0;
  let hi = text.length;
  while (lo < hi) {
    const mid = (lo + hi + 1) >> 1;
    if (ctx.measureText(text.slice(0, mid) + "…").width <= width) lo = mid;
    else hi = mid - 1;
  }
  return text.slice(0, lo) + "…";
}

function lastFinite(evaluations, key) {
  for (let i = evaluations.length - 1; i >= 0; i--) {
    const v = evaluations[i].figures[key];
    if (finite(v)) return v;
  }
  return null;
}

/** The held-out curves (each series scaled to its own min..max), dashed, with dots at the
 * evaluations when there is room, and the best evaluation's marker. Returns the marker's x. */
function drawHeldout(ctx, h, plot, XU) {
  const series = seriesOf(h);
  const evs = h.evaluations;
  const W = plot.r - plot.l;
  let bestX = null;
  if (finite(h.best_iteration)) {
    const ranking = Math.max(0, series.findIndex((s) => s.key === h.ranking));
    const color = heldoutColor(series[ranking]?.key, ranking);
    bestX = Math.round(XU(h.best_iteration));
    ctx.strokeStyle = color;
    ctx.lineWidth = 2;
    ctx.setLineDash([]);
    ctx.beginPath();
    ctx.moveTo(bestX, plot.t);
    ctx.lineTo(bestX, plot.b);
    ctx.stroke();
  }
  const dense = evs.length > W / 2; // one column per pixel: min..max of the points in it
  const spread = evs.length > 1 ? (XU(evs[evs.length - 1].iteration) - XU(evs[0].iteration)) / (evs.length - 1) : W;
  const dots = !dense && spread >= 7;
  series.forEach((s, idx) => {
    let lo = Infinity;
    let hi = -Infinity;
    for (const e of evs) {
      const v = e.figures[s.key];
      if (!finite(v)) continue;
      if (v < lo) lo = v;
      if (v > hi) hi = v;
    }
    if (lo > hi) return;
    const span = hi - lo > 1e-12 ? hi - lo : 0;
    const Y = (v) => plot.b - (plot.b - plot.t) * (0.07 + 0.86 * (span ? (v - lo) / span : 0.5));
    const color = heldoutColor(s.key, idx);
    ctx.strokeStyle = color;
    ctx.fillStyle = color;
    ctx.lineWidth = 1.75;
    ctx.lineJoin = "round";
    ctx.setLineDash([6, 4]);
    ctx.beginPath();
    let pen = false;
    let col = null; // dense: {c, x, lo, hi, last}
    const to = (px, py) => {
      if (pen) ctx.lineTo(px, py);
      else ctx.moveTo(px, py);
      pen = true;
    };
    const flush = () => {
      if (!col) return;
      to(col.x, col.first);
      if (col.hi !== col.lo) {
        to(col.x, col.lo);
        to(col.x, col.hi);
      }
      to(col.x, col.last);
      col = null;
    };
    let count = 0;
    for (const e of evs) {
      const v = e.figures[s.key];
      if (!finite(v)) {
        flush();
        pen = false;
        continue;
      }
      count++;
      const px = XU(e.iteration);
      const py = Y(v);
      if (!dense) to(px, py);
      else if (col && col.c === Math.floor(px)) {
        col.lo = Math.min(col.lo, py);
        col.hi = Math.max(col.hi, py);
        col.last = py;
      } else {
        flush();
        col = { c: Math.floor(px), x: px, first: py, lo: py, hi: py, last: py };
      }
    }
    flush();
    ctx.stroke();
    ctx.setLineDash([]);
    if (dots || count === 1) {
      for (const e of evs) {
        const v = e.figures[s.key];
        if (!finite(v)) continue;
        ctx.beginPath();
        ctx.arc(XU(e.iteration), Y(v), 3, 0, Math.PI * 2);
        ctx.fill();
      }
    }
  });
  ctx.setLineDash([]);
  return bestX;
}

/** The best marker's label, in the strip above the plot (so that it hides no point). */
function drawBestLabel(ctx, h, plot, bestX, font) {
  const series = seriesOf(h);
  const ranking = Math.max(0, series.findIndex((s) => s.key === h.ranking));
  const color = heldoutColor(series[ranking]?.key, ranking);
  ctx.strokeStyle = color;
  ctx.lineWidth = 2;
  ctx.beginPath();
  ctx.moveTo(bestX, plot.t - BEST_LABEL_H + 2);
  ctx.lineTo(bestX, plot.t);
  ctx.stroke();
  ctx.font = `10px ${font}`;
  const label = `best: update ${h.best_iteration}`;
  const tw = ctx.measureText(label).width;
  ctx.fillStyle = color;
  ctx.textBaseline = "middle";
  ctx.textAlign = "left";
  ctx.fillText(label, bestX + 4 + tw <= plot.r + 8 ? bestX + 4 : bestX - 4 - tw, plot.t - BEST_LABEL_H / 2);
}

/** The held-out legend: a heading, then each series' colour, label and last value. */
function drawLegend(ctx, state, x, top, width, font, text, dim) {
  const h = state.heldout;
  const series = seriesOf(h);
  const last = h.evaluations.length ? h.evaluations[h.evaluations.length - 1].iteration : null;
  ctx.textAlign = "left";
  ctx.textBaseline = "middle";
  ctx.font = `10px ${font}`;
  ctx.fillStyle = dim;
  let yy = top + LEGEND_H / 2;
  const heading = "held-out check (dashed: each scaled to its own range)"
    + (last != null ? `  ·  last: update ${last}` : "  ·  no evaluation yet")
    + (finite(h.best_iteration) ? `  ·  best: update ${h.best_iteration}` : "");
  ctx.fillText(clipEnd(ctx, heading, width), x, yy);
  series.forEach((s, idx) => {
    yy += LEGEND_H;
    const color = heldoutColor(s.key, idx);
    ctx.strokeStyle = color;
    ctx.fillStyle = color;
    ctx.lineWidth = 1.75;
    ctx.setLineDash([5, 3]);
    ctx.beginPath();
    ctx.moveTo(x, yy);
    ctx.lineTo(x + 18, yy);
    ctx.stroke();
    ctx.setLineDash([]);
    ctx.beginPath();
    ctx.arc(x + 9, yy, 2.5, 0, Math.PI * 2);
    ctx.fill();
    ctx.font = `11px ${font}`;
    const value = fmtNum(lastFinite(h.evaluations, s.key));
    const label = s.kind === "similarity" ? `${s.label} ↓ lower is better` : s.label;
    const vw = ctx.measureText(value).width;
    const shown = clipEnd(ctx, label, Math.max(20, width - 26 - vw - 10));
    ctx.fillStyle = dim;
    ctx.fillText(shown, x + 24, yy);
    ctx.fillStyle = text;
    ctx.fillText(value, x + 24 + ctx.measureText(shown).width + 8, yy);
  });
}

function drawChart(ctx, node, width, y, height, chart, lowQuality) {
  const LG = window.LiteGraph ?? {};
  const text = LG.WIDGET_TEXT_COLOR ?? "#ddd";
  const dim = LG.WIDGET_SECONDARY_TEXT_COLOR ?? "#999";
  const state = chart.state;
  const lines = infoLines(state, chart.text);

  const x0 = 10;
  const y0 = y + 4;
  const w = Math.max(40, width - 20);
  const h = Math.max(40, height - 8);
  ctx.save();
  ctx.fillStyle = LG.WIDGET_BGCOLOR ?? "#222";
  ctx.strokeStyle = LG.WIDGET_OUTLINE_COLOR ?? "#666";
  ctx.lineWidth = 1;
  ctx.beginPath();
  if (ctx.roundRect) ctx.roundRect(x0, y0, w, h, 6);
  else ctx.rect(x0, y0, w, h);
  ctx.fill();
  ctx.stroke();
  ctx.beginPath();
  ctx.rect(x0, y0, w, h);
  ctx.clip();

  const font = LG.NODE_FONT ?? "Arial";
  ctx.font = `11px ${font}`;
  const rows = footerRows(ctx, lines, w - 16);
  const footerH = rows.length * LINE_H + 6;
  const held = state?.heldout && seriesOf(state.heldout).length ? state.heldout : null;
  const legendH = legendRows(state) * LEGEND_H;
  const labelH = held ? BEST_LABEL_H : 0;
  const plot = { l: x0 + 50, r: x0 + w - 12, t: y0 + HEADER_H + 6 + labelH, b: y0 + h - footerH - AXIS_H - legendH };
  const rewards = state ? state.rewards : [];
  const ma = state ? maOf(state) : [];
  const n = rewards.length;
  // With held-out figures, update 0 (the base model) takes one more slot left of update 1.
  const off = held ? 1 : 0;
  const xMax = Math.max(state?.total || 0, n, held ? lastIteration(held.evaluations) : 0, 2);
  const layout = { plot, legend: held ? { t: plot.b + AXIS_H, b: plot.b + AXIS_H + legendH } : null,
                   footer: { t: y0 + h - footerH, b: y0 + h }, rows, best_x: null, x_of: null };
  chart._layout = layout;

  if (!lowQuality) {
    ctx.font = `bold 12px ${font}`;
    ctx.fillStyle = text;
    ctx.textBaseline = "middle";
    ctx.textAlign = "left";
    ctx.fillText("Reward per iteration", x0 + 8, y0 + HEADER_H / 2 + 2);
    // legend
    ctx.font = `11px ${font}`;
    ctx.textAlign = "right";
    let lx = x0 + w - 8;
    for (const [label, color, lw] of [[`mean of ${MA_WINDOW}`, COLORS.ma, 2.5], ["reward", COLORS.reward, 1.5]]) {
      ctx.fillStyle = dim;
      ctx.fillText(label, lx, y0 + HEADER_H / 2 + 2);
      lx -= ctx.measureText(label).width + 5;
      ctx.strokeStyle = color;
      ctx.lineWidth = lw;
      ctx.beginPath();
      ctx.moveTo(lx - 16, y0 + HEADER_H / 2 + 2);
      ctx.lineTo(lx, y0 + HEADER_H / 2 + 2);
      ctx.stroke();
      lx -= 28;
    }
  }

  if (plot.b - plot.t > 20 && plot.r - plot.l > 20) {
    const vals = [];
    for (let i = 0; i < n; i++) {
      if (finite(rewards[i])) vals.push(rewards[i]);
      if (finite(ma[i])) vals.push(ma[i]);
    }
    let lo = Infinity;
    let hi = -Infinity;
    for (const v of vals) {
      if (v < lo) lo = v;
      if (v > hi) hi = v;
    }
    if (!vals.length) {
      lo = 0;
      hi = 1;
    }
    if (hi - lo < 1e-12) {
      const pad = Math.abs(hi) > 1e-9 ? Math.abs(hi) * 0.05 : 0.5;
      lo -= pad;
      hi += pad;
    }
    const pad = (hi - lo) * 0.08;
    lo -= pad;
    hi += pad;
    const inset = 4; // keep the first and last points off the axes
    // x of update u (rewards[i] is update i + 1; held-out iteration u is update u, 0 the base model)
    const XU = (u) => plot.l + inset + ((plot.r - plot.l - 2 * inset) * (u - 1 + off)) / Math.max(1, xMax - 1 + off);
    const X = (i) => XU(i + 1);
    const Y = (v) => plot.b - ((plot.b - plot.t) * (v - lo)) / (hi - lo);
    layout.x_of = XU;

    // grid (the palette's secondary text colour, faint: works on dark and light themes) + axes
    const gridLine = (xa, ya, xb, yb) => {
      ctx.save();
      ctx.globalAlpha *= 0.22;
      ctx.strokeStyle = dim;
      ctx.beginPath();
      ctx.moveTo(xa, ya);
      ctx.lineTo(xb, yb);
      ctx.stroke();
      ctx.restore();
    };
    ctx.lineWidth = 1;
    ctx.font = `10px ${font}`;
    const yStep = niceStep(hi - lo, Math.max(2, Math.floor((plot.b - plot.t) / 32)));
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (let v = Math.ceil(lo / yStep) * yStep; v <= hi + 1e-12; v += yStep) {
      const py = Math.round(Y(v)) + 0.5;
      gridLine(plot.l, py, plot.r, py);
      if (!lowQuality && vals.length) {
        ctx.fillStyle = dim;
        ctx.fillText(fmtNum(Math.abs(v) < yStep * 1e-6 ? 0 : v, yStep), plot.l - 5, py);
      }
    }
    const xStep = Math.max(1, niceStep(xMax - 1 + off, Math.max(2, Math.floor((plot.r - plot.l) / 60))));
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    const xTicks = [1 - off];
    for (let it = xStep; it <= xMax; it += xStep) if (it > xTicks[0]) xTicks.push(Math.round(it));
    for (const it of xTicks) {
      const px = Math.round(XU(it)) + 0.5;
      gridLine(px, plot.t, px, plot.b);
      if (!lowQuality && (n || state?.total || held)) {
        ctx.fillStyle = dim;
        ctx.fillText(String(it), px, plot.b + 3);
      }
    }
    ctx.strokeStyle = dim;
    ctx.beginPath();
    ctx.moveTo(plot.l + 0.5, plot.t);
    ctx.lineTo(plot.l + 0.5, plot.b + 0.5);
    ctx.lineTo(plot.r, plot.b + 0.5);
    ctx.stroke();
    if (!lowQuality) {
      ctx.fillStyle = dim;
      ctx.fillText("iteration", (plot.l + plot.r) / 2, plot.b + 15);
      ctx.save();
      ctx.translate(x0 + 9, (plot.t + plot.b) / 2);
      ctx.rotate(-Math.PI / 2);
      ctx.textBaseline = "middle";
      ctx.fillText("reward", 0, 0);
      ctx.restore();
    }

    if (!n && !held?.evaluations.length) {
      if (!lowQuality) {
        ctx.fillStyle = dim;
        ctx.font = `12px ${font}`;
        ctx.textAlign = "center";
        ctx.textBaseline = "middle";
        ctx.fillText("Queue the workflow: the reward curve appears here.", (plot.l + plot.r) / 2, (plot.t + plot.b) / 2);
      }
    }
    if (n || held) {
      ctx.save();
      ctx.beginPath();
      ctx.rect(plot.l, plot.t - 4, plot.r - plot.l + 4, plot.b - plot.t + 8);
      ctx.clip();
      // raw rewards: a thin line (gaps at skipped steps) + dots when there is room
      // Long runs: one column per pixel (min-max of the rewards, last mean), not 100k segments.
      const cols = Math.max(1, Math.floor(plot.r - plot.l));
      const dense = n > 2 * cols;
      const line = (values, color, lw, range) => {
        ctx.strokeStyle = color;
        ctx.lineWidth = lw;
        ctx.lineJoin = "round";
        ctx.beginPath();
        let pen = false;
        const to = (px, py) => {
          if (pen) ctx.lineTo(px, py);
          else ctx.moveTo(px, py);
          pen = true;
        };
        if (!dense) {
          for (let i = 0; i < values.length; i++) {
            if (!finite(values[i])) { pen = false; continue; }
            to(X(i), Y(values[i]));
          }
        } else {
          for (const col of columns(values, cols)) {
            if (!col) { pen = false; continue; }
            if (range) {
              to(X(col.first), Y(col.lo));
              to(X(col.first), Y(col.hi));
            } else to(X(col.i), Y(col.last));
          }
        }
        ctx.stroke();
      };
      line(rewards, COLORS.reward, 1.25, true);
      const spacing = (plot.r - plot.l) / Math.max(1, xMax - 1 + off);
      if (spacing >= 4 || n === 1) {
        ctx.fillStyle = COLORS.reward;
        for (let i = 0; i < n; i++) {
          if (!finite(rewards[i])) continue;
          ctx.beginPath();
          ctx.arc(X(i), Y(rewards[i]), Math.min(2.5, Math.max(1.5, spacing / 4)), 0, Math.PI * 2);
          ctx.fill();
        }
      }
      line(ma, COLORS.ma, 2.5);
      // skipped (non-finite) steps: red ticks on the x axis
      ctx.strokeStyle = COLORS.skip;
      ctx.lineWidth = 2;
      for (let i = 0; i < n; i++) {
        if (rewards[i] !== null) continue;
        ctx.beginPath();
        ctx.moveTo(X(i), plot.b - 8);
        ctx.lineTo(X(i), plot.b);
        ctx.stroke();
      }
      if (held) layout.best_x = drawHeldout(ctx, held, plot, XU);
      ctx.restore();
      if (held && layout.best_x !== null && !lowQuality) drawBestLabel(ctx, held, plot, layout.best_x, font);
    }
  }

  if (!lowQuality) {
    if (held) drawLegend(ctx, state, x0 + 8, plot.b + AXIS_H, w - 16, font, text, dim);
    ctx.font = `11px ${font}`;
    ctx.textAlign = "left";
    ctx.textBaseline = "middle";
    let ly = y0 + h - footerH + LINE_H / 2 + 2;
    rows.forEach((l, idx) => {
      ctx.fillStyle = idx === 0 ? text : dim;
      ctx.fillText(ellipsize(ctx, l, w - 16), x0 + 8, ly);
      ly += LINE_H;
    });
  }
  ctx.restore();
}

function addChartWidget(node) {
  const chart = new DraftChart(node);
  const widget = {
    name: CHART_WIDGET,
    type: "draft_chart",
    value: "",
    y: 0,
    serialize: false, // not saved in the workflow's widgets_values
    options: { serialize: false }, // not sent in the prompt
    draftChart: chart,
    draw(ctx, n, width, y, H, lowQuality) {
      // More to show than the node has room for (a held-out legend, a stop reason): grow it.
      if (this.computedHeight != null && this.computedHeight < this.computeLayoutSize(n).minHeight - 0.5) growLater(n);
      drawChart(ctx, n, width, y, this.computedHeight ?? this.computeLayoutSize(n).minHeight, chart, lowQuality);
    },
    computeLayoutSize(n) {
      const lines = infoLines(chart.state, chart.text);
      const width = Math.max(40, (n?.size?.[0] ?? node.size?.[0] ?? 400) - 20) - 16;
      const footer = footerRows(measuring(`11px ${window.LiteGraph?.NODE_FONT ?? "Arial"}`), lines, width).length;
      return {
        minHeight: HEADER_H + 6 + MIN_PLOT_H + AXIS_H + footer * LINE_H + 14
          + (legendRows(chart.state) ? legendRows(chart.state) * LEGEND_H + BEST_LABEL_H : 0),
        minWidth: 200,
      };
    },
  };
  node.addCustomWidget(widget);
  node.draftChart = chart;
  return widget;
}

const growing = new Set();
function growLater(node) {
  if (growing.has(node)) return;
  growing.add(node);
  requestAnimationFrame(() => {
    growing.delete(node);
    growToFit(node);
    app.canvas?.setDirty(true, true);
  });
}

function growToFit(node, minWidth = 0) {
  const min = node.computeSize();
  const w = Math.max(node.size[0], minWidth);
  const h = Math.max(node.size[1], min[1]);
  if (w !== node.size[0] || h !== node.size[1]) node.setSize([w, h]);
}

// ------------------------------------------------------------------------------------------
// Registration
// ------------------------------------------------------------------------------------------
app.registerExtension({
  name: "DRaFT.RewardChart",

  async setup() {
    await fetchStatus();
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== TRAINER) return;

    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated?.apply(this, arguments);
      addChartWidget(this);
      growToFit(this, 400);
      return r;
    };

    // (A saved workflow whose trainer is too small for the chart is grown by LiteGraph's own
    // widget layout when the node is drawn.)

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const r = onExecuted?.apply(this, arguments);
      const text = message?.text;
      if (this.draftChart && text != null) {
        this.draftChart.text = Array.isArray(text) ? text.join("\n") : String(text);
        redraw();
      }
      return r;
    };
  },
});

// For tests and debugging: the states by node id.
window.__draftRuns = runs;
