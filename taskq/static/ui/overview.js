// Overview: counts by status and queue, sparklines, live activity.

import { sparkline } from "./charts.js";
import { h, badge, clear, clock, count, rate, seconds, STATUSES, taskLink } from "./format.js";

const HISTORY = 120; // samples kept (about two minutes at one per second)
const ACTIVITY = 60;
const history = [];
let info = { namespace: "taskq", queues: [] };

const COLORS = {
  ENQUEUED: "var(--enqueued)", RUNNING: "var(--running)", SUCCEEDED: "var(--succeeded)",
  FAILED: "var(--failed)", CANCELLED: "var(--cancelled)",
};

export function setInfo(value) {
  info = value;
}

function card(status, stats) {
  const n = stats.by_status?.[status] ?? 0;
  const sub = status === "ENQUEUED" && stats.scheduled ? `${count(stats.scheduled)} scheduled` : "";
  const link = h("a", { class: "card", href: `#/tasks?status=${status}`, "aria-label": `${count(n)} ${status.toLowerCase()} tasks` },
    h("div", { class: "label" }, status.toLowerCase()),
    h("div", { class: "value", dataset: { status } }, count(n)),
    h("div", { class: "sub" }, sub));
  link.style.setProperty("--c", COLORS[status]);
  return h("li", {}, link);
}

function queueRows(stats) {
  const names = new Set([...(info.queues || []), ...Object.keys(stats.by_queue || {})]);
  const broker = stats.broker?.queues || {};
  const rows = [...names].map((name) => {
    const counts = stats.by_queue?.[name] || {};
    const depth = broker[`${info.namespace}.${name}`];
    return h("tr", { dataset: { queue: name } },
      h("th", { scope: "row" }, h("a", { href: `#/tasks?queue=${encodeURIComponent(name)}` }, name)),
      h("td", { class: "num" }, count(counts.ENQUEUED)),
      h("td", { class: "num" }, count(counts.RUNNING)),
      h("td", { class: "num" }, count(counts.FAILED)),
      h("td", { class: "num" }, depth ? count(depth.messages) : "–"),
      h("td", { class: "num" }, depth ? count(depth.consumers) : "–"));
  });
  return rows.length ? rows : [h("tr", { class: "empty-row" }, h("td", { colspan: 6 }, "No queues yet."))];
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
    format: rate, capacity: HISTORY,
    summary: `Throughput: ${throughput.map((s) => `${s.label} ${s.value} per second`).join(", ")}`,
  });
  sparkline(document.getElementById("chart-latency"), latency.slice(0, 2), {
    format: (v) => seconds(v).replace(" ", ""), capacity: HISTORY,
    summary: `Latency: queue wait p95 ${latency[0].value}, duration p95 ${latency[1].value}`,
  });
  legend("legend-throughput", throughput.map((s) => ({ ...s, value: `${s.value}/s` })));
  legend("legend-latency", latency);
}

/** A new /stats body (from GET /stats or the stream). */
export function showStats(stats) {
  history.push(stats);
  if (history.length > HISTORY) history.shift();
  clear(document.getElementById("status-cards")).append(...STATUSES.map((s) => card(s, stats)));
  clear(document.querySelector("#queues-table tbody")).append(...queueRows(stats));
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
