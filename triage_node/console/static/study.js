// The study page: state, timeline with durations, findings with feedback, pictures drawn by
// the node, result objects with their Orthanc links, feedback given, processing runs.
import {
  announce, api, apiImage, fmtDuration, fmtTime, h, liveEvents, startPage, tierBadge, timeOfDay,
} from "/console/assets/common.js";

const studyKey = decodeURIComponent(window.location.pathname.split("/").pop());
const base = `/api/studies/${encodeURIComponent(studyKey)}`;
let me = null;
let picturesShown = null;

const STAGES = {
  received: "Received", last_received: "Last instance", complete: "Complete",
  inferred: "Inferred", delivered: "Delivered", flagged: "Flagged",
};
const SPANS = [
  ["receiving", "Receiving"], ["quiet_until_complete", "Quiet period"],
  ["queue_and_processing", "Queue and processing"], ["delivery", "Delivery"],
];

function timeline(study) {
  const items = study.timeline.map((t) => h("li", { class: t.at === null ? "missing" : "" },
    h("span", { class: "stage" }, STAGES[t.stage] || t.stage),
    h("span", {}, t.at === null ? "not yet" : timeOfDay(t.at)),
    h("span", { class: "delta" }, t.since_previous_s === null ? "" : `+${fmtDuration(t.since_previous_s)}`)));
  const flagged = study.timestamps.flagged;
  items.push(h("li", { class: flagged === null ? "missing" : "" },
    h("span", { class: "stage" }, "Flagged"),
    h("span", {}, flagged === null ? "not flagged" : timeOfDay(flagged)),
    h("span", { class: "delta" }, study.durations_s.received_to_flagged === null ? ""
      : `${fmtDuration(study.durations_s.received_to_flagged)} after received`)));
  document.getElementById("timeline").replaceChildren(...items);
  const bars = document.getElementById("bars");
  const legend = document.getElementById("legend");
  bars.replaceChildren();
  legend.replaceChildren();
  const parts = [];
  SPANS.forEach(([key, label], i) => {
    const seconds = study.durations_s[key];
    if (seconds === null || seconds === undefined) return;
    const bar = h("span", { class: `b${i}`, title: `${label}: ${fmtDuration(seconds)}` });
    bar.style.flexGrow = String(Math.max(seconds, 0.001));
    bars.append(bar);
    parts.push(`${label} ${fmtDuration(seconds)}`);
    legend.append(h("li", {}, h("i", { class: `b${i}`, "aria-hidden": "true" }),
      `${label}: ${fmtDuration(seconds)}`));
  });
  const total = study.durations_s.received_to_delivered;
  if (total !== null) legend.append(h("li", {}, h("strong", {}, `Received to delivered: ${fmtDuration(total)}`)));
  bars.setAttribute("aria-label", `Time in each stage: ${parts.join(", ") || "none yet"}`);
}

async function sendFeedback(body, what) {
  try {
    await api(`${base}/feedback`, { method: "POST", body });
    announce(`Feedback recorded: ${body.verdict} on ${what}.`);
    await load();
  } catch (err) {
    announce(`Could not record feedback: ${err.message}`, { error: true });
  }
}

function feedbackControls(target, what) {
  const box = h("div", { class: "actions" });
  const comment = h("textarea", { rows: 1, maxlength: 2000, "aria-label": `Comment on ${what}` });
  const form = h("form", { class: "feedback-form", hidden: true },
    comment, h("button", { type: "submit" }, "Send comment"));
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    if (!comment.value.trim()) return;
    sendFeedback({ ...target, verdict: "comment", comment: comment.value.trim() }, what);
  });
  box.append(
    h("button", { type: "button", "data-verdict": "agree", "aria-label": `Agree with ${what}`,
      onclick: () => sendFeedback({ ...target, verdict: "agree" }, what) }, "Agree"),
    h("button", { type: "button", "data-verdict": "disagree", "aria-label": `Disagree with ${what}`,
      onclick: () => sendFeedback({ ...target, verdict: "disagree" }, what) }, "Disagree"),
    h("button", { type: "button", "data-verdict": "comment", "aria-label": `Comment on ${what}`,
      onclick: () => { form.hidden = !form.hidden; if (!form.hidden) comment.focus(); } }, "Comment…"));
  return h("div", {}, box, form);
}

function findings(study) {
  const rows = study.findings.map((f, i) => h("tr", { "data-finding": i },
    h("td", {}, f.detector), h("td", {}, f.label),
    h("td", { class: "num" }, f.score.toFixed(2)),
    h("td", { class: "num" }, f.volume_ml === null ? "—" : `${f.volume_ml.toFixed(1)} mL`),
    h("td", {}, feedbackControls({ finding_index: i }, `${f.label} (finding ${i + 1})`))));
  // The detectors' result as a whole: e.g. to disagree with a negative.
  for (const detector of study.detectors) {
    rows.push(h("tr", { "data-detector-result": detector },
      h("td", {}, detector),
      h("td", { class: "muted" }, study.findings.some((f) => f.detector === detector)
        ? "the result as a whole" : "nothing found"),
      h("td", {}), h("td", {}),
      h("td", {}, feedbackControls({ detector }, `${detector}'s result`))));
  }
  if (!rows.length) rows.push(h("tr", {}, h("td", { colspan: 5, class: "muted" },
    study.pending ? "Waiting for the detectors." : study.reason || "No detector ran.")));
  document.querySelector("#findings tbody").replaceChildren(...rows);
}

