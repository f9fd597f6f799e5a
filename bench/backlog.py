"""Backlog: is a critical head CT still flagged fast when routine work is queued ahead of it?

A throwaway Orthanc and ``triage-node serve`` as shipped: one worker for any job and one
``stat_workers`` thread that only takes stat jobs. First the head CT's
time to flag on an idle node (median of ``--idle-runs``); then ``--chest`` routine chest CTs
are sent in one association and the head CT right after them, and its time to flag is
measured again. Time to flag = worklist item committed − (last instance received + quiet
period), as in ``bench/time_to_flag.py``.

No chest CT detector exists yet, so the bench's own rules route the chest CTs as ``routine``
to ``ct-head-hemorrhage`` with a permissive series selection (bench-only config in a temporary
folder): that stands in for real chest work of about the same cost. The head CT is routed
``stat``. The job queue leases by priority, so the head CT jumps every queued chest study, and
the stat lane starts it at once even while a chest study is being processed (the two then
share the CPU). Without the stat lane (``stat_workers: 0``) it would wait for the running chest
job: the "one worker" worst case printed at the end.

Run: ``make bench`` or ``.venv/bin/python -m bench.backlog [--chest 20] [--idle-runs 3]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from deploy.demo.node import REPO, SETTLED, NodeProcess, write_node_config
from deploy.demo.orthanc import LocalOrthanc
from deploy.demo.senders import storescu
from deploy.demo.studies import DemoStudy, make_study

HEAD_GRID = (120, 512, 512)
HEAD_SPACING = (1.25, 0.45, 0.45)
QUIET_S = 2.0
"""Series quiet + study quiet: the wait after the last instance, excluded from the figures."""
TARGET_RATIO = 1.5
DETECTOR = "ct-head-hemorrhage"

RULES = f"""\
# bench/backlog.py only: the head CT is stat; the chest CTs stand in for routine chest work.
rules:
  - name: bench-head-ct-stat
    description: head CT → hemorrhage detector, processed first
    when:
      all:
        - attribute: Modality
          equals: CT
        - attribute: BodyPartExamined
          regex: "(?i)^(head|brain)$"
    detectors: [{DETECTOR}]
    priority: stat
  - name: bench-chest-ct-routine
    description: no chest CT detector exists; the head detector stands in for chest work
    when:
      all:
        - attribute: Modality
          equals: CT
        - attribute: BodyPartExamined
          equals: CHEST
    detectors: [{DETECTOR}]
    priority: routine
