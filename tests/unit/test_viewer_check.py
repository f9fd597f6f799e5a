"""deploy.viewer_check: SR → HTML (dsr2html), SEG/heatmap/KOS → PNG, from real result files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.data import get_testdata_file

from deploy.viewer_check import main
from tests.helpers.dicom_results import (
    DETECTOR,
    algorithm_info,
    blob_mask,
    detector_result,
    hemorrhage_finding,
    load_volume,
    write_head_ct,
)
from triage_node.detectors.findings import DetectorResult, Urgency
from triage_node.imaging.loader import load_series
from triage_node.results import encode_results


def test_renders_sr_seg_and_kos(tmp_path: Path) -> None:
    sources = tmp_path / "sources"
    volume = load_volume(write_head_ct(sources, shape=(24, 128, 128)))
    mask = blob_mask(volume.shape, (12, 64, 50), (3, 12, 10))
    results = tmp_path / "results" / "study1"
    results.mkdir(parents=True)
    for ds in encode_results(volume, detector_result([hemorrhage_finding(mask, volume)]),
                             algorithm_info()):
        ds.save_as(results / f"{ds.Modality}.dcm", enforce_file_format=True)
    out = tmp_path / "out"

    assert main([str(tmp_path / "results"), "--source", str(sources), "--out", str(out),
                 "--slices", "2", "--size", "100"]) == 0

    html = (out / "study1-SR-9902.html").read_text()
    assert "<html" in html.lower() and "Imaging Measurements" in html
    assert "hemorrhage" in html.lower()
    seg_pngs = sorted(out.glob("study1-SEG-9901-image*.png"))
    assert len(seg_pngs) == 2
    for png in seg_pngs:
        with Image.open(png) as image:
            image.verify()
        with Image.open(png) as image:
            rgb = np.asarray(image.convert("RGB"), dtype=int)
        assert max(rgb.shape[:2]) == 100
        # The overlay is red: some pixels are far redder than grey.
        assert ((rgb[..., 0] - rgb[..., 2]) > 100).any()
    # Largest slice first: the blob's middle slice (instance numbers start at 1).
    assert any(p.name.endswith("image13.png") for p in seg_pngs)
    (key,) = out.glob("study1-KO-9903-key*.png")
    with Image.open(key) as image:
        image.verify()
    assert "found" in (out / "study1-KO-9903.txt").read_text()
    assert "NOT FOUND" not in (out / "study1-KO-9903.txt").read_text()


def test_nothing_to_render_fails(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 1


def test_renders_heatmap_sc(tmp_path: Path) -> None:
    cr = get_testdata_file("RG1_UNCI.dcm", download=False)
    assert isinstance(cr, str)
    (tmp_path / "sources").mkdir()
    shutil.copy(cr, tmp_path / "sources" / "CR.dcm")
    volume = load_series([tmp_path / "sources" / "CR.dcm"])
    heat = np.zeros(volume.shape, dtype=np.float32)
    heat[0, 800:1000, 500:700] = 1.0
    result = DetectorResult(DETECTOR, "1.2.0", [], Urgency.NEGATIVE, 0.5, heatmap=heat)
    (tmp_path / "results" / "cr").mkdir(parents=True)
    for ds in encode_results(volume, result, algorithm_info()):
        ds.save_as(tmp_path / "results" / "cr" / f"{ds.Modality}.dcm", enforce_file_format=True)
    out = tmp_path / "out"
    assert main([str(tmp_path / "results"), "--source", str(tmp_path / "sources"),
                 "--out", str(out), "--size", "200"]) == 0
    with Image.open(out / "cr-OT-9904.png") as image:
        rgb = np.asarray(image.convert("RGB"), dtype=int)
    assert max(rgb.shape[:2]) == 200
    assert ((rgb[..., 0] - rgb[..., 2]) > 50).any()  # the hot square is dark red over grey
    assert (out / "cr-SR-9902.html").stat().st_size > 1000
