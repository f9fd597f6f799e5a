"""``rules explain``: why a study would be routed the way it is, without running anything.

For every rule, every condition is shown per series with matched/failed and the value seen;
then, for the deciding rule, which series each detector would analyse (and why the others
not), and the final decision.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom

from triage_node.errors import InvalidDicomError
from triage_node.routing.conditions import StudyContext
from triage_node.routing.rules import Decision, Router, RuleExplanation
from triage_node.routing.selection import SeriesSelection, SeriesVerdict, select_series
from triage_node.spool.index import InstanceHeader, header_from_dataset, read_header


@dataclass(frozen=True)
class DetectorSeriesSpec:
    selection: SeriesSelection
    modalities: list[str]


@dataclass
class Explanation:
    series: list[dict[str, Any]]
    rules: list[RuleExplanation]
    decision: Decision
    selections: dict[str, tuple[str | None, list[SeriesVerdict]]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "series": self.series,
            "rules": [
                {"rule": r.rule, "matched": r.matched, "matched_series": r.matched_series,
                 "conditions": {key: [{"depth": t.depth, "condition": t.text,
                                       "matched": t.matched, "seen": t.seen} for t in lines]
                                for key, lines in r.traces.items()}}
                for r in self.rules
            ],
            "decision": {
                "rule": self.decision.rule, "detectors": self.decision.detectors,
                "priority": str(self.decision.priority), "ignored": self.decision.ignored,
                "destinations": self.decision.destinations,
            },
            "series_selection": {
                name: {"selected": chosen,
                       "verdicts": [{"series": v.series.series_key, "accepted": v.accepted,
                                     "why": v.why} for v in verdicts]}
                for name, (chosen, verdicts) in self.selections.items()
            },
        }


def explain(router: Router, ctx: StudyContext,
            detectors: dict[str, DetectorSeriesSpec]) -> Explanation:
    rules, decision = router.explain(ctx)
    selections: dict[str, tuple[str | None, list[SeriesVerdict]]] = {}
    if decision.matched and not decision.ignored:
        for name in decision.detectors:
            spec = detectors.get(name)
            if spec is None:
                continue
            chosen, verdicts = select_series(decision.matched_series, spec.selection,
                                             spec.modalities)
            selections[name] = (chosen.series_key if chosen else None, verdicts)
    series = [{"series": s.series_key, "instances": s.instance_count,
               "modality": s.attributes.get("Modality", ""),
               "description": s.attributes.get("SeriesDescription", "")} for s in ctx.series]
    return Explanation(series, rules, decision, selections)


def render(explanation: Explanation) -> str:
    """Plain text for the terminal."""
    out = ["Series:"]
    for s in explanation.series:
        out.append(f"  {s['series']}  {s['modality']:3} {s['instances']:5} instances  "
                   f"{s['description']}")
    for rule in explanation.rules:
        out.append("")
        verdict = "MATCHED" if rule.matched else "no match"
        out.append(f"Rule {rule.rule}: {verdict}"
                   + (f" (series {', '.join(rule.matched_series)})" if rule.matched else ""))
        for key, lines in rule.traces.items():
            out.append(f"  on series {key}:")
            for t in lines:
                mark = "✔" if t.matched else "✘"
                seen = f"   [seen: {t.seen}]" if t.seen else ""
                out.append(f"    {'  ' * t.depth}{mark} {t.text}{seen}")
    d = explanation.decision
    out.append("")
    if not d.matched:
        out.append("Decision: no rule matched — recorded as not-applicable")
    elif d.ignored:
        out.append(f"Decision: rule {d.rule} — ignored")
    else:
        out.append(f"Decision: rule {d.rule} — detectors {', '.join(d.detectors)}, "
                   f"priority {d.priority}"
                   + (f", destinations {', '.join(d.destinations)}" if d.destinations else ""))
        for name, (chosen, verdicts) in explanation.selections.items():
            out.append(f"  {name}: " + (f"series {chosen}" if chosen else
                                         "NO suitable series — the study is recorded with why"))
            for v in verdicts:
                out.append(f"    {'✔' if v.accepted else '✘'} {v.series.series_key}: {v.why}")
    return "\n".join(out)


def headers_from_folder(folder: Path) -> tuple[list[InstanceHeader], list[str]]:
    """Headers of every DICOM file below ``folder``; unreadable files are listed, not fatal."""
    if not folder.is_dir():
        raise InvalidDicomError(f"{folder} is not a folder")
    headers, skipped = [], []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            headers.append(read_header(path.read_bytes()))
        except InvalidDicomError as exc:
            skipped.append(f"{path}: {exc}")
    return headers, skipped


def headers_from_metadata(datasets: list[pydicom.Dataset]) -> list[InstanceHeader]:
    return [header_from_dataset(ds) for ds in datasets]
