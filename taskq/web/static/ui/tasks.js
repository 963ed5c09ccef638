// Task list: filters, keyset "Load more", live status updates.

import { api } from "./api.js";
import { h, badge, clear, count, taskLink, when } from "./format.js";
import { reportError } from "./ui.js";

const PAGE = 50;
const FILTERS = ["status", "type", "queue", "scheduled"];
const form = () => document.getElementById("task-filters");
const tbody = () => document.querySelector("#tasks-table tbody");
let filters = {};
let cursor = null;
let shown = 0;
let paged = false;
let unseen = 0;
let refreshTimer = null;

function row(task) {
  const due = task.status === "ENQUEUED" ? task.run_at : task.finished_at;
  return h("tr", { dataset: { id: task.id } },
    h("td", {}, taskLink(task.id)),
    h("td", {}, task.type),
    h("td", {}, task.queue),
    h("td", { class: "status" }, badge(task.status), task.scheduled ? [" ", h("span", { class: "badge scheduled" }, "scheduled")] : null),
    h("td", { class: "num" }, `${task.attempts}/${task.max_attempts}`),
    h("td", {}, when(task.created_at)),
    h("td", {}, task.scheduled || task.status !== "ENQUEUED" ? when(due, { relativeText: true }) : h("span", { class: "muted" }, "–")));
}

async function load(append) {
  const params = { ...filters, limit: PAGE, cursor: append ? cursor : undefined };
  let data;
  try {
    ({ data } = await api("/tasks", { params }));
  } catch (error) {
    reportError(error, "Could not list tasks");
    return;
  }
  if (!append) {
    clear(tbody());
    shown = 0;
    unseen = 0;
    document.getElementById("tasks-new").hidden = true;
  }
  paged = append;
  tbody().append(...data.tasks.map(row));
  shown += data.tasks.length;
  if (!shown) tbody().append(h("tr", { class: "empty-row" }, h("td", { colspan: 7 }, "No tasks match these filters.")));
  cursor = data.next_cursor;
  document.getElementById("tasks-more").hidden = !cursor;
  document.getElementById("tasks-summary").textContent =
    `${count(shown)} task${shown === 1 ? "" : "s"} shown${cursor ? "; more below" : ""}.`;
}

function readForm() {
  const data = new FormData(form());
  filters = {};
  for (const name of FILTERS) {
    const value = String(data.get(name) || "").trim();
    if (value) filters[name] = value;
  }
}

function writeForm() {
  for (const name of FILTERS) form().elements[name].value = filters[name] || "";
}

/** Route #/tasks?status=…: filters from the hash. */
export function showTasks(query) {
  filters = {};
  for (const name of FILTERS) if (query.get(name)) filters[name] = query.get(name);
  writeForm();
  return load(false);
}

function matches(event) {
  if (filters.status && !filters.status.split(",").includes(event.status)) return false;
  if (filters.type && filters.type !== event.type) return false;
  if (filters.queue && filters.queue !== event.queue) return false;
  return !filters.scheduled; // scheduled-ness is not in the event: reload shows it
}

/** A task event from the stream, while the list is on screen. */
export function taskEvent(event) {
  const existing = tbody().querySelector(`tr[data-id="${CSS.escape(event.id)}"]`);
  if (existing) {
    existing.querySelector(".status").replaceChildren(badge(event.status));
    existing.classList.remove("flash");
    void existing.offsetWidth; // restart the highlight
    existing.classList.add("flash");
    return;
  }
  if (event.status !== "ENQUEUED" || event.attempt !== 0 || !matches(event)) return;
  if (paged) {
    unseen += 1;
    const banner = document.getElementById("tasks-new");
    banner.querySelector("span").textContent = `${count(unseen)} new task${unseen === 1 ? "" : "s"}.`;
    banner.hidden = false;
    return;
  }
  clearTimeout(refreshTimer); // a burst of enqueues: one reload
  refreshTimer = setTimeout(() => load(false), 400);
}

export function initTasks() {
  form().addEventListener("submit", (event) => {
    event.preventDefault();
    readForm();
    const query = new URLSearchParams(filters).toString();
    const hash = `#/tasks${query ? `?${query}` : ""}`;
    if (location.hash === hash) load(false);
    else location.hash = hash;
  });
  form().addEventListener("reset", () => setTimeout(() => { location.hash = "#/tasks"; }));
  document.getElementById("tasks-more").addEventListener("click", () => load(true));
  document.querySelector("#tasks-new button").addEventListener("click", () => load(false));
}
