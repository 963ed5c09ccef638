// taskq dashboard: routing, the live stream and wiring of the views.

import { api, apiKey, forgetKey } from "./api.js";
import { h, clear } from "./format.js";
import * as overview from "./overview.js";
import * as tasks from "./tasks.js";
import * as task from "./task.js";
import * as dlq from "./dlq.js";
import * as workers from "./workers.js";
import * as schedules from "./schedules.js";
import * as types from "./types.js";
import * as limits from "./limits.js";
import * as workflows from "./workflows.js";
import { openStream } from "./stream.js";
import { notice, reportError } from "./ui.js";

const VIEWS = ["overview", "tasks", "task", "dlq", "workflows", "workflow", "types", "schedules", "limits", "workers"];
const REFRESH_EVERY = 5000;
const STATS_FALLBACK_EVERY = 5000;
let view = null;
let refreshTimer = null;
let workflowTimer = null;
let lastStats = 0;

function show(name) {
  view = name;
  for (const v of VIEWS) document.getElementById(`view-${v}`).hidden = v !== name;
  const section = name === "task" ? "tasks" : name === "workflow" ? "workflows" : name;
  for (const link of document.querySelectorAll("nav a")) {
    if (link.dataset.view === section) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  document.title = `taskq · ${document.querySelector(`#view-${name} h1`).textContent.trim()}`;
}

async function route() {
  const hash = location.hash.replace(/^#/, "") || "/";
  const [path, queryString] = hash.split("?");
  const query = new URLSearchParams(queryString || "");
  clearInterval(refreshTimer);
  clearTimeout(workflowTimer);
  notice("");
  const taskMatch = path.match(/^\/task\/(.+)$/);
  if (taskMatch) {
    show("task");
    await task.showTask(decodeURIComponent(taskMatch[1]));
  } else if (path.match(/^\/workflow\/(.+)$/)) {
    show("workflow");
    const id = decodeURIComponent(path.match(/^\/workflow\/(.+)$/)[1]);
    // Read again while it runs, each read scheduled once the last has ended.
    let wait = await workflows.showWorkflow(id);
    const again = async () => {
      if (location.hash.replace(/^#/, "").split("?")[0] !== path) return; // left the page
      wait = await workflows.showWorkflow(id);
      if (wait) workflowTimer = setTimeout(again, wait);
    };
    if (wait) workflowTimer = setTimeout(again, wait);
  } else if (path === "/workflows") {
    show("workflows");
    await workflows.showWorkflows(query);
    refreshTimer = setInterval(() => workflows.showWorkflows(null), REFRESH_EVERY);
  } else if (path === "/tasks") {
    show("tasks");
    await tasks.showTasks(query);
  } else if (path === "/dlq") {
    show("dlq");
    await dlq.showDlq(query);
  } else if (path === "/types") {
    show("types");
    await types.showTypes();
    refreshTimer = setInterval(types.showTypes, REFRESH_EVERY);
  } else if (path === "/schedules") {
    show("schedules");
    await schedules.showSchedules();
    refreshTimer = setInterval(schedules.showSchedules, REFRESH_EVERY);
  } else if (path === "/limits") {
    show("limits");
    await limits.showLimits();
    refreshTimer = setInterval(limits.showLimits, REFRESH_EVERY);
  } else if (path === "/workers") {
    show("workers");
    await workers.showWorkers();
    refreshTimer = setInterval(workers.showWorkers, REFRESH_EVERY);
  } else {
    show("overview");
  }
}

function onStreamEvent(name, payload) {
  if (name === "stats") {
    lastStats = Date.now();
    overview.showStats(payload);
  } else if (name === "task") {
    overview.showTaskEvent(payload);
    if (view === "tasks") tasks.taskEvent(payload);
    if (view === "task") task.taskEvent(payload);
    if (view === "dlq") dlq.taskEvent(payload);
  } else if (name === "progress") {
    if (view === "task") task.progressEvent(payload);
  }
}

const STATE_TEXT = { connecting: "Connecting", live: "Live", error: "Reconnecting" };
function onStreamState(state) {
  const el = document.getElementById("live");
  el.dataset.state = state;
  el.textContent = STATE_TEXT[state];
}

async function loadInfo() {
  try {
    const { data } = await api("/");
    overview.setInfo(data);
    document.getElementById("namespace").textContent = data.namespace;
    for (const select of document.querySelectorAll(".queue-select")) {
      const keep = select.value;
      clear(select).append(h("option", { value: "" }, "Any"), ...data.queues.map((q) => h("option", {}, q)));
      select.value = keep;
    }
  } catch (error) {
    reportError(error, "Could not reach the API");
  }
}

async function loadTypes() {
  try {
    const { data } = await api("/types");
    clear(document.getElementById("known-types")).append(...data.types.map((t) => h("option", { value: t.name })));
  } catch {
    // Only suggestions for the type filters.
  }
}

async function refreshStats() {
  if (Date.now() - lastStats < STATS_FALLBACK_EVERY) return; // the stream delivers
  try {
    const { data } = await api("/stats");
    overview.showStats(data);
  } catch (error) {
    if (error.status !== 401) onStreamState("error");
  }
}

function initKeyButton() {
  const button = document.getElementById("forget-key");
  const update = () => { button.hidden = !apiKey(); };
  button.addEventListener("click", () => {
    forgetKey();
    location.reload();
  });
  document.addEventListener("taskq:key", update);
  update();
}

function initSearch() {
  document.getElementById("find-task").addEventListener("submit", (event) => {
    event.preventDefault();
    const id = document.getElementById("find-id").value.trim();
    if (id) location.hash = `#/task/${encodeURIComponent(id)}`;
  });
}

async function main() {
  initKeyButton();
  initSearch();
  tasks.initTasks();
  task.initTask();
  dlq.initDlq();
  workflows.initWorkflows();
  window.addEventListener("hashchange", route);
  await loadInfo(); // may ask for the key first
  loadTypes();
  await refreshStats();
  const stream = openStream({ onEvent: onStreamEvent, onState: onStreamState });
  document.addEventListener("taskq:key", () => stream.restart());
  setInterval(refreshStats, STATS_FALLBACK_EVERY); // if the stream is down, poll
  await route();
}

main();
