// Dead letters: FAILED tasks, replay one or all matching the filter.

import { api } from "./api.js";
import { h, clear, count, taskLink, when } from "./format.js";
import { confirmAction, notice, reportError } from "./ui.js";

const PAGE = 50;
const form = () => document.getElementById("dlq-filters");
const tbody = () => document.querySelector("#dlq-table tbody");
let filters = {};
let cursor = null;
let shown = 0;

function row(task) {
  return h("tr", { dataset: { id: task.id } },
    h("td", {}, taskLink(task.id)),
    h("td", {}, task.type),
    h("td", {}, task.queue),
    h("td", { class: "num" }, `${task.attempts}/${task.max_attempts}`),
    h("td", {}, when(task.finished_at, { relativeText: true })),
    h("td", { class: "error", title: task.last_error || "" }, task.last_error || "–"),
    h("td", { class: "num" }, h("button", {
      type: "button", class: "secondary small", "aria-label": `Replay task ${task.id}`,
      onclick: (event) => replay({ ids: [task.id] }, event.currentTarget),
    }, "Replay")));
}

async function load(append) {
  let data;
  try {
    ({ data } = await api("/dlq", { params: { ...filters, limit: PAGE, cursor: append ? cursor : undefined } }));
  } catch (error) {
    reportError(error, "Could not list dead letters");
    return;
  }
  if (!append) {
    clear(tbody());
    shown = 0;
  }
  tbody().append(...data.tasks.map(row));
  shown += data.tasks.length;
  if (!shown) tbody().append(h("tr", { class: "empty-row" }, h("td", { colspan: 7 }, "No failed tasks. Nice.")));
  cursor = data.next_cursor;
  document.getElementById("dlq-more").hidden = !cursor;
  document.getElementById("dlq-replay-all").disabled = !shown;
  document.getElementById("dlq-summary").textContent =
    `${count(shown)} failed task${shown === 1 ? "" : "s"} shown${cursor ? "; more below" : ""}.`;
  document.getElementById("dlq-broker").textContent = data.broker_messages === null || data.broker_messages === undefined
    ? "" : `The broker's DLQ holds ${count(data.broker_messages)} message${data.broker_messages === 1 ? "" : "s"}.`;
}

async function replay(body, button) {
  if (button) button.disabled = true;
  try {
    const { data } = await api("/dlq/replay", { method: "POST", body });
    notice(`Replayed ${count(data.replayed)} task${data.replayed === 1 ? "" : "s"}.`, "ok");
  } catch (error) {
    reportError(error, "Could not replay");
  }
  await load(false);
}

async function replayAll() {
  const scope = [filters.type && `type ${filters.type}`, filters.queue && `queue ${filters.queue}`].filter(Boolean).join(", ");
  const ok = await confirmAction("Replay all matching failed tasks?",
    `Every FAILED task${scope ? ` with ${scope}` : ""} is enqueued again with fresh attempts.`, "Replay all");
  if (ok) await replay({ ...filters });
}

/** Route #/dlq. */
export function showDlq(query) {
  filters = {};
  for (const name of ["type", "queue"]) if (query.get(name)) filters[name] = query.get(name);
  for (const name of ["type", "queue"]) form().elements[name].value = filters[name] || "";
  return load(false);
}

export function initDlq() {
  form().addEventListener("submit", (event) => {
    event.preventDefault();
    const data = new FormData(form());
    const params = new URLSearchParams();
    for (const name of ["type", "queue"]) if (String(data.get(name) || "").trim()) params.set(name, String(data.get(name)).trim());
    const hash = `#/dlq${params.size ? `?${params}` : ""}`;
    if (location.hash === hash) showDlq(params);
    else location.hash = hash;
  });
  document.getElementById("dlq-replay-all").addEventListener("click", replayAll);
  document.getElementById("dlq-more").addEventListener("click", () => load(true));
}

/** A task event from the stream: a new failure or a replay changes the list. */
let reloadTimer = null;
export function taskEvent(event) {
  if (event.status !== "FAILED" && !tbody().querySelector(`tr[data-id="${CSS.escape(event.id)}"]`)) return;
  clearTimeout(reloadTimer);
  reloadTimer = setTimeout(() => load(false), 500);
}
