// Talking to the daemon: JSON reads, actions (POST with the CSRF token), the status every
// view may follow, and the page's banners and confirmation dialog.
import { byTestId, setText } from "./dom.js";

const STATUS_EVERY_MS = 1000;

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function errorText(response) {
  const text = await response.text();
  try {
    return JSON.parse(text).error || text;
  } catch {
    return text.trim() || `HTTP ${response.status}`;
  }
}

export async function request(path, options = {}) {
  const response = await fetch(path, { credentials: "same-origin", ...options });
  if (response.status === 401) {
    location.assign("/login");
    throw new ApiError(401, "sign in first");
  }
  if (!response.ok) throw new ApiError(response.status, await errorText(response));
  return response;
}

export async function getJson(path) {
  return (await request(path, { headers: { Accept: "application/json" } })).json();
}

let csrf = null;

async function csrfToken(fresh = false) {
  if (csrf === null || fresh) csrf = (await getJson("/api/v1/session")).csrf;
  return csrf;
}

// An action: a same-origin POST carrying the CSRF token, fetched again once if the daemon
// restarted meanwhile (a new daemon signs new tokens).
export async function post(path) {
  const send = (token) =>
    fetch(path, {
      method: "POST",
      credentials: "same-origin",
      headers: { "X-CSRF-Token": token, Accept: "application/json" },
    });
  let response = await send(await csrfToken());
  if (response.status === 403) response = await send(await csrfToken(true));
  if (!response.ok) throw new ApiError(response.status, await errorText(response));
  return response.json();
}

export function showError(message) {
  const banner = byTestId("error-banner");
  setText(banner, message);
  banner.hidden = !message;
}

export function showResult(message, ok) {
  const result = byTestId("action-result");
  setText(result, message);
  result.dataset.ok = ok ? "true" : "false";
  result.classList.toggle("error", !ok);
  result.hidden = false;
}

// Resolves true when the operator confirms (the page's own <dialog>, which tests can click).
export function confirmAction(text) {
  const dialog = byTestId("confirm-dialog");
  setText(byTestId("confirm-text", dialog), text);
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    dialog.returnValue = "";
    dialog.showModal();
  });
}

// -- the daemon's status, read every second, for whoever listens ------------------------------

const statusListeners = new Set();
let lastStatus = null;

export function onStatus(listener) {
  statusListeners.add(listener);
  if (lastStatus) listener(lastStatus);
  return () => statusListeners.delete(listener);
}

export async function pollStatus() {
  try {
    lastStatus = await getJson("/api/v1/status");
    showError("");
    for (const listener of statusListeners) listener(lastStatus);
  } catch (error) {
    showError(`cannot read the daemon's status: ${error.message}`);
  }
  setTimeout(pollStatus, STATUS_EVERY_MS);
}

// Calls fn now and every `ms` until the returned stop() is called; a failure shows in the
// banner and the polling goes on.
export function every(ms, fn) {
  let timer = null;
  let stopped = false;
  const tick = async () => {
    try {
      await fn();
    } catch (error) {
      showError(error.message);
    }
    if (!stopped) timer = setTimeout(tick, ms);
  };
  tick();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}
