// Task inspector: progress, facts, payload/result/error, event timeline, cancel and retry.

import { api } from "./api.js";
import { h, badge, clear, json, localTime, seconds, when } from "./format.js";
import { confirmAction, notice, reportError } from "./ui.js";

let current = null; // the id on screen
let reloadTimer = null;

const FACTS = [
  ["Type", (t) => t.type],
  ["Queue", (t) => t.queue],
  ["Attempts", (t) => `${t.attempts} of ${t.max_attempts}`],
  ["Timeout", (t) => (t.timeout ? seconds(t.timeout) : "–")],
  ["Created", (t) => when(t.created_at)],
  ["Due", (t) => when(t.run_at)],
  ["Started", (t) => when(t.started_at)],
  ["Finished", (t) => when(t.finished_at)],
  ["Updated", (t) => when(t.updated_at)],
  ["Waiting for", (t) => (t.wait_reason ? WAIT_REASONS[t.wait_reason] || t.wait_reason : null)],
  ["Workflow", (t) => (t.workflow_id ? h("a", { href: `#/workflow/${t.workflow_id}`, class: "mono", id: "task-workflow" }, t.workflow_id) : null)],
  ["Worker", (t) => t.worker_id || "–"],
  ["Idempotency key", (t) => t.idempotency_key || "–"],
  ["Unique key", (t) => (t.unique ? uniqueFact(t.unique) : null)],
  ["Cancel requested", (t) => (t.cancel_requested_at ? when(t.cancel_requested_at) : null)],
];

// A unique task's key (null once released), the states that hold it, its bound in time
// and whether it holds the key now.
function uniqueFact(unique) {
  return h("span", { id: "task-unique" },
    unique.key ?? "released",
    ` · while ${unique.while.replaceAll("_", " ")}`,
    unique.until ? [" · until ", when(unique.until)] : null,
    unique.held ? " · held" : " · not held");
}

const WAIT_REASONS = { paused: "its type to be resumed", concurrency: "a free slot of its concurrency key" };
const KNOWN_EVENT_FIELDS = new Set(["id", "status", "previous_status", "attempt", "error", "worker_id", "run_at", "at", "task_id"]);

function eventItem(event) {
  const parts = [];
  if (event.previous_status) parts.push(`from ${event.previous_status.toLowerCase()}`);
  parts.push(`attempt ${event.attempt}`);
  if (event.worker_id) parts.push(`worker ${event.worker_id}`);
  if (event.status === "ENQUEUED" && event.run_at) parts.push(`due ${localTime(event.run_at)}`);
  for (const [name, value] of Object.entries(event)) {
    if (!KNOWN_EVENT_FIELDS.has(name) && value !== null && value !== undefined && value !== "") {
      parts.push(`${name.replaceAll("_", " ")}: ${typeof value === "object" ? JSON.stringify(value) : value}`);
    }
  }
  const li = h("li", { class: `s-${event.status}` },
    h("div", {}, badge(event.status), " ", h("span", { class: "when" }, when(event.at))),
    h("div", { class: "detail" }, parts.join(" · ")),
    event.error ? h("div", { class: "detail err" }, event.error) : null);
  return li;
}

function render(task, events) {
  document.getElementById("task-missing").hidden = true;
  document.getElementById("task-body").hidden = false;
  document.getElementById("task-status").replaceWith(Object.assign(badge(task.status), { id: "task-status" }));
  document.getElementById("task-scheduled").hidden = !task.scheduled;
  document.getElementById("task-cancel-requested").hidden = !task.cancel_requested_at;
  const limited = document.getElementById("task-limited");
  limited.hidden = !task.limited_by;
  limited.textContent = task.limited_by ? `rate limited by ${task.limited_by} until ${localTime(task.limited_until)}` : "";
  const cancellable = task.status === "ENQUEUED" || task.status === "WAITING" || (task.status === "RUNNING" && !task.cancel_requested_at);
  document.getElementById("task-cancel").hidden = !cancellable;
  document.getElementById("task-retry").hidden = !(task.status === "FAILED" || task.status === "CANCELLED");
  const facts = clear(document.getElementById("task-facts"));
  for (const [label, value] of FACTS) {
    const content = value(task);
    if (content !== null) facts.append(h("div", {}, h("dt", {}, label), h("dd", {}, content)));
  }
  document.getElementById("task-payload").textContent = json(task.payload);
  document.getElementById("result-panel").hidden = task.result === null || task.result === undefined;
  document.getElementById("task-result").textContent = json(task.result);
  document.getElementById("error-panel").hidden = !task.last_error;
  document.getElementById("task-error").textContent = task.last_error || "";
  clear(document.getElementById("timeline")).append(...events.map(eventItem));
  showProgress(task.progress);
}

/** The latest progress report (from GET /tasks/{id} or the stream), or nothing. */
function showProgress(progress) {
  const block = document.getElementById("task-progress");
  block.hidden = !progress;
  if (!progress) return;
  const bar = document.getElementById("task-progress-bar");
  bar.value = progress.fraction;
  const percent = `${Math.round(progress.fraction * 1000) / 10}%`;
  bar.setAttribute("aria-valuetext", percent);
  document.getElementById("task-progress-text").textContent = `${percent} · attempt ${progress.attempt}`;
  const details = progress.details ? Object.entries(progress.details).map(([k, v]) => `${k}: ${typeof v === "object" ? JSON.stringify(v) : v}`).join(" · ") : "";
  document.getElementById("task-progress-details").textContent = details;
}

async function load(id) {
  try {
    const [{ data: task }, { data: history }] = await Promise.all([
      api(`/tasks/${encodeURIComponent(id)}`),
      api(`/tasks/${encodeURIComponent(id)}/events`),
    ]);
    if (current === id) render(task, history.events);
  } catch (error) {
    if (error.status === 404) {
      document.getElementById("task-missing").hidden = false;
      document.getElementById("task-body").hidden = true;
    } else {
      reportError(error, "Could not load the task");
    }
  }
}

/** Route #/task/<id>. */
export async function showTask(id) {
  current = id;
  document.getElementById("task-id").textContent = id;
  document.getElementById("task-body").hidden = true;
  document.getElementById("task-missing").hidden = true;
  await load(id);
  document.getElementById("h-task").focus();
}

/** A task event from the stream: reload when it is about the task on screen. */
export function taskEvent(event) {
  if (event.id !== current) return;
  clearTimeout(reloadTimer);
  reloadTimer = setTimeout(() => load(current), 200);
}

/** A progress report from the stream: shown at once when it is about the task on screen. */
export function progressEvent(report) {
  if (report.id !== current) return;
  showProgress(report);
}

async function act(action) {
  const id = current;
  const verb = action === "cancel" ? "Cancel" : "Retry";
  const text = action === "cancel"
    ? "An enqueued or scheduled task is cancelled at once and never runs; a running task is asked to stop."
    : "The task is enqueued again with fresh attempts.";
  if (!(await confirmAction(`${verb} this task?`, text, `${verb} task`))) return;
  try {
    const { status } = await api(`/tasks/${encodeURIComponent(id)}/${action}`, { method: "POST", body: {} });
    notice(action === "cancel" ? (status === 202 ? "Cancel requested; the handler is asked to stop." : "Task cancelled.") : "Task enqueued again.", "ok");
  } catch (error) {
    reportError(error, `Could not ${action} the task`);
  }
  await load(id);
}

export function initTask() {
  document.getElementById("task-cancel").addEventListener("click", () => act("cancel"));
  document.getElementById("task-retry").addEventListener("click", () => act("retry"));
}
