// Schedules: GET /schedules with their next fires; pause, resume and trigger each.

import { api } from "./api.js";
import { h, clear, count, when, badge, taskLink } from "./format.js";
import { notice, reportError } from "./ui.js";

function timing(schedule) {
  if (schedule.cron) return `${schedule.cron} (${schedule.timezone})`;
  return `every ${schedule.every}s`;
}

async function act(schedule, action, button) {
  button.disabled = true;
  try {
    const { data } = await api(`/schedules/${encodeURIComponent(schedule.name)}/${action}`, { method: "POST", body: {} });
    if (action === "trigger") notice(`Enqueued task ${data.task_id} for ${schedule.name}.`, "ok");
    else notice(`${schedule.name} ${action === "pause" ? "paused" : "resumed"}.`, "ok");
  } catch (error) {
    reportError(error, `Could not ${action} ${schedule.name}`);
  }
  await showSchedules();
}

function button(schedule, action, label) {
  const b = h("button", { type: "button", class: "secondary small", dataset: { action } }, label);
  b.addEventListener("click", () => act(schedule, action, b));
  return b;
}

function row(schedule) {
  const next = schedule.paused ? h("span", { class: "badge dead" }, "paused") : when(schedule.next_fire_at);
  const last = schedule.last_task_id
    ? h("span", {}, taskLink(schedule.last_task_id), " ", schedule.last_task_status ? badge(schedule.last_task_status) : "")
    : "—";
  return h("tr", { dataset: { name: schedule.name } },
    h("td", { class: "mono" }, schedule.name),
    h("td", { class: "mono" }, timing(schedule)),
    h("td", {}, schedule.type),
    h("td", { class: "next" }, next),
    h("td", {}, last),
    h("td", { class: "num" }, count(schedule.fires)),
    h("td", { class: "num" }, count(schedule.skipped)),
    h("td", { class: "error" }, schedule.last_error || ""),
    h("td", {},
      schedule.paused ? button(schedule, "resume", "Resume") : button(schedule, "pause", "Pause"),
      " ",
      button(schedule, "trigger", "Run now")));
}

/** Route #/schedules (and its periodic refresh). */
export async function showSchedules() {
  let data;
  try {
    ({ data } = await api("/schedules", { params: { limit: 500 } }));
  } catch (error) {
    reportError(error, "Could not list schedules");
    return;
  }
  const body = clear(document.querySelector("#schedules-table tbody"));
  body.append(...data.schedules.map(row));
  if (!data.schedules.length) {
    body.append(h("tr", { class: "empty-row" }, h("td", { colspan: 9 }, "No schedule yet: PUT /schedules/{name}, or schedule= on a handler.")));
  }
  const paused = data.schedules.filter((s) => s.paused).length;
  document.getElementById("schedules-summary").textContent =
    `${count(data.schedules.length)} schedule${data.schedules.length === 1 ? "" : "s"}, ${count(paused)} paused${data.next_after ? "; the first 500 shown" : ""}.`;
}
