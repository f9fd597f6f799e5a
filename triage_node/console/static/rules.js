// The rules page: the routing rules in force with their match counters; reload (admin).
import { announce, api, fmtTime, h, startPage } from "/console/assets/common.js";

const OPS = {
  equals: "is", one_of: "is one of", regex: "matches", contains: "contains", range: "in range",
  exists: "exists", missing: "is missing",
};

function operand(op, value) {
  if (op === "exists" || op === "missing") return null;
  if (op === "one_of") return h("code", {}, value.join(", "));
  if (op === "range") {
    return h("code", {}, `${value.min ?? "−∞"} … ${value.max ?? "∞"}`);
  }
  return h("code", {}, String(value));
}

/** A condition as nested lists a person reads: "all of: Modality is CT, …". */
function when(condition) {
  if (!condition) return h("span", { class: "muted" }, "always");
  for (const [key, label] of [["all", "all of"], ["any", "any of"]]) {
    if (condition[key]) {
      return h("div", {}, label, h("ul", { class: "cond" }, ...condition[key].map((c) => h("li", {}, when(c)))));
    }
  }
  if (condition.not) return h("div", {}, "not", h("ul", { class: "cond" }, h("li", {}, when(condition.not))));
  const subject = condition.attribute || condition.source || "?";
  const level = condition.level && condition.level !== "series" ? ` (${condition.level})` : "";
  const tests = Object.entries(condition).filter(([k]) => k in OPS);
  return h("span", {}, h("strong", {}, subject + level),
    ...tests.flatMap(([op, value]) => [` ${OPS[op]} `, operand(op, value)]));
}

function row(rule, { fallback = false } = {}) {
  const action = rule.ignore ? h("span", { class: "muted" }, "ignored (no detector)")
    : (rule.detectors || []).join(", ") || "—";
  return h("tr", { "data-rule": rule.name },
    h("th", { scope: "row" }, rule.name, rule.description ? h("div", { class: "muted" }, rule.description) : null),
    h("td", {}, fallback ? h("span", { class: "muted" }, "no other rule matched") : when(rule.when)),
    h("td", {}, action), h("td", {}, rule.priority),
    h("td", {}, (rule.destinations || []).length ? rule.destinations.join(", ") : h("span", { class: "muted" }, "default")),
    h("td", { class: "num matches" }, String(rule.matches)),
    h("td", {}, rule.last_matched_at ? fmtTime(rule.last_matched_at) : "never"));
}

async function load() {
  const { data } = await api("/api/rules");
  document.getElementById("file").textContent =
    `${data.file} — loaded ${fmtTime(data.loaded_at)}`;
  if (data.last_reload_error) {
    announce(`The last reload was refused; the rules below stay in force: ${data.last_reload_error}`, { error: true });
  }
  const rows = data.rules.map((r) => row(r));
  if (data.fallback) rows.push(row(data.fallback, { fallback: true }));
  document.querySelector("#rules tbody").replaceChildren(...rows);
}

startPage("rules", async (me) => {
  const button = document.getElementById("reload");
  if (me.role === "admin") {
    button.addEventListener("click", async () => {
      button.disabled = true;
      try {
        const { data } = await api("/api/rules/reload", { method: "POST" });
        announce(`Rules reloaded: ${data.rules} rule${data.rules === 1 ? "" : "s"} in force.`);
        await load();
      } catch (err) {
        const errors = err.detail && err.detail.errors ? ` ${err.detail.errors.join(" ")}` : "";
        announce(`Reload refused, the previous rules stay: ${err.message}.${errors}`, { error: true });
      } finally {
        button.disabled = false;
      }
    });
  } else {
    button.remove(); // radiologists may read the rules, not reload them
  }
  await load();
});
