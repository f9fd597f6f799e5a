"""Time to flag: from the last instance's Success to the worklist item, quiet period excluded.

Sends a 120-slice 512×512 head CT with a bleed (a procedural phantom) to a real node with
DCMTK storescu, lets the node deliver SEG + SR to a throwaway Orthanc, and reads the node's own
timestamps (stored in the worklist item) to split the time over the steps:

    last instance received ──quiet period──▶ complete ──route/load/infer/encode/write──▶
    worklist item (flagged) ──outbox──▶ SEG + SR stored in Orthanc (delivered)

Run: ``make bench`` or ``.venv/bin/python -m bench.time_to_flag [--runs N]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

from deploy.demo.node import NodeProcess, write_node_config
from deploy.demo.orthanc import LocalOrthanc
from deploy.demo.senders import storescu
from deploy.demo.studies import make_study

GRID = (120, 512, 512)
SPACING = (1.25, 0.45, 0.45)
QUIET_S = 2.0
"""Series quiet + study quiet: the wait after the last instance, excluded from the figures."""


def _row(label: str, values: list[float]) -> str:
    med = statistics.median(values)
    return f"  {label:34} median {med:7.3f} s   min {min(values):7.3f}   max {max(values):7.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-ttf-") as tmp:
        work = Path(tmp)
        orthanc = LocalOrthanc(work / "orthanc").start()
        config = write_node_config(work / "conf", assembly__series_quiet_seconds=QUIET_S / 2,
                                   assembly__study_quiet_seconds=QUIET_S / 2,
                                   assembly__sweep_interval_seconds=0.1,
                                   delivery__poll_interval_seconds=0.1)
        node = NodeProcess(work / "node", orthanc, config=config).start()
        rows: dict[str, list[float]] = {}
        try:
            for run in range(args.runs):
                study = make_study(f"run{run}", work / "studies", seed=5000 + run,
                                   bleed_ml=15.0, grid=GRID, spacing=SPACING)
                storescu(study.folder, node.dicom_port)
                item: dict[str, Any] = node.wait_for_study(
                    study.study_instance_uid, ("delivered",), timeout=300)
                t = item["timings_s"]
                quiet_end = item["last_received_at"] + QUIET_S
                sample = {
                    "flagged (excl. quiet period)": item["processed_at"] - quiet_end,
                    "delivered (excl. quiet period)": item["delivered_at"] - quiet_end,
                    "  completion sweep lag": item["completed_at"] - quiet_end,
                    "  route": t.get("route", 0.0),
                    "  load (read + decode 120 slices)": t["ct-head-hemorrhage.load"],
                    "  infer (preprocess+ONNX+postproc)": t["ct-head-hemorrhage.infer"],
                    "  encode (SEG + SR)": t["ct-head-hemorrhage.encode"],
                    "  write results (fsync)": t["ct-head-hemorrhage.write"],
                    "  deliver to Orthanc (REST)": item["delivered_at"] - item["processed_at"],
                }
                for key, value in sample.items():
                    rows.setdefault(key, []).append(value)
                print(f"run {run + 1}: flagged {sample['flagged (excl. quiet period)']:.2f} s, "
                      f"urgency {item['urgency']}, findings {item['findings']}", flush=True)
        finally:
            node.stop()
            orthanc.stop()
    print(f"\nTime to flag, {GRID[0]}×{GRID[1]}×{GRID[2]} head CT, {args.runs} runs "
          f"(target: flagged ≤ 5 s)")
    for key, values in rows.items():
        print(_row(key, values))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
