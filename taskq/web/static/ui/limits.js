// Rate limits: GET /limits, each limiter with the types that use it (read-only).

import { api } from "./api.js";
import { h, clear, count, when } from "./format.js";
import { reportError } from "./ui.js";

function rate(limiter) {
  const per = limiter.per === 1 ? "second" : `${limiter.per}s`;
  return `${count(limiter.limit)} per ${per}` + (limiter.burst > 1 ? `, burst ${limiter.burst}` : "");
}

function row(limiter) {
  return h("tr", { dataset: { name: limiter.name } },
    h("td", { class: "mono" }, limiter.name),
    h("td", { class: "rate" }, rate(limiter)),
    h("td", { class: "mono" }, limiter.key || "—"),
    h("td", { class: "types" }, limiter.types.length ? limiter.types.join(", ") : "—"),
    h("td", {}, limiter.type ? "the type's own" : "shared"),
    h("td", {}, limiter.busy_until ? when(limiter.busy_until) : "—"));
}

/** Route #/limits (and its periodic refresh). */
export async function showLimits() {
  let data;
  try {
    ({ data } = await api("/limits"));
  } catch (error) {
    reportError(error, "Could not list rate limits");
    return;
  }
  const body = clear(document.querySelector("#limits-table tbody"));
  body.append(...data.limits.map(row));
  if (!data.limits.length) {
    body.append(h("tr", { class: "empty-row" }, h("td", { colspan: 6 }, "No rate limit: PUT /limits/{name}, rate_limit on a type, or rate_limit= on a handler.")));
  }
  document.getElementById("limits-summary").textContent =
    `${count(data.limits.length)} rate limiter${data.limits.length === 1 ? "" : "s"}.`;
}
