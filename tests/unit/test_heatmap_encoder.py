"""HeatmapEncoder: the real chest CR with a heatmap as a valid RGB Secondary Capture."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import SecondaryCaptureImageStorage

from tests.helpers.dicom_results import DETECTOR, algorithm_info, dciodvfy
from triage_node.detectors.findings import Code, DetectorResult, Finding, Urgency
from triage_node.errors import EncodingError
from triage_node.imaging.loader import load_series
from triage_node.imaging.volume import Volume
from triage_node.results import (
    HeatmapEncoder,
    ResultIdentity,
    ResultKind,
    encode_results,
)
from triage_node.results.identity import derive_uid
from triage_node.results.sc import grey_image

PNEUMOTHORAX = Code("36118008", "SCT", "Pneumothorax")
PEAK = (900, 600)
PINNED_SEG_UID = "1.2.826.0.1.3680043.8.498.74653332504221576679737867337831201994"


@pytest.fixture(scope="module")
def radiograph() -> Volume:
    """The real chest CR (MONOCHROME1, 1955×1841) as the imaging stage loads it."""
    path = get_testdata_file("RG1_UNCI.dcm", download=False)
    assert isinstance(path, str)
    return load_series([Path(path)])


def _gaussian(shape: tuple[int, int, int]) -> np.ndarray:
    yy, xx = np.mgrid[: shape[1], : shape[2]]
    heat = np.exp(-(((yy - PEAK[0]) / 200.0) ** 2 + ((xx - PEAK[1]) / 150.0) ** 2))
    return heat.astype(np.float32)[None]


def _result(volume: Volume, heatmap: np.ndarray | None, positive: bool = True) -> DetectorResult:
    findings = (
        [Finding("pneumothorax", PNEUMOTHORAX, Code("49755003", "SCT",
                 "Morphologically Altered Structure"), 0.81, "PTX-1")]
        if positive else []
    )
    return DetectorResult(DETECTOR, "1.2.0", findings,
                          Urgency.URGENT if positive else Urgency.NEGATIVE, 0.5, heatmap=heatmap)


def test_heatmap_sc_is_valid_and_references_its_source(
    radiograph: Volume, tmp_path: Path
) -> None:
    sc = HeatmapEncoder(algorithm_info()).encode(radiograph, _result(radiograph,
                                                                      _gaussian(radiograph.shape)))
    assert sc is not None
    path = tmp_path / "heatmap.dcm"
    sc.save_as(path)
    errors, _ = dciodvfy(path)
    assert errors == []

    back = pydicom.dcmread(path)
    source = radiograph.source_datasets[0]
    assert back.SOPClassUID == SecondaryCaptureImageStorage
    assert (back.StudyInstanceUID, back.PatientID) == (source.StudyInstanceUID, source.PatientID)
    assert back.SeriesDescription.startswith("AI triage heatmap")
    assert back.BurnedInAnnotation == "YES"
    assert list(back.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert back.PhotometricInterpretation == "RGB" and back.SamplesPerPixel == 3
    assert list(back.PatientOrientation) == list(source.PatientOrientation)
    (ref,) = back.SourceImageSequence
    assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert ref.ReferencedSOPClassUID == source.SOPClassUID
    assert ref.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
    assert back.DerivationCodeSequence[0].CodeValue == "113042"
    identity = ResultIdentity(source.StudyInstanceUID, source.SeriesInstanceUID, DETECTOR,
                              "1.2.0")
    assert back.SOPInstanceUID == identity.sop_instance_uid_for(ResultKind.HEATMAP)
    assert back.SeriesNumber == 9904

    rgb = back.pixel_array
    assert rgb.shape == (*radiograph.shape[1:], 3) and rgb.dtype == np.uint8
    # At the peak the jet colour map is dark red; far away the image is the plain grey source,
    # windowed and inverted (MONOCHROME1) as a viewer shows it.
    r, g, b = (int(v) for v in rgb[PEAK])
    assert r > 2 * g and r > 2 * b
    grey = np.rint(grey_image(source, radiograph.array[0]) * 255)
    corner = rgb[:200, 1600:]
    assert np.array_equal(corner[..., 0], corner[..., 2])
    assert np.abs(corner[..., 0].astype(int) - grey[:200, 1600:]).max() <= 1
    raw = source.pixel_array
    assert grey[np.unravel_index(raw.argmin(), raw.shape)] > grey[
        np.unravel_index(raw.argmax(), raw.shape)]


def test_encode_results_for_a_radiograph(radiograph: Volume, tmp_path: Path) -> None:
    objects = encode_results(radiograph, _result(radiograph, _gaussian(radiograph.shape)),
                             algorithm_info())
    assert [ds.Modality for ds in objects] == ["SR", "OT", "KO"]
    _sr, sc, kos = objects
    path = tmp_path / "kos.dcm"
    kos.save_as(path)
    assert dciodvfy(path)[0] == []
    back = hd.ko.KeyObjectSelectionDocument.from_dataset(pydicom.dcmread(path))
    referenced = [
        str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        for i in back.ContentSequence if i.ValueType == "IMAGE"
    ]
    assert referenced == [radiograph.source_datasets[0].SOPInstanceUID, sc.SOPInstanceUID]
    assert back.resolve_reference(sc.SOPInstanceUID)[1] == sc.SeriesInstanceUID

    # Negative: heatmap still written (where the model looked), no KOS.
    negative = encode_results(radiograph, _result(radiograph, _gaussian(radiograph.shape),
                                                  positive=False), algorithm_info())
    assert [ds.Modality for ds in negative] == ["SR", "OT"]
    assert [ds.Modality for ds in encode_results(
        radiograph, _result(radiograph, None), algorithm_info())] == ["SR", "KO"]


def test_new_kind_keeps_existing_uids() -> None:
    # Pinned before ResultKind.HEATMAP existed: adding a kind must not move v1 UIDs.
    identity = ResultIdentity("1.2.3", "1.2.3.4", "ich-detector", "1.2.0")
    assert identity.sop_instance_uid_for(ResultKind.SEG) == derive_uid(
        "1.2.3", "1.2.3.4", "ich-detector", "1.2.0", "instance", "SEG", "1"
    )
    assert identity.sop_instance_uid_for(ResultKind.SEG) == PINNED_SEG_UID
    assert identity.series_instance_uid_for(ResultKind.HEATMAP) not in {
        identity.series_instance_uid_for(k) for k in ("SEG", "SR", "KOS")
    }


def test_bad_heatmaps_are_encoding_errors(radiograph: Volume, tmp_path: Path) -> None:
    encoder = HeatmapEncoder(algorithm_info())
    with pytest.raises(EncodingError, match="heatmap has shape"):
        encoder.encode(radiograph, _result(radiograph, _gaussian(radiograph.shape)[:, :-1]))
    with pytest.raises(EncodingError, match=r"in \[0, 1\]"):
        encoder.encode(radiograph, _result(radiograph, _gaussian(radiograph.shape) * 2))
    assert encoder.encode(radiograph, _result(radiograph, None)) is None
