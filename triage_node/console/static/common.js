// Shared by every console page: sign-in, API calls with the bearer token, live events,
// and small DOM helpers. Text is always set as text (DOM nodes), never parsed as HTML.

const TOKEN_KEY = "triage-node.token";

export const TIER_LABELS = {
  critical: "Critical", urgent: "Urgent", routine: "Routine", negative: "Negative",
  failed: "Failed", "not-applicable": "Not applicable",
};

export class ApiError extends Error {
  constructor(status, detail) {
    const text = typeof detail === "string" ? detail
      : detail && detail.message ? detail.message : `HTTP ${status}`;
    super(text);
    this.status = status;
    this.detail = detail;
  }
}

export function token() { return sessionStorage.getItem(TOKEN_KEY); }

/** Create an element: h("td", {class: "num"}, "12", otherNode). */
export function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") {
      node.addEventListener(key.slice(2), value);
    } else if (key === "class") {
      node.className = value;
    } else if (value === true) {
      node.setAttribute(key, "");
    } else {
      node.setAttribute(key, String(value));
    }
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function tierOf(item) { return item.tier || "pending"; }

export function tierBadge(item) {
  const tier = tierOf(item);
  const label = item.tier ? TIER_LABELS[item.tier] || item.tier : "Pending";
  return h("span", { class: `tier tier-${tier}` }, label);
}

export function fmtTime(epoch) {
  if (epoch === null || epoch === undefined) return "—";
  return new Date(epoch * 1000).toLocaleString(undefined, {
    year: "numeric", month: "2-digit", day: "2-digit",
    hour: "2-digit", minute: "2-digit", second: "2-digit",
  });
}

/** A <time> element: the time of day, the full date and time on hover. */
export function timeOfDay(epoch) {
  if (epoch === null || epoch === undefined) return document.createTextNode("—");
  const date = new Date(epoch * 1000);
  return h("time", { datetime: date.toISOString(), title: fmtTime(epoch) },
    date.toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit" }));
}

export function fmtAgo(epoch) {
  if (epoch === null || epoch === undefined) return "—";
  const s = Math.max(0, Date.now() / 1000 - epoch);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

export function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  if (seconds < 1) return `${seconds.toFixed(2)} s`;
  if (seconds < 60) return `${seconds.toFixed(1)} s`;
  const m = Math.floor(seconds / 60);
  return `${m} min ${Math.round(seconds - m * 60)} s`;
}

export function fmtValue(value) {
  if (value === null || value === undefined) return "—";
  if (typeof value === "number") return Number.isInteger(value) ? String(value) : value.toFixed(4).replace(/0+$/, "").replace(/\.$/, "");
  if (typeof value === "object") return JSON.stringify(value);
  return String(value);
}

/** A fetch to the node's API with the bearer token; JSON in and out. */
export async function api(path, { method = "GET", body } = {}) {
  const headers = { Authorization: `Bearer ${token()}`, Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method, headers, cache: "no-store",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const isJson = (response.headers.get("content-type") || "").includes("json");
  const data = isJson ? await response.json() : null;
  if (response.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY);
    showLogin("The node refused the token: sign in again.");
  }
  if (!response.ok) throw new ApiError(response.status, data && data.detail);
  return { data, headers: response.headers };
}

/** An image from the API (the token goes in the header, not the URL) as a blob: URL. */
export async function apiImage(path) {
  const response = await fetch(path, { headers: { Authorization: `Bearer ${token()}` } });
  if (!response.ok) throw new ApiError(response.status, null);
  return URL.createObjectURL(await response.blob());
}

/** Say something to screen-reader users and show it in the page's status line. */
export function announce(text, { error = false } = {}) {
  const line = document.getElementById("status");
  if (!line) return;
  line.textContent = text;
  line.classList.toggle("error", error);
}

/**
 * Live worklist events. EventSource cannot send headers, so the token goes in the query
 * (the API accepts it on /api/events only; see docs/api.md for the trade-off).
 * onEvent(type, data) for each change; onState(connected) when the stream opens or drops.
 */
export function liveEvents(onEvent, onState = () => {}) {
  const types = ["processed", "delivered", "claimed", "released", "read", "feedback", "rerun"];
  let source = null;
  const open = () => {
    source = new EventSource(`/api/events?token=${encodeURIComponent(token())}`);
    source.addEventListener("open", () => onState(true));
    source.addEventListener("error", () => onState(false));
    for (const type of types) {
      source.addEventListener(type, (e) => onEvent(type, JSON.parse(e.data)));
    }
    source.addEventListener("lagged", () => {
      // Events were dropped for us: reconnect and re-read everything.
      source.close();
      onEvent("lagged", null);
      open();
    });
  };
  open();
  window.addEventListener("pagehide", () => source && source.close());
  return () => source && source.close();
}

let started = null;

function showLogin(message) {
  const main = document.getElementById("main");
  const content = document.getElementById("content");
  content.hidden = true;
  document.getElementById("who").hidden = true;
  let section = document.getElementById("login");
  if (!section) {
    const input = h("input", { id: "token", name: "token", type: "password", required: true,
      autocomplete: "current-password", "aria-describedby": "login-help" });
    const error = h("p", { id: "login-error", class: "error", role: "alert" });
    const form = h("form", { id: "login-form" },
      h("label", { for: "token" }, "API token"), input,
      h("p", { id: "login-help", class: "muted" },
        "The bearer token your administrator gave you. It is kept in this tab only " +
        "(session storage) and sent to this node alone."),
      h("button", { type: "submit", class: "primary" }, "Sign in"), error);
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      sessionStorage.setItem(TOKEN_KEY, input.value.trim());
      input.value = "";
      error.textContent = "";
      if (!(await enter())) error.textContent = "That token was refused.";
    });
    section = h("section", { id: "login", class: "login", "aria-labelledby": "login-title" },
      h("h1", { id: "login-title" }, "Sign in to triage-node"), form);
    main.prepend(section);
  }
  section.hidden = false;
  const error = document.getElementById("login-error");
  if (message && error) error.textContent = message;
  document.getElementById("token").focus();
}

async function enter() {
  if (!token()) { showLogin(); return false; }
  let me;
  try {
    ({ data: me } = await api("/api/me"));
  } catch (err) {
    if (err.status !== 401) showLogin(`The node did not answer: ${err.message}`);
    return false;
  }
  const login = document.getElementById("login");
  if (login) login.hidden = true;
  document.getElementById("who-user").textContent = me.user;
  document.getElementById("who-role").textContent = me.role;
  document.getElementById("who").hidden = false;
  for (const el of document.querySelectorAll("[data-role=admin]")) el.hidden = me.role !== "admin";
  document.getElementById("content").hidden = false;
  if (started) started(me);
  return true;
}

/** Start a page: mark its nav link, sign in if needed, then init(me) with {user, role}. */
export function startPage(pageName, init) {
  for (const link of document.querySelectorAll("nav a[data-page]")) {
    if (link.dataset.page === pageName) link.setAttribute("aria-current", "page");
  }
  document.getElementById("logout").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    window.location.reload();
  });
  let initialised = false;
  started = (me) => {
    if (initialised) return;
    initialised = true;
    init(me).catch((err) => {
      console.error(err);
      announce(`Could not load: ${err.message}`, { error: true });
    });
  };
  enter();
}
