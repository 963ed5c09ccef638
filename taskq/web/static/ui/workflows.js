// Workflows: GET /workflows (a filterable list) and GET /workflows/{id} (its graph
// with each node's state, redrawn while it runs; cancel).

import { api } from "./api.js";
import { h, clear, count, when, badge, taskLink, seconds, STATUSES } from "./format.js";
import { notice, reportError, confirmAction } from "./ui.js";

const SVG = "http://www.w3.org/2000/svg";
const PAGE = 100;
// Above this many nodes the graph is drawn one box per level (its nodes counted by
// state): a box per node would be unreadable and costly to draw.
const MAX_DRAWN_NODES = 200;
const MAX_LEVELS = 60;
// How often a running workflow is read again: each read returns every node.
const REFRESH_SMALL = 1000;
const REFRESH_LARGE = 5000;
const NODE = { width: 168, height: 40, gapX: 56, gapY: 14, pad: 12 };

function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value !== undefined && value !== null) el.setAttribute(name, value);
  }
  for (const child of children) el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return el;
}

function shortText(text, max) {
  return text.length > max ? `${text.slice(0, max - 1)}…` : text;
}

/** Each node's level: the longest path from a root (parents come first). */
export function levels(nodes) {
  const byName = new Map(nodes.map((n) => [n.name, n]));
  const level = new Map();
  const visit = (node, depth = 0) => {
    if (level.has(node.name)) return level.get(node.name);
    if (depth > nodes.length) return 0; // a cycle cannot be stored; never loop on one
    let l = 0;
    for (const parent of node.depends_on) {
      const p = byName.get(parent);
      if (p) l = Math.max(l, visit(p, depth + 1) + 1);
    }
    level.set(node.name, l);
    return l;
  };
  for (const node of nodes) visit(node);
  const columns = [];
  for (const node of nodes) {
    const l = level.get(node.name);
    (columns[l] ||= []).push(node);
  }
  return columns.map((c) => c || []);
}

function nodeState(node) {
  if (node.status === null || node.status === undefined) return "GONE"; // deleted by retention
  return node.skipped && node.status === "CANCELLED" ? "SKIPPED" : node.status;
}

function drawNodes(columns) {
  const tallest = Math.max(...columns.map((c) => c.length));
  const width = NODE.pad * 2 + columns.length * NODE.width + (columns.length - 1) * NODE.gapX;
  const height = NODE.pad * 2 + tallest * NODE.height + (tallest - 1) * NODE.gapY;
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, width, height, role: "img",
    "aria-label": `Workflow graph: ${columns.flat().length} nodes in ${columns.length} levels` });
  const place = new Map();
  columns.forEach((column, x) => {
    const top = NODE.pad + ((tallest - column.length) * (NODE.height + NODE.gapY)) / 2;
    column.forEach((node, y) => {
      place.set(node.name, { x: NODE.pad + x * (NODE.width + NODE.gapX), y: top + y * (NODE.height + NODE.gapY) });
    });
  });
  const edges = svg("g", { class: "edges" });
  for (const node of columns.flat()) {
    const to = place.get(node.name);
    for (const parent of node.depends_on) {
      const from = place.get(parent);
      if (!from) continue;
      const x1 = from.x + NODE.width, y1 = from.y + NODE.height / 2;
      const x2 = to.x, y2 = to.y + NODE.height / 2;
      const mid = (x1 + x2) / 2;
      edges.append(svg("path", { d: `M${x1},${y1} C${mid},${y1} ${mid},${y2} ${x2},${y2}`,
        "data-from": parent, "data-to": node.name }));
    }
  }
  root.append(edges);
  for (const node of columns.flat()) {
    const { x, y } = place.get(node.name);
    const state = nodeState(node);
    const box = svg("g", { class: `node s-${state}`, "data-name": node.name, "data-status": state,
      transform: `translate(${x},${y})` },
    svg("title", {}, `${node.name} (${node.type}): ${state.toLowerCase()}${node.last_error ? ` — ${node.last_error}` : ""}`),
    svg("rect", { width: NODE.width, height: NODE.height, rx: 6 }),
    svg("text", { x: 10, y: 16, class: "name" }, shortText(node.name, 24)),
    svg("text", { x: 10, y: 31, class: "state" }, `${state.toLowerCase()}${node.attempts > 1 ? ` · ${node.attempts} attempts` : ""}`));
    root.append(node.task_id ? svg("a", { href: `#/task/${node.task_id}` }, box) : box);
  }
  return root;
}

