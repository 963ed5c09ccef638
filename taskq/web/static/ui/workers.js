// Workers: the fleet from GET /workers, refreshed while on screen.

import { api } from "./api.js";
import { h, clear, count, when } from "./format.js";
import { reportError } from "./ui.js";

function row(worker) {
  return h("tr", { dataset: { id: worker.id } },
    h("td", { class: "mono" }, worker.id),
    h("td", {}, `${worker.hostname} / ${worker.pid}`),
    h("td", {}, (worker.queues || []).join(", ")),
    h("td", { class: "num" }, count(worker.in_flight)),
    h("td", { class: "num" }, count(worker.concurrency)),
    h("td", { class: "num" }, count(worker.prefetch)),
    h("td", {}, when(worker.started_at)),
    h("td", {}, when(worker.last_heartbeat, { relativeText: true })),
    h("td", {}, h("span", { class: `badge ${worker.alive ? "alive" : "dead"}` }, worker.alive ? "alive" : "silent")));
}

/** Route #/workers (and its periodic refresh). */
export async function showWorkers() {
  let data;
  try {
    ({ data } = await api("/workers"));
  } catch (error) {
    reportError(error, "Could not list workers");
    return;
  }
  const body = clear(document.querySelector("#workers-table tbody"));
  body.append(...data.workers.map(row));
  if (!data.workers.length) body.append(h("tr", { class: "empty-row" }, h("td", { colspan: 9 }, "No worker has reported in.")));
  const alive = data.workers.filter((w) => w.alive).length;
  const inFlight = data.workers.reduce((sum, w) => sum + (w.in_flight || 0), 0);
  document.getElementById("workers-summary").textContent =
    `${count(alive)} alive of ${count(data.workers.length)}; ${count(inFlight)} tasks in flight.`;
}
