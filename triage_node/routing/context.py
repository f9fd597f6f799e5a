"""Routing contexts: what rules see of a study, from the index or from headers in hand."""

from __future__ import annotations

import json
from typing import Any

from triage_node.errors import InvalidDicomError
from triage_node.routing.conditions import SeriesView, StudyContext
from triage_node.spool.index import InstanceHeader, Source, attribute_delta
from triage_node.state.db import Database
from triage_node.state.keys import KeyMaker


def build_context(study_attrs: dict[str, Any], series: list[SeriesView],
                  source: Source) -> StudyContext:
    return StudyContext(study_attributes=study_attrs, series=series,
                        calling_ae=source.calling_ae, called_ae=source.called_ae,
                        host=source.host)


def context_from_headers(headers: list[InstanceHeader], source: Source,
                         keys: KeyMaker) -> StudyContext:
    """A routing context for instances that are not (yet) in the database (explain, dry run)."""
    if not headers:
        raise InvalidDicomError("no DICOM instances to route")
    by_series: dict[str, list[InstanceHeader]] = {}
    for h in headers:
        by_series.setdefault(h.series_uid, []).append(h)
    views = []
    for series_uid, members in by_series.items():
        first = members[0].attributes
        views.append(SeriesView(
            series_uid=series_uid, series_key=keys.series_key(series_uid),
            instance_count=len({m.sop_instance_uid for m in members}), attributes=first,
            instances=tuple(attribute_delta(first, m.attributes) for m in members)))
    views.sort(key=lambda v: v.series_key)
    return build_context(headers[0].attributes, views, source)


def study_context(db: Database, study_uid: str, *, with_instances: bool = False) -> StudyContext:
    """The routing context of a study in the database (indexed attributes only)."""
    study = db.query(
        "SELECT attrs_json, calling_ae, called_ae, source_host FROM studies"
        " WHERE study_uid = ?", (study_uid,))
    if not study:
        raise InvalidDicomError("study is not known to this node")
    rows = db.query(
        "SELECT series_uid, series_key, instance_count, attrs_json FROM series"
        " WHERE study_uid = ? ORDER BY series_key", (study_uid,))
    views = []
    for r in rows:
        attrs = json.loads(r["attrs_json"])
        instances: tuple[dict[str, Any], ...] = ()
        if with_instances:
            deltas = db.query(
                "SELECT attrs_delta_json FROM instances WHERE series_uid = ?",
                (r["series_uid"],))
            instances = tuple(json.loads(d["attrs_delta_json"]) for d in deltas)
        views.append(SeriesView(series_uid=r["series_uid"], series_key=r["series_key"],
                                instance_count=r["instance_count"], attributes=attrs,
                                instances=instances))
    row = study[0]
    source = Source(row["calling_ae"] or "", row["called_ae"] or "", row["source_host"] or "")
    return build_context(json.loads(row["attrs_json"]), views, source)
