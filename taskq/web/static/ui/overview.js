// Overview: counts by status and queue, sparklines, live activity.

import { api } from "./api.js";
import { sparkline } from "./charts.js";
import { h, badge, clear, clock, count, rate, seconds, STATUSES, taskLink } from "./format.js";
import { confirmAction, notice, reportError } from "./ui.js";

const HISTORY = 120; // samples kept (about two minutes at one per second)
const MIN_POINTS = 30; // a short history still spans a readable width
const ACTIVITY = 60;
const history = [];
let info = { namespace: "taskq", queues: [] };

const COLORS = {
  ENQUEUED: "var(--enqueued)", WAITING: "var(--waiting)", RUNNING: "var(--running)", SUCCEEDED: "var(--succeeded)",
  FAILED: "var(--failed)", CANCELLED: "var(--cancelled)",
};

export function setInfo(value) {
  info = value;
}

/** Status cards: built once, then only their numbers change (focus stays put). */
function updateCards(stats) {
  const list = document.getElementById("status-cards");
  if (!list.children.length) {
    list.append(...STATUSES.map((status) => {
      const link = h("a", { class: "card", href: `#/tasks?status=${status}` },
        h("div", { class: "label" }, status.toLowerCase()),
        h("div", { class: "value", dataset: { status } }, "0"),
        h("div", { class: "sub" }));
      link.style.setProperty("--c", COLORS[status]);
      return h("li", {}, link);
    }));
  }
  for (const status of STATUSES) {
    const n = stats.by_status?.[status] ?? 0;
    const value = list.querySelector(`.value[data-status="${status}"]`);
    value.textContent = count(n);
    value.closest("a").setAttribute("aria-label", `${count(n)} ${status.toLowerCase()} tasks`);
    value.nextElementSibling.textContent =
      status === "ENQUEUED" && stats.scheduled ? `${count(stats.scheduled)} scheduled` : "";
  }
}

function queueRow(name) {
  const toggle = h("button", { type: "button", class: "secondary small", dataset: { action: "pause" } }, "Pause");
  toggle.addEventListener("click", () => pauseOrResume(name, toggle));
  return h("tr", { dataset: { queue: name } },
    h("th", { scope: "row" }, h("a", { href: `#/tasks?queue=${encodeURIComponent(name)}` }, name),
      " ", h("span", { class: "badge dead paused", hidden: true }, "paused")),
    ...[0, 1, 2, 3, 4].map(() => h("td", { class: "num" })),
    h("td", { class: "num actions" }, toggle, " ", h("button", {
      type: "button", class: "danger small", "aria-label": `Purge queue ${name}`,
      onclick: () => purge(name),
    }, "Purge")));
}

/** Show a queue's row as paused (with who paused it, when and why) or consumed. */
function showPause(tr, name, pause) {
  const paused = Boolean(pause);
  const mark = tr.querySelector(".paused");
  mark.hidden = !paused;
  mark.title = paused ? `paused ${pause.paused_at || ""} by ${pause.paused_by || "?"}${pause.reason ? `: ${pause.reason}` : ""}` : "";
  const toggle = tr.querySelector("button[data-action]");
  if (toggle.dataset.action !== (paused ? "resume" : "pause")) {
    toggle.dataset.action = paused ? "resume" : "pause";
    toggle.textContent = paused ? "Resume" : "Pause";
  }
  toggle.setAttribute("aria-label", `${paused ? "Resume" : "Pause"} queue ${name}`);
}

async function pauseOrResume(name, button) {
  const action = button.dataset.action;
  button.disabled = true;
  try {
    const { data } = await api(`/queues/${encodeURIComponent(name)}/${action}`, { method: "POST", body: {} });
    showPause(button.closest("tr"), name, data.paused ? data : null);
    notice(`${name} ${data.paused ? "paused: no worker takes its tasks until it is resumed" : "resumed"}.`, "ok");
  } catch (error) {
    reportError(error, `Could not ${action} ${name}`);
  } finally {
    button.disabled = false;
  }
}

