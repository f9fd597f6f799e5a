// The worklist page: studies in the API's order, coloured and labelled by tier, with claim /
// release / mark read, kept current by live events.
import {
  announce, api, fmtAgo, fmtTime, h, liveEvents, startPage, tierBadge, tierOf,
} from "/console/assets/common.js";

// Rows per page: the choices offered; `?per_page=N` (1–1000) in the address picks another.
const PAGE_SIZES = [25, 50, 100, 200];
const DEFAULT_PAGE_SIZE = 100;
const REORDERING = new Set(["processed", "delivered", "rerun", "lagged"]);
let me = null;
let reloadTimer = null;
let offset = 0;

function pageSize() {
  return Number(document.getElementById("per-page").value) || DEFAULT_PAGE_SIZE;
}

function setUpPageSizes() {
  const select = document.getElementById("per-page");
  const asked = Number(new URLSearchParams(window.location.search).get("per_page"));
  const chosen = Number.isInteger(asked) && asked >= 1 && asked <= 1000
    ? asked : DEFAULT_PAGE_SIZE;
  const sizes = [...new Set([...PAGE_SIZES, chosen])].sort((x, y) => x - y);
  select.replaceChildren(...sizes.map((n) => h("option", { value: String(n) }, String(n))));
  select.value = String(chosen);
}

const STATUS_LABELS = {
  receiving: "receiving", queued: "queued", processing: "processing",
  processed: "processed (delivering)", delivered: "delivered",
  "not-applicable": "not applicable", failed: "failed",
};

function query() {
  const params = new URLSearchParams({ limit: String(pageSize()), offset: String(offset) });
  const tier = document.getElementById("filter-tier").value;
  if (tier) params.append("tier", tier);
  if (document.getElementById("filter-unread").checked) params.set("read", "false");
  if (document.getElementById("filter-mine").checked) params.set("claimed_by", me.user);
  return params;
}

async function act(item, action) {
  try {
    await api(`/api/worklist/${encodeURIComponent(item.study_key)}/${action}`, { method: "POST" });
    const done = { claim: "claimed", release: "released", read: "marked read" }[action];
    announce(`Study ${item.study_key} ${done}.`);
  } catch (err) {
    announce(`Could not ${action} study ${item.study_key}: ${err.message}`, { error: true });
  }
  // The live event updates the row; re-read it too, in case the stream is down.
  await refreshRow(item.study_key);
}

function actions(item) {
  const cell = h("div", { class: "actions" });
  const mine = item.claimed_by === me.user;
  const label = (verb) => `${verb} study ${item.study_key}`;
  if (!item.claimed_by) {
    cell.append(h("button", { type: "button", "data-action": "claim", "aria-label": label("Claim"),
      onclick: () => act(item, "claim") }, "Claim"));
  } else if (mine || me.role === "admin") {
    cell.append(h("button", { type: "button", "data-action": "release",
      "aria-label": label("Release"), onclick: () => act(item, "release") }, "Release"));
  }
  if (!item.read_by) {
    const blocked = item.claimed_by && !mine;
    cell.append(h("button", { type: "button", "data-action": "read", disabled: blocked,
      title: blocked ? `claimed by ${item.claimed_by}` : null, "aria-label": label("Mark read"),
      onclick: () => act(item, "read") }, "Mark read"));
  }
  cell.append(h("a", { href: `/console/studies/${encodeURIComponent(item.study_key)}`,
    "aria-label": label("Open") }, "Open"));
  return cell;
}

