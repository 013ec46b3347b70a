// The web view of a running job: polls /plan (once), /status and /checkpoints (every second) and
// draws what they say. Every figure comes from the job's metrics snapshot; the page computes
// nothing but layout and formatting. Keys the endpoint does not send (yet) show as "–".
"use strict";

// Every second, or every ?refresh=MS milliseconds (at least 100) the address asks for.
const POLL_MS = Math.max(100, Number(new URLSearchParams(location.search).get("refresh")) || 1000);
const LAYER_GAP_PX = 90;
const ROW_GAP_PX = 24;
const HISTORY_ROWS = 20;

let plan = null;
let lastUpdate = null;
const vertexBoxes = new Map(); // vertex id -> its box element

// ---------------------------------------------------------------- formatting

const integer = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });
const decimal1 = new Intl.NumberFormat("en-US", { maximumFractionDigits: 1 });

function known(value) {
  return value !== null && value !== undefined && !(typeof value === "number" && !isFinite(value));
}

function count(value) {
  return known(value) ? integer.format(value) : "–";
}

function rate(value) {
  return known(value) ? `${decimal1.format(value)}/s` : "–";
}

function rateSuffix(value) {
  return known(value) ? ` (${rate(value)})` : "";
}

function msPerSecond(value) {
  return known(value) ? `${integer.format(value)} ms/s` : "–";
}

function duration(ms) {
  if (!known(ms)) return "–";
  return ms < 1000 ? `${decimal1.format(ms)} ms` : `${decimal1.format(ms / 1000)} s`;
}