/** Queue rows: one per known queue, updated in place. */
function updateQueues(stats) {
  const body = document.querySelector("#queues-table tbody");
  const pauses = stats.paused_queues || {};
  const names = [...new Set([...(info.queues || []), ...Object.keys(stats.by_queue || {}), ...Object.keys(pauses)])];
  const broker = stats.broker?.queues || {};
  for (const stale of body.querySelectorAll("tr")) {
    if (!names.includes(stale.dataset.queue)) stale.remove();
  }
  for (const name of names) {
    let tr = body.querySelector(`tr[data-queue="${CSS.escape(name)}"]`);
    if (!tr) body.append((tr = queueRow(name)));
    const counts = stats.by_queue?.[name] || {};
    const depth = broker[`${info.namespace}.${name}`];
    const values = [counts.ENQUEUED, counts.RUNNING, counts.FAILED].map(count);
    values.push(depth ? count(depth.messages) : "–", depth ? count(depth.consumers) : "–");
    tr.querySelectorAll("td").forEach((td, i) => { if (i < values.length) td.textContent = values[i]; });
    if (stats.paused_queues) showPause(tr, name, pauses[name]);
  }
}

async function purge(name) {
  const ok = await confirmAction(`Purge the queue ${name}?`,
    "Every message waiting in this work queue is dropped and its enqueued tasks are cancelled. Running tasks are not touched.",
    "Purge queue", name);
  if (!ok) return;
  try {
    const { data } = await api(`/queues/${encodeURIComponent(name)}`, { method: "DELETE", params: { confirm: name } });
    notice(`Purged ${name}: ${count(data.purged_messages)} messages dropped, ${count(data.cancelled)} tasks cancelled.`, "ok");
  } catch (error) {
    reportError(error, `Could not purge ${name}`);
  }
}

function brokerText(stats) {
  const broker = stats.broker || {};
  if (!broker.available) return "· broker unreachable";
  const dlq = Object.values(broker.queues || {}).filter((q) => q.kind === "dlq");
  const dead = dlq.reduce((sum, q) => sum + (q.messages || 0), 0);
  return `· broker ok · ${count(dead)} in the broker DLQ`;
}

function legend(id, items) {
  clear(document.getElementById(id)).append(...items.map(({ label, color, value }) => {
    const li = h("li", {}, `${label} `, h("b", {}, value));
    li.style.setProperty("--c", color);
    return li;
  }));
}

function drawCharts() {
  const last = history.at(-1) || {};
  const t = last.throughput || {};
  const l = last.latency || {};
  const pick = (group, key) => history.map((s) => s[group]?.[key] ?? 0);
  const throughput = [
    { label: "succeeded", color: "var(--succeeded)", values: pick("throughput", "succeeded_per_second"), value: rate(t.succeeded_per_second) },
    { label: "failed", color: "var(--failed)", values: pick("throughput", "failed_per_second"), value: rate(t.failed_per_second) },
    { label: "enqueued", color: "var(--enqueued)", values: pick("throughput", "enqueued_per_second"), value: rate(t.enqueued_per_second) },
  ];
  const latency = [
    { label: "queue wait p95", color: "var(--scheduled)", values: pick("latency", "queue_wait_p95"), value: seconds(l.queue_wait_p95) },
    { label: "duration p95", color: "var(--running)", values: pick("latency", "duration_p95"), value: seconds(l.duration_p95) },
    { label: "p50", color: "transparent", values: [], value: `${seconds(l.queue_wait_p50)} / ${seconds(l.duration_p50)}` },
  ];
  sparkline(document.getElementById("chart-throughput"), throughput, {
    format: rate, capacity: Math.max(MIN_POINTS, history.length),
    summary: `Throughput: ${throughput.map((s) => `${s.label} ${s.value} per second`).join(", ")}`,
  });
  sparkline(document.getElementById("chart-latency"), latency.slice(0, 2), {
    format: (v) => seconds(v).replace(" ", ""), capacity: Math.max(MIN_POINTS, history.length),
    summary: `Latency: queue wait p95 ${latency[0].value}, duration p95 ${latency[1].value}`,
  });
  legend("legend-throughput", throughput.map((s) => ({ ...s, value: `${s.value}/s` })));
  legend("legend-latency", latency);
}

/** A new /stats body (from GET /stats or the stream). */
export function showStats(stats) {
  history.push(stats);
  if (history.length > HISTORY) history.shift();
  updateCards(stats);
  updateQueues(stats);
  document.getElementById("broker-state").textContent = brokerText(stats);
  drawCharts();
}

/** One task event from the stream. */
export function showTaskEvent(event) {
  const list = document.getElementById("activity");
  document.getElementById("activity-empty").hidden = true;
  list.prepend(h("li", {},
    h("time", { datetime: event.at }, clock(event.at)),
    badge(event.status),
    h("span", {}, taskLink(event.id), " ", h("span", { class: "muted" }, event.type)),
    h("span", { class: "muted small" }, event.queue)));
  while (list.children.length > ACTIVITY) list.lastChild.remove();
}
