// HTTP calls to the taskq API with API-key handling.
//
// The key lives in sessionStorage (this tab only). On a 401 the key dialog
// opens; the call is retried with the key the operator enters.

const KEY = "taskq.apiKey";
const base = new URL("..", document.baseURI); // /ui/ -> the API root

export class ApiError extends Error {
  constructor(status, problem) {
    super(problem?.detail || problem?.title || `HTTP ${status}`);
    this.status = status;
    this.problem = problem || {};
  }
}

export function apiKey() {
  return sessionStorage.getItem(KEY);
}

export function forgetKey() {
  sessionStorage.removeItem(KEY);
  document.dispatchEvent(new CustomEvent("taskq:key"));
}

export function apiUrl(path, params) {
  const url = new URL(path.replace(/^\//, ""), base);
  for (const [name, value] of Object.entries(params || {})) {
    if (value !== undefined && value !== null && value !== "") url.searchParams.set(name, value);
  }
  return url;
}

export function authHeaders() {
  const key = apiKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

let pendingKey = null; // one dialog for every call that got a 401 at the same time

/** Ask the operator for a key; resolves once one was entered. */
export function askForKey(refused) {
  if (pendingKey) return pendingKey;
  const dialog = document.getElementById("key-dialog");
  const form = document.getElementById("key-form");
  const input = document.getElementById("key-input");
  document.getElementById("key-error").hidden = !refused;
  input.value = "";
  pendingKey = new Promise((resolve) => {
    const submit = (event) => {
      event.preventDefault();
      const value = input.value.trim();
      if (!value) return;
      sessionStorage.setItem(KEY, value);
      form.removeEventListener("submit", submit);
      dialog.removeEventListener("cancel", keep);
      dialog.close();
      pendingKey = null;
      document.dispatchEvent(new CustomEvent("taskq:key"));
      resolve(value);
    };
    const keep = (event) => event.preventDefault(); // Escape: nothing works without a key
    form.addEventListener("submit", submit);
    dialog.addEventListener("cancel", keep);
  });
  dialog.showModal();
  input.focus();
  return pendingKey;
}

/** fetch() with the key; on 401 asks for one and tries again. JSON in, JSON out. */
export async function api(path, { method = "GET", params, body } = {}) {
  for (;;) {
    const headers = { Accept: "application/json", ...authHeaders() };
    const init = { method, headers };
    // The API refuses a call that changes state without this type, even with
    // no body: no other site can send it without the browser asking first.
    if (method !== "GET") headers["Content-Type"] = "application/json";
    if (body !== undefined) init.body = JSON.stringify(body);
    const response = await fetch(apiUrl(path, params), init);
    if (response.status === 401) {
      await askForKey(Boolean(apiKey()));
      continue;
    }
    const text = await response.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch {
      data = { detail: text.slice(0, 200) };
    }
    if (!response.ok) throw new ApiError(response.status, data);
    return { status: response.status, data };
  }
}
