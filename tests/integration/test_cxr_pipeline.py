"""Chest radiographs through the whole node: routing, the pneumothorax detector, and its
results (SR, heatmap Secondary Capture, KOS) in Orthanc, each valid for dciodvfy."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from deploy.demo.node import NodeProcess
from deploy.demo.orthanc import LocalOrthanc
from deploy.demo.senders import storescu
from tests.helpers.orthanc import dciodvfy_errors, study_instances
from trainers.phantoms.chest_xr import generate_chest_xr, write_chest_radiograph

pytestmark = pytest.mark.integration


def test_pneumothorax_radiograph_is_critical_with_heatmap_sr_and_kos(
        node: NodeProcess, orthanc: LocalOrthanc, tmp_path: Path) -> None:
    image, _, info = generate_chest_xr(4242, shape=(512, 512), pneumothorax_size=0.9)
    folder = tmp_path / "dx"
    folder.mkdir()
    path = write_chest_radiograph(image, info["pixel_spacing_mm"], folder / "dx.dcm",
                                  modality="DX", patient_name="CXR^POSITIVE",
                                  patient_id="CXR-1", accession_number="CXRACC1",
                                  study_description="XR CHEST PA")
    study_uid = str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
    storescu(folder, orthanc.dicom_port, called_aet="ORTHANC")  # the archive holds the image
    storescu(folder, node.dicom_port)
    item = node.wait_for_study(study_uid)
    assert item["status"] == "delivered", item
    assert (item["urgency"], item["detectors"]) == ("critical", ["cxr-pneumothorax"])
    results = study_instances(orthanc, study_uid)
    assert {m: len(v) for m, v in results.items() if m != "DX"} == {"SR": 1, "OT": 1, "KO": 1}
    for modality in ("SR", "OT", "KO"):
        assert dciodvfy_errors(results[modality][0], tmp_path, f"{modality}.dcm") == []
    heatmap = pydicom.dcmread(io.BytesIO(results["OT"][0]))
    assert heatmap.PhotometricInterpretation == "RGB"
    assert (heatmap.Rows, heatmap.Columns) == (512, 512)
    assert heatmap.BurnedInAnnotation == "YES"


def test_real_chest_cr_is_routed_and_analysed(node: NodeProcess, tmp_path: Path) -> None:
    source = Path(str(get_testdata_file("RG1_UNCI.dcm", download=False)))
    folder = tmp_path / "cr"
    folder.mkdir()
    shutil.copy(source, folder / "cr.dcm")
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    storescu(folder, node.dicom_port)
    item = node.wait_for_study(str(ds.StudyInstanceUID))
    # Pipeline and geometry on a real image, not accuracy: it was analysed and delivered.
    assert item["status"] == "delivered", item
    assert item["detectors"] == ["cxr-pneumothorax"]
    assert item["urgency"] in ("critical", "negative")
