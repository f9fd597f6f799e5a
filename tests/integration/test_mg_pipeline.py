"""A four-view mammogram through the whole node: routing (MG → mg-mass), every view analysed
on its own, and its results (SR and heatmap Secondary Capture per image, KOS for the
suspicious ones) in Orthanc, each valid for dciodvfy; the study flagged by its worst view."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from deploy.demo.node import NodeProcess
from deploy.demo.orthanc import LocalOrthanc
from deploy.demo.senders import storescu
from tests.helpers.orthanc import dciodvfy_errors, study_instances
from trainers.phantoms.mammo import generate_mammogram, write_mammogram
from triage_node.detectors.classification import ClassificationDetector
from triage_node.detectors.findings import Urgency
from triage_node.imaging.loader import load_series

pytestmark = pytest.mark.integration

VIEWS = (("R", "CC"), ("L", "CC"), ("R", "MLO"), ("L", "MLO"))
ENGINE = Path(__file__).resolve().parents[2] / "fixtures" / "engines" / "mg-mass"


def test_four_view_mammogram_is_analysed_per_view_with_results_per_view(
        node: NodeProcess, orthanc: LocalOrthanc, tmp_path: Path) -> None:
    folder = tmp_path / "mg"
    study_uid, series_uid = generate_uid(), generate_uid()
    for number, (laterality, view) in enumerate(VIEWS, start=1):
        diameter = 30.0 if (laterality, view) == ("L", "MLO") else None
        image, _, info = generate_mammogram(
            [9091, number], shape=(400, 320), view=view, laterality=laterality, density="b",
            mass_diameter_mm=diameter, margin="spiculated" if diameter else None,
        )
        write_mammogram(image, info["pixel_spacing_mm"], folder / f"{laterality}{view}.dcm",
                        laterality=laterality, view=view, photometric="MONOCHROME1",
                        bits_stored=14, patient_name="MG^POSITIVE", patient_id="MG-1",
                        accession_number="MGACC1", study_instance_uid=study_uid,
                        series_instance_uid=series_uid, instance_number=number)
    storescu(folder, orthanc.dicom_port, called_aet="ORTHANC")  # the archive holds the images
    storescu(folder, node.dicom_port)
    item = node.wait_for_study(study_uid)
    assert item["status"] == "delivered", item
    # The study takes its most urgent view: the same engine run here on each file.
    detector = ClassificationDetector(ENGINE / "manifest.json", threads=1)
    urgencies = [detector.run(load_series([p])).urgency for p in sorted(folder.glob("*.dcm"))]
    worst = min(urgencies, key=lambda u: u.rank)
    assert (item["urgency"], item["detectors"]) == (str(worst), ["mg-mass"])
    positives = sum(u is not Urgency.NEGATIVE for u in urgencies)
    results = study_instances(orthanc, study_uid)
    assert len(results["MG"]) == 4
    assert len(results["SR"]) == 4 and len(results["OT"]) == 4
    assert len(results.get("KO", [])) == positives
    for modality in ("SR", "OT", "KO"):
        for k, data in enumerate(results.get(modality, [])):
            assert dciodvfy_errors(data, tmp_path, f"{modality}{k}.dcm") == []
    heatmaps = [pydicom.dcmread(io.BytesIO(d)) for d in results["OT"]]
    assert {(h.Rows, h.Columns) for h in heatmaps} == {(400, 320)}
    assert len({str(h.SOPInstanceUID) for h in heatmaps}) == 4
