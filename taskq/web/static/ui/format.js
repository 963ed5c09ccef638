// Small DOM and formatting helpers.

/** Create an element: h("td", {class: "num"}, "3", child...). */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(el.dataset, value);
    else el.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

export const STATUSES = ["ENQUEUED", "WAITING", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"];

export function badge(status) {
  return h("span", { class: `badge s-${status}` }, status.toLowerCase());
}

export function shortId(id) {
  return String(id).slice(0, 8);
}

export function taskLink(id) {
  return h("a", { href: `#/task/${id}`, class: "mono", title: id }, shortId(id));
}

const numberFormat = new Intl.NumberFormat();
export function count(n) {
  return numberFormat.format(n ?? 0);
}

export function rate(n) {
  if (n === null || n === undefined) return "–";
  return n >= 100 ? n.toFixed(0) : n >= 10 ? n.toFixed(1) : n.toFixed(2);
}

export function seconds(s) {
  if (s === null || s === undefined) return "–";
  if (s < 1) return `${Math.round(s * 1000)} ms`;
  if (s < 120) return `${s.toFixed(s < 10 ? 2 : 1)} s`;
  if (s < 7200) return `${(s / 60).toFixed(1)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

/** "3 s ago", "in 5 min": relative to now. */
export function relative(iso) {
  if (!iso) return "–";
  const delta = (new Date(iso).getTime() - Date.now()) / 1000;
  const abs = Math.abs(delta);
  let text;
  if (abs < 1) return "now";
  if (abs < 60) text = `${Math.round(abs)} s`;
  else if (abs < 3600) text = `${Math.round(abs / 60)} min`;
  else if (abs < 86400) text = `${(abs / 3600).toFixed(1)} h`;
  else text = `${(abs / 86400).toFixed(1)} d`;
  return delta > 0 ? `in ${text}` : `${text} ago`;
}

/** A <time> element with the local date/time and a relative title. */
export function when(iso, { relativeText = false } = {}) {
  if (!iso) return h("span", { class: "muted" }, "–");
  const local = localTime(iso);
  return h("time", { datetime: iso, title: relativeText ? local : relative(iso) },
    relativeText ? relative(iso) : local);
}

export function clock(iso) {
  return new Date(iso).toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23" });
}

/** A date and time in the operator's locale, to the second. */
export function localTime(iso) {
  return new Date(iso).toLocaleString(undefined, {
    month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23",
  });
}

export function json(value) {
  if (value === null || value === undefined) return "null";
  return JSON.stringify(value, null, 2);
}

export function clear(el) {
  el.replaceChildren();
  return el;
}
