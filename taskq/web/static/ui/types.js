// Task types: GET /types with their pause and concurrency limit, and the tasks each
// has WAITING (from /stats); pause and resume each.

import { api } from "./api.js";
import { h, clear, count } from "./format.js";
import { notice, reportError } from "./ui.js";

async function act(type, action, button) {
  button.disabled = true;
  try {
    await api(`/types/${encodeURIComponent(type.name)}/${action}`, { method: "POST", body: {} });
    notice(`${type.name} ${action === "pause" ? "paused: its tasks wait" : "resumed"}.`, "ok");
  } catch (error) {
    reportError(error, `Could not ${action} ${type.name}`);
  }
  await showTypes();
}

function button(type, action, label) {
  const b = h("button", { type: "button", class: "secondary small", dataset: { action } }, label);
  b.addEventListener("click", () => act(type, action, b));
  return b;
}

function limit(type) {
  const c = type.concurrency;
  if (!c) return h("span", { class: "muted" }, "none");
  return `${count(c.limit)} ${c.key ? `per ${c.key}` : "in all"}`;
}

function row(type, waiting) {
  const waits = waiting[type.name] || {};
  const total = Object.values(waits).reduce((a, b) => a + b, 0);
  const state = type.paused
    ? h("span", { class: "badge dead" }, "paused")
    : h("span", { class: "badge alive" }, type.enabled ? "active" : "disabled");
  const waitingCell = total
    ? h("a", { href: `#/tasks?status=WAITING&type=${encodeURIComponent(type.name)}` },
      count(total), " ", h("span", { class: "muted" }, Object.keys(waits).sort().join(", ")))
    : "0";
  return h("tr", { dataset: { name: type.name } },
    h("td", { class: "mono" }, type.name),
    h("td", {}, type.queue),
    h("td", { class: "num" }, count(type.max_attempts)),
    h("td", { class: "num" }, `${type.timeout}s`),
    h("td", { class: "limit" }, limit(type)),
    h("td", { class: "num waiting" }, waitingCell),
    h("td", { class: "state" }, state),
    h("td", {}, type.paused ? button(type, "resume", "Resume") : button(type, "pause", "Pause")));
}

/** Route #/types (and its periodic refresh). */
export async function showTypes() {
  let types, stats;
  try {
    [{ data: types }, { data: stats }] = await Promise.all([api("/types"), api("/stats")]);
  } catch (error) {
    reportError(error, "Could not list task types");
    return;
  }
  const body = clear(document.querySelector("#types-table tbody"));
  body.append(...types.types.map((t) => row(t, stats.waiting || {})));
  if (!types.types.length) {
    body.append(h("tr", { class: "empty-row" }, h("td", { colspan: 8 }, "No task type yet: workers register theirs at start.")));
  }
  const paused = types.types.filter((t) => t.paused).length;
  document.getElementById("types-summary").textContent =
    `${count(types.types.length)} type${types.types.length === 1 ? "" : "s"}, ${count(paused)} paused.`;
}