function drawLevels(columns) {
  // One box per level, its nodes counted by state.
  const shown = columns.slice(0, MAX_LEVELS);
  const lines = shown.map((column, l) => {
    const byState = {};
    for (const node of column) byState[nodeState(node)] = (byState[nodeState(node)] || 0) + 1;
    const parts = Object.entries(byState).map(([state, n]) =>
      h("span", { class: `badge s-${state}`, dataset: { state } }, `${count(n)} ${state.toLowerCase()}`));
    return h("li", { dataset: { level: String(l) } },
      h("span", { class: "level" }, `Level ${l + 1}`), ` ${count(column.length)} node${column.length === 1 ? "" : "s"} `, ...parts);
  });
  const list = h("ol", { class: "levels", "aria-label": "Nodes by level" }, ...lines);
  if (columns.length > shown.length) list.append(h("li", { class: "muted" }, `… ${count(columns.length - shown.length)} more levels`));
  return list;
}

function nodeRow(node) {
  const state = nodeState(node);
  const took = node.started_at && node.finished_at
    ? seconds((new Date(node.finished_at) - new Date(node.started_at)) / 1000) : "–";
  return h("tr", { dataset: { name: node.name } },
    h("td", { class: "mono" }, node.name),
    h("td", {}, node.task_id ? taskLink(node.task_id) : "—"),
    h("td", {}, node.type),
    h("td", {}, state === "GONE" ? h("span", { class: "muted" }, "deleted") : state === "SKIPPED" ? h("span", { class: "badge s-CANCELLED" }, "skipped") : badge(state)),
    h("td", { class: "num" }, node.attempts ?? "–"),
    h("td", { class: "mono small" }, node.depends_on.join(", ") || "—"),
    h("td", {}, when(node.started_at)),
    h("td", { class: "num" }, took),
    h("td", { class: "error" }, node.last_error || ""));
}

let current = null; // the workflow shown, for its refresh

/** Route #/workflow/{id}; returns in how many ms to read it again (0: it has
 * ended, or is gone). */
export async function showWorkflow(id) {
  current = id;
  let data;
  try {
    ({ data } = await api(`/workflows/${encodeURIComponent(id)}`));
  } catch (error) {
    if (current !== id) return 0;
    const missing = error.status === 404 || error.status === 400;
    document.getElementById("workflow-missing").hidden = !missing;
    document.getElementById("workflow-body").hidden = missing;
    if (!missing) {
      reportError(error, "Could not load the workflow");
      return REFRESH_LARGE; // the API may be back soon
    }
    return 0;
  }
  if (current !== id) return 0;
  document.getElementById("workflow-missing").hidden = true;
  document.getElementById("workflow-body").hidden = false;
  document.getElementById("workflow-id").textContent = data.name ? `${data.name} (${data.id})` : data.id;
  const status = document.getElementById("workflow-status");
  status.className = `badge s-${data.status}`;
  status.textContent = data.status.toLowerCase();
  document.getElementById("workflow-cancel").hidden = data.status !== "RUNNING" || Boolean(data.cancel_requested_at);
  const facts = clear(document.getElementById("workflow-facts"));
  const fact = (term, value) => facts.append(h("dt", {}, term), h("dd", {}, value));
  fact("Nodes", count(data.nodes.length));
  fact("Succeeded", count(data.counts.succeeded));
  fact("Failed", count(data.counts.failed));
  fact("Cancelled", count(data.counts.cancelled));
  fact("On failure", data.on_failure === "fail_fast" ? "fail fast" : "continue");
  fact("Created", when(data.created_at));
  fact("Finished", when(data.finished_at));
  if (data.finished_at) fact("Took", seconds((new Date(data.finished_at) - new Date(data.created_at)) / 1000));
  const columns = levels(data.nodes);
  const graph = clear(document.getElementById("workflow-graph"));
  graph.append(data.nodes.length > MAX_DRAWN_NODES ? drawLevels(columns) : drawNodes(columns));
  const body = clear(document.querySelector("#workflow-nodes tbody"));
  body.append(...data.nodes.slice(0, 500).map(nodeRow));
  document.getElementById("workflow-nodes-summary").textContent = data.nodes.length > 500
    ? `The first 500 of ${count(data.nodes.length)} nodes.` : `${count(data.nodes.length)} node${data.nodes.length === 1 ? "" : "s"}.`;
  if (data.status !== "RUNNING") return 0;
  return data.nodes.length > MAX_DRAWN_NODES ? REFRESH_LARGE : REFRESH_SMALL;
}

