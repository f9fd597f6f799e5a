"""Routing cost per study of 500 instances: indexed attributes vs re-reading the files.

Indexes a 500-instance CT series (real DICOM written by the phantom writer) into a state
database the way the receiver does, then times, per study:

* ``index``   — build the routing context from the database and decide (what the node does);
* ``index+instance-level`` — the same with a rule that needs per-instance attributes;
* ``re-read`` — the naive way: read all 500 headers with pydicom, then decide.

Target: routing adds ≤ 5 ms per study of 500 instances. Run: ``python -m bench.routing``.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from trainers.phantoms.dicom import write_ct_series
from triage_node.routing.context import context_from_headers, study_context
from triage_node.routing.rules import Router, RuleSet, load_rules
from triage_node.spool.index import InstanceIndex, Source, read_header
from triage_node.spool.store import Spool
from triage_node.state.db import Database
from triage_node.state.keys import KeyMaker

REPO = Path(__file__).resolve().parents[1]
INSTANCES = 500

HEAVY_RULES = {
    "rules": [
        {"name": f"decoy-{i}", "detectors": ["d"],
         "when": {"all": [{"attribute": "Modality", "equals": "MR"},
                          {"attribute": "SeriesDescription", "regex": f"(?i)seq{i}"}]}}
        for i in range(20)
    ] + [
        {"name": "no-localizer-instances", "detectors": ["d"],
         "when": {"all": [{"attribute": "Modality", "equals": "CT"},
                          {"not": {"attribute": "ImageType", "level": "instance",
                                   "contains": "LOCALIZER"}},
                          {"attribute": "SliceThickness", "range": {"min": 0.5, "max": 5}}]}},
    ]
}


def _time(fn: Callable[[], object], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


def _row(label: str, ms: list[float]) -> str:
    ms = sorted(ms)
    p95 = ms[int(0.95 * (len(ms) - 1))]
    return f"  {label:44} median {statistics.median(ms):8.2f} ms   p95 {p95:8.2f} ms"


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="bench-routing-") as tmp:
        work = Path(tmp)
        hu = np.zeros((INSTANCES, 64, 64), dtype=np.float32)
        paths = write_ct_series(hu, (1.0, 0.5, 0.5), work / "series", patient_name="BENCH^R",
                                patient_id="B1", accession_number="B1",
                                study_description="CT HEAD WO", series_description="Axial",
                                body_part_examined="HEAD")
        db = Database(work / "state.sqlite3")
        keys = KeyMaker(b"bench")
        index = InstanceIndex(db, keys)
        spool = Spool(work / "spool")
        for p in paths:
            data = p.read_bytes()
            header = read_header(data)
            index.record(header, spool.store(keys.study_key(header.study_uid),
                                             header.sop_instance_uid, data),
                         Source("PACS", "TRIAGE", "127.0.0.1"))
        study_uid = read_header(paths[0].read_bytes()).study_uid
        shipped = Router(load_rules(REPO / "conf" / "rules.yaml"))
        heavy = Router(RuleSet.model_validate(HEAVY_RULES))

        def indexed(router: Router) -> object:
            decision = router.decide(study_context(db, study_uid,
                                                   with_instances=router.needs_instances))
            assert decision.matched
            return decision

        def reread() -> object:
            headers = [read_header(p.read_bytes()) for p in paths]
            return shipped.decide(context_from_headers(headers, Source(), keys))

        print(f"Routing one study of {INSTANCES} instances (target ≤ 5 ms)")
        print(_row("index, shipped rules", _time(lambda: indexed(shipped), 200)))
        print(_row("index, 21 rules incl. instance-level", _time(lambda: indexed(heavy), 50)))
        print(_row("re-read 500 headers with pydicom (naive)", _time(reread, 5)))
        db.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
