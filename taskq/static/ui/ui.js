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

/** Ask the operator to confirm; resolves true or false. */
export function confirmAction(title, text, okLabel) {
  const dialog = document.getElementById("confirm-dialog");
  document.getElementById("confirm-title").textContent = title;
  document.getElementById("confirm-text").textContent = text;
  document.getElementById("confirm-ok").textContent = okLabel;
  dialog.returnValue = "";
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    dialog.showModal();
    document.getElementById("confirm-ok").focus();
  });
}