function row(item) {
  const tier = tierOf(item);
  const result = item.summary || item.reason || (item.pending ? "waiting for the detectors" : "no finding");
  return h("tr", { id: `row-${item.study_key}`, "data-study-key": item.study_key,
    "data-tier": tier, class: `row row-${tier}${item.read_by ? " row-read" : ""}` },
  h("td", {}, tierBadge(item)),
  h("td", {}, h("a", { href: `/console/studies/${encodeURIComponent(item.study_key)}` },
    h("code", {}, item.study_key)), h("div", { class: "muted" }, item.rule || "")),
  h("td", { class: "result" }, result),
  h("td", { class: "status" }, STATUS_LABELS[item.status] || item.status),
  h("td", { title: fmtTime(item.arrived_at) }, fmtAgo(item.arrived_at)),
  h("td", { class: "claimed" }, item.claimed_by ? `${item.claimed_by}` : "—"),
  h("td", { class: "read" }, item.read_by ? `${item.read_by}, ${fmtAgo(item.read_at)}` : "unread"),
  h("td", {}, actions(item)));
}

async function load() {
  const { data, headers } = await api(`/api/worklist?${query()}`);
  const body = document.getElementById("rows");
  body.replaceChildren(...data.map(row));
  if (!data.length) {
    body.append(h("tr", {}, h("td", { colspan: 8, class: "muted" }, "No study matches.")));
  }
  const total = Number(headers.get("X-Total-Count") || data.length);
  if (!data.length && offset > 0 && total > 0) {
    // The page emptied under us (studies read, filter changed): go to the last one.
    offset = Math.max(0, Math.floor((total - 1) / pageSize()) * pageSize());
    await load();
    return;
  }
  const first = data.length ? offset + 1 : 0;
  document.getElementById("count").textContent =
    `Studies ${first}–${offset + data.length} of ${total}`;
  document.getElementById("page-prev").disabled = offset === 0;
  document.getElementById("page-next").disabled = offset + data.length >= total;
}

function turnPage(step) {
  offset = Math.max(0, offset + step * pageSize());
  load().then(() => document.getElementById("rows").closest("table").focus())
    .catch((err) => announce(`Could not load the worklist: ${err.message}`, { error: true }));
}

function replaceRow(item) {
  const old = document.getElementById(`row-${item.study_key}`);
  if (!old) return false;
  const fresh = row(item);
  fresh.classList.add("flash");
  const focused = old.contains(document.activeElement)
    ? document.activeElement.getAttribute("data-action") : null;
  old.replaceWith(fresh);
  if (focused) {
    const again = fresh.querySelector(`[data-action="${focused}"]`) || fresh.querySelector("a");
    again.focus();
  }
  return true;
}

async function refreshRow(studyKey) {
  try {
    const { data } = await api(`/api/worklist/${encodeURIComponent(studyKey)}`);
    replaceRow(data);
  } catch (err) {
    announce(`Could not refresh study ${studyKey}: ${err.message}`, { error: true });
  }
}

function reloadSoon() {
  clearTimeout(reloadTimer);
  reloadTimer = setTimeout(() => load().catch((err) =>
    announce(`Could not load the worklist: ${err.message}`, { error: true })), 300);
}

function onEvent(type, data) {
  // A result can move a study up or down (or into the filter): re-read the page. Claims,
  // reads and feedback change one row in place, with the item the event carries.
  if (REORDERING.has(type) || !data || !data.item || !replaceRow(data.item)) {
    reloadSoon();
  }
  if (data && data.study_key) {
    const who = data.user ? ` by ${data.user}` : "";
    announce(`Study ${data.study_key}: ${type}${who}.`);
  }
}

startPage("worklist", async (principal) => {
  me = principal;
  setUpPageSizes();
  // A new filter or page size starts again from the first page.
  document.getElementById("filters").addEventListener("change", () => {
    offset = 0;
    reloadSoon();
  });
  document.getElementById("page-prev").addEventListener("click", () => turnPage(-1));
  document.getElementById("page-next").addEventListener("click", () => turnPage(1));
  document.getElementById("filters").addEventListener("submit", (e) => e.preventDefault());
  await load();
  const live = document.getElementById("live");
  let wasDown = false;
  liveEvents(onEvent, (connected) => {
    live.classList.toggle("on", connected);
    live.textContent = connected ? "Live updates: on" : "Live updates: reconnecting";
    // Events are not replayed after a reconnect: re-read what may have been missed.
    if (connected && wasDown) reloadSoon();
    wasDown = !connected;
  });
});