function orthancLink(result) {
  if (!result.orthanc) return h("span", { class: "muted" }, result.status === "delivered" ? "no link for this destination" : "after delivery");
  return h("a", { href: result.orthanc.explorer_url, target: "_blank", rel: "noopener noreferrer",
    class: "orthanc-link" }, `Open ${result.kind} in Orthanc`);
}

function results(study) {
  const rows = study.results.map((r) => h("tr", {},
    h("td", {}, r.kind), h("td", {}, r.destination),
    h("td", {}, r.status, r.last_error ? h("div", { class: "error" }, r.last_error) : null),
    h("td", { class: "num" }, String(r.attempts)),
    h("td", {}, fmtTime(r.delivered_at)), h("td", {}, orthancLink(r))));
  if (!rows.length) rows.push(h("tr", {}, h("td", { colspan: 6, class: "muted" }, "No result objects.")));
  document.querySelector("#results tbody").replaceChildren(...rows);
}

function feedbackTable(study) {
  const rows = study.feedback.map((f) => h("tr", {},
    h("td", {}, fmtTime(f.created_at ?? f.at)), h("td", {}, f.user), h("td", {}, f.verdict),
    h("td", {}, f.finding_index === null || f.finding_index === undefined
      ? `${f.detector} (whole result)` : `${f.label || "finding"} (finding ${f.finding_index + 1})`),
    h("td", {}, f.comment || "")));
  if (!rows.length) rows.push(h("tr", {}, h("td", { colspan: 5, class: "muted" }, "No feedback yet.")));
  document.querySelector("#feedback tbody").replaceChildren(...rows);
}

function runs(study) {
  const rows = study.runs.map((r) => h("tr", {},
    h("td", { class: "num" }, String(r.generation)), h("td", {}, r.status),
    h("td", {}, fmtTime(r.created_at)), h("td", {}, fmtTime(r.started_at)),
    h("td", {}, fmtTime(r.finished_at)), h("td", {}, r.error_kind || "")));
  document.querySelector("#runs tbody").replaceChildren(...rows);
  const timings = Object.entries(study.processing_timings_s || {}).flatMap(([k, v]) =>
    [h("dt", {}, k), h("dd", {}, fmtDuration(v))]);
  document.getElementById("timings").replaceChildren(...(timings.length ? timings
    : [h("dt", {}, "—"), h("dd", { class: "muted" }, "no timings recorded")]));
}

async function pictures(study) {
  const box = document.getElementById("pictures");
  const signature = study.results.map((r) => r.sop_instance_uid).join(",");
  if (picturesShown === signature) return;
  picturesShown = signature;
  const { data: previews } = await api(`${base}/previews`);
  if (!previews.length) {
    box.replaceChildren(h("p", { class: "muted" }, "No segmentation or heatmap to show."));
    return;
  }
  box.replaceChildren(...await Promise.all(previews.map(async (p) => {
    const img = h("img", { alt: p.caption, "data-preview": p.n });
    try {
      img.src = await apiImage(p.url);
    } catch (err) {
      return h("figure", {}, h("p", { class: "error" }, `Picture unavailable: ${err.message}`),
        h("figcaption", {}, p.caption));
    }
    return h("figure", {}, img, h("figcaption", {}, p.caption));
  })));
}

function head(study) {
  document.title = `Study ${study.study_key} — triage-node`;
  document.getElementById("title").textContent = `Study ${study.study_key}`;
  document.getElementById("tier").replaceChildren(tierBadge(study));
  const claim = study.claimed_by ? `claimed by ${study.claimed_by}` : "not claimed";
  const read = study.read_by ? `read by ${study.read_by} ${fmtTime(study.read_at)}` : "unread";
  document.getElementById("state").textContent = `${study.status} · ${claim} · ${read}`;
  const summary = study.summary || study.reason || (study.pending ? "Processing…" : "Nothing found.");
  document.getElementById("summary").textContent =
    `${summary}${study.rule ? ` — rule ${study.rule}` : ""}`;
  const buttons = [];
  const act = (verb, path) => h("button", { type: "button", "data-action": path, onclick: async () => {
    try {
      await api(`${path === "rerun" ? base : `/api/worklist/${encodeURIComponent(studyKey)}`}/${path}`,
        { method: "POST" });
      announce(`${verb}: done.`);
    } catch (err) {
      announce(`${verb}: ${err.message}`, { error: true });
    }
    await load();
  } }, verb);
  const mine = study.claimed_by === me.user;
  if (!study.claimed_by) buttons.push(act("Claim", "claim"));
  else if (mine || me.role === "admin") buttons.push(act("Release", "release"));
  if (!study.read_by && (!study.claimed_by || mine)) buttons.push(act("Mark read", "read"));
  if (me.role === "admin") buttons.push(act("Re-run", "rerun"));
  document.getElementById("actions").replaceChildren(...buttons);
}

async function load() {
  const { data: study } = await api(base);
  head(study);
  timeline(study);
  findings(study);
  results(study);
  feedbackTable(study);
  runs(study);
  await pictures(study);
}

startPage("study", async (principal) => {
  me = principal;
  try {
    await load();
  } catch (err) {
    if (err.status === 404) {
      document.getElementById("title").textContent = "Study not found";
      announce(`This node has no study ${studyKey}.`, { error: true });
      return;
    }
    throw err;
  }
  const live = document.getElementById("live");
  liveEvents((type, data) => {
    if (type === "lagged" || (data && data.study_key === studyKey)) {
      load().catch((err) => announce(`Could not refresh: ${err.message}`, { error: true }));
    }
  }, (connected) => {
    live.classList.toggle("on", connected);
    live.textContent = connected ? "Live updates: on" : "Live updates: reconnecting";
  });
});
