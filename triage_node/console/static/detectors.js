// The detectors page: what each loaded detector is, its thresholds, its held-out figures,
// and the radiologists' agreement with it.
import { api, fmtValue, h, startPage } from "/console/assets/common.js";

function flatten(value, prefix = "") {
  if (value === null || typeof value !== "object" || Array.isArray(value)) return [[prefix, value]];
  return Object.entries(value).flatMap(([k, v]) => flatten(v, prefix ? `${prefix}.${k}` : k));
}

function table(caption, entries) {
  if (!entries.length) return h("p", { class: "muted" }, `${caption}: none`);
  return h("table", {}, h("caption", { class: "muted" }, caption),
    h("tbody", {}, ...entries.map(([k, v]) => h("tr", {}, h("th", { scope: "row" }, k),
      h("td", { class: "num" }, fmtValue(v))))));
}

function card(detector, agreement) {
  const held = detector.held_out ? flatten(detector.held_out) : [];
  const training = flatten(detector.training || {}).slice(0, 12);
  const votes = agreement
    ? `${agreement.agree} agree, ${agreement.disagree} disagree, ${agreement.comment} comment${agreement.comment === 1 ? "" : "s"}` +
      (agreement.agreement_rate === null ? "" : ` — agreement ${(agreement.agreement_rate * 100).toFixed(1)} %`)
    : "no feedback yet";
  return h("article", { class: "card detector", "data-detector": detector.name },
    h("h2", {}, detector.name, " ", h("span", { class: "muted" }, `v${detector.version}`)),
    h("p", {}, detector.description || ""),
    h("div", { class: "columns" }, h("dl", { class: "facts" },
      h("dt", {}, "Task"), h("dd", {}, detector.task),
      h("dt", {}, "Modalities"), h("dd", {}, detector.modalities.join(", ")),
      h("dt", {}, "Findings"), h("dd", {}, detector.labels.join(", ")),
      h("dt", {}, "Radiologists"), h("dd", { class: "agreement" }, votes)),
    table("Thresholds", Object.entries(detector.thresholds)),
    table("Held-out evaluation", held)),
    h("details", {}, h("summary", {}, "Training"), table("Training summary", training)));
}

startPage("detectors", async () => {
  const [{ data: detectors }, { data: summary }] = await Promise.all([
    api("/api/detectors"), api("/api/feedback/summary")]);
  const votes = Object.fromEntries(summary.detectors.map((d) => [d.detector, d]));
  const box = document.getElementById("detectors");
  box.replaceChildren(...detectors.map((d) => card(d, votes[d.name])));
  if (!detectors.length) box.replaceChildren(h("p", { class: "muted" }, "No detector is loaded."));
});