async function cancelShown() {
  const id = current;
  const ok = await confirmAction("Cancel this workflow?",
    "Nodes that have not started are cancelled; running ones are asked to stop.", "Cancel workflow");
  if (!ok || current !== id) return;
  try {
    await api(`/workflows/${encodeURIComponent(id)}/cancel`, { method: "POST", body: {} });
    notice("Workflow cancelled.", "ok");
  } catch (error) {
    reportError(error, "Could not cancel the workflow");
  }
  await showWorkflow(id);
}

function listRow(workflow) {
  return h("tr", { dataset: { id: workflow.id } },
    h("td", {}, h("a", { href: `#/workflow/${workflow.id}`, class: "mono", title: workflow.id }, workflow.name || workflow.id.slice(0, 8))),
    h("td", {}, badge(workflow.status)),
    h("td", { class: "num" }, count(workflow.counts.nodes)),
    h("td", { class: "num succeeded" }, count(workflow.counts.succeeded)),
    h("td", { class: "num" }, count(workflow.counts.failed)),
    h("td", { class: "num" }, count(workflow.counts.cancelled)),
    h("td", {}, when(workflow.created_at)),
    h("td", {}, when(workflow.finished_at)));
}

let listCursor = null;
let listQuery = null;

async function loadList(more) {
  let data;
  try {
    ({ data } = await api("/workflows", { params: { ...listQuery, limit: PAGE, cursor: more ? listCursor : null } }));
  } catch (error) {
    reportError(error, "Could not list workflows");
    return;
  }
  const body = document.querySelector("#workflows-table tbody");
  if (!more) clear(body);
  body.append(...data.workflows.map(listRow));
  if (!body.children.length) {
    body.append(h("tr", { class: "empty-row" }, h("td", { colspan: 8 }, "No workflow: POST /workflows, or client.enqueue_workflow(chain(...)).")));
  }
  listCursor = data.next_cursor;
  document.getElementById("workflows-more").hidden = !listCursor;
  const shown = body.querySelectorAll("tr[data-id]").length;
  document.getElementById("workflows-summary").textContent = `${count(shown)} workflow${shown === 1 ? "" : "s"} shown${listCursor ? ", more to load" : ""}.`;
}

/** Route #/workflows?status=&name= (and its periodic refresh). */
export async function showWorkflows(query) {
  if (query) {
    listQuery = { status: query.get("status") || null, name: query.get("name") || null };
    const form = document.getElementById("workflow-filters");
    form.elements.status.value = listQuery.status || "";
    form.elements.name.value = listQuery.name || "";
  }
  await loadList(false);
}

export function initWorkflows() {
  const select = document.querySelector("#workflow-filters select[name=status]");
  select.append(...["RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"].filter((s) => STATUSES.includes(s)).map((s) => h("option", {}, s)));
  document.getElementById("workflow-filters").addEventListener("submit", (event) => {
    event.preventDefault();
    const form = event.target;
    const params = new URLSearchParams();
    if (form.elements.status.value) params.set("status", form.elements.status.value);
    if (form.elements.name.value.trim()) params.set("name", form.elements.name.value.trim());
    location.hash = `#/workflows${params.size ? `?${params}` : ""}`;
  });
  document.getElementById("workflow-filters").addEventListener("reset", () => {
    setTimeout(() => { location.hash = "#/workflows"; });
  });
  document.getElementById("workflows-more").addEventListener("click", () => loadList(true));
  document.getElementById("workflow-cancel").addEventListener("click", cancelShown);
}
