"""A brain MR travels from a PACS (DCMTK storescu) through routing and the mr-brain-tumor
detector to DICOM-SEG + SR (with the midline shift measurement) in Orthanc, dciodvfy-clean."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest

from deploy.demo.node import NodeProcess
from deploy.demo.orthanc import LocalOrthanc
from deploy.demo.senders import storescu
from tests.helpers.orthanc import dciodvfy_errors, study_instances
from trainers.phantoms.brain_mr import generate_brain_mr
from trainers.phantoms.dicom import write_mr_series

pytestmark = pytest.mark.integration


def _measurements(item: pydicom.Dataset) -> dict[str, float]:
    """(concept meaning → numeric value) of every NUM content item under ``item``."""
    found: dict[str, float] = {}
    for child in item.get("ContentSequence", []):
        if child.ValueType == "NUM":
            meaning = str(child.ConceptNameCodeSequence[0].CodeMeaning)
            found[meaning] = float(child.MeasuredValueSequence[0].NumericValue)
        found.update(_measurements(child))
    return found


def test_brain_mr_with_tumour_is_urgent_with_seg_and_sr(
        node: NodeProcess, orthanc: LocalOrthanc, tmp_path: Path) -> None:
    image, _, _, info = generate_brain_mr(9001, tumour_ml=70.0, shape=(28, 256, 256),
                                          spacing=(5.0, 0.9, 0.9))
    folder = tmp_path / "mr"
    paths = write_mr_series(image, info["spacing"], folder, patient_name="MR^TUMOUR",
                            patient_id="MR-1", accession_number="MRACC1",
                            study_description="MR BRAIN", series_description="AX FLAIR",
                            body_part_examined="BRAIN", origin=info["origin"])
    assert dciodvfy_errors(paths[0].read_bytes(), tmp_path, "source.dcm") == []
    study_uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    storescu(folder, orthanc.dicom_port, called_aet="ORTHANC")
    storescu(folder, node.dicom_port)
    item = node.wait_for_study(study_uid)
    assert item["status"] == "delivered", item
    assert (item["urgency"], item["detectors"]) == ("urgent", ["mr-brain-tumor"])
    results = study_instances(orthanc, study_uid)
    assert len(results["SEG"]) == 1 and len(results["SR"]) == 1
    for modality in ("SEG", "SR"):
        assert dciodvfy_errors(results[modality][0], tmp_path, f"{modality}.dcm") == []
    seg = pydicom.dcmread(io.BytesIO(results["SEG"][0]))
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["tumour"]
    sr = pydicom.dcmread(io.BytesIO(results["SR"][0]))
    measured = _measurements(sr)
    assert measured["Distance"] == pytest.approx(info["midline_shift_mm"], abs=2.5)
    assert measured["Volume"] == pytest.approx(info["tumour_ml"], rel=0.3)