"""


def _bench_conf(folder: Path) -> dict[str, str]:
    """Rules and a detector config (the shipped one, any CT series accepted) for this bench."""
    detectors = folder / "detectors"
    detectors.mkdir(parents=True, exist_ok=True)
    shipped = REPO / "conf" / "detectors" / f"{DETECTOR}.yaml"
    detector = yaml.safe_load(shipped.read_text())
    detector["manifest"] = str((shipped.parent / detector["manifest"]).resolve())
    detector["series"] = {"modalities": ["CT"], "instances": {"min": 16}}  # permissive
    (detectors / f"{DETECTOR}.yaml").write_text(yaml.safe_dump(detector, sort_keys=False))
    rules = folder / "rules.yaml"
    rules.write_text(RULES)
    return {"rules_file": str(rules), "detectors_dir": str(detectors)}


def _flag_time(item: dict[str, Any]) -> float:
    return float(item["processed_at"] - (item["last_received_at"] + QUIET_S))


def _head(name: str, out: Path, seed: int) -> DemoStudy:
    return make_study(name, out, seed=seed, bleed_ml=15.0, grid=HEAD_GRID,
                      spacing=HEAD_SPACING, bleed_kind="intraparenchymal",
                      patient_name=f"BENCH^{name.upper()}", patient_id=f"BENCH-{seed}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chest", type=int, default=20, help="routine chest CTs queued")
    parser.add_argument("--idle-runs", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-backlog-") as tmp:
        work = Path(tmp)
        print(f"generating {args.idle_runs + 1} head CTs {HEAD_GRID} and {args.chest} chest "
              "CTs…", flush=True)
        heads = [_head(f"head{i}", work / "studies", 7000 + i) for i in range(args.idle_runs)]
        backlog_head = _head("head-backlog", work / "studies", 7100)
        chests = [make_study(f"chest{i:02d}", work / "chest", seed=7200 + i, bleed_ml=None,
                             kind="chest", patient_name=f"BENCH^CHEST{i}",
                             patient_id=f"BENCH-C{i}") for i in range(args.chest)]
        orthanc = LocalOrthanc(work / "orthanc").start()
        config = write_node_config(work / "conf", **_bench_conf(work / "bench-conf"),
                                   assembly__series_quiet_seconds=QUIET_S / 2,
                                   assembly__study_quiet_seconds=QUIET_S / 2,
                                   assembly__sweep_interval_seconds=0.1,
                                   delivery__poll_interval_seconds=0.1)
        node = NodeProcess(work / "node", orthanc, config=config).start()
        try:
            idle: list[float] = []
            for study in heads:
                storescu(study.folder, node.dicom_port)
                item = node.wait_for_study(study.study_instance_uid, ("delivered",), 300)
                idle.append(_flag_time(item))
                print(f"idle: flagged {idle[-1]:.2f} s, urgency {item['urgency']}", flush=True)

            t0 = time.monotonic()
            storescu(work / "chest", node.dicom_port)  # one association, all chest CTs
            sent_chest = time.monotonic() - t0
            storescu(backlog_head.folder, node.dicom_port)
            item = node.wait_for_study(backlog_head.study_instance_uid, ("delivered",), 900)
            loaded = _flag_time(item)
            print(f"backlog: flagged {loaded:.2f} s, urgency {item['urgency']}", flush=True)
            uids = {c.study_instance_uid for c in chests}
            items = node.wait_for(
                lambda its: [i for i in its if i["study_instance_uid"] in uids]
                if sum(i["study_instance_uid"] in uids and i["status"] in SETTLED
                       for i in its) == len(uids) else None, timeout=60 * len(uids) + 300)
        finally:
            node.stop()
            orthanc.stop()
    chest_done = sorted(i["processed_at"] for i in items)
    before = sum(t < item["processed_at"] for t in chest_done)
    durations = [sum(v for k, v in i["timings_s"].items() if k.startswith(DETECTOR))
                 for i in items]
    med_idle = statistics.median(idle)
    ratio = loaded / med_idle
    grid = "×".join(str(n) for n in HEAD_GRID)
    print(f"\nBacklog, one worker + one stat lane: {grid} head CT (stat) "
          f"behind {len(chests)} routine 48×512×512 chest CTs (sent in {sent_chest:.1f} s)")
    print(f"  head CT time to flag, idle node        median {med_idle:7.2f} s   "
          f"(runs: {', '.join(f'{v:.2f}' for v in idle)})")
    print(f"  head CT time to flag, behind backlog          {loaded:7.2f} s")
    print(f"  ratio                                         {ratio:7.2f}×   "
          f"(target ≤ {TARGET_RATIO}×: {'met' if ratio <= TARGET_RATIO else 'NOT met'})")
    worst = med_idle + max(durations)
    print(f"  without the stat lane, worst case (a chest job starts as the head CT "
          f"completes): about {worst:.2f} s ({worst / med_idle:.2f}×)")
    print(f"  chest jobs finished before the head CT        {before} of {len(chests)}"
          f"   (statuses: {', '.join(sorted({i['status'] for i in items}))})")
    print(f"  chest job (load+infer+encode+write)    median {statistics.median(durations):7.2f} s")
    print(f"  backlog drained (last chest CT)               "
          f"{chest_done[-1] - item['processed_at']:7.1f} s after the head CT was flagged")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
