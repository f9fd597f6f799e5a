// The system page (admin): queue, throughput, errors, receivers, workers, outbox, quarantine.
import { announce, api, fmtValue, h, startPage, TIER_LABELS } from "/console/assets/common.js";

const REFRESH_MS = 5000;

function card(title, entries, big) {
  return h("section", { class: "card", "aria-label": title },
    h("h2", {}, title), big === undefined ? null : h("p", { class: "big" }, big),
    h("table", {}, h("tbody", {}, ...entries.map(([k, v]) => h("tr", {},
      h("th", { scope: "row" }, k), h("td", { class: "num" }, fmtValue(v)))))));
}

function errors(kinds) {
  const entries = Object.entries(kinds || {});
  return entries.length ? entries : [["none", 0]];
}

function render(s) {
  const t = s.throughput_last_hour;
  const { dead_by_destination: deadBy, ...outbox } = s.outbox;
  document.getElementById("cards").replaceChildren(
    card("Queue", [["queued", s.queue.queued], ["running", s.queue.running]],
      `${s.queue.queued + s.queue.running} in queue`),
    card("Throughput, last hour", [["studies processed", t.studies_processed],
      ["studies failed", t.studies_failed], ["objects delivered", t.objects_delivered],
      ["instances received", t.instances_received]], `${t.studies_processed} studies`),
    card("Errors, last hour", errors(s.errors_last_hour)),
    card("Errors, total", errors(s.errors_total)),
    card("Outbox", [...Object.entries(outbox),
      ...Object.entries(deadBy).map(([d, n]) => [`dead for ${d}`, n])]),
    card("Worklist", Object.entries(s.worklist).map(([k, v]) => [TIER_LABELS[k] || "Pending", v])),
    card("Receiver", [["port", s.receiver.port], ["processes alive", s.receiver.processes_alive],
      ["processes configured", s.receiver.processes_configured]]),
    card("Workers", [["alive", s.workers.alive], ["configured", s.workers.configured],
      ["live event listeners", s.event_listeners]]),
    card("Node", [["node id", s.node_id], ["version", s.version],
      ["quarantined instances", s.quarantined_instances]]));
  document.getElementById("updated").textContent =
    `Updated ${new Date().toLocaleTimeString()}; refreshes every ${REFRESH_MS / 1000} s.`;
}

startPage("system", async (me) => {
  if (me.role !== "admin") {
    document.getElementById("cards").replaceChildren(h("p", { class: "notice" },
      `The system page needs the admin role; ${me.user} is ${me.role}.`));
    return;
  }
  const refresh = async () => {
    try {
      render((await api("/api/system")).data);
    } catch (err) {
      announce(`Could not read the node's status: ${err.message}`, { error: true });
    }
  };
  await refresh();
  setInterval(refresh, REFRESH_MS);
});
