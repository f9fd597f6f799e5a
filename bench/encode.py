"""Encode and delivery times of the result objects for a full-size CT.

A synthetic 512×512×300 CT series (written with ``trainers.phantoms.dicom.write_ct_series``
and read back with the node's loader, so the encoders see what the node sees) with three
findings whose masks span tens of slices each. Times SEG, SR and KOS encoding separately (the
first run, which pays highdicom's one-off imports and caches, is reported on its own; then the
median of the following runs), then the delivery of the three objects (Part 10 serialisation +
``OrthancDestination.send``) to a throwaway Orthanc.

Targets: encode SEG + SR + KOS ≤ 1 s; delivery ≤ 1 s.

Run: ``make bench`` or ``.venv/bin/python -m bench.encode [--runs N]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite

from deploy.demo.orthanc import LocalOrthanc
from trainers.phantoms.dicom import write_ct_series
from triage_node.config.models import OrthancConfig
from triage_node.deliver.orthanc import OrthancDestination
from triage_node.detectors.findings import Code, DetectorResult, Finding, Urgency
from triage_node.imaging.loader import load_series
from triage_node.imaging.volume import Volume
from triage_node.results import AlgorithmInfo, DeviceInfo, KosEncoder, SegEncoder, SrEncoder

GRID = (300, 512, 512)
SPACING = (1.0, 0.45, 0.45)
HEMORRHAGE = Code("50960005", "SCT", "Hemorrhage")
ALTERED = Code("49755003", "SCT", "Morphologically Altered Structure")
BLOBS = (((80, 250, 200), (20, 40, 30)), ((150, 300, 320), (15, 25, 25)),
         ((230, 200, 260), (12, 30, 20)))


def _volume(folder: Path) -> Volume:
    _z, y, x = np.ogrid[: GRID[0], : GRID[1], : GRID[2]]
    r = ((y - 256) / 220.0) ** 2 + ((x - 256) / 190.0) ** 2
    hu = np.where(r <= 1.0, np.int16(35), np.int16(-1000)).astype(np.int16)
    hu = np.broadcast_to(hu, GRID).copy()
    paths = write_ct_series(hu, SPACING, folder, patient_name="Bench^Encode",
                            patient_id="BENCH-ENC", accession_number="BENCHENC",
                            study_description="CT HEAD", series_description="Axial 1mm",
                            body_part_examined="HEAD")
    return load_series(paths)


def _result(volume: Volume) -> DetectorResult:
    z, y, x = np.ogrid[: GRID[0], : GRID[1], : GRID[2]]
    findings = []
    for n, (centre, radii) in enumerate(BLOBS, start=1):
        mask = sum(((g - c) / rr) ** 2 for g, c, rr in zip((z, y, x), centre, radii,
                                                            strict=True)) <= 1.0
        findings.append(Finding(label="hemorrhage", finding_type=HEMORRHAGE, category=ALTERED,
                                score=0.9, tracking_id=f"ICH-{n}", mask=np.asarray(mask)))
    return DetectorResult("bench-detector", "1.0.0", findings, Urgency.CRITICAL, 0.5)


def _timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def _part10(ds: Dataset) -> bytes:
    buffer = BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5, help="warm runs after the first")
    args = parser.parse_args(argv)
    algorithm = AlgorithmInfo(name="bench-detector", version="1.0.0",
                              device=DeviceInfo(serial_number="bench-node"),
                              target_findings=(HEMORRHAGE,))
    with tempfile.TemporaryDirectory(prefix="bench-encode-") as tmp:
        work = Path(tmp)
        t, volume = _timed(lambda: _volume(work / "ct"))
        assert isinstance(volume, Volume)
        print(f"series written and loaded in {t:.1f} s: {GRID[0]}×{GRID[1]}×{GRID[2]}",
              flush=True)
        result = _result(volume)
        spans = [int(f.mask.any(axis=(1, 2)).sum()) for f in result.findings
                 if f.mask is not None]
        print(f"findings span {spans} slices", flush=True)
        seg_encoder, sr_encoder = SegEncoder(algorithm), SrEncoder(algorithm)
        kos_encoder = KosEncoder(algorithm)
        rows: dict[str, list[float]] = {"SEG": [], "SR": [], "KOS": [], "SEG+SR+KOS": []}
        objects: list[Dataset] = []
        for _run in range(args.runs + 1):
            t_seg, seg = _timed(lambda: seg_encoder.encode(volume, result))
            assert isinstance(seg, hd.seg.Segmentation)
            t_sr, sr = _timed(partial(sr_encoder.encode, volume, result, seg))
            t_kos, kos = _timed(lambda: kos_encoder.encode(volume, result))
            for key, value in (("SEG", t_seg), ("SR", t_sr), ("KOS", t_kos),
                               ("SEG+SR+KOS", t_seg + t_sr + t_kos)):
                rows[key].append(value)
            objects = [o for o in (seg, sr, kos) if isinstance(o, Dataset)]

        orthanc = LocalOrthanc(work / "orthanc").start()
        try:
            os.environ["BENCH_ORTHANC_USER"], os.environ["BENCH_ORTHANC_PASSWORD"] = orthanc.auth
            destination = OrthancDestination(OrthancConfig(
                url=orthanc.url, username_env="BENCH_ORTHANC_USER",
                password_env="BENCH_ORTHANC_PASSWORD"))
            delivery: list[float] = []
            sizes = [len(_part10(o)) for o in objects]
            for _run in range(args.runs + 1):
                t, _ = _timed(lambda: [destination.send(_part10(o)) for o in objects])
                delivery.append(t)
            destination.close()
        finally:
            orthanc.stop()

    print(f"\nResult encoding, {GRID[0]}×{GRID[1]}×{GRID[2]} CT, 3 findings "
          f"(target: SEG+SR+KOS ≤ 1 s; delivery ≤ 1 s); first run, then median of {args.runs}")
    for key, values in rows.items():
        median = statistics.median(values[1:])
        print(f"  encode {key:11} first {values[0]:6.3f} s   median {median:6.3f} s"
              f"   max {max(values[1:]):6.3f} s")
    print(f"  deliver SEG+SR+KOS first {delivery[0]:6.3f} s   median "
          f"{statistics.median(delivery[1:]):6.3f} s   ({sum(sizes) / 1e6:.2f} MB: "
          + ", ".join(f"{o.Modality} {n / 1e6:.2f}" for o, n in zip(objects, sizes, strict=True))
          + ")")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
