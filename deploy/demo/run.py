"""``make demo``: the whole job on the embedded defaults, on loopback, then cleaned up.

1. start a throwaway Orthanc (the hospital's archive/viewer) and the node (``conf/``);
2. generate three head CTs (a large bleed, a small bleed, a normal) and a chest CT;
3. send each study with DCMTK ``storescu`` to Orthanc (the archive holds the images) and to
   the node (as a PACS forwarding rule would);
4. wait for the worklist, print it, the SEG/SR/KOS objects now in Orthanc with their URLs and
   ``dciodvfy``'s verdict on each; then stop what it started (``--keep`` keeps it running).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from deploy.demo.node import REPO, NodeProcess
from deploy.demo.orthanc import LocalOrthanc
from deploy.demo.senders import storescu
from deploy.demo.studies import make_demo_studies


def _say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _dciodvfy(data: bytes, workdir: Path) -> str:
    path = workdir / "check.dcm"
    path.write_bytes(data)
    out = subprocess.run(["dciodvfy", "-new", str(path)], capture_output=True, text=True)
    text = out.stdout + out.stderr
    errors = sum(1 for line in text.splitlines() if line.startswith("Error"))
    warnings = sum(1 for line in text.splitlines() if line.startswith("Warning"))
    return f"dciodvfy: {errors} errors, {warnings} warnings"


def _show_results(orthanc: LocalOrthanc, workdir: Path) -> None:
    with orthanc.client() as client:
        for study_id in client.get("/studies").json():
            study = client.get(f"/studies/{study_id}").json()
            tags = study["MainDicomTags"]
            print(f"\n  study {tags.get('StudyDescription', '')!s:24} "
                  f"{orthanc.url}/app/explorer.html#study?uuid={study_id}")
            for series_id in study["Series"]:
                series = client.get(f"/series/{series_id}").json()
                modality = series["MainDicomTags"].get("Modality", "")
                descr = series["MainDicomTags"].get("SeriesDescription", "")
                line = f"    {modality:4} {len(series['Instances']):4} inst  {descr}"
                if modality in ("SEG", "SR", "KO", "OT"):
                    data = client.get(f"/instances/{series['Instances'][0]}/file").content
                    line += f"   [{_dciodvfy(data, workdir)}]"
                    line += f"\n         {orthanc.url}/app/explorer.html#series?uuid={series_id}"
                print(line)


def _time_to_flag(studies: list[Any], items: list[dict[str, Any]], config: Path) -> None:
    """Last instance received → worklist item flagged, per study, with and without the wait
    the completion timers impose (series quiet + study quiet, from the node's config)."""
    assembly = yaml.safe_load(config.read_text()).get("assembly", {})
    wait = float(assembly.get("series_quiet_seconds", 10)) + float(
        assembly.get("study_quiet_seconds", 20))
    totals = []
    for study, item in zip(studies, items, strict=True):
        stamps = item["timestamps"]
        if stamps.get("flagged") is None or stamps.get("last_received") is None:
            continue
        total = stamps["flagged"] - stamps["last_received"]
        totals.append(total - wait)
        print(f"  {study.name:18} flagged {total:5.2f} s after its last instance "
              f"({total - wait:4.2f} s after the {wait:.0f} s completion wait)")
    if totals:
        ordered = sorted(totals)
        p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
        print(f"  time to flag after the completion wait: p50 {statistics.median(ordered):.2f} s,"
              f" p95 {p95:.2f} s over {len(ordered)} studies")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", action="store_true",
                        help="keep Orthanc and the node running until Ctrl-C")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="triage-demo-"))
    orthanc = LocalOrthanc(workdir / "orthanc")
    node: NodeProcess | None = None
    try:
        _say("starting a throwaway Orthanc on loopback")
        orthanc.start()
        print(f"  Orthanc {orthanc.url}  (user {orthanc.username}, password {orthanc.password})")
        _say("starting triage-node with conf/node.yaml")
        node = NodeProcess(workdir / "node", orthanc).start()
        print(f"  DICOM  TRIAGE@127.0.0.1:{node.dicom_port}   API {node.api_url}")
        _say("generating sample studies (procedural phantoms, not patients)")
        studies = make_demo_studies(workdir / "studies")
        for s in studies:
            print(f"  {s.name:18} {s.instances:3} instances  truth: {s.truth}")
        _say("sending with storescu: to Orthanc (the archive) and to the node (PACS forward)")
        sent_at = time.monotonic()
        for s in studies:
            storescu(s.folder, orthanc.dicom_port, called_aet="ORTHANC")
            storescu(s.folder, node.dicom_port)
            print(f"  sent {s.name}")
        _say("waiting for the node (quiet period, inference, delivery)")
        items = [node.wait_for_study(s.study_instance_uid, timeout=600) for s in studies]
        print(f"  all {len(studies)} studies settled {time.monotonic() - sent_at:.1f} s "
              "after the first send")
        _time_to_flag(studies, items, node.config)
        _say("worklist (triage-node worklist)")
        subprocess.run([sys.executable, "-m", "triage_node.cli.main", "worklist",
                        "--data-dir", str(node.data_dir), "--width", "150"], cwd=REPO,
                       check=True)
        _say("results in Orthanc")
        _show_results(orthanc, workdir)
        if not args.keep:
            print("\n(the URLs work while the demo runs: `make demo KEEP=1` keeps it running)")
        else:
            print(f"\nRunning; API token: {node.token}")
            print(f"Console {node.api_url}/console/ (token: {node.token})\nCtrl-C to stop.")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
        return 0
    finally:
        if node is not None:
            node.stop()
        orthanc.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"work folder kept: {workdir}")


if __name__ == "__main__":
    sys.exit(main())