function bytes(size) {
  if (!known(size)) return "–";
  const units = ["B", "KiB", "MiB", "GiB"];
  let value = size;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${unit === 0 ? integer.format(value) : decimal1.format(value)} ${units[unit]}`;
}

function watermark(ms) {
  // Event time in ms since the epoch reads as a UTC time; small numbers are shown as they are.
  if (!known(ms)) return "–";
  if (Math.abs(ms) < 1e11 || Math.abs(ms) > 1e14) return `${integer.format(ms)} ms`;
  return new Date(ms).toISOString().replace("T", " ").replace("Z", " UTC");
}

function clockTime(ms) {
  return known(ms) ? new Date(ms).toLocaleTimeString() : "–";
}

function uptime(seconds) {
  if (!known(seconds)) return null;
  const s = Math.floor(seconds);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  return h > 0 ? `${h}h ${m}min` : m > 0 ? `${m}min ${s % 60}s` : `${s}s`;
}

// Flink's web UI colours a vertex by its worst subtask's backpressure.
function backpressureLevel(msPerS) {
  if (!known(msPerS)) return "unknown";
  if (msPerS < 100) return "ok";
  if (msPerS < 500) return "warn";
  return "high";
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function cell(row, text, className) {
  row.appendChild(element("td", className, text));
}

// ---------------------------------------------------------------- the graph

// Layer of a vertex: 0 for sources, else one more than its deepest input (vertex ids are in
// topological order, so one pass suffices).
function layers(currentPlan) {
  const layer = new Map();
  for (const vertex of currentPlan.vertices) layer.set(vertex.id, 0);
  for (const vertex of currentPlan.vertices) {
    for (const edge of currentPlan.edges) {
      if (edge.target === vertex.id) {
        layer.set(vertex.id, Math.max(layer.get(vertex.id), layer.get(edge.source) + 1));
      }
    }
  }
  return layer;
}

function buildGraph(currentPlan) {
  document.getElementById("job-name").textContent = currentPlan.job;
  document.title = `${currentPlan.job} · pyflow`;
  const graph = document.getElementById("graph");
  for (const vertex of currentPlan.vertices) {
    const box = element("div", "vertex bp-unknown");
    box.dataset.vertexId = String(vertex.id);
    box.dataset.backpressure = "unknown";
    const title = element("div", "vertex-title");
    title.appendChild(element("span", "", `vertex ${vertex.id}`));
    title.appendChild(element("span", "parallelism", `parallelism ${vertex.parallelism}`));
    box.appendChild(title);
    for (const op of vertex.operators) {
      const entry = element("div", "operator");
      entry.dataset.uid = op.uid;
      entry.appendChild(element("div", "operator-name", op.name));
      entry.appendChild(element("div", "operator-counts", "in – · out –"));
      box.appendChild(entry);
    }
    box.appendChild(element("div", "vertex-metrics backpressure", "backpressured –"));
    box.appendChild(element("div", "vertex-metrics load", "busy – · idle –"));
    box.appendChild(element("div", "vertex-metrics watermarks", "watermark –"));
    box.appendChild(element("div", "vertex-metrics lag"));
    graph.appendChild(box);
    vertexBoxes.set(vertex.id, box);
  }
  layoutGraph(currentPlan);
}

function layoutGraph(currentPlan) {
  const layer = layers(currentPlan);
  const columns = new Map();
  for (const vertex of currentPlan.vertices) {
    const index = layer.get(vertex.id);
    if (!columns.has(index)) columns.set(index, []);
    columns.get(index).push(vertex.id);
  }
  const position = new Map();
  let x = 0;
  let height = 0;
  for (const index of [...columns.keys()].sort((a, b) => a - b)) {
    let y = 0;
    let width = 0;
    for (const id of columns.get(index)) {
      const box = vertexBoxes.get(id);
      box.style.left = `${x}px`;
      box.style.top = `${y}px`;
      position.set(id, { x, y, width: box.offsetWidth, height: box.offsetHeight });
      y += box.offsetHeight + ROW_GAP_PX;
      width = Math.max(width, box.offsetWidth);
    }
    height = Math.max(height, y);
    x += width + LAYER_GAP_PX;
  }
  const graph = document.getElementById("graph");
  graph.style.height = `${height}px`;
  drawEdges(currentPlan, position, x, height);
}

function drawEdges(currentPlan, position, width, height) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.getElementById("edges");
  svg.setAttribute("width", String(width));
  svg.setAttribute("height", String(height));
  svg.replaceChildren();
  const defs = document.createElementNS(ns, "defs");
  const marker = document.createElementNS(ns, "marker");
  marker.setAttribute("id", "arrow");
  marker.setAttribute("viewBox", "0 0 10 10");
  marker.setAttribute("refX", "10");
  marker.setAttribute("refY", "5");
  marker.setAttribute("markerWidth", "7");
  marker.setAttribute("markerHeight", "7");
  marker.setAttribute("orient", "auto");
  const tip = document.createElementNS(ns, "path");
  tip.setAttribute("d", "M0,0 L10,5 L0,10 z");
  marker.appendChild(tip);
  defs.appendChild(marker);
  svg.appendChild(defs);
  for (const edge of currentPlan.edges) {
    const from = position.get(edge.source);
    const to = position.get(edge.target);
    if (!from || !to) continue;
    const x1 = from.x + from.width;
    const y1 = from.y + from.height / 2;
    const x2 = to.x;
    const y2 = to.y + to.height / 2;
    const bend = Math.max(30, (x2 - x1) / 2);
    const path = document.createElementNS(ns, "path");
    path.setAttribute("d", `M${x1},${y1} C${x1 + bend},${y1} ${x2 - bend},${y2} ${x2},${y2}`);
    path.setAttribute("marker-end", "url(#arrow)");
    path.setAttribute("class", edge.side_output ? "edge side-output" : "edge");
    path.dataset.source = String(edge.source);
    path.dataset.target = String(edge.target);
    path.dataset.partitioner = edge.partitioner;
    svg.appendChild(path);
    const label = document.createElementNS(ns, "text");
    label.setAttribute("x", String((x1 + x2) / 2));
    label.setAttribute("y", String((y1 + y2) / 2 - 6));
    label.setAttribute("text-anchor", "middle");
    label.setAttribute("class", "edge-label");
    label.textContent = edge.side_output
      ? `${edge.partitioner} (side output ${edge.side_output})`
      : edge.partitioner;
    svg.appendChild(label);
  }
}

// The lag of a vertex's source subtasks: tasks are named "<vertex name> (i/n)".
function vertexLag(vertex, sourceLag) {
  let total = null;
  for (const [task, splits] of Object.entries(sourceLag || {})) {
    if (!task.startsWith(`${vertex.name} (`)) continue;
    for (const lag of Object.values(splits)) total = (total || 0) + lag;
  }
  return total;
}

function renderGraph(status) {
  const operators = new Map((status.operators || []).map((op) => [op.uid, op]));
  for (const vertex of plan.vertices) {
    const box = vertexBoxes.get(vertex.id);
    const figures = vertex.operators.map((op) => operators.get(op.uid)).filter(Boolean);
    // The operators of one chain share the task's figures; the maximum is the worst subtask's.
    const worst = (key) => {
      const values = figures.map((op) => op[key]).filter(known);
      return values.length ? Math.max(...values) : null;
    };
    const backpressured = worst("backpressured_ms_per_s");
    const level = backpressureLevel(backpressured);
    box.className = `vertex bp-${level}`;
    box.dataset.backpressure = level;
    box.dataset.backpressuredMsPerS = known(backpressured) ? String(backpressured) : "";
    for (const entry of box.querySelectorAll(".operator")) {
      const op = operators.get(entry.dataset.uid);
      const counts = entry.querySelector(".operator-counts");
      if (!op) continue;
      entry.dataset.recordsIn = String(op.records_in);
      entry.dataset.recordsOut = String(op.records_out);
      counts.textContent =
        `in ${count(op.records_in)}${rateSuffix(op.records_in_per_s)} · ` +
        `out ${count(op.records_out)}${rateSuffix(op.records_out_per_s)}`;
    }
    box.querySelector(".backpressure").textContent = `backpressured ${msPerSecond(backpressured)}`;
    box.querySelector(".load").textContent =
      `busy ${msPerSecond(worst("busy_ms_per_s"))} · idle ${msPerSecond(
        figures.length ? figures[0].idle_ms_per_s : null,
      )}`;
    const last = figures[figures.length - 1];
    const first = figures[0];
    box.querySelector(".watermarks").textContent =
      `input watermark ${watermark(first && first.input_watermark)} · ` +
      `watermark ${watermark(last && last.watermark)}${last && last.idle ? " (idle)" : ""}`;
    const lag = vertexLag(vertex, status.source_lag);
    box.querySelector(".lag").textContent = known(lag) ? `lag ${count(lag)} records` : "";
  }
  layoutGraph(plan);
}

// ---------------------------------------------------------------- tables

// Records in and out with their rates, then busy, backpressured and idle time: the same columns
// for an operator and for one of its subtasks.
function flowCells(row, figures) {
  cell(row, count(figures.records_in));
  cell(row, rate(figures.records_in_per_s));
  cell(row, count(figures.records_out));
  cell(row, rate(figures.records_out_per_s));
  cell(row, msPerSecond(figures.busy_ms_per_s));
  cell(row, msPerSecond(figures.backpressured_ms_per_s));
  cell(row, msPerSecond(figures.idle_ms_per_s));
}

function renderOperators(status) {
  const body = document.querySelector("#operators tbody");
  body.replaceChildren();
  for (const op of status.operators || []) {
    const row = element("tr");
    row.dataset.uid = op.uid;
    cell(row, op.name);
    cell(row, op.uid);
    cell(row, String(op.parallelism));
    flowCells(row, op);
    cell(row, watermark(op.input_watermark));
    cell(row, watermark(op.watermark) + (op.idle ? " (idle)" : ""));
    cell(row, count(op.late_records_dropped));
    body.appendChild(row);
  }
}

function renderSubtasks(status) {
  const body = document.querySelector("#subtasks tbody");
  body.replaceChildren();
  for (const op of status.operators || []) {
    for (const sub of op.subtasks || []) {
      const row = element("tr");
      row.dataset.uid = op.uid;
      row.dataset.subtask = String(sub.subtask);
      cell(row, op.name);
      cell(row, String(sub.subtask));
      cell(row, sub.taskmanager || "–");
      flowCells(row, sub);
      cell(row, count(sub.input_queue));
      cell(row, count(sub.output_queue));
      cell(row, count(sub.output_credit));
      cell(row, watermark(sub.input_watermark));
      cell(row, watermark(sub.watermark) + (sub.idle ? " (idle)" : ""));
      body.appendChild(row);
    }
  }
}

function renderLag(status) {
  const body = document.querySelector("#source-lag tbody");
  body.replaceChildren();
  const entries = Object.entries(status.source_lag || {});
  for (const [task, splits] of entries) {
    for (const [split, lag] of Object.entries(splits)) {
      const row = element("tr");
      cell(row, task);
      cell(row, split);
      cell(row, count(lag));
      body.appendChild(row);
    }
  }
  document.getElementById("source-lag").hidden = entries.length === 0;
  document.getElementById("lag-empty").hidden = entries.length !== 0;
}

function renderJob(status) {
  const badge = document.getElementById("job-status");
  badge.textContent = status.status;
  badge.dataset.status = status.status;
  const facts = [`attempt ${status.attempt}`];
  if (known(status.restarts)) facts.push(`${count(status.restarts)} restarts`);
  const up = uptime(status.uptime_s);
  if (up) facts.push(`up ${up}`);
  const tasks = status.tasks || [];
  const running = tasks.filter((t) => t.state === "running").length;
  facts.push(`${running}/${tasks.length} tasks running`);
  const taskmanagers = status.taskmanagers || [];
  if (taskmanagers.length) facts.push(`${taskmanagers.length} TaskManagers`);
  document.getElementById("job-facts").textContent = facts.join(" · ");
  const alert = document.getElementById("alert");
  const active = status.alert && status.alert.active;
  alert.hidden = !active;
  alert.textContent = active ? status.alert.message || "checkpoint failure alert" : "";
}

function renderCheckpoints(checkpoints, status) {
  const counts = checkpoints.counts || {};
  const summary = status.checkpoints || {};
  const parts = Object.entries(counts).map(([name, n]) => `${n} ${name}`);
  const latest = checkpoints.latest_completed;
  if (latest) parts.push(`latest completed: ${latest.id} (${bytes(latest.state_size)})`);
  if (known(summary.last_duration_ms)) parts.push(`last took ${duration(summary.last_duration_ms)}`);
  document.getElementById("checkpoint-summary").textContent = parts.length
    ? parts.join(" · ")
    : "No checkpoint yet.";
  const body = document.querySelector("#checkpoints tbody");
  body.replaceChildren();
  const history = [...(checkpoints.history || [])].reverse().slice(0, HISTORY_ROWS);
  for (const entry of history) {
    const row = element("tr", "checkpoint-row");
    row.dataset.checkpointId = String(entry.id);
    row.dataset.status = entry.status;
    cell(row, String(entry.id));
    cell(row, entry.kind);
    cell(row, entry.status);
    cell(row, clockTime(entry.trigger_time_ms));
    cell(row, duration(entry.duration_ms), "duration");
    cell(row, bytes(entry.state_size), "size");
    row.appendChild(perTaskMaximum(entry.alignment_ms, "alignment"));
    row.appendChild(perTaskMaximum(entry.snapshot_ms, "snapshot"));
    cell(row, entry.failure || "", "failure");
    body.appendChild(row);
  }
}

/** A cell with the largest of a checkpoint's per-task times, each task's in its tooltip. */
function perTaskMaximum(perTask, className) {
  const times = Object.entries(perTask || {});
  const td = element(
    "td",
    className,
    times.length ? duration(Math.max(...times.map(([, ms]) => ms))) : "–",
  );
  td.title = times.map(([task, ms]) => `${task}: ${duration(ms)}`).join("\n");
  return td;
}

// ---------------------------------------------------------------- polling

function setConnection(state, text) {
  const connection = document.getElementById("connection");
  connection.dataset.state = state;
  connection.textContent = text;
  document.body.classList.toggle("stale", state === "lost");
}

async function getJSON(path) {
  const response = await fetch(path, { cache: "no-store" });
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

async function poll() {
  try {
    if (plan === null) {
      const fetched = await getJSON("/plan");
      buildGraph(fetched);
      plan = fetched;
    }
    const [status, checkpoints] = await Promise.all([getJSON("/status"), getJSON("/checkpoints")]);
    renderJob(status);
    renderGraph(status);
    renderOperators(status);
    renderSubtasks(status);
    renderLag(status);
    renderCheckpoints(checkpoints, status);
    lastUpdate = new Date();
    setConnection("live", `live · updated ${lastUpdate.toLocaleTimeString()}`);
  } catch (error) {
    const since = lastUpdate ? `; last update ${lastUpdate.toLocaleTimeString()}` : "";
    setConnection(
      "lost",
      `job ended or control endpoint unreachable (${error.message || error})${since}`,
    );
  } finally {
    window.setTimeout(poll, POLL_MS);
  }
}

poll();
