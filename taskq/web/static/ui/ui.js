// Shared page pieces: notices and the confirmation dialog.

let noticeTimer = null;

/** Show a message at the top; errors stay until replaced, "ok" ones fade. */
export function notice(message, kind = "error") {
  const el = document.getElementById("notice");
  el.textContent = message;
  el.dataset.kind = kind;
  el.hidden = !message;
  clearTimeout(noticeTimer);
  if (kind === "ok") noticeTimer = setTimeout(() => (el.hidden = true), 4000);
}

export function reportError(error, what) {
  const field = error?.problem?.field ? ` (${error.problem.field})` : "";
  notice(`${what}: ${error.message}${field}`);
}

/**
 * Ask the operator to confirm; resolves true or false. With `typed`, the
 * operator must type that exact text first (for destructive actions).
 */
export function confirmAction(title, text, okLabel, typed = null) {
  const dialog = document.getElementById("confirm-dialog");
  const ok = document.getElementById("confirm-ok");
  const input = document.getElementById("confirm-input");
  document.getElementById("confirm-title").textContent = title;
  document.getElementById("confirm-text").textContent = text;
  document.getElementById("confirm-typed").hidden = typed === null;
  document.getElementById("confirm-label").textContent = typed === null ? "" : `Type ${typed} to confirm`;
  input.value = "";
  ok.textContent = okLabel;
  ok.disabled = typed !== null;
  const check = () => { ok.disabled = input.value !== typed; };
  input.addEventListener("input", check);
  dialog.returnValue = "";
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      input.removeEventListener("input", check);
      resolve(dialog.returnValue === "ok" && (typed === null || input.value === typed));
    }, { once: true });
    dialog.showModal();
    (typed === null ? ok : input).focus();
  });
}
